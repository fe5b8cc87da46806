"""The shapes world: captioned images of coloured shapes with exact masks, generated from a seed.

The project's embedded dataset: it needs no download, so training, evaluation, the demo and the
tests run anywhere. Keep it stable; example `i` of seed `s` is a pure function of (s, i, image_size).

- 8 object classes (ids 1..8, 0 is background): circle, square, triangle, star, heart, cross, diamond,
  hexagon.
- Object colours are independent of class and never equal a colour of the background.
- Backgrounds: solid, gradient, stripes, checkerboard, noise.
- 1-3 objects of distinct classes, 20-50 % of the image side, random position and rotation, painted
  in order (later objects occlude earlier ones; masks hold the visible pixels).
- Captions vary in template and word order, name every object, sometimes with colour/size/count,
  and sometimes mention the background.

Named worlds (`WORLDS`, the `world` of the TFDS configs and of `write_voc_layout`): "standard" is the
above; "coded" paints every class in its own colour (`CLASS_COLORS`) on black/white/grey backgrounds,
so that grouping by colour is enough to segment: the demo's world, learnable from scratch in CPU-minutes
(the standard world's colour-independent shapes are not; see benchmarks/shape_probe.py and the README).
"""

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
BACKGROUND = "background"
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (140, 40, 170), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15),
    "pink": (250, 130, 190), "brown": (130, 80, 30),
}
BACKGROUND_KINDS = ("solid", "gradient", "stripes", "checkerboard", "noise")
_BACKGROUND_WORDS = {"solid": "plain", "gradient": "gradient", "stripes": "striped",
                     "checkerboard": "checkered", "noise": "noisy"}
_NUMBERS = {1: "one", 2: "two", 3: "three"}
# The "coded" world's colour of each class; its backgrounds take the colours no class has.
CLASS_COLORS = {"circle": "red", "square": "green", "triangle": "blue", "star": "yellow", "heart": "purple",
                "cross": "orange", "diamond": "pink", "hexagon": "brown"}
WORLDS = {"standard": {}, "coded": {"class_colors": True}}
# VOC's palette for class ids (background black).
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128, 0, 128, 128, 128, 128, 128,
           64, 0, 0, 192, 0, 0, 64, 128, 0]


def _polygon(kind: str, n_points: int = 64) -> np.ndarray:
  """Unit-size outline of a class, centred at 0 with radius ~1: [points, 2]."""
  if kind == "circle":
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], -1)
  if kind == "square":
    return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8
  if kind == "triangle":
    t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return np.stack([np.cos(t), -np.sin(t)], -1)
  if kind == "star":
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], -1)
  if kind == "heart":
    t = np.linspace(0, 2 * np.pi, n_points, endpoint=False)
    x = 16 * np.sin(t)**3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], -1) / 17.0
  if kind == "cross":
    a, b = 1.0, 0.33
    return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b],
                     [-a, b], [-a, -b], [-b, -b]], np.float64)
  if kind == "diamond":
    return np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], np.float64)
  if kind == "hexagon":
    t = np.arange(6) * np.pi / 3
    return np.stack([np.cos(t), np.sin(t)], -1)
  raise ValueError(f"unknown shape class {kind!r}; expected one of {CLASSES}")


def _background(rng: np.random.Generator, size: int, kind: str, colors: list[str]) -> np.ndarray:
  c0 = np.array(COLORS[colors[0]], np.float64)
  c1 = np.array(COLORS[colors[1]], np.float64)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
  if kind == "solid":
    img = np.broadcast_to(c0, (size, size, 3))
  elif kind == "gradient":
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * (xx - .5) + np.sin(angle) * (yy - .5)) / math.sqrt(.5) * .5 + .5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
  elif kind == "stripes":
    period = rng.integers(max(size // 12, 2), max(size // 5, 3))
    vertical = rng.random() < .5
    band = ((np.arange(size) // period) % 2).astype(bool)
    band = band[None, :] if vertical else band[:, None]
    img = np.where(np.broadcast_to(band, (size, size))[..., None], c1, c0)
  elif kind == "checkerboard":
    period = rng.integers(max(size // 10, 2), max(size // 4, 3))
    i = np.arange(size) // period
    img = np.where(((i[:, None] + i[None, :]) % 2).astype(bool)[..., None], c1, c0)
  elif kind == "noise":
    img = c0 + rng.normal(0, 25, (size, size, 3))
  else:
    raise ValueError(f"unknown background {kind!r}")
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(seed: int, index: int, image_size: int = 64, backgrounds: tuple[str, ...] = BACKGROUND_KINDS,
           max_objects: int = 3, object_size: tuple[float, float] = (0.2, 0.5),
           palette: tuple[str, ...] = tuple(COLORS), class_colors: bool = False) -> dict[str, Any]:
  """Renders example `index` of the world with `seed`.

  `backgrounds`, `max_objects`, `object_size` (fraction of the image side) and `palette` (colour names
  drawn for background and objects) define easier worlds; the defaults are the standard world (changing
  them changes every example, not just the affected ones). `class_colors` paints each class in
  `CLASS_COLORS[class]` and draws backgrounds from the palette's other colours.

  Returns:
    dict with `image` [size, size, 3] uint8, `mask` [size, size] uint8 class ids (0 background),
    `caption` str, `nouns` visible class names (painting order), `objects` list of dicts
    (class, color, size fraction), `background` kind.
  """
  rng = np.random.default_rng([seed, index, image_size])
  n_objects = int(rng.integers(1, max_objects + 1))
  classes = [CLASSES[i] for i in rng.choice(len(CLASSES), n_objects, replace=False)]
  bg_kind = backgrounds[int(rng.integers(len(backgrounds)))]
  names = list(palette)
  if class_colors:
    names = [c for c in names if c not in CLASS_COLORS.values()]
    if len(names) < 2:
      raise ValueError(f"palette {tuple(palette)} leaves no background colour besides the class colours "
                       f"{tuple(CLASS_COLORS.values())}; expected 2+")
  elif len(names) < 2 or (len(names) < 3 and set(backgrounds) - {"solid", "noise"}):
    raise ValueError(f"palette {tuple(palette)} leaves no object colour: two-colour backgrounds need 3+ colours, "
                     "solid ones 2+")
  bg_colors = [names[i] for i in rng.choice(len(names), 2, replace=False)]
  if bg_kind in ("solid", "noise"):
    bg_colors = [bg_colors[0], bg_colors[0]]
  object_colors = [c for c in names if c not in bg_colors]
  image = _background(rng, image_size, bg_kind, bg_colors)
  mask = np.zeros((image_size, image_size), np.uint8)
  objects = []
  for cls in classes:
    color = CLASS_COLORS[cls] if class_colors else object_colors[int(rng.integers(len(object_colors)))]
    frac = float(rng.uniform(*object_size))
    radius = frac * image_size / 2
    center = rng.uniform(radius * 0.6, image_size - radius * 0.6, size=2)
    angle = rng.uniform(0, 2 * np.pi) if cls != "circle" else 0.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = _polygon(cls) @ rot.T * radius + center
    layer = Image.new("L", (image_size, image_size), 0)
    ImageDraw.Draw(layer).polygon([tuple(p) for p in pts], fill=1)
    inside = np.asarray(layer, bool)
    image[inside] = COLORS[color]
    mask[inside] = CLASSES.index(cls) + 1
    objects.append({"class": cls, "color": color, "size": frac})
  # An object fully hidden by later ones is not in the picture: keep captions and masks in step.
  visible = [o for o in objects if np.any(mask == CLASSES.index(o["class"]) + 1)]
  caption = _caption(rng, visible, bg_kind)
  return {"image": image, "mask": mask, "caption": caption, "nouns": [o["class"] for o in visible],
          "objects": visible, "background": bg_kind}


def _describe(rng: np.random.Generator, obj: dict[str, Any]) -> str:
  words = []
  r = rng.random()
  if r < .25 and obj["size"] < .3:
    words.append("small")
  elif r < .25 and obj["size"] > .4:
    words.append("large")
  if rng.random() < .6:
    words.append(obj["color"])
  words.append(obj["class"])
  phrase = " ".join(words)
  article = "an" if phrase[0] in "aeiou" else "a"
  return f"{article} {phrase}"


def _caption(rng: np.random.Generator, objects: list[dict[str, Any]], bg_kind: str) -> str:
  order = rng.permutation(len(objects))
  phrases = [_describe(rng, objects[i]) for i in order]
  if len(phrases) == 1:
    body = phrases[0]
  elif rng.random() < .5:
    body = ", ".join(phrases[:-1]) + " and " + phrases[-1]
  else:
    link = ["next to", "near", "beside", "with"][int(rng.integers(4))]
    body = f" {link} ".join(phrases)
  style = rng.random()
  if style < .2 and len(phrases) > 1:
    body = f"{_NUMBERS[len(phrases)]} shapes: {body}"
  elif style < .35:
    body = f"a picture of {body}"
  elif style < .45:
    body = f"there is {body}"
  if rng.random() < .4:
    body += f" on a {_BACKGROUND_WORDS[bg_kind]} background"
  return body


LABELS = ("shapes", "colors")


def write_voc_layout(root: str, num_images: int, seed: int, image_size: int = 64, labels: str = "shapes",
                     world: str = "standard") -> str:
  """Writes a PASCAL-VOC-style evaluation folder of the shapes world.

  Layout: `JPEGImages/*.png` (lossless, named .png), `SegmentationClass/*.png` (palette PNGs of class
  ids), `ImageSets/Segmentation/val.txt`, `classes.txt` (background first). Returns `root`.
  `labels="colors"` labels each object's pixels with its colour name instead of its shape (classes:
  background + the 10 colour words; object colours never occur in the background). `world` names one
  of `WORLDS`.
  """
  if labels not in LABELS:
    raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
  if world not in WORLDS:
    raise ValueError(f"world must be one of {tuple(WORLDS)}, got {world!r}")
  color_names = list(COLORS)
  import os  # pylint: disable=g-import-not-at-top
  for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  names = []
  for i in range(num_images):
    ex = render(seed, i, image_size, **WORLDS[world])
    name = f"shapes_{seed}_{i:06d}"
    Image.fromarray(ex["image"]).save(os.path.join(root, "JPEGImages", name + ".png"))
    ids = ex["mask"]
    if labels == "colors":
      by_class = np.zeros(len(CLASSES) + 1, np.uint8)
      for obj in ex["objects"]:
        by_class[CLASSES.index(obj["class"]) + 1] = color_names.index(obj["color"]) + 1
      ids = by_class[ids]
    mask = Image.fromarray(ids, mode="P")
    mask.putpalette(PALETTE)
    mask.save(os.path.join(root, "SegmentationClass", name + ".png"))
    names.append(name)
  with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("\n".join((BACKGROUND,) + (CLASSES if labels == "shapes" else tuple(color_names))) + "\n")
  return root
