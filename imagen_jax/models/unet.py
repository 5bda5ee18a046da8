"""The Imagen U-Net (Flax linen): base stage and super-resolution stages.

`UNet(config)(x_t, t, cond, train=...)` -> prediction of x_t's shape, float32.
`cond` follows the contract in imagen_jax (text, text_mask, lowres, lowres_aug_t).

Two orderings share one module:
- standard (ADM-like, base stage): blocks then downsample; one skip per block
  (plus the stem and each downsample); the up path has one extra block per level.
- efficient (Imagen's Efficient U-Net, SR stages): downsample BEFORE a level's
  blocks and upsample AFTER them, attention once per level, one skip per level
  scaled by 1/sqrt(2). Put more blocks at low resolution via a per-level
  `num_res_blocks` tuple.
Level i always runs at resolution (image / space_to_depth) / 2**i.

Memory / speed switches (`remat` per block, `attention_impl`, `dtype`) change neither the
parameters nor, beyond rounding, the outputs (tests/test_unet_switches.py). The U-Net is
fully convolutional: the same params run at any multiple of `size_multiple` (the
256->1024 stage trains on 256 crops and samples at 1024).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from imagen_jax.models import layers
from imagen_jax.parallel.axes import EMBED, MLP

_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each residual / attention block (jax.checkpoint through nn.remat):
# what the backward pass may keep from the forward pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,                 # no remat: keep every activation
    "full": None,                 # keep only the block's inputs; recompute everything
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep conv / matmul outputs
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Shape of one U-Net. Plain, hashable fields (built with `UNetConfig(**dict)`)."""
  base_channels: int = 64
  channel_mults: tuple = (1, 2, 2)
  num_res_blocks: Union[int, tuple] = 2      # int, or one per level
  self_attn_levels: tuple = (2,)             # level indices with self-attention
  cross_attn_levels: tuple = (1, 2)          # level indices with text cross-attention
  attn_heads: int = 4
  attn_head_dim: int = 32
  text_dim: int = 128                        # width of incoming text embeddings; 0 = no text
  cond_dim: int = 256                        # width of the time/text conditioning vector
  dropout: float = 0.0
  out_channels: int = 3
  space_to_depth: int = 1                    # 2: fold 2x2 patches into channels
  efficient: bool = False                    # Efficient U-Net ordering (SR stages)
  lowres_cond: bool = False                  # SR stage: condition on cond['lowres']
  # Also feed the (space-to-depth) input to the output conv, like imagen-pytorch's
  # init_conv_to_final_conv_residual: predicting v at low noise means passing the noise
  # in x_t through; a direct path learns that in tens of steps instead of hundreds.
  input_to_output_skip: bool = False
  num_groups: int = 8                        # GroupNorm groups (min(num_groups, width))
  dtype: str = "float32"                     # compute dtype; params are float32
  # > 0: attention heads of `attn_head_channels` channels each, as many as the level's
  # width allows (ADM's num_head_channels, the paper base model's per_head_channels=64);
  # 0: `attn_heads` x `attn_head_dim` at every level.
  attn_head_channels: int = 0
  # Memory / speed switches; none of them changes the parameters or (beyond rounding)
  # the outputs.
  remat: str = "none"                        # a key of REMAT_POLICIES, applied per block
  attention_impl: str = "einsum"             # einsum | xla | cudnn (jax.nn.dot_product_attention)

  def __post_init__(self):
    # ml_collections / JSON may hand over lists; keep the dataclass hashable.
    for name in ("channel_mults", "self_attn_levels", "cross_attn_levels",
                 "num_res_blocks"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))

  @property
  def num_levels(self) -> int:
    return len(self.channel_mults)

  @property
  def blocks_per_level(self) -> tuple:
    if isinstance(self.num_res_blocks, int):
      return (self.num_res_blocks,) * self.num_levels
    return tuple(self.num_res_blocks)

  @property
  def level_channels(self) -> tuple:
    return tuple(self.base_channels * m for m in self.channel_mults)

  @property
  def size_multiple(self) -> int:
    """Image sides must be a multiple of this."""
    return self.space_to_depth * 2 ** (self.num_levels - 1)

  def validate(self, image_size: Union[int, tuple]) -> None:
    """Raises ValueError naming the field and the fix if the config cannot run."""
    sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    levels = self.num_levels
    if levels < 1 or any(int(m) < 1 for m in self.channel_mults):
      raise ValueError(f"channel_mults={self.channel_mults}: need at least one level "
                       "and positive multipliers.")
    if self.base_channels < 1:
      raise ValueError(f"base_channels={self.base_channels} must be positive.")
    if self.space_to_depth < 1:
      raise ValueError(f"space_to_depth={self.space_to_depth} must be >= 1.")
    mult = self.size_multiple
    for side in sizes:
      if side < mult or side % mult:
        raise ValueError(
            f"image size {sizes} is incompatible with the U-Net depth: each side must "
            f"be a positive multiple of space_to_depth * 2**(len(channel_mults)-1) = "
            f"{self.space_to_depth} * 2**{levels - 1} = {mult}. Change the image size "
            f"(e.g. {max(mult, side // mult * mult)}), space_to_depth or channel_mults.")
    blocks = self.blocks_per_level
    if len(blocks) != levels or any(int(n) < 1 for n in blocks):
      raise ValueError(f"num_res_blocks={self.num_res_blocks}: give an int >= 1 or one "
                       f"int >= 1 per level ({levels} levels in channel_mults).")
    for field in ("self_attn_levels", "cross_attn_levels"):
      bad = [i for i in getattr(self, field) if not 0 <= i < levels]
      if bad:
        raise ValueError(f"{field}={getattr(self, field)}: levels {bad} out of range; "
                         f"valid levels are 0..{levels - 1} (len(channel_mults)).")
    if self.cross_attn_levels and self.text_dim <= 0:
      raise ValueError(f"cross_attn_levels={self.cross_attn_levels} needs text: set "
                       "text_dim > 0 or cross_attn_levels=().")
    if self.attn_heads < 1 or self.attn_head_dim < 1:
      raise ValueError(f"attn_heads={self.attn_heads}, attn_head_dim="
                       f"{self.attn_head_dim}: both must be >= 1.")
    if self.cond_dim < 1:
      raise ValueError(f"cond_dim={self.cond_dim} must be positive.")
    if self.num_groups < 1:
      raise ValueError(f"num_groups={self.num_groups} must be positive.")
    for ch in self.level_channels:
      if ch % min(ch, self.num_groups):
        raise ValueError(
            f"num_groups={self.num_groups} does not divide {ch} channels "
            f"(base_channels={self.base_channels} x channel_mults); pick num_groups "
            f"dividing base_channels * every mult (e.g. {math.gcd(ch, self.num_groups)}).")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout={self.dropout} must be in [0, 1).")
    if self.out_channels < 1:
      raise ValueError(f"out_channels={self.out_channels} must be positive.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype={self.dtype!r}: use one of {_DTYPES}.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: use one of {tuple(REMAT_POLICIES)}.")
    if self.attention_impl not in layers.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: use one of "
                       f"{layers.ATTENTION_IMPLS}.")
    if self.attn_head_channels < 0:
      raise ValueError(f"attn_head_channels={self.attn_head_channels} must be >= 0.")
    if self.attn_head_channels:
      levels_with_attn = sorted(set(self.self_attn_levels) | set(self.cross_attn_levels))
      widths = [self.level_channels[i] for i in levels_with_attn] + [self.cond_dim]
      bad = [w for w in widths if w % self.attn_head_channels]
      if bad:
        raise ValueError(f"attn_head_channels={self.attn_head_channels} does not divide the "
                         f"widths {bad} (attention levels' channels and cond_dim); pick a "
                         "divisor of all of them.")

  def attn_shape(self, width: int) -> tuple:
    """(heads, head_dim) of an attention layer on `width` channels."""
    if self.attn_head_channels:
      return width // self.attn_head_channels, self.attn_head_channels
    return self.attn_heads, self.attn_head_dim

  def num_params(self, image_size: Union[int, tuple] = 32, text_len: int = 8,
                 lowres_size: Optional[Union[int, tuple]] = None) -> int:
    return count_params(self, image_size, text_len, lowres_size)


def dummy_inputs(config: UNetConfig, image_size: Union[int, tuple], batch: int = 1,
                 text_len: int = 8, lowres_size: Optional[Union[int, tuple]] = None):
  """Zero inputs of the right shapes, e.g. for `init` or `jax.eval_shape`."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  x = jnp.zeros((batch, h, w, config.out_channels), jnp.float32)
  t = jnp.zeros((batch,), jnp.float32)
  cond = {}
  if config.text_dim > 0:
    cond["text"] = jnp.zeros((batch, text_len, config.text_dim), jnp.float32)
    cond["text_mask"] = jnp.ones((batch, text_len), bool)
  if config.lowres_cond:
    if lowres_size is None:
      lowres_size = (h // 4, w // 4)
    lh, lw = (lowres_size, lowres_size) if isinstance(lowres_size, int) else lowres_size
    cond["lowres"] = jnp.zeros((batch, lh, lw, 3), jnp.float32)
    cond["lowres_aug_t"] = jnp.zeros((batch,), jnp.float32)
  return x, t, cond


def count_params(config: UNetConfig, image_size: Union[int, tuple] = 32,
                 text_len: int = 8, lowres_size=None) -> int:
  """Parameter count without allocating parameters (jax.eval_shape of init)."""
  x, t, cond = dummy_inputs(config, image_size, 1, text_len, lowres_size)
  shapes = jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), x, t, cond))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(shapes)))


class UNet(nn.Module):
  """Text-conditioned U-Net denoiser; see the module docstring."""
  config: UNetConfig

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, cond: Mapping[str, jax.Array], *,
               train: bool = False) -> jax.Array:
    cfg = self.config
    cfg.validate(x_t.shape[1:3])
    if x_t.shape[-1] != cfg.out_channels:
      raise ValueError(f"x_t has {x_t.shape[-1]} channels but out_channels="
                       f"{cfg.out_channels}; the prediction must have x_t's shape.")
    needed = (("text",) if cfg.text_dim > 0 else ()) + (
        ("lowres", "lowres_aug_t") if cfg.lowres_cond else ())
    missing = [key for key in needed if key not in cond]
    if missing:
      raise ValueError(f"cond lacks {missing}: this U-Net has text_dim={cfg.text_dim} and "
                       f"lowres_cond={cfg.lowres_cond}; pass them or change the config.")
    dtype = jnp.dtype(cfg.dtype)
    batch, height, width, _ = x_t.shape
    groups = cfg.num_groups

    # --- conditioning vector: time (+ noise-aug level) (+ pooled text) ---
    emb = layers.TimeEmbedding(cfg.cond_dim, cfg.base_channels, dtype=dtype,
                               name="time_embed")(t)
    if cfg.lowres_cond:
      emb = emb + layers.TimeEmbedding(cfg.cond_dim, cfg.base_channels, dtype=dtype,
                                       name="lowres_aug_embed")(cond["lowres_aug_t"])
    context = context_mask = None
    if cfg.text_dim > 0:
      text = cond["text"]
      if text.shape[-1] != cfg.text_dim:
        raise ValueError(f"cond['text'] has width {text.shape[-1]} but text_dim="
                         f"{cfg.text_dim}; set text_dim to the text encoder's width.")
      mask = cond.get("text_mask")
      mask = jnp.ones(text.shape[:2], bool) if mask is None else mask.astype(bool)
      tokens = layers.LayerNorm(dtype=dtype, name="text_norm")(text)
      tokens = layers.Dense(cfg.cond_dim, names=(EMBED, MLP), dtype=dtype,
                            name="text_proj")(tokens)
      tokens = nn.with_logical_constraint(tokens, layers.TOKEN_AXES)
      emb = emb + layers.AttentionPool(cfg.cond_dim, *cfg.attn_shape(cfg.cond_dim),
                                       dtype=dtype, attention_impl=cfg.attention_impl,
                                       name="text_pool")(tokens, mask)
      # A learned, always-visible null token makes fully masked rows well-defined.
      null = self.param("null_text_token",
                        nn.with_logical_partitioning(nn.initializers.normal(0.02), (EMBED,)),
                        (cfg.cond_dim,), jnp.float32)
      null = jnp.broadcast_to(null.astype(dtype)[None, None], (batch, 1, cfg.cond_dim))
      context = jnp.concatenate([null, tokens.astype(dtype)], axis=1)
      context_mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask], axis=1)
    emb = nn.silu(emb)  # every consumer (the FiLM projections) wants silu(cond)

    # Per-block rematerialisation: parameter names and values are those of the plain blocks.
    res_cls, self_attn_cls, cross_attn_cls = (
        layers.ResBlock, layers.SelfAttention, layers.CrossAttention)
    if cfg.remat != "none":
      policy = REMAT_POLICIES[cfg.remat]
      res_cls = nn.remat(res_cls, policy=policy, static_argnums=(3,))  # `train` (self is 0)
      self_attn_cls = nn.remat(self_attn_cls, policy=policy)
      cross_attn_cls = nn.remat(cross_attn_cls, policy=policy)

    def attend(level: int, h: jax.Array, tag: str) -> jax.Array:
      heads, head_dim = cfg.attn_shape(h.shape[-1])
      if level in cfg.self_attn_levels:
        h = self_attn_cls(heads, head_dim, groups, dtype=dtype,
                          attention_impl=cfg.attention_impl, name=f"{tag}_self_attn")(h)
      if level in cfg.cross_attn_levels:
        h = cross_attn_cls(heads, head_dim, groups, dtype=dtype,
                           attention_impl=cfg.attention_impl,
                           name=f"{tag}_cross_attn")(h, context, context_mask)
      return h

    def res_block(ch: int, h: jax.Array, name: str) -> jax.Array:
      return res_cls(ch, groups, cfg.dropout, dtype=dtype, name=name)(h, emb, train)

    # --- input: low-res conditioning, space-to-depth, stem ---
    x = x_t.astype(jnp.float32)
    if cfg.lowres_cond:
      lowres = cond["lowres"].astype(jnp.float32)
      lowres = jax.image.resize(lowres, (batch, height, width, lowres.shape[-1]),
                                method="bilinear")
      x = jnp.concatenate([x, lowres], axis=-1)
    x = layers.space_to_depth(x, cfg.space_to_depth).astype(dtype)
    network_input = x
    chans, blocks, levels = cfg.level_channels, cfg.blocks_per_level, cfg.num_levels
    h = layers.constrain_image(layers.Conv(chans[0], 3, dtype=dtype, name="stem")(x))

    # --- down path ---
    skips = [] if cfg.efficient else [h]
    for i in range(levels):
      if cfg.efficient and i > 0:
        h = layers.Downsample(dtype=dtype, name=f"down{i}_downsample")(h)
      for j in range(blocks[i]):
        h = res_block(chans[i], h, f"down{i}_res{j}")
        if not cfg.efficient:
          h = attend(i, h, f"down{i}_{j}")
          skips.append(h)
      if cfg.efficient:
        h = attend(i, h, f"down{i}")
        skips.append(h)
      elif i < levels - 1:
        h = layers.Downsample(dtype=dtype, name=f"down{i}_downsample")(h)
        skips.append(h)

    # --- middle ---
    h = res_block(chans[-1], h, "mid_res0")
    h = attend(levels - 1, h, "mid")
    h = res_block(chans[-1], h, "mid_res1")

    # --- up path ---
    skip_scale = 1.0 / math.sqrt(2.0)
    for i in reversed(range(levels)):
      if cfg.efficient:
        h = jnp.concatenate([h, skips.pop() * jnp.asarray(skip_scale, dtype)], axis=-1)
        for j in range(blocks[i]):
          h = res_block(chans[i], h, f"up{i}_res{j}")
        h = attend(i, h, f"up{i}")
      else:
        for j in range(blocks[i] + 1):
          h = jnp.concatenate([h, skips.pop()], axis=-1)
          h = res_block(chans[i], h, f"up{i}_res{j}")
          h = attend(i, h, f"up{i}_{j}")
      if i > 0:
        h = layers.Upsample(chans[i - 1], dtype=dtype, name=f"up{i}_upsample")(h)
    assert not skips, "every skip connection must be consumed"

    # --- output ---
    h = nn.silu(layers.GroupNorm(groups, dtype=dtype, name="out_norm")(h))
    if cfg.input_to_output_skip:
      h = jnp.concatenate([h, network_input], axis=-1)
    out_ch = cfg.out_channels * cfg.space_to_depth ** 2
    h = layers.Conv(out_ch, 3, zero_init=True, dtype=dtype, name="out_conv")(h)
    return layers.depth_to_space(h.astype(jnp.float32), cfg.space_to_depth)
