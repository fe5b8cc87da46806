"""Zero-shot classification on an ImageNet-style folder, with prompt-template ensembling.

Layout: `<root>/<class folder>/*.{jpg,jpeg,png,bmp}`; class names from `<root>/classnames.txt` when
present (one line per class: `folder<TAB>name`, or just `name` for the folders in sorted order),
otherwise the folder names with `_` read as spaces. Labels follow the order of the classes.

Preprocessing follows the reference's ImageNet evaluation: resize the short side to size / 0.875
(bicubic), centre crop `size`, normalise. Each class embedding is the mean of its templates'
embeddings (template set from the config, default `subset`), L2-normalised; top-1 / top-5 are the
fractions of images whose class is among the 1 / 5 most similar.
"""

import dataclasses
import json
import os
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from groupvit_jax.evaluators.registry import register
from groupvit_jax.evaluators.seg_datasets import IMAGE_EXTS, read_image
from groupvit_jax.evaluators.segmentation import MEAN, STD, cached_jit, class_embeddings
from groupvit_jax.models.groupvit import l2_normalize
from groupvit_jax.pp import tokenizers

CROP_PCT = 0.875


@dataclasses.dataclass
class ClassificationSet:
  classes: tuple[str, ...]
  items: list[tuple[str, int]]  # (image path, label)


def load_folder(root: str) -> ClassificationSet:
  """Reads `<root>/<class folder>/<images>` (and `classnames.txt`); errors name what is missing."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"classification folder {root!r} does not exist")
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  names_path = os.path.join(root, "classnames.txt")
  if os.path.exists(names_path):
    with open(names_path, encoding="utf-8") as f:
      lines = [line.rstrip("\n") for line in f if line.strip()]
    if all("\t" in line for line in lines):
      pairs = [tuple(line.split("\t", 1)) for line in lines]
    elif len(lines) == len(folders):
      pairs = list(zip(folders, lines))
    else:
      raise ValueError(f"{names_path}: {len(lines)} names for {len(folders)} class folders (expected one "
                       "name per folder, or 'folder<TAB>name' lines)")
  else:
    pairs = [(d, d.replace("_", " ")) for d in folders]
  if not pairs:
    raise ValueError(f"{root}: no class folders")
  items = []
  for label, (folder, _) in enumerate(pairs):
    directory = os.path.join(root, folder)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"class folder {directory!r} (named in {names_path}) does not exist")
    items += [(os.path.join(directory, f), label) for f in sorted(os.listdir(directory))
              if f.lower().endswith(IMAGE_EXTS)]
  if not items:
    raise ValueError(f"{root}: no images in the class folders (expected {', '.join(IMAGE_EXTS)})")
  return ClassificationSet(tuple(name for _, name in pairs), items)


def preprocess(path: str, size: int) -> np.ndarray:
  """Short side to size / 0.875 (bicubic), centre crop, normalise: `[size, size, 3]` float32."""
  image = read_image(path).convert("RGB")
  w, h = image.size
  short = int(size / CROP_PCT)
  scale = short / min(w, h)
  image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
  w, h = image.size
  left, top = (w - size) // 2, (h - size) // 2
  image = np.asarray(image.crop((left, top, left + size, top + size)), np.float32)
  return (image - MEAN) / STD


def _encode_images(model, variables, images):
  return l2_normalize(model.apply(variables, images, method=model.encode_image)["image_embeds"])


def zero_shot_classify(model, variables, dataset: ClassificationSet, tokenizer, *, image_size: int,
                       context_length: int, templates: str = "subset", batch_size: int = 32,
                       limit: int | None = None) -> dict[str, Any]:
  """Top-1 / top-5 accuracy (percent) of zero-shot classification over the folder."""
  text = class_embeddings(model, variables, dataset.classes, tokenizer, context_length, templates)
  encode = cached_jit(_encode_images, model)
  items = dataset.items[:limit] if limit else dataset.items
  k = min(5, len(dataset.classes))
  correct1 = correct5 = 0
  start = time.perf_counter()
  for i in range(0, len(items), batch_size):
    chunk = items[i:i + batch_size]
    images = np.stack([preprocess(path, image_size) for path, _ in chunk])
    pad = batch_size - len(chunk)  # one compiled shape for the last, shorter batch
    if pad:
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    logits = np.asarray(encode(variables, jnp.asarray(images)) @ text.T)[:len(chunk)]
    labels = np.asarray([label for _, label in chunk])
    top = np.argsort(-logits, axis=-1)[:, :k]
    correct1 += int((top[:, 0] == labels).sum())
    correct5 += int((top == labels[:, None]).any(axis=-1).sum())
  seconds = time.perf_counter() - start
  n = len(items)
  return {"top1": 100 * correct1 / n, "top5": 100 * correct5 / n, "images": n, "images_per_sec": n / seconds,
          "classes": len(dataset.classes)}


@register("classification")
class ClassificationEvaluator:
  """Zero-shot top-1/top-5 on a class-folder set, callable from the trainer (`config.evals`)."""

  def __init__(self, model, config, workdir, data_dir: str, templates: str = "subset", batch_size: int = 32,
               limit: int | None = None, image_size: int | None = None):
    del workdir
    self.model, self.config = model, config
    self.dataset = load_folder(data_dir)
    self.kwargs = dict(image_size=image_size or config.model.image.image_size,
                       context_length=config.input.context_length, templates=templates, batch_size=batch_size,
                       limit=limit)
    self.tokenizer = tokenizers.get_tokenizer(config.input.tokenizer)

  def run(self, state) -> dict[str, float]:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    result = zero_shot_classify(self.model, variables, self.dataset, self.tokenizer, **self.kwargs)
    return {"top1": result["top1"], "top5": result["top5"]}


def write_json_atomically(result: dict[str, Any], output_dir: str) -> None:
  """`output_dir/metrics.json`, written to a temporary file and renamed into place."""
  os.makedirs(output_dir, exist_ok=True)
  tmp = os.path.join(output_dir, f".metrics.json.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, os.path.join(output_dir, "metrics.json"))
