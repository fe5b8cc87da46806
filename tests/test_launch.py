"""Launch scripts: recorded gcloud dry runs, sweep expansion and its errors (the local launcher is
exercised by tests/test_train.py::test_two_processes_on_localhost_train)."""

import json
import os
import subprocess
import sys

import pytest

from groupvit_jax import cpu_env
from launch import sweep as sweep_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--name=gvj", "--zone=us-west4-a", "--project=my-proj", "--accelerator_type=v5litepod-64",
          "--runtime_version=v2-alpha-tpuv5-lite", "--spot", "--dry_run"]


def _script(name, *args):
  res = subprocess.run([sys.executable, "-m", f"launch.{name}", *args], capture_output=True,
                       text=True, cwd=REPO, check=False, env=dict(os.environ, PATH="/nonexistent"))
  return res.returncode, res.stdout, res.stderr


def test_tpu_dry_run_prints_the_recorded_gcloud_commands():
  got = []
  for action, extra in [("create", []), ("setup", []),
                        ("run", ["--", "groupvit_jax.train", "--config=configs/groupvit_s.py",
                                 "--workdir=gs://bucket/runs/s", "--config.input.batch_size=4096"]),
                        ("logs", []), ("stop", []), ("delete", []),
                        ("create", ["--queued"]), ("delete", ["--queued"])]:
    flags = [f for f in extra if f.startswith("--q")]
    rest = [f for f in extra if not f.startswith("--q")]
    rc, out, err = _script("tpu_vm", action, *COMMON, *flags, *rest)
    assert rc == 0, err  # PATH has no gcloud: a dry run must not try to run it
    got += out.replace(REPO, "REPO").strip().splitlines()
  with open(os.path.join(REPO, "tests", "data", "tpu_dry_run.txt")) as f:
    assert got == f.read().strip().splitlines()


def test_tpu_run_without_a_command_is_an_error():
  rc, _, err = _script("tpu_vm", "run", "--name=x", "--zone=z", "--dry_run")
  assert rc == 2 and "run needs a command after --" in err


def _write_sweep(path, body):
  path.write_text(f"def get_sweep():\n  return {body!r}\n")
  return str(path)


def test_sweep_expansion_is_deterministic_with_named_workdirs(tmp_path):
  sweep = _write_sweep(tmp_path / "lr.py", {
      "base": "configs/tiny.py", "fixed": {"total_steps": 7},
      "product": {"optim.lr": [1e-3, 2e-3], "loss.multi_label_weight": [0.0, 1.0]},
      "zip": {"seed": [0, 1], "optim.warmup_lr": [1e-6, 2e-6]}})
  runs = sweep_lib.expand_sweep(sweep, "/root/sw")
  assert [r.name for r in runs] == sweep_names()
  assert runs[0].workdir == "/root/sw/lr/000_optim.lr=0.001,loss.multi_label_weight=0.0,seed=0,optim.warmup_lr=1e-06"
  assert [r.config.optim.lr for r in runs] == [1e-3] * 4 + [2e-3] * 4
  assert all(r.config.total_steps == 7 for r in runs)
  assert [r.config.seed for r in runs] == [0, 1] * 4
  assert [r.name for r in sweep_lib.expand_sweep(sweep, "/root/sw")] == [r.name for r in runs]
  args = sweep_lib.run_command("configs/tiny.py", runs[3])
  assert args[:3] == ["groupvit_jax.train", "--config=configs/tiny.py", f"--workdir={runs[3].workdir}"]
  assert "--config.optim.lr=0.001" in args and "--config.seed=1" in args


def sweep_names():
  names = []
  for lr in ("0.001", "0.002"):
    for w in ("0.0", "1.0"):
      for seed, wl in (("0", "1e-06"), ("1", "2e-06")):
        names.append(f"optim.lr={lr},loss.multi_label_weight={w},seed={seed},optim.warmup_lr={wl}")
  return names


def test_sweep_writes_resolved_configs_and_runs_locally(tmp_path, shapes_data_dir):
  sweep = _write_sweep(tmp_path / "two.py", {
      "base": f"configs/demo.py:world=codedtiny32,dim=16,recon=0,data_dir={shapes_data_dir}",
      "fixed": {"total_steps": 1, "warmup_steps": 0, "checkpoint_every": 1},
      "product": {"optim.lr": [1e-3, 2e-3]}})
  rc, out, err = _script("sweep", f"--sweep={sweep}", f"--workdir_root={tmp_path / 'runs'}", "--mode=local")
  assert rc == 0, err[-3000:]
  assert "2 runs from" in out
  for i, lr in enumerate((1e-3, 2e-3)):
    workdir = tmp_path / "runs" / "two" / f"{i:03d}_optim.lr={lr}"
    resolved = json.loads((workdir / "resolved_config.json").read_text())
    assert resolved["optim"]["lr"] == lr and resolved["total_steps"] == 1
    assert (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize("body, message", [
    ({"base": "configs/tiny.py", "product": {"optim.lrr": [1e-3]}}, "'optim.lrr' is not in the base config"),
    ({"base": "configs/tiny.py", "product": {"nope.lr": [1e-3]}}, "'nope' is not in the base config"),
    ({"base": "configs/tiny.py", "product": {"optim.lr": []}}, "the sweep is empty"),
    ({"base": "configs/tiny.py"}, "the sweep is empty"),
    ({"base": "configs/tiny.py", "zip": {"seed": [0, 1], "optim.lr": [1e-3]}}, "zip lists differ in length"),
])
def test_bad_sweeps_fail_before_anything_launches(body, message, tmp_path):
  sweep = _write_sweep(tmp_path / "bad.py", body)
  rc, out, err = _script("sweep", f"--sweep={sweep}", f"--workdir_root={tmp_path / 'runs'}", "--mode=local")
  assert rc == 2 and message in err, err
  assert not (tmp_path / "runs").exists()


def test_cpu_malloc_hint_names_jemalloc_or_the_tunable_until_they_are_set(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("MALLOC_CONF", raising=False)
  if not sys.platform.startswith("linux"):
    assert cpu_env.cpu_malloc_hint("glibc", jemalloc=None) is None
    return
  assert cpu_env.CPU_MALLOC_TUNABLES in cpu_env.cpu_malloc_hint("glibc", jemalloc=None)
  assert "LD_PRELOAD=libjemalloc.so.2 " in cpu_env.cpu_malloc_hint("glibc", jemalloc="libjemalloc.so.2")
  assert cpu_env.JEMALLOC_CONF in cpu_env.cpu_malloc_hint("jemalloc")
  assert cpu_env.cpu_malloc_hint("tcmalloc") is None
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2:" + cpu_env.CPU_MALLOC_TUNABLES)
  assert cpu_env.cpu_malloc_hint("glibc", jemalloc=None) is None
  monkeypatch.setenv("MALLOC_CONF", "background_thread:true," + cpu_env.JEMALLOC_CONF)
  assert cpu_env.cpu_malloc_hint("jemalloc") is None


def test_cpu_malloc_env_adds_jemalloc_and_keeps_what_is_set():
  lib = "libjemalloc.so.2"
  assert cpu_env.cpu_malloc_env({}, jemalloc=lib) == {
      "GLIBC_TUNABLES": cpu_env.CPU_MALLOC_TUNABLES, "LD_PRELOAD": lib, "MALLOC_CONF": cpu_env.JEMALLOC_CONF}
  assert cpu_env.cpu_malloc_env({"LD_PRELOAD": "libfoo.so", "MALLOC_CONF": "narenas:2", "GLIBC_TUNABLES": "x"},
                                  jemalloc=lib) == {"LD_PRELOAD": "libfoo.so " + lib}
  assert cpu_env.cpu_malloc_env({"LD_PRELOAD": "/opt/libtcmalloc.so"}, jemalloc=lib) == {
      "GLIBC_TUNABLES": cpu_env.CPU_MALLOC_TUNABLES}
  assert cpu_env.cpu_malloc_env({"LD_PRELOAD": "/opt/libjemalloc.so"}, jemalloc=None) == {
      "GLIBC_TUNABLES": cpu_env.CPU_MALLOC_TUNABLES, "MALLOC_CONF": cpu_env.JEMALLOC_CONF}
  assert cpu_env.cpu_malloc_env({"GLIBC_TUNABLES": "x"}, jemalloc=None) == {}


def test_malloc_in_use_reads_the_process_maps(tmp_path):
  maps = tmp_path / "maps"
  maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n7f02-7f03 r--p 0 00:00 0 [heap]\n")
  assert cpu_env.malloc_in_use(str(maps)) == "glibc"
  maps.write_text(maps.read_text() + "7f04-7f05 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
  assert cpu_env.malloc_in_use(str(maps)) == "jemalloc"
  assert cpu_env.malloc_in_use(str(tmp_path / "missing")) == "glibc"
  # A child started with cpu_malloc_env runs on jemalloc exactly where this machine has it installed.
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  env.update(cpu_env.cpu_malloc_env(env))
  out = subprocess.run([sys.executable, "-c", "from groupvit_jax import cpu_env; print(cpu_env.malloc_in_use())"],
                       env=env, capture_output=True, text=True, check=True).stdout.split()
  expected = "jemalloc" if cpu_env.find_jemalloc() and sys.platform.startswith("linux") else "glibc"
  assert out == [expected], out


def test_cpu_bf16_hint_points_cpus_without_native_bf16_to_float32(tmp_path):
  assert "--config.model.dtype=float32" in cpu_env.cpu_bf16_hint("bfloat16", {"avx2", "fma", "avx512f"})
  assert cpu_env.cpu_bf16_hint("bfloat16", {"avx512f", "avx512_bf16"}) is None
  assert cpu_env.cpu_bf16_hint("float32", set()) is None
  # Where bf16 products are native, the plain kernels get a pointer to the CPU ones.
  assert "--config.model.kernels=cpu" in cpu_env.cpu_kernels_hint("bfloat16", "xla", {"amx_bf16"})
  assert cpu_env.cpu_kernels_hint("bfloat16", "cpu", {"amx_bf16"}) is None
  assert cpu_env.cpu_kernels_hint("bfloat16", "xla", {"avx2"}) is None
  assert cpu_env.cpu_kernels_hint("float32", "xla", {"amx_bf16"}) is None
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n")
  assert cpu_env.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "avx512_bf16"}
  assert cpu_env.cpu_flags(str(tmp_path / "missing")) == set()
