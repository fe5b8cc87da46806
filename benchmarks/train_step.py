"""Training-step throughput, ours against HF transformers' GroupViTModel (PyTorch), in one process.

  python -m benchmarks.train_step --config=configs/tiny.py --batch_sizes=16,32 [--dtypes=float32,bfloat16]
  python -m benchmarks.train_step --config=configs/groupvit_s.py --batch_sizes=8 --steps=3

One step = forward of both towers on the image batch and the caption + K prompts per image, the
contrastive and multi-label losses, backward, AdamW update (gradient clipping included). The PyTorch
side runs the same computation with the same dimensions, batch and threads, its AdamW as the fused
kernel (--torch_adamw); the two are timed alternately so machine noise hits both. FLOPs are the
analytic count of the model's matrix products (groupvit_jax/models/flops.py, x3 for forward +
backward); XLA's cost analysis of our compiled step (which also counts elementwise work) is printed
next to it. MFU = achieved analytic FLOP/s over --peak_tflops (or the table below for known
accelerators). Peak host memory is the process's max RSS.
bfloat16 rows: ours computes in bf16 over fp32 parameters (softmaxes in fp32), PyTorch runs the same
step under torch.autocast(device, torch.bfloat16) (matmuls in bf16, softmax and norms in fp32).
On a GPU, PyTorch runs on CUDA too (eager, as the official code) and MFU is against the peak table;
"step MiB" is XLA's memory analysis of our compiled step (arguments + outputs - donated + temporaries),
"torch MiB" PyTorch's peak allocated CUDA memory for the row. --profile_dir traces 3 of our steps per
row (jax.profiler; TensorBoard's profile plugin, or jax.profiler.ProfileData, reads them).

Prompts: with the config's `input.prompt_length` (GroupViT-S: 24) ours encodes the K prompts at that
length and the caption at the context length (the same embeddings, see GroupViT.__call__); PyTorch
runs the official layout, every text at the context length. --prompt_length=0 runs ours that way too.
"""

import contextlib
import functools
import os
import resource
import time

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from groupvit_jax import config_lib, cpu_env, optim, sharding, train_state
from groupvit_jax.models import build_model, flops, random_variables

flags.DEFINE_string("config", "configs/tiny.py", "Model config.")
flags.DEFINE_list("batch_sizes", ["16"], "Global batch sizes.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (PyTorch: bfloat16 = CPU autocast).")
flags.DEFINE_integer("steps", 5, "Timed steps per round.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds (ours then theirs, theirs then ours, ...).")
flags.DEFINE_integer("prompts", 3, "Multi-label prompts per image.")
flags.DEFINE_float("peak_tflops", None, "Device peak for MFU (default: the table for known accelerators; on "
                   "CPU, the measured rate of a 1024^3 product in each dtype).")
flags.DEFINE_bool("torch", True, "Also time HF transformers' GroupViTModel.")
flags.DEFINE_enum("torch_adamw", "fused", ["fused", "default"], "PyTorch's AdamW: its fused kernel (the fastest "
                  "on CPU and GPU) or torch.optim.AdamW's defaults (a loop over the parameters on CPU: GroupViT-S "
                  "~2-3x the fused update's time).")
flags.DEFINE_bool("forward", True, "Also time the eval-mode forward pass (ours vs PyTorch).")
flags.DEFINE_bool("towers", False, "Also time each tower's forward and forward + backward alone (where the "
                  "step's time goes, ours vs PyTorch).")
flags.DEFINE_integer("prompt_length", None, "Ours: prompts at this length (default: the config's "
                     "input.prompt_length; 0: at the context length, in one array with the caption).")
flags.DEFINE_enum("attention", None, ["xla", "cudnn"], "Ours: the image tower's attention implementation "
                  "(default: the config's model.attention; cudnn: NVIDIA GPUs, bf16).")
flags.DEFINE_integer("image_splits", None, "Ours: the image tower on this many independent parts of the batch "
                     "(default: the config's model.image_splits; see GroupViT.image_splits).")
flags.DEFINE_enum("kernels", None, ["xla", "cpu"], "Ours: the products' formulation (default: 'cpu' on a CPU, "
                  "where bf16 products then run natively; the config's model.kernels elsewhere).")
flags.DEFINE_string("profile_dir", None, "Trace 3 of our steps per row into DIR/b<batch>_<dtype>.")
FLAGS = flags.FLAGS

# Dense peak TFLOP/s by device kind (bf16 where it applies).
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0}
# float32 rows on these GPUs: XLA's default precision runs float32 products as TF32 (dense peak).
TF32_PEAKS = {"H100": 494.5, "H200": 494.5, "A100": 156.0}


def measured_peak_tflops(dtype: str, n: int = 1024, reps: int = 20) -> float:
  """Best TFLOP/s of one jitted `[n, n] x [n, n]` product on the default device, operands in `dtype`
  and a float32 result (as our bf16 products run): the practical peak where the table has no entry."""
  x = jnp.asarray(np.random.RandomState(0).randn(n, n), dtype)
  product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  product(x, x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    product(x, x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def load_config():
  """--config, with --attention, --kernels and --image_splits applied."""
  config = config_lib.load_config(FLAGS.config)
  if FLAGS.kernels is not None:
    config.model.kernels = FLAGS.kernels
  elif jax.default_backend() == "cpu":
    config.model.kernels = "cpu"
  if FLAGS.attention is not None:
    config.model.attention = FLAGS.attention
  if FLAGS.image_splits is not None:
    config.model.image_splits = FLAGS.image_splits
  return config


def prompt_length(config):
  """The prompts' length ours encodes them at (None: the context length, with the caption)."""
  n = FLAGS.prompt_length if FLAGS.prompt_length is not None else config.input.get("prompt_length")
  return n or None


def _batch(config, b, k, rng):
  """Images and texts [b, 1 + k, context]: captions of half the context, prompts of up to 10 tokens
  ("a photo of a dog." is 8)."""
  size, ctx, vocab = config.model.image.image_size, config.input.context_length, config.model.text.vocab_size
  images = rng.randn(b, size, size, 3).astype(np.float32)
  text = rng.randint(1, vocab - 2, size=(b, 1 + k, ctx)).astype(np.int32)
  ends = np.full(1 + k, ctx // 2)
  ends[1:] = min(9, ctx // 2)
  for i, end in enumerate(ends):
    text[:, i, 0], text[:, i, end] = vocab - 2, vocab - 1  # SOT ... EOT
    text[:, i, end + 1:] = 0
  return images, text


def _our_inputs(config, text):
  """{"text"} in one array, or {"text", "prompts"} with the prompts at their own length."""
  n = prompt_length(config)
  if n and text.shape[1] > 1:
    return {"text": jnp.asarray(text[:, 0]), "prompts": jnp.asarray(text[:, 1:, :n])}
  return {"text": jnp.asarray(text)}


def compile_ours(config, b, dtype, rng):
  """Our train step for `config` at batch `b` in `dtype` on one device, compiled and run once:
  (compiled step, run(n) -> seconds for n more steps, compile seconds)."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  config.input.batch_size = b
  config.mesh = {"data": 1, "fsdp": 1, "model": 1}
  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config, 1000, 10, b)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    state, _ = train_state.init_sharded_state(model, tx, config, mesh, jax.random.key(0))
    step = jax.jit(train_state.make_train_step(model, tx, schedule, config, jax.random.key(1)), donate_argnums=0)
    images, text = _batch(config, b, FLAGS.prompts, rng)
    batch = {"image": jnp.asarray(images), **_our_inputs(config, text)}
    if config.loss.get("superpixel_weight", 0):  # one superpixel id per patch (8 regions per image here)
      patches = (config.model.image.image_size // config.model.image.patch_size) ** 2
      batch["superpixels"] = jnp.asarray(rng.randint(0, 8, size=(b, patches)), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, m = compiled(state, batch)
    jax.block_until_ready(m)

  def run(n):
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  return compiled, run, compile_s


def ours(config, b, dtype, rng):
  """compile_ours, then (run, XLA's FLOP count of the step, compile seconds, the step's device bytes)."""
  compiled, run, compile_s = compile_ours(config, b, dtype, rng)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
  return run, xla_flops, compile_s, step_bytes(compiled)


def step_bytes(compiled) -> float:
  """Device memory the compiled step needs by XLA's analysis: arguments + outputs - donated (aliased)
  buffers + temporaries (nan where the backend gives no analysis)."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return float("nan")
  if m is None:
    return float("nan")
  return float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _torch_device():
  """Where the PyTorch side runs: CUDA when our device is a GPU and torch sees one, else the CPU."""
  import torch  # pylint: disable=g-import-not-at-top
  return "cuda" if jax.devices()[0].platform == "gpu" and torch.cuda.is_available() else "cpu"


def _sync(device):
  if device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def _torch_model(config, train: bool):
  """HF's GroupViTModel for `config` in train or eval mode on `_torch_device()`, PyTorch on the same
  cores XLA uses: (device, model)."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.models.hf_reference import hf_config  # pylint: disable=g-import-not-at-top
  from transformers import GroupViTModel  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  device = _torch_device()
  return device, GroupViTModel(hf_config(config.model)).train(train).to(device)


def _torch_batch(images, text, device):
  """`_batch`'s arrays as PyTorch tensors on `device`: (pixels [b, 3, H, W], token ids int64)."""
  import torch  # pylint: disable=g-import-not-at-top
  return (torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device),
          torch.from_numpy(text.astype(np.int64)).to(device))


def ours_forward(config, b, dtype, rng):
  """Eval-mode forward of both towers (image + caption + prompts) and the logits, jitted."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  model = build_model(config.model)
  variables = random_variables(model, config.model, jax.random.key(0))
  images, text = _batch(config, b, FLAGS.prompts, rng)
  forward = jax.jit(lambda v, x, t: model.apply(v, x, **t, train=False)["image_embeds"])
  x, t = jnp.asarray(images), _our_inputs(config, text)
  jax.block_until_ready(forward(variables, x, t))

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      out = forward(variables, x, t)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  return run


def _autocast(dtype, device):
  """PyTorch's mixed precision for `dtype`: bf16 autocast on `device` (matmuls in bf16, softmax and
  norms in fp32, as ours), nothing for float32."""
  import torch  # pylint: disable=g-import-not-at-top
  if dtype == "float32":
    return contextlib.nullcontext()
  if dtype != "bfloat16":
    raise ValueError(f"--dtypes: PyTorch side supports float32 and bfloat16, got {dtype!r}")
  return torch.autocast(device, dtype=torch.bfloat16)


def theirs_forward(config, b, dtype, rng):
  import torch  # pylint: disable=g-import-not-at-top
  device, model = _torch_model(config, train=False)
  pixels, ids = _torch_batch(*_batch(config, b, FLAGS.prompts, rng), device)
  ids = ids.reshape(b * (1 + FLAGS.prompts), -1)

  def run(n):
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad(), _autocast(dtype, device):
      for _ in range(n):
        model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        model.text_projection(model.text_model(input_ids=ids).pooler_output)
    _sync(device)
    return time.perf_counter() - start

  return run


def theirs(config, b, dtype, rng):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  device, model = _torch_model(config, train=True)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                          **({"fused": True} if FLAGS.torch_adamw == "fused" else {}))
  pixels, ids = _torch_batch(*_batch(config, b, FLAGS.prompts, rng), device)
  k = FLAGS.prompts

  def step():
    with _autocast(dtype, device):
      loss = forward_loss()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()

  def forward_loss():
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=ids.reshape(b * (1 + k), -1)).pooler_output)
    txt = txt.reshape(b, 1 + k, -1)
    img_n, cap_n, pr_n = F.normalize(img, dim=-1), F.normalize(txt[:, 0], dim=-1), F.normalize(txt[:, 1:], dim=-1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img_n @ cap_n.T
    labels = torch.arange(b, device=device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    ml = scale * img_n @ pr_n.reshape(b * k, -1).T
    owner = torch.arange(b, device=device).repeat_interleave(k)
    target = (owner[None] == labels[:, None]).float() / k
    return loss + 0.5 * ((-target * F.log_softmax(ml, -1)).sum(-1).mean() + F.cross_entropy(ml.T, owner))

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  step()

  def run(n):
    _sync(device)
    start = time.perf_counter()
    for _ in range(n):
      step()
    _sync(device)
    return time.perf_counter() - start

  run.peak_bytes = lambda: torch.cuda.max_memory_allocated() if device == "cuda" else float("nan")
  return run


def tower_runs(config, b, dtype, rng):
  """{(tower, pass): (our_run, their_run)}: the image tower (with its projector) on the image batch and
  the text tower on caption + K prompts (one array at the context length), forward alone and forward +
  backward of sum(embeddings^2) with respect to the tower's parameters."""
  import torch  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  model = build_model(config.model)
  variables = random_variables(model, config.model, jax.random.key(0))
  images, text = _batch(config, b, FLAGS.prompts, rng)
  inputs = {"image": jnp.asarray(images), "text": jnp.asarray(text.reshape(-1, text.shape[-1]))}
  rngs = {"gumbel": jax.random.key(1), "dropout": jax.random.key(2)}

  def our_loss(tower_params, tower):
    method = model.encode_image if tower == "image" else model.encode_text
    params = {**variables["params"], **tower_params}
    out, _ = model.apply({**variables, "params": params}, inputs[tower], train=True, method=method, rngs=rngs,
                         mutable=["batch_stats"])
    out = out["image_embeds"] if tower == "image" else out
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  device, torch_model = _torch_model(config, train=True)
  pixels, ids = _torch_batch(images, text, device)
  torch_inputs = {"image": pixels, "text": ids.reshape(-1, text.shape[-1])}

  def their_loss(tower):
    m = torch_model
    with _autocast(dtype, device):
      if tower == "image":
        out = m.visual_projection(m.vision_model(pixel_values=torch_inputs["image"]).pooler_output)
      else:
        out = m.text_projection(m.text_model(input_ids=torch_inputs["text"]).pooler_output)
      return out.float().square().sum()

  runs = {}
  for tower in ("image", "text"):
    for kind in ("forward", "fwd+bwd"):
      # Only the tower's own parameters: a gradient for the other's would add zero-filled arrays.
      names = ("img_encoder", "img_projector") if tower == "image" else ("text_encoder", "text_projector")
      tower_params = {name: variables["params"][name] for name in names}
      fn = functools.partial(our_loss, tower=tower)
      fn = jax.jit(jax.grad(fn) if kind == "fwd+bwd" else fn)
      jax.block_until_ready(fn(tower_params))

      def our_run(n, fn=fn, tower_params=tower_params):
        start = time.perf_counter()
        for _ in range(n):
          out = fn(tower_params)
        jax.block_until_ready(out)
        return time.perf_counter() - start

      def their_run(n, tower=tower, kind=kind):
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
          torch_model.zero_grad(set_to_none=True)
          if kind == "forward":
            with torch.no_grad():
              their_loss(tower)
          else:
            their_loss(tower).backward()
        _sync(device)
        return time.perf_counter() - start

      their_run(1)
      runs[(tower, kind)] = (our_run, their_run)
  return runs


def alternating_rounds(runs, rounds: int, steps: int) -> list[list[float]]:
  """Times each of `runs` (run(n) -> seconds for n steps) for `steps` steps per round, after one
  untimed step, in an order reversed every other round: of two identical XLA steps timed one after
  the other, the second read up to ~1.5 % faster. Returns each
  run's seconds per round."""
  times = [[] for _ in runs]
  order = list(range(len(runs)))
  for r in range(rounds):
    for i in order[::-1] if r % 2 else order:
      # The untimed step after each switch: the first XLA step after PyTorch has run in the process
      # is up to ~40 % slower (GroupViT-S image tower: 1.66 vs 1.14-1.24 s), PyTorch's after ours not.
      runs[i](1)
      times[i].append(runs[i](steps))
  return times


def _alternate(our_run, their_run, b, rounds, steps):
  """Times ours and theirs in alternating rounds: (ours img/s, theirs img/s, ratio text, rounds text).

  The img/s are each side's best round and the ratio is best over best. The rounds text is the lowest
  and highest ratio of one round of ours against the round of theirs next to it (seconds apart): a
  machine whose speed drifts during the run moves those less than it moves the best of each side.
  Which side runs first alternates from round to round (`alternating_rounds`).
  """
  times = alternating_rounds([run for run in (our_run, their_run) if run], rounds, steps)
  t_ours = times[0]
  ips = b * steps / min(t_ours)
  if not their_run:
    return ips, float("nan"), f"{'-':>6}", f"{'-':>11}"
  t_theirs = times[1]
  tps = b * steps / min(t_theirs)
  paired = [theirs / ours for ours, theirs in zip(t_ours, t_theirs)]
  return ips, tps, f"{ips / tps:6.2f}", f"{min(paired):.2f}-{max(paired):.2f}".rjust(11)


def main(argv):
  del argv
  device = jax.devices()[0]
  peak = FLAGS.peak_tflops or next((v for k, v in PEAKS.items() if k in device.device_kind), None)
  tf32 = None if FLAGS.peak_tflops else next((v for k, v in TF32_PEAKS.items() if k in device.device_kind), None)
  if peak:
    peaks, peak_note = dict.fromkeys(FLAGS.dtypes, peak), f"peak {peak:.0f} TFLOP/s"
    if tf32 and "float32" in peaks:
      peaks["float32"] = tf32
      peak_note += f" (float32 rows: TF32, {tf32:.0f})"
    if device.platform == "gpu":
      peak_note += ("; a jitted 8192^3 bf16 product runs at "
                    f"{measured_peak_tflops('bfloat16', n=8192, reps=10):.0f} TFLOP/s here")
  elif device.platform == "cpu":
    peaks = {dtype: measured_peak_tflops(dtype) for dtype in FLAGS.dtypes}
    peak_note = "MFU against a 1024^3 product measured here: " + ", ".join(
        f"{dtype} {1e3 * v:.0f} GFLOP/s" for dtype, v in peaks.items())
  else:
    peaks, peak_note = {}, "peak unknown (pass --peak_tflops for MFU)"
  config = load_config()
  prompts_at = prompt_length(config)
  print(f"device: {device.device_kind} ({device.platform}), config {FLAGS.config} (image attention "
        f"{config.model.get('attention', 'xla')}, kernels {config.model.get('kernels', 'xla')}), K={FLAGS.prompts} prompts "
        f"(ours at {prompts_at or config.input.context_length} tokens, PyTorch at {config.input.context_length}), "
        f"{peak_note}")
  if FLAGS.torch and device.platform == "gpu":
    import torch  # pylint: disable=g-import-not-at-top
    torch.backends.cuda.matmul.allow_tf32 = True  # float32 rows: TF32 products on both sides, as XLA's default
    print(f"PyTorch {torch.__version__} on {_torch_device()} (eager; float32 rows with TF32 products)")
  allocator = cpu_env.malloc_in_use()
  setting = "MALLOC_CONF" if allocator == "jemalloc" else "GLIBC_TUNABLES"
  print(f"malloc: {allocator}, {setting}={os.environ.get(setting, '(unset)')} (both frameworks, one process)"
        + (f"; {hint}" if (hint := cpu_env.cpu_malloc_hint(allocator)) and device.platform == "cpu" else ""))
  if FLAGS.torch:
    print(f"PyTorch's optimizer: AdamW ({FLAGS.torch_adamw}), gradient clipping by global norm")
  print(f"{'batch':>6} {'dtype':>9} {'ours img/s':>11} {'torch img/s':>12} {'ratio':>6} {'GFLOP/img':>10} "
        f"{'XLA GFLOP':>10} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>10} {'per round':>11} {'step MiB':>9} "
        f"{'torch MiB':>10}")
  rng = np.random.RandomState(0)
  for b in map(int, FLAGS.batch_sizes):
    for dtype in FLAGS.dtypes:
      their_run = theirs(config, b, dtype, rng) if FLAGS.torch else None
      our_run, xla_flops, compile_s, our_bytes = ours(config, b, dtype, rng)
      ips, tps, ratio, rounds = _alternate(our_run, their_run, b, FLAGS.rounds, FLAGS.steps)
      their_bytes = their_run.peak_bytes() if their_run else float("nan")
      if FLAGS.profile_dir:
        with jax.profiler.trace(os.path.join(FLAGS.profile_dir, f"b{b}_{dtype}")):
          our_run(3)
      per_image = flops.train_step_flops(config.model, config.input.context_length, FLAGS.prompts, b, prompts_at)
      achieved = per_image * ips / 1e12
      mfu = f"{achieved / peaks[dtype]:6.1%}" if dtype in peaks else f"{'n/a':>6}"
      print(f"{b:>6} {dtype:>9} {ips:>11.1f} {tps:>12.1f} {ratio} {per_image / 1e9:>10.2f} "
            f"{xla_flops / b / 1e9:>10.2f} {achieved:>8.3f} {mfu} {compile_s:>10.1f} {rounds} "
            f"{our_bytes / 2**20:>9.0f} {their_bytes / 2**20:>10.0f}", flush=True)
  if FLAGS.forward:
    print(f"eval-mode forward (both towers, no gradients):\n{'batch':>6} {'dtype':>9} {'ours img/s':>11} "
          f"{'torch img/s':>12} {'ratio':>6} {'per round':>11}")
    for b in map(int, FLAGS.batch_sizes):
      for dtype in FLAGS.dtypes:
        their_run = theirs_forward(config, b, dtype, rng) if FLAGS.torch else None
        ips, tps, ratio, rounds = _alternate(ours_forward(config, b, dtype, rng), their_run, b, FLAGS.rounds,
                                             FLAGS.steps)
        print(f"{b:>6} {dtype:>9} {ips:>11.1f} {tps:>12.1f} {ratio} {rounds}", flush=True)
  if FLAGS.towers and FLAGS.torch:
    print(f"each tower alone (ms per batch; text = caption + {FLAGS.prompts} prompts per image):\n"
          f"{'batch':>6} {'dtype':>9} {'tower':>6} {'pass':>8} {'ours ms':>8} {'torch ms':>9} {'ratio':>6} "
          f"{'per round':>11}")
    for b in map(int, FLAGS.batch_sizes):
      for dtype in FLAGS.dtypes:
        for (tower, kind), (our_run, their_run) in tower_runs(config, b, dtype, rng).items():
          ips, tps, ratio, rounds = _alternate(our_run, their_run, b, FLAGS.rounds, FLAGS.steps)
          print(f"{b:>6} {dtype:>9} {tower:>6} {kind:>8} {1e3 * b / ips:>8.2f} {1e3 * b / tps:>9.2f} {ratio} "
                f"{rounds}", flush=True)
  print(f"peak host memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
  app.run(main)
