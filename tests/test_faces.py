"""maejax.faces: model fetch checked by sha256 (local fake wheels, an offline pip), alignment geometry against the
recipe's formulas and an independent resampler, the tracker on synthetic boxes, and BlazeFace on a real photo
(``skimage.data.astronaut()``) clean, occluded, twice, in noise and in short synthetic videos."""

import hashlib
import os
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from maejax import faces

# Hand-placed on skimage.data.astronaut() (512×512) from a 6× nearest-neighbour zoom: pupil centres and the centre
# of the open mouth, (x, y) pixels.
ASTRO_EYE_L = np.array([202.5, 100.8])
ASTRO_EYE_R = np.array([246.7, 103.7])
ASTRO_MOUTH = np.array([224.2, 144.2])
ASTRO_IOD = float(np.linalg.norm(ASTRO_EYE_R - ASTRO_EYE_L))


def ffhq_square(eye_l, eye_r, mouth):
  """The FFHQ / LibreFace square (FACES.md §3.2) written out: centre, half side, unit x-axis."""
  eye_avg = (eye_l + eye_r) / 2
  e2e, e2m = eye_r - eye_l, mouth - eye_avg
  x = e2e - np.flipud(e2m) * np.array([-1, 1])
  x = x / np.linalg.norm(x)
  return eye_avg + 0.1 * e2m, max(2.0 * np.linalg.norm(e2e), 1.8 * np.linalg.norm(e2m)), x


def to_crop(points, centre, half, x, size):
  """Points in the crop of that square, by the crop's own basis: x along its rows, y = x turned +90°."""
  y = np.array([-x[1], x[0]])
  d = np.asarray(points, np.float64) - centre
  return np.stack([d @ x, d @ y], -1) * size / (2 * half) + (size - 1) / 2


# ------------------------------------------------------------------------------------------------ model fetch


def fake_wheel(path, contents):
  with zipfile.ZipFile(path, "w") as z:
    for kind, data in contents.items():
      z.writestr(faces.MODEL_FILES[kind].member, data)
    z.writestr("mediapipe/__init__.py", "")
  return str(path)


@pytest.fixture
def fake_models(monkeypatch):
  """Stand-in model bytes, with MODEL_FILES expecting their sha256."""
  contents = {"full_range": b"full range model bytes", "short_range": b"short range model bytes"}
  table = {k: faces.ModelFile(m.member, hashlib.sha256(contents[k]).hexdigest()) for k, m in faces.MODEL_FILES.items()}
  monkeypatch.setattr(faces, "MODEL_FILES", table)
  return contents


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
  """pip with no index and an empty find-links folder: `pip download` fails as it does without a network."""
  empty = tmp_path / "no_wheels"
  empty.mkdir()
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def test_fetch_extracts_from_a_local_wheel_then_reads_the_cache(fake_models, offline_pip, tmp_path):
  wheel = fake_wheel(tmp_path / "mediapipe-0.10.21-cp312-cp312-manylinux_2_28_x86_64.whl", fake_models)
  cache = tmp_path / "cache"
  paths = faces.fetch_models(str(cache), wheel=wheel)
  assert sorted(paths) == ["full_range", "short_range"]
  for kind, path in paths.items():
    assert os.path.dirname(path) == str(cache)
    assert os.path.basename(path) == os.path.basename(faces.MODEL_FILES[kind].member)
    with open(path, "rb") as f:
      assert f.read() == fake_models[kind]
  # Filled: no wheel and no network needed any more.
  assert faces.fetch_models(str(cache)) == paths
  assert faces.resolve_models(None, str(cache)) == list(paths.items())
  assert faces.resolve_models(str(cache)) == list(paths.items())  # a directory holding both files


def test_fetch_honours_the_environment_cache(fake_models, tmp_path, monkeypatch):
  monkeypatch.setenv("MAEJAX_MODEL_DIR", str(tmp_path / "env_cache"))
  wheel = fake_wheel(tmp_path / "w.whl", fake_models)
  paths = faces.fetch_models(wheel=wheel)
  assert all(p.startswith(str(tmp_path / "env_cache") + os.sep) for p in paths.values())


def test_wrong_checksum_in_the_wheel_names_the_file_and_both_hashes(fake_models, tmp_path):
  bad = dict(fake_models, short_range=b"tampered")
  wheel = fake_wheel(tmp_path / "w.whl", bad)
  with pytest.raises(ValueError) as e:
    faces.fetch_models(str(tmp_path / "cache"), wheel=wheel)
  msg = str(e.value)
  assert faces.MODEL_FILES["short_range"].member in msg
  assert hashlib.sha256(b"tampered").hexdigest() in msg
  assert hashlib.sha256(fake_models["short_range"]).hexdigest() in msg
  assert not os.path.exists(tmp_path / "cache" / "face_detection_short_range.tflite")


def test_wrong_checksum_in_the_cache_names_the_file_and_both_hashes(fake_models, tmp_path):
  cache = tmp_path / "cache"
  faces.fetch_models(str(cache), wheel=fake_wheel(tmp_path / "w.whl", fake_models))
  target = cache / "face_detection_full_range_sparse.tflite"
  target.write_bytes(b"truncated")
  with pytest.raises(ValueError) as e:
    faces.fetch_models(str(cache))
  msg = str(e.value)
  assert str(target) in msg
  assert hashlib.sha256(b"truncated").hexdigest() in msg
  assert hashlib.sha256(fake_models["full_range"]).hexdigest() in msg
  with pytest.raises(ValueError, match="sha256"):
    faces.resolve_models(str(cache))


def test_a_wheel_without_the_models_is_refused(tmp_path):
  with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
    z.writestr("other/__init__.py", "")
  with pytest.raises(ValueError, match="face_detection_full_range_sparse.tflite"):
    faces.extract_models(str(tmp_path / "other.whl"), str(tmp_path / "cache"))


def test_no_network_is_one_line_saying_how_to_pass_a_local_model(offline_pip, tmp_path):
  with pytest.raises(faces.ModelFetchError) as e:
    faces.fetch_models(str(tmp_path / "cache"))
  msg = str(e.value)
  assert "\n" not in msg
  assert "mediapipe==0.10.21" in msg and "face_model=" in msg and "face_detection_short_range.tflite" in msg
  assert str(tmp_path / "cache") in msg  # where the files can be put by hand


def test_missing_local_model_is_a_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.tflite"):
    faces.resolve_models(str(tmp_path / "nope.tflite"))
  (tmp_path / "half").mkdir()
  with pytest.raises(FileNotFoundError, match="face_detection_full_range_sparse.tflite"):
    faces.resolve_models(str(tmp_path / "half"))


# ------------------------------------------------------------------------------------------------ geometry


def test_ffhq_crop_is_invariant_to_rotation_scale_and_translation():
  """A face at 40 px IOD, upright: the recipe puts its eyes at (127.5 ∓ 32, 127.5 − 6.4) in a 256 crop (half side
  2·IOD = 80 → scale 1.6; centre 0.1·|e2m| = 4 px below the eyes). Any similar copy of the face lands there too."""
  kp = np.array([[100.0, 100.0], [140.0, 100.0], [120.0, 120.0], [120.0, 140.0], [120.0, 140.0]])
  want = np.array([[95.5, 121.1], [159.5, 121.1], [127.5, 153.1], [127.5, 185.1], [127.5, 185.1]])
  det = faces.Detection(np.array([90.0, 80.0, 150.0, 150.0]), kp, 0.9, "test")
  np.testing.assert_allclose(faces.align(np.zeros((8, 8, 3), np.uint8), det).crop_keypoints, want, atol=1e-9)
  for angle, scale, shift in [(0.5, 1.7, (30.0, -12.0)), (-2.0, 0.4, (400.0, 3.0)), (np.pi, 3.0, (0.0, 0.0))]:
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    kp2 = kp @ rot.T + np.array(shift)
    a = faces.params_to_affine(faces.crop_params_ffhq(kp2), 256)
    np.testing.assert_allclose(faces.apply_affine(a, kp2), want, atol=1e-9)
    np.testing.assert_allclose(faces.apply_affine(faces.invert_affine(a), want), kp2, atol=1e-9)


def test_ffhq_crop_matches_the_written_out_recipe_on_an_irregular_face():
  kp = np.array([[210.0, 95.0], [251.0, 108.0], [226.0, 128.0], [219.0, 160.0], [235.0, 158.0]])
  centre, half, x = ffhq_square(kp[0], kp[1], kp[3:5].mean(0))
  a = faces.params_to_affine(faces.crop_params_ffhq(kp), 224)
  np.testing.assert_allclose(faces.apply_affine(a, kp), to_crop(kp, centre, half, x, 224), atol=1e-9)


def test_eyes_and_box_crops():
  kp = np.array([[100.0, 100.0], [140.0, 100.0], [120.0, 125.0], [110.0, 150.0], [130.0, 150.0]])
  a = faces.params_to_affine(faces.crop_params_eyes(kp), 160)  # half 80, centre 4 px below the eyes, scale 1
  np.testing.assert_allclose(faces.apply_affine(a, kp[:2]), [[59.5, 75.5], [99.5, 75.5]], atol=1e-9)
  a = faces.params_to_affine(faces.crop_params_box([50.0, 60.0, 150.0, 140.0], 1.5), 300)  # side 150, scale 2
  np.testing.assert_allclose(faces.apply_affine(a, [[25.0, 25.0], [175.0, 175.0], [100.0, 100.0]]),
                             [[-0.5, -0.5], [299.5, 299.5], [149.5, 149.5]], atol=1e-9)
  det = faces.Detection(np.array([50.0, 60.0, 150.0, 140.0]), kp, 0.9, "test")
  with pytest.raises(ValueError, match="method='mesh'"):
    faces.align(np.zeros((8, 8, 3), np.uint8), det, method="mesh")


def test_warp_equals_scipy_bilinear_with_edge_padding():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  # Enlarging 1.3×, rotated, partly outside the image (edges repeated there).
  a = faces.params_to_affine(np.array([70.0, 20.0, 30.0, 0.4]), 78)
  crop = faces.warp_affine(img, a, 78)
  u, v = np.meshgrid(np.arange(78.0), np.arange(78.0))
  src = faces.apply_affine(faces.invert_affine(a), np.stack([u, v], -1))
  want = np.stack([ndimage.map_coordinates(img[..., c].astype(np.float64), [src[..., 1], src[..., 0]], order=1,
                                           mode="nearest") for c in range(3)], -1)
  diff = want - crop.astype(np.float64)  # PIL truncates the interpolated value: 0 ≤ diff < 1
  assert diff.min() > -1e-6 and diff.max() < 1 + 1e-6


def test_warp_antialiases_and_keeps_points_where_the_affine_puts_them():
  h = w = 800
  yy, xx = np.mgrid[0:h, 0:w]
  dots = np.array([[250.0, 300.0], [520.0, 280.0], [400.0, 560.0]])
  img = np.zeros((h, w), np.float64)
  for x, y in dots:
    img += 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 9.0 ** 2))
  img = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, 2)
  a = faces.params_to_affine(np.array([400.0, 400.0, 280.0, 0.3]), 128)  # shrinks 4.4×: reduced by 4 first
  crop = faces.warp_affine(img, a, 128)[..., 0].astype(np.float64)
  for p in faces.apply_affine(a, dots):
    x0, y0 = int(round(p[0])) - 8, int(round(p[1])) - 8
    win = crop[y0:y0 + 17, x0:x0 + 17]
    gy, gx = np.mgrid[0:17, 0:17]
    got = np.array([(win * gx).sum() / win.sum() + x0, (win * gy).sum() / win.sum() + y0])
    assert np.linalg.norm(got - p) < 0.5, (got, p)
  # One-pixel stripes average to grey instead of aliasing into bands.
  stripes = np.repeat(((xx % 2) * 255).astype(np.uint8)[..., None], 3, 2)
  crop = faces.warp_affine(stripes, a, 128).astype(np.float64)
  assert abs(crop.mean() - 127.5) < 4 and crop.std() < 12


# ------------------------------------------------------------------------------------------------ tracking


def test_box_iou_against_pixel_counts():
  rng = np.random.default_rng(1)
  for _ in range(20):
    a, b = (np.sort(rng.integers(0, 50, (2, 2)), 0).T.reshape(-1)[[0, 2, 1, 3]].astype(float) for _ in range(2))
    ma, mb = np.zeros((50, 50), bool), np.zeros((50, 50), bool)
    ma[int(a[1]):int(a[3]), int(a[0]):int(a[2])] = True
    mb[int(b[1]):int(b[3]), int(b[0]):int(b[2])] = True
    union = (ma | mb).sum()
    assert faces.box_iou(a, b) == pytest.approx((ma & mb).sum() / union if union else 0.0)


def test_match_boxes_is_greedy_one_to_one_above_the_threshold():
  prev = [np.array([0.0, 0, 10, 10]), np.array([20.0, 0, 30, 10])]
  cur = [np.array([21.0, 0, 31, 10]), np.array([100.0, 0, 110, 10]), np.array([1.0, 0, 11, 10])]
  assert sorted(faces.match_boxes(prev, cur, 0.3)) == [(0, 2), (1, 0)]
  assert faces.match_boxes(prev, [np.array([8.0, 0, 18, 10])], 0.3) == []  # IoU 2/18


def box_detection(x, y, side=100.0, score=0.9):
  kp = np.array([[x + 0.3 * side, y + 0.4 * side], [x + 0.7 * side, y + 0.4 * side], [x + 0.5 * side, y + 0.6 * side],
                 [x + 0.5 * side, y + 0.8 * side], [x + 0.5 * side, y + 0.8 * side]])
  return faces.Detection(np.array([x, y, x + side, y + side]), kp, score, "test")


def test_tracker_ids_smoothing_and_carrying_on_synthetic_detections():
  img = np.zeros((400, 600, 3), np.uint8)
  tr = faces.FaceTracker(size=64, alpha=0.5, max_carry=2)
  frames = [
    [box_detection(10, 10), box_detection(300, 50)],
    [box_detection(300 + 4, 50), box_detection(10 + 4, 10)],  # order swapped: ids follow the boxes
    [box_detection(10 + 8, 10)],                               # face 1 missed: carried
    [box_detection(10 + 12, 10)],                              # carried again
    [box_detection(10 + 16, 10)],                              # 3 misses > max_carry: face 1 ends
    [box_detection(10 + 20, 10), box_detection(300 + 4, 50)],  # the same place again: a new id
  ]
  out = [tr.update(img, f) for f in frames]
  assert [[(f.face_id, f.carried) for f in o] for o in out] == [
    [(0, False), (1, False)], [(0, False), (1, False)], [(0, False), (1, True)], [(0, False), (1, True)],
    [(0, False)], [(0, False), (2, False)]]
  np.testing.assert_array_equal(out[3][1].box, [304.0, 50, 404, 150])  # the last detected box, kept
  # EMA of the crop centre, α = 0.5: raw centre x of face 0 is 60 + 4t (box centre; the keypoints are symmetric).
  raw = faces.crop_params_ffhq(box_detection(10, 10).keypoints)
  cx = [o[0].params[0] - raw[0] for o in out]
  want, ema = [], 0.0
  for t in range(6):
    ema = 4.0 * t if t == 0 else ema + 0.5 * (4.0 * t - ema)
    want.append(ema)
  np.testing.assert_allclose(cx, want, atol=1e-9)
  np.testing.assert_allclose([o[0].params[2] for o in out], raw[2], rtol=1e-12)  # same size throughout
  assert out[2][1].crop.shape == (64, 64, 3) and out[2][1].crop.dtype == np.uint8


def test_smooth_params_angle_takes_the_short_way():
  got = faces.smooth_params(np.array([0.0, 0, 10, np.pi - 0.1]), np.array([0.0, 0, 40, -np.pi + 0.1]), 0.5)
  assert got[3] == pytest.approx(np.pi) and got[2] == pytest.approx(20.0)


# ------------------------------------------------------------------------------------------------ BlazeFace


@pytest.fixture(scope="session")
def models():
  """The real models, fetched once into the user's model cache (downloads the 36 MB wheel the first time)."""
  try:
    return faces.fetch_models()
  except faces.ModelFetchError as e:
    pytest.skip(f"BlazeFace models unavailable (no network to fetch them): {e}")


@pytest.fixture(scope="session")
def detector(models):
  with faces.FaceDetector() as d:
    yield d


@pytest.fixture(scope="session")
def astronaut():
  skimage_data = pytest.importorskip("skimage.data")
  return np.ascontiguousarray(skimage_data.astronaut())


@pytest.fixture(scope="session")
def clean_face(detector, astronaut):
  (face,) = detector.faces(astronaut)
  return face


def draw(image, fn):
  im = Image.fromarray(image.copy())
  fn(ImageDraw.Draw(im))
  return np.asarray(im)


def test_astronaut_detected_and_aligned(clean_face, astronaut):
  f = clean_face
  assert f.model == "full_range" and f.score > 0.8
  assert f.crop.shape == (256, 256, 3) and f.crop.dtype == np.uint8
  x0, y0, x1, y1 = f.box
  for p in (ASTRO_EYE_L, ASTRO_EYE_R, ASTRO_MOUTH):
    assert x0 < p[0] < x1 and y0 < p[1] < y1
  # Keypoints near the hand-placed ones (BlazeFace's eye points sit ~2.5 px below the pupils here).
  assert np.linalg.norm(f.keypoints[0] - ASTRO_EYE_L) < 0.1 * ASTRO_IOD
  assert np.linalg.norm(f.keypoints[1] - ASTRO_EYE_R) < 0.1 * ASTRO_IOD
  assert np.linalg.norm(f.keypoints[3] - ASTRO_MOUTH) < 0.15 * ASTRO_IOD
  # The hand-placed eyes, carried into the crop by its affine, sit on the template: the recipe's square of those
  # same eyes (|e2m| < 1.11·IOD here, so the half side is 2·IOD and the eyes are 64 px apart in 256).
  centre, half, x = ffhq_square(ASTRO_EYE_L, ASTRO_EYE_R, ASTRO_MOUTH)
  template = to_crop([ASTRO_EYE_L, ASTRO_EYE_R], centre, half, x, 256)
  assert abs(template[1, 0] - template[0, 0] - 64) < 0.5
  # Within 10 % of the crop's IOD (64 px), as the keypoints are within 10 % of the image's.
  np.testing.assert_allclose(faces.apply_affine(f.affine, [ASTRO_EYE_L, ASTRO_EYE_R]), template, atol=6.4)
  np.testing.assert_allclose(f.crop_keypoints, faces.apply_affine(f.affine, f.keypoints), atol=1e-9)
  # The crop's pixels are the image's there: a patch around the left pupil matches.
  ex, ey = np.rint(faces.apply_affine(f.affine, ASTRO_EYE_L)).astype(int)
  ix, iy = np.rint(faces.apply_affine(faces.invert_affine(f.affine), [ex, ey])).astype(int)
  s = 256 / (2 * f.params[2])
  patch = np.asarray(Image.fromarray(astronaut[iy - 7:iy + 8, ix - 7:ix + 8]).resize((round(15 * s),) * 2))
  c = patch.shape[0] // 2
  crop_patch = f.crop[ey - c:ey - c + patch.shape[0], ex - c:ex - c + patch.shape[0]]
  assert np.corrcoef(patch[..., 0].ravel(), crop_patch[..., 0].ravel())[0, 1] > 0.8


def test_box_method_and_crop_size(detector, astronaut):
  (f,) = detector.faces(astronaut, size=112, method="box", box_scale=1.5)
  assert f.crop.shape == (112, 112, 3)
  x0, y0, x1, y1 = f.box
  np.testing.assert_allclose(faces.apply_affine(f.affine, [[(x0 + x1) / 2, (y0 + y1) / 2]]), [[55.5, 55.5]])
  assert f.params[2] == pytest.approx(0.75 * max(x1 - x0, y1 - y0)) and f.params[3] == 0


OCCLUDERS = {
  # grey surgical mask from mid-nose to below the chin, cheek to cheek
  "mask": lambda d: d.polygon([(176, 118), (272, 118), (274, 160), (248, 188), (200, 188), (174, 160)],
                              fill=(200, 200, 205)),
  "hand": lambda d: d.ellipse([184, 124, 264, 176], fill=(224, 178, 148)),
  "sunglasses": lambda d: (d.ellipse([186, 91, 220, 114], fill=(10, 10, 10)),
                           d.ellipse([230, 93, 264, 116], fill=(10, 10, 10)),
                           d.line([(218, 102), (232, 104)], fill=(10, 10, 10), width=4)),
  # the upper face, eyes included: the full-range model misses it, the short-range fallback finds it
  "upper": lambda d: d.rectangle([150, 30, 300, 110], fill=(128, 128, 128)),
}


@pytest.mark.parametrize("name", list(OCCLUDERS))
def test_occluded_astronaut_still_detected_with_a_stable_crop(detector, astronaut, clean_face, name):
  got = detector.faces(draw(astronaut, OCCLUDERS[name]))
  assert len(got) == 1, name
  f, c = got[0], clean_face
  side = 2 * c.params[2]
  shift = np.linalg.norm(f.params[:2] - c.params[:2]) / side
  if name == "upper":
    # Eyes hidden: the short-range model guesses them ~20 px too low, so the crop moves ~9 % of its side and
    # shrinks ~23 % (FACES.md §2.6 measured 3–7 % / 7–22 % for its occluders); it still frames the face.
    assert f.model == "short_range" and shift < 0.12 and 0.7 < f.params[2] / c.params[2] < 1.1
  else:
    assert shift < 0.03 and abs(f.params[2] / c.params[2] - 1) < 0.08, (name, shift, f.params, c.params)


def test_two_faces_found_largest_first(detector, astronaut):
  small = np.asarray(Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).resize((384, 384)))
  canvas = np.full((512, 912, 3), 200, np.uint8)
  canvas[:, :512] = astronaut
  canvas[64:448, 520:904] = small
  dets = detector.detect(canvas)
  assert len(dets) == 2
  assert dets[0].box[2] < 512 <= dets[1].box[0]  # the big (left) face first
  # Mirrored and scaled 0.75: the small face's eyes, image-left first, come from the right eye and then the left.
  mirror = lambda p: np.array([520 + (511 - p[0] + 0.5) * 0.75 - 0.5, 64 + (p[1] + 0.5) * 0.75 - 0.5])
  # The full-range model reads the frame at 192 px, so keypoints of faces ~1/9 of the frame wide are coarser
  # (10 px here on the big face, 0.25 IOD) than on the 512² photo alone; still each eye is the right one.
  for det, (el, er) in [(dets[0], (ASTRO_EYE_L, ASTRO_EYE_R)), (dets[1], (mirror(ASTRO_EYE_R), mirror(ASTRO_EYE_L)))]:
    iod = np.linalg.norm(er - el)
    assert np.linalg.norm(det.keypoints[0] - el) < 0.35 * iod and np.linalg.norm(det.keypoints[1] - er) < 0.35 * iod
  with faces.FaceDetector(max_faces=1) as one:
    (only,) = one.detect(canvas)
  np.testing.assert_array_equal(only.box, dets[0].box)


@pytest.mark.parametrize("seed", [0, 1, 3])  # seeds 1 and 3 fool the short-range model (score > 0.6, rolled ~68°)
def test_noise_has_no_face(detector, seed):
  noise = np.random.default_rng(seed).integers(0, 256, (512, 512, 3), dtype=np.uint8)
  assert detector.detect(noise) == [] and detector.faces(noise) == []


def test_local_single_model_file(models, astronaut):
  with faces.FaceDetector(face_model=models["full_range"]) as d:
    (det,) = d.detect(astronaut)
    assert d.detect(draw(astronaut, OCCLUDERS["upper"])) == []  # no fallback with one model
  assert det.model == "face_detection_full_range_sparse.tflite"


def video(astronaut, offsets, canvas=(600, 700)):
  frames = []
  for dx, dy in offsets:
    f = np.full((*canvas, 3), 180, np.uint8)
    f[dy:dy + 512, dx:dx + 512] = astronaut
    frames.append(f)
  return frames


def test_translated_video_keeps_one_id_and_the_crop_follows(detector, astronaut):
  offsets = [(6 * t, 3 * t) for t in range(8)]
  tr = faces.FaceTracker(alpha=0.5)
  out = [tr.update(f, detector.detect(f)) for f in video(astronaut, offsets)]
  assert all(len(o) == 1 and o[0].face_id == 0 and not o[0].carried for o in out)
  raw = np.array([faces.crop_params_ffhq(o[0].keypoints)[:2] for o in out])
  side = 2 * out[0][0].params[2]
  truth = raw[0] + np.array(offsets, float)
  # Detections follow the motion, with a few pixels of jitter as the face slides over the model's anchor grid.
  np.testing.assert_allclose(raw, truth, atol=0.04 * side)
  # The EMA lags a steady motion v by v·(1 − α)/α = v after a few frames.
  np.testing.assert_allclose(truth[-1] - out[-1][0].params[:2], [6.0, 3.0], atol=4.0)


def test_jitter_is_smoothed(detector, astronaut):
  offsets = [(20 + (4 if t % 2 else -4), 20) for t in range(8)]
  tr = faces.FaceTracker(alpha=0.3)
  out = [tr.update(f, detector.detect(f))[0] for f in video(astronaut, offsets)]
  raw = np.array([faces.crop_params_ffhq(f.keypoints)[0] for f in out])
  smooth = np.array([f.params[0] for f in out])
  assert np.std(np.diff(smooth[2:])) < 0.5 * np.std(np.diff(raw[2:]))


def test_occluder_passing_over_keeps_the_id(detector, astronaut):
  frames = video(astronaut, [(40, 30)] * 8)
  for t in (3, 4, 5):  # the whole head hidden: neither model finds a face
    frames[t] = draw(frames[t], lambda d: d.rectangle([180, 60, 350, 245], fill=(128, 128, 128)))
  tr = faces.FaceTracker(max_carry=3)
  out = [tr.update(f, detector.detect(f)) for f in frames]
  assert [[(f.face_id, f.carried) for f in o] for o in out] == [[(0, t in (3, 4, 5))] for t in range(8)]
  np.testing.assert_array_equal(out[5][0].params, out[2][0].params)  # carried crops stay where the face was
  np.testing.assert_array_equal(out[4][0].crop, faces.warp_affine(frames[4], out[2][0].affine))  # this frame's pixels
  tr = faces.FaceTracker(max_carry=2)
  out = [tr.update(f, detector.detect(f)) for f in frames]
  assert [o[0].face_id if o else None for o in out] == [0, 0, 0, 0, 0, None, 1, 1]
