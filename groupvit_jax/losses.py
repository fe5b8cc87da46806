"""Image-text contrastive and multi-label contrastive losses over the global batch.

Under jit, the embeddings are global (sharded) arrays, so every caption of every host is a negative:
XLA inserts the gathers the reference does by hand with all_gather.
"""

import jax
import jax.numpy as jnp
import optax

from groupvit_jax.models.groupvit import l2_normalize


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
