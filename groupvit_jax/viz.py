"""Pictures: prediction overlays with a class legend, ground truth, and per-stage group maps."""

import colorsys

import numpy as np
from PIL import Image, ImageDraw


def palette(n: int, seed: int = 0) -> np.ndarray:
  """n distinct colours `[n, 3]` uint8 (golden-ratio hues, alternating lightness); index 0 black."""
  colors = [(0, 0, 0)]
  for i in range(1, n):
    h = (seed * 0.1 + i * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(h, 0.45 + 0.15 * (i % 2), 0.85)
    colors.append((int(r * 255), int(g * 255), int(b * 255)))
  return np.asarray(colors[:n], np.uint8)


def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
  """Class/group ids `[H, W]` -> RGB; ids beyond the palette (e.g. ignore 255) are white."""
  out = np.full(labels.shape + (3,), 255, np.uint8)
  valid = labels < len(colors)
  out[valid] = colors[labels[valid]]
  return out


def overlay(image: np.ndarray, labels: np.ndarray, colors: np.ndarray, alpha: float = 0.5,
            skip_background: bool = True) -> np.ndarray:
  """Blends coloured labels over the image (background pixels left as they are)."""
  colored = colorize(labels, colors).astype(np.float32)
  out = image.astype(np.float32)
  mask = (labels != 0) if skip_background else np.ones(labels.shape, bool)
  out[mask] = (1 - alpha) * out[mask] + alpha * colored[mask]
  return out.astype(np.uint8)


def with_legend(picture: np.ndarray, names: list[str], colors: np.ndarray, present: np.ndarray) -> np.ndarray:
  """Appends a legend column naming the classes present in the picture."""
  ids = [int(i) for i in np.unique(present) if i < len(names)]
  row = 14
  legend = Image.new("RGB", (130, max(picture.shape[0], row * len(ids) + 4)), (255, 255, 255))
  draw = ImageDraw.Draw(legend)
  for k, i in enumerate(ids):
    y = 2 + k * row
    draw.rectangle([2, y, 12, y + 10], fill=tuple(int(c) for c in colors[i]))
    draw.text((16, y - 1), names[i], fill=(0, 0, 0))
  canvas = Image.new("RGB", (picture.shape[1] + legend.width, legend.height), (255, 255, 255))
  canvas.paste(Image.fromarray(picture), (0, 0))
  canvas.paste(legend, (picture.shape[1], 0))
  return np.asarray(canvas)


def enlarge(a: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour enlargement of a picture or label map by the smallest integer factor that makes its
  height at least `size` (1 when it already is)."""
  k = max(1, -(-size // a.shape[0]))
  return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def group_overlay(image: np.ndarray, groups: np.ndarray, stage: int) -> np.ndarray:
  """One stage's group map (any size, resized nearest to the image's) over the image, a colour per group."""
  g = np.asarray(Image.fromarray(np.asarray(groups).astype(np.uint8)).resize(image.shape[1::-1], Image.NEAREST))
  return overlay(image, g + 1, palette(int(g.max()) + 2, seed=stage + 1), 0.6, skip_background=False)


def panel(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, group_maps: list[np.ndarray],
          names: list[str]) -> np.ndarray:
  """input | prediction overlay + legend | ground truth | one group map per stage, side by side."""
  colors = palette(max(len(names), 2))
  if image.shape[0] < 160:  # small images (the shapes world) are enlarged to be seen
    image, pred = enlarge(image, 160), enlarge(pred, 160)
    gt = enlarge(gt, 160) if gt is not None else None
  h = image.shape[0]
  tiles = [image, with_legend(overlay(image, pred, colors), names, colors, pred)]
  if gt is not None:
    tiles.append(colorize(gt, colors))
  for stage, groups in enumerate(group_maps):
    tiles.append(group_overlay(image, groups, stage))
  tiles = [t if t.shape[0] == h else np.asarray(Image.fromarray(t).crop((0, 0, t.shape[1], h))) for t in tiles]
  gap = np.full((h, 4, 3), 255, np.uint8)
  return np.concatenate(sum(([t, gap] for t in tiles), [])[:-1], axis=1)
