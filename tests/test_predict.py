"""``maejax.predict``: faces detected, aligned and tracked in a real photo (``skimage.data.astronaut()``), in
noise, twice, and in short videos (translated, occluded); ``--faces=aligned`` on folders of crops and videos;
corrupt files; overlays; the CSV layout; probabilities checked against the restored model applied directly (on the
shared ``au_occl.py:smoke`` workdir from conftest.py)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures_au import corrupt, write_video
from PIL import Image, ImageDraw

from maejax import au_infer, faces, predict
from maejax.data import pipeline, synthfaces

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)  # DESIGN.md §6


def _faces(n, size):
  src = synthfaces.SynthFaces(seed=3, num_subjects=2, frames_per_subject=n, image_size=size)
  return [src[i]["image"] for i in range(n)]


def _read(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _probs(rows, aus=BP4D_AUS):
  return np.array([[float(r[f"AU{a:02d}_p"]) for a in aus] for r in rows])


def _check_rows(rows, aus=BP4D_AUS):
  p = _probs(rows, aus)
  c = np.array([[int(r[f"AU{a:02d}_c"]) for a in aus] for r in rows])
  assert np.all((p >= 0) & (p <= 1))
  np.testing.assert_array_equal(c, (p >= 0.5).astype(int))


@pytest.fixture(scope="module")
def loaded(au_smoke_run):
  return predict.load_au_model(str(au_smoke_run.workdir), "kd")


def test_columns_are_openface_style():
  assert predict.columns((1, 12)) == [
    "file", "frame", "face_id", "timestamp", "confidence", "success", "carried",
    "face_x0", "face_y0", "face_x1", "face_y1",
    "eye_l_x", "eye_l_y", "eye_r_x", "eye_r_y", "nose_x", "nose_y", "mouth_x", "mouth_y",
    "AU01_p", "AU12_p", "AU01_c", "AU12_c"]


def test_model_input_is_the_whole_aligned_crop_resized():
  """As the AU pipelines' evaluation view: the whole aligned square, bicubic-resized to the model's input."""
  crop = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
  np.testing.assert_array_equal(predict.model_input(crop, 256), crop)
  ref = np.asarray(Image.fromarray(crop).resize((32, 32), Image.BICUBIC))
  np.testing.assert_array_equal(predict.model_input(crop, 32), ref)
  # input_to_crop inverts the geometry: input pixel centres land on the resampled crop positions.
  a = predict.input_to_crop(32)
  # Input pixel 0 covers crop edges 0..8 (8 crop px per input px): its centre is crop pixel 3.5.
  np.testing.assert_allclose(a @ np.array([0, 0, 1.0]), [3.5, 3.5])
  np.testing.assert_allclose(a @ np.array([31, 31, 1.0]), [3.5 + 31 * 8, 3.5 + 31 * 8])


def test_list_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    predict.list_inputs(str(tmp_path / "nope"))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="no images"):
    predict.list_inputs(str(tmp_path))
  for name in ("b/2.png", "a.JPG", "b/1.avi"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  assert [os.path.relpath(p, tmp_path) for p in predict.list_inputs(str(tmp_path))] == ["a.JPG", "b/1.avi",
                                                                                       "b/2.png"]


def test_model_dir_names_available_models(au_smoke_run):
  wd = str(au_smoke_run.workdir)
  assert au_infer.model_dir(wd) == os.path.join(wd, "students", "kd")
  assert au_infer.model_dir(wd, "teacher") == os.path.join(wd, "teacher", "stage2")
  with pytest.raises(FileNotFoundError, match="kd_drop"):  # lists what exists
    au_infer.model_dir(wd, "no_such_student")


def test_probabilities_match_the_model_applied_directly(loaded, tmp_path):
  # Images at the model's size need no resize, so the CSV must equal a plain apply of the restored model.
  size = loaded.img_size
  faces = _faces(5, size)
  for i, f in enumerate(faces):
    Image.fromarray(f).save(tmp_path / f"f{i}.png")
  out = tmp_path / "p.csv"
  res = predict.predict_path(loaded, str(tmp_path), str(out), batch_size=2, progress=False, faces_mode="aligned")
  rows = _read(out)
  assert res["rows"] == 5 and len(rows) == 5 and res["bad"] == []
  assert [os.path.basename(r["file"]) for r in rows] == [f"f{i}.png" for i in range(5)]
  assert {r["frame"] for r in rows} == {"1"} and {r["timestamp"] for r in rows} == {""}
  assert {(r["face_id"], r["success"], r["carried"]) for r in rows} == {("0", "1", "0")}
  _check_rows(rows, loaded.aus)
  import jax.numpy as jnp
  ref = loaded.model.apply(loaded.variables, pipeline.normalize(jnp.asarray(np.stack(faces))), train=False)
  np.testing.assert_allclose(_probs(rows, loaded.aus), np.asarray(ref.head.probs), atol=6e-5)


def test_video_one_row_per_frame_equals_the_frames_as_images(loaded, tmp_path):
  frames = _faces(5, 48)  # not the model's size: both paths resize the same way
  write_video(tmp_path / "vid" / "clip.avi", frames)  # lossless FFV1: decoded frames == the arrays
  for i, f in enumerate(frames):
    Image.fromarray(f).save(tmp_path / f"img_{i}.png")
  res = predict.predict_path(loaded, str(tmp_path / "vid" / "clip.avi"), str(tmp_path / "v.csv"), batch_size=4,
                             progress=False, faces_mode="aligned")
  vrows = _read(tmp_path / "v.csv")
  assert res["rows"] == 5 and [int(r["frame"]) for r in vrows] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([float(r["timestamp"]) for r in vrows], np.arange(5) / 25, atol=1e-3)
  _check_rows(vrows, loaded.aus)
  predict.predict_path(loaded, str(tmp_path), str(tmp_path / "all.csv"), batch_size=4, progress=False,
                       faces_mode="aligned")
  irows = [r for r in _read(tmp_path / "all.csv") if r["file"].endswith(".png")]
  np.testing.assert_allclose(_probs(vrows, loaded.aus), _probs(irows, loaded.aus), atol=1e-4)


def _cli(args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "maejax.predict", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_corrupt_image_errors_or_is_skipped_and_reported(au_smoke_run, tmp_path):
  folder = tmp_path / "faces"
  folder.mkdir()
  for i, f in enumerate(_faces(3, 40)):
    Image.fromarray(f).save(folder / f"{i}.png")
  corrupt(folder / "1b_broken.jpg")
  out = tmp_path / "preds.csv"
  base = [f"--checkpoint={au_smoke_run.workdir}", f"--input={folder}", f"--output={out}", "--faces=aligned"]

  p = _cli(base)
  assert p.returncode != 0
  assert "1b_broken.jpg" in p.stderr and "--skip_bad" in p.stderr
  assert not out.exists()

  p = _cli([*base, "--skip_bad", "--model=teacher", "--batch_size=2"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "skipped 1 unreadable file(s)" in p.stdout and "1b_broken.jpg" in p.stdout
  rows = _read(out)
  assert [os.path.basename(r["file"]) for r in rows] == ["0.png", "1.png", "2.png"]
  _check_rows(rows)


def test_cli_help_names_the_face_options():
  p = _cli(["--help"])
  assert p.returncode in (0, 1), p.stderr[-2000:]  # absl exits 1 after --help
  text = " ".join(p.stdout.split())
  for flag in ("--faces", "--max_faces", "--face_model", "--overlay", "--skip_bad", "--max_carry"):
    assert flag in text, flag


# ------------------------------------------------------------------------------------------ faces in the wild

# Hand-placed on skimage.data.astronaut() (as in test_faces.py): pupil centres, (x, y) pixels.
ASTRO_EYES = np.array([[202.5, 100.8], [246.7, 103.7]])


@pytest.fixture(scope="module")
def detector():
  try:
    faces.fetch_models()
  except faces.ModelFetchError as e:
    pytest.skip(f"BlazeFace models unavailable (no network to fetch them): {e}")
  with faces.FaceDetector() as d:
    yield d


@pytest.fixture(scope="module")
def astronaut():
  skimage_data = pytest.importorskip("skimage.data")
  return np.ascontiguousarray(skimage_data.astronaut())


def _run(loaded, detector, inp, out, **kw):
  kw.setdefault("batch_size", 4)
  return predict.predict_path(loaded, str(inp), str(out), progress=False, detector=detector, **kw)


def _canvas_video(astronaut, offsets, canvas=(600, 700)):
  frames = []
  for dx, dy in offsets:
    f = np.full((*canvas, 3), 180, np.uint8)
    f[dy:dy + 512, dx:dx + 512] = astronaut
    frames.append(f)
  return frames


def test_astronaut_one_face_equal_to_the_model_on_the_aligned_crop(loaded, detector, astronaut, tmp_path):
  Image.fromarray(astronaut).save(tmp_path / "astro.png")
  res = _run(loaded, detector, tmp_path / "astro.png", tmp_path / "p.csv")
  (row,) = _read(tmp_path / "p.csv")
  assert res["faces"] == 1 and res["no_face"] == 0
  assert (row["frame"], row["face_id"], row["success"], row["carried"]) == ("1", "0", "1", "0")
  assert float(row["confidence"]) > 0.8
  x0, y0, x1, y1 = (float(row[k]) for k in ("face_x0", "face_y0", "face_x1", "face_y1"))
  for x, y in ASTRO_EYES:
    assert x0 < x < x1 and y0 < y < y1
  assert 60 < x1 - x0 < 160 and 60 < y1 - y0 < 160  # the face (~100 px), not the whole 512 px photo
  eyes = np.array([[float(row["eye_l_x"]), float(row["eye_l_y"])], [float(row["eye_r_x"]), float(row["eye_r_y"])]])
  np.testing.assert_allclose(eyes, ASTRO_EYES, atol=5)
  # Independent path: the detection aligned by faces.align, cut by model_input, through au_infer.predict_probs.
  (det,) = detector.detect(astronaut)
  x = predict.model_input(faces.align(astronaut, det, 256).crop, loaded.img_size)
  ref = au_infer.predict_probs(loaded, np.repeat(x[None], 4, 0))[0]
  _check_rows([row], loaded.aus)
  np.testing.assert_allclose(_probs([row], loaded.aus)[0], ref, atol=6e-5)


def test_noise_gets_a_row_without_a_face(loaded, detector, tmp_path):
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(tmp_path / "n.png")
  res = _run(loaded, detector, tmp_path / "n.png", tmp_path / "p.csv")
  (row,) = _read(tmp_path / "p.csv")
  assert res["no_face"] == 1 and res["faces"] == 0
  assert (row["face_id"], row["success"], row["confidence"]) == ("-1", "0", "0")
  assert all(row[c] == "" for c in predict.columns(loaded.aus)[7:])


def test_two_faces_with_max_faces_2(loaded, detector, astronaut, tmp_path):
  small = np.asarray(Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).resize((384, 384)))
  canvas = np.full((512, 912, 3), 200, np.uint8)
  canvas[:, :512] = astronaut
  canvas[64:448, 520:904] = small
  Image.fromarray(canvas).save(tmp_path / "two.png")
  _run(loaded, detector, tmp_path / "two.png", tmp_path / "two.csv", max_faces=2)
  rows = _read(tmp_path / "two.csv")
  assert [r["face_id"] for r in rows] == ["0", "1"] and {r["success"] for r in rows} == {"1"}
  assert float(rows[0]["face_x1"]) < 512 <= float(rows[1]["face_x0"])  # id 0 = the larger face, on the left
  _check_rows(rows, loaded.aus)
  _run(loaded, detector, tmp_path / "two.png", tmp_path / "one.csv")  # default: the largest face only
  (row,) = _read(tmp_path / "one.csv")
  assert row["face_id"] == "0" and row["face_x0"] == rows[0]["face_x0"]


def test_translated_video_keeps_one_id(loaded, detector, astronaut, tmp_path):
  frames = _canvas_video(astronaut, [(6 * t, 3 * t) for t in range(8)])
  write_video(tmp_path / "move.avi", frames)
  res = _run(loaded, detector, tmp_path / "move.avi", tmp_path / "v.csv")
  rows = _read(tmp_path / "v.csv")
  assert res["frames"] == 8 and [int(r["frame"]) for r in rows] == list(range(1, 9))
  assert {(r["face_id"], r["success"], r["carried"]) for r in rows} == {("0", "1", "0")}
  x0 = np.array([float(r["face_x0"]) for r in rows])
  np.testing.assert_allclose(x0 - x0[0], 6 * np.arange(8), atol=8)  # the box follows the face
  _check_rows(rows, loaded.aus)


def test_occluder_passing_over_keeps_the_id_and_marks_carried_rows(loaded, detector, astronaut, tmp_path):
  frames = _canvas_video(astronaut, [(40, 30)] * 8)
  for t in (3, 4, 5):  # the whole head hidden: neither model finds a face
    im = Image.fromarray(frames[t])
    ImageDraw.Draw(im).rectangle([180, 60, 350, 245], fill=(128, 128, 128))
    frames[t] = np.asarray(im)
  write_video(tmp_path / "occl.avi", frames)
  res = _run(loaded, detector, tmp_path / "occl.avi", tmp_path / "o.csv")
  rows = _read(tmp_path / "o.csv")
  assert [(r["face_id"], r["success"], r["carried"]) for r in rows] == [
    ("0", "1", "1" if t in (3, 4, 5) else "0") for t in range(8)]
  assert res["carried"] == 3
  assert rows[4]["face_x0"] == rows[2]["face_x0"]  # carried at the last detected box
  _run(loaded, detector, tmp_path / "occl.avi", tmp_path / "o2.csv", max_carry=1)
  assert [r["face_id"] for r in _read(tmp_path / "o2.csv")] == ["0", "0", "0", "0", "-1", "-1", "1", "1"]


def test_overlays_are_drawn(loaded, detector, astronaut, tmp_path):
  Image.fromarray(astronaut).save(tmp_path / "astro.png")
  res = _run(loaded, detector, tmp_path / "astro.png", tmp_path / "p.csv", overlay=str(tmp_path / "ov.png"))
  assert res["overlays"] == [str(tmp_path / "ov.png")]
  with Image.open(tmp_path / "ov.png") as im:
    drawn = np.asarray(im.convert("RGB"))
  assert drawn.shape == astronaut.shape
  changed = np.any(drawn != astronaut, -1)
  row = _read(tmp_path / "p.csv")[0]
  x0, y0 = int(float(row["face_x0"])), int(float(row["face_y0"]))
  assert 500 < changed.sum() < 0.2 * changed.size and changed[y0, x0:x0 + 40].any()  # the box's top edge
  with pytest.raises(ValueError, match="one image"):
    _run(loaded, detector, tmp_path / "astro.png", tmp_path / "p.csv", overlay=str(tmp_path / "ov.mp4"))

  write_video(tmp_path / "v" / "clip.avi", _canvas_video(astronaut, [(10, 10)] * 3))
  res = _run(loaded, detector, tmp_path / "v" / "clip.avi", tmp_path / "v.csv", overlay=str(tmp_path / "ov.mp4"))
  import av
  with av.open(str(tmp_path / "ov.mp4")) as c:
    decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  assert len(decoded) == 3 and decoded[0].shape == (600, 700, 3)
  assert np.abs(decoded[1].astype(int) - _canvas_video(astronaut, [(10, 10)])[0]).max() > 100


def test_overlay_shades_dropped_patches(au_smoke_run, detector, astronaut, tmp_path):
  kd_drop = predict.load_au_model(str(au_smoke_run.workdir), "kd_drop")
  Image.fromarray(astronaut).save(tmp_path / "a.png")
  plain = tmp_path / "plain.png"
  shaded = tmp_path / "shaded.png"
  _run(kd_drop, detector, tmp_path / "a.png", tmp_path / "p.csv", overlay=str(plain))
  _run(kd_drop, detector, tmp_path / "a.png", tmp_path / "d.csv", overlay=str(shaded), drop="pred",
       drop_threshold=0.0)  # every patch the predictor finds at all occluded is dropped
  a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in (plain, shaded))
  diff = np.any(a != b, -1)
  ys, xs = np.nonzero(diff)
  row = _read(tmp_path / "d.csv")[0]
  box = [float(row[k]) for k in ("face_x0", "face_y0", "face_x1", "face_y1")]
  assert diff.sum() > 1000  # shaded patches (and other AU labels) ...
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2  # ... lie on the face's crop, around the box
  assert abs(np.median(xs) - cx) < 150 and abs(np.median(ys) - cy) < 150
