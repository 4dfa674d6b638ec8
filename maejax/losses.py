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


# ------------------------------------------------------------------------------------- MIM objectives
# BootMAE (Dong et al. 2022), SdAE (Chen et al. 2022), SD-MAE (Luo & Chen 2022), MCM: the loss equations of the
# objectives in models/objectives.py (facts: SEED_METHODS.md §1–3, §6).


def patch_channel_stats(patches: Array, channels: int, ddof: int) -> tuple[Array, Array]:
  """Mean and variance per patch and per channel over its p² pixels: ``(B, L, p²·C)`` → two ``(B, L, 1, C)``
  (the ``(h, w, p, q, c)`` patch layout has the channel fastest)."""
  x = patches.reshape(patches.shape[:-1] + (-1, channels))
  return x.mean(-2, keepdims=True), x.var(-2, keepdims=True, ddof=ddof)


def bootmae_pixel_target(patches: Array, channels: int = 3, eps: float = 1e-5) -> Array:
  """BootMAE pixel target: ``t = (x − μ_{b,l,c}) / sqrt(σ²_{b,l,c} + eps)`` per patch AND channel, BIASED variance
  (ddof 0), eps 1e-5 (MAE normalises per patch over all channels, ddof 1, eps 1e-6). ``(B, L, p²·C)``."""
  x = patches.reshape(patches.shape[:-1] + (-1, channels))
  mean, var = patch_channel_stats(patches, channels, ddof=0)
  return ((x - mean) / jnp.sqrt(var + eps)).reshape(patches.shape)


def layer_norm_noaffine(x: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without scale and bias over the last axis: ``(x − mean) / sqrt(var + eps)``, biased variance."""
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(x.var(-1, keepdims=True) + eps)


def block_weights(mask: Array, grid: int) -> Array:
  """BootMAE patch weights ``w = m ⊙ (1 + AvgPool3×3(m))`` on the ``grid × grid`` mask (stride 1, zero padding
  counted in the divisor 9): a masked patch weighs ``1 + (masked patches in its 3×3 window)/9``, a visible one 0.
  ``mask: (B, L)`` (1 = removed) → ``(B, L)``."""
  m = mask.reshape(-1, grid, grid).astype(jnp.float32)
  padded = jnp.pad(m, ((0, 0), (1, 1), (1, 1)))
  pooled = sum(padded[:, i:i + grid, j:j + grid] for i in range(3) for j in range(3)) / 9.0
  return (m * (1.0 + pooled)).reshape(mask.shape)


def weighted_masked_mse(pred: Array, target: Array, mask: Array, weights: Array | None = None) -> Array:
  """``Σ_{b,l} w_bl · mean_last (pred − target)² / Σ_{b,l} m_bl`` (BootMAE: normalised by the masked COUNT, not
  by Σw); ``weights=None`` is ``w = m``, the MAE loss. ``pred, target: (B, L, E)``, ``mask, weights: (B, L)``."""
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  w = mask if weights is None else weights
  return jnp.sum(per_patch * w) / jnp.sum(mask)


def bootmae_feature_loss(pred: Array, target: Array, mask: Array, weights: Array | None = None) -> Array:
  """BootMAE feature loss: ``Σ w · mean_D (LN(y) − LN(ŷ))² / Σ m`` with ``LN`` = :func:`layer_norm_noaffine` on
  both the EMA target ``y`` (no gradient) and the prediction ``ŷ``. ``(B, L, D)``, mask / weights ``(B, L)``."""
  target = layer_norm_noaffine(jax.lax.stop_gradient(target).astype(jnp.float32))
  return weighted_masked_mse(layer_norm_noaffine(pred.astype(jnp.float32)), target, mask, weights)


def linear_ramp(progress: Array, ramp: float) -> Array:
  """``min(1, progress / ramp)``; ``ramp = 0`` is 1 throughout. BootMAE's feature weight is ``λ₀·min(1, 4(1+e)/E)``
  = ``λ₀ · linear_ramp((e+1)/E, 0.25)``."""
  if ramp <= 0:
    return jnp.ones_like(jnp.asarray(progress, jnp.float32))
  return jnp.minimum(1.0, jnp.asarray(progress, jnp.float32) / ramp)


def sdae_target(t: Array, eps: float = 1e-6) -> Array:
  """SdAE target: per-token standardisation ``(t − mean_D t) / sqrt(var_D t + eps)``, UNBIASED variance."""
  t = jax.lax.stop_gradient(t).astype(jnp.float32)
  return (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True, ddof=1) + eps)


COS_AXES = ("feature", "token")


def cosine_similarity(a: Array, b: Array, axis: int, eps: float = 1e-8) -> Array:
  """``a·b / (max(‖a‖, eps)·max(‖b‖, eps))`` along ``axis`` (torch's ``F.cosine_similarity``)."""
  na = jnp.maximum(jnp.sqrt(jnp.sum(a * a, axis)), eps)
  nb = jnp.maximum(jnp.sqrt(jnp.sum(b * b, axis)), eps)
  return jnp.sum(a * b, axis) / (na * nb)


def sdae_cosine_loss(pred: Array, target: Array, axis: str = "feature") -> Array:
  """SdAE loss ``1 − mean cos(t̃, ŷ)`` on ``(V, T, D)`` (V = batch × folds, T tokens per fold).

  ``"feature"``: cosine per token over the D features, mean over the V·T tokens (the evident intent).
  ``"token"``: the official code's ``F.cosine_similarity(t̃, ŷ)`` with its default ``dim=1`` = the TOKEN axis:
  cosine per (view, channel) over the T tokens, mean over V·D.
  """
  if axis not in COS_AXES:
    raise ValueError(f"unknown SdAE cosine axis {axis!r}; expected one of {COS_AXES}")
  return 1.0 - jnp.mean(cosine_similarity(pred.astype(jnp.float32), target, -1 if axis == "feature" else 1))


CENTER_MODES = ("sdmae", "dino")


def dino_ce(student: Array, teacher: Array, center: Array, tau_s: float, tau_t: float, stop_grad: bool = True
            ) -> Array:
  """Self-distillation cross-entropy ``mean_b [−Σ_k softmax((t_b − c)/τ_t)_k · log softmax(s_b/τ_s)_k]``.

  ``student, teacher: (B, K)`` logits, ``center: (K,)``. ``stop_grad`` (DINO) detaches the teacher
  distribution; the SD-MAE code does not (``stop_grad=False``: gradients reach the teacher branch too).
  """
  t = jax.nn.softmax((teacher.astype(jnp.float32) - center) / tau_t, axis=-1)
  if stop_grad:
    t = jax.lax.stop_gradient(t)
  logp = jax.nn.log_softmax(student.astype(jnp.float32) / tau_s, axis=-1)
  return jnp.mean(-jnp.sum(t * logp, axis=-1))


def center_update(center: Array, teacher: Array, tau_t: float, momentum: float = 0.9, mode: str = "sdmae"
                  ) -> Array:
  """Centre ``c ← m·c + (1 − m)·mean_b u_b`` (no gradient). ``"sdmae"`` (SD-MAE's code): ``u_b =
  softmax((t_b − c)/τ_t)``, the teacher's PROBABILITIES; ``"dino"``: ``u_b = t_b``, its logits."""
  if mode not in CENTER_MODES:
    raise ValueError(f"unknown centre mode {mode!r}; expected one of {CENTER_MODES}")
  t = jax.lax.stop_gradient(teacher).astype(jnp.float32)
  u = jax.nn.softmax((t - center) / tau_t, axis=-1) if mode == "sdmae" else t
  return momentum * center + (1 - momentum) * u.mean(0)


def sdmae_pixel_target(patches: Array, channels: int = 3, eps: float = 1e-6) -> Array:
  """SD-MAE pixel target: ``(x − μ) / (σ + eps)`` per patch and channel, σ the UNBIASED standard deviation, eps
  added to σ (not to σ²). ``(B, L, p²·C)``."""
  x = patches.reshape(patches.shape[:-1] + (-1, channels))
  mean, var = patch_channel_stats(patches, channels, ddof=1)
  return ((x - mean) / (jnp.sqrt(var) + eps)).reshape(patches.shape)


def sdmae_total_loss(pixel_loss: Array, sd_loss: Array, p: float = 0.2) -> Array:
  """SD-MAE total ``p·L_SD + (1 − p)·L_pix`` (p = 0.2 in its code)."""
  return p * sd_loss + (1 - p) * pixel_loss


# ------------------------------------------------------------------------------------- AU: the KD family
# Knowledge transfer from the clean-face AU teacher to the occluded-face student beyond node / edge KD
# (issue 15): probability KD (Hinton et al. 2015), pseudo-labels (self-training), latent KD on the transform's
# tokens (BootMAE / DMAE-style normalised targets), triplet KD on node features (Georgescu et al., MVA 2022).
# The teacher side always gets stop_gradient; in online KD the trainer calls these with the roles swapped.


def logit(p: Array, eps: float = 1e-4) -> Array:
  """``log(p / (1 − p))`` of ``p`` clipped to ``[eps, 1 − eps]`` (the cosine classifier's probabilities reach
  0 exactly, so a temperature needs the clip)."""
  p = jnp.clip(p.astype(jnp.float32), eps, 1.0 - eps)
  return jnp.log(p) - jnp.log1p(-p)


def prob_kd_loss(student_probs: Array, teacher_probs: Array, temperature: float = 1.0, eps: float = 1e-4
                 ) -> Array:
  """Probability KD (Hinton et al. 2015) for multi-label AUs, per AU a binary distribution:

  ``p_T = σ(logit(p) / T)`` for student and teacher (logits of the clipped probabilities, :func:`logit`),
  ``L = T² · mean_{b,i} −[q_T log p_T + (1 − q_T) log(1 − p_T)]`` with ``q`` the teacher's probability
  (stop_gradient). ``T²`` keeps the gradient scale independent of T, as Hinton et al. The log terms are
  log-sigmoids of the student's scaled logit (exact, no second clip). ``(B, N)`` each.
  """
  _check_au(student_probs, teacher_probs)
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  z = logit(student_probs, eps) / temperature
  q = jax.nn.sigmoid(logit(jax.lax.stop_gradient(teacher_probs), eps) / temperature)
  bce = -(q * jax.nn.log_sigmoid(z) + (1.0 - q) * jax.nn.log_sigmoid(-z))
  return temperature**2 * jnp.mean(bce)


def pseudo_labels(teacher_probs: Array, labels: Array, threshold: float = 0.5) -> Array:
  """Self-training targets: ``1[q ≥ threshold]`` where the true label is unknown (−1), −1 where it is known
  (those entries belong to the supervised term). ``(B, N)`` int32."""
  _check_au(teacher_probs, labels)
  hard = (jax.lax.stop_gradient(teacher_probs) >= threshold).astype(jnp.int32)
  return jnp.where(labels >= 0, -1, hard)


def pseudo_label_loss(probs: Array, teacher_probs: Array, labels: Array, weights: Array | None = None,
                      threshold: float = 0.5) -> Array:
  """The pseudo-label baseline: :func:`wal_loss` of the student's probabilities against
  :func:`pseudo_labels` (the teacher's thresholded clean-face predictions on the unlabelled entries)."""
  return wal_loss(probs, pseudo_labels(teacher_probs, labels, threshold), weights)


def latent_kd_loss(student: Array, teacher: Array, mask: Array | None = None, eps: float = 1e-6) -> Array:
  """Latent KD: the student's transformed tokens regress the teacher encoder's tokens of the clean face.

  ``ℓ_bl = (1/D) Σ_d (s_bld − LN(t_bl)_d)²`` with ``LN`` the affine-free :func:`layer_norm_noaffine` (biased
  variance, as BootMAE's / DMAE's normalised targets; stop_gradient on the teacher);
  ``L = Σ_bl m_bl ℓ_bl / Σ_bl m_bl`` (``mask`` None = every token; an empty mask gives 0).
  ``student, teacher: (B, L, D)``, ``mask: (B, L)`` (e.g. only the occluded patches).
  """
  if student.shape != teacher.shape:
    raise ValueError(f"latent_kd_loss: student and teacher shapes differ: {student.shape} vs {teacher.shape}")
  target = layer_norm_noaffine(jax.lax.stop_gradient(teacher).astype(jnp.float32), eps)
  per_token = jnp.mean((student.astype(jnp.float32) - target) ** 2, axis=-1)
  if mask is None:
    return jnp.mean(per_token)
  if mask.shape != per_token.shape:
    raise ValueError(f"latent_kd_loss: mask must be (B, L) = {per_token.shape}, got {mask.shape}")
  m = mask.astype(jnp.float32)
  return jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)


def triplet_kd_loss(anchor: Array, positive: Array, labels: Array, margin: float = 0.2, normalize: bool = False,
                    eps: float = 1e-6) -> Array:
  """Triplet KD on node features (Georgescu et al., MVA 2022, per AU for multi-label AUs).

  For example b and AU i: anchor ``a = s[b, i]`` (student, occluded face), positive ``p = t[b, i]`` (teacher,
  the same face clean), negative ``n = t[b', i]``: the teacher's node feature of the HARDEST valid other face,
  ``b' = argmin_{b'} d(a, t[b', i])`` over ``b' ≠ b`` with both labels of AU i known and different.
  ``ℓ_bi = max(0, d(a, p) − d(a, n) + m)``, ``d(x, y) = ‖x − y + eps‖₂`` (unsquared, torch's
  ``pairwise_distance``: per triplet this is ``F.triplet_margin_loss(a, p, n, margin=m)``).
  ``L`` = mean of ``ℓ_bi`` over the (b, i) that have a valid negative (none → 0). ``normalize``: L2-normalise
  both sides first, so ``m`` lives on [0, 2]. The teacher gets no gradient.
  ``anchor, positive: (B, N, C)``, ``labels: (B, N)`` with −1 = unknown.
  """
  if anchor.shape != positive.shape or anchor.ndim != 3 or labels.shape != anchor.shape[:2]:
    raise ValueError(f"triplet_kd_loss: expected anchor, positive (B, N, C) and labels (B, N), got "
                     f"{anchor.shape}, {positive.shape}, {labels.shape}")
  a = anchor.astype(jnp.float32)
  t = jax.lax.stop_gradient(positive).astype(jnp.float32)
  if normalize:
    a, t = l2_normalize(a), l2_normalize(t)
  d_ap = jnp.sqrt(jnp.sum((a - t + eps) ** 2, axis=-1))  # (B, N)
  d_an = jnp.sqrt(jnp.sum((a[:, None] - t[None] + eps) ** 2, axis=-1))  # (B, B', N)
  known = labels >= 0
  b = labels.shape[0]
  valid = (known[:, None] & known[None] & (labels[:, None] != labels[None])
           & ~jnp.eye(b, dtype=bool)[:, :, None])
  hardest = jnp.argmin(jnp.where(valid, jax.lax.stop_gradient(d_an), jnp.inf), axis=1)  # (B, N)
  d_neg = jnp.take_along_axis(d_an, hardest[:, None], axis=1)[:, 0]
  has = valid.any(axis=1).astype(jnp.float32)
  per = jnp.maximum(d_ap - d_neg + margin, 0.0)
  return jnp.sum(per * has) / jnp.maximum(jnp.sum(has), 1.0)
