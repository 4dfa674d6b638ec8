"""BP4D: fold lists, label parsing, and the TFDS builder on a generated tree in the official layout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from fixtures_au import BP4D_AUS, WIDTH, corrupt, face_frame, face_image, make_bp4d, write_image
from PIL import Image

from maejax.data import folds
from maejax.data.bp4d import Bp4d, read_au_occ_csv
from maejax.data.prepare import data_source, prepare

# Typed from DESIGN.md §6, independently of maejax.data.folds.
BP4D_PART1 = "F001 M007 F018 F008 F002 M004 F010 F009 M012 M001 F016 M014 F023 M008".split()
BP4D_PART2 = "M011 F003 M010 M002 F005 F022 M018 M017 F013 M016 F020 F011 M013 M005".split()
BP4D_PART3 = "F007 F015 F006 F019 M006 M009 F012 M003 F004 F021 F017 M015 F014".split()


def test_bp4d_folds_are_the_published_lists():
  assert list(folds.BP4D_PARTS[0]) == BP4D_PART1
  assert list(folds.BP4D_PARTS[1]) == BP4D_PART2
  assert list(folds.BP4D_PARTS[2]) == BP4D_PART3
  everyone = [f"F{i:03d}" for i in range(1, 24)] + [f"M{i:03d}" for i in range(1, 19)]
  assert len(everyone) == 41
  parts = [set(BP4D_PART1), set(BP4D_PART2), set(BP4D_PART3)]
  assert sum(len(p) for p in parts) == 41 and set.union(*parts) == set(everyone)
  assert sorted(folds.subjects("bp4d")) == sorted(everyone)
  # fold k tests part 4 - k and trains on the other two.
  assert folds.fold_subjects("bp4d", 1) == (tuple(BP4D_PART1 + BP4D_PART2), tuple(BP4D_PART3))
  assert folds.fold_subjects("bp4d", 2) == (tuple(BP4D_PART1 + BP4D_PART3), tuple(BP4D_PART2))
  assert folds.fold_subjects("bp4d", 3) == (tuple(BP4D_PART2 + BP4D_PART3), tuple(BP4D_PART1))
  for fold in (1, 2, 3):
    train, test = folds.fold_subjects("bp4d", fold)
    assert not set(train) & set(test) and len(train) + len(test) == 41
  assert folds.fold_split(1, "train") == "part1+part2" and folds.fold_split(1, "test") == "part3"
  assert folds.resolve_split("fold2_train") == "part1+part3" and folds.resolve_split("fold3_test") == "part1"
  assert folds.aus("bp4d") == BP4D_AUS
  assert folds.BP4D_TASKS == tuple(f"T{i}" for i in range(1, 9))


def test_unknown_subject_and_fold_raise():
  with pytest.raises(ValueError, match="F024"):
    folds.part_of("bp4d", "F024")
  with pytest.raises(ValueError, match="fold"):
    folds.fold_subjects("bp4d", 4)
  with pytest.raises(ValueError, match="dataset"):
    folds.fold_subjects("ck+", 1)


def test_read_au_occ_csv_maps_9_to_unknown(tmp_path):
  path = tmp_path / "F001_T1.csv"
  header = ",".join(str(i) for i in range(100))
  row = [0] * 100
  row[0], row[1], row[4], row[24], row[3] = 7, 1, 9, 1, 9
  path.write_text(header + "\n" + ",".join(map(str, row)) + "\n")
  labels = read_au_occ_csv(path)
  expected = np.zeros(12, np.int8)
  expected[BP4D_AUS.index(1)], expected[BP4D_AUS.index(4)], expected[BP4D_AUS.index(24)] = 1, -1, 1
  assert list(labels) == [7]
  np.testing.assert_array_equal(labels[7], expected)
  assert labels[7].dtype == np.int8


@pytest.mark.parametrize("bad_row, match", [
  ("5,1,0", "3 values"),              # short row
  ("x" + ",0" * 99, "integers"),     # non-integer frame
  ("5" + ",7" * 99, "0, 1 or 9"),    # value outside {0, 1, 9}
])
def test_malformed_csv_names_file_and_line(tmp_path, bad_row, match):
  path = tmp_path / "F001_T1.csv"
  path.write_text(",".join(str(i) for i in range(100)) + "\n" + "4" + ",0" * 99 + "\n" + bad_row + "\n")
  with pytest.raises(ValueError, match=match) as e:
    read_au_occ_csv(path)
  assert str(path) in str(e.value) and "line 3" in str(e.value)


def test_csv_header_without_an_au_column(tmp_path):
  path = tmp_path / "F001_T1.csv"
  path.write_text("0,1,2,4\n1,0,0,0\n")
  with pytest.raises(ValueError, match=r"AU\(s\) \[6, 7"):
    read_au_occ_csv(path)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("bp4d_manual")
  truth = make_bp4d(manual)
  data_dir = tmp_path_factory.mktemp("bp4d_data")
  builder = prepare("bp4d", manual, data_dir, align="center")
  return builder, truth, data_dir


def _check_record(record, truth):
  subject, task, frame = record["subject_id"].decode(), record["task"].decode(), int(record["frame"])
  gt = truth[(subject, task, frame)]
  np.testing.assert_array_equal(record["au"], gt["au"])
  assert record["au"].dtype == np.int8 and record["au"].shape == (12,)
  np.testing.assert_array_equal(record["au_intensity"], np.full(12, -1, np.float32))
  assert record["subject"] == folds.BP4D_SUBJECTS.index(subject)
  image = record["image"]
  assert image.shape == (256, 256, 3) and image.dtype == np.uint8
  # Centre crop = the flat colour square; the near-black border must not leak in.
  diff = np.abs(image.astype(int) - np.asarray(gt["colour"]))
  assert diff.mean() < 2 and diff.max() < 12, (subject, task, frame, diff.mean(), diff.max())
  return subject, task, frame


def test_build_and_read_back(built):
  builder, truth, data_dir = built
  assert set(builder.info.splits) == {"part1", "part2", "part3"}
  seen = set()
  for part, subject in zip((1, 2, 3), ("F001", "M011", "F007"), strict=True):
    source = builder.as_data_source(split=f"part{part}")
    assert len(source) == 10  # 2 tasks x 5 labelled frames; the unlabelled frame 999 is not an example
    for i in range(len(source)):
      key = _check_record(source[i], truth)
      assert key[0] == subject
      seen.add(key)
  assert seen == set(truth)
  assert builder.num_unlabelled_images == 6
  assert builder.bad.count == 0
  # The not-scored label made it through as -1.
  assert truth[("F001", "T1", 10)]["au"][BP4D_AUS.index(4)] == -1
  hits = [r for r in builder.as_data_source(split="part1") if r["task"] == b"T1" and r["frame"] == 10]
  assert len(hits) == 1 and hits[0]["au"][BP4D_AUS.index(4)] == -1
  # Fold splits compose parts.
  fold1_train = data_source("bp4d", "fold1_train", data_dir=data_dir)
  assert len(fold1_train) == 20
  assert {r["subject_id"] for r in fold1_train} == {b"F001", b"M011"}
  assert {r["subject_id"] for r in data_source("bp4d", "fold1_test", data_dir=data_dir)} == {b"F007"}
  assert builder.info.metadata["aus"] == list(BP4D_AUS)
  # The source plugs straight into grain.
  batch = next(iter(grain.MapDataset.source(fold1_train).map(lambda r: {"au": r["au"]}).batch(4)))
  assert batch["au"].shape == (4, 12) and batch["au"].dtype == np.int8


def _scan(manual, **kwargs):
  return Bp4d(data_dir=str(manual / "_unused"), **kwargs).scan(manual)


def test_missing_label_file(tmp_path):
  make_bp4d(tmp_path, n_frames=2)
  (tmp_path / "AUCoding/AU_OCC/M011_T2.csv").unlink()
  with pytest.raises(FileNotFoundError, match="M011_T2.csv"):
    _scan(tmp_path)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and "M011_T2.csv" in builder.bad.examples[0]
  assert len(plans[2]) == 2  # M011's T1 is still there


def test_malformed_label_file_in_builder(tmp_path):
  make_bp4d(tmp_path, n_frames=2)
  path = tmp_path / "AUCoding/AU_OCC/F007_T1.csv"
  path.write_text(path.read_text().replace(",0,", ",5,", 1))
  with pytest.raises(ValueError, match="F007_T1.csv: line 2"):
    _scan(tmp_path)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and len(plans[3]) == 2


def test_labelled_frame_without_image(tmp_path):
  truth = make_bp4d(tmp_path, n_frames=3)
  truth[("M011", "T1", 11)]["path"].unlink()
  with pytest.raises(FileNotFoundError, match=r"frame 11 of .*M011_T1.csv"):
    _scan(tmp_path)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and len(plans[2]) == 5


def test_subject_in_no_fold(tmp_path):
  make_bp4d(tmp_path, subjects=("F001", "F024"), tasks=("T1",), n_frames=2)
  with pytest.raises(ValueError, match="F024"):
    _scan(tmp_path)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and len(plans[1]) == 2


def test_missing_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match="AU_OCC"):
    _scan(tmp_path)


def test_corrupt_image_raises_then_is_counted_with_skip_bad(tmp_path):
  manual = tmp_path / "manual"
  truth = make_bp4d(manual, subjects=("F001", "M011"), tasks=("T1",), n_frames=3)
  bad_path = truth[("M011", "T1", 11)]["path"]
  corrupt(bad_path)
  with pytest.raises(ValueError, match=re.escape(str(bad_path))):
    prepare("bp4d", manual, tmp_path / "data1", align="center")
  builder = prepare("bp4d", manual, tmp_path / "data2", skip_bad=True, align="center")
  assert builder.bad.count == 1 and str(bad_path) in builder.bad.examples[0]
  assert builder.info.splits["part1"].num_examples == 3
  assert builder.info.splits["part2"].num_examples == 2
  frames = sorted(int(r["frame"]) for r in builder.as_data_source(split="part2"))
  assert frames == [10, 12]


def test_landmarks_crop(tmp_path):
  manual = tmp_path / "manual"
  truth = make_bp4d(manual, subjects=("F001",), tasks=("T1",), n_frames=2)
  # A gradient image, so a wrong box shows; landmarks near the top edge, so the box pads with black.
  yy, xx = np.mgrid[0:48, 0:WIDTH]
  gradient = np.stack([xx * 4, yy * 5, 255 - xx * 2], -1).astype(np.uint8)
  write_image(truth[("F001", "T1", 10)]["path"].with_suffix(".png"), gradient)
  truth[("F001", "T1", 10)]["path"].unlink()
  points = np.array([[20, 2], [40, 2], [30, 14], [24, 20], [36, 20]], float)
  lm = manual / "landmarks"
  lm.mkdir()
  rows = ["frame," + ",".join(f"x{i},y{i}" for i in range(5))]
  rows += [f"{f}," + ",".join(f"{v:g}" for v in points.ravel()) for f in (10, 11)]
  (lm / "F001_T1.csv").write_text("\n".join(rows) + "\n")
  builder = prepare("bp4d", manual, tmp_path / "data", landmarks_dir="landmarks", align="landmarks")
  record = next(r for r in builder.as_data_source(split="part1") if r["frame"] == 10)
  # Independent expectation: square of side 1.4 x max(extent) = 28 centred on the box centre (30, 11).
  side = 1.4 * 20
  box = (round(30 - side / 2), round(11 - side / 2), round(30 + side / 2), round(11 + side / 2))
  expected = np.asarray(Image.fromarray(gradient).crop(box).resize((256, 256), Image.BILINEAR), np.int32)
  assert box[1] < 0  # the box leaves the image: the padded rows are black
  err = np.abs(record["image"].astype(np.int32) - expected)
  assert err.mean() < 3, err.mean()
  assert record["image"][:20].max() < 20  # top rows come from outside the image
  other = next(r for r in builder.as_data_source(split="part1") if r["frame"] == 11)
  assert other["image"][:20].max() < 20  # padded top: a centre crop would have none
  assert np.abs(other["image"][40:].astype(int) - truth[("F001", "T1", 11)]["colour"]).mean() < 2


def test_fixture_image_is_what_the_checks_assume():
  image = face_image((100, 150, 200))
  assert image.shape == (48, 64, 3) and (image[:, 8:56] == (100, 150, 200)).all()
  assert (image[:, :8] == 8).all() and (image[:, 56:] == 8).all()


def test_prepare_cli(tmp_path):
  manual = tmp_path / "manual"
  truth = make_bp4d(manual, subjects=("F001",), tasks=("T1",), n_frames=2)
  corrupt(truth[("F001", "T1", 11)]["path"])
  repo = Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, "-m", "maejax.data.prepare", "--dataset=bp4d", f"--manual_dir={manual}",
         "--align=center"]
  failed = subprocess.run(cmd + [f"--data_dir={tmp_path / 'd1'}"], capture_output=True, text=True, env=env)
  assert failed.returncode != 0 and "0011.jpg" in failed.stderr and "--skip_bad" in failed.stderr
  ok = subprocess.run(cmd + [f"--data_dir={tmp_path / 'd2'}", "--skip_bad"], capture_output=True, text=True,
                      env=env)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "skipped 1 bad BP4D inputs" in ok.stdout and "part1: 1 examples" in ok.stdout
  assert len(data_source("bp4d", "part1", data_dir=tmp_path / "d2")) == 1


_HEADER_ROW = ",".join(str(i) for i in range(100))
_ZERO_ROW = "4" + ",0" * 99


def _row_with(column, value):
  cells = _ZERO_ROW.split(",")
  cells[column] = value
  return ",".join(cells)


@pytest.mark.parametrize("content, match", [
  (_HEADER_ROW + "\n" + _row_with(6, "x") + "\n", r"line 2: AU values must be integers 0, 1 or 9 .* AU 6 "
   r"\(column 7\) is 'x'"),
  (_HEADER_ROW + "\n" + _row_with(12, "0.5") + "\n", r"line 2: .* AU 12 \(column 13\) is '0.5'"),
  (_HEADER_ROW + "\n" + _ZERO_ROW + "\n" + "5" + ",1" * 49 + "\n", "line 3: 50 values, expected 100 "
   r"\(one per header column\)"),
  (_ZERO_ROW + "\n" + "5" + ",1" * 99 + "\n", r"line 1: expected a header row of column numbers 0,1,2,...,99 "
   r".*got '4,0,0,0,...' \(is the header row missing\?\)"),
  ("frame,AU1,AU2\n4,0,1\n", r"line 1: header cell 1 is 'frame', not a column number"),
  ("0,1,,3\n4,0,0,0\n", r"line 1: header cell 3 is '', not a column number"),
  (_HEADER_ROW + "\n", "no label rows after the header"),
  (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "not a CSV text file"),
])
def test_corrupt_label_file_is_one_line_naming_file_and_line(tmp_path, content, match):
  path = tmp_path / "F001_T1.csv"
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(ValueError, match=match) as e:
    read_au_occ_csv(path)
  assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def test_corrupt_label_file_in_builder_is_one_line(tmp_path):
  make_bp4d(tmp_path, n_frames=2)
  path = tmp_path / "AUCoding/AU_OCC/M011_T2.csv"
  path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")  # header row lost
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": line 1: expected a header row") as e:
    _scan(tmp_path)
  assert "\n" not in str(e.value)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and len(plans[2]) == 2 and len(plans[1]) == 4


# ------------------------------------------------------------------------------------- align="detect"


class CountingAligner:
  """A real maejax.faces.FrameAligner that counts its detector calls."""

  def __init__(self, aligner):
    self.aligner, self.signature, self.calls = aligner, aligner.signature, 0

  def detect(self, image):
    self.calls += 1
    return self.aligner.detect(image)

  def crop(self, image, detection, size):
    return self.aligner.crop(image, detection, size)


@pytest.fixture(scope="module")
def frame_aligner():
  faces = pytest.importorskip("maejax.faces")
  try:
    faces.fetch_models()
  except faces.ModelFetchError as e:
    pytest.skip(f"BlazeFace models unavailable: {e}")
  with faces.FrameAligner() as a:
    yield a


@pytest.fixture(scope="module")
def astronaut():
  return np.ascontiguousarray(pytest.importorskip("skimage.data").astronaut())


def _bp4d_faces(root, astronaut, no_face=("M011", 0, 1)):
  """Full-size BP4D frames (1392 high, 1040 wide) with the astronaut at 1.8× moved a little per frame; frame 11
  of M011 / T1 is an empty canvas."""
  subjects = ("F001", "M011")

  def image_fn(si, ti, fi):
    if (subjects[si], ti, fi) == no_face:
      return np.full((1392, 1040, 3), 120, np.uint8)
    return face_frame(astronaut, 1392, 1040, offset=(20 * fi - 20 * si, 30 * si - 10 * fi), scale=1.8)

  return make_bp4d(root, subjects=subjects, tasks=("T1",), n_frames=3, image_fn=image_fn)


def test_build_with_detected_faces(tmp_path, frame_aligner, astronaut):
  manual = tmp_path / "manual"
  _bp4d_faces(manual, astronaut)
  counting = CountingAligner(frame_aligner)
  builder = prepare("bp4d", manual, tmp_path / "data", aligner=counting)
  assert builder.info.metadata["align"] == "detect" and str(builder.version) == "2.0.0"
  assert counting.calls == 6  # every labelled frame, once; unlabelled images are not decoded
  records = list(builder.as_data_source(split="part1")) + list(builder.as_data_source(split="part2"))
  assert sorted((r["subject_id"].decode(), int(r["frame"])) for r in records) == [
    ("F001", 10), ("F001", 11), ("F001", 12), ("M011", 10), ("M011", 12)]
  # The frame without a face is left out, counted and listed next to the data.
  assert builder.cropper.no_face == [f"M011_T1\t11\t{manual / '2D+3D' / 'M011' / 'T1' / '11.jpg'}"]
  listed = (Path(builder.data_dir) / "no_face.txt").read_text().splitlines()
  assert len(listed) == 1 and listed[0].endswith("M011/T1/11.jpg")
  for r in records:
    lm = r["landmarks"]
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    # The FFHQ template at 256 px: eyes 2·IOD / 4 apart = 64 px around the centre column, 0.1·|e2m| (≈ 0.1·IOD =
    # 6.4 px) above the centre row; mouth ≈ one IOD below the eyes.
    np.testing.assert_allclose(lm[:2], [[95.5, 121.1], [159.5, 121.1]], atol=8)
    assert 50 < lm[3, 1] - lm[:2, 1].mean() < 80 and (lm[3] == lm[4]).all()
    assert r["image"].shape == (256, 256, 3) and r["image"].std() > 30  # a face, not the flat canvas
  # A rebuild (dataset folder removed, same data_dir) reads the detections from the cache: no detector call.
  import shutil
  shutil.rmtree(tmp_path / "data" / "bp4d")
  again = CountingAligner(frame_aligner)
  rebuilt = prepare("bp4d", manual, tmp_path / "data", aligner=again)
  assert again.calls == 0 and rebuilt.cropper.cache_hits == 6
  r0, r1 = records[0], rebuilt.as_data_source(split="part1")[0]
  np.testing.assert_array_equal(r0["landmarks"], r1["landmarks"])
  np.testing.assert_array_equal(r0["image"], r1["image"])
  # A changed image is detected again; the others still come from the cache.
  write_image(manual / "2D+3D" / "M011" / "T1" / "11.jpg", face_frame(astronaut, 1392, 1040, scale=1.8))
  shutil.rmtree(tmp_path / "data" / "bp4d")
  third = CountingAligner(frame_aligner)
  built3 = prepare("bp4d", manual, tmp_path / "data", aligner=third)
  assert third.calls == 1 and built3.cropper.no_face == [] and built3.info.splits["part2"].num_examples == 3


def test_detected_records_feed_the_occluders(tmp_path, frame_aligner, astronaut):
  # au_pipeline reads record landmarks: the mask drawn with them covers the detected mouth, not a centred guess.
  from maejax.data import occlusion
  manual = tmp_path / "manual"
  make_bp4d(manual, subjects=("F001",), tasks=("T1",), n_frames=1,
            image_fn=lambda si, ti, fi: face_frame(astronaut, 1392, 1040, offset=(0, 0), scale=1.8))
  r = prepare("bp4d", manual, tmp_path / "data", aligner=frame_aligner).as_data_source(split="part1")[0]
  mask = occlusion.surgical_mask_mask((256, 256), r["landmarks"])
  mx, my = np.rint(r["landmarks"][3]).astype(int)
  assert mask[my, mx]


def test_align_options_are_checked(tmp_path):
  with pytest.raises(ValueError, match="align='landmarks'"):
    Bp4d(data_dir=str(tmp_path), landmarks_dir="lm")
  with pytest.raises(ValueError, match="expected one of"):
    Bp4d(data_dir=str(tmp_path), align="box")
  manual = tmp_path / "manual"
  make_bp4d(manual, subjects=("F001",), tasks=("T1",), n_frames=1)
  import tensorflow_datasets as tfds
  with pytest.raises(ValueError, match="needs a face aligner"):
    Bp4d(data_dir=str(tmp_path / "d")).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
