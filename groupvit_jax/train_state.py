"""The train state and the step that advances it: both towers, both losses, backward, AdamW.

Kept apart from the trainer's loop (train.py) so that it imports no TensorFlow: benchmarks and
accelerator machines without tf.data / clu can build and time the exact step the trainer runs.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from groupvit_jax import losses, sharding
from groupvit_jax.models import init_variables
from groupvit_jax.models.reconstruction import chain_assignments


# ---------------------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """What the step advances: the step counter, parameters, BatchNorm statistics, optimiser state."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def init_sharded_state(model, tx, config, mesh, rng):
  """Initialises the train state directly into its shardings (params are born sharded).

  Returns:
    (state, state_shardings).
  """
  m = config.model
  init = functools.partial(init_variables, model, image_size=m.image.image_size,
                           context_length=config.input.context_length)
  boxed = jax.eval_shape(init, rng)
  var_shardings = sharding.param_shardings(mesh, boxed)

  def init_state(rng):
    variables = nn.unbox(init(rng))
    return TrainState(step=jnp.zeros([], jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))

  abstract = jax.eval_shape(init_state, rng)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = TrainState(
      step=replicated, params=var_shardings["params"], batch_stats=var_shardings["batch_stats"],
      opt_state=sharding.like_params(mesh, abstract.opt_state, abstract.params, var_shardings["params"]))
  state = jax.jit(init_state, out_shardings=shardings)(rng)
  return state, shardings


# ---------------------------------------------------------------------------------------------------
# The step.
# ---------------------------------------------------------------------------------------------------


def make_train_step(model, tx, schedule, config, base_rng, label_tokens: jax.Array | None = None):
  """The jitted-to-be step: forward both towers, both losses, backward, AdamW.

  An LSeg model (`config.model.name == "lseg"`) trains on masks instead: `label_tokens` `[labels, length]`
  are the label names' token ids (class 0 first), batches carry `image` and `mask`.
  """
  if config.model.get("name") == "lseg":
    return _make_mask_step(model, tx, schedule, base_rng, label_tokens)
  ml_weight = config.loss.multi_label_weight
  recon_weight = config.loss.get("reconstruction_weight", 0.0)
  superpixel_weight = config.loss.get("superpixel_weight", 0.0)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(base_rng, state.step)
    gumbel_rng, dropout_rng = jax.random.split(rng)
    rngs = {"gumbel": gumbel_rng, "dropout": dropout_rng, "mask": jax.random.fold_in(rng, 2)}

    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                 batch["text"], train=True, prompts=batch.get("prompts"), rngs=rngs,
                                 mutable=["batch_stats"])
      contrastive = losses.contrastive_loss(out["image_embeds"], out["text_embeds"], out["logit_scale"])
      parts = {"contrastive_loss": contrastive, "logit_scale": out["logit_scale"]}
      loss = contrastive
      if "prompt_embeds" in out and ml_weight:
        multi = losses.multi_label_loss(out["image_embeds"], out["prompt_embeds"], out["multi_label_logit_scale"])
        loss = loss + ml_weight * multi
        parts.update(multi_label_loss=multi, multi_label_logit_scale=out["multi_label_logit_scale"])
      if recon_weight:
        recon = losses.reconstruction_loss(out["reconstruction"], batch["image"], config.model.image.patch_size,
                                           out["reconstruction_weights"], config.loss.reconstruction_norm_pix)
        loss = loss + recon_weight * recon
        parts["reconstruction_loss"] = recon
      if superpixel_weight:
        chained = chain_assignments([m["hard"] for m in out["assignments"]])
        # The first stage's map and the chained map onto the final groups (one term when they coincide).
        maps = [chained[0]] + ([chained[-1]] if len(chained) > 1 else [])
        kl = sum(losses.superpixel_kl(m, batch["superpixels"]) for m in maps) / len(maps)
        loss = loss + superpixel_weight * kl
        parts["superpixel_loss"] = kl
      if out["assignments"]:
        parts.update(losses.grouping_diagnostics(out["assignments"]))
      return loss, (parts, updates.get("batch_stats", {}))

    return _descend(state, loss_fn, tx, schedule)

  return train_step


def _descend(state: TrainState, loss_fn, tx, schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `loss_fn(params) -> (loss, (metrics, batch_stats))`; the step's metrics."""
  (loss, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(parts, loss=loss, learning_rate=schedule(state.step), grad_norm=optax.tree.norm(grads),
                 param_norm=optax.tree.norm(params))
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def _make_mask_step(model, tx, schedule, base_rng, label_tokens: jax.Array):
  """The mask-supervised step: per-pixel cross-entropy of the logits against the label names (LSeg)."""
  if label_tokens is None:
    raise ValueError("a mask-supervised step needs the label names' tokens (config.labels)")

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rngs = {"dropout": jax.random.fold_in(base_rng, state.step)}

    def loss_fn(params):
      out, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"],
                                 label_tokens, train=True, rngs=rngs, mutable=["batch_stats"])
      loss, accuracy = losses.pixel_cross_entropy(out["logits"], batch["mask"].astype(jnp.int32))
      return loss, ({"pixel_accuracy": accuracy}, updates.get("batch_stats", {}))

    return _descend(state, loss_fn, tx, schedule)

  return train_step
