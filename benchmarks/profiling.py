"""Reading a compiled XLA:CPU step and its trace: each op's products (FLOPs, shapes, dtypes) from the
HLO text, each op's time from a `jax.profiler.trace` (read with `jax.profiler.ProfileData`).

Used by benchmarks/op_profile.py; kept free of flags so tests can import it.
"""

import bisect
import collections
import dataclasses
import glob
import math
import re
from typing import Dict, List, Tuple

import jax

# Trace events that are not ops: thunk-executor and thread-pool bookkeeping, and the markers closing an op.
_NOT_OPS = re.compile(r"^(end: |Thunk|ThreadpoolListener)")
# Ops whose time contains other ops' (their bodies run as ops of their own).
_CONTAINERS = {"while", "conditional", "call"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* ([\w\-]+)\((.*)$")
_TUPLE_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = \([^()]*\) ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


@dataclasses.dataclass
class Product:
  """One matrix product (a dot instruction) of the compiled step."""
  flops: float
  lhs: Tuple[int, ...]
  rhs: Tuple[int, ...]
  dtypes: str  # "bf16 x bf16 -> f32"
  batched: bool


@dataclasses.dataclass
class Op:
  """One instruction of the compiled step as the trace names it: its opcode and the products it runs."""
  opcode: str
  products: List[Product]
  fused: bool = False  # an instruction of a fusion's own computation (the trace names the fusion)

  @property
  def flops(self) -> float:
    return sum(p.flops for p in self.products)


def _dims(text: str) -> Tuple[int, ...]:
  return tuple(int(d) for d in text.split(",") if d)


def parse_hlo(hlo: str) -> Dict[str, Op]:
  """Every instruction of a compiled HLO module by name, with the products it runs (those of the
  computation a fusion calls, or its own for a `dot`).

  Args:
    hlo: `compiled.as_text()`.
  Returns:
    {instruction name: Op}.
  """
  shapes, dots, calls, opcodes, where = {}, collections.defaultdict(list), {}, {}, {}
  computation = None
  pending = []  # (computation, name, operands and attributes) of dots, read once every shape is known
  for line in hlo.splitlines():
    if m := _COMPUTATION.match(line):
      computation = m.group(1)
      for param in re.finditer(r"([\w.\-]+): (\w+)\[([\d,]*)\]", line):
        shapes[param.group(1)] = (param.group(2), _dims(param.group(3)))
      continue
    if not (m := _INSTRUCTION.match(line)):
      if m := _TUPLE_INSTRUCTION.match(line):  # while loops, tuple-valued fusions
        opcodes[m.group(1)] = m.group(2)
      continue
    name, dtype, dims, opcode, rest = m.groups()
    shapes[name] = (dtype, _dims(dims))
    opcodes[name], where[name] = opcode, computation
    if opcode == "dot":
      pending.append((computation, name, rest))
    if called := re.search(r"calls=%([\w.\-]+)", rest):
      calls[name] = called.group(1)
  products = {}
  for computation, name, rest in pending:
    operands = [o.strip().lstrip("%") for o in rest.split(")")[0].split(",")[:2]]
    if not all(o in shapes for o in operands):
      raise ValueError(f"parse_hlo: dot {name}: operands {operands} are not instructions or parameters seen "
                       "before (an HLO text format this parser does not know)")
    lhs, rhs = (shapes[o] for o in operands)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(lhs[1][i] for i in _dims(contracting.group(1))) if contracting else 1
    out_dtype, out_dims = shapes[name]
    product = Product(flops=2.0 * math.prod(out_dims) * k, lhs=lhs[1], rhs=rhs[1],
                      dtypes=f"{lhs[0]} x {rhs[0]} -> {out_dtype}", batched="lhs_batch_dims" in rest)
    products[name] = product
    dots[computation].append(product)
  fusions = {called for name, called in calls.items() if opcodes[name] == "fusion"}
  return {name: Op(opcode, [products[name]] if name in products else list(dots.get(calls.get(name), [])),
                   fused=where.get(name) in fusions)
          for name, opcode in opcodes.items()}


def program_flops(ops: Dict[str, Op]) -> float:
  """FLOPs of the products the program runs once through (loop bodies counted once)."""
  return sum(op.flops for op in ops.values() if not op.fused)


@dataclasses.dataclass
class Trace:
  """Per-op time from a CPU trace: total ns and count by op name; ns with 0, 1, 2, ... ops in flight."""
  ns: collections.Counter
  count: collections.Counter
  in_flight: Dict[int, float]


def read_trace(directory: str, ops: Dict[str, Op]) -> Trace:
  """Op times from the `jax.profiler.trace` written under `directory` (XLA:CPU's thread lines).

  An op's time is its event's duration, except for XLA's own products (`dot` instructions), which
  XLA:CPU runs asynchronously on Eigen's thread pool: their event covers only the launch (~0.5 ms of a
  15 ms product alone), so they run from the event's start to their "end: <op>" marker, which comes
  when the product is done (and includes any wait for a free thread; a marker recorded late, as under
  load, is cut at the op's next start). Other ops' markers are left alone: a loop fusion's marker can
  wait for a part queued behind another op.
  """
  files = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {directory}")
  data = jax.profiler.ProfileData.from_file(max(files))
  opcode = lambda name: ops[name].opcode if name in ops else ""
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      for e in line.events:
        if e.name.startswith("end: "):
          if opcode(e.name[5:]) == "dot":
            ends[e.name[5:]].append(e.start_ns)
        elif not _NOT_OPS.match(e.name) and opcode(e.name) not in _CONTAINERS:
          starts[e.name].append((e.start_ns, e.start_ns + e.duration_ns))
  ns, count, edges = collections.Counter(), collections.Counter(), []
  for name, spans in starts.items():
    marks, spans = sorted(ends.get(name, [])), sorted(spans)
    for n, (begin, finish) in enumerate(spans):
      # A run is done by its first marker after its start, and by the next run's start at the latest
      # (an op's runs follow one another): under load a marker can be recorded milliseconds late.
      i = bisect.bisect_left(marks, begin)
      if i < len(marks):
        finish = max(finish, min(marks[i], spans[n + 1][0] if n + 1 < len(spans) else marks[i]))
      ns[name] += finish - begin
      count[name] += 1
      edges += [(begin, 1), (finish, -1)]
  in_flight, running, last = collections.Counter(), 0, None
  for t, step in sorted(edges):
    if last is not None:
      in_flight[running] += t - last
    running, last = running + step, t
  return Trace(ns, count, dict(in_flight))


def _engine(name: str) -> str:
  for prefix, engine in (("ynn_", "YNNPACK"), ("xnn_", "XNNPACK"), ("onednn", "oneDNN")):
    if name.startswith(prefix):
      return engine
  return "XLA"


def kind(name: str) -> str:
  """An op's kind: its name without the numeric suffix ("multiply_add_fusion.12" -> "multiply_add_fusion")."""
  return re.sub(r"\.\d+$", "", name)


def product_classes(ops: Dict[str, Op], trace: Trace, steps: int) -> List[tuple]:
  """Rows (engine, shape class, dtypes, ops per step, GFLOP per step, op ms per step), largest time first."""
  rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
  for name, ns in trace.ns.items():
    op = ops.get(name)
    if not op or not op.products:
      continue
    key = (_engine(name), "batched" if any(p.batched for p in op.products) else "2-D",
           ", ".join(sorted({p.dtypes for p in op.products})))
    rows[key][0] += trace.count[name] / steps
    rows[key][1] += op.flops * trace.count[name] / steps / 1e9
    rows[key][2] += ns / steps / 1e6
  return sorted(((*k, *v) for k, v in rows.items()), key=lambda r: -r[5])
