"""GroupViT models in Flax linen; `build_model(config.model)` is the entry point."""

import jax
import jax.numpy as jnp
import ml_collections

from groupvit_jax.models.groupvit import GroupViT, count_params, init_variables, random_variables

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_model(config: ml_collections.ConfigDict) -> GroupViT:
  """Builds GroupViT from `config.model` (see configs/groupvit_s.py for the fields)."""
  if config.dtype not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
  image = dict(config.image)
  for key in ("depths", "num_heads", "num_group_tokens", "num_output_groups"):
    image[key] = tuple(image[key])
  return GroupViT(
      image=image,
      text=dict(config.text),
      projection_dim=config.projection_dim,
      projection_hidden_dim=config.projection_hidden_dim,
      projection_layers=config.projection_layers,
      contrast_temperature=config.contrast_temperature,
      dtype=_DTYPES[config.dtype],
      remat=config.remat,
      # Splitting a batch that is sharded over several devices would only move it between them.
      image_splits=config.get("image_splits", 1) if jax.device_count() == 1 else 1)


__all__ = ["GroupViT", "build_model", "count_params", "init_variables", "random_variables"]
