"""Zero-shot segmentation end to end on shapes-world folders, sliding windows, and the promised errors."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from groupvit_jax import checkpoint, config_lib
from groupvit_jax.evaluators import segmentation as segmentation_lib
from groupvit_jax.datasets import shapes
from groupvit_jax.evaluators import seg_datasets
from groupvit_jax.evaluators.segmentation import ZeroShotSegmenter, slide_windows
from groupvit_jax.models import build_model, init_variables
from groupvit_jax.pp.tokenizers import ClipBpeTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(crop=32, stride=16, short_side=32, long_side=128)


@pytest.fixture(scope="module")
def tiny():
  config = config_lib.load_config("configs/tiny.py")
  model = build_model(config.model)
  variables = nn.unbox(jax.jit(lambda r: init_variables(model, r, 32, 16))(jax.random.key(0)))
  return config, model, variables, ClipBpeTokenizer()


def _segmenter(tiny, classes, **kw):
  config, model, variables, tok = tiny
  args = dict(SMALL, bg_threshold=0.5)
  args.update(kw)
  return ZeroShotSegmenter(model, variables, classes, tok, patch_size=4, context_length=16, **args)


def test_slide_windows_follow_mmseg():
  assert slide_windows(448, 448, 448, 224) == [(0, 448, 0, 448)]
  assert slide_windows(448, 700, 448, 224) == [(0, 448, 0, 448), (0, 448, 224, 672), (0, 448, 252, 700)]
  assert slide_windows(300, 300, 448, 224) == [(0, 300, 0, 300)]


def test_sliding_window_equals_whole_image_when_the_crop_covers_it(tiny):
  image = (np.random.RandomState(0).rand(48, 80, 3) * 255).astype(np.uint8)
  kw = dict(crop=96, stride=48, short_side=48)
  slide = _segmenter(tiny, list(shapes.CLASSES), mode="slide", **kw).predict(image)
  whole = _segmenter(tiny, list(shapes.CLASSES), mode="whole", **kw).predict(image)
  np.testing.assert_array_equal(slide, whole)
  assert slide.shape == (48, 80)


def test_segmenters_of_one_model_share_compiled_functions(tiny):
  # Periodic evaluations during training build a segmenter each time: they must not recompile.
  config, model, variables, tok = tiny
  image = (np.random.RandomState(1).rand(32, 32, 3) * 255).astype(np.uint8)
  first = _segmenter(tiny, list(shapes.CLASSES), mode="whole", crop=32, short_side=32)
  first.predict(image)
  misses = first._scores._cache_size()  # pylint: disable=protected-access
  # New variables (a later training step), other names of the same count: same compiled function, no retrace.
  later = jax.tree_util.tree_map(lambda x: x * 1.01, variables)
  second = ZeroShotSegmenter(model, later, [f"big {c}" for c in shapes.CLASSES], tok, patch_size=4, context_length=16, mode="whole",
                             crop=32, short_side=32, bg_threshold=0.5)
  second.predict(image)
  assert second._scores is first._scores  # pylint: disable=protected-access
  assert first._scores._cache_size() == misses  # pylint: disable=protected-access
  # A different threshold is a different computation.
  assert _segmenter(tiny, ["ring"], bg_threshold=None)._scores is not first._scores  # pylint: disable=protected-access


def test_voc_layout_shapes_world_end_to_end(tiny, tmp_path):
  root = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=6, seed=11, image_size=32)
  dataset = seg_datasets.load("voc", root)
  assert dataset.has_background and dataset.text_classes == shapes.CLASSES
  out = str(tmp_path / "out")
  result = segmentation_lib.evaluate_segmentation(_segmenter(tiny, dataset.text_classes), dataset, out, num_pictures=2)
  assert 0 <= result["mIoU"] <= 100 and result["images"] == 6
  saved = json.load(open(os.path.join(out, "metrics.json")))
  assert saved["mIoU"] == pytest.approx(result["mIoU"])
  assert len(os.listdir(os.path.join(out, "pictures"))) == 2
  assert open(os.path.join(out, "per_class.csv")).readline().strip() == "class,IoU,Acc"
  assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]


def _generic(root, n, with_background=True):
  os.makedirs(os.path.join(root, "images"))
  os.makedirs(os.path.join(root, "masks"))
  names = (["background"] if with_background else []) + list(shapes.CLASSES)
  with open(os.path.join(root, "classes.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  for i in range(n):
    ex = shapes.render(12, i, 32)
    mask = ex["mask"] if with_background else np.where(ex["mask"] == 0, 255, ex["mask"] - 1)
    Image.fromarray(ex["image"]).save(os.path.join(root, "images", f"{i:03d}.jpg"))
    Image.fromarray(mask.astype(np.uint8)).save(os.path.join(root, "masks", f"{i:03d}.png"))
  return root


def test_generic_layout_and_the_cli(tiny, tmp_path):
  config, _, variables, _ = tiny
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_variables(ckpt, variables)
  root = _generic(str(tmp_path / "gen"), 4, with_background=False)
  dataset = seg_datasets.load("generic", root)
  assert not dataset.has_background and len(dataset.text_classes) == 8
  cmd = [sys.executable, "-m", "groupvit_jax.evaluate", "--config=configs/tiny.py", f"--checkpoint={ckpt}",
         "--dataset=generic", f"--data_dir={root}", f"--output_dir={tmp_path / 'out'}", "--crop=32", "--stride=16",
         "--short_side=32"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "generic: mIoU" in res.stdout and "circle" in res.stdout
  assert (tmp_path / "out" / "metrics.json").exists()


def test_bad_inputs_give_one_clear_error_and_leave_nothing(tiny, tmp_path):
  root = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=4, seed=3, image_size=32)
  seg = _segmenter(tiny, list(shapes.CLASSES))
  mask_path = os.path.join(root, "SegmentationClass", "shapes_3_000002.png")
  Image.fromarray(np.full((32, 32), 42, np.uint8)).save(mask_path)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match=r"shapes_3_000002\.png: class id 42 >= the 9 classes"):
    segmentation_lib.evaluate_segmentation(seg, seg_datasets.load("voc", root), out)
  assert not os.path.exists(out) and not [d for d in os.listdir(tmp_path) if ".tmp-" in d]
  Image.fromarray(np.zeros((20, 32), np.uint8)).save(mask_path)
  with pytest.raises(ValueError, match=r"shapes_3_000002\.png: mask size \(32, 20\) differs from image size"):
    segmentation_lib.evaluate_segmentation(seg, seg_datasets.load("voc", root), out)
  os.remove(mask_path)
  with pytest.raises(FileNotFoundError, match=r"mask '.*shapes_3_000002\.png' does not exist"):
    segmentation_lib.evaluate_segmentation(seg, seg_datasets.load("voc", root), out)
  open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w").close()
  with pytest.raises(ValueError, match="the split is empty"):
    seg_datasets.load("voc", root)
  with pytest.raises(FileNotFoundError, match="VOC split list"):
    seg_datasets.load("voc", str(tmp_path / "nowhere"))
  bad_ckpt = tmp_path / "junk"
  bad_ckpt.mkdir()
  (bad_ckpt / "file.txt").write_text("not a checkpoint")
  with pytest.raises(ValueError, match=r"not a readable checkpoint: .*junk \("):
    checkpoint.load_model_variables(str(bad_ckpt), tiny[0].model)


def test_one_image_cli_writes_overlay_and_group_maps(tiny, tmp_path):
  _, _, variables, _ = tiny
  ckpt = str(tmp_path / "ckpt")
  checkpoint.save_variables(ckpt, variables)
  image = tmp_path / "scene.png"
  Image.fromarray(shapes.render(5, 0, 48)["image"]).save(image)
  cmd = [sys.executable, "-m", "groupvit_jax.segment", "--config=configs/tiny.py", f"--checkpoint={ckpt}",
         f"--image={image}", "--classes=circle,star,square", "--crop=32", "--stride=16", "--short_side=32"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  out = tmp_path / "scene_seg"
  for name in ("overlay.png", "panel.png", "groups_stage1.png", "groups_stage2.png"):
    assert (out / name).exists(), name
  assert np.asarray(Image.open(out / "groups_stage1.png")).shape[:2] == (48, 48)
  bad = subprocess.run(cmd[:5] + ["--image=/nope.jpg", "--classes=a"], cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert bad.returncode == 2 and bad.stderr.strip() == "error: --image: /nope.jpg: no such file", bad.stderr


def test_multi_scale_averages_the_per_scale_scores(tiny):
  image = (np.random.RandomState(1).rand(40, 56, 3) * 255).astype(np.uint8)
  seg = _segmenter(tiny, list(shapes.CLASSES), scales=(0.75, 1.0, 1.5))
  per_scale = [seg.scores(image, s)[0] for s in (0.75, 1.0, 1.5)]
  assert per_scale[0].shape == per_scale[2].shape == (40, 56, 9)
  assert not np.allclose(per_scale[0], per_scale[2])  # the scales really differ
  np.testing.assert_array_equal(seg.predict(image), np.mean(per_scale, axis=0).argmax(-1))
  with pytest.raises(ValueError, match="scales must be positive"):
    _segmenter(tiny, list(shapes.CLASSES), scales=())


def test_ade20k_layout_ignores_unlabelled_and_shifts_ids(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  (root / "images" / "validation").mkdir(parents=True)
  (root / "annotations" / "validation").mkdir(parents=True)
  Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(root / "images" / "validation" / "ADE_val_00000001.jpg")
  mask = np.array([[0, 1, 150, 2, 0]] * 6, np.uint8)
  Image.fromarray(mask).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
  dataset = seg_datasets.load("ade20k", str(root))
  assert len(dataset.classes) == 150 and dataset.classes[0] == "wall" and dataset.classes[-1] == "flag"
  assert not dataset.has_background and dataset.text_classes == dataset.classes
  _, label = seg_datasets.read_pair(dataset.items[0], 150, dataset.reduce_zero_label)
  np.testing.assert_array_equal(label[0], [255, 0, 149, 1, 255])
  with pytest.raises(FileNotFoundError, match=r"images/validation/, annotations/validation/"):
    seg_datasets.load("ade20k", str(tmp_path / "nowhere"))
