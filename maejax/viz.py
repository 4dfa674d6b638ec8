"""Figures: MAE reconstruction grids (original / masked / reconstruction)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def mae_reconstruction_grid(originals: np.ndarray, masked: np.ndarray, recon: np.ndarray,
                            path: str, scale: int = 2) -> str:
  """Writes a PNG with one row per image: original | masked input | reconstruction (visible patches pasted).

  All inputs ``(n, H, W, 3)`` uint8.
  """
  n, h, w, _ = originals.shape
  pad = 2
  canvas = np.full((n * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    for j, img in enumerate((originals[i], masked[i], recon[i])):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      canvas[y:y + h, x:x + w] = img
  im = Image.fromarray(canvas)
  if scale != 1:
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
  im.save(path)
  return path
