"""GroupViT-S, the paper's model (Xu et al., CVPR 2022).

Model only for now (the trainer issue adds the data and optimisation fields):
  python -m groupvit_jax.models.convert --config=configs/groupvit_s.py --input=group_vit_gcc_yfcc_30e.pth \
      --output=/tmp/groupvit_s_ckpt
"""

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.model = config_lib.groupvit_s_model()
  return config
