"""Logical axis names -> mesh axes. The model names every parameter's axes; these rules place them.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism with parameters and optimizer
state sharded), `model` (tensor parallelism over heads / MLP hidden units).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax

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
