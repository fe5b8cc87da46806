"""The diagnostic tools under benchmarks/ compute what they say (their printed figures are measurements)."""

import os
import re
import sys

import numpy as np
import pytest

from benchmarks import grouping_quality
from tests import subprocess_util

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


@pytest.mark.slow  # the tool end to end on the tiny config: make test-all
def test_train_step_benchmark_prints_measured_rows_for_each_tower(tmp_path):
  """The benchmark runs end to end on a tiny batch and every figure it prints is a positive measurement;
  --profile_dir leaves one trace per row.

  bfloat16 only: it takes the PyTorch side through autocast (float32 is the same code without it), and
  each precision costs ~10 compilations.
  """
  cmd = [sys.executable, "-m", "benchmarks.train_step", "--config=configs/tiny.py", "--batch_sizes=2",
         "--dtypes=bfloat16", "--steps=1", "--rounds=1", "--forward=false", "--towers",
         f"--profile_dir={tmp_path}"]
  res = subprocess_util.run(cmd, cwd=REPO, timeout=1800)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] == ["2"]]
  steps = [r for r in rows if len(r) == 13]
  towers = [r for r in rows if len(r) == 8]
  assert [r[1] for r in steps] == ["bfloat16"], res.stdout
  # On CPU the MFU is against a product rate measured in the same process, printed in the header.
  peak = re.search(r"bfloat16 (\d+) GFLOP/s", res.stdout)
  assert peak and float(peak.group(1)) > 0, res.stdout
  peak_tflops = float(peak.group(1)) / 1e3
  for r in steps:  # ours img/s, torch img/s (to 0.1), ratio = ours / torch (to 0.01); TFLOP/s (to 0.001), MFU (to 0.1 %)
    ours, theirs, ratio = map(float, r[2:5])
    assert ours > 0 and theirs > 0.05, r
    # Bounded by what the printed rounding allows (a slow PyTorch round, e.g. beside another test
    # process, prints few img/s to one decimal).
    assert (ours - 0.05) / (theirs + 0.05) - 0.005 <= ratio <= (ours + 0.05) / (theirs - 0.05) + 0.005, r
    tflops, mfu = float(r[7]), float(r[8].rstrip("%"))
    assert tflops > 0 and abs(mfu - 100 * tflops / peak_tflops) <= 0.05 / peak_tflops + 0.06 + 0.01 * mfu, r
    _assert_one_round(r[10], ratio)
    # XLA's memory analysis of the compiled step (MiB, positive).
    assert float(r[11]) > 0 and r[12] == "nan", r  # PyTorch's CUDA peak: only on a GPU
  assert list(tmp_path.glob("b2_bfloat16/**/*.xplane.pb")), sorted(tmp_path.rglob("*"))
  assert {(r[1], r[2], r[3]) for r in towers} == {
      ("bfloat16", t, p) for t in ("image", "text") for p in ("forward", "fwd+bwd")}
  for r in towers:  # ours ms, torch ms (printed to 0.01), ratio = torch ms / ours ms (to 0.01)
    ours, theirs, ratio = map(float, r[4:7])
    assert ours > 0 and theirs > 0, r
    assert (theirs - 0.005) / (ours + 0.005) - 0.005 <= ratio <= (theirs + 0.005) / (ours - 0.005) + 0.005, r
    _assert_one_round(r[7], ratio)


def test_train_step_rounds_alternate_which_side_runs_first():
  """Each round warms a side up with one untimed step, then times it; the side that goes first swaps
  from round to round, and the per-round ratios pair the two sides' times of the same round."""
  code = """if True:
    from benchmarks import train_step
    calls = []
    def side(name, seconds):
      def run(n):
        calls.append((name, n))
        return seconds.pop(0) if n > 1 else 0.0
      return run
    print(train_step._alternate(side("ours", [1.0, 0.5, 0.8]), side("theirs", [2.0, 2.0, 1.0]), 4, 3, 2))
    print(calls)
  """
  res = subprocess_util.run([sys.executable, "-c", code], cwd=REPO, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  result, calls = res.stdout.splitlines()[-2:]
  assert eval(calls) == [("ours", 1), ("ours", 2), ("theirs", 1), ("theirs", 2),  # pylint: disable=eval-used
                         ("theirs", 1), ("theirs", 2), ("ours", 1), ("ours", 2),
                         ("ours", 1), ("ours", 2), ("theirs", 1), ("theirs", 2)], calls
  ips, tps, ratio, rounds = eval(result)  # pylint: disable=eval-used
  # Best over best: 4 images x 2 steps in 0.5 s against 1.0 s; per round 2.0/1.0, 2.0/0.5, 1.0/0.8.
  assert (ips, tps, ratio.strip(), rounds.strip()) == (16.0, 8.0, "2.00", "1.25-4.00"), result


def _assert_one_round(per_round: str, ratio: float):
  """With --rounds=1 the per-round range ("lo-hi") is that one round's ratio, which is the row's."""
  lo, hi = map(float, per_round.split("-"))
  assert lo == hi and abs(lo - ratio) <= 0.01, (per_round, ratio)


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
  res = subprocess_util.run([sys.executable, "-c", code], cwd=REPO, timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]


def test_op_profile_reads_each_products_flops_and_dtypes_from_the_compiled_hlo():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import profiling  # pylint: disable=g-import-not-at-top

  def f(x, w, q, k):
    y = jnp.tanh(jax.lax.dot(x, w, preferred_element_type=jnp.float32))  # [64, 32] x [32, 16]
    logits = jnp.einsum("bnd,bsd->bns", q, k)  # 8 x [12, 4] x [4, 10]
    loop = jax.lax.fori_loop(0, 3, lambda i, a: a * 2.0, y)  # a while loop: a container, not an op
    return loop.sum() + logits.astype(jnp.float32).sum()

  args = (jnp.ones((64, 32), jnp.bfloat16), jnp.ones((32, 16), jnp.bfloat16), jnp.ones((8, 12, 4)),
          jnp.ones((8, 10, 4)))
  ops = profiling.parse_hlo(jax.jit(f).lower(*args).compile().as_text())
  products = [p for op in ops.values() if not op.fused for p in op.products]
  assert sorted(p.flops for p in products) == [2 * 8 * 12 * 10 * 4, 2 * 64 * 32 * 16], products
  assert profiling.program_flops(ops) == 2 * 8 * 12 * 10 * 4 + 2 * 64 * 32 * 16
  batched = [p for p in products if p.batched]
  assert len(batched) == 1 and batched[0].lhs == (8, 12, 4) and batched[0].dtypes == "f32 x f32 -> f32", batched
  # The operands as compiled: XLA:CPU runs this bf16 product natively (see layers.matmul).
  assert [p.dtypes for p in products if not p.batched] == ["bf16 x bf16 -> f32"], products
  assert "while" in {op.opcode for op in ops.values()}


@pytest.mark.slow  # the tool end to end on the tiny config: make test-all
def test_op_profile_traces_the_step_and_its_products_match_the_analytic_count():
  """The tool runs end to end; the products it finds in the HLO and in the trace add up to the model's
  analytic FLOP count (models/flops.py), which checks both. --torch_profile adds PyTorch's step, whose
  ops' self times add up to about its step time, with its products' time and a table of its top ops."""
  cmd = [sys.executable, "-m", "benchmarks.op_profile", "--config=configs/tiny.py", "--batch_size=2",
         "--dtype=float32", "--steps=2", "--top=5", "--torch_profile"]
  res = subprocess_util.run(cmd, cwd=REPO, timeout=1800)
  assert res.returncode == 0, res.stderr[-3000:]
  line = next(l for l in res.stdout.splitlines() if "all products:" in l)
  traced, program, analytic = (float(w) for w in line.replace(",", " ").split() if w[0].isdigit())
  assert abs(traced / analytic - 1) < 0.03 and abs(program / analytic - 1) < 0.03, line
  rows = [l.split() for l in res.stdout.splitlines() if l.strip().startswith(("YNNPACK", "XLA"))]
  assert rows and all(float(r[-3]) > 0 and float(r[-2]) > 0 for r in rows), res.stdout
  step = re.search(r"PyTorch's step .*: min ([\d.]+) ms, median ([\d.]+) ms; self time ([\d.]+) ms", res.stdout)
  assert step, res.stdout
  fastest, median, self_ms = map(float, step.groups())
  # Profiling adds overhead per op, and beside another test process PyTorch's threads wait outside its
  # ops (a 307 ms step with 86 ms of self time, against 12.6 / 11.0 alone); a unit slip (us for ms)
  # would be off by 1000x.
  assert 0 < fastest <= median and 0.05 * fastest < self_ms < 20 * median, step.group(0)
  products = re.search(r"products \(mm, .*\): ([\d.]+) ms/step, ([\d.]+) GFLOP/s on the analytic count "
                       r"\(([\d.]+) GFLOP/step\)", res.stdout)
  assert products and 0 < float(products.group(1)) < self_ms, res.stdout
  product_ms, rate, gflop = map(float, products.groups())
  assert abs(rate - gflop / product_ms * 1e3) <= 0.05 + 0.02 * rate, products.group(0)
  # The tiny config's prompts run at the context length on both sides: the same analytic count.
  assert abs(gflop / analytic - 1) < 0.01, (products.group(0), analytic)
  # The op table: the --top ops by self time, each with its share of the step's self time. (Which ops
  # lead depends on the load: beside another test process PyTorch's norms and softmaxes outgrow its
  # products at batch 2.)
  top = [l.split() for l in res.stdout.split("PyTorch's self time by op")[1].splitlines()[2:7]]
  op_ms, shares = [float(r[0]) for r in top], [float(r[1].rstrip("%")) for r in top]
  assert len(top) == 5 and op_ms == sorted(op_ms, reverse=True) and op_ms[0] <= self_ms, top
  for t, share in zip(op_ms, shares):
    assert abs(share - 100 * t / self_ms) <= 0.2 + 0.01 * share, top


def test_op_profile_times_an_asynchronous_product_to_its_completion(tmp_path):
  """XLA:CPU runs its own (Eigen) products asynchronously; their trace event is only the launch."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import profiling  # pylint: disable=g-import-not-at-top

  x, g = jnp.ones((2048, 2048)), jnp.ones((2048, 1024))  # ~40 ms: a marker recorded late under load is small
  compiled = jax.jit(lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))).lower(x, g).compile()
  ops = profiling.parse_hlo(compiled.as_text())
  jax.block_until_ready(compiled(x, g))
  with jax.profiler.trace(str(tmp_path)):
    start = time.perf_counter()
    for _ in range(5):
      jax.block_until_ready(compiled(x, g))
    wall = (time.perf_counter() - start) / 5
  trace = profiling.read_trace(str(tmp_path), ops)
  products = [name for name in trace.ns if ops[name].products]
  assert len(products) == 1 and trace.count[products[0]] == 5, trace.count
  # Launch-only timing would read a few percent of the wall time; borrowing a later run's marker, ~2x.
  assert 0.5 * wall < trace.ns[products[0]] / 5 / 1e9 < 1.5 * wall, (trace.ns, wall)


@pytest.mark.slow  # the tool end to end on the tiny config: make test-all
def test_attention_bound_times_the_step_with_and_without_the_attentions_products():
  """The free step compiles without the attentions' batched products (only the grouping blocks' remain,
  fewer FLOPs than the real step's) and both times are measured."""
  cmd = [sys.executable, "-m", "benchmarks.attention_bound", "--config=configs/tiny.py", "--batch_size=2",
         "--dtypes=float32", "--steps=1", "--rounds=1"]
  res = subprocess_util.run(cmd, cwd=REPO, timeout=1800)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] == ["float32"]]
  assert len(rows) == 1, res.stdout
  real, free, ratio, real_mflops, free_mflops = map(float, rows[0][1:6])  # ms to 0.1, ratio to 0.001
  # The ratio comes from the unrounded times: it lies in what the printed ones allow, +- its own rounding.
  assert real > 0.05 and free > 0.05, rows
  assert (real - 0.05) / (free + 0.05) - 0.0005 <= ratio <= (real + 0.05) / (free - 0.05) + 0.0005, rows
  assert 0 < free_mflops < 0.5 * real_mflops, rows
