#!/usr/bin/env python3
"""Expands a sweep (configs/sweeps/*.py) into named runs and prints, runs locally, or runs on a TPU slice.

  python launch/sweep.py --sweep=configs/sweeps/tiny_lr.py --workdir_root=/tmp/sweeps            # print
  python launch/sweep.py --sweep=configs/sweeps/tiny_lr.py --workdir_root=/tmp/sweeps --mode=local
  python launch/sweep.py --sweep=configs/sweeps/groupvit_s_lr.py --workdir_root=gs://B/sweeps --mode=tpu \\
      --name=gvj --zone=us-central2-b [--dry_run]

The expansion is deterministic; each run's resolved config is written to <workdir>/resolved_config.json
before it starts. A sweep naming an unknown field, or an empty one, fails before anything launches.
"""

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupvit_jax import launching  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sweep", required=True)
  p.add_argument("--workdir_root", required=True)
  p.add_argument("--mode", choices=["print", "local", "tpu"], default="print")
  p.add_argument("--name", default=os.environ.get("TPU_NAME"))
  p.add_argument("--zone", default=os.environ.get("TPU_ZONE"))
  p.add_argument("--project", default=os.environ.get("GCP_PROJECT", ""))
  p.add_argument("--dry_run", action="store_true")
  a = p.parse_args(argv)
  try:
    runs = launching.expand_sweep(a.sweep, a.workdir_root)
  except (KeyError, ValueError, FileNotFoundError) as e:
    print(f"sweep error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  base = launching._load_module(a.sweep).get_sweep()["base"]  # pylint: disable=protected-access
  print(f"{len(runs)} runs from {a.sweep}")
  for i, run in enumerate(runs):
    args = launching.run_command(base, run)
    print(f"[{i}] {run.name}\n    python -m " + " ".join(shlex.quote(x) for x in args), flush=True)
    if a.mode == "print" or a.dry_run and a.mode == "local":
      continue
    if not a.dry_run:
      launching.save_resolved(run)
    if a.mode == "local":
      rc = subprocess.call([sys.executable, "-m", *args])
    else:
      if not a.name or not a.zone:
        p.error("--mode=tpu needs --name and --zone")
      tpu = launching.TpuSlice(a.name, a.zone, project=a.project)
      rc = launching.execute(tpu.run_foreground(args), a.dry_run)
    if rc:
      print(f"run {i} failed with exit code {rc}; stopping the sweep", file=sys.stderr)
      return rc
  return 0


if __name__ == "__main__":
  sys.exit(main())
