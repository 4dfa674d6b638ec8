"""Faces in the wild: detection, five keypoints, alignment to a canonical crop, and face tracking in video.

Detection is MediaPipe's BlazeFace through the Tasks API (``mediapipe.tasks.python.vision.FaceDetector``, an
optional dependency: ``pip install maejax[faces]``; imported only when a detector is built, since it pulls in cv2
and TensorFlow). Two models form a cascade: the full-range model at score ≥ 0.5 first (it finds several faces,
none in noise, and its keypoints barely move under a mask or a hand); only when it finds nothing, the short-range
model at score ≥ 0.6 and roll ≤ 45° (it recovers sunglasses and upper-face occluders; its detections in noise
score up to ~0.7 but lie rolled by more than 50°).

Model files: mediapipe ≥ 0.10.30 ships none, so :func:`fetch_models` takes the two ``.tflite`` files out of the
``mediapipe==0.10.21`` wheel (downloaded with the running interpreter's ``pip download``, or a local copy of the
wheel), checks their sha256 against :data:`MODEL_FILES` and stores them in the model cache
(``~/.cache/maejax/models``; ``$MAEJAX_MODEL_DIR`` or ``cache_dir=`` override it). ``face_model=PATH`` uses local
files instead (see :func:`resolve_models`); nothing is downloaded at detection time once the cache is filled.

Coordinates are ``(x, y)`` pixels with pixel centres at integers. Keypoints are ``(5, 2)`` in the order of
``maejax.data.occlusion`` landmarks (:data:`KEYPOINT_NAMES`): eye on the image's left, eye on the image's right,
nose tip, then the mouth twice: BlazeFace gives the mouth centre only, and it stands for both corners (exact for
the occluders, which use only the corners' mean).

Alignment (:func:`crop_params`) places an oriented square on the face and :func:`warp_affine` resamples it:

* ``"ffhq"`` (default; LibreFace / FFHQ geometry from the eye centres ``eL, eR`` and the mouth centre ``m``):
  ``e2e = eR − eL``, ``e2m = m − (eL + eR)/2``, face x-axis ``x̂ = normalize(e2e − rot90(e2m))``, half side
  ``max(2.0·|e2e|, 1.8·|e2m|)``, centre ``(eL + eR)/2 + 0.1·e2m``. At 256 px it frames brows to chin; AU models
  read its centre 224.
* ``"eyes"``: the same square from the eyes only (half side ``2·|e2e|``, centre ``0.1·|e2e|`` below the eyes), for
  when the mouth keypoint is not trusted.
* ``"box"``: an upright square around the detector's box, side ``box_scale`` × its larger side.

Each :class:`Face` carries its crop, the 2×3 affine image → crop, keypoints in both frames, box and score.
:class:`FaceTracker` follows faces through a video: ids by box IoU, crop parameters smoothed by an EMA, and a lost
face carried for a bounded number of frames, flagged ``carried``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image

KEYPOINT_NAMES = ("eye_l", "eye_r", "nose", "mouth_l", "mouth_r")
METHODS = ("ffhq", "eyes", "box")


@dataclasses.dataclass(frozen=True)
class ModelFile:
  """A BlazeFace model inside the mediapipe wheel: ``member`` (path in the wheel) and its ``sha256``."""

  member: str
  sha256: str

  @property
  def filename(self) -> str:
    return os.path.basename(self.member)


# Byte-identical in the cp311 and cp312 wheels of mediapipe 0.10.21 (../shared/FACES.md §2.2).
MODEL_FILES = {
  "full_range": ModelFile("mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
                          "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1"),
  "short_range": ModelFile("mediapipe/modules/face_detection/face_detection_short_range.tflite",
                           "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8"),
}
MODEL_WHEEL = "mediapipe==0.10.21"
# Fixed tags make `pip download` fetch the same wheel from any host (the models are the same in every platform's).
MODEL_WHEEL_TAGS = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                    "--platform", "manylinux_2_28_x86_64")
DEFAULT_MODEL_DIR = "~/.cache/maejax/models"
# Cascade thresholds (FACES.md §2.5, §3.6): full-range at 0.5; short-range only when full-range finds nothing.
MIN_SCORE = {"full_range": 0.5, "short_range": 0.6}
# Short-range detections on pure noise come with the eye axis rolled −54° … −75° (uniform noise, 12 images: scores
# up to 0.69, 2 of 12 above 0.6); occluded real faces it recovers are near upright. Its detections rolled more than
# this are dropped.
MAX_ROLL_DEG = {"short_range": 45.0}


class ModelFetchError(RuntimeError):
  """The model wheel could not be downloaded (no network, no pip)."""


# ------------------------------------------------------------------------------------------------ model files


def model_dir(cache_dir: str | None = None) -> str:
  """The model cache: ``cache_dir``, else ``$MAEJAX_MODEL_DIR``, else ``~/.cache/maejax/models``."""
  return os.path.abspath(os.path.expanduser(cache_dir or os.environ.get("MAEJAX_MODEL_DIR") or DEFAULT_MODEL_DIR))


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _check_sha(name: str, got: str, want: str) -> None:
  if got != want:
    raise ValueError(f"{name}: sha256 {got} does not match the expected {want}")


def verify_model(path: str, kind: str) -> str:
  """``path`` when its sha256 is the one of the ``kind`` model (``"full_range"`` / ``"short_range"``);
  ``ValueError`` naming the file and both hashes otherwise."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such model file (expected {MODEL_FILES[kind].filename})")
  _check_sha(path, sha256_file(path), MODEL_FILES[kind].sha256)
  return path


def extract_models(wheel: str, cache_dir: str | None = None) -> dict[str, str]:
  """Copies both models out of the mediapipe 0.10.21 wheel (a zip) into the cache, each checked by sha256 before it
  is written. Returns ``{kind: path}``."""
  out_dir = model_dir(cache_dir)
  os.makedirs(out_dir, exist_ok=True)
  out = {}
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for kind, mf in MODEL_FILES.items():
      if mf.member not in names:
        raise ValueError(f"{wheel}: has no {mf.member} (expected the {MODEL_WHEEL} wheel)")
      data = z.read(mf.member)
      _check_sha(f"{wheel}:{mf.member}", sha256_bytes(data), mf.sha256)
      path = os.path.join(out_dir, mf.filename)
      fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=mf.filename + ".")
      with os.fdopen(fd, "wb") as f:
        f.write(data)
      os.replace(tmp, path)  # atomic: a cached file is either absent or whole
      out[kind] = path
  return out


def download_wheel(dest: str, cache_dir: str | None = None) -> str:
  """Downloads the ``mediapipe==0.10.21`` wheel into ``dest`` with this interpreter's pip; returns its path.
  ``cache_dir`` is only named in the error message, as where the model files can be put by hand."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *MODEL_WHEEL_TAGS,
         "--disable-pip-version-check", "--quiet", MODEL_WHEEL, "-d", dest]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True)
  except OSError as e:
    p = subprocess.CompletedProcess(cmd, 1, "", str(e))
  wheels = [f for f in os.listdir(dest) if f.endswith(".whl")] if os.path.isdir(dest) else []
  if p.returncode != 0 or not wheels:
    errors = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
    why = next((ln for ln in reversed(errors) if "error" in ln.lower()), errors[-1] if errors else "no wheel saved")
    raise ModelFetchError(
      f"could not download {MODEL_WHEEL} to extract the face detector models ({why}); pass face_model=PATH (a "
      f"directory holding {' and '.join(m.filename for m in MODEL_FILES.values())}, the {MODEL_WHEEL} wheel, or "
      f"one .tflite face detector) or put those two files into {model_dir(cache_dir)}")
  return os.path.join(dest, wheels[0])


@contextlib.contextmanager
def _locked(directory: str):
  """An exclusive ``flock`` on ``directory/.fetch.lock``, so concurrent processes download the wheel once."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ".fetch.lock"), "w") as f:
    try:
      import fcntl
      fcntl.flock(f, fcntl.LOCK_EX)
    except ImportError:  # no flock (Windows): concurrent fetches still write atomically
      pass
    yield


def fetch_models(cache_dir: str | None = None, wheel: str | None = None) -> dict[str, str]:
  """``{"full_range": path, "short_range": path}`` in the model cache, verified by sha256. Missing files are
  extracted from ``wheel`` (a local mediapipe 0.10.21 wheel) or from one downloaded with pip
  (:class:`ModelFetchError` when that fails). A cached file with the wrong sha256 is a ``ValueError`` (delete it
  to fetch it again)."""
  out_dir = model_dir(cache_dir)
  with _locked(out_dir):
    paths = {kind: os.path.join(out_dir, mf.filename) for kind, mf in MODEL_FILES.items()}
    if not all(os.path.isfile(p) for p in paths.values()):
      if wheel is not None:
        extract_models(wheel, out_dir)
      else:
        with tempfile.TemporaryDirectory(prefix="maejax_wheel_") as tmp:
          extract_models(download_wheel(tmp, out_dir), out_dir)
    return {kind: verify_model(p, kind) for kind, p in paths.items()}


def resolve_models(face_model: str | None = None, cache_dir: str | None = None) -> list[tuple[str, str]]:
  """The detector cascade as ``[(name, model path), ...]``, tried in order.

  ``face_model``: ``None`` → both cached models (fetched on first use); a directory → the two model files in it,
  checked by sha256; a ``.whl`` → the models extracted from that mediapipe 0.10.21 wheel into the cache; any other
  file → that one ``.tflite`` alone (any BlazeFace-style model with Tasks metadata; not checked), named by its
  file name and thresholded at 0.5."""
  if face_model is None:
    return list(fetch_models(cache_dir).items())
  path = os.path.abspath(os.path.expanduser(face_model))
  if os.path.isdir(path):
    return [(kind, verify_model(os.path.join(path, mf.filename), kind)) for kind, mf in MODEL_FILES.items()]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"face_model={face_model}: no such file or directory")
  if path.endswith(".whl"):
    return list(fetch_models(cache_dir, wheel=path).items())
  return [(os.path.basename(path), path)]


# ------------------------------------------------------------------------------------------------ geometry


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected face. ``box``: (4,) x0, y0, x1, y1; ``keypoints``: (5, 2) in :data:`KEYPOINT_NAMES` order;
  ``score``: the detector's; ``model``: the cascade stage that found it."""

  box: np.ndarray
  keypoints: np.ndarray
  score: float
  model: str


@dataclasses.dataclass(frozen=True)
class Face:
  """An aligned face. ``crop``: (S, S, 3) uint8; ``affine``: (2, 3) image → crop, ``crop_xy = A @ (x, y, 1)``;
  ``params``: (4,) the crop square ``(cx, cy, half side, angle of the face x-axis in radians)`` in the image;
  ``keypoints`` / ``crop_keypoints``: (5, 2) in the image / crop; ``box``: (4,) x0, y0, x1, y1 in the image.
  From a tracker: ``face_id`` (≥ 0; -1 otherwise) and ``carried`` (True when the detector missed this face in this
  frame and the last box, keypoints and score were kept)."""

  crop: np.ndarray
  affine: np.ndarray
  params: np.ndarray
  keypoints: np.ndarray
  crop_keypoints: np.ndarray
  box: np.ndarray
  score: float
  model: str
  face_id: int = -1
  carried: bool = False


def _rot90(v: np.ndarray) -> np.ndarray:
  """``v`` turned +90° in image coordinates (y down): (x, y) → (−y, x); the eye axis turns into "down"."""
  return np.array([-v[1], v[0]])


def crop_params_ffhq(keypoints: np.ndarray) -> np.ndarray:
  """(4,) ``(cx, cy, half, angle)``: the FFHQ / LibreFace square from the eye centres and the mouth centre (the mean
  of the two mouth keypoints)."""
  kp = np.asarray(keypoints, np.float64)
  eye_l, eye_r, mouth = kp[0], kp[1], kp[3:5].mean(0)
  eye_avg = (eye_l + eye_r) / 2
  e2e, e2m = eye_r - eye_l, mouth - eye_avg
  x = e2e - _rot90(e2m)
  half = max(2.0 * np.linalg.norm(e2e), 1.8 * np.linalg.norm(e2m))
  c = eye_avg + 0.1 * e2m
  return np.array([c[0], c[1], half, np.arctan2(x[1], x[0])])


def crop_params_eyes(keypoints: np.ndarray) -> np.ndarray:
  """(4,) the mouth-free square: half side ``2·IOD``, centre ``0.1·IOD`` below the eye midpoint, eye-axis angle."""
  kp = np.asarray(keypoints, np.float64)
  e2e = kp[1] - kp[0]
  iod = np.linalg.norm(e2e)
  c = (kp[0] + kp[1]) / 2 + 0.1 * _rot90(e2e)
  return np.array([c[0], c[1], 2.0 * iod, np.arctan2(e2e[1], e2e[0])])


def crop_params_box(box: np.ndarray, scale: float = 1.4) -> np.ndarray:
  """(4,) an upright square on the box centre, side ``scale`` × the box's larger side."""
  x0, y0, x1, y1 = np.asarray(box, np.float64)
  return np.array([(x0 + x1) / 2, (y0 + y1) / 2, scale * max(x1 - x0, y1 - y0) / 2, 0.0])


def crop_params(det: Detection, method: str = "ffhq", box_scale: float = 1.4) -> np.ndarray:
  """(4,) crop square of a detection by ``method`` (one of :data:`METHODS`)."""
  if method == "ffhq":
    return crop_params_ffhq(det.keypoints)
  if method == "eyes":
    return crop_params_eyes(det.keypoints)
  if method == "box":
    return crop_params_box(det.box, box_scale)
  raise ValueError(f"method={method!r}: expected one of {METHODS}")


def params_to_affine(params: np.ndarray, size: int = 256) -> np.ndarray:
  """(2, 3) image → crop: the square ``(cx, cy, half, angle)`` onto ``[−0.5, size − 0.5]²``, its x-axis along the
  crop's rows, its centre on the crop's centre ``(size − 1)/2``."""
  cx, cy, half, angle = (float(v) for v in params)
  s = size / (2 * half)
  cos, sin = np.cos(angle), np.sin(angle)
  m = s * np.array([[cos, sin], [-sin, cos]])
  t = (size - 1) / 2 - m @ np.array([cx, cy])
  return np.concatenate([m, t[:, None]], 1)


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
  """(..., 2) points mapped by a (2, 3) affine."""
  p = np.asarray(points, np.float64)
  return p @ affine[:, :2].T + affine[:, 2]


def invert_affine(affine: np.ndarray) -> np.ndarray:
  m_inv = np.linalg.inv(affine[:, :2])
  return np.concatenate([m_inv, (-m_inv @ affine[:, 2])[:, None]], 1)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  img = np.asarray(image)
  if img.dtype != np.uint8:
    raise ValueError(f"image: expected uint8 (H, W, 3) RGB, got dtype {img.dtype}")
  if img.ndim == 2:
    img = np.repeat(img[:, :, None], 3, 2)
  if img.ndim != 3 or img.shape[2] not in (3, 4) or min(img.shape[:2]) < 1:
    raise ValueError(f"image: expected uint8 (H, W, 3) RGB, got shape {img.shape}")
  return np.ascontiguousarray(img[:, :, :3])


def warp_affine(image: np.ndarray, affine: np.ndarray, size: int = 256) -> np.ndarray:
  """(size, size, 3) uint8 crop: bilinear samples of ``image`` at ``affine⁻¹`` of each crop pixel, the image's edge
  pixels repeated outside it (values truncated to integers, as PIL does). When the crop shrinks the face by ≥ 2×,
  the region is first box-averaged by that integer factor (antialiasing), then sampled."""
  img = _as_rgb(image)
  h, w = img.shape[:2]
  inv = invert_affine(affine)
  lo, hi = -0.5, size - 0.5
  corners = apply_affine(inv, np.array([[lo, lo], [hi, lo], [lo, hi], [hi, hi]]))
  # The image part under the crop, edge-padded to cover all of it: every bilinear sample then lies inside.
  bx0, by0 = (int(v) - 2 for v in np.floor(corners.min(0)))
  bx1, by1 = (int(v) + 3 for v in np.ceil(corners.max(0)))
  x0, y0 = min(max(bx0, 0), w - 1), min(max(by0, 0), h - 1)
  x1, y1 = max(min(bx1, w), x0 + 1), max(min(by1, h), y0 + 1)
  region = np.pad(img[y0:y1, x0:x1], ((y0 - min(by0, y0), max(by1, y1) - y1), (x0 - min(bx0, x0), max(bx1, x1) - x1),
                                      (0, 0)), mode="edge")
  offset, step = np.array([min(bx0, x0), min(by0, y0)], np.float64), 1.0  # image coordinates of region pixel (0, 0)
  k = int(np.floor(1 / np.sqrt(abs(np.linalg.det(affine[:, :2])))))
  pil = Image.fromarray(region)
  if k >= 2 and min(region.shape[:2]) >= k:
    pil = pil.reduce(k)  # reduced pixel j averages region pixels k·j … k·j + k − 1: its centre is k·j + (k − 1)/2
    offset, step = offset + (k - 1) / 2, float(k)
  # crop pixel (u, v) → region (x, y) = (inv · (u, v, 1) − offset) / step. PIL samples pixel centres at +0.5 on both
  # sides, so its coefficients take that shift.
  m = inv[:, :2] / step
  t = (inv[:, 2] - offset) / step + 0.5 - 0.5 * m.sum(1)
  coeffs = (m[0, 0], m[0, 1], t[0], m[1, 0], m[1, 1], t[1])
  return np.asarray(pil.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR))


def align_with_params(image: np.ndarray, det: Detection, params: np.ndarray, size: int = 256, face_id: int = -1,
                      carried: bool = False) -> Face:
  """The :class:`Face` of ``det`` cropped on the square ``params``."""
  affine = params_to_affine(params, size)
  return Face(crop=warp_affine(image, affine, size), affine=affine, params=np.asarray(params, np.float64),
              keypoints=det.keypoints, crop_keypoints=apply_affine(affine, det.keypoints), box=det.box,
              score=det.score, model=det.model, face_id=face_id, carried=carried)


def align(image: np.ndarray, det: Detection, size: int = 256, method: str = "ffhq", box_scale: float = 1.4) -> Face:
  """``det`` aligned to a ``size``-px crop by ``method`` (see the module docstring)."""
  return align_with_params(image, det, crop_params(det, method, box_scale), size)


# ------------------------------------------------------------------------------------------------ detector


@contextlib.contextmanager
def _native_stderr_to_log():
  """Sends what native code writes to file descriptor 2 (mediapipe / LiteRT / glog start-up and shut-down INFO
  lines, tens per detector) to the absl log at DEBUG instead of the console; on an exception it goes back to
  stderr, so a failure keeps its native message."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    failed = False
    try:
      yield
    except BaseException:
      failed = True
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      text = tmp.read().decode(errors="replace")
      if text and failed:
        sys.stderr.write(text)
      elif text:
        logging.debug("mediapipe native log:\n%s", text)


def _import_mediapipe():
  try:
    import mediapipe
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions
  except ImportError as e:
    if "libGL" in str(e) or "libgthread" in str(e):
      raise ImportError(f"mediapipe imports cv2, which needs system libraries ({e}): install libgl1 / libglib2.0-0, "
                        "or replace opencv-contrib-python by opencv-contrib-python-headless of the same version") from e
    raise ImportError(f"face detection needs mediapipe ({e}): pip install 'maejax[faces]'") from e
  return mediapipe, vision, BaseOptions


def detections_from_result(result, width: int, height: int, model: str) -> list[Detection]:
  """:class:`Detection` s from a mediapipe ``FaceDetectorResult`` (keypoints normalised to [0, 1], in BlazeFace's
  order: eye on the image's left, the other eye, nose tip, mouth centre, two ear tragions)."""
  out = []
  for d in result.detections:
    b = d.bounding_box
    box = np.array([b.origin_x, b.origin_y, b.origin_x + b.width, b.origin_y + b.height], np.float64)
    kp = np.array([[k.x * width, k.y * height] for k in d.keypoints[:4]], np.float64)
    out.append(Detection(box=box, keypoints=kp[[0, 1, 2, 3, 3]], score=float(d.categories[0].score), model=model))
  return out


def roll(keypoints: np.ndarray) -> float:
  """Angle of the eye axis (image-left eye → image-right eye) in radians; 0 upright, positive clockwise on screen."""
  e = np.asarray(keypoints, np.float64)[1] - np.asarray(keypoints, np.float64)[0]
  return float(np.arctan2(e[1], e[0]))


def _area(det: Detection) -> float:
  return float((det.box[2] - det.box[0]) * (det.box[3] - det.box[1]))


class FaceDetector:
  """MediaPipe BlazeFace detectors of the cascade (:func:`resolve_models`), in IMAGE mode (stateless).

  ``detect(image)`` → detections, largest box first, at most ``max_faces`` (None: all); ``faces(image)`` → aligned
  :class:`Face` s. Close it (or use ``with``): mediapipe's own cleanup of an open detector at interpreter exit
  prints tracebacks, since its worker threads are gone by then."""

  def __init__(self, face_model: str | None = None, cache_dir: str | None = None, max_faces: int | None = None,
               min_score: float | None = None, suppression: float = 0.3):
    if max_faces is not None and max_faces < 1:
      raise ValueError(f"max_faces={max_faces}: expected ≥ 1 or None")
    self.models = resolve_models(face_model, cache_dir)
    self.max_faces = max_faces
    self._stages = []
    with _native_stderr_to_log():
      self._mp, vision, base_options = _import_mediapipe()
      for name, path in self.models:
        score = min_score if min_score is not None else MIN_SCORE.get(name, 0.5)
        opts = vision.FaceDetectorOptions(base_options=base_options(model_asset_path=path),
                                          running_mode=vision.RunningMode.IMAGE, min_detection_confidence=score,
                                          min_suppression_threshold=suppression)
        self._stages.append((name, vision.FaceDetector.create_from_options(opts)))

  def detect(self, image: np.ndarray) -> list[Detection]:
    if not self._stages:
      raise ValueError("FaceDetector.detect: the detector is closed")
    img = _as_rgb(image)
    h, w = img.shape[:2]
    mp_image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=img)
    dets = []
    for name, detector in self._stages:
      dets = detections_from_result(detector.detect(mp_image), w, h, name)
      if name in MAX_ROLL_DEG:
        dets = [d for d in dets if abs(np.degrees(roll(d.keypoints))) <= MAX_ROLL_DEG[name]]
      if dets:
        break
    dets.sort(key=_area, reverse=True)
    return dets[:self.max_faces] if self.max_faces else dets

  def faces(self, image: np.ndarray, size: int = 256, method: str = "ffhq", box_scale: float = 1.4) -> list[Face]:
    return [align(image, d, size, method, box_scale) for d in self.detect(image)]

  def close(self) -> None:
    with _native_stderr_to_log():
      while self._stages:
        self._stages.pop()[1].close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------------------------------------ tracking


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
  """Intersection over union of two (4,) x0, y0, x1, y1 boxes."""
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def match_boxes(prev: Sequence[np.ndarray], cur: Sequence[np.ndarray], threshold: float = 0.3
                ) -> list[tuple[int, int]]:
  """Greedy one-to-one matching, highest IoU first: ``[(i in prev, j in cur), ...]`` with IoU ≥ ``threshold``."""
  pairs = sorted(((box_iou(p, c), i, j) for i, p in enumerate(prev) for j, c in enumerate(cur)), reverse=True)
  used_i, used_j, out = set(), set(), []
  for iou, i, j in pairs:
    if iou < threshold:
      break
    if i not in used_i and j not in used_j:
      used_i.add(i)
      used_j.add(j)
      out.append((i, j))
  return out


def smooth_params(prev: np.ndarray, new: np.ndarray, alpha: float) -> np.ndarray:
  """EMA of crop squares: ``alpha`` weighs the new one; the half side is averaged in log space and the angle along
  the shorter arc."""
  d_angle = (new[3] - prev[3] + np.pi) % (2 * np.pi) - np.pi
  return np.array([prev[0] + alpha * (new[0] - prev[0]), prev[1] + alpha * (new[1] - prev[1]),
                   prev[2] * (new[2] / prev[2]) ** alpha, prev[3] + alpha * d_angle])


@dataclasses.dataclass
class _Track:
  face_id: int
  det: Detection
  params: np.ndarray
  missed: int = 0


class FaceTracker:
  """Faces followed through the frames of one video, fed one frame's detections at a time.

  * ids: a detection continues the track whose last detected box overlaps it most (greedy, IoU ≥
    ``iou_threshold``); any other detection starts a new id. Ids are never re-used, and a face is not
    re-identified once its track has ended.
  * smoothing: the crop square ``(cx, cy, half, angle)`` is an EMA with weight ``alpha`` on the new frame
    (``alpha=1``: no smoothing).
  * carrying: a track whose face is not detected keeps its last box, keypoints, score and crop square for up to
    ``max_carry`` frames, returned with ``carried=True``; the crop is cut from the current frame. Then it ends.
  """

  def __init__(self, size: int = 256, method: str = "ffhq", box_scale: float = 1.4, iou_threshold: float = 0.3,
               alpha: float = 0.5, max_carry: int = 5):
    if method not in METHODS:
      raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if not 0 < alpha <= 1:
      raise ValueError(f"alpha={alpha}: expected 0 < alpha ≤ 1")
    if max_carry < 0:
      raise ValueError(f"max_carry={max_carry}: expected ≥ 0")
    self.size, self.method, self.box_scale = size, method, box_scale
    self.iou_threshold, self.alpha, self.max_carry = iou_threshold, alpha, max_carry
    self.reset()

  def reset(self) -> None:
    self._tracks: list[_Track] = []
    self._next_id = 0

  def update(self, image: np.ndarray, detections: Sequence[Detection]) -> list[Face]:
    """The faces of this frame (detected and carried), by ``face_id``."""
    matches = match_boxes([t.det.box for t in self._tracks], [d.box for d in detections], self.iou_threshold)
    matched_tracks = {i for i, _ in matches}
    matched_dets = {j for _, j in matches}
    for i, j in matches:
      t, det = self._tracks[i], detections[j]
      t.params = smooth_params(t.params, crop_params(det, self.method, self.box_scale), self.alpha)
      t.det, t.missed = det, 0
    kept = []
    for i, t in enumerate(self._tracks):
      if i not in matched_tracks:
        t.missed += 1
      if t.missed <= self.max_carry:
        kept.append(t)
    for j, det in enumerate(detections):
      if j not in matched_dets:
        kept.append(_Track(self._next_id, det, crop_params(det, self.method, self.box_scale)))
        self._next_id += 1
    self._tracks = sorted(kept, key=lambda t: t.face_id)
    return [align_with_params(image, t.det, t.params, self.size, t.face_id, t.missed > 0) for t in self._tracks]


# ------------------------------------------------------------------------------------------------ datasets


class FrameAligner:
  """The largest face of a dataset frame, detected and aligned: what the BP4D / DISFA builders use with
  ``align="detect"``. Detections are plain dicts (``box`` (4,), ``keypoints`` (5, 2) in :data:`KEYPOINT_NAMES`
  order, ``score``, ``model``) so the builders can cache them as JSON; ``signature`` names the models and the
  crop method, so a cache made by other models is not reused."""

  def __init__(self, face_model: str | None = None, cache_dir: str | None = None, method: str = "ffhq"):
    if method not in METHODS:
      raise ValueError(f"method={method!r}: expected one of {METHODS}")
    self.detector = FaceDetector(face_model, cache_dir, max_faces=1)
    self.method = method
    models = ",".join(f"{name}:{sha256_file(path)[:16]}" for name, path in self.detector.models)
    self.signature = f"blazeface[{models}]/{method}"

  def detect(self, image: np.ndarray) -> dict | None:
    """The largest face of ``image`` as a JSON-ready dict, or None when there is none."""
    dets = self.detector.detect(image)
    if not dets:
      return None
    d = dets[0]
    return {"box": d.box.tolist(), "keypoints": d.keypoints.tolist(), "score": d.score, "model": d.model}

  def crop(self, image: np.ndarray, detection: dict, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``(crop (size, size, 3) uint8, keypoints (5, 2) float32 in the crop)`` of a :meth:`detect` result."""
    det = Detection(box=np.asarray(detection["box"], np.float64),
                    keypoints=np.asarray(detection["keypoints"], np.float64), score=float(detection["score"]),
                    model=str(detection["model"]))
    face = align(image, det, size, self.method)
    return face.crop, face.crop_keypoints.astype(np.float32)

  def close(self) -> None:
    self.detector.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
