"""Logical axis names -> mesh axes. The model names every parameter's axes; these rules place them.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer
state sharded), `model` (tensor parallelism over heads / MLP hidden units).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "model")

# Logical axis -> mesh axes. Axes not listed (None) are replicated.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("tokens", None),
    ("patches", None),
    ("groups", None),
    ("group_mlp", None),
)


def logical_partition_specs(boxed_tree: Any, rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """PartitionSpecs (in mesh axes) for a tree of boxed (logically annotated) variables."""
  return nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)


def unannotated_leaves(boxed_tree: Any) -> list[str]:
  """Paths of non-scalar leaves that carry no logical axis names (the trainer cannot shard them)."""
  missing = []
  leaves = jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    if not isinstance(leaf, nn.Partitioned) and getattr(leaf, "ndim", 0) > 0:
      missing.append(jax.tree_util.keystr(path))
  return missing


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh from `{"data": -1, "fsdp": 1, "model": 1}` (-1 takes the devices left over).

  Raises ValueError when the sizes do not multiply to the device count.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  known = 1
  for s in sizes.values():
    known *= s if s != -1 else 1
  if len(fill) > 1:
    raise ValueError(f"mesh: only one axis may be -1, got {dict(sizes)}")
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes {dict(sizes)}")
    sizes[fill[0]] = len(devices) // known
  shape = tuple(sizes[a] for a in MESH_AXES)
  if known * (sizes[fill[0]] if fill else 1) != len(devices):
    raise ValueError(f"mesh {dict(sizes)} needs {int(np.prod(shape))} devices, have {len(devices)}")
  # Auto axis types: flax.linen's logical constraints do not work under Explicit ones.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def param_shardings(mesh: jax.sharding.Mesh, boxed_tree: Any,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a tree of boxed variables (unannotated leaves are replicated)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def like_params(mesh: jax.sharding.Mesh, tree: Any, params: Any, params_sharding: Any) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose params-shaped leaves mirror `params`.

  A leaf whose key path ends with a parameter's path and has its shape gets that parameter's sharding
  (Adam's mu and nu); everything else (step counts) is replicated.
  """
  by_path = {}
  for (path, p), (_, s) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(params_sharding)):
    by_path[tuple(str(k) for k in path)] = (p.shape, s)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def pick(path, leaf):
    keys = tuple(str(k) for k in path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit and hit[0] == getattr(leaf, "shape", None):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> jax.sharding.NamedSharding:
  """Batch arrays: leading axis over (data, fsdp), the rest replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles each host's slice into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in batch.items()}
