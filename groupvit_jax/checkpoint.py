"""Orbax checkpoints: model variables (imported weights), the trainer's state, and reading either back."""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp


def save_variables(directory: str, variables: Mapping[str, Any]) -> None:
  """Writes `{"params": ..., "batch_stats": ...}` to `directory` atomically (Orbax's tmp + rename)."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(directory, dict(variables), force=True)


def load_variables(directory: str, template: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads variables written by `save_variables`.

  Args:
    directory: checkpoint directory.
    template: optional pytree of arrays/ShapeDtypeStructs (with shardings) to restore onto.
  Raises:
    FileNotFoundError / ValueError naming the directory when it is missing or unreadable.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      if template is None:
        return ckptr.restore(directory)
      target = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=getattr(x, "sharding", None)),
          nn.unbox(dict(template)))
      return ckptr.restore(directory, target)
    except Exception as e:  # Orbax raises many types; the path is what the user needs.
      raise ValueError(f"{directory}: not a readable groupvit-jax checkpoint ({type(e).__name__}: "
                       f"{str(e)[:300]})") from None


class TrainCheckpointer:
  """Orbax CheckpointManager for training: async saves every N steps, keep the latest K, resume.

  Each checkpoint holds the train state (sharded arrays, restored onto any mesh) and a small JSON with
  every host's data position, so a resumed run reads exactly the examples the stopped one would have.
  Orbax writes to a temporary directory and renames it when complete: a preempted save never leaves a
  half-written checkpoint under a step name.
  """

  def __init__(self, directory: str, every_steps: int, keep: int, async_save: bool = True):
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        save_decision_policy=policy.FixedIntervalPolicy(every_steps),
        preservation_policy=policy.LatestN(keep))
    self.manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data: dict[str, Any], force: bool = False) -> bool:
    """Saves when the period says so (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)},
                                                           data=ocp.args.JsonSave(data)), force=force)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the state onto `abstract_state`'s shapes and shardings, and the data JSON."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}, data=ocp.args.JsonRestore()))
    return restored[STATE_ITEM], restored["data"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# A training workdir keeps its checkpoints here, each step's train state under the item `state`.
CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"


def load_model_variables(path: str, model_config: Any) -> dict[str, Any]:
  """`{"params", "batch_stats"}` of a converted checkpoint (`save_variables`) or of a training workdir's
  latest checkpoint, for the model `model_config` (`config.model`) describes."""
  ckpts = os.path.join(path, CHECKPOINTS)
  if not os.path.isdir(ckpts):
    from groupvit_jax.models import variables_template  # pylint: disable=g-import-not-at-top
    return load_variables(path, nn.unbox(variables_template(model_config)))
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"{ckpts}: no finished checkpoint")
  state_dir = os.path.join(ckpts, str(steps[-1]), STATE_ITEM)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.abspath(state_dir))
  except Exception as e:  # Orbax raises many types; the path is what the user needs.
    raise ValueError(f"{state_dir}: not a readable training checkpoint ({type(e).__name__})") from None
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
