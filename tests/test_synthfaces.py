"""Tests of maejax.data.synthfaces: determinism, AU locality, label statistics, records, splits, TFDS."""

import pickle

import numpy as np
import pytest

from maejax.data import synthfaces as sf


def test_deterministic_per_seed_and_index():
  a = sf.SynthFaces(seed=0, num_subjects=5, frames_per_subject=4, image_size=32)
  b = sf.SynthFaces(seed=0, num_subjects=5, frames_per_subject=4, image_size=32)
  c = sf.SynthFaces(seed=1, num_subjects=5, frames_per_subject=4, image_size=32)
  for i in (0, 7, 19):
    ra, rb = a[i], b[i]
    for key in ra:
      np.testing.assert_array_equal(ra[key], rb[key])
    assert np.abs(ra["image"].astype(int) - c[i]["image"].astype(int)).mean() > 5
  # Picklable (grain worker processes) and the copy renders the same record.
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(a))[3]["image"], a[3]["image"])


def test_record_depends_on_subject_and_frame_only():
  full = sf.SynthFaces(seed=0, num_subjects=6, frames_per_subject=3, image_size=32)
  sub = sf.SynthFaces(seed=0, num_subjects=6, frames_per_subject=3, image_size=32, subjects=[4, 1])
  assert len(sub) == 6
  assert sub.subject_frame(0) == (4, 0) and sub.subject_frame(5) == (1, 2)
  np.testing.assert_array_equal(sub[1]["image"], full[4 * 3 + 1]["image"])


def test_subjects_look_different():
  zero = np.zeros(len(sf.ALL_AUS), np.float32)
  faces = [sf.render_face(sf.make_identity(0, s), sf.NEUTRAL_FRAME, zero, 48)[0].astype(float)
           for s in range(6)]
  diffs = [np.abs(faces[i] - faces[j]).mean() for i in range(6) for j in range(i + 1, 6)]
  assert min(diffs) > 8.0


def test_record_format_and_landmarks():
  size = 40
  src = sf.SynthFaces(seed=3, num_subjects=4, frames_per_subject=5, image_size=size, aus=sf.DISFA_AUS)
  for i in range(0, len(src), 3):
    r = src[i]
    assert set(r) == {"image", "au", "au_intensity", "subject", "frame", "landmarks"}
    assert r["image"].dtype == np.uint8 and r["image"].shape == (size, size, 3)
    assert r["au"].dtype == np.int8 and r["au"].shape == (len(sf.DISFA_AUS),)
    assert set(np.unique(r["au"])) <= {0, 1}
    assert r["au_intensity"].dtype == np.float32 and r["au_intensity"].shape == (len(sf.DISFA_AUS),)
    np.testing.assert_array_equal(r["au"], (r["au_intensity"] >= 2.0).astype(np.int8))
    assert r["subject"].dtype == np.int32 and r["subject"].shape == ()
    assert r["frame"].dtype == np.int32 and r["frame"].shape == ()
    lm = r["landmarks"]
    assert lm.dtype == np.float32 and lm.shape == (len(sf.LANDMARK_NAMES), 2)
    assert (lm > 0).all() and (lm < size).all()
    le, re, nose, ml, mr, chin = lm
    assert le[0] < nose[0] < re[0] and ml[0] < mr[0]
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1]) < chin[1]
    np.testing.assert_array_equal(src.labels(i)["au"], r["au"])


@pytest.mark.parametrize("size", [32, 96])
def test_other_sizes_render(size):
  r = sf.SynthFaces(image_size=size, num_subjects=2, frames_per_subject=2)[1]
  assert r["image"].shape == (size, size, 3) and r["image"].std() > 10


def _region_ok(au, box, lm):
  """Whether the changed-pixel bbox (x0, y0, x1, y1) lies in the AU's region, from the neutral landmarks."""
  x0, y0, x1, y1 = box
  le, re, nose, ml, mr, chin = lm
  eye_y = (le[1] + re[1]) / 2
  iod = re[0] - le[0]
  mouth_y = (ml[1] + mr[1]) / 2
  d = nose[1] - eye_y  # eye-to-nose distance
  region = sf.AU_REGIONS[au]
  if region == "brows":
    return y1 < eye_y
  if region == "eyes":
    return eye_y - 0.6 * d < y0 and y1 < eye_y + 0.5 * d
  if region == "cheeks":
    return eye_y - 0.6 * d < y0 and y1 < mouth_y
  if region == "nose":
    return eye_y < y0 and y1 < mouth_y and nose[0] - 0.5 * iod < x0 and x1 < nose[0] + 0.5 * iod
  if region == "mouth":
    return nose[1] - 0.15 * d < y0 and y1 < chin[1]  # nasolabial folds (AU10) start beside the nose wings
  if region == "chin":
    return mouth_y - 0.3 * d < y0  # the jaw and the lower lip, opening the mouth from the lip line
  raise AssertionError(region)


@pytest.mark.parametrize("subject", [0, 7])
def test_each_au_changes_only_its_region(subject, monkeypatch):
  # At the geometry's reference scale (AU_GAIN 1, intensity 5). The default AU_GAIN 2 doubles every effect; at
  # its maximum AU12's smile folds then reach ~1 px above these heuristic region bounds, towards the nose wings.
  monkeypatch.setattr(sf, "AU_GAIN", 1.0)
  size = 96
  idn = sf.make_identity(0, subject)
  # Pose kept upright so image rows separate the regions; lighting, noise and blur stay on (fixed per frame).
  frame = sf.make_frame_params(0, subject, 1)
  frame = sf.FrameParams(**{**frame.__dict__, "angle": 0.0, "yaw": 0.0})
  zero = np.zeros(len(sf.ALL_AUS), np.float32)
  base, lm = sf.render_face(idn, frame, zero, size)
  for i, au in enumerate(sf.ALL_AUS):
    v = zero.copy()
    v[i] = 5.0
    img, _ = sf.render_face(idn, frame, v, size)
    changed = np.abs(img.astype(int) - base.astype(int)).max(-1) > 0
    assert changed.sum() >= 10, f"AU{au} changed only {changed.sum()} pixels"
    ys, xs = np.nonzero(changed)
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    assert _region_ok(au, box, lm), f"AU{au} changed pixels in bbox {box}, outside its {sf.AU_REGIONS[au]}"
    # Subtle: a small part of the image.
    assert changed.mean() < 0.08, f"AU{au} changed {changed.mean():.1%} of the image"


def test_label_statistics_match_configuration():
  n = 4000
  src = sf.SynthFaces(seed=5, num_subjects=40, frames_per_subject=100, aus=sf.ALL_AUS)
  y = np.stack([src.labels(i)["au"] for i in range(n)]).astype(float)
  # Independent reference: the table itself, by a direct formula for P(active) per AU.
  expected_rate = []
  for au in sf.ALL_AUS:
    q = sf.AU_NOISE[au]
    expected_rate.append(sum(p * (1 - (1 - aus.get(au, 0.0)) * (1 - q)) for _, p, aus in sf.EXPRESSIONS))
  np.testing.assert_allclose(sf.expected_base_rates(sf.ALL_AUS), expected_rate, atol=1e-12)
  rates = sf.expected_base_rates(sf.ALL_AUS)
  assert rates.min() < 0.2 and rates.max() > 0.5  # unequal, BP4D-like
  joint = sf.expected_cooccurrence(sf.ALL_AUS)
  observed = y.T @ y / n
  sigma = np.sqrt(joint * (1 - joint) / n)
  np.testing.assert_array_less(np.abs(observed - joint), 4 * sigma + 1e-3)
  # Prototype pairs co-occur more than independence predicts.
  idx = {a: i for i, a in enumerate(sf.ALL_AUS)}
  for a, b in [(6, 12), (1, 2), (4, 7), (15, 17), (23, 24), (9, 10)]:
    assert joint[idx[a], idx[b]] > 1.2 * rates[idx[a]] * rates[idx[b]], (a, b)


def test_base_rates_other_threshold():
  n = 3000
  src = sf.SynthFaces(seed=2, num_subjects=30, frames_per_subject=100, threshold=3.0)
  y = np.stack([src.labels(i)["au"] for i in range(n)]).astype(float)
  p = sf.expected_base_rates(sf.BP4D_AUS, threshold=3.0)
  np.testing.assert_array_less(np.abs(y.mean(0) - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


@pytest.mark.parametrize("trace_max,threshold", [(1.0, 2.0), (2.0, 1.0), (1.0, 0.5)])
def test_trace_range_and_base_rates(monkeypatch, trace_max, threshold):
  """Traces ~ U(0, TRACE_MAX): none reaches the threshold when TRACE_MAX ≤ threshold; the sampled rates match
  ``expected_base_rates``, whose inactive term is TRACE_PROB · P(U(0, TRACE_MAX) ≥ threshold)."""
  monkeypatch.setattr(sf, "TRACE_MAX", trace_max)
  rng = np.random.default_rng(7)
  n = 4000
  inten = np.stack([sf.sample_intensities(rng) for _ in range(n)])
  lo = sf.ACTIVE_RANGE[0]
  traces = inten[(inten > 0) & (inten < lo)]
  assert traces.max() < trace_max
  p = sf.expected_base_rates(sf.ALL_AUS, threshold=threshold)
  y = (inten >= threshold).mean(0)
  np.testing.assert_array_less(np.abs(y - p), 4 * np.sqrt(p * (1 - p) / n) + 1e-3)


def test_subject_splits():
  for num in (10, 60):
    folds = sf.subject_folds(num, 3)
    flat = [s for f in folds for s in f]
    assert sorted(flat) == list(range(num)) and len(set(flat)) == num
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for k in range(3):
      train, test = sf.fold_subjects(num, k)
      assert not set(train) & set(test) and sorted(train + test) == list(range(num))
    train, test = sf.train_test_subjects(num, 0.25)
    assert not set(train) & set(test) and sorted(train + test) == list(range(num))
  with pytest.raises(ValueError, match="num_folds"):
    sf.subject_folds(2, 3)
  with pytest.raises(ValueError, match="aus"):
    sf.SynthFaces(aus=(1, 3))
  with pytest.raises(ValueError, match="subjects"):
    sf.SynthFaces(num_subjects=4, subjects=[5])


def test_tfds_round_trip(tmp_path):
  cfg = sf.SynthFacesConfig(name="tiny", image_size=24, num_subjects=4, frames_per_subject=2)
  builder = sf.SynthFacesBuilder(data_dir=str(tmp_path), config=cfg, file_format="array_record")
  builder.download_and_prepare()
  sources = builder.as_data_source()
  train_subj, test_subj = sf.train_test_subjects(4, cfg.test_fraction, cfg.seed)
  ref = sf.SynthFaces(seed=0, num_subjects=4, frames_per_subject=2, image_size=24)
  for split, subjects in (("train", train_subj), ("test", test_subj)):
    src = sources[split]
    assert len(src) == 2 * len(subjects)
    got = sorted((src[i] for i in range(len(src))), key=lambda r: (int(r["subject"]), int(r["frame"])))
    assert sorted({int(r["subject"]) for r in got}) == subjects
    for r in got:
      want = ref[int(r["subject"]) * 2 + int(r["frame"])]
      for key in want:
        np.testing.assert_array_equal(np.asarray(r[key]), want[key], err_msg=key)


def test_hidden_au_f1_ceiling():
  """Nothing hidden → 1; everything hidden → the prior is all that is left, so the best F1 is the always-positive
  one, 2·n⁺/(n + n⁺) on the same frames; an AU hidden beside a visible co-occurring one (AU6 with AU12) does
  better than that."""
  n = 3000
  assert np.all(sf.hidden_au_f1_ceiling((), num_samples=n) == 1.0)
  rng = np.random.default_rng(0)
  idx = [sf.ALL_AUS.index(a) for a in sf.BP4D_AUS]
  pos = (np.stack([sf.sample_intensities(rng) for _ in range(n)])[:, idx] >= 2).sum(0)
  np.testing.assert_allclose(sf.hidden_au_f1_ceiling(sf.BP4D_AUS, num_samples=n), 2 * pos / (n + pos), rtol=1e-12)
  upper = sf.hidden_au_f1_ceiling((1, 2, 4, 6, 7), num_samples=n)
  p6 = sf.expected_base_rates((6,))[0]
  assert upper[sf.BP4D_AUS.index(6)] > 2 * p6 / (1 + p6) + 0.05
  assert np.all(upper[[sf.BP4D_AUS.index(a) for a in (10, 12, 14, 15, 17, 23, 24)]] == 1.0)
  with pytest.raises(ValueError, match=r"hidden: AUs \[9\]"):
    sf.hidden_au_f1_ceiling((9,), num_samples=10)
