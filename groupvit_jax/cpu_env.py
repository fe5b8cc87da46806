"""CPU runs: the memory allocator settings XLA:CPU steps want, and one-line hints when they are missing.

The trainer logs the hints; the Makefile and launch/local.py put the settings in the environment.
"""

import os
import sys

# The memory allocator for CPU runs. XLA:CPU allocates each step's buffers afresh, and glibc malloc
# hands the large ones out as new mmaps that the kernel faults in and zeroes on every step (demo
# config, batch 64: ~58,000 page faults and ~150 ms of kernel time per 230 ms step). Two remedies,
# both read only at process start, so they go in the environment (the Makefile exports them,
# launch/local.py passes them on):
# - jemalloc with page purging off keeps freed pages mapped for the next step: no faults and ~1-8 ms
#   of kernel time per step (README, Benchmarks: demo bf16 b64 ~106 -> ~85 ms, GroupViT-S bf16 b8
#   1.11 -> 1.05 s; max RSS +0.3 GiB and +1.5 GiB, the freed pages it keeps). Used where installed
#   (Debian/Ubuntu: apt install libjemalloc2). oversize_threshold:0 serves blocks over 8 MiB from the
#   same arenas, which keep them too: without it PyTorch's float32 GroupViT-S step (the benchmark's
#   reference, same process) still took 63,000-105,000 faults per step, and the benchmark's peak RSS
#   is ~2 GiB lower with it.
# - glibc's transparent huge pages for malloc's mmaps: still ~500 faults (2 MiB each) and ~30 ms of
#   kernel time per demo step, but nothing to install (glibc versions without the tunable ignore it).
# The two settings live in cpu_allocator.env (KEY=value lines), which the Makefile includes as it is.
_SETTINGS = dict(line.strip().split("=", 1) for line in
                 open(os.path.join(os.path.dirname(__file__), "cpu_allocator.env"), encoding="utf-8")
                 if "=" in line and not line.lstrip().startswith("#"))
CPU_MALLOC_TUNABLES = _SETTINGS["CPU_MALLOC_TUNABLES"]
JEMALLOC_CONF = _SETTINGS["JEMALLOC_CONF"]


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
    # Measured on an AVX512-BF16 CPU (AMD Zen 4), bf16 vs float32 train steps:
    # GroupViT-S b8 7.1 vs 4.2 images/s, demo b64 618 vs 562, tiny b16 1,130 vs 1,174.
    return None
  return ("model.dtype is bfloat16 on a CPU without AVX512-BF16/AMX-BF16, where XLA runs bf16 products "
          "upcast to float32 and training is slower than in float32 (README, Benchmarks); pass "
          "--config.model.dtype=float32")


def cpu_kernels_hint(dtype: str, kernels: str, flags: set[str] | None = None) -> str | None:
  """A one-line hint when a CPU run computes in bfloat16 on a CPU with native bf16 products but with the
  plain kernels, whose gradients XLA:CPU runs upcast to float32; else None."""
  if str(dtype) != "bfloat16" or kernels == "cpu":
    return None
  flags = cpu_flags() if flags is None else flags
  if not flags & {"avx512_bf16", "amx_bf16"}:
    return None
  return ("model.kernels is 'xla': XLA:CPU runs the bf16 gradients' products upcast to float32; "
          "--config.model.kernels=cpu keeps every product native (GroupViT-S's bf16 step ~1.2x faster)")
