"""A tiny GroupViT for tests and CPU demos: same structure as GroupViT-S, every size shrunk.

  python -m groupvit_jax.train --config=configs/tiny.py --workdir=/tmp/gvj_tiny
  python -m groupvit_jax.train --config=configs/tiny.py:data_dir=/data/tfds --workdir=/tmp/gvj_tiny

The argument `data_dir` says where the shapes world is generated (default $GROUPVIT_JAX_DATA or
/tmp/groupvit_jax_tfds); `prompt_length=N` encodes the prompts at N tokens apart from the caption.
"""

import os

import ml_collections

from groupvit_jax import config_lib


def get_config(arg=None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, data_dir=os.environ.get("GROUPVIT_JAX_DATA", "/tmp/groupvit_jax_tfds"),
                             prompt_length=0)
  config = config_lib.training_defaults()
  model = config_lib.groupvit_s_model()
  model.image.update(image_size=32, patch_size=4, dim=32, depths=(2, 1, 1), num_heads=(2, 2, 2),
                     num_group_tokens=(8, 4, 0), num_output_groups=(8, 4), drop_path_rate=0.0)
  model.text.update(context_length=16, vocab_size=49408, width=32, layers=2, heads=2)
  model.update(projection_dim=16, projection_hidden_dim=64)
  config.model = model
  config.input.update(
      data=[dict(kind="shapes", config="tiny32", split="train", data_dir=arg.data_dir)],
      pp="decode|random_resized_crop(32, scale=(0.5, 1.0))|flip|normalize|nouns|prompts(3)",
      context_length=16, batch_size=16, num_examples=2000, prompt_length=arg.prompt_length or None)
  config.total_epochs = None
  config.warmup_epochs = None
  config.total_steps = 30
  config.warmup_steps = 5
  config.optim.update(lr=1e-3, reference_batch=16, warmup_lr=1e-5, min_lr=1e-5)
  config.log_every = 5
  config.checkpoint_every = 10
  return config
