"""The evaluation binary: zero-shot segmentation mIoU with pictures, and zero-shot classification.

  python -m groupvit_jax.evaluate --config=configs/groupvit_s.py --checkpoint=/tmp/groupvit_s \
      --dataset=voc --data_dir=VOCdevkit/VOC2012 --output_dir=/tmp/eval_voc
  python -m groupvit_jax.evaluate --config=configs/groupvit_s.py --checkpoint=/tmp/groupvit_s \
      --dataset=classification --data_dir=imagenet/val --output_dir=/tmp/eval_in1k [--templates=subset]

Segmentation layouts: voc, context, coco_object, ade20k, generic (evaluators/seg_datasets.py);
`classification` reads class folders (evaluators/classification.py) and writes metrics.json (top-1/5).

`--checkpoint` is a variables checkpoint (models/convert.py) or a training workdir (its latest
checkpoint). Writes `metrics.json`, `per_class.csv` and `pictures/*.png` (input | prediction with legend |
ground truth | group maps per stage) into `--output_dir`, atomically: everything is written to a
temporary directory that replaces the output directory only when complete.
"""

import csv
import json
import os
import shutil
import time
from typing import Any

from absl import app, flags, logging
import flax.linen as nn
import numpy as np
from PIL import Image

from groupvit_jax import checkpoint as checkpoint_lib
from groupvit_jax import config_lib, evaluators, viz
from groupvit_jax.evaluators import classification, seg_datasets
from groupvit_jax.evaluators.miou import ConfusionMatrix, metrics_from_confusion
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter
from groupvit_jax.models import build_model
from groupvit_jax.pp import tokenizers

# The reference's background thresholds.
BG_THRESHOLDS = {"voc": 0.95, "context": 0.35, "coco_object": 0.95, "generic": 0.95}


def load_checkpoint_variables(path: str, config) -> dict[str, Any]:
  """Variables from a converted checkpoint or from a training workdir's latest checkpoint."""
  ckpts = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpts):
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    if not steps:
      raise FileNotFoundError(f"{ckpts}: no finished checkpoint")
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    state_dir = os.path.join(ckpts, str(steps[-1]), "state")
    try:
      with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.abspath(state_dir))
    except Exception as e:  # Orbax raises many types; the path is what the user needs.
      raise ValueError(f"{state_dir}: not a readable training checkpoint ({type(e).__name__})") from None
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
  from groupvit_jax.models import convert  # pylint: disable=g-import-not-at-top
  return checkpoint_lib.load_variables(path, nn.unbox(convert.variables_template(config)))


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


def write_json_atomically(result: dict[str, Any], output_dir: str) -> None:
  """`output_dir/metrics.json`, written to a temporary file and renamed into place."""
  os.makedirs(output_dir, exist_ok=True)
  tmp = os.path.join(output_dir, f".metrics.json.tmp-{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, os.path.join(output_dir, "metrics.json"))


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


@evaluators.register("segmentation")
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


def main(argv):
  del argv
  f = flags.FLAGS
  for name in ("config", "checkpoint", "data_dir", "output_dir"):
    if not getattr(f, name):
      raise app.UsageError(f"--{name} is required")
  config = config_lib.load_config(f.config)
  if f.tokenizer:
    config.input.tokenizer = f.tokenizer
  if f.dataset == "classification":
    folder = classification.load_folder(f.data_dir)
    model = build_model(config.model)
    variables = load_checkpoint_variables(f.checkpoint, config)
    result = classification.zero_shot_classify(
        model, variables, folder, tokenizers.get_tokenizer(config.input.tokenizer),
        image_size=config.model.image.image_size, context_length=config.input.context_length,
        templates=f.templates or "subset", limit=f.limit)
    write_json_atomically(result, f.output_dir)
    print(f"zero-shot classification: top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"({result['images']} images, {result['classes']} classes, {result['images_per_sec']:.1f} images/s)")
    return
  dataset = seg_datasets.load(f.dataset, f.data_dir)
  model = build_model(config.model)
  variables = load_checkpoint_variables(f.checkpoint, config)
  bg = f.bg_threshold if f.bg_threshold is not None else BG_THRESHOLDS.get(f.dataset, 0.95)
  segmenter = ZeroShotSegmenter(model, variables, dataset.text_classes, tokenizers.get_tokenizer(config.input.tokenizer),
                                patch_size=config.model.image.patch_size, context_length=config.input.context_length,
                                templates=f.templates or "simple", bg_threshold=bg if dataset.has_background else None,
                                mode=f.mode, crop=f.crop, stride=f.stride, short_side=f.short_side,
                                scales=[float(s) for s in f.scales])
  logging.info("evaluating %d images of %s", len(dataset.items), f.data_dir)
  result = evaluate_segmentation(segmenter, dataset, f.output_dir, f.num_pictures, f.limit)
  print(format_table(result))


def _define_flags():
  flags.DEFINE_string("config", None, "Config file (path[:arg]) whose model the checkpoint holds.")
  flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory or training workdir.")
  flags.DEFINE_enum("dataset", "voc", sorted(seg_datasets.LAYOUTS) + ["classification"],
                    "Segmentation layout, or `classification` (ImageNet-style class folders).")
  flags.DEFINE_string("data_dir", None, "Root of the dataset layout.")
  flags.DEFINE_string("output_dir", None, "Where metrics.json, per_class.csv and pictures/ go.")
  flags.DEFINE_string("tokenizer", None, "Override config.input.tokenizer.")
  flags.DEFINE_float("bg_threshold", None, "Background threshold (default: the reference's for the dataset).")
  flags.DEFINE_enum("mode", "slide", ["slide", "whole"], "Sliding 448/224 windows or the whole image.")
  flags.DEFINE_string("templates", None, "Prompt template set for class names (default: simple for "
                      "segmentation, as the reference; subset for classification).")
  flags.DEFINE_integer("short_side", 448, "Test-time short side.")
  flags.DEFINE_integer("crop", 448, "Sliding-window size.")
  flags.DEFINE_integer("stride", 224, "Sliding-window stride.")
  flags.DEFINE_list("scales", ["1.0"], "Test-time scale ratios (several: multi-scale, scores averaged).")
  flags.DEFINE_integer("num_pictures", 8, "Pictures for the first N images.")
  flags.DEFINE_integer("limit", None, "Evaluate only the first N images.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
