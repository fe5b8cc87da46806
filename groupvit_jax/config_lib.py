"""Config helpers: the paper's model definition and loading `file.py:arg` config specs."""

import importlib.util
import os

import ml_collections


def groupvit_s_model() -> ml_collections.ConfigDict:
  """GroupViT-S exactly as the paper and the official release define it."""
  return ml_collections.ConfigDict(dict(
      image=dict(
          image_size=224,
          patch_size=16,
          dim=384,
          depths=(6, 3, 3),
          num_heads=(6, 6, 6),
          num_group_tokens=(64, 8, 0),
          num_output_groups=(64, 8),
          mlp_ratio=4.0,
          drop_path_rate=0.1,
          hard_assignment=True,  # False: soft assignment, no gumbel noise.
          gumbel_tau=1.0,
          assign_eps=1.0,
      ),
      text=dict(
          context_length=77,
          vocab_size=49408,
          width=256,
          layers=12,
          heads=4,  # width // 64
      ),
      projection_dim=256,
      projection_hidden_dim=4096,
      projection_layers=2,
      contrast_temperature=0.07,  # both logit scales start at log(1 / 0.07)
      dtype="float32",  # compute dtype ("bfloat16" for mixed precision); params stay float32
      remat=False,  # rematerialise transformer blocks to save activation memory
  ))


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_groupvit_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
