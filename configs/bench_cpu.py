"""The CPU benchmark target of issue 6: one 32x32 base stage sized for a 2-core CPU.

Width 64, channel multipliers (1, 2, 4), 2 residual blocks per level, self- and
cross-attention at the two lowest-resolution levels (16x16 and 8x8), batch 16, 16 text
tokens of width 256 (a small frozen T5 v1.1 with random weights, d_model 256), float32,
Adam. The target: at least imagen-pytorch's images/s on the same machine
(`python bench/train_step.py --config=configs/bench_cpu.py --peer`; bench/README.md).

Not a training recipe: it reuses the shapes task only so that the config is complete.
"""
from imagen_jax.config_files import load_sibling


def get_config(arg=None):
  del arg
  shapes = load_sibling(__file__, "shapes")
  c = shapes.get_config()
  c.text.update(d_model=256, num_layers=2, num_heads=4, head_dim=64, mlp_dim=512, max_length=16)
  base = shapes.stage_config(
      resolution=32, lowres_resolution=0,
      unet=dict(base_channels=64, channel_mults=(1, 2, 4), num_res_blocks=2,
                self_attn_levels=(1, 2), cross_attn_levels=(1, 2), attn_heads=4,
                attn_head_dim=32, cond_dim=256, space_to_depth=1, efficient=False),
      steps=100, batch_size=16, learning_rate=1e-4, sample_steps=20, guidance_weight=3.0)
  c.stage_order = ("base",)
  c.stages = {"base": base}
  return c
