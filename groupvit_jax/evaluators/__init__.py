"""Evaluators: zero-shot segmentation (mIoU, pictures) and classification, plugged into the trainer by name.

An evaluator is a class registered with `@register("name")`, built as `cls(model=..., config=...,
workdir=..., **its_config)`, with `run(state) -> dict[str, float]` (metric names prefixed by the
evaluator's name). `config.evals` maps evaluator names to their configs; `build` instantiates them.
"""

from groupvit_jax.evaluators.registry import Evaluators, build, register
# The built-in evaluators register themselves on import.
from groupvit_jax.evaluators import classification, segmentation  # pylint: disable=g-bad-import-order

__all__ = ["Evaluators", "build", "register", "classification", "segmentation"]
