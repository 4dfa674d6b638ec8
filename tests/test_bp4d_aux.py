"""BP4D auxiliary modalities (depth, thermal) for MCM: the documented per-frame layout, the builder config, the
prepare flag, and the MAE / MCM pipeline reading them back."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from fixtures_au import HEIGHT, WIDTH, make_bp4d, write_image
from PIL import Image

from maejax import config_utils
from maejax.data import images, pipeline
from maejax.data.bp4d import Bp4d
from maejax.data.prepare import data_source, make_builder, parse_aux_subdirs, prepare
from maejax.trainers import objectives

ROOT = Path(__file__).resolve().parents[1]
AUX = {"depth": "Depth", "thermal": "Thermal"}
SUBJECTS = ("F001", "M011", "F007")  # parts 1, 2, 3: fold 1 trains on the first two, tests on the third
CENTRE_BOX = ((WIDTH - HEIGHT) // 2, 0, (WIDTH + HEIGHT) // 2, HEIGHT)  # the centred square of a 64×48 frame


def depth_map(fi: int) -> np.ndarray:
  """uint8 (48, 64): 8-px blocks of 40 / 200 shifted by the frame index (edges show any misalignment)."""
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  return np.where((xx // 8 + yy // 8 + fi) % 2 == 0, 40, 200).astype(np.uint8)


def thermal_map(fi: int) -> np.ndarray:
  """uint8 (48, 64): a smooth ramp, different from the depth map (so swapped keys show)."""
  yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
  return np.clip(3 * xx + 2 * yy + 7 * fi, 0, 255).astype(np.uint8)


def make_bp4d_aux(root: Path, subjects=SUBJECTS, n_frames: int = 3) -> dict:
  """The fixture tree of `make_bp4d` (task T1) whose RGB frames repeat the depth map in every channel, plus
  <root>/Depth and <root>/Thermal with one 8-bit PNG per labelled frame, named without zero padding."""
  truth = make_bp4d(root, subjects=subjects, tasks=("T1",), n_frames=n_frames,
                    image_fn=lambda si, ti, fi: np.repeat(depth_map(fi)[:, :, None], 3, 2))
  for (subject, task, frame), gt in truth.items():
    fi = frame - 10
    for key, fn in (("depth", depth_map), ("thermal", thermal_map)):
      gt[key] = root / AUX[key] / subject / task / f"{frame}.png"
      write_image(gt[key], fn(fi))
  return truth


def reference_crop(path: Path) -> np.ndarray:
  """The centre crop + 256-px bilinear resize of a greyscale file, computed with PIL alone: uint8 (256, 256)."""
  with Image.open(path) as img:
    return np.asarray(img.convert("L").crop(CENTRE_BOX).resize((256, 256), Image.BILINEAR))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  manual = tmp_path_factory.mktemp("bp4d_aux_manual")
  truth = make_bp4d_aux(manual)
  data_dir = tmp_path_factory.mktemp("bp4d_aux_data")
  builder = prepare("bp4d", manual, data_dir, align="center", aux_subdirs=AUX)
  return builder, truth, data_dir, manual


def test_aux_records_are_the_centre_crops_of_the_written_maps(built):
  builder, truth, data_dir, _ = built
  assert builder.builder_config.name == "aux-depth-thermal" and str(builder.version) == "2.0.0"
  assert Path(builder.data_dir) == data_dir / "bp4d" / "aux-depth-thermal" / "2.0.0"
  assert builder.info.metadata["aux"] == ["depth", "thermal"]
  assert builder.info.metadata["aux_subdirs"] == AUX
  for key in ("depth", "thermal"):
    feature = builder.info.features[key]
    assert feature.shape == (256, 256, 1) and feature.encoding_format == "png"
  seen = 0
  for part in ("part1", "part2", "part3"):
    for r in builder.as_data_source(split=part):
      gt = truth[(r["subject_id"].decode(), r["task"].decode(), int(r["frame"]))]
      for key in ("depth", "thermal"):
        assert r[key].shape == (256, 256, 1) and r[key].dtype == np.uint8
        np.testing.assert_array_equal(r[key][:, :, 0], reference_crop(gt[key]))
      # Aligned with the RGB crop: the frame's channels are the depth map (JPEG-coded, so within a few levels);
      # the same comparison one block (32 crop px) off is far.
      err = np.abs(r["image"][:, :, 0].astype(int) - r["depth"][:, :, 0])
      shifted = np.abs(r["image"][:, 32:, 0].astype(int) - r["depth"][:, :-32, 0])
      assert err.mean() < 3 and shifted.mean() > 50, (err.mean(), shifted.mean())
      seen += 1
  assert seen == len(truth) == 9


def test_reading_finds_the_aux_build_and_the_plain_build_is_unchanged(built, tmp_path):
  builder, truth, data_dir, manual = built
  src = data_source("bp4d", "fold1_test", data_dir=data_dir, aux=("thermal",))  # a subset of the prepared keys
  assert len(src) == 3 and src[0]["thermal"].shape == (256, 256, 1)
  with pytest.raises(ValueError, match=r"no build with the auxiliary feature\(s\) \['flow'\].*--aux_subdirs=flow:"):
    data_source("bp4d", "fold1_test", data_dir=data_dir, aux=("flow",))
  with pytest.raises(ValueError, match="disfa has none"):
    data_source("disfa", "fold1_test", data_dir=data_dir, aux=("depth",))
  # A plain build beside it: its own path, the eight record features, no aux metadata.
  plain = prepare("bp4d", manual, data_dir, align="center")
  assert plain.builder_config is None and Path(plain.data_dir) == data_dir / "bp4d" / "2.0.0"
  assert set(plain.info.features) == set(images.AU_FEATURE_KEYS) and "aux" not in plain.info.metadata
  assert set(data_source("bp4d", "part1", data_dir=data_dir)[0]) == set(images.AU_FEATURE_KEYS)


def test_missing_aux_frame_names_the_expected_file(tmp_path):
  truth = make_bp4d_aux(tmp_path, subjects=("F001", "M011"), n_frames=2)
  gone = truth[("M011", "T1", 11)]["thermal"]
  gone.unlink()
  expected = tmp_path / "Thermal" / "M011" / "T1" / "11.png"
  with pytest.raises(FileNotFoundError, match=re.escape(f"expected {expected.parent}/11.png")):
    Bp4d(data_dir=str(tmp_path / "_unused"), aux_subdirs=AUX).scan(tmp_path)
  builder = Bp4d(data_dir=str(tmp_path / "_unused"), aux_subdirs=AUX, skip_bad=True)
  plans = builder.scan(tmp_path)
  assert builder.bad.count == 1 and str(expected) in builder.bad.examples[0]
  assert len(plans[1]) == 2 and [it[4] for it in plans[2]] == [10]
  assert plans[1][0][8] == {"depth": truth[("F001", "T1", 10)]["depth"],
                            "thermal": truth[("F001", "T1", 10)]["thermal"]}
  (tmp_path / "Depth").rename(tmp_path / "Depth_moved")
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "Depth"))):
    Bp4d(data_dir=str(tmp_path / "_unused"), aux_subdirs=AUX).scan(tmp_path)


def test_aux_image_of_another_size_or_mode_names_the_files(tmp_path):
  manual = tmp_path / "manual"
  truth = make_bp4d_aux(manual, subjects=("F001",), n_frames=1)
  gt = truth[("F001", "T1", 10)]
  write_image(gt["thermal"], thermal_map(0)[:, :60])
  with pytest.raises(ValueError, match="thermal image is 60×48") as e:
    prepare("bp4d", manual, tmp_path / "d1", align="center", aux_subdirs=AUX)
  assert str(gt["thermal"]) in str(e.value) and str(gt["path"]) in str(e.value)
  write_image(gt["thermal"], np.repeat(thermal_map(0)[:, :, None], 3, 2))
  with pytest.raises(ValueError, match=re.escape(str(gt["thermal"])) + ".*mode 'RGB'"):
    prepare("bp4d", manual, tmp_path / "d2", align="center", aux_subdirs=AUX)


class FixedFaceAligner:
  """align="detect" without a detector: every frame's face is the same tilted keypoint set, cropped by the real
  similarity warp of maejax.faces (so the aux crop must follow a rotation, not just a box)."""

  signature = "fixed-tilted-face"

  def detect(self, image):
    kp = [[22.0, 18.0], [42.0, 22.0], [32.0, 28.0], [24.0, 36.0], [38.0, 39.0]]
    return {"box": [14.0, 10.0, 50.0, 44.0], "keypoints": kp, "score": 1.0, "model": "fixed"}

  def crop(self, image, detection, size):
    from maejax import faces
    det = faces.Detection(box=np.asarray(detection["box"]), keypoints=np.asarray(detection["keypoints"]),
                          score=1.0, model="fixed")
    face = faces.align(image, det, size)
    return face.crop, face.crop_keypoints.astype(np.float32)


def test_detect_crop_warps_aux_like_the_rgb_frame(tmp_path):
  manual = tmp_path / "manual"
  truth = make_bp4d_aux(manual, subjects=("F001",), n_frames=2)
  rng = np.random.default_rng(0)
  for gt in truth.values():  # lossless RGB frames: red = the depth map, green / blue noise
    rgb = np.stack([depth_map(0), *rng.integers(0, 256, (2, HEIGHT, WIDTH), dtype=np.uint8)], -1)
    write_image(gt["depth"], rgb[:, :, 0])
    gt["path"].unlink()
    write_image(gt["path"].with_suffix(".png"), rgb)
  builder = prepare("bp4d", manual, tmp_path / "data", aligner=FixedFaceAligner(), aux_subdirs=AUX)
  records = list(builder.as_data_source(split="part1"))
  assert len(records) == 2
  aligner = FixedFaceAligner()
  from maejax import faces
  assert abs(faces.crop_params_ffhq(np.asarray(aligner.detect(None)["keypoints"]))[3]) > 0.1  # a rotated crop
  for r in records:
    # Each map is the warp of that map alone (as a grey image), whatever it was packed with.
    for key, fn in (("depth", lambda fi: depth_map(0)), ("thermal", thermal_map)):
      alone = aligner.crop(np.repeat(fn(int(r["frame"]) - 10)[:, :, None], 3, 2), aligner.detect(None), 256)[0]
      np.testing.assert_array_equal(r[key][:, :, 0], alone[:, :, 0])
    # ... and the RGB crop's red channel (= the depth map before the warp; stored as JPEG) lies on the depth crop.
    err = np.abs(r["image"][:, :, 0].astype(int) - r["depth"][:, :, 0])
    assert err.mean() < 3, err.mean()


def test_crop_channels_is_per_channel():
  rng = np.random.default_rng(1)
  channels = [rng.integers(0, 256, (48, 64), dtype=np.uint8) for _ in range(4)]  # two packed groups
  box = (5.0, -3.0, 47.0, 39.0)
  out = images.crop_channels(lambda x: images.crop_resize(x, box, 32), channels)
  assert [o.shape for o in out] == [(32, 32, 1)] * 4
  for c, o in zip(channels, out, strict=True):
    ref = Image.fromarray(c).crop((5, -3, 47, 39)).resize((32, 32), Image.BILINEAR)
    np.testing.assert_array_equal(o[:, :, 0], np.asarray(ref))
  with pytest.raises(ValueError, match="one size"):
    images.crop_channels(lambda x: x, [channels[0], channels[0][:, :60]])


def test_aux_subdirs_flag_parsing():
  assert parse_aux_subdirs("depth:Depth,thermal:Thermal") == AUX
  assert parse_aux_subdirs(" depth : 3D/depth ") == {"depth": "3D/depth"}
  for bad, match in [("depth", "not key:subdir"), ("depth:", "not key:subdir"), ("depth:A,depth:B", "twice"),
                     ("Depth:D", "lower-case"), ("image:I", "clash")]:
    with pytest.raises(ValueError, match=match):
      parse_aux_subdirs(bad)
  with pytest.raises(ValueError, match="disfa has no auxiliary modalities"):
    make_builder("disfa", aux_subdirs={"depth": "Depth"})


def test_prepare_cli_aux_subdirs(tmp_path):
  manual = tmp_path / "manual"
  make_bp4d_aux(manual, subjects=("F001",), n_frames=1)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
  cmd = [sys.executable, "-m", "maejax.data.prepare", f"--manual_dir={manual}", "--align=center",
         f"--data_dir={tmp_path / 'd'}", "--aux_subdirs=depth:Depth,thermal:Thermal"]
  ok = subprocess.run(cmd + ["--dataset=bp4d"], capture_output=True, text=True, env=env)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "config aux-depth-thermal, auxiliary features ['depth', 'thermal']" in ok.stdout
  assert "part1: 1 examples" in ok.stdout
  disfa = subprocess.run(cmd + ["--dataset=disfa"], capture_output=True, text=True, env=env)
  assert disfa.returncode != 0 and "--aux_subdirs is a BP4D option" in disfa.stderr


def _bp4d_data(data_dir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="bp4d", fold=1, data_dir=str(data_dir), crop_scale=(0.2, 1.0),
                                        worker_count=0))


def test_mae_pipeline_yields_aux_batches_and_mcm_trains_on_them(built):
  _, _, data_dir, _ = built
  batch = next(iter(pipeline.objective_pipeline(_bp4d_data(data_dir), 4, 32, 0, aux=("depth", "thermal"))))
  assert set(batch) == {"image", "depth", "thermal"}
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["depth"].shape == batch["thermal"].shape == (4, 32, 32, 1) and batch["depth"].dtype == np.uint8
  # Same crop and flip: the image's channels are the depth map, so they stay close after augmentation.
  assert np.abs(batch["image"][..., :1].astype(int) - batch["depth"]).mean() < 8
  with pytest.raises(ValueError, match="config.data.fold"):
    pipeline.objective_pipeline(ml_collections.ConfigDict(dict(name="bp4d")), 4, 32, 0, aux=("depth",))
  with pytest.raises(ValueError, match=r"\['flow'\].*--aux_subdirs"):
    pipeline.objective_pipeline(_bp4d_data(data_dir), 4, 32, 0, aux=("flow",))
  with pytest.raises(ValueError, match="synthfaces renders depth only"):
    pipeline.aux_source(ml_collections.ConfigDict(dict(name="synthfaces")), "train", ("thermal",))

  # The MCM objective with config.mcm.aux = depth + thermal on the prepared data: one finite loss, and the figure
  # inputs carry both maps.
  cfg = config_utils.load_config(f"{ROOT / 'configs' / 'mae_pretrain.py'}:mcm_smoke")
  cfg.data = _bp4d_data(data_dir)
  cfg.mcm.aux, cfg.mcm.drop, cfg.batch_size = (("depth", 1), ("thermal", 1)), 2, 4
  obj = objectives.build(cfg)
  variables = jax.jit(obj.init_fn)(jax.random.PRNGKey(0))  # jitted: faster than op by op on CPU
  loss, (metrics, _) = jax.jit(obj.loss_fn)(variables["params"], {}, next(obj.data), jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and {"depth_loss", "thermal_loss"} <= set(metrics)
  inputs = objectives.figure_images(cfg, 32, aux=("depth", "thermal"))
  assert inputs.shape == (2, 32, 32, 5) and inputs.dtype == np.uint8
  assert np.abs(inputs[..., 0].astype(int) - inputs[..., 3]).mean() < 8  # RGB then depth, aligned
