"""Resizing that reproduces PyTorch's F.interpolate(align_corners=False, antialias=False).

jax.image.resize uses a bicubic kernel with a = -0.5 (PyTorch: -0.75) and antialiases when it
downsamples, so the reference's position-embedding resize and its bilinear upsampling of assignment
maps cannot be matched with it. Both are separable, so each is one small [out, in] matrix per axis.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's upsample_bicubic2d constant.


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Weights of taps at offsets -1, 0, 1, 2 for fractional position t: [n] -> [n, 4]."""
  a = _CUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """The [out_size, in_size] float64 matrix of a 1-D PyTorch resize (align_corners=False).

  Args:
    in_size: source length.
    out_size: target length.
    method: "bicubic" or "bilinear".
  Returns:
    A matrix M such that `M @ signal` is the resized signal.
  """
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  src = scale * (dst + 0.5) - 0.5
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == "bicubic":
    base = np.floor(src)
    weights = _cubic_weights(src - base)
    for tap in range(4):
      idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
      np.add.at(m, (rows, idx), weights[:, tap])
  elif method == "bilinear":
    src = np.maximum(src, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
  else:
    raise ValueError(f"resize method must be 'bicubic' or 'bilinear', got {method!r}")
  return m


def resize_2d(x: jax.Array, out_hw: tuple[int, int], method: str, axes: tuple[int, int] = (-3, -2)
              ) -> jax.Array:
  """Resizes two axes of `x` (default: [..., H, W, C]) exactly as PyTorch's interpolate would.

  Args:
    x: array whose `axes` are the spatial height and width.
    out_hw: target (height, width).
    method: "bicubic" or "bilinear".
    axes: which axes of x are height and width.
  Returns:
    The resized array, in x's dtype (the arithmetic runs in float32).
  """
  h_ax, w_ax = (a % x.ndim for a in axes)
  mh = jnp.asarray(resize_matrix(x.shape[h_ax], out_hw[0], method), jnp.float32)
  mw = jnp.asarray(resize_matrix(x.shape[w_ax], out_hw[1], method), jnp.float32)
  precision = jax.lax.Precision.HIGHEST
  y = jnp.moveaxis(x.astype(jnp.float32), (h_ax, w_ax), (-2, -1))
  y = jnp.einsum("oh,...hw->...ow", mh, y, precision=precision)
  y = jnp.einsum("pw,...ow->...op", mw, y, precision=precision)
  return jnp.moveaxis(y, (-2, -1), (h_ax, w_ax)).astype(x.dtype)
