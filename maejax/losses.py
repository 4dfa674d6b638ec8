"""Losses of maejax, one short function per equation.

MAE (He et al.): :func:`norm_pix_target`, :func:`mae_loss`.
DMAE (Bai et al.): :func:`l2_normalize`, :func:`feature_distance`, :func:`dmae_feature_loss`.
ME-GraphAU / occlusion KD: :func:`wal_loss`, :func:`au_pos_weights`, :func:`edge_ce_loss`, node/edge KD.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

# ---------------------------------------------------------------------------------------------- MAE


def norm_pix_target(target: Array, eps: float = 1e-6) -> Array:
  """Per-patch normalised pixels ``(t − mean) / sqrt(var + eps)`` with the UNBIASED variance (torch default).

  ``target: (B, L, p²·C)``.
  """
  mean = target.mean(axis=-1, keepdims=True)
  var = target.var(axis=-1, keepdims=True, ddof=1)
  return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: Array, target: Array, mask: Array, norm_pix: bool = True) -> Array:
  """Mean over masked patches of the per-patch MSE. ``pred, target: (B, L, p²·C)``, ``mask: (B, L)`` 1 = removed."""
  if norm_pix:
    target = norm_pix_target(target)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


# --------------------------------------------------------------------------------------------- DMAE

DISTANCES = ("l1", "l2", "smooth_l1", "cosine")


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  """``x / max(||x||₂, eps)`` over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def feature_distance(student: Array, teacher: Array, distance: str = "l1") -> Array:
  """Mean distance between two feature tensors of equal shape ``(..., C)``."""
  if distance == "l1":
    return jnp.mean(jnp.abs(student - teacher))
  if distance == "l2":
    return jnp.mean((student - teacher) ** 2)
  if distance == "smooth_l1":  # torch's default beta = 1
    d = jnp.abs(student - teacher)
    return jnp.mean(jnp.where(d < 1.0, 0.5 * d**2, d - 0.5))
  if distance == "cosine":
    return jnp.mean(1.0 - jnp.sum(l2_normalize(student) * l2_normalize(teacher), axis=-1))
  raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")


def dmae_feature_loss(student: Array, teacher: Array, distance: str = "l1") -> Array:
  """DMAE: distance between the L2-normalised projected student feature and the L2-normalised teacher feature.

  ``student, teacher: (B, 1+K, C_teacher)`` on the same visible tokens. The teacher gets no gradient.
  """
  teacher = jax.lax.stop_gradient(teacher)
  return feature_distance(l2_normalize(student), l2_normalize(teacher), distance)


def dmae_total_loss(pixel_loss: Array, feature_losses: Sequence[Array], alpha: float = 1.0) -> Array:
  """Total = pixel loss + α · mean over aligned (student, teacher) block pairs of the feature loss."""
  return pixel_loss + alpha * sum(feature_losses) / max(len(feature_losses), 1)
