"""Behaviour of the Flax modules: straight-through assignment, resize, BatchNorm, bf16, remat."""

import re
from unittest import mock

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groupvit_jax import config_lib
from groupvit_jax.models import build_model, init_variables
from groupvit_jax.models.grouping import assignment_probs
from groupvit_jax.models.cpu_kernels import matmul
from groupvit_jax.models.layers import BatchNorm, Dense, SelfAttention, use_kernels
from groupvit_jax.models.layers import attention as layers_attention
from groupvit_jax.models.text_transformer import TextTransformer
from groupvit_jax.models.vit import resize_pos_embed


def _tiny(**overrides):
  config = config_lib.load_config("configs/tiny.py")
  config.model.update(overrides)
  return config


def _init(config, seed=0):
  model = build_model(config.model)
  init = jax.jit(lambda r: init_variables(model, r, config.model.image.image_size,
                                          config.model.text.context_length))
  variables = nn.unbox(init(jax.random.key(seed)))
  return model, variables


def _batch(config, batch=4, seed=0):
  rng = np.random.RandomState(seed)
  size, ctx = config.model.image.image_size, config.model.text.context_length
  images = jnp.asarray(rng.randn(batch, size, size, 3), jnp.float32)
  text = rng.randint(1, config.model.text.vocab_size - 1, size=(batch, 3, ctx)).astype(np.int32)
  text[..., -1] = config.model.text.vocab_size - 1
  return images, jnp.asarray(text)


def test_hard_assignment_is_exactly_one_hot_with_soft_gradients():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  hard = assignment_probs(logits, hard=True, gumbel_key=None)
  assert np.all(np.asarray(hard.sum(axis=1)) == 1.0)
  assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
  weights = jax.random.normal(jax.random.key(1), logits.shape)
  g_hard = jax.grad(lambda l: jnp.sum(assignment_probs(l, hard=True, gumbel_key=None) * weights))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(assignment_probs(l, hard=False, gumbel_key=None) * weights))(logits)
  np.testing.assert_allclose(g_hard, g_soft, rtol=0, atol=1e-7)  # straight-through: soft gradients
  assert float(jnp.abs(g_hard).max()) > 0


def test_gumbel_noise_comes_from_the_gumbel_stream():
  logits = jnp.zeros((1, 4, 50))
  a = assignment_probs(logits, hard=True, gumbel_key=jax.random.key(0))
  b = assignment_probs(logits, hard=True, gumbel_key=jax.random.key(0))
  c = assignment_probs(logits, hard=True, gumbel_key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # With equal logits, noise alone picks the groups: more than one group must be used.
  assert len(np.unique(np.asarray(a.argmax(axis=1)))) > 1


def test_gradients_reach_group_tokens_and_assignment_projections():
  config = _tiny()
  model, variables = _init(config)
  images, text = _batch(config)

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, text, train=True,
                         rngs={"gumbel": jax.random.key(1), "dropout": jax.random.key(2)}, mutable=["batch_stats"])
    sim = out["image_embeds"] @ out["text_embeds"].T
    return jnp.mean(sim**2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  img = grads["img_encoder"]
  for name, g in [("stage-1 group tokens", img["layers_0"]["group_token"]),
                  ("stage-2 group tokens", img["layers_1"]["group_token"]),
                  ("stage-1 assign q_proj", img["layers_0"]["downsample"]["assign"]["q_proj"]["kernel"]),
                  ("stage-1 assign k_proj", img["layers_0"]["downsample"]["assign"]["k_proj"]["kernel"]),
                  ("stage-2 assign k_proj", img["layers_1"]["downsample"]["assign"]["k_proj"]["kernel"])]:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), name
    assert np.abs(g).max() > 0, f"{name} got no gradient"


def test_train_mode_is_deterministic_given_rngs_and_updates_batch_stats():
  config = _tiny()
  config.model.image.drop_path_rate = 0.1
  model, variables = _init(config)
  images, text = _batch(config)
  rngs = lambda s: {"gumbel": jax.random.key(s), "dropout": jax.random.key(s + 100)}
  run = jax.jit(lambda v, r: model.apply(v, images, text, train=True, rngs=r, mutable=["batch_stats"]))
  (a, stats_a), (b, _), (c, _) = run(variables, rngs(0)), run(variables, rngs(0)), run(variables, rngs(1))
  np.testing.assert_array_equal(a["image_embeds"], b["image_embeds"])
  assert not np.allclose(a["image_embeds"], c["image_embeds"])
  old = variables["batch_stats"]["img_projector"]["bn_0"]["mean"]
  assert not np.allclose(stats_a["batch_stats"]["img_projector"]["bn_0"]["mean"], old)


def test_batchnorm_matches_torch_batchnorm1d_in_training():
  x = np.random.RandomState(0).randn(6, 5, 8).astype(np.float32)  # [batch, tokens, features]
  bn = BatchNorm()
  variables = bn.init(jax.random.key(0), jnp.asarray(x), use_running_average=False)
  y, updated = bn.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
  ref = torch.nn.BatchNorm1d(8, momentum=0.1, eps=1e-5).train()
  y_ref = ref(torch.from_numpy(x).permute(0, 2, 1)).permute(0, 2, 1).detach().numpy()
  np.testing.assert_allclose(y, y_ref, atol=1e-5)
  np.testing.assert_allclose(updated["batch_stats"]["mean"], ref.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(updated["batch_stats"]["var"], ref.running_var.numpy(), atol=1e-6)


def test_pos_embed_resize_for_448_matches_pytorch_bicubic():
  pos = np.random.RandomState(0).randn(1, 196, 384).astype(np.float32)
  ours = np.asarray(resize_pos_embed(jnp.asarray(pos), 14, (28, 28)))
  grid = torch.from_numpy(pos).reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
  ref = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(1, 784, 384).numpy()
  err = np.abs(ours - ref).max()
  assert err <= 1e-5, err
  # jax.image.resize's bicubic (a=-0.5) is measurably different: the reason for our own kernel.
  jax_resized = jax.image.resize(jnp.asarray(pos).reshape(1, 14, 14, 384), (1, 28, 28, 384), "bicubic")
  assert np.abs(np.asarray(jax_resized).reshape(1, 784, 384) - ref).max() > 1e-3


def test_model_runs_at_other_input_sizes_with_resized_pos_embed():
  config = _tiny()
  model, variables = _init(config)
  images = jnp.ones((1, 48, 64, 3))
  out = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))(variables, images)
  assert out["assignments"][0]["soft"].shape == (1, 8, (48 // 4) * (64 // 4))


def test_bf16_forward_stays_close_to_fp32():
  config = _tiny()
  model32, variables = _init(config)
  config.model.dtype = "bfloat16"
  model16 = build_model(config.model)
  images, text = _batch(config, batch=8)
  e32 = jax.jit(model32.apply)(variables, images, text)
  e16 = jax.jit(model16.apply)(variables, images, text)
  for key in ("image_embeds", "text_embeds"):
    a = np.asarray(e32[key] / jnp.linalg.norm(e32[key], axis=-1, keepdims=True))
    b = np.asarray(e16[key].astype(jnp.float32))
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    cos = np.sum(a * b, axis=-1)
    # Documented tolerance (README): cosine similarity of bf16 vs fp32 embeddings >= 0.99.
    assert cos.min() >= 0.99, (key, cos.min())


def _eqns(jaxpr):
  """Every equation of a jaxpr, those of sub-jaxprs (pjit, remat, custom_jvp/vjp) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _reduce_sum_dtypes(closed_jaxpr):
  """The input dtypes of every reduce_sum in a jaxpr."""
  return [e.invars[0].aval.dtype for e in _eqns(closed_jaxpr.jaxpr) if e.primitive.name == "reduce_sum"]


@pytest.mark.parametrize("module, make_input", [
    (Dense(48, dtype=jnp.bfloat16), lambda: jnp.ones((4, 10, 32))),
    (SelfAttention(4, dtype=jnp.bfloat16), lambda: jnp.ones((4, 10, 32))),
    (TextTransformer(context_length=8, vocab_size=50, width=32, layers=1, heads=4, dtype=jnp.bfloat16),
     lambda: jnp.tile(jnp.arange(1, 9), (4, 1))),
], ids=["dense", "self_attention", "text_transformer"])
@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_bf16_gradients_sum_in_float32(module, make_input, kernels):
  # Under bfloat16 compute, the sums in the backward pass (bias, position embedding and softmax
  # denominator gradients) run over float32: XLA:CPU rewrites bfloat16 sums into slow windowed
  # reductions (with flax's nn.Dense they took 15-20 % of the demo towers' backward).
  x = make_input()
  params = module.init(jax.random.key(0), x)

  def loss(p):
    with use_kernels(kernels):
      return jnp.sum(module.apply(p, x).astype(jnp.float32)**2)

  dtypes = _reduce_sum_dtypes(jax.make_jaxpr(jax.grad(loss))(params))
  assert dtypes and jnp.dtype(jnp.bfloat16) not in dtypes, dtypes


def _compiled_dot_operand_dtypes(hlo_text):
  """(lhs, rhs) element types of every dot in a compiled HLO module's text, fusion bodies included."""
  dtypes = []
  for computation in re.split(r"\n(?=\S)", hlo_text):
    defined = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
    for lhs, rhs in re.findall(r"= \w+\[[^\]]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)", computation):
      dtypes.append((defined.get(lhs), defined.get(rhs)))
  return dtypes


@pytest.mark.parametrize("shape", [(32, 48, 64), (512, 64, 16), (1, 48, 64), (32, 1, 64), (32, 48, 1), (3, 5, 7)])
def test_bf16_matmul_runs_bf16_products_with_float32_results(shape):
  # Every product of a bf16 Dense, forward and backward, is bf16 x bf16 -> f32 (the form XLA:CPU runs
  # with native bf16 kernels), in the jaxpr and, on CPU, still after XLA's passes (which upcast the
  # kernel gradient's product to float32 when it contracts dim 0 of x; (512, 64, 16) takes the
  # transposed-cotangent form, layers._cotangent_side_cheaper); the kernel's gradient stays float32.
  # Vector and tiny shapes, which XLA:CPU cannot run in that form, fall back to float32 operands and
  # must still run.
  rows, n_in, n_out = shape
  x = jax.random.normal(jax.random.key(0), (rows, n_in))
  kernel = jax.random.normal(jax.random.key(1), (n_in, n_out))
  loss = lambda x, k, dtype: jnp.sum(jnp.sin(matmul(x.astype(dtype), k, jnp.dtype(dtype))))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  dots = [e for e in _eqns(jax.make_jaxpr(grad, static_argnums=2)(x, kernel, "bfloat16").jaxpr)
          if e.primitive.name == "dot_general"]
  operand = jnp.float32 if shape == (3, 5, 7) or 1 in shape else jnp.bfloat16
  assert len(dots) == 3 and all(
      [v.aval.dtype for v in e.invars] == [operand, operand] and e.params["preferred_element_type"] == jnp.float32
      for e in dots), [(e.invars, e.params["preferred_element_type"]) for e in dots]
  if operand == jnp.bfloat16 and jax.default_backend() == "cpu":
    compiled = grad.lower(x, kernel, "bfloat16").compile().as_text()
    assert _compiled_dot_operand_dtypes(compiled) == [("bf16", "bf16")] * 3, _compiled_dot_operand_dtypes(compiled)
  dx, dk = grad(x, kernel, "bfloat16")  # runs on this backend
  assert dk.dtype == jnp.float32
  ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(x @ k)), argnums=(0, 1))(x, kernel)
  for ours, exact in zip(grad(x, kernel, "float32"), ref):  # float32: JAX's own gradient
    np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=1e-6)
  for ours, exact in zip((dx, dk), ref):  # bf16: within bf16 rounding of inputs and cotangent
    np.testing.assert_allclose(np.asarray(ours, np.float32), exact, atol=0.1 * float(np.abs(exact).max()))


@pytest.mark.parametrize("queries, keys, mask", [
    (20, 20, None), (12, 12, "causal"), (6, 20, "per_sequence"), (1, 12, "per_sequence"), (3, 5, None)])
def test_bf16_attention_runs_native_products_and_matches_float32(queries, keys, mask):
  # With the "cpu" kernels below float32, attention runs every product of forward and backward as a
  # row-major bf16 x bf16 -> f32 product (its own VJP); a query vector takes the einsum path, and XLA may
  # upcast tiny products. All run and stay within bf16 rounding of the float32 result and gradients.
  def attention(*args):
    with use_kernels("cpu"):
      return layers_attention(*args)

  b, c, heads = 3, 64, 4
  q, k, v, w = (jax.random.normal(jax.random.key(i), (b, t, c)) for i, t in enumerate((queries, keys, keys, queries)))
  if mask == "causal":
    mask = jnp.where(jnp.arange(keys)[None, :] > jnp.arange(queries)[:, None], -jnp.inf, 0.0)
  elif mask == "per_sequence":
    mask = jnp.where(jax.random.uniform(jax.random.key(9), (b, 1, 1, keys)) < 0.3, -jnp.inf, 0.0).at[..., 0].set(0.0)
  loss = lambda q, k, v, dtype: jnp.sum(attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), heads, mask)
                                        .astype(jnp.float32) * w)
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  if jax.default_backend() == "cpu" and min(queries, keys) >= 6:  # 2 products forward, 4 backward
    dots = _compiled_dot_operand_dtypes(grad.lower(q, k, v, "bfloat16").compile().as_text())
    assert dots == [("bf16", "bf16")] * 6, dots
  (value, grads), (ref_value, ref_grads) = grad(q, k, v, "bfloat16"), grad(q, k, v, "float32")
  np.testing.assert_allclose(value, ref_value, rtol=0.02, atol=0.02 * float(jnp.abs(w).sum()) ** 0.5)
  for ours, exact in zip(grads, ref_grads):
    error = float(jnp.linalg.norm(ours.astype(jnp.float32) - exact) / jnp.linalg.norm(exact))
    assert error < 0.02, error
  if mask is not None:  # an additive mask gets the logits' gradient (summed over what it broadcast to)
    mask_grad = jax.jit(jax.grad(lambda m, dtype: jnp.sum(attention(
        q.astype(dtype), k.astype(dtype), v.astype(dtype), heads, m).astype(jnp.float32) * w)), static_argnums=1)
    ours, exact = mask_grad(mask, "bfloat16"), mask_grad(mask, "float32")
    assert ours.shape == mask.shape
    assert float(jnp.linalg.norm(ours - exact) / jnp.linalg.norm(exact)) < 0.03


def test_remat_gives_identical_outputs_and_gradients():
  config = _tiny()
  model, variables = _init(config)
  config.model.remat = True
  model_remat = build_model(config.model)
  images, text = _batch(config)
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply(
      {"params": p, "batch_stats": variables["batch_stats"]}, images, text)["image_embeds"]**2)))(variables["params"])
  g, g_remat = loss(model), loss(model_remat)
  # Rematerialisation recomputes the forward inside the backward, where XLA may fuse (and so round)
  # differently: equal up to float32 reassociation. Gradients that are mathematically zero (biases
  # feeding BatchNorm) are pure rounding noise, hence an absolute floor relative to the largest gradient.
  scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(g))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), g, g_remat)


def test_cudnn_attention_hands_the_image_towers_attention_to_jax_nn(monkeypatch):
  """model.attention="cudnn" routes every attention of the image tower (blocks and the grouping
  blocks' cross-attention), and none of the causal text tower's, through jax.nn.dot_product_attention.
  On CPU its XLA implementation stands in for cuDNN's: outputs and gradients equal the default path's."""
  calls = []
  real = jax.nn.dot_product_attention

  def stand_in(q, k, v, implementation=None):
    assert implementation == "cudnn"
    calls.append(q.shape)
    return real(q, k, v, implementation="xla")

  monkeypatch.setattr(jax.nn, "dot_product_attention", stand_in)
  config = _tiny()
  model, variables = _init(config)
  routed = model.clone(attention="cudnn")
  images, text = _batch(config)

  def run(m):
    def loss(params):
      out = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, text)
      return jnp.sum(out["image_embeds"] * out["text_embeds"]) + jnp.sum(out["prompt_embeds"]**2), out
    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  g, out = run(model)
  assert not calls
  g_routed, out_routed = run(routed)
  # Tiny: 64 patches + 8 groups in 2 blocks, 8 groups from 64 tokens, 8 + 4 in 1 block, 4 groups from
  # 8 tokens, 4 in 1 block; batch 4, 2 heads of 16.
  assert calls == [(4, 72, 2, 16)] * 2 + [(4, 8, 2, 16), (4, 12, 2, 16), (4, 4, 2, 16), (4, 4, 2, 16)], calls
  for key in ("image_embeds", "text_embeds", "prompt_embeds"):
    np.testing.assert_allclose(out_routed[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)
  scale = max(float(np.abs(x).max()) for x in jax.tree_util.tree_leaves(g))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), g, g_routed)
  # Asked for in a config on a machine without cuDNN (or in float32), the model runs "xla" and says so.
  with mock.patch.object(logging, "warning") as warning:
    assert build_model(_tiny(attention="cudnn", dtype="bfloat16").model).attention == "xla"
  assert "model.attention='cudnn' needs an NVIDIA GPU" in warning.call_args[0][0]
  with pytest.raises(ValueError, match="model.attention must be one of"):
    build_model(_tiny(attention="flash").model)


def test_image_splits_give_the_same_outputs_noise_and_gradients():
  # The tiny config's hard gumbel assignment: each part must add its share of the whole batch's noise.
  config = _tiny()
  assert config.model.image.hard_assignment
  config.model.image_splits = 2
  assert build_model(config.model).image_splits == (2 if jax.device_count() == 1 else 1)
  model, variables = _init(config)
  model, split = model.clone(image_splits=1), model.clone(image_splits=2)
  images, text = _batch(config)
  rngs = {"gumbel": jax.random.key(3)}

  def train_step(m):
    def loss(params):
      out, updates = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, text,
                             train=True, mutable=["batch_stats"], rngs=rngs)
      return jnp.sum(out["image_embeds"] ** 2), (out["image_embeds"], updates)
    return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

  (g, (embeds, stats)), (g_split, (embeds_split, stats_split)) = train_step(model), train_step(split)
  # Products over half the batch may round differently, and at random init the projector's BatchNorm
  # magnifies that (the pooled features nearly agree): equal up to float32 reassociation, so tolerances
  # relative to the largest value.
  close = lambda a, b, tol: np.testing.assert_allclose(a, b, rtol=tol, atol=tol * float(np.abs(b).max()))
  leaves = jax.tree_util.tree_leaves
  scale = max(float(np.abs(x).max()) for x in leaves(g))
  print("\nimage_splits=2 vs 1: embeds %.1e, gradients %.1e (max abs difference over max abs value)" % (
      np.abs(embeds_split - embeds).max() / np.abs(embeds).max(),
      max(float(np.abs(a - b).max()) for a, b in zip(leaves(g_split), leaves(g))) / scale))
  close(embeds_split, embeds, 1e-4)
  # The projector's BatchNorm still sees the whole batch.
  jax.tree_util.tree_map(lambda a, b: close(b, a, 1e-4), stats, stats_split)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4 * scale), g, g_split)

  def encoder(m):
    return jax.jit(lambda key: m.apply(variables, images, train=True, rngs={"gumbel": key},
                                       method=m.encode_image, mutable=["batch_stats"])[0])
  encode, encode_split = encoder(model), encoder(split)
  whole, parts, clean = encode(rngs["gumbel"]), encode_split(rngs["gumbel"]), encode(jax.random.key(4))
  for stage, maps in enumerate(whole["assignments"]):
    np.testing.assert_array_equal(parts["assignments"][stage]["hard"], maps["hard"])
    np.testing.assert_allclose(parts["assignments"][stage]["soft"], maps["soft"], atol=1e-6)
  # Another key assigns differently, so the equality above is the noise's, not its absence's.
  assert not np.array_equal(clean["assignments"][0]["hard"], whole["assignments"][0]["hard"])
  # A batch it does not divide runs whole.
  assert split.apply(variables, images[:3], method=split.encode_image)["image_embeds"].shape[0] == 3


def test_short_text_gives_the_same_feature_as_full_context():
  config = _tiny()
  model, variables = _init(config)
  ctx, vocab = config.model.text.context_length, config.model.text.vocab_size
  text = np.zeros((2, ctx), np.int32)
  text[:, :4] = [[vocab - 2, 5, 9, vocab - 1], [vocab - 2, 7, vocab - 1, 0]]
  full = model.apply(variables, jnp.asarray(text), method=model.encode_text)
  short = model.apply(variables, jnp.asarray(text[:, :6]), method=model.encode_text)
  np.testing.assert_allclose(full, short, atol=1e-5)


def test_prompts_at_their_own_length_train_like_one_full_length_array():
  config = _tiny()
  model, variables = _init(config)
  ctx, vocab = config.model.text.context_length, config.model.text.vocab_size
  rng = np.random.RandomState(1)
  text = np.zeros((4, 3, ctx), np.int32)  # caption (12 tokens) + 2 prompts (5 tokens each)
  text[:, 0, 1:11] = rng.randint(1, vocab - 2, (4, 10))
  text[:, 1:, 1:4] = rng.randint(1, vocab - 2, (4, 2, 3))
  text[:, :, 0] = vocab - 2
  text[:, 0, 11] = text[:, 1:, 4] = vocab - 1
  text[0, 2] = text[0, 0]  # a prompt slot holding the (longer) caption itself ...
  prompts = text[:, 1:, :6].copy()
  prompts[0, 1] = 0  # ... is a row of zeros in the short layout
  images = jnp.asarray(rng.randn(4, 32, 32, 3), jnp.float32)
  rngs = {"gumbel": jax.random.key(0), "dropout": jax.random.key(1)}

  @jax.jit
  def run(*args, **kw):
    out, updates = model.apply(variables, images, *args, train=True, rngs=rngs, mutable=["batch_stats"], **kw)
    return out, updates["batch_stats"]

  one, stats_one = run(jnp.asarray(text))
  apart, stats_apart = run(jnp.asarray(text[:, 0]), prompts=jnp.asarray(prompts))
  for key in ("image_embeds", "text_embeds", "prompt_embeds"):  # batch statistics span all 12 texts in both
    np.testing.assert_allclose(one[key], apart[key], rtol=1e-5, atol=1e-6, err_msg=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats_one, stats_apart)
  with pytest.raises(ValueError, match=r"text must be \[batch, length\]"):
    model.apply(variables, images, jnp.asarray(text), prompts=jnp.asarray(text[:, 1:]))
