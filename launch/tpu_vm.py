"""Cloud TPU VM slices: create, set up, run (on every worker, detached), tail logs, stop, delete.

  python -m launch.tpu_vm create --name=gvj --zone=us-central2-b --accelerator_type=v4-32 [--spot] [--queued]
  python -m launch.tpu_vm setup  --name=gvj --zone=us-central2-b
  python -m launch.tpu_vm run    --name=gvj --zone=us-central2-b -- groupvit_jax.train \\
      --config=configs/groupvit_s.py --workdir=gs://BUCKET/runs/groupvit_s
  python -m launch.tpu_vm logs   --name=gvj --zone=us-central2-b
  python -m launch.tpu_vm stop   --name=gvj --zone=us-central2-b     # SIGTERM: checkpoint, then exit
  python -m launch.tpu_vm delete --name=gvj --zone=us-central2-b

Flags may also come from the environment: TPU_NAME, TPU_ZONE, TPU_TYPE, TPU_RUNTIME, GCP_PROJECT.
Every gcloud command is printed before it runs; --dry_run prints them and runs nothing.
"""

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Sequence

import launch


@dataclasses.dataclass
class TpuSlice:
  """Where a slice lives and what it is."""
  name: str
  zone: str
  accelerator_type: str = "v4-32"
  runtime_version: str = "tpu-ubuntu2204-base"
  project: str = ""
  spot: bool = False
  queued: bool = False  # use a queued resource (waits for capacity) instead of direct creation
  repo_dir: str = "~/groupvit-jax"  # checkout location on every worker
  log_dir: str = "~/groupvit_jax_logs"

  def _common(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

  def create(self) -> list[list[str]]:
    if self.queued:
      cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", self.name, f"--node-id={self.name}",
             f"--accelerator-type={self.accelerator_type}", f"--runtime-version={self.runtime_version}"]
    else:
      cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name,
             f"--accelerator-type={self.accelerator_type}", f"--version={self.runtime_version}"]
    return [cmd + self._common() + (["--spot"] if self.spot else [])]

  def ssh(self, command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._common(), f"--worker={worker}",
            f"--command={command}"]

  def setup(self, local_repo: str = ".") -> list[list[str]]:
    """Copies this checkout to every worker and installs it with the `tpu` extra."""
    copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", local_repo,
            f"{self.name}:{self.repo_dir}", *self._common(), "--worker=all"]
    install = (f"cd {self.repo_dir} && python3 -m pip install -q -e '.[tpu]' "
               "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
    return [copy, self.ssh(install)]

  def run_foreground(self, args: Sequence[str]) -> list[list[str]]:
    """Runs `python -m <args>` on every worker and waits for it (sweeps run one after another)."""
    inner = " ".join(shlex.quote(a) for a in ["python3", "-m", *args])
    return [self.ssh(f"cd {self.repo_dir} && {inner}")]

  def run(self, args: Sequence[str], log_name: str = "groupvit") -> list[list[str]]:
    """Starts `python -m <args>` on every worker, detached (survives the ssh connection), logging to a file."""
    inner = " ".join(shlex.quote(a) for a in ["python3", "-m", *args])
    log = f"{self.log_dir}/{log_name}.log"
    command = (f"mkdir -p {self.log_dir} && cd {self.repo_dir} && "
               f"setsid nohup bash -c {shlex.quote(inner + f' >> {log} 2>&1')} > /dev/null 2>&1 &")
    return [self.ssh(command)]

  def logs(self, log_name: str = "groupvit", worker: str = "0", lines: int = 100) -> list[list[str]]:
    return [self.ssh(f"tail -n {lines} -f {self.log_dir}/{log_name}.log", worker=worker)]

  def stop(self) -> list[list[str]]:
    """SIGTERM to the trainer on every worker: it checkpoints at an agreed step and exits."""
    return [self.ssh("pkill -TERM -f 'python3 -m groupvit_jax' || true")]

  def delete(self) -> list[list[str]]:
    if self.queued:
      return [["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._common(), "--force",
               "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._common(), "--quiet"]]


def execute(commands: list[list[str]], dry_run: bool) -> int:
  """Prints each command (shell-quoted), then runs it unless `dry_run`; stops at the first failure."""
  for cmd in commands:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if not dry_run:
      rc = subprocess.call(cmd)
      if rc:
        return rc
  return 0


def main(argv=None) -> int:
  p = launch.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("action", choices=["create", "setup", "run", "logs", "stop", "delete"])
  p.add_argument("--name", default=os.environ.get("TPU_NAME"))
  p.add_argument("--zone", default=os.environ.get("TPU_ZONE"))
  p.add_argument("--accelerator_type", default=os.environ.get("TPU_TYPE", "v4-32"))
  p.add_argument("--runtime_version", default=os.environ.get("TPU_RUNTIME", "tpu-ubuntu2204-base"))
  p.add_argument("--project", default=os.environ.get("GCP_PROJECT", ""))
  p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  p.add_argument("--queued", action="store_true", help="use a queued resource")
  p.add_argument("--log_name", default="groupvit", help="name of the run's log file")
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
      "run": lambda: tpu.run(command, a.log_name),
      "logs": lambda: tpu.logs(a.log_name),
      "stop": tpu.stop,
      "delete": tpu.delete,
  }[a.action]()
  return execute(commands, a.dry_run)


if __name__ == "__main__":
  sys.exit(main())
