"""A much shorter version of the demo, end to end: data, training with progress, held-out evaluation
(a seed training never saw), the per-class table and the pictures."""

import json
import os

from groupvit_jax import config_lib, demo
from groupvit_jax.evaluators import seg_datasets

STEPS = 20
EVAL_IMAGES = 12


def test_short_demo_end_to_end(shapes_data_dir, tmp_path, capsys):
  config = config_lib.load_config(
      f"configs/demo.py:data_dir={shapes_data_dir},world=tiny32,size=32,patch=4,steps={STEPS},warmup=5")
  config.log_every = 10
  config.eval_every = 20  # one evaluation, at the end (the untrained baseline is the curve's other point)
  workdir = str(tmp_path / "demo")
  result = demo.run(config, workdir, eval_images=EVAL_IMAGES)
  out = capsys.readouterr().out
  assert f"[demo] step    10/{STEPS}  loss" in out and "ETA" in out and "held-out mIoU" in out
  assert "background" in out and "hexagon" in out  # the per-class table
  # The held-out split is seed 1, which training (seed 0) never reads.
  dataset = seg_datasets.load("voc", config.evals["heldout"]["data_dir"])
  assert len(dataset.items) == EVAL_IMAGES and all(i.startswith("shapes_1_") for i, _, _ in dataset.items)
  assert "untrained model (random initialisation): held-out mIoU" in out
  assert [step for _, step, _ in result["curve"]] == [0, 20]
  assert 0 <= result["mIoU"] <= 100 and result["images"] == EVAL_IMAGES
  saved = json.load(open(os.path.join(workdir, "demo_result.json")))
  assert set(saved["per_class"]) == set(dataset.classes)
  pictures = os.listdir(os.path.join(workdir, "eval", f"voc_step{STEPS}", "pictures"))
  assert len(pictures) == EVAL_IMAGES  # fewer images than the 16 pictures asked for
  for name in ("grid.png", "curve.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
