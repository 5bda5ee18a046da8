"""Shared by the T5 parity tests: transformers' T5 with every weight random and distinct."""
import numpy as np


def randomize_weights(torch, model, seed: int):
  """Fills `model` in place: norm scales 1 + 0.3 N, embeddings and relative-position tables
  N(0, 1), Linear [out, in] weights N(0, 1/in). Distinct values everywhere, so a swapped or
  transposed tensor cannot go unnoticed. Returns the model."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * noise)
      elif "relative_attention_bias" in name or "embed" in name or "shared" in name:
        p.copy_(noise)
      else:  # Linear [out, in]
        p.copy_(noise / np.sqrt(p.shape[1]))
  return model
