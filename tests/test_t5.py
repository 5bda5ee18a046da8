"""T5 v1.1 encoder and tokenizer.

The references are independent of our code: Hugging Face transformers' PyTorch
T5EncoderModel (float32 parity on random weights and on the real T5X checkpoint), the
real T5X test checkpoint's parameter tree, the canonical T5 token ids, and closed-form
parameter counts of the published models.
"""
import dataclasses
import os

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_t5_reference import randomize_weights

from imagen_jax.parallel import axes
from imagen_jax.text import t5 as t5_lib
from imagen_jax.text import tokenizer as tokenizer_lib

T5X_CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                              "t5x_tiny_t5_1_1", "checkpoint")
TINY = t5_lib.t5_config("tiny")


def _load_t5x_target():
    if not os.path.exists(T5X_CHECKPOINT):
        pytest.skip(f"T5X test checkpoint not found at {T5X_CHECKPOINT}")
    with open(T5X_CHECKPOINT, "rb") as f:
        state = flax.serialization.msgpack_restore(f.read())
    return state["optimizer"]["target"]


def _encoder_params_from_t5x(target):
    return {"token_embedder": target["token_embedder"], "encoder": target["encoder"]}


def _padded_batch(rng, vocab, lengths, max_len):
    ids = rng.integers(2, vocab, size=(len(lengths), max_len)).astype(np.int32)
    mask = np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]
    ids = np.where(mask, ids, 0).astype(np.int32)
    return ids, mask


def _encode(config, params, ids, mask):
    return np.asarray(jax.jit(t5_lib.T5Encoder(config).apply)({"params": params}, ids, mask))


def _scaled_error(ours, ref, mask):
    ours, ref = ours[mask], ref[mask]
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------- layout

def test_param_tree_matches_real_t5x_checkpoint():
    target = _load_t5x_target()
    ckpt = _encoder_params_from_t5x(target)
    expected = t5_lib.param_shapes(TINY)
    ckpt_shapes = jax.tree.map(lambda a: (a.shape, a.dtype), ckpt)
    ours = jax.tree.map(lambda s: (s.shape, s.dtype), expected)
    assert jax.tree.structure(ckpt_shapes) == jax.tree.structure(ours)
    assert ckpt_shapes == ours
    # The layout T5X wrote, spelled out (flattened attention kernels, [heads, buckets]).
    layer = ckpt["encoder"]["layers_1"]
    assert layer["attention"]["query"]["kernel"].shape == (8, 12)
    assert layer["attention"]["out"]["kernel"].shape == (12, 8)
    assert layer["mlp"]["wi_0"]["kernel"].shape == (8, 16)
    assert layer["mlp"]["wo"]["kernel"].shape == (16, 8)
    assert ckpt["encoder"]["relpos_bias"]["rel_embedding"].shape == (4, 32)
    assert "relpos_bias" not in layer
    t5_lib.check_params_fit(ckpt, TINY)

    ids, mask = _padded_batch(np.random.default_rng(0), 32128, [7, 3], 7)
    out = _encode(TINY, ckpt, ids, mask)
    assert out.shape == (2, 7, 8) and out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_check_params_fit_names_the_problem():
    params = t5_lib.init_params(TINY, seed=0)
    params["encoder"]["layers_0"]["attention"]["query"]["kernel"] = jnp.zeros((8, 3, 4))
    del params["encoder"]["encoder_norm"]
    with pytest.raises(ValueError) as info:
        t5_lib.check_params_fit(params, TINY)
    assert "missing ['encoder']['encoder_norm']['scale']" in str(info.value)
    assert "['query']['kernel']: (8, 3, 4) != expected (8, 12)" in str(info.value)


def test_logical_axes_on_every_parameter():
    specs = t5_lib.param_logical_axes(TINY)
    assert specs["token_embedder"]["embedding"] == jax.sharding.PartitionSpec(axes.VOCAB, axes.EMBED)
    assert specs["encoder"]["relpos_bias"]["rel_embedding"] == jax.sharding.PartitionSpec(
        axes.HEADS, axes.REL_BUCKETS)
    layer = specs["encoder"]["layers_0"]
    assert layer["attention"]["query"]["kernel"] == jax.sharding.PartitionSpec(axes.EMBED, axes.HEADS)
    assert layer["attention"]["out"]["kernel"] == jax.sharding.PartitionSpec(axes.HEADS, axes.EMBED)
    assert layer["mlp"]["wi_1"]["kernel"] == jax.sharding.PartitionSpec(axes.EMBED, axes.MLP)
    assert layer["mlp"]["wo"]["kernel"] == jax.sharding.PartitionSpec(axes.MLP, axes.EMBED)
    assert layer["pre_mlp_layer_norm"]["scale"] == jax.sharding.PartitionSpec(axes.NORM)
    shapes = t5_lib.param_shapes(TINY)
    for spec, shape in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
            x, jax.sharding.PartitionSpec)), jax.tree.leaves(shapes)):
        assert len(spec) == len(shape.shape) and all(name is not None for name in spec)


def test_param_count_of_published_encoders():
    # Closed form: embedding + relpos table + layers (q, k, v, o, wi_0, wi_1, wo, 2 norms)
    # + final norm. XXL's encoder is the 4.76B model Imagen uses.
    def closed_form(v, d, heads, kv, mlp, layers, buckets=32):
        per_layer = 4 * d * heads * kv + 3 * d * mlp + 2 * d
        return v * d + heads * buckets + layers * per_layer + d

    assert t5_lib.param_count(t5_lib.t5_config("xxl")) == 4_762_310_656
    for name, args in {"small": (512, 6, 64, 1024, 8), "base": (768, 12, 64, 2048, 12),
                       "large": (1024, 16, 64, 2816, 24), "xl": (2048, 32, 64, 5120, 24),
                       "xxl": (4096, 64, 64, 10240, 24), "tiny": (8, 4, 3, 16, 2)}.items():
        assert t5_lib.param_count(t5_lib.t5_config(name)) == closed_form(32128, *args), name


def test_config_rejects_degenerate_relative_buckets():
    with pytest.raises(ValueError, match="max_distance"):
        t5_lib.T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=8)
    with pytest.raises(ValueError, match="dtype"):
        t5_lib.T5Config(dtype=jnp.int32)


# ------------------------------------------------------------------------ random init

def test_init_params_seeded_with_t5x_scales():
    cfg = dataclasses.replace(TINY, vocab_size=512, d_model=64, num_heads=4, head_dim=16,
                              mlp_dim=128)
    a = t5_lib.init_params(cfg, seed=3)
    b = t5_lib.init_params(cfg, seed=3)
    c = t5_lib.init_params(cfg, seed=4)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                              c["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])
    layer = a["encoder"]["layers_0"]
    np.testing.assert_allclose(np.std(a["token_embedder"]["embedding"]), 1.0, rtol=0.05)
    # Fan-in variance scaling; the query kernel also carries T5X's 1/sqrt(head_dim).
    np.testing.assert_allclose(np.std(layer["attention"]["key"]["kernel"]), 64 ** -0.5, rtol=0.1)
    np.testing.assert_allclose(np.std(layer["attention"]["query"]["kernel"]),
                               64 ** -0.5 / 4, rtol=0.1)
    np.testing.assert_allclose(np.std(layer["mlp"]["wo"]["kernel"]), 128 ** -0.5, rtol=0.15)
    np.testing.assert_array_equal(layer["pre_attention_layer_norm"]["scale"], np.ones(64))
    # Random-weight features must still tell tokens apart (Imagen's shapes default).
    ids, mask = _padded_batch(np.random.default_rng(1), 512, [12, 12], 12)
    out = _encode(cfg, a, ids, mask)
    assert np.all(np.isfinite(out))
    per_token = out.reshape(-1, 64)
    cos = per_token @ per_token.T / np.outer(*(2 * [np.linalg.norm(per_token, axis=1)]))
    assert np.max(np.abs(cos[~np.eye(len(cos), dtype=bool)])) < 0.9


# ------------------------------------------------------------------ Hugging Face parity

def _hf_model(torch, transformers, cfg, seed):
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, attn_implementation="eager")
    assert hf_cfg.is_gated_act and hf_cfg.dense_act_fn == "gelu_new"
    return randomize_weights(torch, transformers.T5EncoderModel(hf_cfg).eval(), seed)


def _hf_encode(torch, model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize("cfg,lengths,max_len", [
    # T5X-tiny-like: even heads, head_dim 3, default 32 buckets / distance 128.
    (t5_lib.T5Config(vocab_size=96, d_model=8, num_layers=2, num_heads=4, head_dim=3,
                     mlp_dim=16), [11, 6, 1], 11),
    # Odd heads, head_dim 5, d_model != heads * head_dim, sequences longer than
    # max_distance (so offsets hit the log buckets and the clamp).
    (t5_lib.T5Config(vocab_size=64, d_model=10, num_layers=3, num_heads=3, head_dim=5,
                     mlp_dim=12, relative_attention_num_buckets=16,
                     relative_attention_max_distance=8), [20, 13, 2, 17], 20),
])
def test_parity_with_hf_t5_encoder(cfg, lengths, max_len):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _hf_model(torch, transformers, cfg, seed=sum(lengths))
    params = t5_lib.params_from_hf_state_dict(model.state_dict(), cfg)
    # Our parameter count agrees with HF's (which counts the tied embedding once).
    assert t5_lib.param_count(cfg) == sum(p.numel() for p in model.parameters())
    ids, mask = _padded_batch(np.random.default_rng(max_len), cfg.vocab_size, lengths, max_len)
    ref = _hf_encode(torch, model, ids, mask)
    ours = _encode(cfg, params, ids, mask)
    err = _scaled_error(ours, ref, mask)
    print(f"HF parity {cfg.num_heads}x{cfg.head_dim}, L={max_len}: scaled max error {err:.2e}")
    assert err <= 1e-5
    # Padding must not leak: a sequence alone gives the same features as in the batch.
    alone = _encode(cfg, params, ids[1:2, :lengths[1]], mask[1:2, :lengths[1]])
    np.testing.assert_allclose(alone[0], ours[1, :lengths[1]], rtol=1e-5, atol=1e-5)


def test_relative_position_bucket_matches_hf():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.t5.modeling_t5 import T5Attention
    offsets = np.arange(-300, 301)
    for buckets, distance in [(32, 128), (16, 8), (8, 20), (64, 7)]:
        ours = t5_lib.relative_position_bucket(offsets, buckets, distance)
        ref = T5Attention._relative_position_bucket(torch.from_numpy(offsets), True,
                                                    buckets, distance).numpy()
        np.testing.assert_array_equal(ours, ref)
    # Closed form near zero: keys before the query use the lower half, after the upper.
    ours = t5_lib.relative_position_bucket(np.array([-3, -1, 0, 1, 3]), 32, 128)
    np.testing.assert_array_equal(ours, [3, 1, 0, 17, 19])


def test_real_t5x_checkpoint_matches_hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    target = _load_t5x_target()
    # T5X -> HF, written here independently of params_from_hf_state_dict: T5X kernels are
    # [in, out], HF Linear weights [out, in]; the shared relative table goes to block 0.
    enc = target["encoder"]
    state = {"shared.weight": target["token_embedder"]["embedding"],
             "encoder.embed_tokens.weight": target["token_embedder"]["embedding"],
             "encoder.final_layer_norm.weight": enc["encoder_norm"]["scale"],
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                 enc["relpos_bias"]["rel_embedding"].T}
    for i in range(TINY.num_layers):
        layer = enc[f"layers_{i}"]
        prefix = f"encoder.block.{i}.layer"
        for ours, hf in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
            state[f"{prefix}.0.SelfAttention.{hf}.weight"] = layer["attention"][ours]["kernel"].T
        state[f"{prefix}.0.layer_norm.weight"] = layer["pre_attention_layer_norm"]["scale"]
        for name in ("wi_0", "wi_1", "wo"):
            state[f"{prefix}.1.DenseReluDense.{name}.weight"] = layer["mlp"][name]["kernel"].T
        state[f"{prefix}.1.layer_norm.weight"] = layer["pre_mlp_layer_norm"]["scale"]
    model = _hf_model(torch, transformers, TINY, seed=0)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()},
                          strict=True)

    tok = tokenizer_lib.Tokenizer()
    ids, mask = tok.encode(["translate English to German: That is good.",
                            "a red circle to the left of a blue square", "cat"], max_length=16)
    ref = _hf_encode(torch, model, ids, mask)
    ours = _encode(TINY, _encoder_params_from_t5x(target), ids, mask)
    err = _scaled_error(ours, ref, mask)
    print(f"T5X tiny checkpoint vs HF: scaled max error {err:.2e}")
    assert err <= 1e-5


# ------------------------------------------------------------ bfloat16 and sharding

def test_bfloat16_compute_close_to_float32():
    cfg = dataclasses.replace(TINY, vocab_size=256, d_model=32, num_heads=4, head_dim=8,
                              mlp_dim=64)
    params = t5_lib.init_params(cfg, seed=0)
    ids, mask = _padded_batch(np.random.default_rng(2), 256, [9, 5], 9)
    ref = _encode(cfg, params, ids, mask)
    low = _encode(dataclasses.replace(cfg, dtype=jnp.bfloat16), params, ids, mask)
    assert low.dtype == np.float32
    assert _scaled_error(low, ref, mask) < 5e-2


def test_sharded_run_with_logical_rules_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    params = t5_lib.init_params(TINY, seed=1)
    ids, mask = _padded_batch(np.random.default_rng(3), 32128, [6, 2, 5, 1], 6)
    ref = _encode(TINY, params, ids, mask)
    shardings = nn.logical_to_mesh_sharding(t5_lib.param_logical_axes(TINY), mesh,
                                            axes.DEFAULT_RULES)
    sharded = jax.device_put(params, shardings)
    assert sharded["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(axes.DEFAULT_RULES):
        out = jax.jit(t5_lib.T5Encoder(TINY).apply)({"params": sharded}, ids, mask)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- tokenizer

def test_tokenizer_canonical_ids_padding_and_mask():
    tok = tokenizer_lib.Tokenizer()
    assert tok.vocab_size == 32100
    ids, mask = tok.encode(["translate English to German: That is good.", "", "cat"],
                           max_length=12)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (3, 12)
    np.testing.assert_array_equal(
        ids[0], [13959, 1566, 12, 2968, 10, 466, 19, 207, 5, 1, 0, 0])
    np.testing.assert_array_equal(mask[0], [True] * 10 + [False] * 2)
    np.testing.assert_array_equal(ids[1], [1] + [0] * 11)  # empty prompt: EOS only
    np.testing.assert_array_equal(mask[1], [True] + [False] * 11)
    assert ids[2, mask[2].sum() - 1] == 1 and not ids[2, mask[2].sum():].any()
    assert tok.decode(ids[0]) == "translate English to German: That is good."
    with pytest.raises(TypeError):
        tok.encode("not a list", max_length=4)


def test_tokenizer_truncation_keeps_eos_and_warns(monkeypatch):
    warnings = []
    monkeypatch.setattr(tokenizer_lib.logging, "warning",
                        lambda msg, *args: warnings.append(msg % args))
    tok = tokenizer_lib.Tokenizer(tokenizer_lib.default_model_path())
    ids, mask = tok.encode(["translate English to German: That is good.", "cat",
                            "a b c d e f g h"], max_length=5)
    np.testing.assert_array_equal(ids[0], [13959, 1566, 12, 2968, 1])
    assert mask[0].all() and ids[2, -1] == 1
    assert len(warnings) == 1
    assert "2 of 3" in warnings[0] and "5" in warnings[0]
    tok.encode(["cat"], max_length=5)
    assert len(warnings) == 1  # nothing truncated, nothing logged
