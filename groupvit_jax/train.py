"""The GroupViT trainer: sharded multi-label contrastive training that survives preemption.

  python -m groupvit_jax.train --config=configs/tiny.py --workdir=/tmp/gvj_tiny [--config.total_steps=100]

Several processes (a TPU pod slice, GPU nodes, or localhost for debugging) run the same command; on
Cloud TPU `jax.distributed.initialize()` finds its peers by itself, elsewhere pass --coordinator_address,
--num_processes and --process_id (or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
Re-running the command with the same --workdir resumes from the latest checkpoint.
"""

import json
import os
import signal
import time
from typing import Callable

from groupvit_jax import cli  # first: TensorFlow imported with its native start-up lines silenced

from absl import app, flags, logging
from clu import metric_writers, periodic_actions
import flax.linen as nn
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from groupvit_jax import checkpoint as checkpoint_lib
from groupvit_jax import config_lib, cpu_env, evaluators, input_pipeline, optim, sharding
from groupvit_jax.datasets import sources
from groupvit_jax.models import build_model
from groupvit_jax.train_state import init_sharded_state, make_train_step


# ---------------------------------------------------------------------------------------------------
# Reporting and safety.
# ---------------------------------------------------------------------------------------------------


class MetricsLog:
  """TensorBoard/console via clu, plus `metrics.jsonl` (one line per logged step) on process 0."""

  def __init__(self, workdir: str, resumed_step: int = 0):
    """`resumed_step`: the step this run starts from (0 when no checkpoint had finished); rows an
    interrupted run logged after it are dropped, so every step appears once (TensorBoard drops them
    itself when the step goes back)."""
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.primary, asynchronous=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if self.primary and os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip() and _row_step(line) is not None and _row_step(line) <= resumed_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(rows)
      os.replace(tmp, self.path)  # atomic: a crash here leaves the old file or the new one

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self.writer.write_scalars(step, scalars)
    if self.primary:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

  def close(self):
    self.writer.flush()
    self.writer.close()


def _row_step(line: str) -> int | None:
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None  # a line cut by a crash


def check_finite(step: int, metrics: dict[str, float], last_good: int | None) -> None:
  """Stops the run on NaN/Inf, naming the step and the metric."""
  for name, value in metrics.items():
    if not np.isfinite(value):
      raise FloatingPointError(f"step {step}: {name} is {value}; stopping. The last good checkpoint is "
                               f"step {last_good} (non-finite states are never saved).")


class CollapseWatch:
  """Warns when a grouping stage's groups in use fall to about one per image (the grouping collapsed),
  once until it recovers."""

  def __init__(self, threshold: float = 1.1):
    self.threshold = threshold
    self.collapsed: set[str] = set()

  def check(self, step: int, scalars: dict[str, float]) -> None:
    for name, value in scalars.items():
      if not (name.startswith("grouping/") and name.endswith("_groups")):
        continue
      if value < self.threshold and name not in self.collapsed:
        self.collapsed.add(name)
        stage = name.removeprefix("grouping/").removesuffix("_groups")
        logging.warning("step %d: %s uses %.2f groups per image: its grouping has collapsed (every patch in "
                        "one group)", step, stage, value)
      elif value >= self.threshold:
        self.collapsed.discard(name)


class Preemption:
  """Notices SIGTERM (what a TPU/GPU scheduler sends before preemption)."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host must stop at the same step: the distributed runtime agrees on one.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested


# ---------------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None,
                       devices: list[jax.Device] | None = None,
                       progress: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds checkpoints); returns the last logged metrics.

  `devices` restricts the mesh to a subset of the devices (tests compare 1 and 8 devices).
  `progress(step, scalars)` is called with every logged row (the demo prints it).
  Logged rows carry `train_seconds`: this run's wall time so far, evaluations excluded.
  """
  devices = devices or jax.devices()
  mesh = sharding.make_mesh(config.mesh, devices)
  config_lib.validate(config, dict(mesh.shape), jax.process_count())
  total_steps = config_lib.steps(config, "total")
  warmup_steps = config_lib.steps(config, "warmup")
  batch_size = config.input.batch_size
  host_batch = batch_size // jax.process_count()
  logging.info("mesh %s, global batch %d (%d per host), %d steps", dict(mesh.shape), batch_size, host_batch,
               total_steps)

  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config, total_steps, warmup_steps, batch_size)
  base_rng = jax.random.key(config.seed)
  rules = sharding.LOGICAL_RULES
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = init_sharded_state(model, tx, config, mesh, jax.random.fold_in(base_rng, 2**31 - 1))  # init key, apart from step keys
  ckpt = checkpoint_lib.TrainCheckpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                          config.keep_checkpoints)
  positions = [0] * jax.process_count()
  counters = [{}] * jax.process_count()
  restored = ckpt.restore_latest_readable(jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings))
  if restored is not None:
    state, data = restored
    positions = data["positions"]
    counters = data.get("counters", counters)
    logging.info("resumed from step %d (data positions %s)", int(state.step), positions)
    if progress:
      print(f"resumed from step {int(state.step)}", flush=True)
  elif config.init_from:
    variables = checkpoint_lib.load_variables(config.init_from, {"params": state.params,
                                                                 "batch_stats": state.batch_stats})
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    logging.info("initialised from %s", config.init_from)
  elif config.get("init_text_from"):
    text = checkpoint_lib.load_text_tower(config.init_text_from, state.params)
    state = state.replace(params={**state.params, **text})
    logging.info("text tower from %s", config.init_text_from)
  start_step = int(state.step)

  if jax.process_index() == 0:
    sources.prepare(config.input.data)  # generated datasets (the shapes world) are made once ...
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("data prepared")  # ... before any host reads them.
  tokenizer = input_pipeline.get_tokenizer(config)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"tokenizer {config.input.tokenizer!r} has {tokenizer.vocab_size} ids but "
                     f"model.text.vocab_size is {config.model.text.vocab_size}")
  ds = input_pipeline.build_train_dataset(config.input, tokenizer=tokenizer, seed=config.seed, batch_size=host_batch,
                                          start_index=positions[jax.process_index()],
                                          process_index=jax.process_index(), process_count=jax.process_count())
  data_it = input_pipeline.DataIterator(ds, start_index=positions[jax.process_index()],
                                        **counters[jax.process_index()])

  # One sharding for every batch array, whatever its rank (text [B, L] or [B, 1 + K, L], prompts): the
  # leading axis over (data, fsdp), the trailing axes a partition spec leaves out are replicated.
  batch_shardings = sharding.batch_sharding(mesh, 1)
  label_tokens = None
  if config.model.get("name") == "lseg":  # mask training: every pixel scored against the label names
    label_tokens = np.asarray(tokenizer(list(config.labels), config.input.context_length))
  step_fn = make_train_step(model, tx, schedule, config, base_rng, label_tokens)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(step_fn, donate_argnums=0, in_shardings=(shardings, batch_shardings),
                         out_shardings=(shardings, None))

  log = MetricsLog(workdir, resumed_step=start_step)
  evals = evaluators.build(config.evals, model=model, config=config, workdir=workdir)
  preemption = Preemption()
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=log.writer)
  last_good = ckpt.latest_step()
  pending, last_logged = None, {}
  end = min(total_steps, stop_after) if stop_after else total_steps

  def data_state():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    # Every host's position and running counters (a resumed run continues both).
    mine = np.asarray([data_it.position, *data_it.running_totals().values()], np.int64)
    rows = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, mine.size)
    names = list(data_it.running_totals())
    return {"positions": [int(r[0]) for r in rows],
            "counters": [{n: int(v) for n, v in zip(names, r[1:])} for r in rows]}

  def finish(step_metrics, step, counters):
    nonlocal last_logged
    scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    check_finite(step, scalars, last_good)
    if step % config.log_every == 0 or step == end:
      scalars.update(counters)
      scalars["examples_per_sec"] = batch_size * timer.rate()
      scalars["train_seconds"] = train_seconds()
      log.write(step, scalars)
      collapse.check(step, scalars)
      last_logged = scalars
      if progress:
        progress(step, scalars)

  eval_seconds = 0.0
  run_start = time.perf_counter()

  def train_seconds():
    return time.perf_counter() - run_start - eval_seconds

  def run_evals(step):
    nonlocal eval_seconds
    t = time.perf_counter()
    scalars = evals.run(state, step)
    images = evals.images()
    if images:
      log.writer.write_images(step, images)
    eval_seconds += time.perf_counter() - t
    scalars["train_seconds"] = train_seconds()
    log.write(step, scalars)
    if progress:
      progress(step, scalars)

  timer = _Rate()
  collapse = CollapseWatch()
  step = start_step
  evaluated = False
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      while step < end:
        batch = sharding.host_batch_to_global(next(data_it), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        timer.tick()
        report(step)
        # Metrics of the previous step are read now, so the host never waits on the device in between.
        if pending is not None:
          finish(*pending)
        pending = (metrics, step, data_it.counters())  # counters as of this step's batch
        stopping = preemption.reached(step) or step == end
        if stopping or step % config.checkpoint_every == 0:
          finish(*pending)  # a state is saved only after its step's metrics proved finite
          pending = None
          if ckpt.save(step, state, data_state(), force=stopping):
            last_good = step
        evaluated = False
        if evals and config.eval_every and step % config.eval_every == 0:
          if pending is not None:
            finish(*pending)
            pending = None
          run_evals(step)
          evaluated = True
        if preemption.requested and step < end:
          logging.warning("SIGTERM: saved step %d, stopping", step)
          break
      if pending is not None:
        finish(*pending)
      if step >= total_steps and evals and not evaluated:
        run_evals(step)
  finally:
    # Also on errors (NaN): finish writing what was saved, flush the logs.
    ckpt.close()
    log.close()
  return last_logged


class _Rate:
  """Steps per second over the last logging window."""

  def __init__(self):
    self.times = []

  def tick(self):
    self.times = (self.times + [time.perf_counter()])[-20:]

  def rate(self) -> float:
    if len(self.times) < 2:
      return 0.0
    return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize for multi-process runs (flags/env, or Cloud TPU's own discovery)."""
  f = flags.FLAGS
  if f.coordinator_address and f.num_processes and f.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                               process_id=f.process_id)
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  if flags.FLAGS.config is None:
    raise app.UsageError("--config is required")
  config_lib.resolve_data(flags.FLAGS.config)
  sources.check(flags.FLAGS.config.input.data)
  maybe_initialize_distributed()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # tf.data only; keep accelerators for JAX.
  workdir = flags.FLAGS.workdir
  tf.io.gfile.makedirs(workdir)
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
      f.write(flags.FLAGS.config.to_json_best_effort(indent=2))
  if jax.process_count() > 1:  # each host says it joined
    print(f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local / "
          f"{jax.device_count()} global devices", flush=True)
  if jax.default_backend() == "cpu":
    model_config = flags.FLAGS.config.model
    for hint in (cpu_env.cpu_malloc_hint(), cpu_env.cpu_bf16_hint(model_config.dtype),
                 cpu_env.cpu_kernels_hint(model_config.dtype, model_config.get("kernels", "xla"))):
      if hint:
        logging.info(hint)
  config = flags.FLAGS.config
  show = progress_printer(config_lib.steps(config, "total"), config.input.batch_size)
  last = train_and_evaluate(config, workdir, flags.FLAGS.stop_after,
                            progress=show if jax.process_index() == 0 else None)
  if jax.process_index() == 0 and last:
    print(f"done: {workdir} (metrics.jsonl, checkpoints/)", flush=True)


def progress_printer(total_steps: int, batch_size: int) -> Callable[[int, dict[str, float]], None]:
  """The command line's progress: one line per logged step (loss, rate, skipped data) and per evaluation."""
  def show(step: int, scalars: dict[str, float]):
    if "loss" in scalars:
      rate = scalars.get("examples_per_sec", 0.0) / batch_size
      skipped = int(scalars.get("data/skipped_examples", 0))
      extra = f"  skipped examples {skipped}" if skipped else ""
      print(f"step {step}/{total_steps}  loss {scalars['loss']:.4f}  {rate:.1f} steps/s{extra}", flush=True)
    else:
      shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(scalars.items()) if k != "train_seconds")
      print(f"step {step}  {shown}", flush=True)
  return show


def _define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).", lock_config=False)
  flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and metrics.jsonl go.")
  flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                      "host:port of process 0, for multi-process runs outside Cloud TPU.")
  flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None, "Processes in all.")
  flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "-1")), "This process's id.")
  flags.DEFINE_integer("stop_after", None, "Stop (with a checkpoint) after this step; for tests and debugging.")
  flags.mark_flags_as_required(["config", "workdir"])


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
