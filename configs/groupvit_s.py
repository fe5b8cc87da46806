"""GroupViT-S, the paper's model and recipe (Xu et al., CVPR 2022): batch 4096, 30 epochs.

  python -m groupvit_jax.train --config=configs/groupvit_s.py --workdir=gs://BUCKET/groupvit_s \
      --config.input.data_json='[{"kind": "tfrecord", "patterns": ["gs://BUCKET/cc12m/*.tfrecord"]}]'

Importing the official weights instead of training:
  python -m groupvit_jax.models.convert --config=configs/groupvit_s.py --input=group_vit_gcc_yfcc_30e.pth \
      --output=/tmp/groupvit_s_ckpt
"""

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = config_lib.training_defaults()
  config.model = config_lib.groupvit_s_model()
  config.total_steps = None
  config.warmup_steps = None
  config.model.dtype = "bfloat16"  # mixed precision as in the paper; params and softmaxes stay fp32
  # The longest of the 80 templates with a 13-token noun fits in 24 tokens; prompts' share of the text
  # tower drops from 3 x 77 to 3 x 24 positions (training FLOPs 42.2 -> 32.6 GFLOP per image).
  config.input.prompt_length = 24
  return config
