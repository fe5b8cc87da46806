"""Per-example preprocessing ops, composed from a string: "decode|random_resized_crop(224)|flip|normalize".

Each op maps a features dict to a features dict inside the TF graph. Randomness is stateless and keyed
by `features["_seed"]` (int64 [2], derived from the example's index in the stream), so the same example
gets the same crop whatever the parallelism, and a resumed pipeline reproduces it. New ops register
with `@register("name")`.
"""

import ast
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from groupvit_jax.pp import nouns as nouns_lib
from groupvit_jax.pp.templates import get_templates

Features = dict[str, Any]
Op = Callable[[Features], Features]
_REGISTRY: dict[str, Callable[..., Op]] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Images above this many pixels are skipped (and counted) rather than decoded.
DEFAULT_MAX_PIXELS = 80_000_000


def register(name: str):
  def wrap(fn):
    _REGISTRY[name] = fn
    return fn
  return wrap


def parse(spec: str) -> Op:
  """Parses "op1(args)|op2|..." into one function of a features dict."""
  ops = []
  for part in filter(None, (p.strip() for p in spec.split("|"))):
    call = ast.parse(part if "(" in part else part + "()", mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
      raise ValueError(f"pp op {part!r}: expected name or name(args)")
    name = call.func.id
    if name not in _REGISTRY:
      raise ValueError(f"unknown pp op {name!r} in {spec!r}; known: {sorted(_REGISTRY)}")
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    ops.append(_REGISTRY[name](*args, **kwargs))

  def apply(features: Features) -> Features:
    for op in ops:
      features = op(features)
    return features

  return apply


def _seed(features: Features, salt: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(features["_seed"], salt)


def _is_jpeg(data: tf.Tensor) -> tf.Tensor:
  return tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")


def _check_size(data: tf.Tensor, max_pixels: int) -> tf.Tensor:
  """Raises (so the example is skipped) when a JPEG's header announces more than max_pixels."""
  def jpeg_pixels():
    shape = tf.io.extract_jpeg_shape(data)
    return tf.cast(shape[0], tf.int64) * tf.cast(shape[1], tf.int64)
  pixels = tf.cond(_is_jpeg(data), jpeg_pixels, lambda: tf.constant(0, tf.int64))
  return tf.debugging.assert_less_equal(pixels, tf.constant(max_pixels, tf.int64),
                                        message="image larger than max_pixels")


def _decode(data: tf.Tensor, max_pixels: int) -> tf.Tensor:
  """JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3]; grayscale, CMYK and alpha become RGB."""
  with tf.control_dependencies([_check_size(data, max_pixels)]):
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3])


@register("decode")
def decode(max_pixels: int = DEFAULT_MAX_PIXELS, key: str = "image") -> Op:
  """Encoded image bytes -> uint8 RGB (no-op for already decoded images)."""
  def op(f):
    if f[key].dtype == tf.string:
      f[key] = _decode(f[key], max_pixels)
    return f
  return op


def _crop_window(shape: tf.Tensor, seed: tf.Tensor, scale, ratio) -> tf.Tensor:
  """Inception-style random crop window [y, x, h, w] (stateless)."""
  bbox = tf.zeros([1, 0, 4], tf.float32)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bbox, seed=seed, min_object_covered=0.0, aspect_ratio_range=ratio, area_range=scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


@register("random_resized_crop")
def random_resized_crop(size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), max_pixels: int = DEFAULT_MAX_PIXELS,
                        key: str = "image") -> Op:
  """Random area/aspect crop resized to size x size (bilinear). Decodes only the crop of a JPEG."""
  def op(f):
    seed = _seed(f, 10)
    data = f[key]
    if data.dtype == tf.string:
      def from_jpeg():
        with tf.control_dependencies([_check_size(data, max_pixels)]):
          shape = tf.io.extract_jpeg_shape(data)
        window = _crop_window(tf.concat([shape[:2], [3]], 0), seed, scale, ratio)
        return tf.io.decode_and_crop_jpeg(data, window, channels=3)

      def other():
        image = _decode(data, max_pixels)
        w = _crop_window(tf.shape(image), seed, scale, ratio)
        return image[w[0]:w[0] + w[2], w[1]:w[1] + w[3]]
      crop = tf.cond(_is_jpeg(data), from_jpeg, other)
    else:
      w = _crop_window(tf.shape(data), seed, scale, ratio)
      crop = data[w[0]:w[0] + w[2], w[1]:w[1] + w[3]]
    crop = tf.ensure_shape(crop, [None, None, 3])
    f[key] = tf.cast(tf.clip_by_value(tf.image.resize(crop, [size, size]), 0, 255), tf.uint8)
    return f
  return op


@register("resize")
def resize(size: int, key: str = "image") -> Op:
  """Resizes to size x size, bilinear (no crop)."""
  def op(f):
    f[key] = tf.cast(tf.clip_by_value(tf.image.resize(f[key], [size, size]), 0, 255), tf.uint8)
    return f
  return op


@register("flip")
def flip(key: str = "image") -> Op:
  """Random horizontal flip (probability 0.5); a `mask` `[h, w]` flips with its image."""
  def op(f):
    if "mask" not in f:
      f[key] = tf.image.stateless_random_flip_left_right(f[key], seed=_seed(f, 20))
      return f
    # One draw for both: the mask travels as a fourth channel (the draw does not depend on the channels).
    both = tf.image.stateless_random_flip_left_right(tf.concat([f[key], f["mask"][..., None]], axis=-1),
                                                     seed=_seed(f, 20))
    f[key], f["mask"] = both[..., :3], both[..., 3]
    return f
  return op


@register("decode_mask")
def decode_mask() -> Op:
  """The segmentation mask -> uint8 label ids `[h, w]`: PNG bytes (single-channel, 255 = ignore) or an
  already decoded `[h, w, 1]` / `[h, w]` array."""
  def op(f):
    mask = f["mask"]
    if mask.dtype == tf.string:
      mask = tf.io.decode_png(mask, channels=1)
    mask = tf.cast(mask, tf.uint8)
    if mask.shape.rank == 3:
      mask = mask[..., 0]
    image_hw = tf.shape(f["image"])[:2]
    with tf.control_dependencies([tf.debugging.assert_equal(tf.shape(mask), image_hw,
                                                            message="mask and image sizes differ")]):
      f["mask"] = tf.identity(mask)
    return f
  return op


@register("map_labels")
def map_labels(keep, ignore: int = 255) -> Op:
  """Mask ids -> their position in `keep` (a tuple of ids); every other id becomes `ignore`: training on a
  subset of a dataset's classes (the others' pixels unscored)."""
  table = np.full(256, ignore, np.uint8)
  for new, old in enumerate(keep):
    table[old] = new

  def op(f):
    f["mask"] = tf.gather(tf.constant(table), tf.cast(f["mask"], tf.int32))
    return f
  return op


@register("random_scale_crop")
def random_scale_crop(size: int, scale=(0.5, 2.0), base_size: int | None = None, ignore: int = 255) -> Op:
  """Image and mask together: the longer side resized to `base_size` (default `size`) times a random
  factor in `scale` (image bilinear, mask nearest), padded to at least size x size (image 0, mask
  `ignore`), and a random size x size crop of both (segmentation training's augmentation)."""
  base = float(base_size or size)

  def op(f):
    image, mask = f["image"], f["mask"]
    s = tf.random.stateless_uniform([], _seed(f, 30), scale[0], scale[1])
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * (base * s) / tf.reduce_max(hw)), tf.int32), 1)
    image = tf.image.resize(image, new_hw, method="bilinear")
    mask = tf.image.resize(mask[..., None], new_hw, method="nearest")[..., 0]
    pad = tf.maximum(size - new_hw, 0)
    image = tf.pad(image, [[0, pad[0]], [0, pad[1]], [0, 0]])
    mask = tf.pad(mask, [[0, pad[0]], [0, pad[1]]], constant_values=ignore)
    room = tf.shape(mask) - size + 1
    offset = tf.random.stateless_uniform([2], _seed(f, 31), 0, 2**30, dtype=tf.int32) % room
    image = image[offset[0]:offset[0] + size, offset[1]:offset[1] + size]
    f["image"] = tf.cast(tf.clip_by_value(tf.ensure_shape(image, [size, size, 3]), 0, 255), tf.uint8)
    f["mask"] = tf.ensure_shape(mask[offset[0]:offset[0] + size, offset[1]:offset[1] + size], [size, size])
    return f
  return op


@register("superpixels")
def superpixels(patch_size: int, scale: float = 224.0, sigma: float = 0.9, min_size: float = 224.0,
                reference_size: int = 224, key: str = "image") -> Op:
  """Felzenszwalb superpixels of the (cropped and flipped, not yet normalised) image, reduced to one id
  per patch (the id most of its pixels have): "superpixels" `[patches]` int32, row-major patches.

  `scale` and `min_size` are SegCLIP's at `reference_size` pixels and scale with the image's area; runs
  scikit-image on the host (one call per example).
  """
  def compute(image: np.ndarray) -> np.ndarray:
    from skimage.segmentation import felzenszwalb  # pylint: disable=g-import-not-at-top
    h, w = image.shape[:2]
    area = h * w / reference_size**2
    seg = felzenszwalb(image, scale=scale * area, sigma=sigma, min_size=max(1, int(round(min_size * area))))
    gh, gw, p = h // patch_size, w // patch_size, patch_size
    blocks = seg[:gh * p, :gw * p].reshape(gh, p, gw, p).transpose(0, 2, 1, 3).reshape(gh * gw, p * p)
    return np.array([np.bincount(b).argmax() for b in blocks], np.int32)

  def op(f):
    image = f[key]
    ids = tf.numpy_function(compute, [image], tf.int32, stateful=False)
    patches = (tf.shape(image)[0] // patch_size) * (tf.shape(image)[1] // patch_size)
    f["superpixels"] = tf.reshape(ids, [patches])
    return f
  return op


@register("normalize")
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, key: str = "image") -> Op:
  """uint8 -> float32 (x / 255 - mean) / std, ImageNet statistics by default."""
  def op(f):
    x = tf.cast(f[key], tf.float32) / 255.0
    f[key] = (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)
    return f
  return op


@register("nouns")
def nouns(singular: bool = True) -> Op:
  """Extracts the caption's nouns into "nouns", unless the source precomputed a non-empty list."""
  extractor = nouns_lib.NounExtractor(singular=singular)

  def op(f):
    extracted = extractor.extract(f["text"])
    if "nouns" in f:
      given = f["nouns"]
      f["nouns"] = tf.cond(tf.size(given) > 0, lambda: given, lambda: extracted)
    else:
      f["nouns"] = extracted
    return f
  return op


@register("prompts")
def prompts(k: int = 3, templates: str = "full") -> Op:
  """K multi-label prompts from the nouns ("a photo of a {noun}."); short of nouns, the caption fills in.

  Adds "prompts" [k] and "no_nouns" (1 when the caption had no noun at all, for the counters).
  """
  template_list = get_templates(templates)

  def op(f):
    f["prompts"], m = nouns_lib.make_prompts(f["text"], f["nouns"], k, _seed(f, 30), template_list)
    f["no_nouns"] = tf.cast(tf.equal(m, 0), tf.int32)
    return f
  return op
