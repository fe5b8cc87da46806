"""Test-wide settings: fp32 matmuls at full precision (parity), 8 host devices for mesh tests, one JIT cache."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One persistent compilation cache for the whole run: the pytest process creates it, and the xdist workers
# and every training subprocess they start inherit it, so the tiny config's train step, compiled once,
# is reused by the resume, sweep and launcher runs (a 1-step run: 45 s -> 17 s). Removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="groupvit_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_default_matmul_precision", "highest")

import filelock  # pylint: disable=g-import-not-at-top,g-bad-import-order
import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """One prepared copy of the tiny shapes worlds (standard and coded), shared by all test workers."""
  root = tmp_path_factory.getbasetemp().parent / "shared_tfds"
  root.mkdir(exist_ok=True)
  with filelock.FileLock(str(root) + ".lock"):
    from groupvit_jax.datasets import sources  # pylint: disable=g-import-not-at-top
    sources.prepare([{"kind": "shapes", "config": name, "data_dir": str(root)} for name in ("tiny32", "codedtiny32")])
  return str(root)
