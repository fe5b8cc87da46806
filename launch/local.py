#!/usr/bin/env python3
"""N jax.distributed processes on this machine (CPU): multi-host code without a pod.

  python launch/local.py --num_processes=2 -- groupvit_jax.train --config=configs/tiny.py \\
      --workdir=/tmp/gvj_2proc --config.total_steps=20

Each process gets --coordinator_address/--num_processes/--process_id appended and
--devices_per_process CPU devices; output lines are prefixed with the process id.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from groupvit_jax.launching import launch_local  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--devices_per_process", type=int, default=1)
  p.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
  p.add_argument("--timeout", type=float, default=None, help="seconds before all processes are stopped")
  argv = sys.argv[1:] if argv is None else list(argv)
  command = argv[argv.index("--") + 1:] if "--" in argv else []
  a = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  if not command:
    p.error("give the module to run after --, e.g. -- groupvit_jax.train --config=configs/tiny.py --workdir=...")
  return launch_local(command, a.num_processes, a.devices_per_process, a.port, a.timeout)


if __name__ == "__main__":
  sys.exit(main())
