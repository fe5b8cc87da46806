"""LSeg (Li et al., ICLR 2022): a ViT with a DPT decoder gives every pixel an embedding that is matched
against the embeddings of any label names from a frozen text tower.

The image path, as the reference (isl-org/lang-seg, modules/models/lseg_*.py):
- a timm-style ViT (patch convolution with bias, class token, learned positions resized bilinearly for
  other grids, pre-norm blocks); the outputs of four blocks (`hooks`) are read;
- reassemble, per hooked level: the readout (`project`: each patch token concatenated with the class
  token, linear, GELU; `add`; `ignore`), the token grid, a 1x1 convolution to that level's width and a
  resampling by `reassemble` (x4 and x2 by transposed convolutions, x1, x0.5 by a 3x3 stride-2
  convolution), then a 3x3 convolution without bias to `features` channels;
- four fusion blocks from the coarsest level up (residual convolution units with BatchNorm, the finer
  level added through its own unit, bilinear x2 with aligned corners, a 1x1 convolution);
- `head1`, a 1x1 convolution to the text embedding's width; per-pixel features and label embeddings
  L2-normalised; logits = logit_scale (fixed, 1/0.07) x their dot products;
- optionally (`arch_option` 1 or 2) `block_depth` spatial regularisation blocks on the logits: one 3x3
  convolution shared by every label channel (1: the channels' max added before the activation), the
  last block without activation;
- bilinear resizing (aligned corners) to the input size (the reference's x2 for patch 16).

The text tower is the project's `TextTransformer` with GroupViT's projector (`text_encoder`,
`text_projector`, so a GroupViT checkpoint's text tower loads by name) or CLIP's bias-free
`text_projection` (`text.layout = "clip"`). It is frozen in training (`optim.freeze`) and always run
in inference mode.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupvit_jax.models import interpolate
from groupvit_jax.models.groupvit import ProjectMLP, l2_normalize
from groupvit_jax.models.layers import (BatchNorm, Dtype, LayerNorm, Mlp, SelfAttention, exact_gelu, normal,
                                        param_with_axes, use_kernels)
from groupvit_jax.models.text_transformer import TextTransformer
from groupvit_jax.models.vit import PatchProjection

READOUTS = ("ignore", "add", "project")


def align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` matrix of 1-D linear interpolation with aligned corners (PyTorch align_corners=True)."""
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == 1 or out_size == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 2)
  frac = src - i0
  m[np.arange(out_size), i0] = 1.0 - frac
  m[np.arange(out_size), i0 + 1] += frac
  return m


def resize_aligned(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of `[batch, h, w, c]` to `size` with aligned corners (F.interpolate(...,
  mode="bilinear", align_corners=True))."""
  mh = jnp.asarray(align_corners_matrix(x.shape[1], size[0]), jnp.float32)
  mw = jnp.asarray(align_corners_matrix(x.shape[2], size[1]), jnp.float32)
  y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32))
  return jnp.einsum("pw,bowc->bopc", mw, y).astype(x.dtype)


class ResidualConvUnit(nn.Module):
  """x + BN(conv(relu(BN(conv(relu(x)))))) with 3x3 convolutions (the reference's ResidualConvUnit_custom)."""
  features: int
  use_bn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = x
    for i in (1, 2):
      y = nn.Conv(self.features, (3, 3), padding=1, use_bias=not self.use_bn, dtype=self.dtype, name=f"conv{i}")(
          nn.relu(y))
      if self.use_bn:
        y = BatchNorm(dtype=self.dtype, axis_name=None, name=f"bn{i}")(y, use_running_average=not train)
    return x + y


class FeatureFusionBlock(nn.Module):
  """(coarse [+ unit1(skip)]) -> unit2 -> bilinear x2 (aligned corners) -> 1x1 convolution."""
  features: int
  use_bn: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    if skip is not None:
      x = x + ResidualConvUnit(self.features, self.use_bn, self.dtype, name="resConfUnit1")(skip, train)
    x = ResidualConvUnit(self.features, self.use_bn, self.dtype, name="resConfUnit2")(x, train)
    x = resize_aligned(x, (2 * x.shape[1], 2 * x.shape[2]))
    return nn.Conv(self.features, (1, 1), dtype=self.dtype, name="out_conv")(x)


class PatchUpsample(nn.Module):
  """A transposed convolution whose kernel equals its stride (`[b, h, w, in]` -> `[b, h f, w f, out]`):
  each input pixel spreads into its own f x f block, `kernel[a, c, in, out]` = PyTorch's
  ConvTranspose2d weight `[in, out, a, c]`."""
  features: int
  factor: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = self.factor
    fan_in = self.features * f * f  # PyTorch's ConvTranspose2d default init bound: 1/sqrt(out * k * k)
    bound = fan_in**-0.5
    uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param("kernel", uniform, (f, f, x.shape[-1], self.features))
    bias = self.param("bias", uniform, (self.features,))
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwi,acio->bhawco", x, kernel.astype(self.dtype)).reshape(b, h * f, w * f, self.features)
    return y + bias.astype(y.dtype)


class Reassemble(nn.Module):
  """Tokens `[batch, 1 + h*w, width]` of one hooked block -> a feature map `[batch, h*f, w*f, features]`."""
  level_width: int
  features: int
  factor: float
  readout: str = "project"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, grid: tuple[int, int]) -> jax.Array:
    if self.readout not in READOUTS:
      raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
    cls, patches = tokens[:, :1], tokens[:, 1:]
    if self.readout == "project":
      both = jnp.concatenate([patches, jnp.broadcast_to(cls, patches.shape)], axis=-1)
      patches = exact_gelu(nn.Dense(tokens.shape[-1], dtype=self.dtype, name="readout")(both))
    elif self.readout == "add":
      patches = patches + cls
    x = patches.reshape(tokens.shape[0], grid[0], grid[1], -1)
    x = nn.Conv(self.level_width, (1, 1), dtype=self.dtype, name="project")(x)
    if self.factor > 1:
      x = PatchUpsample(self.level_width, int(self.factor), self.dtype, name="resample")(x)
    elif self.factor < 1:
      x = nn.Conv(self.level_width, (3, 3), strides=(2, 2), padding=1, dtype=self.dtype, name="resample")(x)
    # The decoder's own 3x3 convolution to its width (the reference's scratch.layer<i>_rn).
    return nn.Conv(self.features, (3, 3), padding=1, use_bias=False, dtype=self.dtype, name="layer_rn")(x)


class SpatialBlock(nn.Module):
  """One 3x3 convolution shared by every label channel of `[batch, h, w, labels]` (arch_option 2); with
  `add_max`, the channels' max added after it (arch_option 1, the reference's bottleneck_block)."""
  add_max: bool
  activation: str = "lrelu"

  @nn.compact
  def __call__(self, x: jax.Array, act: bool) -> jax.Array:
    b, h, w, c = x.shape
    per_channel = jnp.transpose(x, (0, 3, 1, 2)).reshape(b * c, h, w, 1)
    y = nn.Conv(1, (3, 3), padding=1, name="depthwise")(per_channel)
    y = jnp.transpose(y.reshape(b, c, h, w), (0, 2, 3, 1))
    if self.add_max:
      y = y + x.max(axis=-1, keepdims=True)
    if not act:
      return y
    return {"relu": nn.relu, "lrelu": lambda v: nn.leaky_relu(v, 0.01), "tanh": jnp.tanh}[self.activation](y)


class TimmBlock(nn.Module):
  """timm's ViT block: x + attn(LN(x)); x + mlp(LN(x)), LayerNorm epsilon 1e-6, exact GELU."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ln = lambda name: LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    x = x + SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(ln("norm1")(x))
    return x + Mlp(int(x.shape[-1] * self.mlp_ratio), x.shape[-1], dtype=self.dtype, name="mlp")(ln("norm2")(x))


class DPTViT(nn.Module):
  """A timm-style ViT that returns the outputs of the hooked blocks and the token grid."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  hooks: tuple[int, ...]
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[list[jax.Array], tuple[int, int]]:
    x = PatchProjection(self.patch_size, self.width, dtype=self.dtype, name="patch_embed")(images)
    b, gh, gw, c = x.shape
    size = self.image_size // self.patch_size
    cls = param_with_axes(self, "cls_token", normal(0.02), (1, 1, c), (None, None, "embed"))
    pos = param_with_axes(self, "pos_embed", normal(0.02), (1, 1 + size * size, c), (None, None, "embed"))
    grid_pos = pos[:, 1:]
    if (gh, gw) != (size, size):
      grid_pos = interpolate.resize_2d(grid_pos.reshape(1, size, size, c), (gh, gw), "bilinear").reshape(1, -1, c)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c)).astype(x.dtype), x.reshape(b, gh * gw, c)], axis=1)
    x = x + jnp.concatenate([pos[:, :1], grid_pos], axis=1).astype(x.dtype)
    hooked = []
    for i in range(max(self.hooks) + 1):  # blocks after the last hook would not change the output
      x = TimmBlock(self.heads, self.mlp_ratio, dtype=self.dtype, name=f"blocks_{i}")(x)
      if i in self.hooks:
        hooked.append(x)
    return hooked, (gh, gw)


class LSeg(nn.Module):
  """LSeg: `__call__(images, text)` -> per-pixel label logits `[batch, h, w, labels]`.

  `text`: the label names' token ids `[labels, length]` (the same for every image of the batch).
  """
  vision: dict[str, Any]  # image_size, patch_size, width, layers, heads, hooks, mlp_ratio
  text: dict[str, Any]  # TextTransformer's fields, plus layout ("groupvit" | "clip")
  embed_dim: int = 512  # the text embedding's width, which head1 maps every pixel to
  features: int = 256  # the decoder's width
  level_widths: tuple[int, ...] = (256, 512, 1024, 1024)  # the reassembled levels' widths
  reassemble: tuple[float, ...] = (4, 2, 1, 0.5)  # each level's resampling of the token grid
  readout: str = "project"
  use_bn: bool = True
  arch_option: int = 0  # 0: none; 1, 2: spatial regularisation blocks on the logits
  block_depth: int = 0
  activation: str = "lrelu"
  logit_scale: float = 1 / 0.07
  projection_layers: int = 1  # the "groupvit" text layout's projector (GroupViT's ProjectMLP)
  projection_hidden_dim: int = 4096
  dtype: Dtype = jnp.float32
  kernels: str = "xla"

  def setup(self):
    v = dict(self.vision)
    self.backbone = DPTViT(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                           layers=v["layers"], heads=v["heads"], hooks=tuple(v["hooks"]),
                           mlp_ratio=v.get("mlp_ratio", 4.0), dtype=self.dtype)
    self.levels = [Reassemble(w, self.features, f, self.readout, self.dtype, name=f"reassemble_{i}")
                   for i, (w, f) in enumerate(zip(self.level_widths, self.reassemble))]
    self.fusion = [FeatureFusionBlock(self.features, self.use_bn, self.dtype, name=f"refinenet{i + 1}")
                   for i in range(4)]
    self.head1 = nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype)
    if self.arch_option in (1, 2):
      self.head_block = SpatialBlock(add_max=self.arch_option == 1, activation=self.activation)
    text = {k: val for k, val in dict(self.text).items() if k != "layout"}
    self.text_encoder = TextTransformer(dtype=self.dtype, **text)
    if self.text.get("layout", "groupvit") == "clip":
      self.text_projection = param_with_axes(self, "text_projection", normal(text["width"]**-0.5),
                                             (text["width"], self.embed_dim), ("embed", None))
    else:
      self.text_projector = ProjectMLP(self.embed_dim, self.projection_hidden_dim, self.projection_layers,
                                       dtype=self.dtype)

  def encode_text(self, text: jax.Array, train: bool = False) -> jax.Array:
    """Token ids `[..., length]` -> label embeddings `[..., embed_dim]` (not normalised; always in
    inference mode: the text tower is frozen)."""
    del train
    with use_kernels(self.kernels):
      x = self.text_encoder(text)
      if self.text.get("layout", "groupvit") == "clip":
        return x @ self.text_projection.astype(self.dtype)
      return self.text_projector(x, train=False)

  def pixel_features(self, images: jax.Array, train: bool = False) -> jax.Array:
    """Images `[batch, h, w, 3]` (normalised) -> per-pixel embeddings `[batch, h', w', embed_dim]` at the
    decoder's resolution (h' = 8 h / patch_size), not normalised."""
    with use_kernels(self.kernels):
      hooked, grid = self.backbone(images)
      maps = [level(tokens, grid) for level, tokens in zip(self.levels, hooked)]
      path = self.fusion[3](maps[3], train=train)
      for i in (2, 1, 0):
        path = self.fusion[i](path, maps[i], train=train)
      return self.head1(path)

  def logits(self, images: jax.Array, label_embeds: jax.Array, train: bool = False) -> jax.Array:
    """Per-pixel logits `[batch, h, w, labels]` at the input size, for label embeddings `[labels, dim]`."""
    return self.logits_from_features(self.pixel_features(images, train), label_embeds, images.shape[1:3])

  def logits_from_features(self, features: jax.Array, label_embeds: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`logits` from `pixel_features`' output, resized to `size` (one image's features, any labels)."""
    feats = l2_normalize(features.astype(jnp.float32))
    out = self.logit_scale * jnp.einsum("bhwd,ld->bhwl", feats, l2_normalize(label_embeds.astype(jnp.float32)))
    if self.arch_option in (1, 2):
      for _ in range(self.block_depth - 1):
        out = self.head_block(out, act=True)
      out = self.head_block(out, act=False)
    return resize_aligned(out, size)

  def __call__(self, images: jax.Array, text: jax.Array, train: bool = False,
               prompts: Optional[jax.Array] = None) -> dict[str, jax.Array]:
    """`text`: the label names `[labels, length]` (or `[batch, length]` at initialisation)."""
    del prompts
    labels = jax.lax.stop_gradient(self.encode_text(text))
    return {"logits": self.logits(images, labels, train)}
