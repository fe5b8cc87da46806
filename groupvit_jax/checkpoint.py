"""Orbax checkpoints: model variables (imported weights), the trainer's state, and reading either back."""

import json
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from groupvit_jax import quiet

# Restores run with stderr muted: when a read fails (a cut file), Orbax's other in-flight reads report
# their own exceptions from background threads and the closing event loop, thousands of lines, for
# this long after; the caller raises one clear error instead.
_GRACE = 1.0

# Orbax splits the write of every replicated array across its replicas, and each split is a slice
# compiled the first time a state is saved: one per parameter, ~0.15 s each on a CPU host, half a
# minute of stall at the first checkpoint of an 8-device run. Arrays under 1 MiB per replica are
# written whole by one replica (no slice); larger ones are still split.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler() -> None:
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns that the handler of jax.Array is replaced
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        array_metadata_store=getattr(ocp.type_handlers.get_type_handler(jax.Array), "_array_metadata_store", None),
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES), override=True)
  finally:
    logging.set_verbosity(verbosity)


_register_array_handler()


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
  target = None if template is None else jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, np.float32, sharding=getattr(x, "sharding", None)),
      nn.unbox(dict(template)))
  try:
    with quiet.muted_stderr(_GRACE), ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(directory) if target is None else ckptr.restore(directory, target)
  except Exception as e:  # Orbax raises many types; the path is what the user needs.
    raise ValueError(f"not a readable checkpoint: {directory} ({type(e).__name__}: {_first_line(e)})") from None


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

  def restore_latest_readable(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest checkpoint that reads back; None when there is none.

    A checkpoint that fails to read (a cut or corrupted file) is reported loudly, moved aside to
    `<step>.damaged` (kept for inspection; the step can then be saved again) and the previous one is
    tried. Raises ValueError naming the directory when checkpoints exist and none is readable.
    """
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        with quiet.muted_stderr(_GRACE):
          restored = self.restore(step, abstract_state)
      except Exception as e:  # Orbax raises many types; which step and why is what the user needs.
        path = self.manager.directory / str(step)
        if _is_mismatch(e):  # a readable checkpoint of another model or optimizer: the config changed
          raise ValueError(f"checkpoint {path} does not match this config's train state ({_first_line(e)}); "
                           f"resume with the config it was written with, or use another workdir") from None
        logging.warning("checkpoint %s is not readable (%s: %s); moved to %s.damaged, trying the previous one",
                        path, type(e).__name__, _first_line(e), path)
        if jax.process_index() == 0:
          path.rename(path.parent / f"{step}.damaged")
        damaged.append(step)
        continue
      if damaged:
        self.manager.reload()
      return restored
    if damaged:
      self.manager.reload()
      raise ValueError(f"{self.manager.directory}: no readable checkpoint (steps {damaged} are damaged, "
                       f"moved to <step>.damaged)")
    return None

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
  from groupvit_jax.models import variables_template  # pylint: disable=g-import-not-at-top
  template = nn.unbox(variables_template(model_config))
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path}: no such directory")
  ckpts = os.path.join(path, CHECKPOINTS)
  if not os.path.isdir(ckpts):
    check_fits(path, template)
    return load_variables(path, template)
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"{ckpts}: no finished checkpoint")
  state_dir = os.path.join(ckpts, str(steps[-1]), STATE_ITEM)
  check_fits(state_dir, template)
  try:
    with quiet.muted_stderr(_GRACE), ocp.StandardCheckpointer() as ckptr:
      state = ckptr.restore(os.path.abspath(state_dir))
  except Exception as e:  # Orbax raises many types; the path is what the user needs.
    raise ValueError(f"not a readable checkpoint: {state_dir} ({type(e).__name__}: {_first_line(e)})") from None
  return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def load_text_tower(workdir: str, template: Mapping[str, Any]) -> dict[str, Any]:
  """The text tower (`text_encoder`, `text_projector`) of a GroupViT training workdir's latest checkpoint,
  checked against `template` (the receiving model's params, e.g. LSeg's); the workdir's config.json says
  which GroupViT it is."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir}: no config.json; expected a GroupViT training workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  params = load_model_variables(workdir, config.model)["params"]
  out = {}
  for name in ("text_encoder", "text_projector"):
    if name not in params or name not in template:
      raise ValueError(f"{workdir}: its model has no {name} to give (or the receiving model takes none)")
    got = jax.tree.map(lambda x: tuple(x.shape), params[name])
    want = jax.tree.map(lambda x: tuple(x.shape), dict(template[name]))
    if got != want:
      raise ValueError(f"{workdir}: its {name} does not fit the model's (shapes {got} against {want})")
    out[name] = params[name]
  return out


def check_fits(directory: str, template: Mapping[str, Any]) -> None:
  """Compares a checkpoint's array shapes (its metadata, nothing read) with the model's variables.

  Raises ValueError naming the first parameter that is missing, extra or of another shape, so a
  checkpoint evaluated with the wrong config says so before any model is built.
  """
  directory = os.path.abspath(directory)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # a train state's item has no step metadata file: Orbax warns
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(directory)
  except Exception as e:  # Orbax raises many types; the path is what the user needs.
    raise ValueError(f"not a readable checkpoint: {directory} ({type(e).__name__}: {_first_line(e)})") from None
  finally:
    logging.set_verbosity(verbosity)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, Mapping) or "params" not in tree:
    raise ValueError(f"not a readable checkpoint: {directory} (no array metadata with params)")

  def shapes(t):
    leaves = jax.tree_util.tree_flatten_with_path(t, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}

  have = shapes({k: v for k, v in dict(tree).items() if k in ("params", "batch_stats")})
  want = shapes(dict(template))
  for name in sorted(want):
    if name not in have:
      raise ValueError(f"checkpoint {directory} does not fit the config: it has no {name} {want[name]}")
    if have[name] != want[name]:
      raise ValueError(f"checkpoint {directory} does not fit the config: {name} is {have[name]} in the "
                       f"checkpoint, {want[name]} in the config")
  extra = sorted(set(have) - set(want))
  if extra:
    raise ValueError(f"checkpoint {directory} does not fit the config: the config has no {extra[0]} "
                     f"{have[extra[0]]} ({len(extra)} such)")


def _is_mismatch(error: BaseException) -> bool:
  """Orbax's errors for a checkpoint whose tree or shapes differ from the target (not damage)."""
  text = str(error).lower()
  return isinstance(error, ValueError) and ("tree structure" in text or "shape" in text)


def _first_line(error: BaseException, limit: int = 200) -> str:
  text = (str(error).strip().splitlines() or [""])[0]
  return text.split(" See full TensorStore details")[0][:limit]
