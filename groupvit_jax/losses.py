"""The training losses: image-text contrastive and multi-label contrastive over the global batch, and the
grouping losses (reconstruction from groups, superpixel consistency) with the grouping diagnostics.

Under jit, the embeddings are global (sharded) arrays, so every caption of every host is a negative:
XLA inserts the gathers the reference does by hand with all_gather.
"""

import jax
import jax.numpy as jnp
import optax

from groupvit_jax.models.groupvit import l2_normalize
from groupvit_jax.models.reconstruction import chain_assignments, patchify


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

  Args:
    image_embeds, text_embeds: `[batch, dim]`, not necessarily normalised.
    logit_scale: the (clamped) exp of the learnable scale.
  """
  img, txt = l2_normalize(image_embeds), l2_normalize(text_embeds)
  logits = logit_scale * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  per_img = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  per_txt = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (per_img.mean() + per_txt.mean())


def multi_label_loss(image_embeds: jax.Array, prompt_embeds: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """The reference's multi-label contrastive loss.

  Each image is matched against all B*K prompts with soft targets 1/K on its own K prompts; each prompt
  against all B images with target 1 on its own image; the two directions are averaged.

  Args:
    image_embeds: `[batch, dim]`.
    prompt_embeds: `[batch, K, dim]`.
    logit_scale: the multi-label loss's own (clamped) scale.
  """
  b, k, _ = prompt_embeds.shape
  img = l2_normalize(image_embeds)
  prompts = l2_normalize(prompt_embeds).reshape(b * k, -1)
  logits = logit_scale * img @ prompts.T  # [B, B*K]
  owner = jnp.repeat(jnp.arange(b), k)  # image of each prompt
  targets_img = (owner[None, :] == jnp.arange(b)[:, None]).astype(logits.dtype) / k
  per_img = optax.softmax_cross_entropy(logits, targets_img)
  per_prompt = optax.softmax_cross_entropy_with_integer_labels(logits.T, owner)
  return 0.5 * (per_img.mean() + per_prompt.mean())


def reconstruction_loss(pred: jax.Array, images: jax.Array, patch_size: int, weights: jax.Array,
                        norm_pix: bool = False) -> jax.Array:
  """Mean squared error of predicted patch pixels, averaged over the scored patches.

  Args:
    pred: `[batch, patches, patch_size * patch_size * 3]` predicted (normalised) pixels.
    images: `[batch, h, w, 3]` the (normalised) images they redraw.
    weights: `[batch, patches]` 1 for a scored patch, 0 otherwise (MAE scores the dropped ones).
    norm_pix: targets normalised per patch (mean 0, variance 1), as MAE's norm_pix_loss.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean = target.mean(axis=-1, keepdims=True)
    target = (target - mean) * jax.lax.rsqrt(target.var(axis=-1, keepdims=True) + 1e-6)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
  return jnp.sum(per_patch * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def superpixel_kl(assign: jax.Array, superpixels: jax.Array) -> jax.Array:
  """SegCLIP's superpixel consistency: patches of one superpixel should pick the same group.

  Each patch's assignment is compared with the mean assignment of its superpixel's patches, both taken
  through a softmax over the groups, by the symmetric KL divergence summed over batch, patches and
  groups and divided by their product (the reference's `use_seglabel` branch).

  Args:
    assign: `[batch, patches, groups]` each patch's assignment (straight-through one-hot in training).
    superpixels: `[batch, patches]` integer superpixel id of each patch.
  """
  assign = assign.astype(jnp.float32)
  same = (superpixels[:, :, None] == superpixels[:, None, :]).astype(jnp.float32)
  mean = jnp.einsum("bpq,bqg->bpg", same, assign) / jnp.maximum(same.sum(axis=-1, keepdims=True), 1.0)
  log_a, log_m = jax.nn.log_softmax(assign, axis=-1), jax.nn.log_softmax(mean, axis=-1)
  kl_m_a = jnp.sum(jnp.exp(log_m) * (log_m - log_a))
  kl_a_m = jnp.sum(jnp.exp(log_a) * (log_a - log_m))
  return 0.5 * (kl_m_a + kl_a_m) / assign.size


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-pixel cross-entropy over the labels, averaged over the labelled pixels (LSeg's loss), and the
  labelled pixels' accuracy.

  Args:
    logits: `[batch, h, w, labels]`.
    labels: `[batch, h, w]` integer label ids; ids outside 0..labels-1 (255: ignore) are not scored.
  """
  valid = (labels >= 0) & (labels < logits.shape[-1])
  safe = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  count = jnp.maximum(jnp.sum(valid), 1)
  correct = (jnp.argmax(logits, axis=-1) == safe) & valid
  return jnp.sum(ce * valid) / count, jnp.sum(correct) / count


def grouping_diagnostics(assignments: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """Per grouping stage: groups in use per image (groups holding at least one patch through the chained
  hard maps) and the mean entropy of a token's soft assignment (nats; log(groups) is uniform)."""
  out = {}
  chained = chain_assignments([jax.lax.stop_gradient(m["hard"]) for m in assignments])
  for s, (c, maps) in enumerate(zip(chained, assignments)):
    out[f"grouping/stage{s + 1}_groups"] = jnp.mean(jnp.sum(c.sum(axis=1) > 0.5, axis=-1).astype(jnp.float32))
    soft = jax.lax.stop_gradient(maps["soft"]).astype(jnp.float32)
    out[f"grouping/stage{s + 1}_entropy"] = jnp.mean(-jnp.sum(soft * jnp.log(soft + 1e-12), axis=1))
  return out
