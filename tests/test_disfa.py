"""DISFA: fold lists, label parsing, and the TFDS builder on generated trees (extracted frames, AVI)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_au import DISFA_AUS, corrupt, face_frame, make_disfa

from maejax.data import folds
from maejax.data.disfa import Disfa, read_intensity_txt
from maejax.data.prepare import data_source, prepare

# Typed from DESIGN.md §6, independently of maejax.data.folds.
DISFA_PART1 = "SN002 SN010 SN001 SN026 SN027 SN032 SN030 SN009 SN016".split()
DISFA_PART2 = "SN013 SN018 SN011 SN028 SN012 SN006 SN031 SN021 SN024".split()
DISFA_PART3 = "SN003 SN029 SN023 SN025 SN008 SN005 SN007 SN017 SN004".split()

HAS_AV = importlib.util.find_spec("av") is not None


def test_disfa_folds_are_the_published_lists():
  assert list(folds.DISFA_PARTS[0]) == DISFA_PART1
  assert list(folds.DISFA_PARTS[1]) == DISFA_PART2
  assert list(folds.DISFA_PARTS[2]) == DISFA_PART3
  everyone = [f"SN{i:03d}" for i in range(1, 33) if i not in (14, 15, 19, 20, 22)]
  assert len(everyone) == 27
  parts = [set(DISFA_PART1), set(DISFA_PART2), set(DISFA_PART3)]
  assert sum(len(p) for p in parts) == 27 and set.union(*parts) == set(everyone)
  assert sorted(folds.subjects("disfa")) == everyone
  assert folds.fold_subjects("disfa", 1) == (tuple(DISFA_PART1 + DISFA_PART2), tuple(DISFA_PART3))
  assert folds.fold_subjects("disfa", 2) == (tuple(DISFA_PART1 + DISFA_PART3), tuple(DISFA_PART2))
  assert folds.fold_subjects("disfa", 3) == (tuple(DISFA_PART2 + DISFA_PART3), tuple(DISFA_PART1))
  assert folds.aus("disfa") == DISFA_AUS
  for missing in ("SN014", "SN015", "SN019", "SN020", "SN022"):
    with pytest.raises(ValueError, match=missing):
      folds.part_of("disfa", missing)


def test_read_intensity_txt(tmp_path):
  path = tmp_path / "SN001_au1.txt"
  path.write_text("1,0\n2,5\n3,2\n\n")
  assert read_intensity_txt(path) == {1: 0, 2: 5, 3: 2}


@pytest.mark.parametrize("content, match", [
  ("1,0\n2,6\n", "line 2: intensity must be 0..5"),
  ("1,0\n2;1\n", "line 2: expected `frame,intensity`"),
  ("1,0\n1,1\n", "line 2: frame 1 appears twice"),
  ("", "no `frame,intensity` lines"),
])
def test_malformed_label_file_names_file(tmp_path, content, match):
  path = tmp_path / "SN001_au9.txt"
  path.write_text(content)
  with pytest.raises(ValueError, match=match) as e:
    read_intensity_txt(path)
  assert str(path) in str(e.value)


def _check(source, truth, subject):
  seen = set()
  for i in range(len(source)):
    r = source[i]
    assert r["subject_id"].decode() == subject and r["task"] == b""
    assert r["subject"] == folds.DISFA_SUBJECTS.index(subject)
    gt = truth[(subject, int(r["frame"]))]
    np.testing.assert_array_equal(r["au_intensity"], gt["intensity"])
    np.testing.assert_array_equal(r["au"], gt["au"])
    assert r["au"].dtype == np.int8 and r["au_intensity"].dtype == np.float32 and r["au"].shape == (8,)
    image = r["image"]
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    diff = np.abs(image.astype(int) - np.asarray(gt["colour"]))
    assert diff.mean() < 2 and diff.max() < 12, (subject, r["frame"], diff.mean(), diff.max())
    seen.add(int(r["frame"]))
  return seen


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("disfa_manual")
  truth = make_disfa(manual)
  data_dir = tmp_path_factory.mktemp("disfa_data")
  return prepare("disfa", manual, data_dir, align="center"), truth, data_dir


def test_build_and_read_back_frames(built):
  builder, truth, data_dir = built
  assert set(builder.info.splits) == {"part1", "part2", "part3"}
  for part, subject in zip((1, 2, 3), ("SN001", "SN013", "SN003"), strict=True):
    source = builder.as_data_source(split=f"part{part}")
    assert len(source) == 5  # frame 6 has an image but no labels: not an example
    assert _check(source, truth, subject) == {1, 2, 3, 4, 5}
  assert builder.num_unlabelled_images == 3 and builder.bad.count == 0
  # Intensity 1 is not an occurrence, intensity 2 is.
  part1 = {int(r["frame"]): r for r in builder.as_data_source(split="part1")}
  assert part1[1]["au_intensity"][0] == 1 and part1[1]["au"][0] == 0
  assert part1[2]["au_intensity"][0] == 2 and part1[2]["au"][0] == 1
  test = data_source("disfa", "fold2_test", data_dir=data_dir)
  assert {r["subject_id"] for r in test} == {b"SN013"}
  assert len(data_source("disfa", "fold2_train", data_dir=data_dir)) == 10


@pytest.mark.skipif(not HAS_AV, reason="PyAV (`pip install av`) is needed to write/read the AVI fixture")
def test_build_from_video(tmp_path):
  manual = tmp_path / "manual"
  truth = make_disfa(manual, subjects=("SN001", "SN013"), n_frames=4, layout="video")
  builder = prepare("disfa", manual, tmp_path / "data", align="center")
  assert _check(builder.as_data_source(split="part1"), truth, "SN001") == {1, 2, 3, 4}
  assert _check(builder.as_data_source(split="part2"), truth, "SN013") == {1, 2, 3, 4}
  assert builder.num_unlabelled_images == 2  # one trailing unlabelled video frame per subject


@pytest.mark.skipif(not HAS_AV, reason="PyAV is needed to write the AVI fixture")
def test_video_shorter_than_labels(tmp_path):
  manual = tmp_path / "manual"
  make_disfa(manual, subjects=("SN001",), n_frames=3, layout="video")
  for au in DISFA_AUS:  # label one frame past the video's 4 frames
    path = manual / f"ActionUnit_Labels/SN001/SN001_au{au}.txt"
    path.write_text(path.read_text() + "4,0\n5,0\n")
  with pytest.raises(FileNotFoundError, match=r"LeftVideoSN001_comp.avi has 4 frames .* 1 labelled"):
    prepare("disfa", manual, tmp_path / "data1", align="center")
  builder = prepare("disfa", manual, tmp_path / "data2", skip_bad=True, align="center")
  assert builder.bad.count == 1 and builder.info.splits["part1"].num_examples == 4


def _scan(manual, **kwargs):
  kwargs.setdefault("align", "landmarks" if "landmarks_dir" in kwargs else "detect")
  builder = Disfa(data_dir=str(manual / "_unused"), **kwargs)
  return builder, builder.scan(manual)


def test_missing_label_file(tmp_path):
  make_disfa(tmp_path, n_frames=2)
  missing = tmp_path / "ActionUnit_Labels/SN013/SN013_au25.txt"
  missing.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
    _scan(tmp_path)
  builder, plans = _scan(tmp_path, skip_bad=True)
  assert builder.bad.count == 1 and not plans[2] and len(plans[1]) == 2


def test_frame_labelled_for_some_aus_only(tmp_path):
  make_disfa(tmp_path, n_frames=3)
  path = tmp_path / "ActionUnit_Labels/SN003/SN003_au6.txt"
  path.write_text("1,0\n3,0\n")  # frame 2 has no AU6 label
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": frame 2 has no label line"):
    _scan(tmp_path)
  builder, plans = _scan(tmp_path, skip_bad=True)
  assert builder.bad.count == 1 and [it[3] for it in plans[3]] == [1, 3]


def test_labelled_frame_without_image_and_subject_without_fold(tmp_path):
  truth = make_disfa(tmp_path, n_frames=3)
  truth[("SN013", 2)]["path"].unlink()
  with pytest.raises(FileNotFoundError, match="frame 2 of .*SN013"):
    _scan(tmp_path)
  make_disfa(tmp_path, subjects=("SN014",), n_frames=2)  # SN014 is not a DISFA subject of any fold
  truth[("SN013", 2)]["path"].write_bytes(b"")  # restored name; content checked only when decoding
  with pytest.raises(ValueError, match="SN014"):
    _scan(tmp_path)
  builder, plans = _scan(tmp_path, skip_bad=True)
  assert builder.bad.count == 1 and sum(len(p) for p in plans.values()) == 9


def test_missing_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="ActionUnit_Labels"):
    _scan(tmp_path)
  (tmp_path / "ActionUnit_Labels").mkdir()
  with pytest.raises(FileNotFoundError, match="frames"):
    _scan(tmp_path)


def test_corrupt_frame(tmp_path):
  manual = tmp_path / "manual"
  truth = make_disfa(manual, subjects=("SN001", "SN013"), n_frames=3)
  bad_path = truth[("SN001", 3)]["path"]
  corrupt(bad_path)
  with pytest.raises(ValueError, match=re.escape(str(bad_path))):
    prepare("disfa", manual, tmp_path / "data1", align="center")
  builder = prepare("disfa", manual, tmp_path / "data2", skip_bad=True, align="center")
  assert builder.bad.count == 1 and str(bad_path) in builder.bad.examples[0]
  assert sorted(int(r["frame"]) for r in builder.as_data_source(split="part1")) == [1, 2]
  assert builder.info.splits["part2"].num_examples == 3


def test_landmarks(tmp_path):
  make_disfa(tmp_path, subjects=("SN001",), n_frames=2)
  (tmp_path / "lm").mkdir()
  (tmp_path / "lm" / "SN001.csv").write_text("1,10,12,30,20\n")
  lm_file = re.escape(str(tmp_path / "lm" / "SN001.csv"))
  with pytest.raises(ValueError, match=lm_file + ": no landmarks for frame 2"):
    _scan(tmp_path, landmarks_dir="lm")
  (tmp_path / "lm" / "SN001.csv").write_text("1,10,12,30,20\n2,0,0,4,4\n")
  _, plans = _scan(tmp_path, landmarks_dir=str(tmp_path / "lm"))
  np.testing.assert_array_equal(plans[1][0][7], [[10, 12], [30, 20]])
  np.testing.assert_array_equal(plans[1][1][7], [[0, 0], [4, 4]])
  with pytest.raises(FileNotFoundError, match="landmarks folder"):
    _scan(tmp_path, landmarks_dir="nowhere")


@pytest.mark.parametrize("content, match", [
  ("1,0\n2,x\n", r"line 2: expected `frame,intensity` \(two integers\), got '2,x'"),
  ("1,0\n2\n", r"line 2: expected `frame,intensity` \(two integers\)"),
  ("1,0\n2,1,3\n", r"line 2: expected `frame,intensity`"),
  ("0,3\n1,0\n", "line 1: frame numbers start at 1 in DISFA label files, got 0"),
  (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not a text file"),
])
def test_corrupt_label_file_is_one_line_naming_file_and_line(tmp_path, content, match):
  path = tmp_path / "SN001_au4.txt"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError, match=match) as e:
    read_intensity_txt(path)
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_corrupt_label_file_in_builder(tmp_path):
  make_disfa(tmp_path, n_frames=2)
  path = tmp_path / "ActionUnit_Labels/SN013/SN013_au12.txt"
  path.write_text("1,0\n2,high\n")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": line 2: expected `frame,intensity`") as e:
    _scan(tmp_path)
  assert "\n" not in str(e.value)
  builder, plans = _scan(tmp_path, skip_bad=True)
  assert builder.bad.count == 1 and not plans[2] and len(plans[1]) == len(plans[3]) == 2


# Frames extracted counting from 0 (image i = the video's frame i = label frame i + 1), as many scripts write them.
ZERO_BASED_NAMES = [None, "frame_{:06d}.jpg", "{}.png"]


@pytest.mark.parametrize("skip_bad", [False, True])
@pytest.mark.parametrize("image_name", ZERO_BASED_NAMES)
def test_zero_based_frames_are_refused_by_default(tmp_path, image_name, skip_bad):
  make_disfa(tmp_path, n_frames=3, image_base=0, image_name=image_name)
  folder = tmp_path / "frames" / "SN001"  # the first subject scanned
  with pytest.raises(ValueError, match=re.escape(str(folder)) + ": the frame images look numbered from 0") as e:
    _scan(tmp_path, skip_bad=skip_bad)
  message = str(e.value)
  assert "images numbered 0..3" in message and "label frames 1..3" in message
  assert "--frame_index_base=0" in message and "\n" not in message


def test_zero_based_frames_are_refused_by_prepare_with_skip_bad(tmp_path):
  make_disfa(tmp_path / "manual", n_frames=2, image_base=0)
  with pytest.raises(ValueError, match="--frame_index_base=0"):
    prepare("disfa", tmp_path / "manual", tmp_path / "data", skip_bad=True, align="center")


@pytest.mark.parametrize("image_name", ZERO_BASED_NAMES)
def test_zero_based_frames_with_frame_index_base_0(tmp_path, image_name):
  manual = tmp_path / "manual"
  truth = make_disfa(manual, n_frames=4, image_base=0, image_name=image_name)
  _, plans = _scan(manual, frame_index_base=0)
  for items in plans.values():  # label frame f is read from the image numbered f - 1
    assert [(it[3], it[6]) for it in items] == [(f, ("image", truth[(it[1], f)]["path"]))
                                                for it, f in zip(items, (1, 2, 3, 4), strict=True)]
  builder = prepare("disfa", manual, tmp_path / "data", frame_index_base=0, align="center")
  for part, subject in zip((1, 2, 3), ("SN001", "SN013", "SN003"), strict=True):
    # Pixels against the colour written for each label frame: a shift by one frame fails here.
    assert _check(builder.as_data_source(split=f"part{part}"), truth, subject) == {1, 2, 3, 4}
  assert builder.num_unlabelled_images == 3 and builder.bad.count == 0  # the last image of each subject


def test_one_based_frames_with_frame_index_base_0_are_refused(tmp_path):
  make_disfa(tmp_path, n_frames=2)
  folder = tmp_path / "frames" / "SN001"
  for skip_bad in (False, True):
    with pytest.raises(ValueError, match=re.escape(str(folder)) + r": frame_index_base=0 .* no image numbered 0"):
      _scan(tmp_path, frame_index_base=0, skip_bad=skip_bad)
  with pytest.raises(ValueError, match="frame_index_base must be 0 or 1"):
    Disfa(data_dir=str(tmp_path / "_unused"), frame_index_base=2)


def test_prepare_cli_frame_index_base(tmp_path):
  manual = tmp_path / "manual"
  truth = make_disfa(manual, subjects=("SN001",), n_frames=2, image_base=0, image_name="frame_{:06d}.jpg")
  repo = Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, "-m", "maejax.data.prepare", "--dataset=disfa", f"--manual_dir={manual}",
         "--align=center"]
  refused = subprocess.run(cmd + [f"--data_dir={tmp_path / 'd1'}", "--skip_bad"], capture_output=True, text=True,
                           env=env)
  assert refused.returncode != 0 and "--frame_index_base=0" in refused.stderr
  assert str(manual / "frames" / "SN001") in refused.stderr
  ok = subprocess.run(cmd + [f"--data_dir={tmp_path / 'd2'}", "--frame_index_base=0"], capture_output=True,
                      text=True, env=env)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert _check(data_source("disfa", "part1", data_dir=tmp_path / "d2"), truth, "SN001") == {1, 2}


# ------------------------------------------------------------------------------------- align="detect"


@pytest.fixture(scope="module")
def frame_aligner():
  faces = pytest.importorskip("maejax.faces")
  try:
    faces.fetch_models()
  except faces.ModelFetchError as e:
    pytest.skip(f"BlazeFace models unavailable: {e}")
  with faces.FrameAligner() as a:
    yield a


@pytest.mark.parametrize("layout", ["frames", pytest.param("video", marks=pytest.mark.skipif(
  not HAS_AV, reason="PyAV is needed to write the AVI fixture"))])
def test_build_with_detected_faces(tmp_path, frame_aligner, layout):
  astronaut = np.ascontiguousarray(pytest.importorskip("skimage.data").astronaut())

  def image_fn(si, f):  # DISFA's 1024×768 left-camera frames; video frame 1 (label frame 2) of SN001 is empty
    if (si, f) == (0, 1):
      return np.full((768, 1024, 3), 120, np.uint8)
    return face_frame(astronaut, 768, 1024, offset=(15 * f, -10 * si), scale=1.2)

  manual = tmp_path / "manual"
  make_disfa(manual, subjects=("SN001", "SN013"), n_frames=3, layout=layout, image_fn=image_fn)
  builder = prepare("disfa", manual, tmp_path / "data", aligner=frame_aligner)
  assert str(builder.version) == "2.0.0" and builder.info.metadata["align"] == "detect"
  assert sorted(int(r["frame"]) for r in builder.as_data_source(split="part1")) == [1, 3]
  assert len(builder.as_data_source(split="part2")) == 3
  (line,) = builder.cropper.no_face
  assert line.startswith("SN001\t2\t") and (Path(builder.data_dir) / "no_face.txt").read_text() == line + "\n"
  for r in builder.as_data_source(split="part2"):
    np.testing.assert_allclose(r["landmarks"][:2], [[95.5, 121.1], [159.5, 121.1]], atol=8)
  cache = tmp_path / "data" / "downloads" / "face_detections" / "disfa"
  assert sorted(p.name for p in cache.iterdir()) == ["SN001.json", "SN013.json"]
