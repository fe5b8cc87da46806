"""The evaluator registry: evaluators the trainer runs every `eval_every` steps and at the end, by name.

An evaluator is a class registered with `@register("name")`, built as `cls(model=..., config=...,
workdir=..., **its_config)`, with `run(state) -> dict[str, float]` (metric names prefixed by the
evaluator's name). `config.evals` maps evaluator names to their configs.
"""

from typing import Any, Callable

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str):
  def wrap(cls):
    _REGISTRY[name] = cls
    return cls
  return wrap


class Evaluators:
  """The configured evaluators; `run` merges their metrics."""

  def __init__(self, evaluators: dict[str, Any]):
    self.evaluators = evaluators

  def __bool__(self) -> bool:
    return bool(self.evaluators)

  def run(self, state: Any, step: int) -> dict[str, float]:
    del step
    metrics = {}
    for name, evaluator in self.evaluators.items():
      metrics.update({f"{name}/{k}": v for k, v in evaluator.run(state).items()})
    return metrics

  def images(self) -> dict[str, Any]:
    """Pictures of the last `run` (`{name/picture: [1, H, W, 3] uint8}`), for TensorBoard."""
    out = {}
    for name, evaluator in self.evaluators.items():
      for key, picture in getattr(evaluator, "pictures", {}).items():
        out[f"{name}/{key}"] = picture[None]
    return out


def build(evals_config: Any, **common) -> Evaluators:
  """Instantiates `config.evals` ({name: {"kind": registered name, ...}})."""
  built = {}
  for name, cfg in dict(evals_config or {}).items():
    cfg = dict(cfg)
    kind = cfg.pop("kind", name)
    if kind not in _REGISTRY:
      raise ValueError(f"unknown evaluator {kind!r} (evals.{name}); known: {sorted(_REGISTRY)}")
    built[name] = _REGISTRY[kind](**common, **cfg)
  return Evaluators(built)
