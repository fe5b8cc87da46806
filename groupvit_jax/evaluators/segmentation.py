"""Zero-shot semantic segmentation, following the official GroupViT evaluation protocol.

Per window: the stages' soft assignment maps (for a plain ViT without grouping stages, the patches themselves) are chained into each patch's distribution over the final
groups, resized bilinearly to the window and hardened to one group per pixel; each group takes a softmax
over class embeddings (only the image's top-5 classes eligible; the masked softmax times the unmasked
one); a pixel scores what its group scores, and becomes background where its best score is under
min(threshold, the image's best group score). Windows (448, stride 224, mmseg's placement) are summed and
divided by their overlap count, resized to the original size, and the argmax is the prediction.
Multi-scale (`scales`, mmseg's aug_test without flip): the test-time size is multiplied by each scale,
the per-scale scores are resized to the original size and averaged.
"""

import csv
import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from groupvit_jax import viz
from groupvit_jax.evaluators import seg_datasets
from groupvit_jax.evaluators.miou import ConfusionMatrix, metrics_from_confusion
from groupvit_jax.evaluators.registry import register
from groupvit_jax.models import interpolate
from groupvit_jax.models.groupvit import l2_normalize
from groupvit_jax.models.lseg import LSeg
from groupvit_jax.pp import ops as pp_ops
from groupvit_jax.pp import tokenizers
from groupvit_jax.pp.templates import get_templates

# The reference's background thresholds.
BG_THRESHOLDS = {"voc": 0.95, "context": 0.35, "coco_object": 0.95, "generic": 0.95}
# The published protocols: window geometry and background thresholds per dataset (GroupViT's: the
# reference's mmseg configs; SegCLIP's: its evaluation scripts). Region scores are masked to each image's
# top-5 classes in both. LSeg's: its test script's crop (480 of a 520 short side) and its normalisation
# (mean 0.5, std 0.5; the others ImageNet's); it names the background as a label, so no threshold.
PROTOCOLS = {
    "groupvit": dict(short_side=448, crop=448, stride=224, bg_thresholds=BG_THRESHOLDS),
    "segclip": dict(short_side=224, crop=224, stride=224,
                    bg_thresholds={"voc": 0.80, "context": 0.25, "coco_object": 0.65, "generic": 0.80}),
    "lseg": dict(short_side=520, crop=480, stride=320, bg_thresholds={}, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}

MEAN = np.asarray(pp_ops.IMAGENET_MEAN, np.float32) * 255
STD = np.asarray(pp_ops.IMAGENET_STD, np.float32) * 255


_JITTED: dict[tuple, tuple[Any, Any]] = {}


def cached_jit(fn, model, static_argnames: tuple[str, ...] = (), **static):
  """One jitted `partial(fn, model, **static)` per (fn, model, static): periodic evaluations during
  training build a new segmenter each time and would otherwise recompile both towers every time."""
  key = (fn, id(model), tuple(sorted(static.items())), static_argnames)
  if key not in _JITTED:  # The model is kept in the value so that its id is not reused.
    _JITTED[key] = (model, jax.jit(functools.partial(fn, model, **static), static_argnames=static_argnames))
  return _JITTED[key][1]


def _encode_text(model, variables, tokens):
  return model.apply(variables, tokens, method=model.encode_text)


def class_embeddings(model, variables, class_names: Sequence[str], tokenizer, context_length: int,
                     templates: str = "simple") -> jax.Array:
  """`[classes, proj]`: each class through every template, unnormalised embeddings averaged, L2-normalised."""
  template_list = get_templates(templates)
  texts = [t.format(name) for name in class_names for t in template_list]
  tokens = jnp.asarray(tokenizer(texts, context_length))
  embeds = cached_jit(_encode_text, model)(variables, tokens)
  embeds = embeds.reshape(len(class_names), len(template_list), -1).mean(axis=1)
  return l2_normalize(embeds)


def window_features(model, variables, images: jax.Array, patch_size: int) -> dict[str, Any]:
  """What the class names do not change, for a batch of normalised windows `[batch, h, w, 3]`: LSeg's
  per-pixel features, or each pixel's final group (`[batch, h, w]`, the argmax of the stages' chained soft
  maps resized bilinearly to the window), the group and image embeddings and every stage's group map
  (for pictures). `scores_from_features` scores them with any class names."""
  if isinstance(model, LSeg):
    return {"pixels": model.apply(variables, images, method=model.pixel_features)}
  b, h, w, _ = images.shape
  out = model.apply(variables, images, return_groups=True, method=model.encode_image)
  grid = (h // patch_size, w // patch_size)
  # Each stage's chained soft map (patches -> its groups), resized to the window; the last one decides.
  stage_maps, chained, resized = [], None, None
  for maps in out["assignments"]:
    m = jnp.swapaxes(maps["soft"].astype(jnp.float32), 1, 2)  # [B, tokens_in, groups_out]
    chained = m if chained is None else jnp.einsum("bpg,bgh->bph", chained, m)  # [B, P, G_stage]
    resized = interpolate.resize_2d(chained.reshape(b, *grid, -1), (h, w), "bilinear")
    stage_maps.append(jnp.argmax(resized, axis=-1))
  if not out["assignments"]:  # a plain ViT (no grouping): every patch is its own group
    p = grid[0] * grid[1]
    identity = jnp.broadcast_to(jnp.eye(p, dtype=jnp.float32), (b, p, p))
    resized = interpolate.resize_2d(identity.reshape(b, *grid, p), (h, w), "bilinear")
    stage_maps.append(jnp.argmax(resized, axis=-1))
  return {"group": stage_maps[-1], "group_embeds": out["group_embeds"], "image_embeds": out["image_embeds"],
          "stage_maps": stage_maps}


def scores_from_features(model, variables, features: dict[str, Any], text: jax.Array, bg_threshold: float | None,
                         size: tuple[int, int], top_k: int = 5) -> tuple[jax.Array, jax.Array | None]:
  """`window_features`' output and class embeddings -> (per-pixel scores `[batch, h, w, outputs]`, each
  group's class scores `[batch, groups, classes]` or None for LSeg).

  Args:
    text: `[classes, proj]` normalised class embeddings (foreground classes only; LSeg's labels).
    bg_threshold: None for datasets without background, else the background threshold (its score is
      the first output).
    size: the windows' (h, w).
  """
  if isinstance(model, LSeg):  # dense: every pixel's softmax over the labels (background among them)
    logits = model.apply(variables, features["pixels"], text, size, method=model.logits_from_features)
    return jax.nn.softmax(logits, axis=-1), None
  group_embeds, image_embeds = features["group_embeds"], features["image_embeds"]
  onehot = jax.nn.one_hot(features["group"], group_embeds.shape[1], dtype=jnp.float32)  # [B, h, w, G]
  scale = jnp.minimum(jnp.exp(variables["params"]["logit_scale"]), 100.0)
  group_logits = scale * jnp.einsum("bgd,cd->bgc", l2_normalize(group_embeds), text)
  unmasked = jax.nn.softmax(group_logits, axis=-1)
  image_probs = jax.nn.softmax(scale * l2_normalize(image_embeds) @ text.T, axis=-1)
  k = min(top_k, text.shape[0])
  kth = jax.lax.top_k(image_probs, k)[0][:, -1:]
  eligible = image_probs >= kth  # [B, C]
  masked = jax.nn.softmax(jnp.where(eligible[:, None, :], group_logits, -jnp.inf), axis=-1) * unmasked
  scores = jnp.einsum("bhwg,bgc->bhwc", onehot, masked)
  if bg_threshold is not None:
    threshold = jnp.minimum(bg_threshold, masked.max(axis=(1, 2)))[:, None, None]
    background = (scores.max(axis=-1) < threshold).astype(scores.dtype)
    scores = jnp.concatenate([background[..., None], scores], axis=-1)
  return scores, masked


def test_time_resize_shape(h: int, w: int, short_side: int = 448, long_side: int = 2048) -> tuple[int, int]:
  """mmseg's Resize(img_scale=(2048, 448), keep_ratio=True): scale by min(long/longer, short/shorter)."""
  scale = min(long_side / max(h, w), short_side / min(h, w))
  return int(h * scale + 0.5), int(w * scale + 0.5)


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
  """mmseg's slide_inference windows (y1, y2, x1, x2): last windows shifted back inside the image."""
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  out = []
  for r in range(rows):
    for c in range(cols):
      y1, x1 = r * stride, c * stride
      y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
      out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
  return out


@dataclasses.dataclass
class ImageFeatures:
  """One image's class-independent window outputs at one test-time size (`ZeroShotSegmenter.features`)."""
  shape: tuple[int, int]  # the original image's (H, W)
  size: tuple[int, int]  # the test-time (h, w)
  windows: list[tuple[int, int, int, int]]
  batches: list[dict[str, Any]]  # window_features' output per batch of windows

  @property
  def window_size(self) -> tuple[int, int]:
    y1, y2, x1, x2 = self.windows[0]
    return y2 - y1, x2 - x1

  def group_maps(self) -> list[np.ndarray]:
    """The first window's per-stage group maps (empty for LSeg)."""
    return [np.asarray(m[0]) for m in self.batches[0].get("stage_maps", [])]


class ZeroShotSegmenter:
  """Segments images into `class_names` (+ background) with a GroupViT and its variables."""

  def __init__(self, model, variables, class_names: Sequence[str], tokenizer, *, patch_size: int,
               context_length: int = 77, templates: str = "simple", bg_threshold: float | None = 0.95,
               mode: str = "slide", crop: int = 448, stride: int = 224, short_side: int = 448,
               long_side: int = 2048, batch_size: int = 8, scales: Sequence[float] = (1.0,),
               mean: Sequence[float] = pp_ops.IMAGENET_MEAN, std: Sequence[float] = pp_ops.IMAGENET_STD):
    if mode not in ("slide", "whole"):
      raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    if not scales or min(scales) <= 0:
      raise ValueError(f"scales must be positive ratios, got {tuple(scales)}")
    self.scales = tuple(float(s) for s in scales)
    self.mean = np.asarray(mean, np.float32) * 255  # the normalisation the model was trained with
    self.std = np.asarray(std, np.float32) * 255
    self.model, self.variables, self.patch_size = model, variables, patch_size
    self.bg_threshold, self.mode = bg_threshold, mode
    self.crop, self.stride, self.short_side, self.long_side = crop, stride, short_side, long_side
    self.batch_size = batch_size
    if isinstance(model, LSeg):
      # LSeg names the background as one more label (its training set's label 0) and embeds label names
      # as they are, without templates, as its reference does.
      class_names = (["background"] if bg_threshold is not None else []) + list(class_names)
      templates = "identity"
    self.text = class_embeddings(model, variables, class_names, tokenizer, context_length, templates)
    self.num_outputs = len(class_names) + (bg_threshold is not None and not isinstance(model, LSeg))
    self._features = cached_jit(window_features, model, patch_size=patch_size)
    self._scores = cached_jit(scores_from_features, model, bg_threshold=bg_threshold, static_argnames=("size",))

  def features(self, image: np.ndarray, scale: float = 1.0) -> ImageFeatures:
    """What the class names do not change, for uint8 `[H, W, 3]` at the test-time size times `scale`: a
    segmenter of the same model, mode and geometry scores them with any class names (`scores_from`)."""
    h0, w0 = image.shape[:2]
    h, w = test_time_resize_shape(h0, w0, self.short_side * scale, self.long_side * scale)
    resized = np.asarray(jax.image.resize(image.astype(np.float32), (h, w, 3), "linear", antialias=False))
    x = (resized - self.mean) / self.std
    windows = [(0, h, 0, w)] if self.mode == "whole" else slide_windows(h, w, self.crop, self.stride)
    crops = np.stack([x[y1:y2, x1:x2] for y1, y2, x1, x2 in windows])  # all windows share one size
    batches = [self._features(self.variables, jnp.asarray(crops[i:i + self.batch_size]))
               for i in range(0, len(windows), self.batch_size)]
    return ImageFeatures((h0, w0), (h, w), windows, batches)

  def scores_from(self, features: ImageFeatures) -> np.ndarray:
    """`[H, W, outputs]` window-averaged scores at the original size."""
    h, w = features.size
    total = np.zeros((h, w, self.num_outputs), np.float32)
    count = np.zeros((h, w, 1), np.float32)
    for start, batch in zip(range(0, len(features.windows), self.batch_size), features.batches):
      scores = np.asarray(self._scores(self.variables, batch, self.text, size=features.window_size)[0])
      for i, (y1, y2, x1, x2) in enumerate(features.windows[start:start + self.batch_size]):
        total[y1:y2, x1:x2] += scores[i]
        count[y1:y2, x1:x2] += 1
    mean = total / count
    return np.asarray(interpolate.resize_2d(jnp.asarray(mean), features.shape, "bilinear", axes=(0, 1)))

  def scores(self, image: np.ndarray, scale: float = 1.0):
    """uint8 `[H, W, 3]` -> (`[H, W, outputs]` window-averaged scores at the original size, the first
    window's per-stage group maps) with the test-time size multiplied by `scale`."""
    features = self.features(image, scale)
    return self.scores_from(features), features.group_maps()

  def image_features(self, image: np.ndarray) -> list[ImageFeatures]:
    """`features` at every scale, for `predict(image, features=...)`."""
    return [self.features(image, s) for s in self.scales]

  def predict(self, image: np.ndarray, return_groups: bool = False,
              features: Sequence[ImageFeatures] | None = None):
    """uint8 `[H, W, 3]` -> label map `[H, W]` (0 = background when thresholded), and optionally
    per-stage group maps (of the first scale's first window). `features`: `image_features(image)` of a
    segmenter of the same model and geometry (any class names), to skip the image tower."""
    features = features if features is not None else self.image_features(image)
    if len(features) != len(self.scales) or features[0].shape != image.shape[:2]:
      raise ValueError(f"features: expected one per scale {self.scales} of a {image.shape[:2]} image")
    total = sum(self.scores_from(f) for f in features)
    pred = (total / len(self.scales)).argmax(axis=-1).astype(np.int32)
    if return_groups:
      return pred, features[0].group_maps()
    return pred

  def group_scores(self, features: ImageFeatures) -> np.ndarray | None:
    """Each final group's class scores `[groups, classes]` in the first window (the masked softmax times
    the unmasked one, as the pixels get them; foreground classes only); None for LSeg."""
    out = self._scores(self.variables, features.batches[0], self.text, size=features.window_size)[1]
    return None if out is None else np.asarray(out[0])


def evaluate_segmentation(segmenter: ZeroShotSegmenter, dataset: seg_datasets.SegDataset, output_dir: str | None,
                          num_pictures: int = 8, limit: int | None = None) -> dict[str, Any]:
  """Runs the whole set; returns metrics (and writes them, with pictures, when `output_dir` is set)."""
  cm = ConfusionMatrix(len(dataset.classes))
  tmp = None
  if output_dir:
    tmp = f"{output_dir.rstrip('/')}.tmp-{os.getpid()}"
    os.makedirs(os.path.join(tmp, "pictures"), exist_ok=True)
  items = dataset.items[:limit] if limit else dataset.items
  start = time.perf_counter()
  try:
    for n, item in enumerate(items):
      image, mask = seg_datasets.read_pair(item, len(dataset.classes), dataset.reduce_zero_label)
      pred, groups = segmenter.predict(image, return_groups=True)
      cm.update(pred, mask)
      if tmp and n < num_pictures:
        picture = viz.panel(image, pred, mask, [np.asarray(g) for g in groups], list(dataset.classes))
        Image.fromarray(picture).save(os.path.join(tmp, "pictures", f"{item[0]}.png"))
    seconds = time.perf_counter() - start
    metrics = metrics_from_confusion(cm.matrix)
    result = {"dataset": dataset.name, "images": len(items), "images_per_sec": len(items) / seconds,
              "aAcc": metrics["aAcc"] * 100, "mIoU": metrics["mIoU"] * 100, "mAcc": metrics["mAcc"] * 100,
              "per_class": {c: {"IoU": _pct(i), "Acc": _pct(a)}
                            for c, i, a in zip(dataset.classes, metrics["IoU"], metrics["Acc"])}}
    if tmp:
      with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
      with open(os.path.join(tmp, "per_class.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "IoU", "Acc"])
        for c, v in result["per_class"].items():
          w.writerow([c, v["IoU"], v["Acc"]])
      if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
      os.replace(tmp, output_dir)
      tmp = None
    return result
  finally:
    if tmp and os.path.exists(tmp):
      shutil.rmtree(tmp)  # an interrupted evaluation leaves nothing behind


def _pct(x: float) -> float | None:
  return None if np.isnan(x) else float(x) * 100


def format_table(result: dict[str, Any]) -> str:
  lines = [f"{'class':<16}{'IoU':>8}{'Acc':>8}"]
  for c, v in result["per_class"].items():
    fmt = lambda x: f"{x:8.2f}" if x is not None else f"{'-':>8}"
    lines.append(f"{c:<16}{fmt(v['IoU'])}{fmt(v['Acc'])}")
  lines.append(f"{result['dataset']}: mIoU {result['mIoU']:.2f}  aAcc {result['aAcc']:.2f}  mAcc {result['mAcc']:.2f}"
               f"  ({result['images']} images, {result['images_per_sec']:.2f} images/s)")
  return "\n".join(lines)


@register("segmentation")
class SegmentationEvaluator:
  """Zero-shot segmentation mIoU on a dataset layout, callable from the trainer (`config.evals`)."""

  def __init__(self, model, config, workdir, dataset: str, data_dir: str, bg_threshold: float | None = None,
               templates: str = "simple", crop: int = 448, stride: int = 224, short_side: int = 448,
               long_side: int = 2048, mode: str = "slide", scales: tuple[float, ...] = (1.0,),
               limit: int | None = None, num_pictures: int = 4,
               tensorboard_pictures: int = 4):
    self.model, self.config, self.workdir = model, config, workdir
    self.dataset = seg_datasets.load(dataset, data_dir)
    self.bg_threshold = bg_threshold if bg_threshold is not None else BG_THRESHOLDS.get(dataset)
    self.kwargs = dict(templates=templates, crop=crop, stride=stride, short_side=short_side, long_side=long_side,
                       mode=mode, scales=scales)
    self.limit, self.num_pictures, self.tensorboard_pictures = limit, num_pictures, tensorboard_pictures
    self.pictures: dict[str, np.ndarray] = {}  # the last run's panels, for TensorBoard
    self.tokenizer = tokenizers.get_tokenizer(config.input.tokenizer)

  def run(self, state) -> dict[str, float]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    segmenter = ZeroShotSegmenter(self.model, variables, self.dataset.text_classes, self.tokenizer,
                                  patch_size=self.config.model.image.patch_size,
                                  context_length=self.config.input.context_length,
                                  bg_threshold=self.bg_threshold if self.dataset.has_background else None,
                                  **self.kwargs)
    out = os.path.join(self.workdir, "eval", f"{self.dataset.name}_step{int(state.step)}")
    result = evaluate_segmentation(segmenter, self.dataset, out, self.num_pictures, self.limit)
    picture_dir = os.path.join(out, "pictures")
    self.pictures = {os.path.splitext(n)[0]: np.asarray(Image.open(os.path.join(picture_dir, n)).convert("RGB"))
                     for n in sorted(os.listdir(picture_dir))[:self.tensorboard_pictures]}
    return {"mIoU": result["mIoU"], "aAcc": result["aAcc"], "mAcc": result["mAcc"]}
