"""XLA:CPU kernels for bfloat16 compute: every matrix product, forward and backward, as bf16 x bf16 -> f32.

XLA:CPU runs a bf16 product natively (YNNPACK; AVX512-BF16 or AMX) only when both operands are bf16
row-major arrays and the result is float32; JAX's own gradients make f32 x bf16 products and transposed
operands, which it runs upcast to float32 at about half the rate. These formulations keep every product
native. They are chosen by `model.kernels="cpu"` (the layers read it through `layers.use_kernels`); the
default `"xla"` is the plain formulation every backend runs well.
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Dtype = Any


def _f32_products_supported(rows: int, n_in: int, n_out: int) -> bool:
  """Whether XLA:CPU can run bf16 x bf16 -> f32 for all three products of a [rows, in] @ [in, out]
  matmul and its gradients. It does so only through YNNPACK, which takes no vector (an extent of 1)
  and no product whose extents are all below 8; its fallback (Eigen's DotThunk) rejects that dtype
  combination at run time ("Unsupported element type ... BF16 x BF16 = F32"). Rows may be split
  over every device (data parallelism), so they are counted per device.
  """
  return ynn_extents(rows // max(1, jax.device_count()), n_in, n_out)


def ynn_extents(*extents: int) -> bool:
  """Whether YNNPACK takes a product with these extents (no vector, not all below 8)."""
  return min(extents) > 1 and max(extents) >= 8


def _with_zero_row(x: jax.Array, *axes: int) -> jax.Array:
  """`x` with one zero slice appended along each of `axes`.

  XLA folds a transpose that feeds a product into the product's dimension numbers, and XLA:CPU then
  runs a bf16 x bf16 -> f32 product that is not row-major upcast to float32 (or, for some batched
  layouts, hands it to the dot path that rejects it). A padded array is one XLA cannot fold: it is
  written out once, row-major. The extra products are exact zeros; callers drop their outputs.
  """
  pad = [(0, 0)] * x.ndim
  for axis in axes:
    pad[axis] = (0, 1)
  return jnp.pad(x, pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x: jax.Array, kernel: jax.Array, dtype: Dtype, precision: Any = None) -> jax.Array:
  """`[rows, in] @ [in, out]` with both operands rounded to `dtype` and a float32 result.

  The two gradient products run the same way: the float32 cotangent is rounded to `dtype` once and
  each product accumulates into float32, so under bfloat16 all three products are bf16 x bf16 -> f32,
  which XLA:CPU runs with native bf16 kernels (YNNPACK, AVX512-BF16) at about twice its float32 rate.
  A bf16 -> bf16 product, or the f32 x bf16 ones JAX's own gradient of a float32-output product
  makes, run upcast to float32. PyTorch's bf16 autocast is the same arithmetic (bf16 products, f32
  accumulation). Gradients come back in the operands' own dtypes: a float32 kernel gets its float32
  accumulation without a bf16 rounding. With float32 `dtype` these are the products JAX's autodiff
  of `x @ kernel` makes (`affine` then uses that directly).
  """
  return _matmul_fwd(x, kernel, dtype, precision)[0]


def _matmul_fwd(x, kernel, dtype, precision):
  rows, n_in = x.shape
  if not _f32_products_supported(rows, n_in, kernel.shape[1]):
    dtype = jnp.float32  # tiny or vector-shaped: float32 operands (exact for bf16 values)
  xc, kc = x.astype(dtype), kernel.astype(dtype)
  out = jax.lax.dot(xc, kc, precision=precision, preferred_element_type=jnp.float32)
  # Empty arrays carry the operands' dtypes to the backward pass (residuals must be arrays).
  return out, (xc, kc, jnp.zeros((0,), x.dtype), jnp.zeros((0,), kernel.dtype))


def _matmul_bwd(dtype, precision, residuals, g):
  xc, kc, x_dtype, kernel_dtype = residuals
  g = g.astype(xc.dtype)
  contract = lambda a, b, dims: jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                                                    preferred_element_type=jnp.float32)
  dx = contract(g, kc, ((1,), (1,)))  # [rows, out] . [in, out] -> [rows, in]
  n_in, n_out = kc.shape
  if jnp.dtype(xc.dtype) != jnp.float32:
    # XLA:CPU upcasts x^T g (contracting dim 0 of x) to float32 unless the transposed side is a
    # row-major array of its own (GroupViT-S bf16 step: 1.42 -> 1.18 s with it). That costs a
    # transpose, so it is made of the cheaper side: x^T, or g^T and the float32 result (g^T x)^T.
    if _cotangent_side_cheaper(xc.shape[0], n_in, n_out):
      dk = contract(_with_zero_row(g.T, 0), xc, ((1,), (0,)))[:n_out].T
    else:
      dk = contract(_with_zero_row(xc.T, 0), g, ((1,), (0,)))[:n_in]
  else:
    dk = contract(xc, g, ((0,), (0,)))  # [rows, in] . [rows, out] -> [in, out]
  return dx.astype(x_dtype.dtype), dk.astype(kernel_dtype.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _cotangent_side_cheaper(rows: int, n_in: int, n_out: int) -> bool:
  """Whether a bf16 kernel gradient moves fewer bytes through transposes as (g^T x)^T than as x^T g:
  rows x out bf16 values and the out x in float32 result against rows x in bf16 values (rows per
  device). Wide-in, narrow-out layers (an MLP's second Dense) at many rows; standalone on the Zen 4
  CPU, [5120, 256]^T [5120, 64] 2.3 -> 1.3 ms, [2080, 1536]^T [2080, 384] 11.4 -> 8.4 ms, while at
  [768, 1536]^T [768, 384] the float32 result's transpose makes it slower (2.9 -> 3.3 ms).
  """
  rows //= max(1, jax.device_count())
  return rows * (n_in - n_out) > 2 * n_in * n_out


def attention_heads_major(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
                           mask: Optional[jax.Array]) -> jax.Array:
  """`layers.attention` below float32 on CPU: heads moved next to the batch and every product, forward and
  backward, a row-major batched bf16 x bf16 -> f32 product (`_attention_core`), which XLA:CPU runs
  natively at about twice the rate of the upcast bf16 -> bf16 einsums (GroupViT-S stage-1 attention
  [8, 260, 384], 6 heads, fwd+bwd: 0.57-0.79x the einsums' time; the bf16 train step 0.92x)."""
  b, n, c = q.shape
  s = k.shape[1]
  head_dim = c // num_heads
  heads = lambda x, t: jnp.swapaxes(x.reshape(b, t, num_heads, head_dim), 1, 2).reshape(-1, t, head_dim)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = mask[0] if mask.shape[:2] == (1, 1) else jnp.broadcast_to(mask, (b, num_heads, n, s)).reshape(-1, n, s)
  out = _attention_core(heads(q * head_dim**-0.5, n), heads(k, s), heads(v, s), mask)
  return jnp.swapaxes(out.reshape(b, num_heads, n, head_dim), 1, 2).reshape(b, n, c)


def batched_dot(a: jax.Array, b: jax.Array, b_contracting: int) -> jax.Array:
  """[B, m, k] x [B, k, n] (`b_contracting` 1) or [B, n, k] (2) -> float32 [B, m, n]."""
  return jax.lax.dot_general(a, b, (((2,), (b_contracting,)), ((0,), (0,))), preferred_element_type=jnp.float32)


def _attention_core_fwd(q, k, v, mask):
  n, s, d = q.shape[1], k.shape[1], v.shape[2]
  # Every operand that XLA could fold a transpose into is padded (see _with_zero_row); the padded
  # rows' outputs are sliced off.
  qp, kp, vp = _with_zero_row(q, 1), _with_zero_row(k, 1), _with_zero_row(v, 2)
  logits = batched_dot(qp, kp, 2)[:, :n, :s]
  if mask is not None:
    logits = logits + mask
  weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True)).astype(q.dtype)
  denom = jnp.sum(weights, axis=-1, keepdims=True, dtype=jnp.float32)
  out = batched_dot(weights, vp, 1)[:, :, :d] / denom
  return out.astype(q.dtype), (qp, kp, vp, weights, denom, out, mask)


def _attention_core_bwd(residuals, g):
  qp, kp, vp, weights, denom, out, mask = residuals
  s, dtype = weights.shape[2], weights.dtype
  g = g.astype(jnp.float32)
  d_unnormalised = (g / denom).astype(dtype)  # [B, n, d]
  d_denom = -jnp.sum(g * out, axis=-1, keepdims=True) / denom  # [B, n, 1]
  d_weights = batched_dot(_with_zero_row(d_unnormalised, 2), vp, 2) + d_denom  # [B, n, s]
  dv = batched_dot(_with_zero_row(jnp.swapaxes(weights, 1, 2), 1), d_unnormalised, 1)[:, :s]
  d_logits_f32 = d_weights * weights.astype(jnp.float32)
  d_logits = d_logits_f32.astype(dtype)
  dq = batched_dot(_with_zero_row(d_logits, 2), kp, 1)
  dk = batched_dot(_with_zero_row(jnp.swapaxes(d_logits, 1, 2), 1, 2), qp, 1)[:, :s]
  # An additive mask's gradient is the logits' (summed where it was broadcast); XLA drops it when the
  # mask is a constant.
  d_mask = None if mask is None else d_logits_f32.sum(axis=0, keepdims=True) if mask.shape[0] == 1 else d_logits_f32
  return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype), d_mask


@jax.custom_vjp
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """softmax(q k^T + mask) v for [B, n, d] queries and [B, s, d] keys and values, as `attention`
  computes it ((exp(l - max) v) / sum, float32 softmax), with all six products of forward and
  backward bf16 x bf16 -> f32 over row-major operands; the weights and the logits' gradient are
  rounded to the compute dtype once (as PyTorch's autocast rounds the softmax for its product)."""
  return _attention_core_fwd(q, k, v, mask)[0]


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)
