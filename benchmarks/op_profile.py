"""Where our train step's time goes on CPU: a per-op profile with the matrix products' FLOP rates.

  python -m benchmarks.op_profile --config=configs/demo.py --batch_size=64 --dtype=float32
  python -m benchmarks.op_profile --config=configs/groupvit_s.py --batch_size=8 --dtype=bfloat16 --steps=3
  python -m benchmarks.op_profile --config=configs/demo.py --batch_size=64 --torch_profile  # and PyTorch's

Compiles the step `benchmarks.train_step` times (one device), traces `--steps` steps with
`jax.profiler.trace` and reads the trace back with `jax.profiler.ProfileData` (no TensorBoard needed).
Every op the trace names is joined to the compiled HLO: products (a `dot` alone or inside a fusion) get
their FLOPs from the HLO's shapes, so each class of product (engine x 2-D/batched x operand dtypes)
prints GFLOP per step, op time and GFLOP/s over that op time. Op time is the span an op ran (for
XLA's asynchronous Eigen products, launch to completion, waits for a free thread included:
profiling.read_trace); YNNPACK and Eigen split one op over the threads left free, so op time is not
CPU time, and with two ops in flight each one's GFLOP/s is that of the threads it got. Read the rates
as pointers, then A/B the whole step: GroupViT-S fp32's Eigen kernel-gradient products read 65 GFLOP/s
against YNNPACK's 119, yet handing them to YNNPACK (padded, as in bf16) made the step 1.04x slower.

With `--torch_profile` the PyTorch reference's step (`benchmarks.train_step`'s, same batch and dtype) runs
under `torch.profiler` first: its ops' self time on the calling thread (each op's intra-op threads
included, so these add up to the step's wall time, where ours add up to more) and its products' rate
on the analytic count of its step (prompts at the context length).
"""

import collections
import contextlib
import tempfile
import time
from typing import Optional

from absl import app, flags
import jax
import numpy as np

from benchmarks import profiling, train_step
from groupvit_jax import cpu_env
from groupvit_jax.models import flops

flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_integer("top", 15, "Rows of the op-kind and single-op tables.")
flags.DEFINE_string("trace_dir", None, "Keep the trace here (TensorBoard's profile plugin reads it); "
                    "default: a temporary folder, removed afterwards.")
flags.DEFINE_bool("torch_profile", False, "Also profile the PyTorch reference's step (same batch and dtype) "
                  "with torch.profiler: its ops' self time and its products' rate.")
FLAGS = flags.FLAGS

# The PyTorch ops that are matrix products (the patch embedding is a convolution).
TORCH_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                  "aten::convolution_backward")


def profile(config, batch_size: int, dtype: str, steps: int, trace_dir: Optional[str] = None):
  """Compiles and traces our step: (parsed HLO, Trace, step times in s)."""
  compiled, run, _ = train_step.compile_ours(config, batch_size, dtype, np.random.RandomState(0))
  run(2)
  times = [run(1) for _ in range(steps)]
  ops = profiling.parse_hlo(compiled.as_text())
  with contextlib.ExitStack() as stack:
    directory = trace_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="op_profile_"))
    with jax.profiler.trace(directory):
      run(steps)
    return ops, profiling.read_trace(directory, ops), times


def torch_profile(config, batch_size: int, dtype: str, steps: int):
  """The PyTorch reference's step under torch.profiler: (step times in s, {op: self ms per step},
  {op: calls per step})."""
  import torch  # pylint: disable=g-import-not-at-top
  run = train_step.theirs(config, batch_size, dtype, np.random.RandomState(0))
  run(2)
  times = [run(1) for _ in range(steps)]
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    run(steps)
  ms, calls = collections.Counter(), collections.Counter()
  for event in prof.key_averages():
    ms[event.key] += event.self_cpu_time_total / steps / 1e3
    calls[event.key] += event.count / steps
  return times, ms, calls


def main(argv):
  del argv
  device = jax.devices()[0]
  if device.platform != "cpu":
    raise SystemExit(f"op_profile: reads XLA:CPU's thread lines of the trace; got a {device.platform} device "
                     "(on GPU/TPU use the TensorBoard profile plugin)")
  config = train_step.load_config()
  steps = FLAGS.steps
  # PyTorch's first: its bf16 steps fault more once XLA's have run in the process, ours not the other
  # way round (page faults under the jemalloc setting, measured with perf).
  reference = torch_profile(config, FLAGS.batch_size, FLAGS.dtype, steps) if FLAGS.torch_profile else None
  start = time.perf_counter()
  ops, trace, times = profile(config, FLAGS.batch_size, FLAGS.dtype, steps, FLAGS.trace_dir)
  print(f"device: {device.device_kind}, config {FLAGS.config}, batch {FLAGS.batch_size}, {FLAGS.dtype}, "
        f"malloc {cpu_env.malloc_in_use()} ({time.perf_counter() - start:.0f} s to compile and trace)")
  op_ms = sum(trace.ns.values()) / steps / 1e6
  span = sum(trace.in_flight.values())
  print(f"step: min {min(times) * 1e3:.1f} ms, median {np.median(times) * 1e3:.1f} ms over {steps} steps; "
        f"op time {op_ms:.1f} ms per step; share of the traced time with 0, 1, 2, ... ops in flight: "
        + ", ".join(f"{v / span:.0%}" for _, v in sorted(trace.in_flight.items())))
  print("matrix products (FLOPs from the compiled HLO):")
  print(f"  {'engine':<8} {'shape':<8} {'dtypes':<22} {'ops/step':>8} {'GFLOP/step':>10} {'op ms/step':>10} "
        f"{'GFLOP/s':>8}")
  classes = profiling.product_classes(ops, trace, steps)
  for engine, shape, dtypes, n, gflop, ms in classes:
    print(f"  {engine:<8} {shape:<8} {dtypes:<22} {n:>8.0f} {gflop:>10.3f} {ms:>10.2f} {gflop / ms * 1e3:>8.0f}")
  analytic = flops.train_step_flops(config.model, config.input.context_length, FLAGS.prompts, FLAGS.batch_size,
                                    train_step.prompt_length(config)) * FLAGS.batch_size
  print(f"  all products: {sum(r[4] for r in classes):.4g} GFLOP/step traced, "
        f"{profiling.program_flops(ops) / 1e9:.4g} in the program, analytic count (models/flops.py) "
        f"{analytic / 1e9:.4g}")
  kinds, counts = collections.Counter(), collections.Counter()
  for name, ns in trace.ns.items():
    kinds[profiling.kind(name)] += ns
    counts[profiling.kind(name)] += trace.count[name]
  print(f"op time by kind (top {FLAGS.top}):\n  {'ms/step':>8} {'share':>6} {'ops/step':>8}  kind")
  for kind, ns in kinds.most_common(FLAGS.top):
    print(f"  {ns / steps / 1e6:>8.2f} {ns / steps / 1e6 / op_ms:>6.1%} {counts[kind] / steps:>8.0f}  {kind}")
  print(f"single ops (top {FLAGS.top}):\n  {'ms/step':>8} {'GFLOP/s':>8}  op  [products: lhs x rhs, dtypes]")
  for name, ns in trace.ns.most_common(FLAGS.top):
    op = ops.get(name, profiling.Op("?", []))
    rate = f"{op.flops * trace.count[name] / ns:>8.0f}" if op.products else f"{'':>8}"
    shapes = "; ".join(f"{list(p.lhs)} x {list(p.rhs)}, {p.dtypes}" for p in op.products)
    print(f"  {ns / steps / 1e6:>8.2f} {rate}  {name}" + (f"  [{shapes}]" if shapes else ""))
  if reference:
    torch_times, ms, calls = reference
    total_ms = sum(ms.values())
    gflop = flops.train_step_flops(config.model, config.input.context_length, FLAGS.prompts,
                                   FLAGS.batch_size) * FLAGS.batch_size / 1e9
    product_ms = sum(ms[op] for op in TORCH_PRODUCTS)
    print(f"PyTorch's step (prompts at {config.input.context_length} tokens): min {min(torch_times) * 1e3:.1f} ms, "
          f"median {np.median(torch_times) * 1e3:.1f} ms; self time {total_ms:.1f} ms per step")
    print(f"  products ({', '.join(op.removeprefix('aten::') for op in TORCH_PRODUCTS)}): {product_ms:.2f} ms/step, "
          f"{gflop / product_ms * 1e3:.1f} GFLOP/s on the analytic count ({gflop:.4g} GFLOP/step)")
    print(f"PyTorch's self time by op (top {FLAGS.top}):\n  {'ms/step':>8} {'share':>6} {'calls/step':>10}  op")
    for op, t in ms.most_common(FLAGS.top):
      print(f"  {t:>8.2f} {t / total_ms:>6.1%} {calls[op]:>10.0f}  {op}")


if __name__ == "__main__":
  app.run(main)
