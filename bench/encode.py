r"""T5 encoder throughput (tokens/s): ours (JAX) beside transformers' PyTorch T5EncoderModel.

  python bench/encode.py                                # T5 v1.1 base, batch 64 x 128 tokens
  python bench/encode.py --batch=4 --seq=64 --iters=5   # a 2-core CPU in about a minute
  python bench/encode.py --preset=xxl --dtype=bfloat16 --notorch   # an accelerator

Both encoders get the same T5 v1.1 shape (--preset; default base: 12 layers, d_model 768,
12 heads of 64, MLP 2048, vocabulary 32128) and the same random weights (transformers'
init, copied into ours, so the outputs are compared too), the same batch of random token
ids at full length (no padding: tokens = batch x seq), float32 (--dtype sets ours), one
forward pass per iteration. torch runs with as many threads as the machine has cores
(torch.set_num_threads; --torch_threads to change), JAX with XLA's default (all cores). Iterations alternate between
the two, so that both see the same machine load; the median is reported. Prints one JSON
line, then a human line. On a machine shared with other work, run it with
OMP_WAIT_POLICY=PASSIVE: torch's OpenMP threads otherwise spin-wait for busy cores, which
made it 4-5x slower here than the same run with that setting (bench/README.md).
"""
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from imagen_jax import host_malloc  # noqa: E402

flags.DEFINE_string("preset", "base", "T5 v1.1 shape (imagen_jax.text.T5_PRESETS).")
flags.DEFINE_integer("batch", 64, "Sequences per forward pass.")
flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
flags.DEFINE_integer("iters", 10, "Timed forward passes per framework.")
flags.DEFINE_integer("warmup", 1, "Untimed passes per framework (after JAX's compile).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Our compute dtype.")
flags.DEFINE_bool("torch", True, "Also run transformers' T5EncoderModel (fp32, CPU).")
flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: the core count).")
flags.DEFINE_integer("seed", 0, "Seed of the weights and token ids.")
FLAGS = flags.FLAGS


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from imagen_jax.text import T5Encoder, init_params, params_from_hf_state_dict, t5_config

  cfg = t5_config(FLAGS.preset, dtype=FLAGS.dtype)
  rng = np.random.default_rng(FLAGS.seed)
  ids = rng.integers(2, cfg.vocab_size, (FLAGS.batch, FLAGS.seq)).astype(np.int32)
  mask = np.ones_like(ids, bool)
  tokens = ids.size
  cores = os.cpu_count()

  model = None
  if FLAGS.torch:
    import torch
    import transformers
    torch.set_num_threads(FLAGS.torch_threads or cores)
    torch.manual_seed(FLAGS.seed)
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, feed_forward_proj="gated-gelu",
        dropout_rate=0.0)
    model = transformers.T5EncoderModel(hf_cfg).eval()
    params = params_from_hf_state_dict(model.state_dict(), cfg)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32)), params)
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run_torch():
      with torch.inference_mode():
        return model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
  else:
    params = init_params(cfg, FLAGS.seed)

  module = T5Encoder(cfg)
  forward = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m))
  j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
  t0 = time.perf_counter()
  ours = forward(params, j_ids, j_mask).block_until_ready()
  compile_s = time.perf_counter() - t0

  def run_jax():
    return forward(params, j_ids, j_mask).block_until_ready()

  for _ in range(FLAGS.warmup):
    run_jax()
    if model is not None:
      run_torch()
  times = {"jax": [], "torch": []}
  for _ in range(FLAGS.iters):
    t0 = time.perf_counter()
    run_jax()
    times["jax"].append(time.perf_counter() - t0)
    if model is not None:
      t0 = time.perf_counter()
      reference = run_torch()
      times["torch"].append(time.perf_counter() - t0)

  result = {
      "bench": "t5_encoder_throughput", "preset": FLAGS.preset, "batch": FLAGS.batch,
      "seq": FLAGS.seq, "tokens_per_batch": tokens, "iters": FLAGS.iters,
      "jax_dtype": FLAGS.dtype, "jax_backend": jax.default_backend(),
      "jax_device": str(jax.devices()[0].device_kind), "jax_compile_s": round(compile_s, 2),
      "jax_s_per_batch": round(statistics.median(times["jax"]), 4),
      "jax_tokens_per_s": round(tokens / statistics.median(times["jax"]), 1),
      "cpu": _cpu_name(), "cores": cores, "load_avg_1m": round(os.getloadavg()[0], 2),
      "jax_version": jax.__version__, "host_malloc": host_malloc.preloaded_allocator(),
      "date": time.strftime("%Y-%m-%d"),
  }
  if model is not None:
    torch_s = statistics.median(times["torch"])
    out = np.asarray(ours, np.float32)
    ref = reference.numpy()
    result.update({
        "torch_threads": torch.get_num_threads(), "torch_dtype": "float32",
        "torch_s_per_batch": round(torch_s, 4),
        "torch_tokens_per_s": round(tokens / torch_s, 1),
        "ratio_jax_over_torch": round(torch_s / statistics.median(times["jax"]), 3),
        "max_abs_diff_rel": float(np.abs(out - ref).max() / np.abs(ref).max()),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
    })
  print(json.dumps(result))
  line = (f"T5 v1.1 {FLAGS.preset} encoder, batch {FLAGS.batch} x {FLAGS.seq} tokens, "
          f"{result['jax_backend']}: ours (JAX, {FLAGS.dtype}) {result['jax_tokens_per_s']:.0f} "
          f"tokens/s")
  if model is not None:
    line += (f", transformers (PyTorch fp32, {result['torch_threads']} threads) "
             f"{result['torch_tokens_per_s']:.0f} tokens/s: ratio {result['ratio_jax_over_torch']:.2f}x"
             f" (outputs agree to {result['max_abs_diff_rel']:.1e} of their scale)")
  print(line)


if __name__ == "__main__":
  host_malloc.reexec()  # tcmalloc when the machine has it: see imagen_jax/host_malloc.py
  app.run(main)
