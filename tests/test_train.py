"""The trainer on CPU: learning, mesh equivalence, multi-process, preemption and crash resume, safety."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from groupvit_jax import config_lib, losses, train
from launch import local
from tests import subprocess_util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("examples_per_sec", "steps_per_sec", "train_seconds")


def _config(data_dir, **overrides):
  config = config_lib.load_config(f"configs/tiny.py:data_dir={data_dir}")
  config.log_every = 1
  config.update(overrides)
  return config


def _metrics(workdir):
  """Last logged value of every metric per step (a resumed run re-logs recomputed steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in TIMING})
  return out


def _all_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_same(a, b, steps, rtol=1e-6):
  for step in steps:
    for key, value in a[step].items():
      np.testing.assert_allclose(b[step][key], value, rtol=rtol, atol=1e-7, err_msg=f"step {step} {key}")


def test_tiny_config_learns_on_the_shapes_world(shapes_data_dir, tmp_path):
  from groupvit_jax.datasets import shapes  # pylint: disable=g-import-not-at-top
  voc = shapes.write_voc_layout(str(tmp_path / "voc"), num_images=4, seed=1, image_size=32)
  config = _config(shapes_data_dir, total_steps=60)
  config.evals = {"shapes_voc": {"kind": "segmentation", "dataset": "voc", "data_dir": voc, "crop": 32,
                                 "stride": 16, "short_side": 32, "long_side": 128}}
  train.train_and_evaluate(config, str(tmp_path))
  # The evaluator hook ran at the end and wrote its metrics and pictures.
  evaluated = json.load(open(tmp_path / "eval" / "voc_step60" / "metrics.json"))
  assert 0 <= evaluated["mIoU"] <= 100 and evaluated["images"] == 4
  m = _metrics(str(tmp_path))
  first = np.mean([m[s]["loss"] for s in range(1, 6)])
  last = np.mean([m[s]["loss"] for s in range(56, 61)])
  assert last < first - 1.0, (first, last)
  assert all(np.isfinite(m[s]["grad_norm"]) for s in m)
  assert all(m[s]["data/position"] == 16 * s for s in m)  # counters belong to their own step
  assert os.path.isdir(tmp_path / "checkpoints" / "60")
  # ... and its metrics and first pictures reached metrics.jsonl and TensorBoard.
  assert "shapes_voc/mIoU" in m[60] and "loss" in m[60]
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in tf.io.gfile.glob(str(tmp_path / "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      tags |= {v.tag for v in event.summary.value if event.step == 60}
  assert "shapes_voc/mIoU" in tags
  assert len([t for t in tags if t.startswith("shapes_voc/shapes_1_")]) == 4, sorted(tags)


def test_2x2x2_mesh_matches_one_device(shapes_data_dir, tmp_path):
  # One mesh that splits all three axes (data, fsdp, model) at once: a single 8-device run covers them.
  # Prompts come at their own length (input.prompt_length), so this also covers that batch layout.
  assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"

  def config(**kw):
    c = _config(shapes_data_dir, total_steps=3, checkpoint_every=100, **kw)
    c.input.prompt_length = 12
    return c

  train.train_and_evaluate(config(), str(tmp_path / "one"), devices=jax.devices()[:1])
  one = _metrics(str(tmp_path / "one"))
  assert "data/prompts_cut" in one[3]
  for mesh in ({"data": 2, "fsdp": 2, "model": 2},):
    workdir = str(tmp_path / "_".join(f"{k}{v}" for k, v in mesh.items()))
    train.train_and_evaluate(config(mesh=mesh), workdir)
    eight = _metrics(workdir)
    worst = max(abs(eight[s][k] - one[s][k]) for s in (1, 2, 3) for k in ("loss", "contrastive_loss", "multi_label_loss"))
    print(f"\nmesh {mesh}: max |loss difference| vs one device over 3 steps = {worst:.2e}")
    for step in (1, 2, 3):
      for key in ("loss", "contrastive_loss", "multi_label_loss"):
        # float32 reductions split across devices reassociate: equal to ~1e-6 relative.
        tol = 1e-5 * max(1.0, abs(one[step][key]))
        assert abs(eight[step][key] - one[step][key]) <= tol, (mesh, step, key, eight[step][key], one[step][key])


def _bf16_step_metrics(mesh_config, devices):
  """Metrics of one bf16 train step on a fixed synthetic batch (tiny config, batch 8), compiled with
  bf16 values rounded wherever the program says so."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from groupvit_jax import optim, sharding  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from groupvit_jax.train_state import init_sharded_state, make_train_step  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/tiny.py")
  config.model.dtype = "bfloat16"
  config.model.kernels = "cpu"
  b, ctx, vocab = 8, config.input.context_length, config.model.text.vocab_size
  rng = np.random.RandomState(0)
  text = rng.randint(1, vocab - 2, size=(b, 4, ctx)).astype(np.int32)
  text[:, :, 0], text[:, :, ctx // 2], text[:, :, ctx // 2 + 1:] = vocab - 2, vocab - 1, 0  # SOT ... EOT
  batch = {"image": rng.randn(b, 32, 32, 3).astype(np.float32), "text": text}
  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config, 100, 10, b)
  mesh = sharding.make_mesh(mesh_config, devices)
  batch_sharding = sharding.batch_sharding(mesh, 1)  # as the trainer's, for arrays of any rank
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state, shardings = init_sharded_state(model, tx, config, mesh, jax.random.key(0))
    batch = jax.device_put(batch, batch_sharding)
    step = jax.jit(make_train_step(model, tx, schedule, config, jax.random.key(1)),
                   in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
    compiled = step.lower(state, batch).compile(compiler_options={"xla_allow_excess_precision": False})
    return {k: float(v) for k, v in compiled(state, batch)[1].items()}


def test_bf16_step_on_a_2x2x2_mesh_matches_one_device():
  # The "cpu" kernels run their own products below float32 (cpu_kernels.matmul and the attention core: custom
  # gradients over padded operands), so the float32 test above does not cover them sharded. XLA may
  # keep bf16 values in float32 where it fuses ("excess precision"), differently for each
  # partitioning, and at random init the projectors' BatchNorm magnifies such differences (the noise
  # images' pooled features nearly agree): with it allowed, one device and this mesh read losses 3.8 %
  # and gradient norms 40 % apart. Compiled without it: the same loss, gradient norms 4e-5 apart.
  one = _bf16_step_metrics({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
  eight = _bf16_step_metrics({"data": 2, "fsdp": 2, "model": 2}, jax.devices())
  print("\nbf16 step, 2x2x2 mesh vs one device:",
        {k: f"{(eight[k] - one[k]) / one[k]:+.1e}" for k in ("loss", "multi_label_loss", "grad_norm")})
  for key in ("loss", "contrastive_loss", "multi_label_loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(eight[key], one[key], rtol=3e-3, err_msg=key)


def _train_cmd(data_dir, workdir, *extra, config_arg=""):
  return [sys.executable, "-m", "groupvit_jax.train", f"--config=configs/tiny.py:data_dir={data_dir}{config_arg}",
          f"--workdir={workdir}", "--config.log_every=1", *extra]


def _env(devices=1):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def test_two_processes_on_localhost_train(shapes_data_dir, tmp_path, capfd):
  # Through the local multi-process launcher (launch/local.py), 2 CPU devices per process.
  # A one-stage model (the demo's, narrow): what is under test is the processes' data and device layout.
  args = ["groupvit_jax.train", f"--config=configs/demo.py:world=codedtiny32,dim=16,recon=0,data_dir={shapes_data_dir}",
          f"--workdir={tmp_path / 'run'}", "--config.log_every=1", "--config.total_steps=3",
          "--config.warmup_steps=0", "--config.evals={}"]
  rc = local.launch_local(args, num_processes=2, devices_per_process=2, timeout=1200)
  out = capfd.readouterr().out
  assert rc == 0, out[-3000:]
  assert "process 1/2" in out and "4 global devices" in out
  m = _metrics(str(tmp_path / "run"))
  assert sorted(m) == [1, 2, 3] and all(np.isfinite(m[s]["loss"]) for s in m)


# Prompts at 6 tokens (RESUME_CONFIG) cut some noun prompts: data/prompts_cut grows every step, a running total the
# checkpoint must carry across a resume.
RESUME_FLAGS = ("--config.total_steps=16", "--config.checkpoint_every=4")
RESUME_CONFIG = ",prompt_length=6"


@pytest.fixture(scope="module")
def uninterrupted(shapes_data_dir, tmp_path_factory):
  # Same process setup as the interrupted runs (one device, default flags), so numbers compare exactly.
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  cmd = _train_cmd(shapes_data_dir, workdir, *RESUME_FLAGS, config_arg=RESUME_CONFIG)
  res = subprocess_util.run(cmd, cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  return _metrics(workdir)


def _run_until(cmd, workdir, step, sig):
  """Starts a training process, sends `sig` once `step` is logged; returns (returncode, output)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 1200
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and any(json.loads(l)["step"] >= step for l in open(path) if l.strip()):
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  else:
    if proc.poll() is None:
      proc.kill()
      raise AssertionError(f"hung: the training run logged no step {step} within 1200 s; its last output:\n"
                           f"{subprocess_util.tail(proc.communicate()[0])}")
  try:
    out = proc.communicate(timeout=1200)[0]
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"hung: the training run did not stop within 1200 s of {sig!r}; its last output:\n"
                         f"{subprocess_util.tail(proc.communicate()[0])}") from None
  return proc.returncode, out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_resume_after_preemption_or_crash_continues_exactly(sig, uninterrupted, shapes_data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  cmd = _train_cmd(shapes_data_dir, workdir, *RESUME_FLAGS, config_arg=RESUME_CONFIG)
  rc, out = _run_until(cmd, workdir, 6, sig)
  stopped = max(r["step"] for r in _all_rows(workdir))
  assert stopped < 16, "the run finished before the signal; cannot test resume"
  if sig == signal.SIGTERM:
    assert rc == 0, out[-3000:]
    assert "SIGTERM: saved step" in out
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  else:
    assert rc == -signal.SIGKILL
  res = subprocess_util.run(cmd, cwd=REPO, env=_env(), timeout=1200)
  assert res.returncode == 0, res.stderr[-3000:]
  resumed = _metrics(workdir)
  assert sorted(resumed) == list(range(1, 17))
  # metrics.jsonl holds each step once: the interrupted run's rows past the restored step are gone.
  assert [row["step"] for row in _all_rows(workdir)] == list(range(1, 17))
  assert uninterrupted[16]["data/prompts_cut"] > uninterrupted[8]["data/prompts_cut"] > 0
  _assert_same(uninterrupted, resumed, range(1, 17))  # the data counters included
  # Every line ever written (recomputed steps after kill -9 included) equals the uninterrupted run.
  for row in _all_rows(workdir):
    for key, value in row.items():
      if key not in TIMING and key != "step":
        np.testing.assert_allclose(value, uninterrupted[row["step"]][key], rtol=1e-6, atol=1e-7)


def test_nan_stops_the_run_naming_step_and_metric(shapes_data_dir, tmp_path):
  config = _config(shapes_data_dir, total_steps=20, checkpoint_every=1)
  config.optim.lr = 1e12
  config.optim.clip_norm = 0.0
  with pytest.raises(FloatingPointError, match=r"step \d+: [a-z_]+ is (nan|inf)"):
    train.train_and_evaluate(config, str(tmp_path))
  # Whatever was saved is finite.
  ckpts = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
  rows = {r["step"]: r for r in _all_rows(str(tmp_path))}
  for step in ckpts:
    assert np.isfinite(rows[step]["loss"]) and np.isfinite(rows[step]["grad_norm"])


@pytest.mark.parametrize("change, message", [
    ({"model.image.image_size": 30}, "not divisible by patch_size"),
    ({"model.image.num_output_groups": (8,)}, "num_output_groups one per grouping stage"),
    ({"model.image.num_group_tokens": (8, 0, 0)}, "every stage but the last needs group tokens"),
    ({"input.batch_size": 12}, "not divisible by the data axes of the mesh"),
    ({"input.context_length": 99}, "exceeds model.text.context_length"),
    ({"input.prompt_length": 99}, r"input.prompt_length 99: expected None or 2..input.context_length \(16\)"),
])
def test_config_errors_stop_at_start(change, message, shapes_data_dir, tmp_path):
  config = _config(shapes_data_dir, total_steps=2, mesh={"data": 8, "fsdp": 1, "model": 1})
  for key, value in change.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_multi_label_targets_are_one_over_k():
  img = np.eye(2, 4, dtype=np.float32)
  prompts = np.stack([np.tile(img[0], (3, 1)), np.tile(img[1], (3, 1))])  # each image's prompts equal it
  loss_match = float(losses.multi_label_loss(img, prompts, 100.0))
  loss_swapped = float(losses.multi_label_loss(img, prompts[::-1], 100.0))
  # Perfectly matching prompts: image side is -log(1/3) (uniform over its own 3), prompt side ~0.
  assert abs(loss_match - 0.5 * np.log(3)) < 1e-3
  assert loss_swapped > loss_match + 10
