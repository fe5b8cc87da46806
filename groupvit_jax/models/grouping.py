"""GroupViT's image tower: grouping stages and the grouping block with gumbel assignment.

Parameter names follow the official NVlabs implementation (`layers_0/downsample/assign/q_proj`, ...)
so that imported checkpoints map one to one (see `convert.py`).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models.layers import (Dtype, CrossAttention, Mlp, dense, layer_norm, normal,
                                        param_with_axes, zeros)
from groupvit_jax.models.vit import AttnBlock, PatchEmbed, resize_pos_embed

GROUP_AXIS = -2  # assignment logits are [batch, groups, tokens]; each token picks a group.


def straight_through_one_hot(soft: jax.Array, axis: int) -> jax.Array:
  """One-hot of the argmax along `axis` in the forward pass, gradients of `soft` backward.

  Written as `hard + (soft - stop_gradient(soft))` rather than the reference's
  `hard - stop_gradient(soft) + soft`: the gradients are identical, and the forward value is exactly
  one-hot instead of one-hot up to a rounding error.
  """
  index = jnp.argmax(soft, axis=axis)
  hard = jax.nn.one_hot(index, soft.shape[axis], axis=axis, dtype=soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))


def assignment_probs(logits: jax.Array, *, hard: bool, gumbel_key: Optional[jax.Array],
                     tau: float = 1.0, batch_part: tuple[int, int] = (0, 1)) -> jax.Array:
  """Softmax over the group axis, optionally with gumbel noise and straight-through hardening.

  Args:
    logits: [batch, groups, tokens] float32 assignment logits.
    hard: one-hot forward / soft backward (straight-through) when True.
    gumbel_key: adds Gumbel(0, 1) noise (training) when given.
    tau: gumbel temperature.
    batch_part: `(i, n)`: `logits` are part i of a batch split into n equal parts; the noise is that
      part of the whole batch's (same key), so a split batch draws the noise the whole one would.
  Returns:
    [batch, groups, tokens] assignment.
  """
  if gumbel_key is not None:
    index, count = batch_part
    b = logits.shape[0]
    noise = jax.random.gumbel(gumbel_key, (count * b,) + logits.shape[1:], logits.dtype)
    logits = (logits + noise[index * b:(index + 1) * b]) / tau
  soft = jax.nn.softmax(logits, axis=GROUP_AXIS)
  return straight_through_one_hot(soft, GROUP_AXIS) if hard else soft


class AssignAttention(nn.Module):
  """Single-head attention whose softmax runs over the *queries* (groups): each token picks a group."""
  hard: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  assign_eps: float = 1.0
  # Multiplies the logits q.k; None: dim**-0.5 (the reference's). Larger scales make the assignment
  # more decisive against the gumbel noise (SegCLIP leaves q.k of LayerNormed q, k unscaled).
  scale: Optional[float] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, groups: jax.Array, tokens: jax.Array, train: bool,
               gumbel_key: Optional[jax.Array] = None, batch_part: tuple[int, int] = (0, 1)
               ) -> tuple[jax.Array, dict[str, jax.Array], Optional[jax.Array]]:
    """Returns the new group tokens, the maps `{"hard", "soft"}` and the gumbel key it used (None
    without noise); `gumbel_key` overrides the module's own draw (the later parts of a split batch)."""
    c = groups.shape[-1]
    proj = lambda name: dense(c, ("embed", "heads"), name=name, dtype=self.dtype)
    q, k, v = proj("q_proj")(groups), proj("k_proj")(tokens), proj("v_proj")(tokens)
    # [batch, groups, tokens]; kept in float32 (argmax ties and the softmax are precision sensitive).
    scale = c**-0.5 if self.scale is None else self.scale
    logits = jnp.einsum("bsc,blc->bsl", q, k).astype(jnp.float32) * scale
    key = None
    if train and self.gumbel:
      key = self.make_rng("gumbel") if gumbel_key is None else gumbel_key
    assign = assignment_probs(logits, hard=self.hard, gumbel_key=key, tau=self.gumbel_tau,
                              batch_part=batch_part)
    maps = {"hard": assign, "soft": jax.nn.softmax(logits, axis=GROUP_AXIS)}
    # Each group averages its tokens; "+ eps" keeps groups that won no token finite.
    weights = assign / (jnp.sum(assign, axis=-1, keepdims=True) + self.assign_eps)
    out = jnp.einsum("bsl,blc->bsc", weights.astype(v.dtype), v)
    return dense(c, ("heads", "embed"), name="proj", dtype=self.dtype)(out), maps, key


class CrossAttnBlock(nn.Module):
  """Post-norm cross-attention block: x = q + attn(q, k); x = x + mlp(LN(x)); LN(x)."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention's implementation

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array) -> jax.Array:
    dim = query.shape[-1]
    x = query + CrossAttention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                               name="attn")(query, key)
    x = x + Mlp(int(dim * self.mlp_ratio), dim, dtype=self.dtype, name="mlp")(
        layer_norm("norm2", self.dtype)(x))
    return layer_norm("norm_post", self.dtype)(x)


class GroupingBlock(nn.Module):
  """Merges image tokens into `num_output_groups` segment tokens.

  Returns the new tokens `[batch, num_output_groups, dim]`, the assignment maps `{"hard", "soft"}`,
  each `[batch, num_output_groups, tokens]`, and the gumbel key (`AssignAttention`).
  """
  num_heads: int
  num_output_groups: int
  mlp_ratio: tuple[float, float] = (0.5, 4.0)
  hard: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  assign_eps: float = 1.0
  assign_scale: Optional[float] = None  # AssignAttention's logit scale
  # The reference adds the (projected) group tokens to what each group gathered; False: a group is only
  # what it gathered from its tokens (the group tokens, which saw the whole image, choose but add nothing).
  group_token_residual: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention's implementation (the assignment's own attention aside)

  @nn.compact
  def __call__(self, x: jax.Array, group_tokens: jax.Array, train: bool,
               gumbel_key: Optional[jax.Array] = None, batch_part: tuple[int, int] = (0, 1)
               ) -> tuple[jax.Array, dict[str, jax.Array], Optional[jax.Array]]:
    dim = x.shape[-1]
    tokens_hidden, channels_hidden = (int(r * dim) for r in self.mlp_ratio)
    group_tokens = layer_norm("norm_tokens", self.dtype)(group_tokens)
    x = layer_norm("norm_x", self.dtype)(x)
    projected = Mlp(tokens_hidden, self.num_output_groups, dtype=self.dtype, mix_tokens=True,
                    axes=("groups", "group_mlp", "groups"), name="mlp_inter")(group_tokens)
    projected = layer_norm("norm_post_tokens", self.dtype)(projected)
    projected = CrossAttnBlock(self.num_heads, dtype=self.dtype, attention=self.attention,
                               name="pre_assign_attn")(projected, x)
    new_x, maps, key = AssignAttention(self.hard, self.gumbel, self.gumbel_tau, self.assign_eps,
                                       self.assign_scale, dtype=self.dtype, name="assign")(projected, x, train, gumbel_key,
                                                                        batch_part)
    if self.group_token_residual:
      new_x = new_x + projected
    # The reference's `reduction` is the identity when stage widths match (always, for GroupViT).
    new_x = new_x + Mlp(channels_hidden, dim, dtype=self.dtype, name="mlp_channels")(
        layer_norm("norm_new_x", self.dtype)(new_x))
    return new_x, maps, key


class GroupingStage(nn.Module):
  """One stage: transformer blocks over [image tokens ; group tokens], then a grouping block.

  Reference: `GroupingLayer`. Group tokens of a later stage start at zero and receive a
  token-mixing projection of the previous stage's group tokens (as they leave its blocks).
  """
  depth: int
  num_heads: int
  num_group_tokens: int
  num_output_groups: int
  num_prev_group_tokens: int = 0
  mlp_ratio: float = 4.0
  drop_path: Sequence[float] = ()
  hard: bool = True
  gumbel: bool = True
  gumbel_tau: float = 1.0
  assign_eps: float = 1.0
  assign_scale: Optional[float] = None
  group_token_residual: bool = True  # GroupingBlock's
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention's implementation

  @nn.compact
  def __call__(self, x: jax.Array, prev_group_tokens: Optional[jax.Array], train: bool,
               gumbel_key: Optional[jax.Array] = None, batch_part: tuple[int, int] = (0, 1)
               ) -> tuple[jax.Array, Optional[jax.Array], Optional[dict[str, jax.Array]],
                          Optional[jax.Array]]:
    """Returns (image tokens, group tokens, assignment maps, gumbel key); the last three None in a
    stage without group tokens."""
    b, n, dim = x.shape
    has_projector = self.num_prev_group_tokens > 0 and self.num_group_tokens > 0
    group_tokens = None
    if self.num_group_tokens:
      init = zeros if has_projector else normal(0.02)
      group_tokens = param_with_axes(self, "group_token", init, (1, self.num_group_tokens, dim),
                                     (None, "groups", "embed"))
      group_tokens = jnp.broadcast_to(group_tokens, (b,) + group_tokens.shape[1:]).astype(self.dtype)
      if has_projector:
        proj = layer_norm("group_projector_norm", self.dtype)(prev_group_tokens)
        proj = Mlp(dim // 2, self.num_group_tokens, dtype=self.dtype, mix_tokens=True,
                   axes=("groups", "group_mlp", "groups"), name="group_projector")(proj)
        group_tokens = group_tokens + proj
      x = jnp.concatenate([x, group_tokens], axis=1)

    block_cls = nn.remat(AttnBlock, static_argnums=(2,)) if self.remat else AttnBlock
    rates = list(self.drop_path) or [0.0] * self.depth
    for i in range(self.depth):
      x = block_cls(self.num_heads, self.mlp_ratio, rates[i], dtype=self.dtype, attention=self.attention,
                    name=f"blocks_{i}")(x, not train)

    if not self.num_group_tokens:
      return x, None, None, None
    x, group_tokens = x[:, :n], x[:, n:]
    x, maps, key = GroupingBlock(self.num_heads, self.num_output_groups, hard=self.hard,
                                 gumbel=self.gumbel, gumbel_tau=self.gumbel_tau,
                                 assign_eps=self.assign_eps, assign_scale=self.assign_scale,
                                 group_token_residual=self.group_token_residual, dtype=self.dtype,
                                 attention=self.attention,
                                 name="downsample")(x, group_tokens, train, gumbel_key, batch_part)
    return x, group_tokens, maps, key


class GroupViTImageEncoder(nn.Module):
  """The image tower: patches -> stages of grouping -> final LayerNorm.

  Returns a dict with `tokens` `[batch, final_groups, dim]`, `pooled` `[batch, dim]` (their mean or max)
  and `assignments`, one `{"hard", "soft"}` dict of `[batch, groups_out, tokens_in]` maps per
  grouping stage. Called on part i of a batch split into n (`batch_part=(i, n)`, n > 1), it also
  returns `gumbel_keys`, the keys its grouping stages drew (None without noise); passed back as
  `gumbel_keys` to the other parts' calls, every part adds its share of the noise the whole batch
  would have drawn. (Drop-path masks are drawn per call.)
  """
  # The sizes come from the config (config_lib.groupvit_s_model is GroupViT-S's one definition).
  image_size: int
  patch_size: int
  dim: int
  depths: Sequence[int]
  num_heads: Sequence[int]
  num_group_tokens: Sequence[int]
  num_output_groups: Sequence[int]
  mlp_ratio: float
  drop_path_rate: float
  hard_assignment: bool
  gumbel_tau: float
  assign_eps: float
  assign_scale: Optional[float] = None  # None: the reference's dim**-0.5
  # How the final group tokens pool into the image's feature: "mean" (the reference's) or "max" (SegCLIP's).
  pooling: str = "mean"
  # Whether a group's token adds the group token that gathered it (the reference's); see GroupingBlock.
  group_token_residual: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "xla"  # layers.attention's implementation

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, *, batch_part: tuple[int, int] = (0, 1),
               gumbel_keys: Optional[Sequence[Optional[jax.Array]]] = None,
               keep: Optional[jax.Array] = None) -> dict[str, Any]:
    """`keep` (`[batch, kept]` patch indices) runs the tower on those patches only (masked
    reconstruction); the assignment maps then cover the kept patches."""
    x, grid = PatchEmbed(self.patch_size, self.dim, dtype=self.dtype, name="patch_embed")(images)
    grid_size = self.image_size // self.patch_size
    pos = param_with_axes(self, "pos_embed", normal(0.02), (1, grid_size * grid_size, self.dim),
                          (None, "patches", "embed"))
    if tuple(grid) != (grid_size, grid_size):
      pos = resize_pos_embed(pos, grid_size, grid)
    x = (x + pos).astype(self.dtype)  # added in float32: its gradient then sums in float32 too
    if keep is not None:
      x = jnp.take_along_axis(x, keep[..., None], axis=1)

    total = sum(self.depths)
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    group_tokens, assignments, keys = None, [], []
    for i, depth in enumerate(self.depths):
      start = sum(self.depths[:i])
      last = i == len(self.depths) - 1
      x, group_tokens, maps, key = GroupingStage(
          depth=depth,
          num_heads=self.num_heads[i],
          num_group_tokens=self.num_group_tokens[i],
          num_output_groups=0 if last else self.num_output_groups[i],
          num_prev_group_tokens=self.num_group_tokens[i - 1] if i else 0,
          mlp_ratio=self.mlp_ratio,
          drop_path=tuple(rates[start:start + depth]),
          hard=self.hard_assignment,
          gumbel=self.hard_assignment,
          gumbel_tau=self.gumbel_tau,
          assign_eps=self.assign_eps,
          assign_scale=self.assign_scale,
          group_token_residual=self.group_token_residual,
          remat=self.remat,
          dtype=self.dtype,
          attention=self.attention,
          name=f"layers_{i}")(x, group_tokens, train, gumbel_keys[i] if gumbel_keys else None,
                              batch_part)
      if maps is not None:
        assignments.append(maps)
      keys.append(key)
    x = layer_norm("norm", self.dtype)(x)
    if self.pooling not in ("mean", "max"):
      raise ValueError(f"model.image.pooling must be 'mean' or 'max', got {self.pooling!r}")
    pooled = jnp.max(x, axis=1) if self.pooling == "max" else jnp.mean(x, axis=1)
    out = {"tokens": x, "pooled": pooled, "assignments": assignments}
    if batch_part[1] > 1:
      out["gumbel_keys"] = keys
    return out
