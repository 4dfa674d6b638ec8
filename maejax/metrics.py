"""AU detection metrics: per-AU F1 and accuracy at threshold 0.5 with counts accumulated over a whole split.

The protocol (DESIGN.md §6, ME-GraphAU ``utils.statistics`` / ``calc_f1_score``): predict ``p ≥ 0.5``,
count TP / FP / FN / TN per AU over ALL frames of the test fold (not per batch), then
``F1_i = 2TP / (2TP + FP + FN)`` and the mean over AUs. Labels are 1 / 0 / −1 (unknown); unknown entries are
left out of every count.

Edge cases (sklearn ``f1_score(..., zero_division=0)`` by default): an AU with no positive label and no
positive prediction has ``2TP + FP + FN = 0`` and gets ``zero_division`` (0.0 by default, as the reference's
1e-20 smoothing gives; pass 1.0 or ``nan`` to match other sklearn settings — ``nan`` is then skipped by the
mean).
The accuracy ``(TP + TN) / known`` of an AU with no known label is ``nan`` and skipped by the mean.

Two forms:
  * :class:`AUCounts`, a host-numpy accumulator (``update(probs, labels)`` batch by batch, then ``f1()``);
  * :class:`AUF1Metric`, a ``clu.metrics.Metric`` (jit-able counts; ``merge`` / ``reduce`` across steps and
    devices).
Both use :func:`confusion_counts`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

Array = jax.Array


def confusion_counts(probs, labels, threshold: float = 0.5, xp=jnp):
  """Per-AU ``(tp, fp, fn, tn)``, each ``(N,)`` int32, from ``probs, labels: (B, N)``; unknown (−1) skipped.

  ``xp`` is ``jax.numpy`` (jit-able) or ``numpy`` (host).
  """
  if probs.ndim != 2 or probs.shape != labels.shape:
    raise ValueError(f"probs and labels must both be (B, N), got {probs.shape} and {labels.shape}")
  pred = probs >= threshold
  known = labels >= 0
  pos = known & (labels > 0)
  neg = known & (labels == 0)
  count = lambda m: xp.sum(m, axis=0).astype(xp.int32 if xp is jnp else np.int64)
  return count(pred & pos), count(pred & neg), count(~pred & pos), count(~pred & neg)


def f1_from_counts(tp, fp, fn, zero_division: float = 0.0) -> np.ndarray:
  """``2TP / (2TP + FP + FN)`` per AU (float64), ``zero_division`` where the denominator is 0."""
  tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
  den = 2 * tp + fp + fn
  return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), zero_division)


def accuracy_from_counts(tp, fp, fn, tn) -> np.ndarray:
  """``(TP + TN) / (TP + FP + FN + TN)`` per AU (float64); ``nan`` for an AU with no known label."""
  tp, fp, fn, tn = (np.asarray(a, np.float64) for a in (tp, fp, fn, tn))
  den = tp + fp + fn + tn
  return np.where(den > 0, (tp + tn) / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float("nan")


class AUCounts:
  """Streaming per-AU confusion counts on host numpy.

  >>> acc = AUCounts(num_aus=12)
  >>> for probs, labels in batches:        # (B, N) each; device arrays are fine
  ...   acc.update(probs, labels)
  >>> acc.f1(), acc.mean_f1(), acc.accuracy()
  """

  def __init__(self, num_aus: int, threshold: float = 0.5, zero_division: float = 0.0):
    if num_aus < 1:
      raise ValueError(f"num_aus must be >= 1, got {num_aus}")
    self.num_aus = num_aus
    self.threshold = threshold
    self.zero_division = zero_division
    self.reset()

  def reset(self) -> None:
    self.tp, self.fp, self.fn, self.tn = (np.zeros(self.num_aus, np.int64) for _ in range(4))

  def update(self, probs, labels) -> AUCounts:
    """Adds the counts of one batch ``probs, labels: (B, N)``; returns self."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] != self.num_aus:
      raise ValueError(f"probs must be (B, {self.num_aus}), got {probs.shape}")
    tp, fp, fn, tn = confusion_counts(probs, labels, self.threshold, xp=np)
    self.tp += tp
    self.fp += fp
    self.fn += fn
    self.tn += tn
    return self

  def merge(self, other: AUCounts) -> AUCounts:
    """Adds another accumulator's counts (e.g. from another process); returns self."""
    if other.num_aus != self.num_aus:
      raise ValueError(f"cannot merge counts of {other.num_aus} AUs into {self.num_aus}")
    for name in ("tp", "fp", "fn", "tn"):
      setattr(self, name, getattr(self, name) + getattr(other, name))
    return self

  def f1(self) -> np.ndarray:
    """Per-AU F1, ``(N,)``."""
    return f1_from_counts(self.tp, self.fp, self.fn, self.zero_division)

  def mean_f1(self) -> float:
    """F1 averaged over AUs (``nan`` entries, only possible with ``zero_division=nan``, are skipped)."""
    return _nanmean(self.f1())

  def accuracy(self) -> np.ndarray:
    """Per-AU accuracy over known labels, ``(N,)``."""
    return accuracy_from_counts(self.tp, self.fp, self.fn, self.tn)

  def result(self) -> dict[str, float | np.ndarray]:
    """``{"f1": (N,), "mean_f1", "accuracy": (N,), "mean_accuracy"}``."""
    acc = self.accuracy()
    return {"f1": self.f1(), "mean_f1": self.mean_f1(), "accuracy": acc, "mean_accuracy": _nanmean(acc)}


@flax.struct.dataclass
class AUF1Metric(clu_metrics.Metric):
  """clu metric holding per-AU counts; ``compute()`` is the mean F1 over AUs (zero_division 0).

  Use ``AUF1Metric.from_model_output(probs=..., labels=...)`` inside a jitted step and ``merge`` across steps,
  or put it in a ``clu.metrics.Collection``. ``compute_per_au()`` gives the per-AU F1 and accuracy.
  """

  tp: Array
  fp: Array
  fn: Array
  tn: Array

  @classmethod
  def from_model_output(cls, probs: Array, labels: Array, **_) -> AUF1Metric:
    return cls(*confusion_counts(jnp.asarray(probs), jnp.asarray(labels)))

  @classmethod
  def empty(cls) -> AUF1Metric:
    # Scalars broadcast against the (N,) counts in merge().
    zero = jnp.zeros((), jnp.int32)
    return cls(zero, zero, zero, zero)

  def merge(self, other: AUF1Metric) -> AUF1Metric:
    return type(self)(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

  def compute(self) -> Array:
    tp, fp, fn = (x.astype(jnp.float32) for x in (self.tp, self.fp, self.fn))
    den = 2 * tp + fp + fn
    return jnp.mean(jnp.where(den > 0, 2 * tp / jnp.where(den > 0, den, 1.0), 0.0))

  def compute_per_au(self) -> dict[str, np.ndarray]:
    """Host-side per-AU ``{"f1", "accuracy"}``."""
    counts = [np.asarray(x) for x in (self.tp, self.fp, self.fn, self.tn)]
    return {"f1": f1_from_counts(*counts[:3]), "accuracy": accuracy_from_counts(*counts)}
