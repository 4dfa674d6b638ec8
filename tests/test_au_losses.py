"""AU losses against plain-numpy / PyTorch references: WAL and its gradient, AU weights, edge CE, KD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maejax import losses


def _wal_numpy(p, y, w, eps=1e-8):
  """WAL by hand: mean over known entries of −w_i [y log p + (1 − y) p log(1 − p)]."""
  total, count = 0.0, 0
  for b in range(p.shape[0]):
    for i in range(p.shape[1]):
      if y[b, i] < 0:
        continue
      pb = p[b, i]
      if y[b, i] == 1:
        term = np.log(max(pb, eps))
      else:
        term = pb * np.log(max(1 - pb, eps))
      total += -w[i] * term
      count += 1
  return total / count


def test_wal_hand_example():
  p = np.array([[0.9, 0.2, 0.6], [0.3, 0.7, 0.1]], np.float32)
  y = np.array([[1, 0, -1], [0, -1, 1]], np.int32)
  w = np.array([0.5, 1.0, 1.5], np.float32)
  # Written out: known entries (0,0) y=1, (0,1) y=0, (1,0) y=0, (1,2) y=1.
  hand = -(0.5 * np.log(0.9) + 1.0 * 0.2 * np.log(0.8) + 0.5 * 0.3 * np.log(0.7) + 1.5 * np.log(0.1)) / 4
  np.testing.assert_allclose(_wal_numpy(p, y, w), hand, rtol=1e-6)
  got = losses.wal_loss(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w))
  np.testing.assert_allclose(float(got), hand, rtol=1e-5)


def test_wal_random_matches_numpy_and_reference_without_unknowns():
  rng = np.random.default_rng(0)
  p = rng.uniform(0.01, 0.99, size=(7, 12)).astype(np.float32)
  y = rng.integers(-1, 2, size=(7, 12))
  w = rng.uniform(0.2, 3, size=12).astype(np.float32)
  got = float(losses.wal_loss(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w)))
  np.testing.assert_allclose(got, _wal_numpy(p, y, w), rtol=1e-5)
  # Fully labelled: equals the reference's loss.mean(dim=-1).mean() of −w·(...).
  y01 = rng.integers(0, 2, size=(7, 12))
  ref = -(w * (y01 * np.log(p) + (1 - y01) * p * np.log(1 - p))).mean(-1).mean()
  np.testing.assert_allclose(float(losses.wal_loss(jnp.asarray(p), jnp.asarray(y01), jnp.asarray(w))), ref,
                             rtol=1e-5)
  # No weights = all ones; no known entry → 0.
  np.testing.assert_allclose(float(losses.wal_loss(jnp.asarray(p), jnp.asarray(y))),
                             _wal_numpy(p, y, np.ones(12)), rtol=1e-5)
  assert float(losses.wal_loss(jnp.asarray(p), -jnp.ones((7, 12)))) == 0.0


def test_wal_gradient_has_focusing_factor_detached():
  rng = np.random.default_rng(1)
  p = rng.uniform(0.05, 0.95, size=(4, 5)).astype(np.float32)
  y = rng.integers(-1, 2, size=(4, 5))
  w = rng.uniform(0.5, 2, size=5).astype(np.float32)
  g = np.asarray(jax.grad(losses.wal_loss)(jnp.asarray(p), jnp.asarray(y), jnp.asarray(w)))
  m = (y >= 0).sum()
  # d/dp of −w y log p = −w / p; of −w sg(p) log(1 − p) = +w p / (1 − p); unknown entries: 0.
  analytic = np.where(y == 1, -w / p, np.where(y == 0, w * p / (1 - p), 0.0)) / m
  np.testing.assert_allclose(g, analytic, rtol=1e-5, atol=1e-7)
  # Not the gradient with the focusing factor attached (which would add −w log(1 − p) for negatives).
  attached = np.where(y == 0, w * (p / (1 - p) - np.log(1 - p)), 0.0) / m
  assert not np.allclose(g[y == 0], attached[y == 0])


def test_au_pos_weights_formula():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, size=(200, 6)) * (rng.uniform(size=(200, 6)) < 0.2 + 0.1 * np.arange(6))
  labels = np.where(rng.uniform(size=labels.shape) < 0.1, -1, labels)
  got = losses.au_pos_weights(labels)
  n = labels.shape[1]
  rates = np.array([(labels[:, i] == 1).sum() / (labels[:, i] >= 0).sum() for i in range(n)])
  expected = n * (1 / rates) / (1 / rates).sum()
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_allclose(got.sum(), n, rtol=1e-6)
  assert got.dtype == np.float32


def test_au_pos_weights_edge_cases():
  labels = np.array([[1, 0, -1], [0, 0, -1], [1, 0, -1], [0, 0, -1]])
  w = losses.au_pos_weights(labels, min_rate=0.01)
  inv = np.array([1 / 0.5, 1 / 0.01, 0.0])  # AU 1 never positive → r = min_rate; AU 2 never known → 0
  np.testing.assert_allclose(w, 3 * inv / inv.sum(), rtol=1e-6)
  with pytest.raises(ValueError, match="labels"):
    losses.au_pos_weights(np.array([[1, 9]]))
  with pytest.raises(ValueError, match="labels"):
    losses.au_pos_weights(np.array([1, 0]))


def test_edge_ce_matches_torch_cross_entropy():
  rng = np.random.default_rng(3)
  b, n = 5, 4
  logits = rng.normal(size=(b, n * n, 4)).astype(np.float32)
  labels = rng.integers(-1, 2, size=(b, n))
  got = float(losses.edge_ce_loss(jnp.asarray(logits), jnp.asarray(labels)))
  # Edge (j, k) at index j·N + k has label 2·y_j + y_k (tool/BP4D_deal_AU_relation.py).
  rel = np.zeros((b, n * n), np.int64)
  keep = np.zeros((b, n * n), bool)
  for j in range(n):
    for k in range(n):
      rel[:, j * n + k] = 2 * labels[:, j] + labels[:, k]
      keep[:, j * n + k] = (labels[:, j] >= 0) & (labels[:, k] >= 0)
  ref = F.cross_entropy(torch.tensor(logits[keep]), torch.tensor(rel[keep])).item()
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  # Fully labelled: torch's mean over all B·N² edges.
  y01 = rng.integers(0, 2, size=(b, n))
  rel01 = (2 * y01[:, :, None] + y01[:, None, :]).reshape(-1)
  ref01 = F.cross_entropy(torch.tensor(logits.reshape(-1, 4)), torch.tensor(rel01)).item()
  np.testing.assert_allclose(float(losses.edge_ce_loss(jnp.asarray(logits), jnp.asarray(y01))), ref01,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="edge_logits"):
    losses.edge_ce_loss(jnp.asarray(logits[:, :-1]), jnp.asarray(labels))


@pytest.mark.parametrize("fn,shape", [(losses.node_kd_loss, (2, 5, 8)), (losses.edge_kd_loss, (2, 25, 8))])
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_kd_losses(fn, shape, kind):
  rng = np.random.default_rng(4)
  s = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  t = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  assert float(fn(s, s, kind)) == pytest.approx(0.0, abs=1e-6)
  ss, tt = np.asarray(s, np.float64), np.asarray(t, np.float64)
  if kind == "mse":
    ref = np.mean((ss - tt) ** 2)
  else:
    cos = (ss * tt).sum(-1) / np.linalg.norm(ss, axis=-1) / np.linalg.norm(tt, axis=-1)
    ref = np.mean(1 - cos)
  np.testing.assert_allclose(float(fn(s, t, kind)), ref, rtol=1e-5)
  gs, gt = jax.grad(lambda a, b: fn(a, b, kind), argnums=(0, 1))(s, t)
  assert np.abs(np.asarray(gs)).max() > 0
  np.testing.assert_array_equal(np.asarray(gt), 0.0)  # teacher is stop_gradient'ed


def test_kd_bad_arguments():
  x = jnp.zeros((2, 3, 4))
  with pytest.raises(ValueError, match="kind"):
    losses.node_kd_loss(x, x, kind="kl")
  with pytest.raises(ValueError, match="shapes"):
    losses.edge_kd_loss(x, jnp.zeros((2, 4, 4)))


# ------------------------------------------------------------------------------------- the KD family


def test_prob_kd_matches_torch_bce_with_logits_at_temperature():
  rng = np.random.default_rng(5)
  s = rng.uniform(0.0, 1.0, size=(6, 12)).astype(np.float32)
  t = rng.uniform(0.0, 1.0, size=(6, 12)).astype(np.float32)
  s[0, :3] = [0.0, 1.0, 0.5]  # the cosine classifier reaches 0 / 1 exactly: logits of the clipped values
  for temp in (1.0, 2.0, 4.0):
    zs = torch.logit(torch.tensor(s, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)) / temp
    q = torch.sigmoid(torch.logit(torch.tensor(t, dtype=torch.float64).clamp(1e-4, 1 - 1e-4)) / temp)
    ref = temp**2 * F.binary_cross_entropy_with_logits(zs, q).item()
    got = float(losses.prob_kd_loss(jnp.asarray(s), jnp.asarray(t), temp))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
  # Minimised (gradient zero) where the student equals the teacher; the teacher gets no gradient.
  gs, gt = jax.grad(lambda a, b: losses.prob_kd_loss(a, b, 2.0), argnums=(0, 1))(jnp.asarray(t), jnp.asarray(t))
  np.testing.assert_allclose(np.asarray(gs)[t > 1e-3], 0.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gt), 0.0)
  with pytest.raises(ValueError, match="temperature"):
    losses.prob_kd_loss(jnp.asarray(s), jnp.asarray(t), 0.0)


def test_pseudo_label_loss_is_wal_on_thresholded_teacher_where_unlabelled():
  rng = np.random.default_rng(6)
  p = rng.uniform(0.01, 0.99, size=(8, 12)).astype(np.float32)
  q = rng.uniform(0.0, 1.0, size=(8, 12)).astype(np.float32)
  y = rng.integers(0, 2, size=(8, 12))
  y[:5] = -1  # unlabelled frames: every AU unknown
  y[6, :4] = -1  # BP4D-style unscored AUs of a labelled frame
  w = rng.uniform(0.3, 3, size=12).astype(np.float32)
  targets = np.where(y >= 0, -1, (q >= 0.5).astype(np.int64))
  ref = _wal_numpy(p.astype(np.float64), targets, w)
  got = float(losses.pseudo_label_loss(jnp.asarray(p), jnp.asarray(q), jnp.asarray(y), jnp.asarray(w)))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(losses.pseudo_labels(jnp.asarray(q), jnp.asarray(y))), targets)
  # Fully labelled batch: nothing to pseudo-label.
  assert float(losses.pseudo_label_loss(jnp.asarray(p), jnp.asarray(q), jnp.asarray(np.abs(y)))) == 0.0


def test_latent_kd_matches_torch_layer_norm_target():
  rng = np.random.default_rng(7)
  s = rng.normal(size=(3, 16, 8)).astype(np.float32)
  t = (3.0 * rng.normal(size=(3, 16, 8)) + 1.5).astype(np.float32)
  m = (rng.uniform(size=(3, 16)) < 0.4).astype(np.float32)
  target = F.layer_norm(torch.tensor(t, dtype=torch.float64), (8,), eps=1e-6).numpy()
  per = ((s.astype(np.float64) - target) ** 2).mean(-1)
  np.testing.assert_allclose(float(losses.latent_kd_loss(jnp.asarray(s), jnp.asarray(t))), per.mean(), rtol=1e-5)
  got = float(losses.latent_kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(m)))
  np.testing.assert_allclose(got, (per * m).sum() / m.sum(), rtol=1e-5)
  assert float(losses.latent_kd_loss(jnp.asarray(s), jnp.asarray(t), jnp.zeros((3, 16)))) == 0.0
  gt = jax.grad(lambda b: losses.latent_kd_loss(jnp.asarray(s), b))(jnp.asarray(t))
  np.testing.assert_array_equal(np.asarray(gt), 0.0)


def _triplet_numpy(a, t, y, margin, normalize):
  """Per (b, i): hardest valid negative by a double loop, then torch's triplet_margin_loss on that triplet."""
  if normalize:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
  anchors, positives, negatives = [], [], []
  for b in range(a.shape[0]):
    for i in range(a.shape[1]):
      if y[b, i] < 0:
        continue
      best, best_d = None, np.inf
      for b2 in range(a.shape[0]):
        if b2 == b or y[b2, i] < 0 or y[b2, i] == y[b, i]:
          continue
        d = np.linalg.norm(a[b, i] - t[b2, i] + 1e-6)
        if d < best_d:
          best, best_d = b2, d
      if best is not None:
        anchors.append(a[b, i])
        positives.append(t[b, i])
        negatives.append(t[best, i])
  if not anchors:
    return 0.0
  return F.triplet_margin_loss(torch.tensor(np.stack(anchors)), torch.tensor(np.stack(positives)),
                               torch.tensor(np.stack(negatives)), margin=margin, p=2, eps=1e-6).item()


@pytest.mark.parametrize("normalize", [False, True])
def test_triplet_kd_matches_torch_triplet_margin_loss(normalize):
  rng = np.random.default_rng(8)
  a = rng.normal(size=(6, 5, 4))
  t = rng.normal(size=(6, 5, 4))
  y = rng.integers(-1, 2, size=(6, 5))
  y[:, 4] = 1  # AU 4 has no negative anywhere: skipped
  margin = 0.5 if normalize else 2.0
  ref = _triplet_numpy(a, t, y, margin, normalize)
  got = float(losses.triplet_kd_loss(jnp.asarray(a, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y),
                                     margin, normalize))
  assert ref > 0
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  ga, gt = jax.grad(lambda s, u: losses.triplet_kd_loss(s, u, jnp.asarray(y), margin, normalize),
                    argnums=(0, 1))(jnp.asarray(a, jnp.float32), jnp.asarray(t, jnp.float32))
  assert np.abs(np.asarray(ga)).max() > 0 and np.all(np.asarray(ga)[:, 4] == 0)
  np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_triplet_kd_zero_when_margins_hold_or_no_negative():
  t = np.zeros((4, 2, 3), np.float32)
  t[:, :, 0] = np.array([0.0, 0.0, 10.0, 10.0])[:, None]  # classes far apart in the teacher's space
  y = np.array([[0, 1], [0, 1], [1, 1], [1, 1]])
  # Anchors on their positives: d(a, p) ≈ 0 < d(a, n) − m for AU 0; AU 1 has no negative.
  assert float(losses.triplet_kd_loss(jnp.asarray(t), jnp.asarray(t), jnp.asarray(y), margin=1.0)) == 0.0
  assert float(losses.triplet_kd_loss(jnp.asarray(t), jnp.asarray(t), -jnp.ones((4, 2), jnp.int32))) == 0.0
