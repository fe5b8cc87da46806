"""The optimizer's pieces against the reference's PyTorch counterparts."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from groupvit_jax import optim


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipping at work, and a norm under the limit
def test_clipping_matches_torch_clip_grad_norm(max_norm):
  rng = np.random.RandomState(0)
  grads = {"w": rng.randn(64, 32).astype(np.float32), "b": rng.randn(32).astype(np.float32)}
  params = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in grads.items()}
  for k, p in params.items():
    p.grad = torch.from_numpy(grads[k].copy())
  norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
  clip = optim.clip_by_global_norm(max_norm)
  ours, _ = clip.update({k: jnp.asarray(v) for k, v in grads.items()}, clip.init(grads))
  assert (float(norm) > max_norm) == (max_norm == 0.5)
  for key, value in ours.items():
    np.testing.assert_allclose(value, params[key].grad.numpy(), rtol=1e-6, err_msg=key)
  if max_norm == 100.0:  # unclipped gradients pass through unchanged, bit for bit
    for key, value in ours.items():
      np.testing.assert_array_equal(value, grads[key])
  np.testing.assert_allclose(optax.global_norm(ours), min(float(norm), max_norm), rtol=1e-5)
