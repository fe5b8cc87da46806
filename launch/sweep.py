"""Expands a sweep (configs/sweeps/*.py) into named runs and prints, runs locally, or runs on a TPU slice.

  python -m launch.sweep --sweep=configs/sweeps/tiny_lr.py --workdir_root=/tmp/sweeps            # print
  python -m launch.sweep --sweep=configs/sweeps/tiny_lr.py --workdir_root=/tmp/sweeps --mode=local
  python -m launch.sweep --sweep=configs/sweeps/groupvit_s_lr.py --workdir_root=gs://B/sweeps --mode=tpu \\
      --name=gvj --zone=us-central2-b [--dry_run]

The expansion is deterministic; each run's resolved config is written to <workdir>/resolved_config.json
before it starts. A sweep naming an unknown field, or an empty one, fails before anything launches.
"""

import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from groupvit_jax import config_lib
import launch
from launch.tpu_vm import TpuSlice, execute


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]
  workdir: str
  config: Any


def _set(config, key: str, value: Any) -> None:
  node = config
  *parents, leaf = key.split(".")
  for i, part in enumerate(parents):
    if part not in node:
      raise KeyError(f"sweep field {key!r}: {'.'.join(parents[:i + 1])!r} is not in the base config")
    node = node[part]
  if leaf not in node:
    raise KeyError(f"sweep field {key!r} is not in the base config")
  node[leaf] = value


def _fmt(value: Any) -> str:
  return json.dumps(value) if not isinstance(value, str) else value


def expand_sweep(sweep_path: str, workdir_root: str) -> list[Run]:
  """Expands `configs/sweeps/<name>.py` into runs, deterministically.

  A sweep file defines `get_sweep()` returning `{"base": "configs/x.py[:arg]", "product": {field: [values]},
  "zip": {field: [values]} (optional, same-length lists varied together), "fixed": {field: value}}`.
  Runs are the product of the `product` axes times the `zip` rows, in the order written; each is named by
  its overrides and gets `workdir_root/<sweep>/<index>_<name>`.
  """
  sweep = config_lib.load_module(sweep_path, "sweep file").get_sweep()
  unknown = set(sweep) - {"base", "product", "zip", "fixed"}
  if unknown:
    raise ValueError(f"{sweep_path}: unknown sweep keys {sorted(unknown)}")
  product, zipped = dict(sweep.get("product", {})), dict(sweep.get("zip", {}))
  if any(len(v) == 0 for v in product.values()) or (not product and not zipped):
    raise ValueError(f"{sweep_path}: the sweep is empty (a product axis has no values, or nothing varies)")
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise ValueError(f"{sweep_path}: zip lists differ in length {sorted(lengths)}")
  zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
  combos = [dict(zip(product, values)) for values in itertools.product(*product.values())] if product else [{}]
  sweep_name = os.path.splitext(os.path.basename(sweep_path))[0]
  runs = []
  for combo, row in itertools.product(combos, zip_rows):
    overrides = {**sweep.get("fixed", {}), **combo, **row}
    config = config_lib.load_config(sweep["base"])
    for key, value in overrides.items():
      _set(config, key, value)
    varied = {**combo, **row}
    name = ",".join(f"{k}={_fmt(v)}" for k, v in varied.items()).replace("/", "_")
    workdir = os.path.join(workdir_root, sweep_name, f"{len(runs):03d}_{name}")
    runs.append(Run(name=name, overrides=overrides, workdir=workdir, config=config))
  return runs


def run_command(base: str, run: Run, module: str = "groupvit_jax.train") -> list[str]:
  """`python -m` arguments (without the interpreter) that train one sweep run."""
  args = [module, f"--config={base}", f"--workdir={run.workdir}"]
  args += [f"--config.{k}={_fmt(v)}" for k, v in run.overrides.items()]
  return args


def save_resolved(run: Run) -> str:
  """Writes the run's resolved config to `<workdir>/resolved_config.json`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (gfile: workdirs may be gs://)
  tf.io.gfile.makedirs(run.workdir)
  path = os.path.join(run.workdir, "resolved_config.json")
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(run.config.to_json_best_effort(indent=2))
  return path


def main(argv=None) -> int:
  p = launch.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", required=True)
  p.add_argument("--workdir_root", required=True)
  p.add_argument("--mode", choices=["print", "local", "tpu"], default="print")
  p.add_argument("--name", default=os.environ.get("TPU_NAME"))
  p.add_argument("--zone", default=os.environ.get("TPU_ZONE"))
  p.add_argument("--project", default=os.environ.get("GCP_PROJECT", ""))
  p.add_argument("--dry_run", action="store_true")
  a = p.parse_args(argv)
  try:
    runs = expand_sweep(a.sweep, a.workdir_root)
  except (KeyError, ValueError, FileNotFoundError) as e:
    print(f"sweep error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  base = config_lib.load_module(a.sweep, "sweep file").get_sweep()["base"]
  print(f"{len(runs)} runs from {a.sweep}")
  for i, run in enumerate(runs):
    args = run_command(base, run)
    print(f"[{i}] {run.name}\n    python -m " + " ".join(shlex.quote(x) for x in args), flush=True)
    if a.mode == "print" or a.dry_run and a.mode == "local":
      continue
    if not a.dry_run:
      save_resolved(run)
    if a.mode == "local":
      rc = subprocess.call([sys.executable, "-m", *args])
    else:
      if not a.name or not a.zone:
        p.error("--mode=tpu needs --name and --zone")
      tpu = TpuSlice(a.name, a.zone, project=a.project)
      rc = execute(tpu.run_foreground(args), a.dry_run)
    if rc:
      print(f"run {i} failed with exit code {rc}; stopping the sweep", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
