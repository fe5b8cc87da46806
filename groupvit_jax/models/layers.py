"""Building blocks shared by the image and text towers.

Every parameter carries logical axis names (see `groupvit_jax.sharding`) so the trainer can shard it;
compute runs in `dtype` over float32 parameters, with softmaxes kept in float32.
"""

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from groupvit_jax.models import cpu_kernels

Dtype = Any
Initializer = Callable[..., jax.Array]

# The reference (PyTorch) LayerNorm epsilon; Flax's default is 1e-6.
LN_EPS = 1e-5

normal = nn.initializers.normal
zeros = nn.initializers.zeros
ones = nn.initializers.ones
# PyTorch's default Linear/Conv weight init: kaiming_uniform(a=sqrt(5)) == U(±1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> Initializer:
  """PyTorch's default Linear/Conv bias init: U(±1/sqrt(fan_in))."""
  bound = fan_in**-0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: tuple[Optional[str], ...]) -> jax.Array:
  """Declares a float32 parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), jnp.float32)


# Which formulation of the products the layers trace: "xla" (plain) or "cpu" (cpu_kernels, for bfloat16
# on XLA:CPU). Set from `model.kernels` by the model's entry points, for the duration of a trace.
KERNELS = ("xla", "cpu")
_KERNELS = contextvars.ContextVar("groupvit_jax_kernels", default="xla")


@contextlib.contextmanager
def use_kernels(kernels: str) -> Iterator[None]:
  """Traces the layers inside with `kernels` ("xla" or "cpu")."""
  if kernels not in KERNELS:
    raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
  token = _KERNELS.set(kernels)
  try:
    yield
  finally:
    _KERNELS.reset(token)


def _cpu_bf16(dtype: Dtype) -> bool:
  return _KERNELS.get() == "cpu" and jnp.dtype(dtype) != jnp.float32


def affine(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], dtype: Dtype,
           precision: Any = None) -> jax.Array:
  """`[rows, in] @ [in, out]` with `dtype` operands and a float32 result, plus the bias in float32,
  rounded once to `dtype`. Under bfloat16 the bias gradient is then a float32 sum (XLA:CPU rewrites
  bfloat16 sums into slow windowed reductions; see Dense). With the "cpu" kernels, below float32 the
  product and its gradients are `cpu_kernels.matmul`.
  """
  if _cpu_bf16(dtype):
    y = cpu_kernels.matmul(x, kernel, jnp.dtype(dtype), precision)
  else:
    y = jax.lax.dot(x.astype(dtype), kernel.astype(dtype), precision=precision,
                    preferred_element_type=jnp.float32)
  return (y if bias is None else y + bias).astype(dtype)


class Dense(nn.Dense):
  """nn.Dense (same parameters) that runs `[..., in]` inputs as one `[rows, in]` product and adds the
  bias in the parameters' float32.

  - On a `[batch, tokens, in]` input nn.Dense's kernel gradient contracts two axes at once, which
    XLA:CPU runs as a generic contraction 2-2.5x slower than the 2-D product (GroupViT's demo step: a
    fifth of its time in these); flattening first makes it a plain matmul.
  - nn.Dense adds the bias in `dtype`, so under bfloat16 the bias gradient is a bfloat16 sum over all
    rows, which XLA:CPU rewrites into a slow windowed reduction (15-20 % of the demo towers'
    backward). Adding it in float32 (one rounding to `dtype` after the add) makes that sum float32.
  - Below float32 the product has `dtype` operands and a float32 result (`affine`; with the "cpu"
    kernels its backward's products are `dtype` x `dtype` -> float32 too, see `cpu_kernels.matmul`).
  With float32 compute these are the same operations as nn.Dense's.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(inputs, kernel)
    x = inputs.reshape(-1, inputs.shape[-1]) if inputs.ndim > 2 else inputs
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    return affine(x, kernel, bias, dtype, self.precision).reshape(*inputs.shape[:-1], self.features)


def dense(features: int, axes: tuple[Optional[str], Optional[str]], *, name: str, dtype: Dtype,
          std: float = 0.02, use_bias: bool = True, kernel_init: Optional[Initializer] = None,
          bias_init: Optional[Initializer] = None) -> nn.Dense:
  """A Dense layer with N(0, std) kernel (the reference's Linear init) and logical axes."""
  return Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(kernel_init or normal(std), axes),
      bias_init=nn.with_logical_partitioning(bias_init or zeros, (axes[1],)),
      name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with float32 statistics (parameters `scale`, `bias` as nn.LayerNorm's).

  Computes ((x - mean) * rsqrt(var + eps)) * scale + bias with a two-pass variance, as PyTorch does
  (nn.LayerNorm: E[x^2] - E[x]^2, and the scale folded into rsqrt(var + eps) first). Closer to the
  reference (parity errors 2-7x smaller) and faster under XLA:CPU: the demo image tower's fwd+bwd
  82-84 -> 78-79 ms in fp32, 105-109 -> 90 ms in bf16. XLA:CPU still materialises each scale broadcast
  to the activation's shape as an operand of the backward's fusions (~3 % of the demo step).
  """
  epsilon: float = LN_EPS
  dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = param_with_axes(self, "scale", ones, (features,), (self.axis_name,))
    bias = param_with_axes(self, "bias", zeros, (features,), (self.axis_name,))
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    return (centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def layer_norm(name: str, dtype: Dtype, axis_name: str = "embed") -> LayerNorm:
  """LayerNorm with the reference's epsilon, float32 statistics and logical axes."""
  return LayerNorm(dtype=dtype, axis_name=axis_name, name=name)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


_SQRT_HALF = math.sqrt(0.5)  # a Python float: weakly typed, keeps x.dtype


def exact_gelu(x: jax.Array) -> jax.Array:
  """GELU with erf, as PyTorch's nn.GELU() (not the tanh approximation): 0.5 x (1 + erf(x / sqrt 2)).

  PyTorch's own formula. jax.nn.gelu(approximate=False) goes through erfc, which XLA:CPU evaluates
  ~2.7x slower (forward; 1.7x with the gradient) for the same float32 accuracy.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 over the last axis.

  With `mix_tokens`, the MLP runs across the token axis instead ([B, N, C] -> [B, M, C]),
  as the reference's MixerMlp / token-mixing MLP does.
  """
  hidden: int
  out: int
  dtype: Dtype = jnp.float32
  activation: Callable[[jax.Array], jax.Array] = exact_gelu
  mix_tokens: bool = False
  fc1_std: float = 0.02
  fc2_std: float = 0.02
  axes: tuple[str, str, str] = ("embed", "mlp", "embed")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mix_tokens:
      x = jnp.swapaxes(x, -1, -2)
    x = dense(self.hidden, self.axes[:2], name="fc1", dtype=self.dtype, std=self.fc1_std)(x)
    # In float32, rounded once to `dtype` (as PyTorch's autocast GELU): in bfloat16 XLA:CPU would round
    # after every elementwise op of the activation and of its gradient.
    x = self.activation(x.astype(jnp.float32)).astype(x.dtype)
    x = dense(self.out, self.axes[1:], name="fc2", dtype=self.dtype, std=self.fc2_std)(x)
    if self.mix_tokens:
      x = jnp.swapaxes(x, -1, -2)
    return x


ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              mask: Optional[jax.Array] = None, implementation: str = "xla") -> jax.Array:
  """Multi-head scaled dot-product attention with a float32 softmax.

  Args:
    q: [batch, queries, dim]; k, v: [batch, keys, dim].
    num_heads: heads to split `dim` into.
    mask: optional additive mask broadcastable to [batch, heads, queries, keys].
    implementation: "xla" (the products and softmax below, compiled by XLA) or "cudnn": without a
      mask, `jax.nn.dot_product_attention`'s fused cuDNN kernel (NVIDIA GPUs, bf16/fp16: the logits
      never reach memory); with a mask (the causal text tower) "xla" still.
  Returns:
    [batch, queries, dim] in q's dtype.

  Below float32 on CPU (more than one query) the same arithmetic runs through
  `cpu_kernels.attention_heads_major` with the "cpu" kernels (`use_kernels`), whose products XLA:CPU
  runs as native bf16 kernels.
  """
  b, n, c = q.shape
  s = k.shape[1]
  head_dim = c // num_heads
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation == "cudnn" and mask is None:
    split = lambda x, t: x.reshape(b, t, num_heads, head_dim)
    out = jax.nn.dot_product_attention(split(q, n), split(k, s), split(v, s), implementation="cudnn")
    return out.reshape(b, n, c)
  if _cpu_bf16(q.dtype) and cpu_kernels.ynn_extents(n, s, head_dim):
    return cpu_kernels.attention_heads_major(q, k, v, num_heads, mask)
  q = q.reshape(b, n, num_heads, head_dim)
  k = k.reshape(b, s, num_heads, head_dim)
  v = v.reshape(b, s, num_heads, head_dim)
  # Scaling q rather than the logits: the same numbers for head_dim = 16, 64, 256 (a power-of-two
  # scale), and XLA:CPU then does not materialise a [batch, heads, queries, keys] scale array per call.
  q = q * head_dim**-0.5
  logits = jnp.einsum("bnhd,bshd->bhns", q, k).astype(jnp.float32)
  if mask is not None:
    logits = logits + mask
  # softmax(l) @ v computed as (exp(l - max) @ v) / sum: the normalisation divides the [.., head_dim]
  # output instead of the [.., keys] weights, which on CPU saves materialising two score-sized arrays.
  unnormalised = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  denom = unnormalised.sum(axis=-1)  # [b, h, n]
  out = jnp.einsum("bhns,bshd->bnhd", unnormalised.astype(v.dtype), v)
  # Divided in float32 (one rounding to v's dtype): the denominator's gradient then sums in float32.
  out = (out / jnp.swapaxes(denom, 1, 2)[..., None]).astype(v.dtype)
  return out.reshape(b, n, c)


class SelfAttention(nn.Module):
  """Multi-head self-attention with one fused q|k|v projection (names as the reference's)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  qkv_name: str = "qkv"
  out_name: str = "proj"
  qkv_std: float = 0.02
  out_std: float = 0.02
  implementation: str = "xla"  # `attention`'s

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               query_index: Optional[jax.Array] = None) -> jax.Array:
    """[batch, tokens, dim] -> the same, or with `query_index` ([batch] ints) only the output at that
    token of each sequence, [batch, 1, dim] (every token still serves as key and value)."""
    c = x.shape[-1]
    qkv = dense(3 * c, ("embed", "heads"), name=self.qkv_name, dtype=self.dtype, std=self.qkv_std)(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if query_index is not None:
      q = jnp.take_along_axis(q, query_index[:, None, None], axis=1)
    out = attention(q, k, v, self.num_heads, mask, self.implementation)
    return dense(c, ("heads", "embed"), name=self.out_name, dtype=self.dtype, std=self.out_std)(out)


class CrossAttention(nn.Module):
  """Multi-head attention from queries to separate keys/values (q_proj, k_proj, v_proj, proj)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "xla"  # `attention`'s

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array) -> jax.Array:
    c = query.shape[-1]
    proj = lambda name: dense(c, ("embed", "heads"), name=name, dtype=self.dtype)
    out = attention(proj("q_proj")(query), proj("k_proj")(key), proj("v_proj")(key), self.num_heads,
                    implementation=self.implementation)
    return dense(c, ("heads", "embed"), name="proj", dtype=self.dtype)(out)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (rng stream 'dropout')."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class BatchNorm(nn.Module):
  """BatchNorm1d with PyTorch semantics over all leading axes.

  Differs from flax.linen.BatchNorm in what the reference needs for identical training: the running
  variance is updated with the *unbiased* batch variance, and momentum is PyTorch's (weight of the
  new batch, 0.1). On global (jit-sharded) arrays the statistics span the whole global batch, which
  is what the reference's SyncBatchNorm computes.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  axis_name: str = "mlp"

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    features = x.shape[-1]
    scale = param_with_axes(self, "scale", ones, (features,), (self.axis_name,))
    bias = param_with_axes(self, "bias", zeros, (features,), (self.axis_name,))
    # Running statistics are tiny ([features]) and stay replicated, so they carry no axis names.
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axis=reduce_axes)
      var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
      if not self.is_initializing():
        n = x.size // features
        unbiased = var * (n / max(n - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)
