"""A tiny GroupViT for tests and CPU demos: same structure as GroupViT-S, every size shrunk.

  python -m groupvit_jax.models.convert --config=configs/tiny.py ...
"""

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  model = config_lib.groupvit_s_model()
  model.image.update(image_size=32, patch_size=4, dim=32, depths=(2, 1, 1), num_heads=(2, 2, 2),
                     num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0)
  model.text.update(context_length=16, vocab_size=1000, width=32, layers=2, heads=2)
  model.update(projection_dim=16, projection_hidden_dim=64)
  config.model = model
  return config
