"""N jax.distributed processes on this machine (CPU): multi-host code without a pod.

  python -m launch.local --num_processes=2 -- groupvit_jax.train --config=configs/tiny.py \\
      --workdir=/tmp/gvj_2proc --config.total_steps=20

Each process gets --coordinator_address/--num_processes/--process_id appended and
--devices_per_process CPU devices; output lines are prefixed with the process id.
"""

import os
import subprocess
import sys
import time
from typing import Sequence

from groupvit_jax.cpu_env import cpu_malloc_env
import launch


def launch_local(args: Sequence[str], num_processes: int, devices_per_process: int = 1, port: int = 0,
                 timeout: float | None = None) -> int:
  """Runs `python -m <args>` as `num_processes` jax.distributed processes on localhost (CPU).

  Output lines are prefixed with the process id. Returns 0 when every process succeeded, else the
  first non-zero exit code; when one process fails, the others are terminated.
  """
  if not port:
    import socket  # pylint: disable=g-import-not-at-top
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", **cpu_malloc_env(),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "-u", "-m", *args, f"--coordinator_address=localhost:{port}",
           f"--num_processes={num_processes}", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  import threading  # pylint: disable=g-import-not-at-top

  def pump(i, p):
    for line in p.stdout:
      sys.stdout.write(f"[{i}] {line}")
  threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
  for t in threads:
    t.start()
  deadline = time.time() + timeout if timeout else None
  rc = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if failed or (deadline and time.time() > deadline):
      rc = failed[0] if failed else 124
      if not failed:
        print(f"launch.local: the processes did not finish within {timeout:.0f} s; stopping them",
              file=sys.stderr, flush=True)
      for p in procs:
        if p.poll() is None:
          p.terminate()
      break
    time.sleep(0.1)
  for p in procs:
    p.wait()
  for t in threads:
    t.join(timeout=5)
  return rc or next((p.returncode for p in procs if p.returncode), 0)


def main(argv=None) -> int:
  p = launch.ArgumentParser(description=__doc__.splitlines()[0])
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
