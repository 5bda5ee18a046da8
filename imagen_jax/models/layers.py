"""U-Net building blocks (Flax linen), every parameter named with logical axes.

The wrappers here exist for two reasons: flax's own layers cannot attach three
logical names to a DenseGeneral kernel on flax 0.12, and the U-Net's hot spots on
CPU (GroupNorm followed by the FiLM scale-shift) are cheaper as one fused affine
computed from per-channel statistics than as flax's 5-D reshape + two passes.

Conventions: parameters are float32; `dtype` is the compute dtype; statistics,
softmaxes and norms are computed in float32 and cast back.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models import conv_cpu
from imagen_jax.parallel.axes import (
    ACT_EMBED, BATCH, CONV_H, CONV_IN, CONV_OUT, CONV_W, EMBED, HEADS, HEIGHT, KV,
    LENGTH, MLP, NORM, WIDTH)

Dtype = Any
Initializer = Any

# Logits at masked positions. exp(NEG_INF - max) underflows to exactly 0 in float32,
# so masked tokens contribute exactly nothing (tests rely on this).
NEG_INF = -1e9

IMAGE_AXES = (BATCH, HEIGHT, WIDTH, ACT_EMBED)
TOKEN_AXES = (BATCH, LENGTH, ACT_EMBED)


def _param(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
           names: Sequence[Optional[str]]) -> jax.Array:
  """A float32 parameter carrying logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(names)),
                      tuple(shape), jnp.float32)


def constrain_image(x: jax.Array) -> jax.Array:
  return nn.with_logical_constraint(x, IMAGE_AXES)


class Dense(nn.Module):
  """y = x @ W + b over the last axis; `names` are the kernel's (in, out) axes."""
  features: int
  names: tuple = (EMBED, MLP)
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = _param(self, "kernel", self.kernel_init,
                    (x.shape[-1], self.features), self.names)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = _param(self, "bias", nn.initializers.zeros, (self.features,),
                    (self.names[-1],))
      y = y + bias.astype(self.dtype)
    return y


class Conv(nn.Module):
  """NHWC convolution with an HWIO kernel; symmetric padding k//2 (as in ADM)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    kernel = _param(self, "kernel", init, (k, k, x.shape[-1], self.features),
                    (CONV_H, CONV_W, CONV_IN, CONV_OUT))
    bias = _param(self, "bias", nn.initializers.zeros, (self.features,), (CONV_OUT,))
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    if k == 1 and self.stride == 1:
      # A 1x1 conv is a matmul; skip the conv machinery.
      y = jnp.dot(x, kernel[0, 0])
    elif conv_cpu.use_for(x.shape, k, self.stride):
      y = conv_cpu.conv3x3(x, kernel)  # its filter gradient as one matmul (see conv_cpu)
    else:
      pad = k // 2
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride),
          padding=((pad, pad), (pad, pad)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


# GroupNorm's input passes materialize_grad. A switch for A/B timings only
# (bench/train_step.py --variants=default,no_groupnorm_barrier).
GROUPNORM_GRAD_BARRIER = True


@jax.custom_vjp
def materialize_grad(x: jax.Array) -> jax.Array:
  """The identity, whose gradient XLA computes once and stores instead of recomputing
  it inside every consumer.

  Why: along the residual stream each GroupNorm's input gradient is a sum of
  elementwise terms that only becomes concrete in the next block down. XLA fuses such
  chains into each of their consumers (the convs' and dots' gradient inputs and the
  next GroupNorm's reductions), so on the CPU a chain of a dozen GroupNorm backward
  terms was recomputed 4+ times per tensor: ~0.25 s of a 2.2 s step, in fusions of 300+
  ops (bench/README.md, session 14). An optimization barrier on the cotangent ends each
  chain where it is made. Values are unchanged; only fusion decisions change.
  """
  return x


def _materialize_grad_fwd(x):
  return x, None


def _materialize_grad_bwd(_, g):
  return (jax.lax.optimization_barrier(g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


def groups_for(channels: int, num_groups: int) -> int:
  """GroupNorm groups for `channels`: `num_groups` clipped to divide `channels`.

  The config validates that every level width is divisible by min(num_groups, width);
  the gcd also covers widths made by concatenating skips (sums of level widths).
  """
  return math.gcd(channels, num_groups)


class GroupNorm(nn.Module):
  """GroupNorm over an NHWC (or N...C) tensor, optionally fused with a FiLM.

  Statistics are reduced per channel over the spatial axes ([B, C]) and then pooled
  per group, so the big tensor is never reshaped to 5-D. The variance is two-pass
  (mean of squared deviations), which stays accurate when |mean| >> std. The norm,
  its affine and the FiLM `(1 + scale), shift` collapse into one `x * a + b`.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               scale_shift: Optional[tuple[jax.Array, jax.Array]] = None) -> jax.Array:
    channels = x.shape[-1]
    groups = groups_for(channels, self.num_groups)
    per_group = channels // groups
    batch = x.shape[0]
    spatial = tuple(range(1, x.ndim - 1))
    bshape = (batch,) + (1,) * len(spatial) + (channels,)

    def pool_groups(stat_c):  # [B, C] -> mean over each group, broadcast back to [B, C]
      stat_g = stat_c.reshape(batch, groups, per_group).mean(-1)
      return jnp.repeat(stat_g, per_group, axis=-1)

    if GROUPNORM_GRAD_BARRIER:
      x = materialize_grad(x)  # see materialize_grad: each GroupNorm's dx computed once
    xf = x.astype(jnp.float32)
    mean = pool_groups(jnp.mean(xf, axis=spatial))
    var = pool_groups(jnp.mean(jnp.square(xf - mean.reshape(bshape)), axis=spatial))
    inv = jax.lax.rsqrt(var + self.epsilon)
    gamma = _param(self, "scale", nn.initializers.ones, (channels,), (NORM,))
    beta = _param(self, "bias", nn.initializers.zeros, (channels,), (NORM,))
    a = gamma * inv
    b = beta - mean * a
    if scale_shift is not None:
      scale, shift = scale_shift
      a = a * (1.0 + scale.astype(jnp.float32))
      b = b * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    a = a.reshape(bshape).astype(self.dtype)
    b = b.reshape(bshape).astype(self.dtype)
    return x.astype(self.dtype) * a + b


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, computed in float32."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    gamma = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (NORM,))
    beta = _param(self, "bias", nn.initializers.zeros, (x.shape[-1],), (NORM,))
    return (y * gamma + beta).astype(self.dtype)


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Transformer-style embedding of continuous t in [0, 1] -> [B, dim] float32.

  t is scaled by 1000 so that the lowest frequencies resolve steps of a typical
  1000-step discretisation, as in DDPM/ADM.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimeEmbedding(nn.Module):
  """Continuous time t [B] -> sinusoid -> MLP -> [B, features]."""
  features: int
  sinusoid_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = sinusoidal_embedding(t, self.sinusoid_dim)
    h = Dense(self.features, names=(EMBED, MLP), dtype=self.dtype, name="dense_in")(h)
    h = nn.silu(h)
    return Dense(self.features, names=(MLP, EMBED), dtype=self.dtype, name="dense_out")(h)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def pad_keys(k: jax.Array, v: jax.Array, mask: Optional[jax.Array], multiple: int):
  """k, v [B, S, H, D] and mask [B, S] padded along S to a multiple of `multiple` with
  masked-out keys (an output-preserving change: they get exactly zero weight)."""
  pad = -k.shape[1] % multiple
  if not pad:
    return k, v, mask
  mask = jnp.ones(k.shape[:2], bool) if mask is None else mask
  k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
  return k, v, jnp.pad(mask, ((0, 0), (0, pad)))


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array] = None, impl: str = "einsum") -> jax.Array:
  """Multi-head attention. q [B, N, H, D], k/v [B, S, H, D], mask [B, S] bool.

  Logits and softmax in float32; masked logits get exactly zero weight.
  impl: "einsum" (explicit einsums and softmax, the default), or
  `jax.nn.dot_product_attention` with implementation "xla" (XLA's fused attention
  path) or "cudnn" (cuDNN's fused kernel: NVIDIA GPUs, bfloat16/float16 only).
  """
  if impl != "einsum":
    if impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention impl={impl!r}: use one of {ATTENTION_IMPLS}.")
    if impl == "cudnn":  # its flash attention (the training path) takes keys in 64s
      k, v, mask = pad_keys(k, v, mask, multiple=64)
    if mask is not None:  # [B, 1, N, S]: cuDNN wants the query length spelled out
      mask = jnp.broadcast_to(mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5,
                                        implementation=impl)
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bnhd,bshd->bhns", q, k,
                      preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, NEG_INF)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhns,bshd->bnhd", weights, v)


def _heads_proj(module: nn.Module, name: str, x: jax.Array, heads: int,
                head_dim: int, dtype: Dtype) -> jax.Array:
  """[..., C] -> [..., heads, head_dim] with an (EMBED, HEADS, KV) kernel."""
  kernel = _param(module, name, nn.initializers.lecun_normal(),
                  (x.shape[-1], heads, head_dim), (EMBED, HEADS, KV))
  return jnp.einsum("...c,chd->...hd", x.astype(dtype), kernel.astype(dtype))


def _out_proj(module: nn.Module, x: jax.Array, features: int, dtype: Dtype) -> jax.Array:
  """[..., heads, head_dim] -> [..., features] with a (HEADS, KV, EMBED) kernel."""
  heads, head_dim = x.shape[-2:]
  kernel = _param(module, "out_kernel",
                  nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                   in_axis=(0, 1), out_axis=2),
                  (heads, head_dim, features), (HEADS, KV, EMBED))
  bias = _param(module, "out_bias", nn.initializers.zeros, (features,), (EMBED,))
  y = jnp.einsum("...hd,hdc->...c", x.astype(dtype), kernel.astype(dtype))
  return y + bias.astype(dtype)


class SelfAttention(nn.Module):
  """Residual multi-head self-attention over the H*W positions of an NHWC map."""
  heads: int
  head_dim: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"  # see `attention`

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, c)
    q = _heads_proj(self, "query", h, self.heads, self.head_dim, self.dtype)
    k = _heads_proj(self, "key", h, self.heads, self.head_dim, self.dtype)
    v = _heads_proj(self, "value", h, self.heads, self.head_dim, self.dtype)
    out = _out_proj(self, attention(q, k, v, impl=self.attention_impl), c, self.dtype)
    return constrain_image(x + out.reshape(b, hgt, wid, c))


class CrossAttention(nn.Module):
  """Residual attention from image positions to text tokens.

  `context` [B, S, D] already holds the null token (always unmasked), so every row
  of `mask` [B, S] has at least one True entry.
  """
  heads: int
  head_dim: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"  # see `attention`

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, c)
    q = _heads_proj(self, "query", h, self.heads, self.head_dim, self.dtype)
    k = _heads_proj(self, "key", context, self.heads, self.head_dim, self.dtype)
    v = _heads_proj(self, "value", context, self.heads, self.head_dim, self.dtype)
    out = _out_proj(self, attention(q, k, v, mask, self.attention_impl), c, self.dtype)
    return constrain_image(x + out.reshape(b, hgt, wid, c))


class AttentionPool(nn.Module):
  """Pools text tokens [B, S, D] -> [B, features] with a learned query.

  Rows with no unmasked token get a learned null vector instead (classifier-free
  guidance drops text by masking the whole row).
  """
  features: int
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "einsum"  # see `attention`

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    query = _param(self, "query", nn.initializers.normal(1.0),
                   (self.heads, self.head_dim), (HEADS, KV))
    q = jnp.broadcast_to(query.astype(self.dtype)[None, None],
                         (tokens.shape[0], 1, self.heads, self.head_dim))
    k = _heads_proj(self, "key", tokens, self.heads, self.head_dim, self.dtype)
    v = _heads_proj(self, "value", tokens, self.heads, self.head_dim, self.dtype)
    # One query: a fused kernel gains nothing, and rows with every token masked (dropped
    # text) are legal here, which cuDNN's kernel does not promise to handle.
    impl = "xla" if self.attention_impl == "cudnn" else self.attention_impl
    pooled = attention(q, k, v, mask, impl)
    pooled = _out_proj(self, pooled, self.features, self.dtype)[:, 0]
    null = _param(self, "null_vector", nn.initializers.normal(0.02),
                  (self.features,), (EMBED,))
    has_text = jnp.any(mask, axis=-1, keepdims=True)
    return jnp.where(has_text, pooled, null.astype(self.dtype)[None])


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN with FiLM from the conditioning vector -> SiLU ->
  dropout -> conv3x3, plus a 1x1 skip when the channel count changes.

  `emb` is the already-activated conditioning vector silu(cond) [B, cond_dim].
  """
  out_channels: int
  num_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm1")(x)
    h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(nn.silu(h))
    film = Dense(2 * self.out_channels, names=(EMBED, MLP), dtype=self.dtype,
                 name="film")(emb)
    scale, shift = jnp.split(film, 2, axis=-1)
    h = GroupNorm(self.num_groups, dtype=self.dtype, name="norm2")(h, (scale, shift))
    h = nn.silu(h)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, dtype=self.dtype, name="skip")(x)
    return constrain_image(x.astype(self.dtype) + h)


class Downsample(nn.Module):
  """Strided 3x3 conv, halving H and W."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv(x.shape[-1], 3, stride=2, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then a 3x3 conv to `features` channels.

  The conv already narrows to the finer level's width (as imagen-pytorch does), so
  the most expensive conv of each level transition runs at the smaller width.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    x = x.reshape(b, 2 * h, 2 * w, c)
    return Conv(self.features, 3, dtype=self.dtype, name="conv")(x)


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/s, W/s, s*s*C], each s x s patch folded into channels."""
  if block == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // block, w // block, block * block * c)


def depth_to_space(x: jax.Array, block: int) -> jax.Array:
  """Inverse of `space_to_depth`."""
  if block == 1:
    return x
  b, h, w, cc = x.shape
  c = cc // (block * block)
  x = x.reshape(b, h, w, block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * block, w * block, c)
