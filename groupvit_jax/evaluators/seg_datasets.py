"""Segmentation sets read from their standard on-disk layouts.

- `voc`: VOCdevkit/VOC2012 (`JPEGImages/`, `SegmentationClass/` palette PNGs,
  `ImageSets/Segmentation/val.txt`); the 20 classes with the reference's renames (table, plant,
  monitor) and background. The shapes world's `write_voc_layout` uses it too (with `classes.txt`).
- `context`: PASCAL Context (60 = 59 + background) as mmseg prepares it.
- `coco_object`: COCO-Object (80 + background) as the reference's convert_coco_object.py writes it.
- `ade20k`: ADEChallengeData2016 (`images/validation/*.jpg`, `annotations/validation/*.png`); 150 classes,
  no background: id 0 ("other") is ignored and ids 1..150 become 0..149 (mmseg's reduce_zero_label).
- `generic`: `images/`, `masks/` (same stem, PNG class ids), `classes.txt` (one name a line; a first line
  `background` means id 0 is background and never encoded as text).
Masks hold class ids, 255 = ignore.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "table", "dog", "horse", "motorbike", "person", "plant", "sheep", "sofa", "train",
               "monitor")
# The reference's class names (mmseg's, with its renames).
CONTEXT_CLASSES = (
    "background", "airplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain",
    "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light",
    "motorbike", "mountain", "mouse", "person", "plate", "platform", "plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "monitor", "wall",
    "water", "window", "wood")
COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush")
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


@dataclasses.dataclass
class SegDataset:
  """Names, files and classes of one evaluation set."""
  name: str
  items: list[tuple[str, str, str]]  # (id, image path, mask path)
  classes: tuple[str, ...]  # all class names, index = mask id
  has_background: bool  # class 0 is background (not encoded as text)
  reduce_zero_label: bool = False  # mask id 0 is "unlabelled" (ignored), ids k > 0 mean class k - 1

  @property
  def text_classes(self) -> tuple[str, ...]:
    return self.classes[1:] if self.has_background else self.classes


def _read_classes(path: str) -> tuple[str, ...]:
  with open(path, encoding="utf-8") as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f"{path}: no class names")
  return names


def _find_image(directory: str, stem: str) -> str:
  for ext in IMAGE_EXTS:
    path = os.path.join(directory, stem + ext)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"no image for {stem!r} in {directory} (tried {', '.join(IMAGE_EXTS)})")


def _split_list(root: str, list_dir: str, split: str) -> list[str]:
  list_path = os.path.join(root, "ImageSets", list_dir, f"{split}.txt")
  if not os.path.exists(list_path):
    raise FileNotFoundError(f"VOC split list {list_path!r} does not exist")
  with open(list_path) as f:
    ids = [line.strip() for line in f if line.strip()]
  if not ids:
    raise ValueError(f"{list_path}: the split is empty")
  return ids


def voc(root: str, split: str = "val") -> SegDataset:
  """VOCdevkit/VOC2012: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/<split>.txt."""
  ids = _split_list(root, "Segmentation", split)
  classes_file = os.path.join(root, "classes.txt")
  classes = _read_classes(classes_file) if os.path.exists(classes_file) else VOC_CLASSES
  items = [(i, _find_image(os.path.join(root, "JPEGImages"), i),
            os.path.join(root, "SegmentationClass", i + ".png")) for i in ids]
  return SegDataset("voc", items, classes, has_background=classes[0] == "background")


def context(root: str, split: str = "val") -> SegDataset:
  """VOCdevkit/VOC2010 as prepared for mmseg: JPEGImages/, SegmentationClassContext/ (0 background,
  1..59), ImageSets/SegmentationContext/<split>.txt."""
  ids = _split_list(root, "SegmentationContext", split)
  items = [(i, _find_image(os.path.join(root, "JPEGImages"), i),
            os.path.join(root, "SegmentationClassContext", i + ".png")) for i in ids]
  return SegDataset("context", items, CONTEXT_CLASSES, has_background=True)


def _jpeg_pairs(root: str, split: str, mask_suffix: str) -> list[tuple[str, str, str]]:
  """(stem, images/<split>/<stem>.jpg, annotations/<split>/<stem><mask_suffix>) for every JPEG."""
  image_dir = os.path.join(root, "images", split)
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"{image_dir!r} does not exist (expected images/{split}/, annotations/{split}/)")
  stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.endswith(".jpg"))
  if not stems:
    raise ValueError(f"{image_dir}: no images")
  return [(s, os.path.join(image_dir, s + ".jpg"), os.path.join(root, "annotations", split, s + mask_suffix))
          for s in stems]


def coco_object(root: str, split: str = "val2017") -> SegDataset:
  """COCO-Object from COCO-Stuff-164k as the reference converts it: images/<split>/*.jpg,
  annotations/<split>/*_instanceTrainIds.png (the 80 thing ids -> 1..80, the rest 0)."""
  items = _jpeg_pairs(root, split, "_instanceTrainIds.png")
  return SegDataset("coco_object", items, COCO_OBJECT_CLASSES, has_background=True)


def ade20k(root: str, split: str = "validation") -> SegDataset:
  """ADEChallengeData2016: images/<split>/*.jpg, annotations/<split>/*.png (0 unlabelled, 1..150)."""
  items = _jpeg_pairs(root, split, ".png")
  return SegDataset("ade20k", items, ADE20K_CLASSES, has_background=False, reduce_zero_label=True)


def generic(root: str) -> SegDataset:
  classes = _read_classes(os.path.join(root, "classes.txt"))
  image_dir = os.path.join(root, "images")
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"{image_dir!r} does not exist (expected images/, masks/, classes.txt)")
  stems = sorted(os.path.splitext(f)[0] for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTS))
  if not stems:
    raise ValueError(f"{image_dir}: no images")
  items = [(s, _find_image(image_dir, s), os.path.join(root, "masks", s + ".png")) for s in stems]
  return SegDataset("generic", items, classes, has_background=classes[0] == "background")


LAYOUTS = {"voc": voc, "context": context, "coco_object": coco_object, "ade20k": ade20k, "generic": generic}


def load(name: str, root: str) -> SegDataset:
  if name not in LAYOUTS:
    raise ValueError(f"unknown dataset layout {name!r}; expected one of {sorted(LAYOUTS)}")
  return LAYOUTS[name](root)


def read_image(path: str) -> Image.Image:
  """The decoded image; a truncated or corrupt file raises ValueError naming it."""
  try:
    image = Image.open(path)
    image.load()
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  return image


def read_pair(item: tuple[str, str, str], num_classes: int,
              reduce_zero_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 RGB image, int mask); raises naming the file for a missing or inconsistent mask."""
  _, image_path, mask_path = item
  mask = read_mask(mask_path, num_classes, reduce_zero_label)
  image = np.asarray(read_image(image_path).convert("RGB"))
  if mask.shape != image.shape[:2]:
    raise ValueError(f"{mask_path}: mask size {mask.shape[::-1]} differs from image size "
                     f"{image.shape[1::-1]} ({image_path})")
  return image, mask


def read_mask(mask_path: str, num_classes: int, reduce_zero_label: bool = False) -> np.ndarray:
  """Class ids `[h, w]` (255: ignored); raises naming the file for a missing or inconsistent mask."""
  if not os.path.exists(mask_path):
    raise FileNotFoundError(f"mask {mask_path!r} does not exist")
  mask = np.asarray(read_image(mask_path)).astype(np.int64)
  if mask.ndim != 2:
    raise ValueError(f"{mask_path}: expected a single-channel mask of class ids, got shape {mask.shape}")
  if reduce_zero_label:  # mmseg: 0 -> 255 (ignored), k -> k - 1
    mask = np.where(mask == 0, 255, mask - 1)
    mask[mask == 254] = 255
  bad = mask[(mask != 255) & (mask >= num_classes)]
  if bad.size:
    raise ValueError(f"{mask_path}: class id {int(bad.max())} >= the {num_classes} classes of the dataset")
  return mask
