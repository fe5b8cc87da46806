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


def test_lr_scales_match_torch_adamw_parameter_groups():
  """SegCLIP's two learning rates (new modules 4e-3, CLIP's weights 4e-6) as torch AdamW param groups."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from groupvit_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.training_defaults()
  config.optim.update(lr=4e-3, reference_batch=8, warmup_lr=4e-3, min_lr=4e-3, b1=0.9, b2=0.98, eps=1e-6,
                      weight_decay=0.05, clip_norm=0.0, lr_scales={"^visual/": 1e-3})
  rng = np.random.RandomState(0)
  init = {"visual": {"w": rng.randn(6, 4).astype(np.float32)}, "semantic": {"w": rng.randn(4, 3).astype(np.float32)}}
  grads = [{k: {"w": rng.randn(*v["w"].shape).astype(np.float32)} for k, v in init.items()} for _ in range(3)]
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(config), total_steps=100, warmup_steps=0, batch_size=8)
  params = {k: {"w": jnp.asarray(v["w"])} for k, v in init.items()}
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v["w"].copy())) for k, v in init.items()}
  opt = torch.optim.AdamW([{"params": [torch_params["visual"]], "lr": 4e-6},
                           {"params": [torch_params["semantic"]], "lr": 4e-3}],
                          betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
  for g in grads:
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(g[k]["w"])
    opt.step()
  for k in init:
    np.testing.assert_allclose(params[k]["w"], torch_params[k].detach().numpy(), rtol=1e-6, atol=1e-8, err_msg=k)
  assert np.abs(np.asarray(params["visual"]["w"]) - init["visual"]["w"]).max() < 1e-4  # the small rate moved it little
