"""The shapes world: deterministic, masks that match the pixels, captions that name the objects."""

import os

import numpy as np
from PIL import Image
import pytest

from groupvit_jax.datasets import shapes, shapes_tfds


def test_same_seed_same_example_and_seeds_differ():
  a, b = shapes.render(0, 5, 64), shapes.render(0, 5, 64)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["mask"], b["mask"])
  assert a["caption"] == b["caption"]
  c = shapes.render(1, 5, 64)
  assert not np.array_equal(a["image"], c["image"])


def test_masks_match_rendered_pixels():
  for i in range(60):
    ex = shapes.render(3, i, 64)
    image, mask = ex["image"], ex["mask"]
    object_colors = {shapes.CLASSES.index(o["class"]) + 1: shapes.COLORS[o["color"]] for o in ex["objects"]}
    assert set(np.unique(mask)) - {0} == set(object_colors), ex
    for cls, color in object_colors.items():
      # Every pixel of an object's visible mask has the object's colour ...
      assert np.all(image[mask == cls] == color)
    # ... and background pixels never have the colour of an object the background could hide.
    bg = image[mask == 0]
    bg_colors = {tuple(c) for c in bg.reshape(-1, 3)[:: max(1, len(bg) // 500)]}
    for color in object_colors.values():
      if ex["background"] in ("solid", "stripes", "checkerboard"):
        assert tuple(color) not in bg_colors


def test_captions_name_every_visible_object_and_sizes_hold():
  counts = {n: 0 for n in (1, 2, 3)}
  for i in range(200):
    ex = shapes.render(0, i, 64)
    for noun in ex["nouns"]:
      assert noun in ex["caption"], (noun, ex["caption"])
    for o in ex["objects"]:
      assert 0.2 <= o["size"] <= 0.5
    assert len(set(ex["nouns"])) == len(ex["nouns"])  # distinct classes
    counts[len(ex["objects"])] += 1
  assert all(counts.values()), counts  # 1, 2 and 3 objects all occur


def test_image_size_is_configurable():
  ex = shapes.render(0, 0, 224)
  assert ex["image"].shape == (224, 224, 3) and ex["mask"].shape == (224, 224)


def test_voc_layout_round_trips(tmp_path):
  root = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=5, seed=9, image_size=32)
  names = open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")).read().split()
  assert len(names) == 5
  classes = open(os.path.join(root, "classes.txt")).read().split("\n")
  assert classes[0] == "background" and classes[1:9] == list(shapes.CLASSES)
  for i, name in enumerate(names):
    ex = shapes.render(9, i, 32)
    img = np.asarray(Image.open(os.path.join(root, "JPEGImages", name + ".png")))
    mask = Image.open(os.path.join(root, "SegmentationClass", name + ".png"))
    assert mask.mode == "P"
    np.testing.assert_array_equal(img, ex["image"])
    np.testing.assert_array_equal(np.asarray(mask), ex["mask"])


def test_default_world_is_stable_and_easier_worlds_follow_their_knobs():
  # The standard world's stream is part of the project (held-out seeds, recorded results): pin one example.
  assert shapes.render(0, 0, 64)["caption"] == "a picture of a white star with a diamond on a checkered background"
  for i in range(40):
    ex = shapes.render(0, i, 64, backgrounds=("solid",), max_objects=1, object_size=(0.5, 0.6))
    assert ex["background"] == "solid" and len(ex["objects"]) == 1
    assert 0.5 <= ex["objects"][0]["size"] <= 0.6
    mono = shapes.render(0, i, 64, backgrounds=("solid",), palette=("black", "white"))
    assert {tuple(c) for c in mono["image"].reshape(-1, 3)} <= {shapes.COLORS["black"], shapes.COLORS["white"]}
  with pytest.raises(ValueError, match="leaves no object colour"):
    shapes.render(0, 0, 64, palette=("black", "white"))  # striped backgrounds take both colours


def test_coded_world_paints_each_class_in_its_colour_on_colours_no_class_has(tmp_path):
  class_rgb = {shapes.COLORS[c] for c in shapes.CLASS_COLORS.values()}
  for i in range(30):
    ex = shapes.render(2, i, 48, **shapes.WORLDS["coded"])
    for obj in ex["objects"]:
      assert obj["color"] == shapes.CLASS_COLORS[obj["class"]]
      pixels = ex["image"][ex["mask"] == shapes.CLASSES.index(obj["class"]) + 1]
      assert np.all(pixels == shapes.COLORS[obj["color"]]), (i, obj)
    background = {tuple(int(v) for v in p) for p in ex["image"][ex["mask"] == 0]}
    assert not background & class_rgb, (i, ex["background"])
  root = shapes.write_voc_layout(str(tmp_path / "coded"), num_images=3, seed=2, image_size=48, world="coded")
  img = np.asarray(Image.open(os.path.join(root, "JPEGImages", "shapes_2_000001.png")))
  np.testing.assert_array_equal(img, shapes.render(2, 1, 48, class_colors=True)["image"])
  with pytest.raises(ValueError, match="leaves no background colour besides the class colours"):
    shapes.render(0, 0, 48, palette=("red", "white"), class_colors=True)
  with pytest.raises(ValueError, match=r"world must be one of \('standard', 'coded'\), got 'easy'"):
    shapes.write_voc_layout(str(tmp_path / "bad"), 1, seed=0, world="easy")
  # The TFDS configs named coded* generate this world, the others the standard one.
  builder = shapes_tfds.ShapesWorld(config="coded64", data_dir=str(tmp_path / "tfds"))
  (_, first), = list(builder._generate_examples(0, 1))  # pylint: disable=protected-access
  np.testing.assert_array_equal(first["image"], shapes.render(0, 0, 64, class_colors=True)["image"])
  assert shapes_tfds.ShapesWorld(config="size64", data_dir=str(tmp_path / "tfds")).builder_config.world == "standard"


def test_color_labels_name_each_objects_colour(tmp_path):
  root = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=12, seed=4, image_size=48, labels="colors")
  classes = open(os.path.join(root, "classes.txt")).read().split()
  assert classes == ["background"] + list(shapes.COLORS)
  for i in range(12):
    ex = shapes.render(4, i, 48)
    ids = np.asarray(Image.open(os.path.join(root, "SegmentationClass", f"shapes_4_{i:06d}.png")))
    assert np.array_equal(ids > 0, ex["mask"] > 0)
    for obj in ex["objects"]:
      pixels = ids[ex["mask"] == shapes.CLASSES.index(obj["class"]) + 1]
      assert np.all(pixels == classes.index(obj["color"])), (i, obj)
  with pytest.raises(ValueError, match=r"labels must be one of \('shapes', 'colors'\), got 'sizes'"):
    shapes.write_voc_layout(str(tmp_path / "bad"), 1, seed=0, labels="sizes")
