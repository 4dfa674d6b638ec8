"""Subject-level validation split of BP4D / DISFA: `folds.train_val_subjects` and `au_source(..., "val")` on tiny
prepared datasets in the official layouts (fixtures_au), several subjects per part with different frame counts."""

import glob
import os
import pickle
from collections import Counter

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from fixtures_au import make_bp4d, make_disfa

from maejax.data import au_pipeline, folds
from maejax.data.prepare import data_source, prepare

# Typed from DESIGN.md §6, independently of maejax.data.folds: fold k tests part 4 − k.
BP4D_PART = {"F001": 1, "M007": 1, "F018": 1, "M011": 2, "F003": 2, "F007": 3}
DISFA_PART = {"SN001": 1, "SN002": 1, "SN010": 1, "SN013": 2, "SN003": 3}


@pytest.fixture(scope="module")
def bp4d(tmp_path_factory):
  """Fold 1 trains on 5 subjects (F001 M007 F018 | M011 F003), fold 2 on 4, fold 3 on 3; 2, 3 or 4 frames each."""
  manual = tmp_path_factory.mktemp("bp4d_manual")
  truth = {}
  for subjects, n in ((("F001", "M011", "F007"), 2), (("M007", "F003"), 3), (("F018",), 4)):
    truth.update(make_bp4d(manual, subjects=subjects, tasks=("T1",), n_frames=n))
  data_dir = tmp_path_factory.mktemp("bp4d_data")
  prepare("bp4d", manual, data_dir, align="center")
  return data_dir, Counter(s for s, _, _ in truth)


@pytest.fixture(scope="module")
def disfa(tmp_path_factory):
  manual = tmp_path_factory.mktemp("disfa_manual")
  truth = {}
  for subjects, n in ((("SN001", "SN013", "SN003"), 2), (("SN002", "SN010"), 3)):
    truth.update(make_disfa(manual, subjects=subjects, n_frames=n))
  data_dir = tmp_path_factory.mktemp("disfa_data")
  prepare("disfa", manual, data_dir, align="center")
  return data_dir, Counter(s for s, _ in truth)


def _cfg(name, data_dir, fold=1, val_fraction=0.4, seed=0):
  return ml_collections.ConfigDict({"name": name, "fold": fold, "data_dir": str(data_dir),
                                    "val_fraction": val_fraction, "seed": seed})


def _subjects_of(source):
  return Counter(source[i]["subject_id"].decode() for i in range(len(source)))


@pytest.mark.parametrize("dataset", ["bp4d", "disfa"])
@pytest.mark.parametrize("fold", [1, 2, 3])
@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.95])
def test_train_val_subjects_partition_the_fold_training_subjects(dataset, fold, fraction):
  fold_train, test = folds.fold_subjects(dataset, fold)
  train, val = folds.train_val_subjects(dataset, fold, fraction, seed=3)
  assert not set(train) & set(val) and not set(val) & set(test)
  assert sorted(train + val) == sorted(fold_train)
  n = len(fold_train)  # 27 or 28 (BP4D), 18 (DISFA)
  assert len(val) == min(n - 1, max(1, int(round(n * fraction))))
  assert list(val) == [s for s in fold_train if s in val]  # published order
  assert folds.train_val_subjects(dataset, fold, fraction, seed=3) == (train, val)


def test_train_val_subjects_seed_present_and_errors():
  draws = {folds.train_val_subjects("bp4d", 1, 0.2, seed=s)[1] for s in range(5)}
  assert len(draws) > 1  # the seed picks the subjects
  train, val = folds.train_val_subjects("disfa", 2, 0.5, seed=0, present=["SN001", "SN002", "SN003", "SN004"])
  assert len(val) == 2 and sorted(train + val) == ["SN001", "SN002", "SN003", "SN004"]
  for bad in (0.0, 1.0, -0.2, 1.5):
    with pytest.raises(ValueError, match=r"config\.data\.val_fraction.*\(0, 1\)"):
      folds.train_val_subjects("bp4d", 1, bad)
  with pytest.raises(ValueError, match=r"config\.data\.val_fraction.*1 training subject"):
    folds.train_val_subjects("bp4d", 1, 0.5, present=["F001"])
  with pytest.raises(ValueError, match=r"\['F007'\] are not training subjects of the fold"):
    folds.train_val_subjects("bp4d", 1, 0.5, present=["F001", "M011", "F007"])  # F007: fold 1's test part


@pytest.mark.parametrize("fold", [1, 2, 3])
def test_bp4d_val_split_holds_out_training_subjects(bp4d, fold):
  data_dir, counts = bp4d
  test_part = 4 - fold
  fold_train = {s for s, p in BP4D_PART.items() if p != test_part}
  cfg = _cfg("bp4d", data_dir, fold)
  train, val, test = (au_pipeline.au_source(cfg, s) for s in ("train", "val", "test"))
  train_s, val_s, test_s = _subjects_of(train), _subjects_of(val), _subjects_of(test)
  assert not set(train_s) & set(val_s) and not set(val_s) & set(test_s) and not set(train_s) & set(test_s)
  assert set(train_s) | set(val_s) == fold_train and set(test_s) == {s for s, p in BP4D_PART.items() if p == test_part}
  n_val = max(1, int(round(len(fold_train) * 0.4)))
  assert len(val_s) == n_val
  for got in (train_s, val_s, test_s):
    assert got == {s: counts[s] for s in got}  # every frame of each subject, once
  assert len(train) + len(val) == len(data_source("bp4d", f"fold{fold}_train", data_dir=data_dir))
  assert tuple(sorted(val_s)) == tuple(sorted(folds.train_val_subjects("bp4d", fold, 0.4, 0, fold_train)[1]))
  # The same seed, the same split; test is the fold's test part, unchanged by val_fraction.
  np.testing.assert_array_equal(au_pipeline.au_source(cfg, "val").indices, val.indices)
  assert len(test) == len(au_pipeline.au_source(_cfg("bp4d", data_dir, fold, val_fraction=0.0), "test"))


def test_bp4d_seed_changes_the_val_subjects(bp4d):
  data_dir, _ = bp4d
  draws = {tuple(sorted(_subjects_of(au_pipeline.au_source(_cfg("bp4d", data_dir, seed=s), "val"))))
           for s in range(4)}
  assert len(draws) > 1


def test_disfa_val_split_holds_out_training_subjects(disfa):
  data_dir, counts = disfa
  cfg = _cfg("disfa", data_dir, fold=1, val_fraction=0.5)  # trains on parts 1 + 2: SN001 SN002 SN010 SN013
  train_s, val_s, test_s = (_subjects_of(au_pipeline.au_source(cfg, s)) for s in ("train", "val", "test"))
  assert len(val_s) == 2 and not set(train_s) & set(val_s) and set(test_s) == {"SN003"}
  assert set(train_s) | set(val_s) == {s for s, p in DISFA_PART.items() if p != 3}
  for got in (train_s, val_s):
    assert got == {s: counts[s] for s in got}


def test_views_feed_grain_and_read_labels_without_decoding(bp4d, monkeypatch):
  data_dir, _ = bp4d
  for path in glob.glob(os.path.join(data_dir, "bp4d", "*", "subjects.*.npy")):
    os.remove(path)
  cfg = _cfg("bp4d", data_dir)
  decoded = au_pipeline.au_source(cfg, "train")
  expected = np.stack([au_pipeline.labels_of(decoded[i], 12) for i in range(len(decoded))])

  def no_decoding(*args, **kwargs):
    raise AssertionError("an image was decoded")

  monkeypatch.setattr(tfds.features.Image, "decode_example_np", no_decoding)
  train = au_pipeline.au_source(cfg, "train")  # finds the subjects of the records without decoding an image
  assert glob.glob(os.path.join(data_dir, "bp4d", "*", "subjects.part1+part2.npy"))
  np.testing.assert_array_equal(au_pipeline.sample_labels(train, 12), expected)
  monkeypatch.undo()
  train = pickle.loads(pickle.dumps(train))  # grain worker processes receive the source pickled
  batch = next(iter(au_pipeline.train_pipeline(train, global_batch_size=2, size=32, patch_size=8, num_aus=12,
                                               seed=0, process_index=0, process_count=1)))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["occluded"].shape == (2, 32, 32, 3)


def test_record_subjects_cache_is_refreshed_when_stale(bp4d):
  data_dir, _ = bp4d
  undecoded = data_source("bp4d", "fold1_train", data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()})
  truth = np.array([r["subject"] for r in undecoded], np.int32)
  np.testing.assert_array_equal(au_pipeline.record_subjects(undecoded), truth)
  folder = os.fspath(undecoded.dataset_info.data_dir)
  cache = os.path.join(folder, "subjects.part1+part2.npy")
  info_time = os.path.getmtime(os.path.join(folder, "dataset_info.json"))
  marker = np.full(len(truth), 7, np.int32)  # a cache that the records would never produce
  np.save(cache, marker)
  np.testing.assert_array_equal(au_pipeline.record_subjects(undecoded), marker)  # fresh: read from the cache
  os.utime(cache, (info_time - 10, info_time - 10))  # older than the dataset: rebuilt
  np.testing.assert_array_equal(au_pipeline.record_subjects(undecoded), truth)
  np.save(cache, marker[:-1])  # the wrong length: rebuilt
  np.testing.assert_array_equal(au_pipeline.record_subjects(undecoded), truth)
  np.testing.assert_array_equal(np.load(cache), truth)


def test_val_errors_name_the_config_key(bp4d):
  data_dir, _ = bp4d
  with pytest.raises(ValueError, match=r"bp4d split 'val'.*config\.data\.val_fraction"):
    au_pipeline.au_source(_cfg("bp4d", data_dir, val_fraction=0.0), "val")
  with pytest.raises(ValueError, match=r"config\.data\.val_fraction.*\(0, 1\)"):
    au_pipeline.au_source(_cfg("bp4d", data_dir, val_fraction=1.5), "train")
