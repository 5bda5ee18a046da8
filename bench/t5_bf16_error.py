r"""bfloat16 vs float32 error of the T5 encoder (norm statistics and softmax in float32).

  python bench/t5_bf16_error.py --preset=large             # 24 layers, T5X-init weights
  python bench/t5_bf16_error.py --checkpoint=PATH          # real weights (any format)

Encodes the same prompts with compute dtype float32 and bfloat16 (params float32 in both)
and prints one JSON line: the max abs error over real tokens relative to the float32
output's max abs value, the mean per-token relative L2 error, and the minimum per-token
cosine similarity.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_string("preset", "large", "T5 v1.1 shape with random T5X-init weights.")
flags.DEFINE_string("checkpoint", None, "A T5X / Hugging Face / converted checkpoint instead.")
flags.DEFINE_integer("max_length", 128, "Tokens per prompt.")
flags.DEFINE_integer("seed", 0, "Init seed for --preset.")
FLAGS = flags.FLAGS

PROMPTS = [
    "A brown and white corgi riding a skateboard down a sunny street.",
    "a red circle to the left of a blue square",
    "An oil painting of a lighthouse on a cliff at dusk, waves crashing below, seagulls "
    "circling, in the style of the Dutch masters, dramatic clouds and warm light.",
    "cat",
    "A storefront with 'Deep Learning' written on it.",
    "Three teddy bears sitting on a bench in the snow, one of them wearing a red scarf.",
    "",
    "translate English to German: That is good.",
]


def main(argv):
  del argv
  import dataclasses

  import jax.numpy as jnp
  import numpy as np

  from imagen_jax.text import PretrainedT5Encoder, T5Encoder, init_params, t5_config

  if FLAGS.checkpoint:
    ref = T5Encoder.from_pretrained(FLAGS.checkpoint)
    name = FLAGS.checkpoint
  else:
    cfg = t5_config(FLAGS.preset)
    ref = PretrainedT5Encoder(cfg, init_params(cfg, FLAGS.seed))
    name = f"{FLAGS.preset} (random T5X init, seed {FLAGS.seed})"
  low = PretrainedT5Encoder(dataclasses.replace(ref.config, dtype=jnp.bfloat16), ref.params,
                            ref.tokenizer)
  f32, mask = ref.encode(PROMPTS, FLAGS.max_length)
  bf16, _ = low.encode(PROMPTS, FLAGS.max_length)
  a, b = np.asarray(f32)[mask], np.asarray(bf16)[mask]
  diff = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  print(json.dumps({
      "encoder": name, "layers": ref.config.num_layers, "d_model": ref.config.d_model,
      "tokens": int(mask.sum()),
      "max_abs_err_rel_to_output_max": float(np.max(np.abs(a - b)) / np.max(np.abs(a))),
      "mean_token_rel_l2_err": float(diff.mean()),
      "min_token_cosine": float(cos.min()),
  }))


if __name__ == "__main__":
  app.run(main)
