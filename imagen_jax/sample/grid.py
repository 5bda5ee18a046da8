"""Image grids with captions, and PNG output."""
from __future__ import annotations

import math
import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def make_grid(images: np.ndarray, captions: Sequence[str] | None = None, *, columns: int = 0,
              tile: int = 96) -> Image.Image:
  """uint8 [N, H, W, 3] -> one PIL image; each tile upscaled (nearest) to `tile` px wide,
  with its caption wrapped underneath when captions are given."""
  images = np.asarray(images)
  n = len(images)
  columns = columns or min(n, max(1, math.ceil(math.sqrt(n))))
  rows = math.ceil(n / columns)
  font = ImageFont.load_default()
  wrap = max(8, tile // 6)
  lines = [textwrap.wrap(c, wrap)[:4] for c in captions] if captions is not None else [[]] * n
  text_h = 11 * max((len(l) for l in lines), default=0)
  cell_w, cell_h = tile + 4, tile + 4 + text_h
  grid = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    x, y = c * cell_w + 2, r * cell_h + 2
    tile_img = Image.fromarray(image).resize((tile, tile), Image.NEAREST)
    grid.paste(tile_img, (x, y))
    for j, line in enumerate(lines[i]):
      draw.text((x, y + tile + 1 + 11 * j), line, fill=(0, 0, 0), font=font)
  return grid


def save_images(images: np.ndarray, directory: str, prefix: str = "") -> list[str]:
  """Writes one PNG per image; returns the paths."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i, image in enumerate(np.asarray(images)):
    path = os.path.join(directory, f"{prefix}{i:04d}.png")
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths
