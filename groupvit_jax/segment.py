"""Segments one image into the classes you name, and writes the overlay and the group maps.

  python -m groupvit_jax.segment --config=configs/groupvit_s.py --checkpoint=/tmp/groupvit_s \
      --image=dog.jpg --classes="dog,grass,sky" [--output_dir=dog_seg] [--bg_threshold=0.95]

Writes `<output_dir>/overlay.png` (prediction over the image, with a legend), `groups_stage<i>.png` (each
grouping stage's groups in distinct colours) and `panel.png` (all side by side). Pixels scoring under
the background threshold stay uncoloured; --bg_threshold=0 assigns every pixel a class.
"""

import os

from groupvit_jax import cli  # first: TensorFlow imported with its native start-up lines silenced

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from groupvit_jax import checkpoint, viz
from groupvit_jax.evaluators import seg_datasets
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter
from groupvit_jax.models import build_model
from groupvit_jax.pp import tokenizers

config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]) of the checkpoint's model; fields "
                                "can be overridden (--config.model.dtype=bfloat16).", lock_config=False)
flags.mark_flag_as_required("config")
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory or training workdir.", required=True)
flags.DEFINE_string("image", None, "The image to segment.", required=True)
flags.DEFINE_list("classes", None, "Comma-separated class names.", required=True)
flags.DEFINE_string("output_dir", None, "Where the PNGs go (default: <image stem>_seg next to the image).")
flags.DEFINE_float("bg_threshold", 0.95, "Background threshold; 0 disables background.")
flags.DEFINE_enum("mode", "slide", ["slide", "whole"], "Sliding windows or the whole image.")
flags.DEFINE_integer("short_side", 448, "Test-time short side.")
flags.DEFINE_integer("crop", 448, "Sliding-window size.")
flags.DEFINE_integer("stride", 224, "Sliding-window stride.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not os.path.exists(f.image):
    raise cli.UserError(f"--image: {f.image}: no such file")
  classes = [c.strip() for c in f.classes if c.strip()]
  if not classes:
    raise cli.UserError("--classes: expected at least one class name")
  image = np.asarray(seg_datasets.read_image(f.image).convert("RGB"))
  config = f.config
  model = build_model(config.model)
  variables = checkpoint.load_model_variables(f.checkpoint, config.model)
  bg = f.bg_threshold if f.bg_threshold > 0 else None
  segmenter = ZeroShotSegmenter(model, variables, classes, tokenizers.get_tokenizer(config.input.tokenizer),
                                patch_size=config.model.image.patch_size, context_length=config.input.context_length,
                                bg_threshold=bg, mode=f.mode, crop=f.crop, stride=f.stride, short_side=f.short_side)
  pred, groups = segmenter.predict(image, return_groups=True)
  names = (["background"] if bg is not None else []) + classes
  if bg is None:
    pred = pred + 1  # keep every class coloured (id 0 is left uncoloured in overlays)
    names = ["-"] + names
  out = f.output_dir or os.path.splitext(f.image)[0] + "_seg"
  os.makedirs(out, exist_ok=True)
  colors = viz.palette(len(names))
  Image.fromarray(viz.with_legend(viz.overlay(image, pred, colors), names, colors, pred)).save(
      os.path.join(out, "overlay.png"))
  for i, g in enumerate(groups):
    Image.fromarray(viz.group_overlay(image, g, i)).save(os.path.join(out, f"groups_stage{i + 1}.png"))
  Image.fromarray(viz.panel(image, pred, None, [np.asarray(g) for g in groups], names)).save(
      os.path.join(out, "panel.png"))
  found = {names[i]: float(np.mean(pred == i)) for i in np.unique(pred)}
  print("pixel share: " + ", ".join(f"{k} {v:.1%}" for k, v in sorted(found.items(), key=lambda kv: -kv[1])))
  print(f"wrote {out}/overlay.png, panel.png, groups_stage*.png")


if __name__ == "__main__":
  cli.run(main)
