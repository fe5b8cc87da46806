"""A local page to try a checkpoint: an image and any class names in, the segments and the groups out.

  python -m groupvit_jax.app [--checkpoint=/tmp/groupvit_jax_demo] [--config=configs/demo.py] [--port=7860]

With no flags it serves the checkpoint `make demo` trains (its workdir's config.json names the model);
`--config` is needed for a converted checkpoint (a folder without config.json). The page takes an image
(upload one, or pick one of the held-out shapes-world images it lists as examples), comma-separated class
names, the background threshold and whole/slide inference, and shows the prediction over the image with
a legend, every grouping stage's groups, and each final group's best classes and scores. The model and
its checkpoint can be switched on the page. Images are encoded once per (image, mode): asking again with
other names or another threshold reuses the image tower's output; the segmenter compiles once per
image size.
"""

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any

from groupvit_jax import cli  # first: TensorFlow imported with its native start-up lines silenced

import ml_collections
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from groupvit_jax import checkpoint, config_lib, demo, viz
from groupvit_jax.datasets import shapes, shapes_tfds
from groupvit_jax.evaluators import seg_datasets
from groupvit_jax.evaluators.segmentation import PROTOCOLS, ZeroShotSegmenter
from groupvit_jax.models import build_model
from groupvit_jax.models.lseg import LSeg
from groupvit_jax.pp import tokenizers

DEMO_WORKDIR = "/tmp/groupvit_jax_demo"  # the Makefile's DEMO_DIR
DISPLAY_SIZE = 256  # small images (the shapes world's 32 px) are enlarged to at least this for the page
EXAMPLES = 6
TABLE_HEADERS = ["group", "pixels %", "best class", "score", "second class", "score "]


class PageError(ValueError):
  """Bad input from the page: shown there as one line; the server keeps serving."""


def load_config(config: str | None, checkpoint_path: str) -> ml_collections.ConfigDict:
  """`config` (a config file, `path[:arg]`) or else the checkpoint's training workdir's config.json."""
  if config:
    if not os.path.isfile(config.split(":", 1)[0]):
      raise PageError(f"config: {config.split(':', 1)[0]}: no such config file")
    return config_lib.load_config(config)
  path = os.path.join(checkpoint_path, "config.json")
  if not os.path.exists(path):
    raise PageError(f"checkpoint {checkpoint_path}: no config.json (not a training workdir): give the config file of its model")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def geometry(config) -> dict[str, Any]:
  """The test-time geometry: whole images at the model's size for small models (the demo's, as its
  evaluation), else the published protocol of the model's family."""
  size = config.model.image.image_size
  if size < 224:
    return dict(short_side=size, long_side=4 * size, crop=size, stride=size)
  protocol = PROTOCOLS.get(config.model.get("name", "groupvit"), PROTOCOLS["groupvit"])
  return {k: protocol[k] for k in ("short_side", "crop", "stride")} | dict(long_side=2048)


def example_images(config, count: int = EXAMPLES) -> list[str]:
  """Held-out shapes-world images at the model's size (a seed training never reads), written once: of the
  world the config trains on, or the demo's world for other configs."""
  try:
    world = demo.training_world(config)
  except (ValueError, KeyError, AttributeError, IndexError):  # not a shapes-world config
    world = "coded"
  size = config.model.image.image_size
  seed = shapes_tfds.SPLIT_SEEDS["validation"]
  root = os.path.join(tempfile.gettempdir(), f"groupvit_jax_app_examples_{world}_{size}px_seed{seed}")
  if not os.path.exists(os.path.join(root, "classes.txt")):
    tmp = f"{root}.tmp-{os.getpid()}"
    shapes.write_voc_layout(tmp, count, seed=seed, image_size=size, world=world)
    if os.path.exists(root):  # another server wrote them meanwhile
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, root)
  folder = os.path.join(root, "JPEGImages")
  return [os.path.join(folder, n) for n in sorted(os.listdir(folder))[:count]]


def overlay_picture(image: np.ndarray, pred: np.ndarray, names: list[str]) -> np.ndarray:
  """The page's prediction: `pred` (0 = background, left uncoloured) over the enlarged image, a legend of
  the classes present."""
  colors = viz.palette(max(len(names), 2))
  image, pred = viz.enlarge(image, DISPLAY_SIZE), viz.enlarge(pred, DISPLAY_SIZE)
  return viz.with_legend(viz.overlay(image, pred, colors), names, colors, pred)


def group_pictures(image: np.ndarray, group_maps: list[np.ndarray]) -> np.ndarray | None:
  """Every stage's groups (distinct colours, over the enlarged image), side by side; the last stage's
  groups carry their numbers (the table's), each at its innermost pixel."""
  if not group_maps:
    return None
  big = viz.enlarge(image, DISPLAY_SIZE)
  tiles = []
  for stage, groups in enumerate(group_maps):
    tile = viz.group_overlay(big, groups, stage)
    if stage == len(group_maps) - 1:
      g = np.asarray(Image.fromarray(np.asarray(groups).astype(np.uint8)).resize(big.shape[1::-1], Image.NEAREST))
      tile = _numbered(tile, g)
    tiles += [tile, np.full((big.shape[0], 6, 3), 255, np.uint8)]
  return np.concatenate(tiles[:-1], axis=1)


def _numbered(picture: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """Writes each group's number (id + 1) at the pixel of the group farthest from its border (of those,
  the one nearest the group's centroid)."""
  canvas = Image.fromarray(picture)
  draw = ImageDraw.Draw(canvas)
  h, w = groups.shape
  for g in np.unique(groups):
    inside = ndimage.distance_transform_edt(np.pad(groups == g, 1))[1:-1, 1:-1]
    ys, xs = np.nonzero(inside >= inside.max() - 0.5)
    cy, cx = np.argwhere(groups == g).mean(axis=0)
    k = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
    label = str(int(g) + 1)
    box = draw.textbbox((0, 0), label)
    tw, th = box[2] - box[0], box[3] - box[1]
    x = int(np.clip(xs[k] - tw // 2, 2, w - tw - 2))
    y = int(np.clip(ys[k] - th // 2, 1, h - th - 3))
    draw.rectangle([x - 2, y - 1, x + tw + 2, y + th + 3], fill=(255, 255, 255))
    draw.text((x, y - box[1]), label, fill=(0, 0, 0))
  return np.asarray(canvas)


@dataclasses.dataclass
class Answer:
  overlay: np.ndarray
  groups: np.ndarray | None
  table: list[list[Any]]
  message: str


class Segmenter:
  """What the page does, without the page: a model and its variables, class names in, pictures out."""

  def __init__(self, config: ml_collections.ConfigDict, checkpoint_path: str):
    self.model = build_model(config.model)
    try:
      self.variables = checkpoint.load_model_variables(checkpoint_path, config.model)
    except (ValueError, FileNotFoundError) as e:
      raise PageError(cli.one_line(e)) from None
    self.config, self.checkpoint = config, checkpoint_path
    self.tokenizer = tokenizers.get_tokenizer(config.input.tokenizer)
    self.geometry = geometry(config)
    self._segmenters: dict[tuple, ZeroShotSegmenter] = {}
    self._features: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
    self._lock = threading.Lock()

  def segmenter(self, classes: tuple[str, ...], bg_threshold: float | None, mode: str) -> ZeroShotSegmenter:
    key = (classes, bg_threshold, mode)
    if key not in self._segmenters:
      if len(self._segmenters) > 32:
        self._segmenters.clear()
      self._segmenters[key] = ZeroShotSegmenter(
          self.model, self.variables, list(classes), self.tokenizer, patch_size=self.config.model.image.patch_size,
          context_length=self.config.input.context_length, bg_threshold=bg_threshold, mode=mode,
          **self.geometry, **_normalisation(self.model))
    return self._segmenters[key]

  def features(self, segmenter: ZeroShotSegmenter, image: np.ndarray, mode: str):
    """The image tower's output for (image, mode), kept for the last 8 such pairs."""
    key = (hashlib.sha1(image.tobytes()).hexdigest(), image.shape, mode)
    if key in self._features:
      self._features.move_to_end(key)
    else:
      self._features[key] = segmenter.image_features(image)
      if len(self._features) > 8:
        self._features.popitem(last=False)
    return self._features[key]

  def __call__(self, image_path: str | None, classes_text: str, bg_threshold: float, mode: str) -> Answer:
    if not image_path:
      raise PageError("image: none given; upload an image or pick an example")
    try:
      image = np.asarray(seg_datasets.read_image(image_path).convert("RGB"))
    except ValueError:
      raise PageError(f"image: {os.path.basename(image_path)} is not a readable image (expected PNG, JPEG or "
                      "another format PIL reads)") from None
    classes = tuple(dict.fromkeys(c.strip() for c in (classes_text or "").split(",") if c.strip()))
    if not classes:
      raise PageError("classes: expected at least one class name (comma-separated)")
    if mode not in ("whole", "slide"):
      raise PageError(f"mode: expected whole or slide, got {mode!r}")
    bg = float(bg_threshold) if bg_threshold and float(bg_threshold) > 0 else None
    with self._lock:
      segmenter = self.segmenter(classes, bg, mode)
      features = self.features(segmenter, image, mode)
      pred, group_maps = segmenter.predict(image, return_groups=True, features=features)
      group_scores = segmenter.group_scores(features[0])
    names = list(classes)
    if bg is not None:
      names = ["background"] + names
    else:
      pred, names = pred + 1, ["-"] + names  # every class coloured (id 0 stays uncoloured in overlays)
    table = _group_table(group_maps[-1], group_scores, list(classes)) if group_maps else []
    shares = ", ".join(f"{names[i]} {np.mean(pred == i):.0%}" for i in np.unique(pred))
    return Answer(overlay_picture(image, pred, names), group_pictures(image, group_maps), table,
                  f"Segmented {os.path.basename(image_path)} ({image.shape[1]}x{image.shape[0]} px) into "
                  f"{len(classes)} classes: {shares}.")


def _normalisation(model) -> dict[str, Any]:
  return {k: PROTOCOLS["lseg"][k] for k in ("mean", "std")} if isinstance(model, LSeg) else {}


def _group_table(groups: np.ndarray, scores: np.ndarray | None, classes: list[str]) -> list[list[Any]]:
  """One row per final group present in the first window: its share of the pixels and its two best
  classes with their scores (the masked softmax times the unmasked one, as the pixels get them)."""
  if scores is None:
    return []
  rows = []
  ids, counts = np.unique(groups, return_counts=True)
  for g, n in sorted(zip(ids, counts), key=lambda t: -t[1]):
    order = np.argsort(-scores[g])
    second = [classes[order[1]], round(float(scores[g, order[1]]), 3)] if len(classes) > 1 else ["", None]
    rows.append([int(g) + 1, round(float(100 * n / groups.size), 1), classes[order[0]], round(float(scores[g, order[0]]), 3),
                 *second])
  return rows


class Page:
  """The Gradio page over a `Segmenter` that can be replaced from the page."""

  def __init__(self, segmenter: Segmenter, config_arg: str | None, default_classes: str):
    self.segmenter, self.config_arg, self.default_classes = segmenter, config_arg, default_classes

  def segment(self, file, classes_text, bg_threshold, mode):
    try:
      answer = self.segmenter(_path(file), classes_text, bg_threshold, mode)
    except PageError as e:
      return None, None, [], f"**Error:** {e}."
    return answer.overlay, answer.groups, answer.table, answer.message

  def load(self, config_arg, checkpoint_path):
    """Switches model and checkpoint; on a bad pair the current one stays."""
    try:
      config = load_config(config_arg.strip() or None, checkpoint_path.strip())
      self.segmenter = Segmenter(config, checkpoint_path.strip())
    except PageError as e:
      return f"**Error:** {e} (still serving {self.segmenter.checkpoint})"
    except ValueError as e:  # a config that does not build
      return f"**Error:** {cli.one_line(e)} (still serving {self.segmenter.checkpoint})"
    return f"Loaded {checkpoint_path.strip()}."

  def build(self, examples: list[str]):
    import gradio as gr  # pylint: disable=g-import-not-at-top
    with gr.Blocks(title="groupvit-jax") as page:
      gr.Markdown("# groupvit-jax: zero-shot segmentation\nAn image and any class names in; the segments and "
                  "the groups out.")
      with gr.Row():
        with gr.Column(scale=1):
          image = gr.File(label="Image", file_types=["image"], type="filepath", elem_id="image")
          classes = gr.Textbox(label="Class names (comma-separated)", value=self.default_classes, elem_id="classes")
          bg = gr.Slider(0.0, 1.0, value=0.95, step=0.05, label="Background threshold (0: none)",
                         elem_id="bg_threshold")
          mode = gr.Radio(["whole", "slide"], value="whole", label="Inference", elem_id="mode")
          run = gr.Button("Segment", variant="primary", elem_id="segment")
          if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[image], label="Held-out shapes-world images")
        with gr.Column(scale=2):
          status = gr.Markdown(elem_id="status")
          overlay = gr.Image(label="Prediction", type="numpy", format="png", elem_id="overlay", interactive=False)
          groups = gr.Image(label="Groups per stage (first window; the last stage numbered as in the table)", type="numpy", format="png", elem_id="groups",
                            interactive=False)
          table = gr.Dataframe(headers=TABLE_HEADERS, label="Final groups: best classes", elem_id="table",
                               interactive=False)
      with gr.Accordion("Model", open=False):
        config_box = gr.Textbox(label="Config file (empty: the workdir's config.json)", value=self.config_arg or "",
                                elem_id="config")
        ckpt_box = gr.Textbox(label="Checkpoint (converted folder or training workdir)",
                              value=self.segmenter.checkpoint, elem_id="checkpoint")
        load = gr.Button("Load", elem_id="load")
        load_status = gr.Markdown(elem_id="load_status")
      run.click(self.segment, [image, classes, bg, mode], [overlay, groups, table, status])
      load.click(self.load, [config_box, ckpt_box], [load_status])
    return page


def _path(file) -> str | None:
  if file is None:
    return None
  return file if isinstance(file, str) else getattr(file, "name", None) or getattr(file, "path", None)


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if not os.path.exists(f.checkpoint):
    hint = " (run `make demo` first, or name one with --checkpoint)" if f.checkpoint == DEMO_WORKDIR else ""
    raise cli.UserError(f"--checkpoint: {f.checkpoint}: no such directory{hint}")
  try:
    config = load_config(f.config, f.checkpoint)
    segmenter = Segmenter(config, f.checkpoint)
  except PageError as e:
    raise cli.UserError(str(e)) from None
  examples = example_images(config) if f.examples else []
  is_shapes = any(d.get("kind") == "shapes" for d in config.get("input", {}).get("data", []))
  page = Page(segmenter, f.config, ", ".join(shapes.CLASSES) if is_shapes else "").build(examples)
  page.launch(server_name=f.host, server_port=f.port, show_error=True, share=False, quiet=False)


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "Config file of the checkpoint's model (path[:arg]); default: the "
                      "checkpoint's config.json (a training workdir).")
  flags.DEFINE_string("checkpoint", DEMO_WORKDIR, "Converted checkpoint folder or training workdir.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to serve on.")
  flags.DEFINE_integer("port", 7860, "Port to serve on.")
  flags.DEFINE_bool("examples", True, "List held-out shapes-world images as examples.")


if __name__ == "__main__":
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  _define_flags()
  cli.run(main)
