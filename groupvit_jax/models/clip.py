"""OpenAI CLIP's towers in Flax: the ViT image tower and the causal text tower, in CLIP's own layout.

The image tower (`CLIPVisionTower`): patches by a bias-free convolution, a class token, learned
positions (resized bicubically for other grids, the class position kept), `ln_pre`, pre-norm blocks with
QuickGELU, `ln_post` on the class token, `proj`. The text tower is the project's `TextTransformer`
(CLIP's, EOT pooling) followed by CLIP's bias-free `text_projection`. Parameter names follow OpenAI's
checkpoint (`visual/conv1`, `visual/resblocks_<i>`, `text_projection`, ...); `models/convert.py` maps
transformers' `CLIPModel` names onto them. SegCLIP builds on these towers.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models import interpolate
from groupvit_jax.models.layers import Dtype, layer_norm, normal, param_with_axes, use_kernels
from groupvit_jax.models.text_transformer import ResidualAttentionBlock, TextTransformer
from groupvit_jax.models.vit import PatchProjection

# ViT-B/16 and ViT-B/32 (OpenAI): width 768, 12 layers, 12 heads, output 512; text width 512, 12 layers.
SIZES = {
    "B/16": dict(patch_size=16, width=768, layers=12, heads=12),
    "B/32": dict(patch_size=32, width=768, layers=12, heads=12),
}


class CLIPVisionTower(nn.Module):
  """Images `[batch, h, w, 3]` (CLIP-normalised) -> `tokens` after ln_pre and any blocks.

  `embed` gives the token sequence `[batch, 1 + patches, width]` (class token first) after ln_pre;
  `block(i, x)` runs block i; `head(x)` is ln_post on the class token and the projection. `__call__`
  chains them: the image embedding `[batch, output_dim]` (not normalised).
  """
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32

  def setup(self):
    scale = self.width**-0.5
    grid = self.image_size // self.patch_size
    self.conv1 = PatchProjection(self.patch_size, self.width, dtype=self.dtype, use_bias=False)
    self.class_embedding = param_with_axes(self, "class_embedding", normal(scale), (self.width,), ("embed",))
    self.positional_embedding = param_with_axes(self, "positional_embedding", normal(scale),
                                                (grid * grid + 1, self.width), (None, "embed"))
    self.ln_pre = layer_norm("ln_pre", self.dtype)
    self.resblocks = [ResidualAttentionBlock(self.heads, self.layers, dtype=self.dtype) for _ in range(self.layers)]
    self.ln_post = layer_norm("ln_post", self.dtype)
    self.proj = param_with_axes(self, "proj", normal(scale), (self.width, self.output_dim), ("embed", None))

  def positions(self, grid: tuple[int, int]) -> jax.Array:
    """`[1 + h * w, width]`: the class position and the patch positions resized to `grid`."""
    pos = self.positional_embedding
    size = self.image_size // self.patch_size
    if tuple(grid) == (size, size):
      return pos
    patches = interpolate.resize_2d(pos[1:].reshape(1, size, size, -1), tuple(grid), "bicubic")
    return jnp.concatenate([pos[:1], patches.reshape(grid[0] * grid[1], -1)])

  def embed(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    x = self.conv1(images)  # [B, gh, gw, width]
    b, gh, gw, c = x.shape
    x = x.reshape(b, gh * gw, c)
    cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, c))
    x = jnp.concatenate([cls, x], axis=1) + self.positions((gh, gw)).astype(x.dtype)
    return self.ln_pre(x), (gh, gw)

  def block(self, i: int, x: jax.Array) -> jax.Array:
    return self.resblocks[i](x, None)

  def head(self, class_token: jax.Array) -> jax.Array:
    return self.ln_post(class_token) @ self.proj.astype(self.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    x, _ = self.embed(images)
    for i in range(self.layers):
      x = self.block(i, x)
    return self.head(x[:, 0])


class CLIP(nn.Module):
  """CLIP: `visual` (CLIPVisionTower), `text_tower` (TextTransformer), `text_projection`, `logit_scale`."""
  vision: dict[str, Any]  # image_size, patch_size, width, layers, heads
  text: dict[str, Any]  # context_length, vocab_size, width, layers, heads
  embed_dim: int = 512
  dtype: Dtype = jnp.float32
  kernels: str = "xla"

  def setup(self):
    self.visual = CLIPVisionTower(output_dim=self.embed_dim, dtype=self.dtype, **self.vision)
    self.text_tower = TextTransformer(dtype=self.dtype, **self.text)
    self.text_projection = param_with_axes(self, "text_projection", normal(self.text["width"]**-0.5),
                                           (self.text["width"], self.embed_dim), ("embed", None))
    self.logit_scale = param_with_axes(self, "logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), (), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    with use_kernels(self.kernels):
      return self.visual(images)

  def encode_text(self, text: jax.Array) -> jax.Array:
    with use_kernels(self.kernels):
      return self.text_tower(text) @ self.text_projection.astype(self.dtype)

  def __call__(self, images: jax.Array, text: jax.Array, train: bool = False,
               prompts: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    del train, prompts
    return {"image_embeds": self.encode_image(images), "text_embeds": self.encode_text(text),
            "logit_scale": jnp.minimum(jnp.exp(self.logit_scale), 100.0)}
