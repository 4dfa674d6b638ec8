"""``maejax.predict``: folders of images, videos, corrupt files, the CSV layout, and probabilities checked against
the restored model applied directly (on the shared ``au_occl.py:smoke`` workdir from conftest.py)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from fixtures_au import corrupt, write_video
from PIL import Image

from maejax import au_infer, predict
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
  assert predict.columns((1, 12)) == ["file", "frame", "timestamp", "AU01_p", "AU12_p", "AU01_c", "AU12_c"]


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
  res = predict.predict_path(loaded, str(tmp_path), str(out), batch_size=2, progress=False)
  rows = _read(out)
  assert res["rows"] == 5 and len(rows) == 5 and res["bad"] == []
  assert [os.path.basename(r["file"]) for r in rows] == [f"f{i}.png" for i in range(5)]
  assert {r["frame"] for r in rows} == {"1"} and {r["timestamp"] for r in rows} == {""}
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
                             progress=False)
  vrows = _read(tmp_path / "v.csv")
  assert res["rows"] == 5 and [int(r["frame"]) for r in vrows] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([float(r["timestamp"]) for r in vrows], np.arange(5) / 25, atol=1e-3)
  _check_rows(vrows, loaded.aus)
  predict.predict_path(loaded, str(tmp_path), str(tmp_path / "all.csv"), batch_size=4, progress=False)
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
  base = [f"--checkpoint={au_smoke_run.workdir}", f"--input={folder}", f"--output={out}"]

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


def test_cli_help_says_no_detector():
  p = _cli(["--help"])
  assert p.returncode in (0, 1), p.stderr[-2000:]  # absl exits 1 after --help
  text = " ".join(p.stdout.split())
  assert "No face detector is used" in text and "no face detector is used" in text and "--skip_bad" in text
