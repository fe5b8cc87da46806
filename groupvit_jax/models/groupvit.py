"""GroupViT: image tower, text tower, BatchNorm projectors and the two logit scales."""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupvit_jax.models.grouping import GroupViTImageEncoder
from groupvit_jax.models.layers import (BatchNorm, Dtype, dense, param_with_axes, torch_default_bias,
                                        torch_default_kernel, use_kernels)
from groupvit_jax.models.reconstruction import GroupReconstructor, chain_assignments, random_keep, scored_patches
from groupvit_jax.models.text_transformer import TextTransformer


class ProjectMLP(nn.Module):
  """dim -> hidden -> out with BatchNorm and ReLU between (reference: ProjectMLP, Conv1d k=1).

  Works on `[..., dim]`; BatchNorm treats all leading axes as the batch.
  """
  out_dim: int
  hidden_dim: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.num_layers == 0:
      return x
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    for i in range(self.num_layers - 1):
      x = dense(self.hidden_dim, ("embed", "mlp"), name=f"linear_hidden_{i}", dtype=self.dtype,
                kernel_init=torch_default_kernel, bias_init=torch_default_bias(x.shape[-1]))(x)
      x = BatchNorm(dtype=self.dtype, name=f"bn_{i}")(x, use_running_average=not train)
      x = nn.relu(x)
    x = dense(self.out_dim, ("mlp", "embed"), name="linear_out", dtype=self.dtype,
              kernel_init=torch_default_kernel, bias_init=torch_default_bias(x.shape[-1]))(x)
    return x.reshape(lead + (self.out_dim,))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class GroupViT(nn.Module):
  """The whole model. Build it from a config with `groupvit_jax.models.build_model`.

  Variables: `params` (float32) and `batch_stats` (projector BatchNorm running statistics).
  Rng streams when `train=True`: `gumbel` (assignment noise) and `dropout` (stochastic depth).
  """
  image: dict
  text: dict
  projection_dim: int
  projection_hidden_dim: int
  projection_layers: int
  contrast_temperature: float
  dtype: Dtype = jnp.float32
  remat: bool = False
  # The image tower's attention implementation (layers.attention). The text tower's attention is
  # masked (causal) and stays on "xla".
  attention: str = "xla"
  # The products' formulation (layers.use_kernels): "xla", or "cpu" (bf16 products XLA:CPU runs natively).
  kernels: str = "xla"
  # The image tower runs on this many equal parts of the batch, as independent computations (a batch
  # it does not divide runs whole). For one CPU device: XLA:CPU runs each batched matrix product (the
  # attention's) on one thread, and independent parts let its threads share them. Same outputs and
  # gradients up to float32 rounding, the same gumbel noise (each part adds its share of the whole
  # batch's); only drop-path masks are drawn per part.
  image_splits: int = 1
  # Redraws the patches from the final groups in training (`reconstruction` in the outputs): the
  # decoder's `dim`, `depth`, `num_heads`, and `mask_ratio` (the share of patches dropped from a second
  # encoder pass; 0: every patch redrawn from the main pass's groups). None: no decoder.
  reconstruction: Optional[dict] = None

  def setup(self):
    self.img_encoder = GroupViTImageEncoder(**self.image, remat=self.remat, dtype=self.dtype,
                                            attention=self.attention)
    self.text_encoder = TextTransformer(**self.text, remat=self.remat, dtype=self.dtype)
    projector = lambda: ProjectMLP(self.projection_dim, self.projection_hidden_dim, self.projection_layers,
                                   dtype=self.dtype)
    self.img_projector = projector()
    self.text_projector = projector()
    init = nn.initializers.constant(np.log(1.0 / self.contrast_temperature))
    self.logit_scale = param_with_axes(self, "logit_scale", init, (), ())
    self.multi_label_logit_scale = param_with_axes(self, "multi_label_logit_scale", init, (), ())
    if self.reconstruction:
      r = self.reconstruction
      patch = self.image["patch_size"]
      self.reconstructor = GroupReconstructor(
          num_patches=(self.image["image_size"] // patch)**2, patch_pixels=patch * patch * 3, dim=r["dim"],
          depth=r["depth"], num_heads=r["num_heads"], masked=r["mask_ratio"] > 0, dtype=self.dtype)

  def encode_image(self, images: jax.Array, train: bool = False, return_groups: bool = False
                   ) -> dict[str, Any]:
    with use_kernels(self.kernels):
      return self._encode_image(images, train, return_groups)

  def _encode_image(self, images: jax.Array, train: bool, return_groups: bool) -> dict[str, Any]:
    """Images `[batch, height, width, 3]` (normalised) -> embeddings and grouping outputs.

    Returns:
      `image_embeds` `[batch, proj]` (not normalised), `tokens` `[batch, groups, dim]`,
      `assignments` (per grouping stage `{"hard", "soft"}` `[batch, groups_out, tokens_in]`) and,
      with `return_groups`, `group_embeds` `[batch, groups, proj]` (each final group projected).
    """
    n = self.image_splits
    if n > 1 and images.shape[0] % n == 0:
      parts, keys = [], None
      for i, part in enumerate(jnp.split(images, n)):
        parts.append(self.img_encoder(part, train=train, batch_part=(i, n), gumbel_keys=keys))
        keys = parts[-1].pop("gumbel_keys")
      out = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
    else:
      out = self.img_encoder(images, train=train)
    result = {"image_embeds": self.img_projector(out["pooled"], train=train),
              "tokens": out["tokens"], "assignments": out["assignments"]}
    if return_groups:
      result["group_embeds"] = self.img_projector(out["tokens"], train=train)
    return result

  def encode_text(self, text: jax.Array, train: bool = False) -> jax.Array:
    """Token ids `[..., length]` -> text embeddings `[..., proj]` (not normalised).

    All texts go through the projector's BatchNorm as one batch, as the reference runs caption and
    prompts in one pass.
    """
    with use_kernels(self.kernels):
      return self.text_projector(self.text_encoder(text), train=train)

  def reconstruct(self, images: jax.Array, image: dict[str, Any], train: bool) -> tuple[jax.Array, jax.Array]:
    """Every patch's pixels predicted from the final group it was assigned to (the hard maps chained).

    With `mask_ratio` > 0 in training, the groups come from a second pass over a random subset of the
    patches (rng stream `mask`), and only the dropped patches are scored; else from the main pass
    (`image`, encode_image's outputs), every patch scored.
    """
    b = images.shape[0]
    num_patches = self.reconstructor.num_patches
    keep = None
    if train and self.reconstruction["mask_ratio"] > 0:
      keep = random_keep(self.make_rng("mask"), b, num_patches, self.reconstruction["mask_ratio"])
      image = self.img_encoder(images, train=train, keep=keep)
    patch_to_group = chain_assignments([m["hard"] for m in image["assignments"]])[-1]
    return self.reconstructor(image["tokens"], patch_to_group, keep), scored_patches(keep, b, num_patches)

  def logit_scales(self) -> tuple[jax.Array, jax.Array]:
    """exp of the two learnable logit scales, clamped at 100 as in the reference."""
    return (jnp.minimum(jnp.exp(self.logit_scale), 100.0),
            jnp.minimum(jnp.exp(self.multi_label_logit_scale), 100.0))

  def __call__(self, images: jax.Array, text: jax.Array, train: bool = False,
               prompts: Optional[jax.Array] = None) -> dict[str, Any]:
    """Forward for training.

    Args:
      images: `[batch, height, width, 3]`.
      text: `[batch, length]` captions, or `[batch, 1 + K, length]` caption followed by K prompts.
      train: batch statistics, gumbel noise and stochastic depth when True.
      prompts: optional `[batch, K, prompt_length]` prompts next to `[batch, length]` captions. The
        text tower's feature at EOT depends only on the tokens before it (causal mask), so short
        prompts encoded at a short length give the same embeddings as at the caption's length, for
        a fraction of the text tower's work. A row of zeros stands for the caption itself (the
        prompt slots of a caption with too few nouns) and takes the caption's feature. Caption and
        prompt features then share one projector (BatchNorm) batch, as in the single-array form.
    Returns:
      dict with `image_embeds` `[batch, proj]`, `text_embeds` `[batch, proj]`, `prompt_embeds`
      `[batch, K, proj]` (only with prompts), `logit_scale`, `multi_label_logit_scale` (clamped exps),
      `assignments` (the image tower's maps), and with `reconstruction` configured the predicted
      pixels `[batch, patches, pixels]` and the patches they are scored on, `reconstruction_weights`
      `[batch, patches]`.
    """
    if prompts is not None and (text.ndim != 2 or prompts.ndim != 3):
      raise ValueError(f"with prompts, text must be [batch, length] and prompts [batch, K, length]; got "
                       f"{text.shape} and {prompts.shape}")
    with use_kernels(self.kernels):
      return self._forward(images, text, train, prompts)

  def _forward(self, images: jax.Array, text: jax.Array, train: bool, prompts: Optional[jax.Array]
               ) -> dict[str, Any]:
    image = self._encode_image(images, train, False)
    if prompts is not None:
      caption = self.text_encoder(text)[:, None]
      is_caption = jnp.all(prompts == 0, axis=-1, keepdims=True)
      features = jnp.concatenate([caption, jnp.where(is_caption, caption, self.text_encoder(prompts))], axis=1)
      text_embeds = self.text_projector(features, train=train)
    else:
      text_embeds = self.text_projector(self.text_encoder(text), train=train)
    scale, ml_scale = self.logit_scales()
    out = {"image_embeds": image["image_embeds"], "logit_scale": scale, "multi_label_logit_scale": ml_scale,
           "assignments": image["assignments"]}
    if self.reconstruction:
      out["reconstruction"], out["reconstruction_weights"] = self.reconstruct(images, image, train)
    if text_embeds.ndim == 3:
      out["text_embeds"] = text_embeds[:, 0]
      out["prompt_embeds"] = text_embeds[:, 1:]
    else:
      out["text_embeds"] = text_embeds
    return out


def init_variables(model: GroupViT, rng: jax.Array, image_size: int, context_length: int,
                   batch: int = 2) -> dict[str, Any]:
  """Initialises the model on dummy inputs; returns boxed (logically annotated) variables."""
  images = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
  text = jnp.zeros((batch, context_length), jnp.int32)
  params_rng, gumbel_rng, dropout_rng = jax.random.split(rng, 3)
  variables = model.init({"params": params_rng, "gumbel": gumbel_rng, "dropout": dropout_rng}, images, text,
                         train=False)
  # A linear projector (projection_layers=1) has no BatchNorm; the collection is kept (empty) all the same.
  return {"batch_stats": {}, **variables}


def random_variables(model: GroupViT, model_config: Any, rng: jax.Array) -> dict[str, Any]:
  """Unboxed variables of a freshly initialised model (jitted init; `model_config` is `config.model`)."""
  return nn.unbox(jax.jit(lambda r: init_variables(model, r, model_config.image.image_size,
                                                   model_config.text.context_length))(rng))


def count_params(params: Any) -> int:
  """Total number of parameter scalars."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))

