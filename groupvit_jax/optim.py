"""The optax optimizer from config: AdamW (or SGD with momentum), warmup + cosine (or poly), clipping,
decay/freeze masks, per-group learning rates, accumulation."""

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, warmup_lr: float, min_lr: float
                ) -> Callable[[jax.Array], jax.Array]:
  """The reference's schedule (timm CosineLRScheduler, warmup_prefix=False).

  Linear warmup from `warmup_lr` to `base_lr` over `warmup_steps`, then cosine from `base_lr` to
  `min_lr` whose period counts from step 0 (so at the end of warmup the cosine is already under way).
  """
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    cosine = min_lr + 0.5 * (base_lr - min_lr) * (1 + jnp.cos(math.pi * jnp.minimum(step, total_steps) / total_steps))
    warm = warmup_lr + step * (base_lr - warmup_lr) / max(warmup_steps, 1)
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


def poly_schedule(base_lr: float, total_steps: int, power: float = 0.9) -> Callable[[jax.Array], jax.Array]:
  """base_lr * (1 - step / total_steps) ** power: the poly decay of LSeg's (encoding's) trainer."""
  def schedule(step):
    step = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
    return base_lr * (1.0 - step / total_steps) ** power
  return schedule


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _mask(params: Any, rule: Callable[[str, jax.Array], bool]) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, x: rule(_path(p), x), params)


def decay_mask(params: Any, spec: str) -> Any:
  """Which parameters get weight decay.

  spec: "ndim!=1" (the reference: every parameter except biases and norm scales, so embeddings,
  group tokens and the logit scales are decayed), or a regex over '/'-joined parameter paths.
  """
  if spec == "ndim!=1":
    return _mask(params, lambda _, x: x.ndim != 1)
  pattern = re.compile(spec)
  return _mask(params, lambda name, _: bool(pattern.search(name)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Gradient clipping as the reference's `torch.nn.utils.clip_grad_norm_`: every gradient times
  min(1, max_norm / (global norm + 1e-6)).

  optax.clip_by_global_norm selects between the gradient and gradient / norm * max_norm; XLA:CPU then
  writes each clipped gradient out before the moments read it, where a multiply by one scalar fuses
  into them (a 12.6 M-parameter AdamW update: 10.0-11.6 -> 8.0 ms).
  """
  def update(updates, state, params=None):
    del params
    coef = jnp.minimum(1.0, max_norm / (optax.global_norm(updates) + 1e-6))
    return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_path(scales: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies each parameter's update by the factor of the first regex (over '/'-joined parameter
  paths) in `scales` that matches it, else 1: per-group learning rates on one schedule (after AdamW
  the update is -lr * (adam + decay), so a factor on it is a factor on that group's lr)."""
  rules = [(re.compile(pattern), float(factor)) for pattern, factor in scales.items()]

  def factor(name: str) -> float:
    return next((f for pattern, f in rules if pattern.search(name)), 1.0)

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * jnp.asarray(factor(_path(p)), u.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config: Any, total_steps: int, warmup_steps: int, batch_size: int
                   ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """AdamW chain from `config.optim`; returns (optimizer, learning-rate schedule).

  `optim.name = "sgd"` is PyTorch's SGD instead (momentum `optim.momentum`, weight decay added to the
  gradient before the momentum, on the `decay_mask` parameters) and `optim.schedule = "poly"` the poly
  decay (`optim.poly_power`) without warmup: LSeg's recipe.

  The learning rates are scaled linearly by `batch_size / config.optim.reference_batch` (the paper
  scales its 1.6e-3 at batch 4096); `optim.lr_scales` ({regex: factor}) gives parameter groups their own
  factor of it (SegCLIP: CLIP's weights at 1e-3 of the new modules' rate). Frozen parameters
  (`optim.freeze`, a regex) get zero updates.
  With `optim.grad_accum_steps > 1` the update uses the mean gradient of that many micro-batches
  (which also shrinks the pool of negatives each loss sees).
  """
  o = config.optim
  scale = batch_size / o.reference_batch
  if o.get("schedule", "cosine") == "poly":
    schedule = poly_schedule(o.lr * scale, total_steps, o.get("poly_power", 0.9))
  elif o.get("schedule", "cosine") == "cosine":
    schedule = lr_schedule(o.lr * scale, total_steps, warmup_steps, o.warmup_lr * scale, o.min_lr * scale)
  else:
    raise ValueError(f"optim.schedule must be 'cosine' or 'poly', got {o.schedule!r}")
  mu_dtype = jnp.bfloat16 if o.get("bf16_moments", False) else None
  mask = lambda p: decay_mask(p, o.decay_mask)
  if o.get("name", "adamw") == "sgd":
    optimizer = optax.chain(optax.add_decayed_weights(o.weight_decay, mask=mask),
                            optax.sgd(schedule, momentum=o.get("momentum", 0.9)))
  elif o.get("name", "adamw") == "adamw":
    optimizer = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask,
                            mu_dtype=mu_dtype)
  else:
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {o.name!r}")
  parts = [clip_by_global_norm(o.clip_norm) if o.clip_norm else optax.identity(), optimizer]
  if o.get("lr_scales"):  # only then: the optimizer state of every other config keeps its structure
    parts.append(scale_by_path(dict(o.lr_scales)))
  tx = optax.chain(*parts)
  if o.get("freeze"):
    pattern = re.compile(o.freeze)
    labels = lambda p: _mask(p, lambda name, _: "frozen" if pattern.search(name) else "trained")
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  if o.get("grad_accum_steps", 1) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, schedule
