"""Redrawing image patches from the final groups: the decoder of the reconstruction loss.

Each patch receives the token of the group it was assigned to (the stages' hard maps chained, so the
gradient reaches every assignment through the straight-through maps), plus its position; a small
decoder predicts the patch's pixels. One group for the whole image cannot redraw where the objects are,
so the loss rewards groups that follow the image's parts (SegCLIP's reconstruction, Luo et al. 2023).
With masking, the groups come from an encoder pass over the kept patches only and the decoder predicts
the dropped ones from them and mask tokens, as in MAE.

`GroupReconstructor` is GroupViT's decoder (group tokens in); `MaskedPatchDecoder` is SegCLIP's (MAE's
decoder over patch states that were rebuilt from the regions, models/segclip.py).
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupvit_jax.models.layers import Dtype, Mlp, dense, layer_norm, normal, param_with_axes
from groupvit_jax.models.vit import AttnBlock


def chain_assignments(maps: Sequence[jax.Array]) -> list[jax.Array]:
  """Per stage, each input token's map onto that stage's groups.

  Args:
    maps: per grouping stage `[batch, groups_out, tokens_in]` (the next stage's tokens_in are this
      stage's groups_out).
  Returns:
    per stage `[batch, tokens, groups_stage]` (tokens of the first stage: the patches).
  """
  chained, out = None, []
  for m in maps:
    m = jnp.swapaxes(m, 1, 2)
    chained = m if chained is None else jnp.einsum("bpg,bgh->bph", chained, m)
    out.append(chained)
  return out


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """`[batch, h, w, c]` -> `[batch, patches, patch_size * patch_size * c]`, row-major patches."""
  b, h, w, c = images.shape
  p = patch_size
  x = images[:, :h // p * p, :w // p * p].reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_keep(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float) -> jax.Array:
  """`[batch, kept]` sorted indices of the patches an encoder pass keeps (a random subset per image)."""
  kept = max(1, int(round(num_patches * (1.0 - mask_ratio))))
  order = jnp.argsort(jax.random.uniform(rng, (batch, num_patches)), axis=-1)
  return jnp.sort(order[:, :kept], axis=-1)


def scored_patches(keep: Optional[jax.Array], batch: int, num_patches: int) -> jax.Array:
  """`[batch, num_patches]`: 1 for the patches the reconstruction is scored on — the dropped ones, or every
  patch when `keep` is None (nothing dropped)."""
  if keep is None:
    return jnp.ones((batch, num_patches), jnp.float32)
  return 1.0 - jnp.zeros((batch, num_patches), jnp.float32).at[jnp.arange(batch)[:, None], keep].set(1.0)


def _fill_dropped(kept: jax.Array, keep: jax.Array, mask_token: jax.Array, num_patches: int) -> jax.Array:
  """`[batch, kept, dim]` at positions `keep` `[batch, kept]` of a `[batch, num_patches, dim]` sequence whose
  other positions hold `mask_token` `[dim]`."""
  b = kept.shape[0]
  full = jnp.broadcast_to(mask_token, (b, num_patches, kept.shape[-1]))
  return full.at[jnp.arange(b)[:, None], keep].set(kept)


class GroupReconstructor(nn.Module):
  """Predicts every patch's pixels from the group token each patch was assigned to.

  Input per position: its group's token (projected to `dim`) or, for a dropped patch, a learned mask
  token; plus a learned position embedding. `depth` pre-norm transformer blocks (0: one MLP per patch,
  which sees only its own group and position), a LayerNorm and a linear map to the pixels.
  """
  num_patches: int
  patch_pixels: int
  dim: int = 64
  depth: int = 1
  num_heads: int = 4
  masked: bool = False  # whether dropped patches occur (they take a learned mask token)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, group_tokens: jax.Array, patch_to_group: jax.Array,
               keep: Optional[jax.Array] = None) -> jax.Array:
    """Args:
      group_tokens: `[batch, groups, width]`.
      patch_to_group: `[batch, kept, groups]`: each (kept) patch's assignment (one-hot in training).
      keep: `[batch, kept]` indices of the kept patches, None when every patch is kept.
    Returns:
      `[batch, num_patches, patch_pixels]` predicted pixels.
    """
    x = jnp.einsum("bpg,bgc->bpc", patch_to_group.astype(self.dtype), group_tokens.astype(self.dtype))
    x = dense(self.dim, ("embed", "mlp"), name="embed", dtype=self.dtype)(x)
    if self.masked:
      mask_token = param_with_axes(self, "mask_token", normal(0.02), (self.dim,), ("embed",))
    if keep is not None:
      x = _fill_dropped(x, keep, mask_token.astype(self.dtype), self.num_patches)
    pos = param_with_axes(self, "pos_embed", normal(0.02), (1, self.num_patches, self.dim),
                          (None, "patches", "embed"))
    x = x + pos.astype(self.dtype)
    if self.depth == 0:
      x = x + Mlp(4 * self.dim, self.dim, dtype=self.dtype, name="mlp")(layer_norm("norm_mlp", self.dtype)(x))
    for i in range(self.depth):
      x = AttnBlock(self.num_heads, dtype=self.dtype, name=f"blocks_{i}")(x)
    x = layer_norm("norm", self.dtype)(x)
    return dense(self.patch_pixels, ("embed", None), name="pred", dtype=self.dtype)(x).astype(jnp.float32)


def sincos_positions(dim: int, grid: int) -> np.ndarray:
  """MAE's fixed 2-D sine-cosine positions `[grid * grid, dim]` (row-major patches): the first half of
  the channels encodes the column, the second the row, each as [sin(pos * w_i), cos(pos * w_i)] with
  w_i = 10000^(-i / (dim / 4))."""
  if dim % 4:
    raise ValueError(f"sine-cosine positions need a width divisible by 4, got {dim}")
  omega = 1.0 / 10000**(np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
  halves = []
  for pos in (cols.reshape(-1), rows.reshape(-1)):
    out = pos[:, None] * omega[None, :]
    halves.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
  return np.concatenate(halves, axis=1).astype(np.float32)


class MaskedPatchDecoder(nn.Module):
  """SegCLIP's pixel decoder (MAE's): hidden states of the kept patches in, every patch's pixels out.

  The kept patches' states (projected to `dim`) take their places among learned mask tokens; a leading
  class slot holds the mean of the kept states, as the reference's; fixed sine-cosine positions (zero for
  the class slot); `depth` pre-norm blocks; a LayerNorm and a linear map to the pixels. The class slot
  is dropped from the output.
  """
  num_patches: int
  patch_pixels: int
  dim: int = 384
  depth: int = 3
  num_heads: int = 8
  masked: bool = True  # whether dropped patches occur (they take a learned mask token)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
    """Args:
      hidden: `[batch, kept, width]`.
      keep: `[batch, kept]` indices of the kept patches, None when every patch is kept.
    Returns:
      `[batch, num_patches, patch_pixels]` predicted pixels.
    """
    b = hidden.shape[0]
    x = jnp.concatenate([hidden.mean(axis=1, keepdims=True), hidden], axis=1)
    x = dense(self.dim, ("embed", "mlp"), name="embed", dtype=self.dtype)(x)
    if self.masked:
      mask_token = param_with_axes(self, "mask_token", normal(0.02), (self.dim,), ("embed",))
    if keep is not None:
      x = jnp.concatenate([x[:, :1], _fill_dropped(x[:, 1:], keep, mask_token.astype(self.dtype), self.num_patches)],
                          axis=1)
    grid = int(round(self.num_patches**0.5))
    pos = np.concatenate([np.zeros((1, self.dim), np.float32), sincos_positions(self.dim, grid)])
    x = x + jnp.asarray(pos, self.dtype)
    for i in range(self.depth):
      x = AttnBlock(self.num_heads, dtype=self.dtype, name=f"blocks_{i}")(x)
    x = layer_norm("norm", self.dtype)(x[:, 1:])
    return dense(self.patch_pixels, ("embed", None), name="pred", dtype=self.dtype)(x).astype(jnp.float32)
