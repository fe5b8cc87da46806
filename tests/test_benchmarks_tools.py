"""The diagnostic tools under benchmarks/ compute what they say (their printed figures are measurements)."""

import os
import subprocess
import sys

import numpy as np

from benchmarks import grouping_quality

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_oracle_names_each_group_by_its_majority_true_class():
  groups = np.array([[0, 0, 1, 1],
                     [0, 0, 1, 1],
                     [2, 2, 2, 2]])
  mask = np.array([[3, 3, 0, 5],
                   [3, 0, 5, 5],
                   [255, 255, 255, 255]])  # group 2 is all ignored pixels: stays ignored
  expected = np.array([[3, 3, 5, 5],
                       [3, 3, 5, 5],
                       [255, 255, 255, 255]])
  np.testing.assert_array_equal(grouping_quality.oracle_labels(groups, mask, num_classes=6), expected)
  # One group over everything: the oracle can only name it by the majority, here background.
  one = grouping_quality.oracle_labels(np.zeros((2, 3), int), np.array([[0, 0, 0], [0, 4, 4]]), 5)
  np.testing.assert_array_equal(one, np.zeros((2, 3)))


def test_train_step_benchmark_prints_measured_rows_for_each_tower():
  """The benchmark runs end to end on a tiny batch and every figure it prints is a positive measurement.

  bfloat16 only: it takes the PyTorch side through autocast (float32 is the same code without it), and
  each precision costs ~10 compilations.
  """
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--config=configs/tiny.py", "--batch_sizes=2",
         "--dtypes=bfloat16", "--steps=1", "--rounds=1", "--forward=false", "--towers"]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] == ["2"]]
  steps = [r for r in rows if len(r) == 10]
  towers = [r for r in rows if len(r) == 7]
  assert [r[1] for r in steps] == ["bfloat16"], res.stdout
  for r in steps:  # ours img/s, torch img/s, ratio = ours / torch
    ours, theirs, ratio = map(float, r[2:5])
    assert ours > 0 and theirs > 0 and abs(ratio - ours / theirs) < 0.01 * ratio + 0.01, r
  assert {(r[1], r[2], r[3]) for r in towers} == {
      ("bfloat16", t, p) for t in ("image", "text") for p in ("forward", "fwd+bwd")}
  for r in towers:  # ours ms, torch ms (printed to 0.01), ratio = torch ms / ours ms (to 0.01)
    ours, theirs, ratio = map(float, r[4:7])
    assert ours > 0 and theirs > 0, r
    assert (theirs - 0.005) / (ours + 0.005) - 0.005 <= ratio <= (theirs + 0.005) / (ours - 0.005) + 0.005, r


def test_train_step_and_its_benchmark_import_without_tensorflow():
  """GPU images often lack TensorFlow (and clu, whose writers import it): the step must not need them."""
  code = ("import importlib.abc, sys\n"
          "class Block(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path, target=None):\n"
          "    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'tensorflow_text', 'clu'):\n"
          "      raise ImportError('no ' + name + ' here')\n"
          "sys.meta_path.insert(0, Block())\n"
          "import benchmarks.train_step, groupvit_jax.train_state\n"
          "assert 'tensorflow' not in sys.modules\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
  assert res.returncode == 0, res.stderr[-3000:]
