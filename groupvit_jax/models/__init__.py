"""The models in Flax linen (GroupViT, SegCLIP, LSeg); `build_model(config.model)` is the entry point."""

from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from groupvit_jax.models.groupvit import GroupViT, count_params, init_variables, random_variables
from groupvit_jax.models.layers import ATTENTION_IMPLEMENTATIONS, KERNELS
from groupvit_jax.models.lseg import LSeg
from groupvit_jax.models.segclip import SegCLIP

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def variables_template(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """ShapeDtypeStructs of the variables of the model `config` (`config.model`) describes, unallocated."""
  model = build_model(config)
  return jax.eval_shape(lambda r: init_variables(model, r, config.image.image_size, config.text.context_length),
                        jax.random.key(0))


MODELS = ("groupvit", "segclip", "lseg")


def build_model(config: ml_collections.ConfigDict) -> GroupViT | SegCLIP | LSeg:
  """Builds the model `config.model.name` names ("groupvit", the default, "segclip" or "lseg") from
  `config.model` (configs/groupvit_s.py, config_lib.segclip_model / lseg_model for the fields)."""
  if config.dtype not in _DTYPES:
    raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
  kernels = config.get("kernels", "xla")
  if kernels not in KERNELS:
    raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
  name = config.get("name", "groupvit")
  if name not in MODELS:
    raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
  if name == "lseg":
    d = config.decoder
    return LSeg(vision=dict(config.image), text=dict(config.text), embed_dim=config.projection_dim,
                features=d.features, level_widths=tuple(d.level_widths), reassemble=tuple(d.reassemble),
                readout=d.readout, use_bn=d.use_bn, arch_option=d.arch_option, block_depth=d.block_depth,
                activation=d.activation, logit_scale=config.logit_scale,
                projection_layers=config.get("projection_layers", 1),
                projection_hidden_dim=config.get("projection_hidden_dim", 4096), dtype=_DTYPES[config.dtype],
                kernels=kernels)
  if name == "segclip":
    return SegCLIP(vision=dict(config.image), text=dict(config.text), group=dict(config.group),
                   embed_dim=config.projection_dim, dtype=_DTYPES[config.dtype], kernels=kernels,
                   reconstruction=dict(config.reconstruction) if config.get("reconstruction", {}).get("dim") else None)
  attention = config.get("attention", "xla")
  if attention not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")
  if attention == "cudnn" and (jax.default_backend() != "gpu" or config.dtype == "float32"):
    # The same model either way (an implementation, not an architecture): a run trained on GPUs
    # evaluates on a CPU with its own config.
    logging.warning("model.attention='cudnn' needs an NVIDIA GPU and model.dtype bfloat16 or float16 "
                    "(backend %r, dtype %r): using 'xla'", jax.default_backend(), config.dtype)
    attention = "xla"
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
      attention=attention,
      kernels=kernels,
      # Splitting a batch that is sharded over several devices would only move it between them.
      image_splits=config.get("image_splits", 1) if jax.device_count() == 1 else 1,
      reconstruction=dict(config.reconstruction) if config.get("reconstruction", {}).get("dim") else None)


__all__ = ["GroupViT", "LSeg", "SegCLIP", "build_model", "count_params", "init_variables", "random_variables", "variables_template"]
