#!/usr/bin/env python3
"""Cloud TPU VM slices: create, set up, run (on every worker, detached), tail logs, stop, delete.

  python launch/tpu_vm.py create --name=gvj --zone=us-central2-b --accelerator_type=v4-32 [--spot] [--queued]
  python launch/tpu_vm.py setup  --name=gvj --zone=us-central2-b
  python launch/tpu_vm.py run    --name=gvj --zone=us-central2-b -- groupvit_jax.train \\
      --config=configs/groupvit_s.py --workdir=gs://BUCKET/runs/groupvit_s
  python launch/tpu_vm.py logs   --name=gvj --zone=us-central2-b
  python launch/tpu_vm.py stop   --name=gvj --zone=us-central2-b     # SIGTERM: checkpoint, then exit
  python launch/tpu_vm.py delete --name=gvj --zone=us-central2-b

Flags may also come from the environment: TPU_NAME, TPU_ZONE, TPU_TYPE, TPU_RUNTIME, GCP_PROJECT.
Every gcloud command is printed before it runs; --dry_run prints them and runs nothing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupvit_jax.launching import TpuSlice, execute  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("action", choices=["create", "setup", "run", "logs", "stop", "delete"])
  p.add_argument("--name", default=os.environ.get("TPU_NAME"))
  p.add_argument("--zone", default=os.environ.get("TPU_ZONE"))
  p.add_argument("--accelerator_type", default=os.environ.get("TPU_TYPE", "v4-32"))
  p.add_argument("--runtime_version", default=os.environ.get("TPU_RUNTIME", "tpu-ubuntu2204-base"))
  p.add_argument("--project", default=os.environ.get("GCP_PROJECT", ""))
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--session", default="groupvit", help="name of the run's log file")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  if not a.name or not a.zone:
    p.error("--name and --zone are required (or TPU_NAME / TPU_ZONE)")
  tpu = TpuSlice(a.name, a.zone, a.accelerator_type, a.runtime_version, a.project, a.spot, a.queued)
  if a.action == "run" and not command:
    p.error("run needs a command after --, e.g. -- groupvit_jax.train --config=... --workdir=gs://...")
  commands = {
      "create": tpu.create,
      "setup": lambda: tpu.setup(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
      "run": lambda: tpu.run(command, a.session),
      "logs": lambda: tpu.logs(a.session),
      "stop": tpu.stop,
      "delete": tpu.delete,
  }[a.action]()
  return execute(commands, a.dry_run)


if __name__ == "__main__":
  sys.exit(main())
