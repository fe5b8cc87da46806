"""The demo: segmentation emerging from captions alone, trained from scratch on a CPU in minutes.

  python -m groupvit_jax.demo --workdir=/tmp/gvj_demo [--config=configs/demo.py:steps=1000]

1. Generates the shapes world (captioned images; masks are never used for training).
2. Trains a small GroupViT with the contrastive + multi-label contrastive recipe (configs/demo.py),
   logging loss, steps/s and the time left, and evaluating the held-out split every `eval_every` steps.
3. Evaluates zero-shot segmentation on images of a seed training never saw (class names as prompts,
   background by threshold), prints the per-class IoU table and writes the pictures:
   `<workdir>/eval/voc_step<N>/pictures/*.png` (input | prediction | truth | group maps per stage),
   `<workdir>/curve.png` (held-out mIoU against training minutes) and `<workdir>/grid.png`.
"""

import json
import os
import time
import types
from typing import Any

from absl import app, flags, logging
import jax
import numpy as np
from PIL import Image, ImageDraw

from groupvit_jax import cli, train
from groupvit_jax.evaluators import segmentation
from groupvit_jax.datasets import shapes, shapes_tfds, sources
from groupvit_jax.models import build_model, random_variables

HELDOUT_SEED = shapes_tfds.SPLIT_SEEDS["validation"]  # training reads seed 0 only


def training_world(config) -> str:
  """The `shapes.WORLDS` name of the shapes-world builder config training reads."""
  name = config.input.data[0]["config"]
  by_name = {c.name: c for c in shapes_tfds.ShapesWorld.BUILDER_CONFIGS}
  if name not in by_name:
    raise ValueError(f"the demo trains on the shapes world; config.input.data[0].config must be one of "
                     f"{tuple(by_name)}, got {name!r}")
  return by_name[name].world


def heldout_root(config, num_images: int) -> str:
  """Where the held-out split of training's world, image size and length lives (next to the data)."""
  return os.path.join(config.input.data[0]["data_dir"], f"shapes_heldout_{training_world(config)}_seed{HELDOUT_SEED}_"
                      f"{config.model.image.image_size}px_{num_images}")


def heldout_evaluator(config, root: str, bg_threshold: float) -> dict[str, Any]:
  """How the demo evaluates a held-out folder: whole images at the model's size, background threshold."""
  size = config.model.image.image_size
  return dict(kind="segmentation", dataset="voc", data_dir=root, mode="whole", short_side=size, long_side=4 * size,
              crop=size, stride=size, bg_threshold=bg_threshold, num_pictures=16)


def heldout_evals(config, root: str, num_images: int, bg_threshold: float) -> dict[str, Any]:
  """The evaluator config for the held-out shapes split of training's world (written once under `root`)."""
  if not os.path.exists(os.path.join(root, "classes.txt")):
    shapes.write_voc_layout(root + ".tmp", num_images, seed=HELDOUT_SEED, image_size=config.model.image.image_size,
                            world=training_world(config))
    os.replace(root + ".tmp", root)
  return {"heldout": heldout_evaluator(config, root, bg_threshold)}


def run(config, workdir: str, eval_images: int = 200, bg_threshold: float = 0.95) -> dict[str, Any]:
  """Trains and evaluates; returns the final held-out result (metrics.json of the last evaluation)."""
  if not config.eval_every or config.total_steps % config.eval_every:
    raise ValueError(f"the demo evaluates the final step: eval_every ({config.eval_every}) must divide the "
                     f"{config.total_steps} training steps")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:  # as the trainer's CLI writes it
    f.write(config.to_json_best_effort(indent=2))
  start = time.time()
  print(f"[demo] generating the shapes world under {config.input.data[0]['data_dir']} (once) ...", flush=True)
  sources.prepare(config.input.data)
  config.evals = heldout_evals(config, heldout_root(config, eval_images), eval_images, bg_threshold)
  print(f"[demo] data ready in {time.time() - start:.0f} s; training {config.total_steps} steps "
        f"(batch {config.input.batch_size}), evaluating {eval_images} held-out images every "
        f"{config.eval_every} steps", flush=True)
  untrained = untrained_result(config, workdir)
  print(f"[demo] untrained model (random initialisation): held-out mIoU {untrained['mIoU']:.1f}, "
        f"mAcc {untrained['mAcc']:.1f}", flush=True)
  train_start = time.time()
  train.train_and_evaluate(config, workdir, progress=_progress_printer(config.total_steps, train_start))
  train_minutes = (time.time() - train_start) / 60
  curve = [(0.0, 0, untrained["mIoU"])] + _curve(workdir)
  final = _load_eval(workdir, config.total_steps)
  print(segmentation.format_table(final))
  print(f"[demo] held-out mIoU {final['mIoU']:.1f}, mAcc {final['mAcc']:.1f} (untrained: {untrained['mIoU']:.1f}, "
        f"{untrained['mAcc']:.1f}) after {config.total_steps} steps, "
        f"{train_minutes:.1f} min of training ({(time.time() - start) / 60:.1f} min in all)")
  if curve:
    _plot_curve(curve, os.path.join(workdir, "curve.png"))
  _grid(os.path.join(workdir, "eval", f"voc_step{config.total_steps}", "pictures"), os.path.join(workdir, "grid.png"))
  print(f"[demo] pictures: {workdir}/eval/voc_step{config.total_steps}/pictures, {workdir}/grid.png, "
        f"{workdir}/curve.png")
  final["train_minutes"] = train_minutes
  final["untrained_mIoU"] = untrained["mIoU"]
  final["untrained_mAcc"] = untrained["mAcc"]
  final["curve"] = curve
  with open(os.path.join(workdir, "demo_result.json"), "w") as f:
    json.dump(final, f, indent=2)
  return final


def untrained_result(config, workdir: str) -> dict[str, float]:
  """The held-out evaluation of the randomly initialised model (the curve's first point), through the
  same evaluator training uses; its pictures go to `<workdir>/eval/voc_step0`."""
  model = build_model(config.model)
  variables = random_variables(model, config.model, jax.random.key(config.seed))
  ev = dict(config.evals["heldout"])
  del ev["kind"]
  evaluator = segmentation.SegmentationEvaluator(model, config, workdir, **ev)
  return evaluator.run(types.SimpleNamespace(params=variables["params"], batch_stats=variables["batch_stats"],
                                             step=0))


def _progress_printer(total_steps: int, start: float):
  def show(step: int, scalars: dict[str, float]):
    elapsed = time.time() - start
    rate = step / max(elapsed, 1e-9)
    eta = (total_steps - step) / max(rate, 1e-9)
    extra = f"  held-out mIoU {scalars['heldout/mIoU']:.1f}" if "heldout/mIoU" in scalars else ""
    loss = f"loss {scalars['loss']:.3f}  " if "loss" in scalars else ""
    stages = sorted(k for k in scalars if k.startswith("grouping/") and k.endswith("_groups"))
    groups = "  groups/image " + " / ".join(f"{scalars[k]:.1f}" for k in stages) if stages else ""
    print(f"[demo] step {step:5d}/{total_steps}  {loss}{rate:.1f} steps/s  "
          f"elapsed {elapsed / 60:.1f} min  ETA {eta / 60:.1f} min{groups}{extra}", flush=True)
  return show


def _load_eval(workdir: str, step: int) -> dict[str, Any]:
  with open(os.path.join(workdir, "eval", f"voc_step{step}", "metrics.json")) as f:
    return json.load(f)


def _curve(workdir: str) -> list[tuple[float, int, float]]:
  """(training minutes, step, held-out mIoU) for every evaluation in metrics.jsonl."""
  out = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "heldout/mIoU" in row:
        out.append((row.get("train_seconds", 0.0) / 60, row["step"], row["heldout/mIoU"]))
  return out


def _plot_curve(curve, path: str, width: int = 480, height: int = 300) -> None:
  """mIoU against training minutes, drawn with PIL (no plotting dependency)."""
  img = Image.new("RGB", (width, height), "white")
  d = ImageDraw.Draw(img)
  left, right, top, bottom = 50, width - 20, 20, height - 40
  max_t = max(c[0] for c in curve) or 1.0
  d.line([(left, top), (left, bottom), (right, bottom)], fill="black")
  for v in range(0, 101, 20):
    y = bottom - (bottom - top) * v / 100
    d.line([(left - 4, y), (right, y)], fill=(225, 225, 225))
    d.text((left - 30, y - 6), f"{v}", fill="black")
  for k in range(5):
    t = max_t * k / 4
    x = left + (right - left) * t / max_t
    d.text((x - 8, bottom + 6), f"{t:.1f}", fill="black")
  d.text(((left + right) // 2 - 60, height - 18), "training minutes (2 CPU cores)", fill="black")
  d.text((left + 6, 4), "held-out mIoU", fill="black")
  points = [(left + (right - left) * t / max_t, bottom - (bottom - top) * m / 100) for t, _, m in curve]
  if len(points) > 1:
    d.line(points, fill=(200, 30, 30), width=2)
  for x, y in points:
    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(200, 30, 30))
  img.save(path)


def _grid(pictures_dir: str, path: str, rows: int = 6) -> None:
  """Stacks the first evaluation panels into one picture."""
  if not os.path.isdir(pictures_dir):
    return
  names = sorted(os.listdir(pictures_dir))[:rows]
  panels = [np.asarray(Image.open(os.path.join(pictures_dir, n)).convert("RGB")) for n in names]
  if not panels:
    return
  width = max(p.shape[1] for p in panels)
  padded = [np.pad(p, ((0, 4), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
  Image.fromarray(np.concatenate(padded, axis=0)).save(path)


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  config.eval_every = f.eval_every
  run(config, f.workdir, f.eval_images, f.bg_threshold)


def _define_flags():
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Demo config (path[:arg]).", lock_config=False)
  flags.DEFINE_string("workdir", "/tmp/groupvit_jax_demo", "Where checkpoints, metrics and pictures go.")
  flags.DEFINE_integer("eval_every", 300, "Evaluate the held-out split every N steps (the curve).")
  flags.DEFINE_integer("eval_images", 200, "Held-out images (seed training never saw).")
  flags.DEFINE_float("bg_threshold", 0.95, "Background threshold of the zero-shot segmentation (the "
                     "reference's for VOC).")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
