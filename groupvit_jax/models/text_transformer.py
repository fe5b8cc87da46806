"""The CLIP-style causal text transformer of GroupViT (reference: TextTransformer)."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models.layers import Dtype, Mlp, SelfAttention, layer_norm, normal, param_with_axes, quick_gelu


class ResidualAttentionBlock(nn.Module):
  """CLIP block: x + attn(ln_1(x), causal); x + mlp(ln_2(x)) with QuickGELU."""
  num_heads: int
  num_layers: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, query_index: Optional[jax.Array] = None) -> jax.Array:
    """x [batch, length, width], mask [length, length] -> [batch, length, width], or with `query_index`
    ([batch] ints) the output at that token only, [batch, 1, width]."""
    width = x.shape[-1]
    if query_index is not None:
      mask = mask[query_index][:, None, None, :]  # that query's row: [batch, heads, 1, keys]
    # CLIP's initialisation (the reference re-initialises these after construction).
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * self.num_layers)**-0.5
    fc_std = (2 * width)**-0.5
    attn = SelfAttention(self.num_heads, dtype=self.dtype, qkv_name="in_proj", out_name="out_proj",
                         qkv_std=attn_std, out_std=proj_std, name="attn")
    y = attn(layer_norm("ln_1", self.dtype)(x), mask, query_index)
    if query_index is not None:
      x = jnp.take_along_axis(x, query_index[:, None, None], axis=1)
    x = x + y
    y = Mlp(4 * width, width, dtype=self.dtype, activation=quick_gelu, fc1_std=fc_std, fc2_std=proj_std,
            name="mlp")(layer_norm("ln_2", self.dtype)(x))
    return nn.with_logical_constraint(x + y, ("batch", "tokens", "embed"))


class TextTransformer(nn.Module):
  """Token ids `[..., length]` -> EOT features `[..., width]`.

  The feature is read at the position of each sequence's largest token id (the EOT token). Under the
  causal mask that output depends only on the tokens before it, so any `length <= context_length`
  gives the same feature: short prompts can be encoded at a short padded length.
  """
  context_length: int
  vocab_size: int
  width: int
  layers: int
  heads: int
  remat: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text: jax.Array) -> jax.Array:
    lead, length = text.shape[:-1], text.shape[-1]
    if self.layers < 1:
      raise ValueError(f"text.layers must be at least 1 (the EOT feature comes out of the last block), "
                       f"got {self.layers}")
    if length > self.context_length:
      raise ValueError(f"text length {length} exceeds the context length {self.context_length}")
    text = text.reshape(-1, length)
    embedding = param_with_axes(self, "token_embedding", normal(0.02), (self.vocab_size, self.width),
                                ("vocab", "embed"))
    pos = param_with_axes(self, "positional_embedding", normal(0.01), (self.context_length, self.width),
                          (None, "embed"))
    # Added in float32 (one rounding to dtype): under bfloat16 the position gradient then sums in float32.
    x = (jnp.take(embedding, text, axis=0) + pos[:length]).astype(self.dtype)
    causal = jnp.triu(jnp.full((length, length), -jnp.inf, jnp.float32), k=1)
    block_cls = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    eot = jnp.argmax(text, axis=-1)
    for i in range(self.layers):
      # Only the EOT output is read, so the last block computes that token alone (every token still
      # serves as key and value): the same feature, and one block's MLP and output projection run on
      # one token instead of `length` (the demo's 2-layer text tower: ~35 % less work).
      last = eot if i == self.layers - 1 else None
      x = block_cls(self.heads, self.layers, dtype=self.dtype, name=f"resblocks_{i}")(x, causal, last)
    x = layer_norm("ln_final", self.dtype)(x[:, 0])
    return x.reshape(lead + (self.width,))
