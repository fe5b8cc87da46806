"""The most a faster attention-product kernel could buy: our step against the same step with those products free.

  python -m benchmarks.attention_bound --config=configs/demo.py --batch_size=64
  python -m benchmarks.attention_bound --config=configs/groupvit_s.py --batch_size=8 --steps=2

XLA:CPU runs each batched product on one thread and below PyTorch's `bmm` rate (README, Benchmarks), so a
custom multi-threaded kernel for the attention's products is the lever left on CPU. Before writing one,
this measures its ceiling. Two compiled variants of our train step alternate in one process:
- real: the step as it runs (`benchmarks.train_step.compile_ours`);
- free: every self- and cross-attention (`layers.attention`) runs through the heads-major core, whose six
  products, forward and backward, are replaced by a rank-1 broadcast with the product's output shape
  and dtype (one elementwise write, no FLOPs). Everything else stays: projections, softmax, the pads and
  transposes around the products, the grouping blocks' own assignment products, the optimizer.
The printed ratio real / free is the step's speed-up if those products took no time at all; a real
kernel gets some fraction of it. The free step computes nonsense (its loss is not the model's); only
its time is read. Each row also prints the batched products' MFLOPs in both compiled steps (from their
HLO): what is left in the free step is the grouping blocks' assignment products, which it keeps.
float32 rows run the heads-major core too, which the real float32 step does not use
(it takes the same time within ~2 %).
"""

import contextlib
import time
from unittest import mock

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import profiling
from benchmarks import train_step
from groupvit_jax import cpu_env
from groupvit_jax.models import cpu_kernels, layers

flags.DEFINE_integer("batch_size", 64, "Global batch size.")
FLAGS = flags.FLAGS


def free_batched_dot(a: jax.Array, b: jax.Array, b_contracting: int) -> jax.Array:
  """`cpu_kernels.batched_dot`'s output shape and dtype ([B, m, n] float32) from a rank-1 broadcast of one
  column of `a` and one row of `b`, instead of the product."""
  b_row = b[:, :, 0] if b_contracting == 2 else b[:, 0, :]  # [B, n]
  return a[:, :, :1].astype(jnp.float32) * b_row[:, None, :].astype(jnp.float32)


_original_attention = layers.attention


def _heads_major_attention(q, k, v, num_heads, mask=None, implementation="xla"):
  """`layers.attention` through the heads-major core in every dtype (where YNNPACK takes the shapes)."""
  head_dim = q.shape[-1] // num_heads
  if cpu_kernels.ynn_extents(q.shape[1], k.shape[1], head_dim):
    return cpu_kernels.attention_heads_major(q, k, v, num_heads, mask)
  return _original_attention(q, k, v, num_heads, mask, implementation)


@contextlib.contextmanager
def free_attention_products():
  """While active, models built and traced run their attention products as `free_batched_dot`."""
  with mock.patch.object(layers, "attention", _heads_major_attention), \
       mock.patch.object(cpu_kernels, "batched_dot", free_batched_dot):
    yield


def batched_mflops(compiled) -> float:
  """MFLOPs of the batched products a compiled step runs once through: the attentions' and the grouping
  blocks' assignment products (models/grouping.py), which the free step keeps."""
  ops = profiling.parse_hlo(compiled.as_text())
  return sum(p.flops for op in ops.values() if not op.fused for p in op.products if p.batched) / 1e6


def compare(config, batch_size: int, dtype: str, steps: int, rounds: int):
  """(real step seconds, free step seconds, real batched MFLOPs, free batched MFLOPs): the times each the
  best of `rounds` alternating rounds of `steps`."""
  rng = np.random.RandomState(0)
  real_step, run_real, _ = train_step.compile_ours(config, batch_size, dtype, rng)
  with free_attention_products():
    free_step, run_free, _ = train_step.compile_ours(config, batch_size, dtype, rng)
  real, free = train_step.alternating_rounds([run_real, run_free], rounds, steps)
  return min(real) / steps, min(free) / steps, batched_mflops(real_step), batched_mflops(free_step)


def main(argv):
  del argv
  config = train_step.load_config()
  print(f"device: {jax.devices()[0].device_kind}, config {FLAGS.config}, batch {FLAGS.batch_size}, "
        f"malloc {cpu_env.malloc_in_use()}, {FLAGS.rounds} rounds of {FLAGS.steps} steps")
  print(f"{'dtype':>9} {'real ms':>8} {'free ms':>8} {'real/free':>10} {'batched MFLOP real':>19} {'free':>9}")
  for dtype in FLAGS.dtypes:
    start = time.perf_counter()
    real, free, real_mflops, free_mflops = compare(config, FLAGS.batch_size, dtype, FLAGS.steps, FLAGS.rounds)
    print(f"{dtype:>9} {1e3 * real:>8.1f} {1e3 * free:>8.1f} {real / free:>10.3f} {real_mflops:>19.1f} "
          f"{free_mflops:>9.1f}   "
          f"({time.perf_counter() - start:.0f} s with compiles)", flush=True)


if __name__ == "__main__":
  app.run(main)
