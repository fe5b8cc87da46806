"""The grouping losses and diagnostics against values worked out from their definitions on hand-built inputs."""

import jax
import jax.numpy as jnp
import numpy as np

from groupvit_jax import losses
from groupvit_jax.models.reconstruction import chain_assignments, patchify, random_keep


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_superpixel_kl_on_a_two_superpixel_image():
  # 4 patches: the left two are superpixel 7, the right two superpixel 3; 3 groups.
  superpixels = np.array([[7, 7, 3, 3]])
  assign = np.array([[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]], np.float32)
  # Each patch's superpixel mean, by hand: patches 0-1 average [1,0,0] and [0,1,0]; 2-3 agree.
  mean = np.array([[[.5, .5, 0], [.5, .5, 0], [0, 0, 1], [0, 0, 1]]], np.float32)
  p, q = _softmax(mean), _softmax(assign)  # the reference compares softmaxes of both
  expected = 0.5 * (np.sum(p * np.log(p / q)) + np.sum(q * np.log(q / p))) / assign.size
  got = losses.superpixel_kl(jnp.asarray(assign), jnp.asarray(superpixels))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert expected > 0
  # Patches that agree within each superpixel cost nothing.
  agree = np.array([[[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]]], np.float32)
  np.testing.assert_allclose(losses.superpixel_kl(jnp.asarray(agree), jnp.asarray(superpixels)), 0.0, atol=1e-7)


def test_reconstruction_loss_on_a_four_patch_image():
  # A 4x4 one-channel-per-colour image, patches of 2x2: patch k holds the value k everywhere.
  image = np.zeros((1, 4, 4, 3), np.float32)
  for k, (y, x) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
    image[0, y:y + 2, x:x + 2] = k
  patches = patchify(jnp.asarray(image), 2)
  assert patches.shape == (1, 4, 12)
  np.testing.assert_array_equal(patches[0], np.repeat(np.arange(4.0)[:, None], 12, axis=1))
  pred = np.full((1, 4, 12), 1.0, np.float32)
  # Squared errors per patch: (1-0)^2, 0, (1-2)^2, (1-3)^2 = 1, 0, 1, 4; all scored: mean 1.5.
  got = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(image), 2, jnp.ones((1, 4)))
  np.testing.assert_allclose(got, 1.5, rtol=1e-6)
  # Only the dropped patches 2 and 3 scored (MAE): (1 + 4) / 2.
  got = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(image), 2, jnp.array([[0.0, 0, 1, 1]]))
  np.testing.assert_allclose(got, 2.5, rtol=1e-6)
  # Per-patch normalised targets of a uniform patch are 0: the error is the prediction's own square.
  got = losses.reconstruction_loss(jnp.asarray(pred), jnp.asarray(image), 2, jnp.ones((1, 4)), norm_pix=True)
  np.testing.assert_allclose(got, 1.0, rtol=1e-5)


def test_chained_maps_send_each_patch_to_its_final_group_and_carry_gradients():
  # Stage 1: patches 0,1 -> group 0, patches 2,3 -> group 1. Stage 2: group 0 -> final 1, group 1 -> final 0.
  stage1 = np.array([[[1, 1, 0, 0], [0, 0, 1, 1]]], np.float32)  # [batch, groups_out, tokens_in]
  stage2 = np.array([[[0, 1], [1, 0]]], np.float32)
  first, final = chain_assignments([jnp.asarray(stage1), jnp.asarray(stage2)])
  np.testing.assert_array_equal(first[0], stage1[0].T)
  np.testing.assert_array_equal(final[0], [[0, 1], [0, 1], [1, 0], [1, 0]])

  def redrawn(logits):  # straight-through one-hot of stage 2, as training runs it
    soft = jax.nn.softmax(logits, axis=1)
    hard = jax.nn.one_hot(jnp.argmax(soft, axis=1), 2, axis=1) + soft - jax.lax.stop_gradient(soft)
    tokens = jnp.array([[[1.0], [-1.0]]])
    return jnp.sum(jnp.einsum("bpg,bgc->bpc", chain_assignments([jnp.asarray(stage1), hard])[-1], tokens))

  grad = jax.grad(redrawn)(jnp.asarray(stage2) * 3.0)
  assert np.abs(np.asarray(grad)).sum() > 0


def test_random_keep_draws_distinct_sorted_patches():
  keep = np.asarray(random_keep(jax.random.key(0), 3, 16, 0.75))
  assert keep.shape == (3, 4)
  for row in keep:
    assert list(row) == sorted(set(row.tolist())) and row.min() >= 0 and row.max() < 16


def test_grouping_diagnostics_count_groups_and_entropy():
  # 2 images, 4 patches, 3 groups: image 0 uses groups {0, 2}, image 1 only group 1.
  hard = np.zeros((2, 3, 4), np.float32)
  hard[0, 0, :2] = hard[0, 2, 2:] = 1
  hard[1, 1] = 1
  soft = np.full((2, 3, 4), 1 / 3, np.float32)  # uniform: entropy log 3 for every token
  out = losses.grouping_diagnostics([{"hard": jnp.asarray(hard), "soft": jnp.asarray(soft)}])
  np.testing.assert_allclose(out["grouping/stage1_groups"], 1.5)
  np.testing.assert_allclose(out["grouping/stage1_entropy"], np.log(3), rtol=1e-5)


def test_train_step_with_both_grouping_losses_reports_them():
  """Through two grouping stages with the masked form (a second encoder pass; the unmasked form runs in
  the demo's tests)."""
  from groupvit_jax import config_lib, optim, sharding  # pylint: disable=g-import-not-at-top
  from groupvit_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from groupvit_jax.train_state import init_sharded_state, make_train_step  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/tiny.py")
  config.model.reconstruction.update(dim=16, depth=1, num_heads=2, mask_ratio=0.5)
  config.loss.update(reconstruction_weight=1.0, superpixel_weight=1.0)
  model = build_model(config.model)
  tx, schedule = optim.make_optimizer(config, 10, 1, 4)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32),
           "text": jnp.asarray(rng.integers(1, 100, size=(4, 4, 16)), jnp.int32),
           "superpixels": jnp.asarray(np.repeat([[0] * 32 + [1] * 32], 4, axis=0), jnp.int32)}
  with jax.set_mesh(mesh):
    state, _ = init_sharded_state(model, tx, config, mesh, jax.random.key(0))
    step = jax.jit(make_train_step(model, tx, schedule, config, jax.random.key(1)))
    state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  assert metrics["reconstruction_loss"] > 0 and metrics["superpixel_loss"] >= 0
  assert 1 <= metrics["grouping/stage2_groups"] <= 4 and metrics["grouping/stage1_entropy"] > 0
  parts = metrics["contrastive_loss"] + metrics["multi_label_loss"] + metrics["reconstruction_loss"]
  np.testing.assert_allclose(metrics["loss"], parts + metrics["superpixel_loss"], rtol=1e-5)
  assert "reconstructor" in state.params
