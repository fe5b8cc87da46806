"""A much shorter version of the demo, end to end through its command line: data, training with
progress, held-out evaluation (a seed training never saw), the per-class table and the pictures; and it
must have learned to segment from the captions: the caption loss falls far below its starting value,
and on the held-out split the mIoU and the mean class accuracy (mAcc) rise well above the untrained
model's."""

import json
import os
import sys

import pytest

from groupvit_jax import config_lib, demo
from groupvit_jax.evaluators import seg_datasets
from tests import subprocess_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 600
EVAL_EVERY = 300
EVAL_IMAGES = 100
# The demo's recipe (configs/demo.py: one grouping stage, reconstruction, linear projector, lr 2e-3) on
# the 2,000 training images of codedtiny32; background threshold 0.95. Measured on the 2-core machine
# (one device, ~3 min alone), held-out mIoU untrained -> after 600 steps for seeds 0 / 1 / 2:
# 6.1 -> 16.7 / 9.2 -> 17.4 / 8.5 -> 21.8; mAcc 8.1 -> 26.6 / 10.7 -> 32.3 / 10.0 -> 44.2. Both must rise by
# at least the margins (about half the smallest rise measured).
MIOU_MARGIN = 4.0
MACC_MARGIN = 5.0


def test_short_demo_learns_to_segment(shapes_data_dir, tmp_path):
  workdir = str(tmp_path / "demo")
  arg = f"data_dir={shapes_data_dir},world=codedtiny32,steps={STEPS}"
  cmd = [sys.executable, "-m", "groupvit_jax.demo", f"--workdir={workdir}", f"--config=configs/demo.py:{arg}",
         f"--eval_every={EVAL_EVERY}", f"--eval_images={EVAL_IMAGES}"]
  # One device and the default matmul precision, as `make demo` runs (not the suite's 8 host devices).
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  res = subprocess_util.run(cmd, cwd=REPO, env=env, timeout=2400)
  out = res.stdout
  assert res.returncode == 0, (out + res.stderr)[-3000:]
  assert f"[demo] step    50/{STEPS}  loss" in out and "ETA" in out and "held-out mIoU" in out
  assert "background" in out and "hexagon" in out  # the per-class table
  # The held-out split is seed 1 of the coded world, which training (seed 0) never reads.
  config = config_lib.load_config(f"configs/demo.py:{arg}")
  dataset = seg_datasets.load("voc", demo.heldout_root(config, EVAL_IMAGES))
  assert len(dataset.items) == EVAL_IMAGES and all(i.startswith("shapes_1_") for i, _, _ in dataset.items)
  assert "untrained model (random initialisation): held-out mIoU" in out
  result = json.load(open(os.path.join(workdir, "demo_result.json")))
  assert [step for _, step, _ in result["curve"]] == [0, EVAL_EVERY, STEPS]
  assert result["images"] == EVAL_IMAGES and set(result["per_class"]) == set(dataset.classes)
  assert 0 <= result["mIoU"] <= 100 and f"held-out mIoU {result['mIoU']:.1f}, mAcc" in out
  assert result["mIoU"] >= result["untrained_mIoU"] + MIOU_MARGIN, (result["mIoU"], result["untrained_mIoU"])
  assert result["mAcc"] >= result["untrained_mAcc"] + MACC_MARGIN, (result["mAcc"], result["untrained_mAcc"])
  assert "groups/image" in out  # the final stage's groups per image in the progress lines
  losses = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  caption = [row["contrastive_loss"] for row in losses if "contrastive_loss" in row]
  assert caption[-1] < caption[0] - 1.5, caption
  pictures = os.listdir(os.path.join(workdir, "eval", f"voc_step{STEPS}", "pictures"))
  assert len(pictures) == 16  # the 16 pictures asked for
  for name in ("grid.png", "curve.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000


def test_demo_refuses_an_eval_interval_that_skips_the_final_step(tmp_path):
  config = config_lib.load_config("configs/demo.py:steps=100")
  config.eval_every = 30
  with pytest.raises(ValueError, match=r"eval_every \(30\) must divide the 100 training steps"):
    demo.run(config, str(tmp_path / "demo"))
