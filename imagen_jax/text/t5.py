"""The frozen T5 v1.1 encoder in Flax linen, with T5X's parameter tree.

Imagen conditions on a frozen T5 v1.1 encoder. This module reproduces the T5X
implementation (t5x/examples/t5/layers.py + network.py, the `t5_1_1` configs) so that a
T5X checkpoint's `target['token_embedder']` and `target['encoder']` subtrees are its
params as they are, and Hugging Face weights load through `params_from_hf_state_dict`:

    params = {'token_embedder': {'embedding': [vocab, d_model]},
              'encoder': {'relpos_bias': {'rel_embedding': [heads, buckets]},
                          'layers_{i}': {'pre_attention_layer_norm': {'scale': [d_model]},
                                         'attention': {'query'|'key'|'value': {'kernel': [d_model, heads*head_dim]},
                                                       'out': {'kernel': [heads*head_dim, d_model]}},
                                         'pre_mlp_layer_norm': {'scale': [d_model]},
                                         'mlp': {'wi_0'|'wi_1': {'kernel': [d_model, mlp]},
                                                 'wo': {'kernel': [mlp, d_model]}}},
                          'encoder_norm': {'scale': [d_model]}}}

T5X stores attention kernels flattened to 2-D ([embed, heads*kv], heads-major) and
reshapes them at run time; so do we, which keeps checkpoints loadable without copies.

T5 v1.1 semantics, each one a difference from the "textbook" transformer:
- the token embedding is not scaled by sqrt(d_model);
- pre-norm RMSNorm (no mean subtraction, no bias), statistics in float32;
- attention logits are NOT divided by sqrt(head_dim): T5X folds that factor into the
  query kernel's initialisation instead;
- one bidirectional relative-position bias table, computed once by the encoder and
  added to the logits of every layer;
- gated GELU feed-forward: gelu_tanh(x @ wi_0) * (x @ wi_1) @ wo;
- no biases anywhere; dropout omitted (the encoder is frozen, inference only).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.parallel.axes import (ACT_EMBED, BATCH, EMBED, HEADS, LENGTH, MLP, NORM,
                                      REL_BUCKETS, VOCAB)
from imagen_jax.text import hf_checkpoint

# Large negative logit for masked keys. T5X uses -1e10 rather than -inf so that a row
# whose keys are all masked gives a uniform softmax instead of NaN.
_MASKED_LOGIT = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape and numerics of a T5 v1.1 encoder.

    `dtype` is the compute dtype (float32 or bfloat16); parameters are always float32,
    and RMSNorm statistics, attention logits and the softmax are always float32.
    """
    vocab_size: int = 32128
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 6
    head_dim: int = 64
    mlp_dim: int = 1024
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "head_dim",
                     "mlp_dim", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        # Bidirectional bucketing uses half the buckets per direction, half of those for
        # exact offsets; the log-spaced rest needs max_distance beyond the exact range,
        # or log(max_distance / max_exact) is 0 and the bucket ids become garbage.
        max_exact = self.relative_attention_num_buckets // 4
        if max_exact < 1 or self.relative_attention_max_distance <= max_exact:
            raise ValueError(
                "T5Config needs relative_attention_num_buckets >= 4 and "
                f"relative_attention_max_distance > num_buckets // 4 (= {max_exact}); got "
                f"buckets={self.relative_attention_num_buckets}, "
                f"max_distance={self.relative_attention_max_distance}")
        canonical = {jnp.dtype(jnp.float32): jnp.float32, jnp.dtype(jnp.bfloat16): jnp.bfloat16}
        if jnp.dtype(self.dtype) not in canonical:
            raise ValueError(f"T5Config.dtype must be float32 or bfloat16, got {self.dtype}")
        # One spelling per dtype, so that configs compare equal whether the dtype came as
        # a string (JSON, ml_collections) or a numpy / jax type.
        object.__setattr__(self, "dtype", canonical[jnp.dtype(self.dtype)])

    @property
    def inner_dim(self) -> int:
        """Width of the joined attention heads (heads * head_dim)."""
        return self.num_heads * self.head_dim


# Encoder shapes of the published T5 v1.1 checkpoints (gs://t5-data/pretrained_models/
# t5x/t5_1_1_*, google/t5-v1_1-*), plus `tiny`: the shape of T5X's own test checkpoint
# (t5x/testdata/test_t5_tiny), used by the tests.
T5_PRESETS: Mapping[str, T5Config] = {
    "tiny": T5Config(d_model=8, num_layers=2, num_heads=4, head_dim=3, mlp_dim=16),
    "small": T5Config(d_model=512, num_layers=8, num_heads=6, head_dim=64, mlp_dim=1024),
    "base": T5Config(d_model=768, num_layers=12, num_heads=12, head_dim=64, mlp_dim=2048),
    "large": T5Config(d_model=1024, num_layers=24, num_heads=16, head_dim=64, mlp_dim=2816),
    "xl": T5Config(d_model=2048, num_layers=24, num_heads=32, head_dim=64, mlp_dim=5120),
    "xxl": T5Config(d_model=4096, num_layers=24, num_heads=64, head_dim=64, mlp_dim=10240),
}


def t5_config(name: str, **overrides) -> T5Config:
    """A preset by name ('tiny', 'small', 'base', 'large', 'xl', 'xxl'), fields overridable."""
    if name not in T5_PRESETS:
        raise ValueError(f"Unknown T5 preset {name!r}; choose one of {sorted(T5_PRESETS)}")
    return dataclasses.replace(T5_PRESETS[name], **overrides)


# T5X's initialisers for T5 v1.1 (t5_1_1 gin + layers.py). They only matter for
# random-weight encoders, whose features should then look like a trained model's in scale.
_embedding_init = nn.initializers.normal(stddev=1.0)
_attention_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def _query_kernel_init(head_dim: int):
    # T5X divides the query kernel's init by sqrt(head_dim) in place of scaling logits.
    def init(key, shape, dtype=jnp.float32):
        return _attention_kernel_init(key, shape, dtype) / np.sqrt(head_dim).astype(dtype)
    return init


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of each (key - query) offset, exactly as T5X computes it.

    Half the buckets are for keys after the query, half for keys before; within each
    half, offsets below num_buckets // 4 get their own bucket and larger ones share
    log-spaced buckets up to max_distance, beyond which all offsets share the last one.
    Static numpy: the sequence length is known at trace time.
    """
    n = -np.asarray(relative_position, np.int32)
    half = num_buckets // 2
    bucket = (n < 0).astype(np.int32) * half
    n = np.abs(n)
    max_exact = half // 2
    is_small = n < max_exact
    # The eps keeps log() finite at n = 0 (a value discarded by the where below).
    with np.errstate(divide="ignore"):
        val_if_large = max_exact + (
            np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
            / np.log(max_distance / max_exact) * (half - max_exact)).astype(np.int32)
    val_if_large = np.minimum(val_if_large, half - 1)
    return bucket + np.where(is_small, n, val_if_large)


class RMSNorm(nn.Module):
    """T5 layer norm: scale * x / rms(x); no mean subtraction, no bias; stats in float32."""
    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (NORM,)),
                           (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y = x * jax.lax.rsqrt(mean2 + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class RelativePositionBiases(nn.Module):
    """The encoder's single relative-position bias table: [1, heads, q_len, k_len]."""
    num_buckets: int
    max_distance: int
    num_heads: int

    @nn.compact
    def __call__(self, q_len: int, k_len: int):
        table = self.param("rel_embedding",
                           nn.with_logical_partitioning(_relpos_init, (HEADS, REL_BUCKETS)),
                           (self.num_heads, self.num_buckets), jnp.float32)
        offsets = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
        buckets = relative_position_bucket(offsets, self.num_buckets, self.max_distance)
        # Kept in float32: the bias is added to float32 logits whatever the compute dtype.
        return jnp.take(table, jnp.asarray(buckets), axis=1)[None]


def _dense(features: int, names: tuple[str, str], init, dtype, name: str):
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(init, names), name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention without the 1/sqrt(head_dim) factor (T5 convention)."""
    config: T5Config

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        batch, length, _ = x.shape
        heads, head_dim = cfg.num_heads, cfg.head_dim

        def project(name, init):
            y = _dense(cfg.inner_dim, (EMBED, HEADS), init, cfg.dtype, name)(x)
            return y.reshape(batch, length, heads, head_dim)

        query = project("query", _query_kernel_init(head_dim))
        key = project("key", _attention_kernel_init)
        value = project("value", _attention_kernel_init)
        # T5X's t5_1_1 configs set float32_attention_logits: logits and softmax in float32.
        logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(jnp.float32),
                            key.astype(jnp.float32))
        weights = jax.nn.softmax(logits + bias, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = out.reshape(batch, length, cfg.inner_dim)
        return _dense(cfg.d_model, (HEADS, EMBED), _attention_kernel_init, cfg.dtype, "out")(out)


class GatedGeluMlp(nn.Module):
    """T5 v1.1 feed-forward: (gelu_tanh(x @ wi_0) * (x @ wi_1)) @ wo."""
    config: T5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.mlp_dim, (EMBED, MLP), _mlp_kernel_init, cfg.dtype, "wi_0")(x)
        linear = _dense(cfg.mlp_dim, (EMBED, MLP), _mlp_kernel_init, cfg.dtype, "wi_1")(x)
        hidden = nn.gelu(gate, approximate=True) * linear
        hidden = nn.with_logical_constraint(hidden, (BATCH, LENGTH, MLP))
        return _dense(cfg.d_model, (MLP, EMBED), _mlp_kernel_init, cfg.dtype, "wo")(hidden)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
    config: T5Config

    @nn.compact
    def __call__(self, x, bias):
        cfg = self.config
        norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype)
        x = x + SelfAttention(cfg, name="attention")(norm(name="pre_attention_layer_norm")(x), bias)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        x = x + GatedGeluMlp(cfg, name="mlp")(norm(name="pre_mlp_layer_norm")(x))
        return nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))


class EncoderStack(nn.Module):
    """The T5X `encoder` subtree: relative bias, layers_{i}, encoder_norm."""
    config: T5Config

    @nn.compact
    def __call__(self, x, mask):
        cfg = self.config
        length = x.shape[1]
        relpos = RelativePositionBiases(cfg.relative_attention_num_buckets,
                                        cfg.relative_attention_max_distance,
                                        cfg.num_heads, name="relpos_bias")(length, length)
        # Only keys are masked (as Hugging Face does): padded query positions still get
        # finite, ignorable outputs; the unmasked positions equal T5X's exactly.
        key_mask = jnp.asarray(mask).astype(bool)[:, None, None, :]
        bias = relpos + jnp.where(key_mask, 0.0, _MASKED_LOGIT).astype(jnp.float32)
        for i in range(cfg.num_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
        return RMSNorm(cfg.layer_norm_epsilon, cfg.dtype, name="encoder_norm")(x)


class T5Encoder(nn.Module):
    """Frozen T5 v1.1 encoder: (ids int [B, L], mask [B, L]) -> float32 [B, L, d_model].

    The output is the final RMSNorm's; positions where mask is 0 are computed too, and
    callers ignore them.
    """
    config: T5Config

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """A T5X, Hugging Face or converted checkpoint, ready to encode prompts.

        Returns a `PretrainedT5Encoder` (config + params + tokenizer); see
        `imagen_jax.text.pretrained` for the formats and arguments (dtype, mesh, ...).
        """
        from imagen_jax.text import pretrained  # pylint: disable=import-outside-toplevel
        return pretrained.PretrainedT5Encoder.from_pretrained(path, **kwargs)

    @nn.compact
    def __call__(self, ids, mask):
        cfg = self.config
        embedder = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype,
                            param_dtype=jnp.float32,
                            embedding_init=nn.with_logical_partitioning(_embedding_init,
                                                                        (VOCAB, EMBED)),
                            name="token_embedder")
        x = embedder(jnp.asarray(ids, jnp.int32)).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, (BATCH, LENGTH, ACT_EMBED))
        x = EncoderStack(cfg, name="encoder")(x, mask)
        return x.astype(jnp.float32)


def _init_fn(config: T5Config):
    dummy = jnp.zeros((1, 1), jnp.int32)
    return lambda key: T5Encoder(config).init(key, dummy, dummy)["params"]


def abstract_params(config: T5Config):
    """Tree of jax.ShapeDtypeStruct boxed with their logical axis names (no allocation)."""
    return jax.eval_shape(_init_fn(config), jax.random.key(0))


def param_shapes(config: T5Config):
    """Unboxed tree of jax.ShapeDtypeStruct for `config`, without allocating anything."""
    return nn.meta.unbox(abstract_params(config))


def param_logical_axes(config: T5Config):
    """Tree of PartitionSpecs of logical axis names, shaped like the params."""
    return nn.get_partition_spec(abstract_params(config))


def param_count(config: T5Config) -> int:
    """Number of encoder parameters (embedding included), computed without allocation."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(param_shapes(config)))


def init_params(config: T5Config, seed: int = 0):
    """Seeded random params (plain float32 arrays, T5X layout) with T5X's init scales."""
    return nn.meta.unbox(jax.jit(_init_fn(config))(jax.random.key(seed)))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; .float() also handles bfloat16/float16
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, np.float32)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config):
    """Hugging Face T5 (T5EncoderModel / T5ForConditionalGeneration) weights -> our params.

    HF Linear weights are [out, in] (we store [in, out]); HF keeps the relative bias as
    [buckets, heads] in layer 0 only (T5X: [heads, buckets] at the encoder level).
    Decoder and lm_head entries are ignored. Values may be torch tensors or arrays.
    """
    sd = state_dict

    def get(key):
        if key not in sd:
            raise KeyError(f"Hugging Face state dict has no {key!r}; is it a T5 v1.1 "
                           f"(gated-gelu) checkpoint with num_layers={config.num_layers}?")
        return _to_numpy(sd[key])

    params = hf_checkpoint.encoder_tree(get, config.num_layers, hf_checkpoint.embedding_key(sd))

    check_params_fit(params, config)
    return jax.tree.map(jnp.asarray, params)


def check_params_fit(params, config: T5Config) -> None:
    """Raises ValueError naming every parameter whose path or shape differs from `config`'s."""
    want = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}
    got = {jax.tree_util.keystr(k): np.shape(v)
           for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{k}: {got[k]} != expected {want[k]}"
                 for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
    if problems:
        raise ValueError(f"T5 params do not fit {config}:\n  " + "\n  ".join(problems))
