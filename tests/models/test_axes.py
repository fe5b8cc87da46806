"""Every parameter carries logical axis names, and the rules map them to valid mesh specs."""

import jax

from groupvit_jax import config_lib, sharding
from groupvit_jax import models


def test_every_parameter_has_logical_axes():
  template = models.variables_template(config_lib.load_config("configs/groupvit_s.py").model)
  assert sharding.unannotated_leaves(template["params"]) == []
  specs = sharding.logical_partition_specs(template["params"])
  flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  used = {axis for spec in flat for entry in spec if entry for axis in (entry if isinstance(entry, tuple) else (entry,))}
  assert used <= set(sharding.MESH_AXES)
  assert {"fsdp", "model"} <= used
