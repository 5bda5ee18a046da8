"""A 3x3 convolution whose filter gradient is computed as one matmul, for XLA's CPU backend.

On the CPU, XLA writes the filter gradient of a convolution as another convolution whose
window is the whole image, and its library (YNNPACK) runs that shape at about half the
rate of the forward convolution (bench/README.md, sessions 6 and 14). The same gradient is

  dW[kh, kw, c, o] = sum_{b, h, w} x[b, h, w, c] * dy[b, h + 1 - kh, w + 1 - kw, o],

one [C, B*H*W] x [B*H*W, 9*O] matmul against nine shifted copies of the output gradient
dy, which runs 30-65% faster at 16x16 and 8x8 and takes 6-7% off whole train steps of
the CPU benchmark and the shapes SR stage (measured in one process, alternating). The
forward and the input gradient stay XLA's own. `Conv` uses it on the CPU only: GPUs and
TPUs have fast filter-gradient kernels of their own.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Images up to this many pixels (32x32): the sizes measured. Larger ones keep XLA's.
MAX_PIXELS = 32 * 32


def use_for(x_shape, kernel_size: int, stride: int) -> bool:
  """Whether `Conv` should use `conv3x3` for an NHWC input of this shape."""
  return (kernel_size == 3 and stride == 1 and jax.default_backend() == "cpu"
          and x_shape[1] * x_shape[2] <= MAX_PIXELS)


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def filter_gradient(x: jax.Array, dy: jax.Array) -> jax.Array:
  """dW [3, 3, C, O] of a stride-1, padding-1 3x3 convolution of x [B, H, W, C] whose
  output gradient is dy [B, H, W, O]."""
  _, h, w, c = x.shape
  o = dy.shape[-1]
  dy_padded = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tap (kh, kw) reads dy shifted by (1 - kh, 1 - kw): the window starting at (2 - kh, 2 - kw).
  shifted = jnp.concatenate([dy_padded[:, 2 - kh:2 - kh + h, 2 - kw:2 - kw + w, :]
                             for kh in range(3) for kw in range(3)], axis=-1)
  dw = jnp.einsum("bhwc,bhwk->ck", x, shifted, preferred_element_type=jnp.float32)
  return jnp.transpose(dw.reshape(c, 3, 3, o), (1, 2, 0, 3))


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """NHWC x HWIO 3x3 convolution, stride 1, padding 1 (no bias)."""
  return _conv(x, kernel)


def _conv3x3_fwd(x, kernel):
  # symbolic_zeros: the primals say whether they are differentiated, so that the backward
  # computes no input gradient for an input that needs none (the stem's image).
  return _conv(x.value, kernel.value), (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _conv3x3_bwd(residuals, dy):
  x, kernel, x_perturbed, kernel_perturbed = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  dx = dw = None  # None: a zero cotangent
  if x_perturbed:
    # XLA's input gradient, without re-tracing the forward as jax.vjp would.
    (dx,) = jax.linear_transpose(lambda x_: _conv(x_, kernel), x)(dy)
  if kernel_perturbed:
    dw = filter_gradient(x, dy).astype(kernel.dtype)
  return dx, dw


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd, symbolic_zeros=True)
