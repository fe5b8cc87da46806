"""ViT pieces of the image tower: patch embedding, position embedding and pre-norm blocks."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models import interpolate
from groupvit_jax.models.layers import (Dtype, DropPath, Mlp, SelfAttention, affine, layer_norm, param_with_axes,
                                        torch_default_bias, torch_default_kernel, normal)


class PatchProjection(nn.Module):
  """nn.Conv(dim, (p, p), strides=(p, p), padding="VALID") with the same parameters, as one product.

  Each whole patch, flattened in (row, column, channel) order, times the kernel reshaped to
  [p * p * channels, dim]: the convolution's arithmetic (a cross-correlation) as a plain matmul. On
  XLA:CPU the strided convolution's kernel gradient transposed the whole image batch channel-minor
  first; here it is one [p*p*c, patches] x [patches, dim] product. The bias is added in float32.
  """
  patch_size: int
  dim: int
  dtype: Dtype = jnp.float32
  use_bias: bool = True  # CLIP's patch convolution has none

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, c = images.shape
    kernel = param_with_axes(self, "kernel", torch_default_kernel, (p, p, c, self.dim),
                             (None, None, None, "embed"))
    bias = (param_with_axes(self, "bias", torch_default_bias(p * p * c), (self.dim,), ("embed",))
            if self.use_bias else None)
    gh, gw = h // p, w // p
    # Like PyTorch's strided conv (and the reference), pixels past the last whole patch are dropped.
    patches = images[:, :gh * p, :gw * p].reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    y = affine(patches.reshape(b * gh * gw, p * p * c), kernel.reshape(p * p * c, self.dim), bias, self.dtype)
    return y.reshape(b, gh, gw, self.dim)


class PatchEmbed(nn.Module):
  """Non-overlapping patch convolution followed by LayerNorm.

  Input `[batch, height, width, 3]` -> `[batch, height/p * width/p, dim]` (row-major patches).
  """
  patch_size: int
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    p = self.patch_size
    b, h, w, _ = images.shape
    grid = (h // p, w // p)
    x = PatchProjection(p, self.dim, dtype=self.dtype, name="proj")(images)
    x = x.reshape(b, grid[0] * grid[1], self.dim)
    return layer_norm("norm", self.dtype)(x), grid


class PositionEmbedding(nn.Module):
  """Learned position embedding for a square patch grid, resized bicubically for other grids.

  The resize reproduces PyTorch's F.interpolate(mode='bicubic', align_corners=False), as the
  reference does for inputs larger than its training size (e.g. 448-px sliding windows).
  """
  grid_size: int
  dim: int

  @nn.compact
  def __call__(self, grid: tuple[int, int]) -> jax.Array:
    pos = param_with_axes(self, "pos_embed", normal(0.02),
                          (1, self.grid_size * self.grid_size, self.dim), (None, "patches", "embed"))
    if tuple(grid) == (self.grid_size, self.grid_size):
      return pos
    return resize_pos_embed(pos, self.grid_size, grid)


def resize_pos_embed(pos: jax.Array, grid_size: int, new_grid: tuple[int, int]) -> jax.Array:
  """Bicubic (a=-0.75) resize of a `[1, grid*grid, dim]` embedding to `[1, h*w, dim]`."""
  dim = pos.shape[-1]
  pos = pos.reshape(1, grid_size, grid_size, dim)
  pos = interpolate.resize_2d(pos, tuple(new_grid), "bicubic")
  return pos.reshape(1, new_grid[0] * new_grid[1], dim)


class AttnBlock(nn.Module):
  """Pre-norm transformer block: x + attn(LN(x)); x + mlp(LN(x)) (reference: AttnBlock)."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention's implementation

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True,
               mask: Optional[jax.Array] = None) -> jax.Array:
    dim = x.shape[-1]
    drop = DropPath(self.drop_path)
    y = SelfAttention(self.num_heads, dtype=self.dtype, implementation=self.attention, name="attn")(
        layer_norm("norm1", self.dtype)(x), mask)
    x = x + drop(y, deterministic)
    y = Mlp(int(dim * self.mlp_ratio), dim, dtype=self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
    x = x + drop(y, deterministic)
    return nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
