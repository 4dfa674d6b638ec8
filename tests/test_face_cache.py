"""Render cache of the synthetic faces: records bit-identical to rendering, keys that follow the renderer, damaged
files detected, one builder among concurrent processes."""

import fcntl
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest

from maejax import config_utils
from maejax.data import face_cache, pipeline
from maejax.data import synthfaces as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"seed": 1, "num_subjects": 4, "frames_per_subject": 5, "image_size": 32}


def assert_same_record(got, want):
  assert list(got) == list(want)
  for k in want:
    assert np.asarray(got[k]).dtype == np.asarray(want[k]).dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_cached_records_equal_rendered_ones_for_every_subset(tmp_path):
  train, test = sf.train_test_subjects(4, 0.25, seed=1)
  paths = set()
  for subjects, aus in ((None, sf.BP4D_AUS), (train, sf.BP4D_AUS), (test, sf.DISFA_AUS), ([3, 0], sf.ALL_AUS)):
    ref = sf.SynthFaces(**DATA, subjects=subjects, aus=aus)
    cached = face_cache.CachedSynthFaces(ref, str(tmp_path))
    paths.add(cached.path)
    assert len(cached) == len(ref) and cached.aus == ref.aus and cached.image_size == 32
    for i in sorted({0, 1, len(ref) // 2, len(ref) - 1}):
      assert cached.subject_frame(i) == ref.subject_frame(i)
      assert_same_record(cached[i], ref[i])
      assert_same_record(cached.labels(i), ref.labels(i))
    # Picklable for grain workers, without the mapped arrays.
    again = pickle.loads(pickle.dumps(cached))
    assert len(pickle.dumps(cached)) < 10_000
    assert_same_record(again[len(ref) - 1], ref[len(ref) - 1])
  assert len(paths) == 1  # every subset reads the one cache of all subjects
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([os.path.basename(*paths),
                                                               os.path.basename(*paths) + ".lock"])
  with pytest.raises(IndexError):
    cached[len(cached)]


def test_key_follows_dataset_and_renderer(monkeypatch):
  base = face_cache.cache_key(**DATA)
  assert face_cache.cache_key(**DATA) == base
  for k, v in (("seed", 2), ("num_subjects", 5), ("frames_per_subject", 6), ("image_size", 48)):
    assert face_cache.cache_key(**{**DATA, k: v}) != base, k
  monkeypatch.setattr(sf, "AU_GAIN", sf.AU_GAIN * 1.5)
  assert face_cache.cache_key(**DATA) != base
  monkeypatch.undo()
  assert face_cache.cache_key(**DATA) == base
  monkeypatch.setitem(sf.AU_NOISE, 1, 0.5)  # tables edited in place count too
  assert face_cache.cache_key(**DATA) != base


def test_parallel_build_uses_the_patched_renderer(tmp_path, monkeypatch):
  """Spawned rendering processes get the parent's (monkeypatched) constants."""
  monkeypatch.setattr(sf, "AU_GAIN", sf.AU_GAIN * 1.5 + 0.5)
  path, built = face_cache.ensure_cache(**DATA, cache_dir=str(tmp_path), workers=2, chunk_size=4)
  assert built
  ref = sf.SynthFaces(**DATA)
  cached = face_cache.CachedSynthFaces(ref, str(tmp_path))
  assert cached.path == path
  for i in range(len(ref)):
    assert_same_record(cached[i], ref[i])
  monkeypatch.undo()
  assert any(not np.array_equal(cached[i]["image"], ref[i]["image"]) for i in range(len(ref)))  # gain → pixels


def test_damaged_file_is_rebuilt_or_named(tmp_path):
  ref = sf.SynthFaces(**DATA)
  path, built = face_cache.ensure_cache(**DATA, cache_dir=str(tmp_path))
  assert built
  images = os.path.join(path, "images.npy")
  size = os.path.getsize(images)
  os.truncate(images, size - 100)
  with pytest.raises(ValueError, match="images.npy"):
    face_cache.open_arrays(path, face_cache.expected_arrays(4, 5, 32))
  cached = face_cache.CachedSynthFaces(ref, str(tmp_path))  # detects the damage and renders again
  assert cached.path == path and os.path.getsize(images) == size
  assert_same_record(cached[19], ref[19])
  # Damaged after the source was made (e.g. while grain workers run): the first read names the file.
  fresh = face_cache.CachedSynthFaces(ref, str(tmp_path))
  os.truncate(os.path.join(path, "landmarks.npy"), 50)
  with pytest.raises(ValueError, match="landmarks.npy.*Delete"):
    fresh[0]


def test_concurrent_builders_render_once(tmp_path):
  """Two processes start while a third holds the build lock; when it is released one renders, the other waits
  and reads the result."""
  cache_dir = tmp_path / "cache"
  cache_dir.mkdir()
  lock = cache_dir / (face_cache.cache_key(**DATA) + ".lock")
  script = ("import sys\nfrom absl import logging\nfrom maejax.data import face_cache\n"
            "logging.use_absl_handler()\nlogging.set_verbosity(logging.INFO)\n"
            f"path, built = face_cache.ensure_cache(**{DATA!r}, cache_dir=sys.argv[1], workers=1)\n"
            "print('BUILT' if built else 'REUSED', path)\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  with open(lock, "a") as held:
    fcntl.flock(held, fcntl.LOCK_EX)
    logs = [tmp_path / f"p{i}.err" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache_dir)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=open(log, "w"), text=True) for log in logs]
    deadline = time.time() + 120
    while not all("waiting for" in log.read_text() for log in logs):
      assert time.time() < deadline and all(p.poll() is None for p in procs), [log.read_text() for log in logs]
      time.sleep(0.1)
    fcntl.flock(held, fcntl.LOCK_UN)
  outs = [p.communicate(timeout=120)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [log.read_text() for log in logs]
  assert sorted(o.split()[0] for o in outs) == ["BUILT", "REUSED"], outs
  assert len({o.split()[1] for o in outs}) == 1
  assert [p.name for p in cache_dir.iterdir() if ".tmp-" in p.name] == []
  ref = sf.SynthFaces(**DATA)
  cached = face_cache.CachedSynthFaces(ref, str(cache_dir))
  for i in (0, 9, 19):
    assert_same_record(cached[i], ref[i])


def load_common_config():
  return config_utils.load_sibling(os.path.join(ROOT, "configs", "common.py"), "common")


def test_config_cache_dir_at_both_construction_sites(tmp_path):
  from maejax.data import au_pipeline
  cfg = load_common_config().synthfaces(32)
  cfg.num_subjects, cfg.frames_per_subject, cfg.seed = 4, 5, 1
  cfg.aus = ()  # the AU stages' key (() = BP4D's AUs)
  cfg.lock()  # as config_flags does: a misspelt key is rejected, cache_dir is a known one
  with pytest.raises(AttributeError):
    cfg.cache_dirr = str(tmp_path)
  assert cfg.cache_dir == face_cache.DEFAULT_CACHE_DIR
  cfg.cache_dir = str(tmp_path)
  for make in (pipeline.make_source, au_pipeline.au_source):
    src = make(cfg, "test")
    assert isinstance(src, face_cache.CachedSynthFaces) and src.path.startswith(str(tmp_path))
    ref = sf.SynthFaces(**DATA, subjects=src.subjects)
    assert_same_record(src[len(src) - 1], ref[len(ref) - 1])
  cfg.cache_dir = ""
  for make in (pipeline.make_source, au_pipeline.au_source):
    assert type(make(cfg, "train")) is sf.SynthFaces
