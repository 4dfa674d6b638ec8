"""Losses of maejax, one short function per equation.

MAE (He et al.): :func:`norm_pix_target`, :func:`mae_loss`.
DMAE (Bai et al.): :func:`l2_normalize`, :func:`feature_distance`, :func:`dmae_feature_loss`.
ME-GraphAU / occlusion KD: :func:`wal_loss`, :func:`au_pos_weights`, :func:`edge_ce_loss`, node/edge KD,
:func:`occlusion_bce` (the token-drop predictor), :func:`weighted_sum` (a student's total).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
  """Mean over masked patches of the per-patch MSE.

  ``pred, target: (B, L, p²·C)``, ``mask: (B, L)`` with 1 = removed.
  """
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


# ----------------------------------------------------------------------------------------------- AU
# ME-GraphAU (Luo et al. 2022) supervised losses and the node / edge KD of occlusion-robust AU detection.
# Labels are (B, N): 1 = present, 0 = absent, -1 = unknown; unknown entries never count, in either direction.

KD_KINDS = ("mse", "cosine", "l1", "smooth_l1")


def au_pos_weights(labels, min_rate: float = 1e-4) -> np.ndarray:
  """Per-AU WAL weights ``w_i = N·(1/r_i) / Σ_j (1/r_j)`` from training labels ``(M, N)``.

  Host numpy, computed once per training fold. ``r_i`` = positive rate of AU i among its KNOWN labels (−1
  entries are left out of numerator and denominator).
  An AU that is never positive gets ``r_i = min_rate`` (the formula would divide by zero). An AU with no known
  label at all gets weight 0 and the others are normalised to sum to N. Returns float32 ``(N,)``.
  """
  y = np.asarray(labels)
  if y.ndim != 2:
    raise ValueError(f"labels must be (M, N), got shape {y.shape}")
  if not np.isin(y, (-1, 0, 1)).all():
    raise ValueError(f"labels must hold 1, 0 or -1 (unknown), got values {np.unique(y)[:10]}")
  if not 0.0 < min_rate <= 1.0:
    raise ValueError(f"min_rate must be in (0, 1], got {min_rate}")
  known = (y >= 0).sum(axis=0)
  pos = (y == 1).sum(axis=0)
  has = known > 0
  if not has.any():
    raise ValueError("labels has no known (0/1) entry")
  rate = np.maximum(pos / np.maximum(known, 1), min_rate)
  inv = np.where(has, 1.0 / rate, 0.0)
  return (y.shape[1] * inv / inv.sum()).astype(np.float32)


def _check_au(probs: Array, labels: Array) -> None:
  if probs.ndim != 2 or probs.shape != labels.shape:
    raise ValueError(f"probs and labels must both be (B, N), got {probs.shape} and {labels.shape}")


def wal_loss(probs: Array, labels: Array, weights: Array | None = None, eps: float = 1e-8) -> Array:
  """Weighted asymmetric loss of ME-GraphAU.

  Per entry ``ℓ_bi = −w_i [y log p + (1 − y) · sg(p) · log(1 − p)]`` with ``sg`` = stop_gradient (the focusing
  factor is detached) and logs of ``max(·, eps)`` (the reference clamps). Normalisation: the mean over KNOWN
  entries, ``L = Σ_{b,i} m_bi ℓ_bi / Σ_{b,i} m_bi`` with ``m = (labels >= 0)``; with no unknown labels this is
  ``(1/B) Σ_b (1/N) Σ_i ℓ_bi``, the reference value. No known entry → 0.

  ``probs, labels: (B, N)``; ``weights: (N,)`` from :func:`au_pos_weights` (None = all ones).
  """
  _check_au(probs, labels)
  mask = (labels >= 0).astype(jnp.float32)
  y = jnp.where(labels > 0, 1.0, 0.0)
  p = probs.astype(jnp.float32)
  log_pos = jnp.log(jnp.maximum(p, eps))
  log_neg = jnp.log(jnp.maximum(1.0 - p, eps))
  per_entry = -(y * log_pos + (1.0 - y) * jax.lax.stop_gradient(p) * log_neg)
  if weights is not None:
    if weights.shape != (probs.shape[1],):
      raise ValueError(f"weights must be (N,) = ({probs.shape[1]},), got {weights.shape}")
    per_entry = per_entry * weights[None].astype(jnp.float32)
  return jnp.sum(per_entry * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def edge_relation_labels(labels: Array) -> tuple[Array, Array]:
  """Edge labels ``2·y_i + y_j`` for edge ``i·N + j`` and their mask (both labels known).

  ``labels: (B, N)`` → ``(B, N·N)`` int32 in {0, 1, 2, 3}, ``(B, N·N)`` bool.
  """
  y = jnp.where(labels > 0, 1, 0).astype(jnp.int32)
  known = labels >= 0
  b, n = labels.shape
  rel = (2 * y[:, :, None] + y[:, None, :]).reshape(b, n * n)
  mask = (known[:, :, None] & known[:, None, :]).reshape(b, n * n)
  return rel, mask


def edge_ce_loss(edge_logits: Array, labels: Array) -> Array:
  """Cross-entropy of the 4-way edge classifier, mean over edges whose two AU labels are known.

  ``edge_logits: (B, N·N, 4)`` with edge ``i·N + j`` = ordered pair (i, j); target ``2·y_i + y_j``
  (ME-GraphAU ``tool/*_deal_AU_relation.py``). With no unknown labels this is torch's mean cross-entropy over
  all ``B·N²`` edges. No known edge → 0.
  """
  if labels.ndim != 2:
    raise ValueError(f"labels must be (B, N), got shape {labels.shape}")
  b, n = labels.shape
  if edge_logits.shape != (b, n * n, 4):
    raise ValueError(f"edge_logits must be (B, N·N, 4) = {(b, n * n, 4)}, got {edge_logits.shape}")
  rel, mask = edge_relation_labels(labels)
  logp = jax.nn.log_softmax(edge_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, rel[..., None], axis=-1)[..., 0]
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _kd(student: Array, teacher: Array, kind: str, what: str) -> Array:
  if student.shape != teacher.shape:
    raise ValueError(f"{what}: student and teacher shapes differ: {student.shape} vs {teacher.shape}")
  if kind not in KD_KINDS:
    raise ValueError(f"unknown kind {kind!r}; expected one of {KD_KINDS}")
  teacher = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  return feature_distance(student.astype(jnp.float32), teacher, "l2" if kind == "mse" else kind)


def node_kd_loss(student: Array, teacher: Array, kind: str = "mse") -> Array:
  """Node-level KD between ``(B, N, C)`` node features; teacher gets no gradient.

  ``mse``: mean over all elements of ``(s − t)²``; ``cosine``: mean over nodes of ``1 − cos(s_i, t_i)``;
  also ``l1`` and ``smooth_l1`` (element means).
  """
  return _kd(student, teacher, kind, "node_kd_loss")


def edge_kd_loss(student: Array, teacher: Array, kind: str = "mse") -> Array:
  """Edge-level KD between ``(B, N·N, C)`` edge features; kinds and reductions as :func:`node_kd_loss`."""
  return _kd(student, teacher, kind, "edge_kd_loss")


def occlusion_bce(logits: Array, frac: Array) -> Array:
  """Per-patch BCE of the occlusion predictor against the true occluded fraction (a soft target), mean:
  ``max(z, 0) − z·f + log(1 + e^{−|z|})``."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jnp.maximum(logits, 0) - logits * frac + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def weighted_sum(terms: Mapping[str, Array], weights: Mapping[str, Array]) -> Array:
  """``Σ_k w_k · term_k`` over the terms present (the weights are arrays, so models that differ only in them
  share one compiled step)."""
  return sum(weights[k] * v for k, v in terms.items())
