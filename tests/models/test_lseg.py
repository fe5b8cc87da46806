"""LSeg: the DPT decoder's shapes, the per-pixel logits from their definition, image/mask augmentation that
keeps them aligned, and mask-supervised training on the shapes world (learns, resumes exactly)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from groupvit_jax import config_lib
from groupvit_jax.models import build_model, random_variables
from groupvit_jax.models.lseg import resize_aligned


def _tiny_config(arch_option=0):
  m = config_lib.lseg_model()
  m.image.update(image_size=32, patch_size=4, width=32, layers=4, heads=2, hooks=(0, 1, 2, 3))
  m.text.update(context_length=8, vocab_size=100, width=16, layers=1, heads=2, layout="clip")
  m.decoder.update(features=8, level_widths=(8, 12, 16, 16), arch_option=arch_option, block_depth=2)
  m.projection_dim = 6
  return m


def _align_corners_reference(x, size):
  """Bilinear resize with aligned corners written pixel by pixel: output (i, j) reads the input at
  (i (h - 1) / (H - 1), j (w - 1) / (W - 1))."""
  b, h, w, c = x.shape
  out = np.zeros((b, size[0], size[1], c))
  for i in range(size[0]):
    y = i * (h - 1) / (size[0] - 1)
    y0 = min(int(np.floor(y)), h - 2)
    for j in range(size[1]):
      xx = j * (w - 1) / (size[1] - 1)
      x0 = min(int(np.floor(xx)), w - 2)
      dy, dx = y - y0, xx - x0
      out[:, i, j] = ((1 - dy) * (1 - dx) * x[:, y0, x0] + (1 - dy) * dx * x[:, y0, x0 + 1]
                      + dy * (1 - dx) * x[:, y0 + 1, x0] + dy * dx * x[:, y0 + 1, x0 + 1])
  return out


def test_aligned_resize_matches_its_definition():
  x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(resize_aligned(jnp.asarray(x), (8, 10)), _align_corners_reference(x, (8, 10)),
                             atol=1e-5)
  np.testing.assert_allclose(resize_aligned(jnp.asarray(x), (3, 7)), _align_corners_reference(x, (3, 7)), atol=1e-5)


@pytest.mark.parametrize("arch_option", [0, 1])
def test_dpt_shapes_and_pixel_logits_follow_the_definition(arch_option):
  """Reassembled levels at x4, x2, x1, x0.5 of the 8x8 token grid; the decoder at 8x the grid; logits =
  1/0.07 x cosine(pixel feature, label embedding), then (arch_option 1) the spatial blocks, then aligned
  bilinear resizing to the input."""
  config = _tiny_config(arch_option)
  model = build_model(config)
  variables = random_variables(model, config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  text = jnp.asarray(np.random.default_rng(0).integers(1, 99, (5, 8)), jnp.int32)

  _, inter = model.apply(variables, images, text, capture_intermediates=True)
  levels = [inter["intermediates"][f"reassemble_{i}"]["__call__"][0].shape for i in range(4)]
  assert levels == [(2, 32, 32, 8), (2, 16, 16, 8), (2, 8, 8, 8), (2, 4, 4, 8)]
  feats = np.asarray(model.apply(variables, images, method=model.pixel_features), np.float64)
  assert feats.shape == (2, 64, 64, 6)

  labels = np.asarray(model.apply(variables, text, method=model.encode_text), np.float64)
  f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  t = labels / np.linalg.norm(labels, axis=-1, keepdims=True)
  expected = (1 / 0.07) * np.einsum("bhwd,ld->bhwl", f, t)
  if arch_option == 1:  # block_depth 2: a block with leaky ReLU, then one without; one shared 3x3 kernel
    p = variables["params"]["head_block"]["depthwise"]
    kernel, bias = np.asarray(p["kernel"])[:, :, 0, 0], float(p["bias"][0])

    def block(x, act):
      padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      y = sum(kernel[a, c] * padded[:, a:a + x.shape[1], c:c + x.shape[2]] for a in range(3) for c in range(3)) + bias
      y = y + x.max(axis=-1, keepdims=True)
      return np.where(y > 0, y, 0.01 * y) if act else y
    expected = block(block(expected, True), False)
  expected = _align_corners_reference(expected, (32, 32))
  logits = model.apply(variables, images, text)["logits"]
  assert logits.shape == (2, 32, 32, 5)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-3)


def test_image_and_mask_stay_aligned_through_augmentation():
  """A mask of large regions and an image painted from it (one colour per label) go through decoding,
  label remapping, random scale / crop and flip; afterwards each pixel's colour still names its label
  (away from region borders, where bilinear image and nearest mask may differ by a pixel), and padding is
  ignore (255) in the mask where the image is black."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from groupvit_jax.pp import ops  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  palette = np.array([[10, 10, 10], [250, 30, 30], [30, 250, 30], [30, 30, 250]], np.uint8)
  pp = ops.parse("decode|decode_mask|map_labels((0, 1, 3))|random_scale_crop(48, scale=(0.4, 2.0))|flip")
  checked = flipped_seen = padded_seen = 0
  for i in range(24):
    mask = np.zeros((40, 56), np.uint8)
    mask[:, 20:] = 1
    mask[rng.integers(5, 20):, 35:] = 2
    mask[:10, :10] = 3
    image = palette[mask]
    encoded = {"image": tf.io.encode_png(image), "mask": tf.io.encode_png(mask[..., None])}
    out = pp(dict(encoded, _seed=tf.constant([7, i], tf.int64)))
    img, m = out["image"].numpy(), out["mask"].numpy()
    assert img.shape == (48, 48, 3) and m.shape == (48, 48) and m.dtype == np.uint8
    # Label 2 is not kept: its pixels are ignored; labels 0, 1, 3 become 0, 1, 2.
    dist = np.abs(img[:, :, None, :].astype(int) - palette[None, None].astype(int)).sum(-1)
    colour = dist.argmin(-1)
    interior = np.ones_like(m, bool)
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        interior &= np.roll(np.roll(m, dy, 0), dx, 1) == m
    interior[[0, -1]] = interior[:, [0, -1]] = False
    pad = (img.sum(-1) == 0) & interior
    padded_seen += pad.sum()
    assert (m[pad] == 255).all()
    keep = interior & ~pad & (dist.min(-1) < 30)
    expected = np.array([0, 1, 255, 2])[colour]
    np.testing.assert_array_equal(m[keep], expected[keep])
    checked += keep.sum()
    # Class 3 sits top-left in the source: seen on the right only when flipped.
    flipped_seen += (m[:, 24:] == 2).any() and not (m[:, :24] == 2).any()
  assert checked > 24 * 500 and flipped_seen > 0 and padded_seen > 0


def _train_cmd(data_dir, workdir, steps, evaluate):
  import sys  # pylint: disable=g-import-not-at-top
  return [sys.executable, "-m", "groupvit_jax.train", f"--workdir={workdir}",
          f"--config=configs/lseg_demo.py:world=codedtiny32,steps={steps},eval_every={steps},data_dir={data_dir}",
          "--config.log_every=1", "--config.checkpoint_every=4", "--config.input.num_examples=2000"] + (
              [] if evaluate else ["--config.evals={}"])


@pytest.mark.slow
def test_lseg_learns_the_shapes_world(shapes_data_dir, tmp_path):
  """configs/lseg_demo.py's recipe (600 steps) on the tiny coded world: the loss falls to under half and
  held-out mIoU (200 images, all 9 labels) reaches 80."""
  from tests import subprocess_util  # pylint: disable=g-import-not-at-top
  from tests.test_train import REPO, _all_rows, _env, _metrics  # pylint: disable=g-import-not-at-top
  trained = str(tmp_path / "trained")
  res = subprocess_util.run(_train_cmd(shapes_data_dir, trained, 600, True), cwd=REPO, env=_env(), timeout=3600)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = _metrics(trained)
  first = np.mean([rows[s]["loss"] for s in range(1, 11)])
  last = np.mean([rows[s]["loss"] for s in range(591, 601)])
  assert last < 0.5 * first, (first, last)
  miou = [r for r in _all_rows(trained) if "heldout/mIoU" in r][-1]["heldout/mIoU"]
  assert miou >= 80, miou


def test_lseg_training_resumes_exactly_after_kill(shapes_data_dir, tmp_path):
  """Mask-supervised training killed (-9) after step 4 and restarted logs every step as the uninterrupted
  run does (the loss falling over the 12 steps)."""
  import signal  # pylint: disable=g-import-not-at-top
  from tests import subprocess_util  # pylint: disable=g-import-not-at-top
  from tests.test_train import REPO, _all_rows, _env, _metrics, _run_until  # pylint: disable=g-import-not-at-top
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  res = subprocess_util.run(_train_cmd(shapes_data_dir, straight, 12, False), cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  expected = _metrics(straight)
  assert np.mean([expected[s]["loss"] for s in (10, 11, 12)]) < np.mean([expected[s]["loss"] for s in (1, 2, 3)])
  rc, _ = _run_until(_train_cmd(shapes_data_dir, killed, 12, False), killed, 4, signal.SIGKILL)
  assert rc == -signal.SIGKILL and max(r["step"] for r in _all_rows(killed)) < 12
  res = subprocess_util.run(_train_cmd(shapes_data_dir, killed, 12, False), cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  assert [row["step"] for row in _all_rows(killed)] == list(range(1, 13))
  resumed = _metrics(killed)
  for step in range(1, 13):
    for key, value in expected[step].items():
      np.testing.assert_allclose(resumed[step][key], value, rtol=1e-6, atol=1e-7, err_msg=f"step {step} {key}")
