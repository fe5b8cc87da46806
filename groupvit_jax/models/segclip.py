"""SegCLIP (Luo et al., ICML 2023): learnable centers gather a CLIP ViT's patches into regions.

The image tower is CLIP's (models/clip.py) with the semantic group module inserted after block
`insert_after`: the class token is set aside before the first block (blocks 0..k-1 run on the patches
only), `SemanticGroup` turns the patches into `num_groups` region tokens, the remaining blocks run on
the regions, and the image embedding is `proj(ln_post(max over regions))`. The outputs follow GroupViT's
(`assignments` `[batch, groups, patches]` per grouping step, `group_embeds`), so the trainer, the
grouping losses, the evaluator and the pictures serve both.

Parameter names follow the reference's modules (`semantic_center`, `cross_att_<i>` with `ln_x`/`ln_k`,
`k_conv`/`v_conv` (grouped 1x1 convolutions), `proj_o`), so its released weights can be mapped. The
reference's cross-attention permutes only its queries to sequence-first, so in a batch of more than one
image its centers read the whole batch's tokens in a scrambled layout (exact at batch 1, as it
evaluates); here each image's centers attend to its own centers and patches.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models.clip import CLIPVisionTower
from groupvit_jax.models.grouping import assignment_probs
from groupvit_jax.models.layers import (Dtype, Mlp, attention, dense, exact_gelu, layer_norm, normal,
                                        param_with_axes, quick_gelu, use_kernels, zeros)
from groupvit_jax.models.reconstruction import MaskedPatchDecoder, random_keep, scored_patches
from groupvit_jax.models.text_transformer import ResidualAttentionBlock, TextTransformer


class CrossAttentionBlock(nn.Module):
  """q + attn(ln_x(q), ln_k(kv), ln_k(kv)); q + mlp(ln_2(q)) (QuickGELU), one fused in_proj as torch's."""
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, kv: jax.Array) -> jax.Array:
    c = q.shape[-1]
    kernel = param_with_axes(self, "in_proj_kernel", normal(0.02), (c, 3 * c), ("embed", "heads"))
    bias = param_with_axes(self, "in_proj_bias", zeros, (3 * c,), ("heads",))
    wq, wk, wv = jnp.split(kernel.astype(self.dtype), 3, axis=1)
    bq, bk, bv = jnp.split(bias.astype(self.dtype), 3)
    x, m = layer_norm("ln_x", self.dtype)(q), layer_norm("ln_k", self.dtype)(kv)
    out = attention(x @ wq + bq, m @ wk + bk, m @ wv + bv, self.num_heads)
    out_kernel = param_with_axes(self, "out_proj_kernel", normal(0.02), (c, c), ("heads", "embed"))
    out_bias = param_with_axes(self, "out_proj_bias", zeros, (c,), ("embed",))
    q = q + out @ out_kernel.astype(self.dtype) + out_bias.astype(self.dtype)
    y = Mlp(4 * c, c, dtype=self.dtype, activation=quick_gelu, name="mlp")(layer_norm("ln_2", self.dtype)(q))
    return q + y


class GroupedLinear(nn.Module):
  """A bias-free 1x1 convolution with `groups` groups: channels mix only within their group.

  `kernel` `[groups, channels / groups (in), channels / groups (out)]`.
  """
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    per = c // self.groups
    kernel = param_with_axes(self, "kernel", normal(0.02), (self.groups, per, per), (None, None, None))
    y = jnp.einsum("blgi,gio->blgo", x.reshape(x.shape[:-1] + (self.groups, per)), kernel.astype(self.dtype))
    return y.reshape(x.shape)


class SemanticGroup(nn.Module):
  """SegCLIP's semantic group module: `[batch, patches, dim]` -> regions `[batch, groups, dim]` and maps.

  1. `num_groups` learnable centers; `cross_layers` blocks in which they attend to themselves and the
     patches; `cross_ln`: q.
  2. k = k_ln(k_conv(norm(patches))), v = v_conv(norm(patches)) (grouped 1x1 convolutions, a group per head).
  3. Assignment logits q.k (unscaled) `[batch, groups, patches]`; a softmax over the groups with gumbel
     noise / tau in training (rng stream `gumbel`), plain at evaluation, hardened to one-hot forward
     with soft gradients (straight-through) in both.
  4. region = (hard map @ v) / max(patches in the region, 1) + q, then proj_o: LN, MLP (GELU), QuickGELU.
  Returns (regions, {"hard", "soft"}) with soft the noise-free softmax.
  """
  num_groups: int
  num_heads: int
  cross_layers: int = 2
  tau: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, _, c = x.shape
    centers = param_with_axes(self, "semantic_center", nn.initializers.truncated_normal(0.02),
                              (self.num_groups, c), (None, "embed"))
    q = jnp.broadcast_to(centers.astype(self.dtype), (b, self.num_groups, c))
    for i in range(self.cross_layers):
      q = CrossAttentionBlock(self.num_heads, dtype=self.dtype, name=f"cross_att_{i}")(
          q, jnp.concatenate([q, x], axis=1))
    q = layer_norm("cross_ln", self.dtype)(q)
    normed = layer_norm("norm", self.dtype)(x)
    k = layer_norm("k_ln", self.dtype)(GroupedLinear(self.num_heads, dtype=self.dtype, name="k_conv")(normed))
    v = GroupedLinear(self.num_heads, dtype=self.dtype, name="v_conv")(normed)
    logits = jnp.einsum("bgc,bpc->bgp", q, k).astype(jnp.float32)
    key = self.make_rng("gumbel") if train else None
    hard = assignment_probs(logits, hard=True, gumbel_key=key, tau=self.tau)
    soft = jax.nn.softmax(logits, axis=1)
    regions = jnp.einsum("bgp,bpc->bgc", hard.astype(self.dtype), v)
    regions = regions / jnp.maximum(hard.sum(axis=-1, keepdims=True), 1.0).astype(self.dtype)
    y = layer_norm("proj_o_ln", self.dtype)(q + regions)
    y = Mlp(4 * c, c, dtype=self.dtype, activation=exact_gelu, name="proj_o_mlp")(y)
    return quick_gelu(y.astype(jnp.float32)).astype(self.dtype), {"hard": hard, "soft": soft}


class SegCLIP(nn.Module):
  """CLIP towers with the semantic group module; GroupViT's training and evaluation interface."""
  vision: dict[str, Any]  # image_size, patch_size, width, layers, heads
  text: dict[str, Any]  # context_length, vocab_size, width, layers, heads
  group: dict[str, Any]  # num_groups, cross_layers, insert_after, tau
  embed_dim: int = 512
  dtype: Dtype = jnp.float32
  kernels: str = "xla"
  # SegCLIP's reconstruction (`reconstruction` in the training outputs): a second pass over a random
  # `1 - mask_ratio` of the patches through blocks 0..k-1 and the group module; each kept patch takes a
  # learned mixture of the regions by its assignment (`reconstruct_layer`: a linear map over the region
  # axis, QuickGELU), own copies of the blocks after k (`mae_blocks_<i>`), and `mae_decoder` (`dim`,
  # `depth`, `num_heads`) predicts the dropped patches' pixels. mask_ratio 0: every patch, from the
  # main pass's patches and assignment. None: no reconstruction.
  reconstruction: Optional[dict] = None

  def setup(self):
    self.visual = CLIPVisionTower(output_dim=self.embed_dim, dtype=self.dtype, **self.vision)
    self.semantic = SemanticGroup(self.group["num_groups"], self.vision["heads"],
                                  self.group.get("cross_layers", 2), self.group.get("tau", 0.9), dtype=self.dtype)
    self.text_tower = TextTransformer(dtype=self.dtype, **self.text)
    self.text_projection = param_with_axes(self, "text_projection", normal(self.text["width"]**-0.5),
                                           (self.text["width"], self.embed_dim), ("embed", None))
    self.logit_scale = param_with_axes(self, "logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), (), ())
    if self.reconstruction:
      r, v = self.reconstruction, self.vision
      self.reconstruct_layer = dense(self.group["num_groups"], (None, None), name="reconstruct_layer", dtype=self.dtype)
      self.mae_blocks = [ResidualAttentionBlock(v["heads"], v["layers"], dtype=self.dtype)
                         for _ in range(v["layers"] - self.group["insert_after"])]
      self.mae_decoder = MaskedPatchDecoder(
          num_patches=(v["image_size"] // v["patch_size"])**2, patch_pixels=v["patch_size"]**2 * 3, dim=r["dim"],
          depth=r["depth"], num_heads=r["num_heads"], masked=r["mask_ratio"] > 0, dtype=self.dtype)

  def encode_image(self, images: jax.Array, train: bool = False, return_groups: bool = False) -> dict[str, Any]:
    """Images -> `image_embeds` `[batch, embed]`, `tokens` (regions), `assignments` (one map) and, with
    `return_groups`, `group_embeds` (each region through ln_post and the projection)."""
    with use_kernels(self.kernels):
      return self._encode_image(images, train, return_groups)[0]

  def _encode_image(self, images: jax.Array, train: bool, return_groups: bool) -> tuple[dict[str, Any], jax.Array]:
    """encode_image's outputs and the group module's region tokens."""
    regions, maps = self.semantic(self._patches(images), train)
    x = regions
    for i in range(self.group["insert_after"], self.vision["layers"]):
      x = self.visual.block(i, x)
    out = {"image_embeds": self.visual.head(jnp.max(x, axis=1)), "tokens": x, "assignments": [maps]}
    if return_groups:
      out["group_embeds"] = self.visual.head(x)
    return out, regions

  def _patches(self, images: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
    """The patch tokens after blocks 0..k-1 (the class token set aside before the first block; with
    `keep` `[batch, kept]`, only those patches)."""
    x, _ = self.visual.embed(images)
    x = x[:, 1:]
    if keep is not None:
      x = jnp.take_along_axis(x, keep[..., None], axis=1)
    for i in range(self.group["insert_after"]):
      x = self.visual.block(i, x)
    return x

  def reconstruct(self, images: jax.Array, regions: jax.Array, maps: dict[str, jax.Array], train: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """Predicted pixels `[batch, patches, pixels]` and the patches they are scored on `[batch, patches]`
    (`regions`, `maps`: the main pass's, used when every patch is reconstructed)."""
    b = images.shape[0]
    n = self.mae_decoder.num_patches
    keep = None
    if train and self.reconstruction["mask_ratio"] > 0:
      keep = random_keep(self.make_rng("mask"), b, n, self.reconstruction["mask_ratio"])
      regions, maps = self.semantic(self._patches(images, keep), train)
    mix = self.reconstruct_layer(jnp.swapaxes(maps["hard"], 1, 2).astype(self.dtype))  # [batch, kept, groups]
    x = quick_gelu(jnp.einsum("bpg,bgc->bpc", mix, regions))
    for block in self.mae_blocks:
      x = block(x, None)
    return self.mae_decoder(x, keep), scored_patches(keep, b, n)

  def encode_text(self, text: jax.Array, train: bool = False) -> jax.Array:
    del train
    with use_kernels(self.kernels):
      return self.text_tower(text) @ self.text_projection.astype(self.dtype)

  def logit_scales(self) -> tuple[jax.Array, jax.Array]:
    scale = jnp.minimum(jnp.exp(self.logit_scale), 100.0)
    return scale, scale

  def __call__(self, images: jax.Array, text: jax.Array, train: bool = False,
               prompts: Optional[jax.Array] = None) -> dict[str, Any]:
    """Forward for training (text `[batch, length]` or `[batch, 1 + K, length]` with the K prompts, or the
    prompts apart): `image_embeds`, `text_embeds` (and `prompt_embeds` with prompts),
    `logit_scale` (also as `multi_label_logit_scale`) and `assignments`."""
    with use_kernels(self.kernels):
      return self._forward(images, text, train, prompts)

  def _forward(self, images: jax.Array, text: jax.Array, train: bool, prompts: Optional[jax.Array]
               ) -> dict[str, Any]:
    image, regions = self._encode_image(images, train, False)
    scale, _ = self.logit_scales()
    out = {"image_embeds": image["image_embeds"], "logit_scale": scale, "multi_label_logit_scale": scale,
           "assignments": image["assignments"]}
    if self.reconstruction:
      out["reconstruction"], out["reconstruction_weights"] = self.reconstruct(
          images, regions, image["assignments"][0], train)
    text_embeds = self.encode_text(text)
    if text.ndim == 3:  # [batch, 1 + K, length]: the caption, then its K prompts
      out["text_embeds"], out["prompt_embeds"] = text_embeds[:, 0], text_embeds[:, 1:]
    else:
      out["text_embeds"] = text_embeds
    if prompts is not None:  # a row of zeros stands for the caption (as GroupViT's forward)
      is_caption = jnp.all(prompts == 0, axis=-1, keepdims=True)
      out["prompt_embeds"] = jnp.where(is_caption, out["text_embeds"][:, None], self.encode_text(prompts))
    return out
