"""grain pipelines: process sharding covers each epoch exactly once, iterator state restores, augmentations."""

import numpy as np
import pytest

from maejax.data import pipeline
from maejax.data.synthfaces import SynthFaces


class Indexed:
  """A source whose records say which example they are."""

  def __init__(self, n, size=8):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = np.full((self.size, self.size, 3), i % 256, np.uint8)
    return {"image": img, "index": np.int64(i)}


def take(it, n):
  return [next(it) for _ in range(n)]


def test_processes_see_disjoint_shards_whose_union_is_each_epoch():
  n, g, procs = 48, 8, 2
  epoch_batches = n // g
  per_proc = []
  for p in range(procs):
    it = iter(pipeline.build(Indexed(n), global_batch_size=g, seed=3, process_index=p, process_count=procs))
    per_proc.append([b["index"] for b in take(it, 2 * epoch_batches)])  # one local batch per global batch
  single = iter(pipeline.build(Indexed(n), global_batch_size=g, seed=3, process_index=0, process_count=1))
  single_batches = [b["index"] for b in take(single, 2 * epoch_batches)]
  for epoch in range(2):
    seen = []
    for p in range(procs):
      batches = per_proc[p][epoch * epoch_batches:(epoch + 1) * epoch_batches]
      seen.append(np.concatenate(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen)) == list(range(n))
  # Global batch t = concatenation of the processes' t-th local batches = the single-process batch t.
  for t in range(len(per_proc[0])):
    np.testing.assert_array_equal(np.concatenate([per_proc[0][t], per_proc[1][t]]), single_batches[t])
  # A new permutation each epoch.
  assert not np.array_equal(np.concatenate(single_batches[:epoch_batches]),
                            np.concatenate(single_batches[epoch_batches:]))


def test_iterator_state_restores_the_same_next_batches():
  src = SynthFaces(num_subjects=4, frames_per_subject=6, image_size=32)
  ds = pipeline.build(src, global_batch_size=4, seed=0, augment=pipeline.MAEAugment(32), process_count=1,
                      process_index=0)
  it = iter(ds)
  take(it, 3)
  state = it.get_state()
  expected = take(it, 3)
  it2 = iter(ds)
  it2.set_state(state)
  for a, b in zip(expected, take(it2, 3), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(2000):
    top, left, h, w = pipeline.random_resized_crop_box(rng, 64, 64)
    assert 0 <= top and 0 <= left and top + h <= 64 and left + w <= 64
    areas.append(h * w / 64**2)
    assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
  assert min(areas) >= 0.2 - 0.02 and max(areas) <= 1.0
  assert 0.5 < np.mean(areas) < 0.7  # U(0.2, 1) area before rejection -> mean ≈ 0.6


def test_mae_augment_shapes_and_determinism():
  src = SynthFaces(num_subjects=2, frames_per_subject=2, image_size=48)
  aug = pipeline.MAEAugment(32)
  a = aug(src[0], np.random.default_rng(1))["image"]
  b = aug(src[0], np.random.default_rng(1))["image"]
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="uint8 image"):
    aug({"image": np.zeros((4, 4, 3), np.float32)}, np.random.default_rng(0))


def test_normalize_roundtrip():
  x = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  y = np.asarray(pipeline.normalize(x))
  ref = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pipeline.denormalize(y), x)


def test_bad_config_names_the_key():
  import ml_collections
  cfg = ml_collections.ConfigDict({"name": "imagenet_by_magic"})
  with pytest.raises(ValueError, match="config.data.name"):
    pipeline.make_source(cfg)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.build(Indexed(8), global_batch_size=3, seed=0, process_count=2, process_index=0)
