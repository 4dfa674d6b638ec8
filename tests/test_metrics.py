"""AU F1 / accuracy against sklearn, with unknown labels removed and counts accumulated over batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
from sklearn.metrics import accuracy_score, f1_score

from maejax.metrics import AUCounts, AUF1Metric, confusion_counts


def _data(seed=0, m=300, n=8):
  rng = np.random.default_rng(seed)
  probs = rng.uniform(size=(m, n)).astype(np.float32)
  labels = (rng.uniform(size=(m, n)) < np.linspace(0.1, 0.6, n)).astype(np.int32)
  labels = np.where(rng.uniform(size=(m, n)) < 0.15, -1, labels)
  return probs, labels


def _sklearn(probs, labels, zero_division=0.0):
  f1, acc = [], []
  for i in range(labels.shape[1]):
    keep = labels[:, i] >= 0
    y, pred = labels[keep, i], (probs[keep, i] >= 0.5).astype(int)
    f1.append(f1_score(y, pred, zero_division=zero_division))
    acc.append(accuracy_score(y, pred))
  return np.array(f1), np.array(acc)


def test_streaming_equals_sklearn_and_all_at_once():
  probs, labels = _data()
  ref_f1, ref_acc = _sklearn(probs, labels)
  streamed = AUCounts(8)
  for s in range(0, len(probs), 37):  # uneven batches
    streamed.update(probs[s:s + 37], labels[s:s + 37])
  once = AUCounts(8).update(probs, labels)
  np.testing.assert_allclose(streamed.f1(), ref_f1, rtol=1e-12)
  np.testing.assert_allclose(streamed.accuracy(), ref_acc, rtol=1e-12)
  np.testing.assert_array_equal(streamed.f1(), once.f1())
  assert streamed.mean_f1() == pytest.approx(ref_f1.mean())
  res = streamed.result()
  assert res["mean_accuracy"] == pytest.approx(ref_acc.mean())
  # Every known entry is counted exactly once across the batches; unknown entries never.
  assert streamed.tp.sum() + streamed.fp.sum() + streamed.fn.sum() + streamed.tn.sum() == (labels >= 0).sum()


def test_merge_of_accumulators():
  probs, labels = _data(1)
  a = AUCounts(8).update(probs[:100], labels[:100])
  b = AUCounts(8).update(probs[100:], labels[100:])
  np.testing.assert_array_equal(a.merge(b).f1(), AUCounts(8).update(probs, labels).f1())


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_no_positives_and_no_predictions(zero_division):
  probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.9, 0.3]], np.float32)
  labels = np.array([[0, 1], [0, 1], [-1, 0]])  # AU 0: no positive label, no positive prediction on known
  acc = AUCounts(2, zero_division=zero_division).update(probs, labels)
  ref_f1, _ = _sklearn(probs, labels, zero_division=zero_division)
  np.testing.assert_allclose(acc.f1(), ref_f1)
  assert acc.f1()[0] == zero_division


def test_clu_metric_matches_host_accumulator():
  probs, labels = _data(2)
  step = jax.jit(lambda p, y: AUF1Metric.from_model_output(probs=p, labels=y))
  metric = AUF1Metric.empty()
  for s in range(0, len(probs), 100):
    metric = metric.merge(step(jnp.asarray(probs[s:s + 100]), jnp.asarray(labels[s:s + 100])))
  ref_f1, ref_acc = _sklearn(probs, labels)
  assert float(metric.compute()) == pytest.approx(ref_f1.mean(), rel=1e-5)
  per_au = metric.compute_per_au()
  np.testing.assert_allclose(per_au["f1"], ref_f1, rtol=1e-12)
  np.testing.assert_allclose(per_au["accuracy"], ref_acc, rtol=1e-12)
  # Works inside a clu Collection.
  coll = clu_metrics.Collection.create(f1=AUF1Metric)
  c = coll.single_from_model_output(probs=jnp.asarray(probs), labels=jnp.asarray(labels))
  assert float(c.compute()["f1"]) == pytest.approx(ref_f1.mean(), rel=1e-5)


def test_bad_shapes():
  with pytest.raises(ValueError, match="probs"):
    AUCounts(8).update(np.zeros((4, 7)), np.zeros((4, 7)))
  with pytest.raises(ValueError, match="labels"):
    confusion_counts(np.zeros((4, 8)), np.zeros((4, 7)), xp=np)
