"""Figures: MAE reconstruction grids (original / masked / reconstruction)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def masked_and_pasted(images: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The two right-hand panels of a reconstruction row, in the space of ``images`` (e.g. normalised pixels):
  the masked input (removed patches filled with the minimum of ``images``) and the reconstruction with the
  visible patches pasted from ``images`` (the official MAE visualisation: only masked patches are predicted).

  ``images, recon: (n, H, W, C)``; ``mask: (n, L)``, 1 = removed, ``L = (H/p)²`` patches in row-major order
  (``models.vit.patchify``'s). Returns two ``(n, H, W, C)`` float32 arrays.
  """
  images, recon = np.asarray(images, np.float32), np.asarray(recon, np.float32)
  n, h, w, _ = images.shape
  grid = int(round(mask.shape[1] ** 0.5))
  if grid * grid != mask.shape[1] or h % grid or w % grid:
    raise ValueError(f"mask {mask.shape} is not a square patch grid of images {images.shape}")
  m = np.asarray(mask, np.float32).reshape(n, grid, 1, grid, 1, 1)
  m = np.broadcast_to(m, (n, grid, h // grid, grid, w // grid, 1)).reshape(n, h, w, 1)
  return images * (1 - m) + m * images.min(), images * (1 - m) + recon * m


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
