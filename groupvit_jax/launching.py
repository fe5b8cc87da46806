"""Launching: Cloud TPU VM command lines, a local multi-process launcher, and sweep expansion.

The scripts in launch/ are thin wrappers around these functions. Every gcloud command is built here
as a list of arguments, printed before it runs, and only printed with `dry_run`.
"""

import dataclasses
import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Sequence

# The memory allocator for CPU runs. XLA:CPU allocates each step's buffers afresh, and glibc malloc
# hands the large ones out as new mmaps that the kernel faults in and zeroes on every step (demo
# config, batch 64: ~58,000 page faults and ~150 ms of kernel time per 230 ms step). Two remedies,
# both read only at process start, so they go in the environment (the Makefile exports them,
# launch_local passes them on):
# - jemalloc with page purging off keeps freed pages mapped for the next step: no faults and ~1-8 ms
#   of kernel time per step (README, Benchmarks: demo bf16 b64 ~106 -> ~85 ms, GroupViT-S bf16 b8
#   1.11 -> 1.05 s; max RSS +0.3 GiB and +1.5 GiB, the freed pages it keeps). Used where installed
#   (Debian/Ubuntu: apt install libjemalloc2). oversize_threshold:0 serves blocks over 8 MiB from the
#   same arenas, which keep them too: without it PyTorch's float32 GroupViT-S step (the benchmark's
#   reference, same process) still took 63,000-105,000 faults per step, and the benchmark's peak RSS
#   is ~2 GiB lower with it.
# - glibc's transparent huge pages for malloc's mmaps: still ~500 faults (2 MiB each) and ~30 ms of
#   kernel time per demo step, but nothing to install (glibc versions without the tunable ignore it).
CPU_MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0"


def find_jemalloc() -> str | None:
  """jemalloc's shared library as the dynamic loader finds it (its soname), or None where not installed."""
  import ctypes.util  # pylint: disable=g-import-not-at-top
  return ctypes.util.find_library("jemalloc")


def malloc_in_use(maps: str = "/proc/self/maps") -> str:
  """'jemalloc' or 'tcmalloc' where this process has one loaded (LD_PRELOAD), else 'glibc'."""
  try:
    with open(maps) as f:
      libs = {line.rsplit("/", 1)[-1] for line in f if ".so" in line}
  except OSError:
    return "glibc"
  return next((name for name in ("jemalloc", "tcmalloc") if any(name in lib for lib in libs)), "glibc")


def cpu_malloc_env(environ: dict[str, str] | None = None, jemalloc: str | None = "find") -> dict[str, str]:
  """The variables to add to `environ` (default os.environ) so that a child process's CPU steps run on
  jemalloc without page purging where `jemalloc` (default: find_jemalloc()) is installed, and with glibc's
  huge-page tunable either way; variables already set are left as they are."""
  environ = os.environ if environ is None else environ
  jemalloc = find_jemalloc() if jemalloc == "find" else jemalloc
  env = {}
  if "GLIBC_TUNABLES" not in environ:
    env["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES
  preload = environ.get("LD_PRELOAD", "")
  if jemalloc and "jemalloc" not in preload and "tcmalloc" not in preload:
    env["LD_PRELOAD"] = preload = f"{preload} {jemalloc}".strip()
  if "jemalloc" in preload and "MALLOC_CONF" not in environ:
    env["MALLOC_CONF"] = JEMALLOC_CONF
  return env


def cpu_malloc_hint(allocator: str | None = None, jemalloc: str | None = "find") -> str | None:
  """A one-line hint when this process (or `allocator`) runs on glibc malloc without the settings above,
  else None."""
  allocator = allocator or malloc_in_use()
  if allocator == "jemalloc" and "dirty_decay_ms" not in os.environ.get("MALLOC_CONF", ""):
    return (f"jemalloc purges freed pages by default, which CPU steps then fault in again: "
            f"MALLOC_CONF={JEMALLOC_CONF} (README, Benchmarks)")
  if not sys.platform.startswith("linux") or allocator != "glibc":
    return None
  jemalloc = find_jemalloc() if jemalloc == "find" else jemalloc
  if jemalloc:
    return (f"CPU steps run ~5-30 % faster on jemalloc, which is installed: LD_PRELOAD={jemalloc} "
            f"MALLOC_CONF={JEMALLOC_CONF} (the Makefile and launch/local.py set it; README, Benchmarks)")
  if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    return (f"GLIBC_TUNABLES is not set to {CPU_MALLOC_TUNABLES}: CPU steps spend up to a third of their "
            f"time in page faults (export GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}, or install libjemalloc2; "
            "see README, Benchmarks)")
  return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
  """The CPU's feature flags as Linux lists them (empty where it does not)."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cpu_bf16_hint(dtype: str, flags: set[str] | None = None) -> str | None:
  """A one-line hint when a CPU run computes in bfloat16 on a CPU without native bf16 products
  (AVX512-BF16 or AMX-BF16 in `flags`, default this machine's), where float32 is faster; else None."""
  if str(dtype) != "bfloat16":
    return None
  flags = cpu_flags() if flags is None else flags
  if flags & {"avx512_bf16", "amx_bf16"}:
    # Measured on an AVX512-BF16 CPU (benchmarks/HISTORY.md, session 14), bf16 vs float32 train steps:
    # GroupViT-S b8 7.1 vs 4.2 images/s, demo b64 618 vs 562, tiny b16 1,130 vs 1,174.
    return None
  return ("model.dtype is bfloat16 on a CPU without AVX512-BF16/AMX-BF16, where XLA runs bf16 products "
          "upcast to float32 and training is slower than in float32 (README, Benchmarks); pass "
          "--config.model.dtype=float32")


# ---------------------------------------------------------------------------------------------------
# Cloud TPU VMs.
# ---------------------------------------------------------------------------------------------------


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

  def run(self, args: Sequence[str], session: str = "groupvit") -> list[list[str]]:
    """Starts `python -m <args>` on every worker, detached (survives the ssh session), logging to a file."""
    inner = " ".join(shlex.quote(a) for a in ["python3", "-m", *args])
    log = f"{self.log_dir}/{session}.log"
    command = (f"mkdir -p {self.log_dir} && cd {self.repo_dir} && "
               f"setsid nohup bash -c {shlex.quote(inner + f' >> {log} 2>&1')} > /dev/null 2>&1 &")
    return [self.ssh(command)]

  def logs(self, session: str = "groupvit", worker: str = "0", lines: int = 100) -> list[list[str]]:
    return [self.ssh(f"tail -n {lines} -f {self.log_dir}/{session}.log", worker=worker)]

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


# ---------------------------------------------------------------------------------------------------
# Local multi-process runs (debugging multi-host code without a pod; used by the tests).
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Sweeps.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]
  workdir: str
  config: Any


def _load_module(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"sweep file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_groupvit_sweep", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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
  from groupvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  sweep = _load_module(sweep_path).get_sweep()
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
