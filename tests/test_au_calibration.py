"""Per-AU threshold calibration (graceful degradation): F1-optimal thresholds against a brute-force search, the
fall-back to the "every AU present" prior for an uninformative model, and the calibration.json round trip."""

import numpy as np
import pytest

from maejax import au_infer, metrics


def _f1(p, y, t):
  pred = p >= t
  tp = (pred & (y == 1)).sum()
  return 2 * tp / (pred.sum() + (y == 1).sum())


def _brute_force_best_f1(p, y):
  """Every threshold that can change a decision: each probability, each midpoint, and above the maximum."""
  v = np.unique(p)
  cands = np.concatenate([v, (v[:-1] + v[1:]) / 2, [v[-1] + 1.0, 0.0]])
  return max(_f1(p, y, t) for t in cands)


def test_f1_optimal_thresholds_match_brute_force():
  rng = np.random.default_rng(0)
  m, n = 60, 6
  y = (rng.uniform(size=(m, n)) < np.linspace(0.1, 0.6, n)).astype(np.int64)
  # Informative, noisy, tied (rounded) and useless probabilities; some unknown labels.
  p = np.clip(0.3 * y + rng.normal(0.35, 0.2, size=(m, n)), 0, 1)
  p[:, 2] = np.round(p[:, 2], 1)
  p[:, 3] = rng.uniform(size=m)
  y[rng.uniform(size=(m, n)) < 0.1] = -1
  thr = au_infer.f1_optimal_thresholds(p, y)
  assert thr.shape == (n,) and thr.dtype == np.float64
  for i in range(n):
    known = y[:, i] >= 0
    best = _brute_force_best_f1(p[known, i], y[known, i])
    np.testing.assert_allclose(_f1(p[known, i], y[known, i], thr[i]), best, rtol=1e-9)
  # The decisions through binarize give the same F1 in the project's counters.
  counts = metrics.AUCounts(n).update(au_infer.binarize(p, thr), y)
  for i in range(n):
    known = y[:, i] >= 0
    np.testing.assert_allclose(counts.f1()[i], _f1(p[known, i], y[known, i], thr[i]), rtol=1e-6)


def test_uninformative_model_falls_back_to_the_prior():
  """Probabilities that carry no information: the best threshold predicts every face present, whose F1 is the
  prior's 2r / (1 + r) — never below it (the 0.5 threshold here predicts nothing: F1 0)."""
  rng = np.random.default_rng(1)
  y = (rng.uniform(size=(400, 1)) < 0.3).astype(np.int64)
  p = np.full((400, 1), 0.2)
  thr = au_infer.f1_optimal_thresholds(p, y)
  r = y.mean()
  np.testing.assert_allclose(_f1(p[:, 0], y[:, 0], thr[0]), 2 * r / (1 + r), rtol=1e-9)
  assert _f1(p[:, 0], y[:, 0], 0.5) == 0.0


def test_no_positive_keeps_default_and_bad_shapes():
  thr = au_infer.f1_optimal_thresholds(np.array([[0.1, 0.9], [0.2, 0.8]]), np.array([[0, -1], [0, -1]]))
  np.testing.assert_array_equal(thr, [0.5, 0.5])
  with pytest.raises(ValueError, match="probs and labels"):
    au_infer.f1_optimal_thresholds(np.zeros((3, 2)), np.zeros((3, 3)))


def test_calibration_file_round_trip(tmp_path):
  assert au_infer.read_calibration(str(tmp_path)) is None
  t = np.array([0.25, 0.5, 0.75])
  au_infer.write_calibration(str(tmp_path), t, {"split": "val"})
  np.testing.assert_array_equal(au_infer.read_calibration(str(tmp_path), 3), t)
  with pytest.raises(ValueError, match="thresholds"):
    au_infer.read_calibration(str(tmp_path), 4)
