"""AU predictions for faces in images, folders of images and videos, from a trained AU workdir.

``python -m maejax.predict --checkpoint=WORKDIR --input=PATH --output=preds.csv [--model=kd] [--faces=detect]
[--max_faces=1] [--overlay=out.mp4] [--batch_size=32]``

* ``WORKDIR``: an ``au_occl`` workdir (``--model=teacher`` → ``teacher/stage2``, ``--model=NAME`` →
  ``students/NAME``; default: the ``kd`` student when there is one, else the teacher), an ``au_finetune`` workdir
  (its ``stage2`` teacher) or one model's directory (holding ``checkpoints/``).
* ``PATH``: an image, a video (decoded with PyAV) or a folder of them (searched recursively, sorted).
* ``--faces=detect`` (default): every image / frame goes through :mod:`maejax.faces`: BlazeFace detection (the
  ``faces`` extra; model files from the cache or ``--face_model=PATH``), the FFHQ-style square at
  :data:`ALIGN_SIZE` px, and :func:`model_input` (its centre :data:`MODEL_VIEW` px, resized to the model's input).
  At most ``--max_faces`` faces per frame, the largest first. In a video, faces keep their id from frame to frame
  by box overlap (:class:`maejax.faces.FaceTracker`), the crop square is smoothed over the last frames, and a face
  the detector loses (a hand passing over it) is carried at its last box for up to ``max_carry`` frames.
  ``--faces=aligned``: the input already is a face crop; it is only resized to the model's input.
* The CSV has one row per frame per face, OpenFace-style: ``file``, ``frame`` (1-based; 1 for a still image),
  ``face_id`` (-1: no face), ``timestamp`` (seconds, videos only), ``confidence`` (the detector's score),
  ``success`` (1: AU values follow), ``carried`` (1: the detector missed this face here; its last box was
  used), the box ``face_x0, face_y0, face_x1, face_y1`` and the keypoints ``eye_l_x … mouth_y`` in input pixels,
  then ``AU01_p`` … (probability) and ``AU01_c`` … (occurrence, probability ≥ 0.5). A frame without a face gets
  one row with ``success=0`` and empty AU cells.
* ``--overlay=PATH`` draws each face's box, id and top AU probabilities on the input (``out.png`` for one image,
  ``out.mp4`` for one video, a folder for several inputs); with ``--drop=pred`` the dropped patches are shaded.
* An unreadable file stops the run naming it, unless ``--skip_bad``: then it is skipped and listed in a summary.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from maejax import au_infer, faces
from maejax.au_infer import LoadedAUModel
from maejax.data.images import IMAGE_EXTS, VIDEO_EXTS

THRESHOLD = 0.5  # the AU head's probabilities are thresholded at 0.5 (DESIGN §4), as in training and F1
FACES_MODES = ("detect", "aligned")
ALIGN_SIZE = 256  # side of the aligned FFHQ-style square (the datasets' crop size)
# The model reads the centre MODEL_VIEW / ALIGN_SIZE of the aligned crop: all of it, because the AU pipelines train
# and evaluate on the whole prepared record (the same aligned square) resized to the model's input; training's
# random shift of up to S/14 stands in for ME-GraphAU's random 224-of-256 crop.
MODEL_VIEW = 256
SMOOTH_ALPHA = 0.5  # EMA weight of the newest frame's crop square in video (FaceTracker)
MAX_CARRY = 5  # frames a lost face is carried at its last box (0.2 s at 25 frames/s)
# BlazeFace gives the mouth centre only: faces' rows mouth_l / mouth_r are the same point, written once.
KEYPOINT_COLUMNS = ("eye_l", "eye_r", "nose", "mouth")
TOP_AUS = 3  # AU probabilities drawn per face on an overlay


def load_au_model(workdir: str, model: str = "", aus: Sequence[int] | None = None) -> LoadedAUModel:
  """``--checkpoint`` / ``--model`` / ``--aus`` → the restored model (:func:`maejax.au_infer.load`)."""
  return au_infer.load(workdir, model, aus)


# ------------------------------------------------------------------------------------- crop → model input


def _view_box(crop_size: int) -> tuple[float, float, float, float]:
  """The centre square of an aligned crop that the model reads, as a PIL box (left, top, right, bottom)."""
  side = crop_size * MODEL_VIEW / ALIGN_SIZE
  lo = (crop_size - side) / 2
  return lo, lo, lo + side, lo + side


def model_input(crop: np.ndarray, size: int) -> np.ndarray:
  """(size, size, 3) uint8: what the AU model reads of an aligned ``crop`` (S, S, 3): its centre
  ``S · MODEL_VIEW / ALIGN_SIZE`` square, resized to the model's ``size`` (bicubic, as the evaluation pipeline)."""
  s = crop.shape[0]
  lo = round(_view_box(s)[0])
  view = np.asarray(crop, np.uint8)[lo:s - lo, lo:s - lo]
  if view.shape[0] == size:
    return np.ascontiguousarray(view)
  return np.asarray(Image.fromarray(view).resize((size, size), Image.BICUBIC), np.uint8)


def input_to_crop(size: int, crop_size: int = ALIGN_SIZE) -> np.ndarray:
  """(2, 3) affine from model-input pixels to aligned-crop pixels (pixel centres at integers), the inverse of
  :func:`model_input`'s geometry."""
  lo = round(_view_box(crop_size)[0])
  x0, s = float(lo), (crop_size - 2 * lo) / size
  return np.array([[s, 0, x0 + 0.5 * s - 0.5], [0, s, x0 + 0.5 * s - 0.5]])


# -------------------------------------------------------------------------------------------- the input


@dataclasses.dataclass
class Item:
  """One image or video frame: ``image`` uint8 (H, W, 3) (``--faces=detect``: as decoded; ``aligned``: resized
  to the model), or ``error`` when unreadable."""

  file: str
  frame: int
  timestamp: float | None = None
  image: np.ndarray | None = None
  error: str | None = None


def list_inputs(path: str) -> list[str]:
  """The image / video files of ``path`` (a file, or a folder searched recursively), sorted."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input: no file or folder {path}")
  out = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)]
  if not out:
    raise FileNotFoundError(f"--input: no images ({', '.join(IMAGE_EXTS)}) or videos "
                            f"({', '.join(VIDEO_EXTS)}) in {path}")
  return out


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTS)


def _resize(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """RGB uint8 ``(size, size, 3)``: a plain resize (bicubic, as the evaluation pipeline), no crop."""
  im = image if isinstance(image, Image.Image) else Image.fromarray(image)
  im = im.convert("RGB")
  if im.size != (size, size):
    im = im.resize((size, size), Image.BICUBIC)
  return np.asarray(im, np.uint8)


def _rgb(image: Image.Image) -> np.ndarray:
  return np.asarray(image.convert("RGB"), np.uint8)


def read_items(files: Sequence[str], size: int | None) -> Iterator[Item]:
  """Yields every image and every video frame of ``files``, resized to ``size`` (None: as decoded); an
  unreadable file yields one ``Item`` with ``error`` set (a video that fails midway keeps the frames decoded
  before the failure)."""
  for path in files:
    if is_video(path):
      yield from _video_items(path, size)
      continue
    try:
      with Image.open(path) as im:
        image = _rgb(im) if size is None else _resize(im, size)
    except Exception as e:  # noqa: BLE001 -- any decoder error means "unreadable"; reported with the path
      yield Item(path, 1, error=f"{type(e).__name__}: {e}")
      continue
    yield Item(path, 1, image=image)


def _video_items(path: str, size: int | None) -> Iterator[Item]:
  import av

  n = 0
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      for frame in container.decode(video=0):
        n += 1
        t = None if frame.time is None else float(frame.time)
        image = frame.to_ndarray(format="rgb24") if size is None else _resize(frame.to_image(), size)
        yield Item(path, n, t, image)
  except Exception as e:  # noqa: BLE001
    yield Item(path, n + 1, error=f"{type(e).__name__} after {n} frame(s): {e}")
    return
  if n == 0:
    yield Item(path, 1, error="no frames decoded")


def count_frames(files: Sequence[str]) -> int | None:
  """Images + video frames as the containers declare them (for the progress bar); None when unknown."""
  import av
  total = 0
  for path in files:
    if not is_video(path):
      total += 1
      continue
    try:
      with av.open(path) as c:
        n = c.streams.video[0].frames if c.streams.video else 0
    except Exception:  # noqa: BLE001 -- reported when it is decoded
      n = 0
    if not n:
      return None
    total += n
  return total


def video_rate(path: str) -> float:
  """Frames per second of a video's first stream (25 when the container does not say)."""
  import av
  try:
    with av.open(path) as c:
      rate = c.streams.video[0].average_rate
    return float(rate) if rate else 25.0
  except Exception:  # noqa: BLE001 -- the decoder reports unreadable files
    return 25.0


# ------------------------------------------------------------------------------------------------ faces


@dataclasses.dataclass
class Slot:
  """One CSV row of a frame: a face (None: no face found, or ``--faces=aligned``), its model input ``x``
  (None: no face), then ``probs`` (N,) once predicted and ``dropped`` (L,) bool, the patches ``--drop=pred``
  dropped (drawn on overlays only)."""

  face: faces.Face | None
  x: np.ndarray | None
  face_id: int
  probs: np.ndarray | None = None
  dropped: np.ndarray | None = None


@dataclasses.dataclass
class Frame:
  """A decoded frame waiting for its faces' predictions; ``image`` is kept only when an overlay is drawn."""

  item: Item
  slots: list[Slot]
  image: np.ndarray | None = None

  @property
  def ready(self) -> bool:
    return all(s.x is None or s.probs is not None for s in self.slots)


class FaceFinder:
  """``--faces=detect``: the faces of each frame, at most ``max_faces``, aligned at :data:`ALIGN_SIZE`. Still
  images: ids 0, 1, … by decreasing box area. Videos: one :class:`maejax.faces.FaceTracker` per file (ids by box
  overlap, smoothed crop, lost faces carried ``max_carry`` frames); when more tracks than ``max_faces`` remain,
  detected faces come before carried ones, larger before smaller. ``timings`` adds up seconds per stage."""

  def __init__(self, detector: faces.FaceDetector, max_faces: int = 1, max_carry: int = MAX_CARRY):
    if max_faces < 1:
      raise ValueError(f"--max_faces must be ≥ 1, got {max_faces}")
    self.detector, self.max_faces, self.max_carry = detector, max_faces, max_carry
    self.timings = {"detect": 0.0, "align": 0.0}
    self._file: str | None = None
    self._tracker: faces.FaceTracker | None = None

  def __call__(self, item: Item) -> list[faces.Face]:
    if item.file != self._file:
      self._file = item.file
      self._tracker = (faces.FaceTracker(ALIGN_SIZE, alpha=SMOOTH_ALPHA, max_carry=self.max_carry)
                       if is_video(item.file) else None)
    t0 = time.perf_counter()
    dets = self.detector.detect(item.image)[:self.max_faces]
    t1 = time.perf_counter()
    if self._tracker is None:
      found = [dataclasses.replace(faces.align(item.image, d, ALIGN_SIZE), face_id=i) for i, d in enumerate(dets)]
    else:
      found = self._tracker.update(item.image, dets)
      if len(found) > self.max_faces:
        area = lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1])
        found = sorted(sorted(found, key=lambda f: (f.carried, -area(f)))[:self.max_faces], key=lambda f: f.face_id)
    self.timings["detect"] += t1 - t0
    self.timings["align"] += time.perf_counter() - t1
    return found


# ------------------------------------------------------------------------------------------------ the CSV


def columns(aus: Sequence[int]) -> list[str]:
  """``file``, OpenFace's ``frame, face_id, timestamp, confidence, success``, ``carried``, the box, the keypoints,
  then ``AUxx_p…``, ``AUxx_c…`` (zero-padded AU numbers, as OpenFace)."""
  box = ["face_x0", "face_y0", "face_x1", "face_y1"]
  keypoints = [f"{k}_{c}" for k in KEYPOINT_COLUMNS for c in "xy"]
  return (["file", "frame", "face_id", "timestamp", "confidence", "success", "carried", *box, *keypoints]
          + [f"AU{a:02d}_p" for a in aus] + [f"AU{a:02d}_c" for a in aus])


def csv_row(item: Item, slot: Slot, num_aus: int) -> list:
  """One row of :func:`columns` (empty cells where a value does not exist)."""
  ts = "" if item.timestamp is None else f"{item.timestamp:.3f}"
  f = slot.face
  if slot.x is None:  # no face in this frame
    return [item.file, item.frame, -1, ts, "0", 0, 0] + [""] * (4 + 2 * len(KEYPOINT_COLUMNS) + 2 * num_aus)
  if f is None:  # --faces=aligned: the whole input is the face
    head = [item.file, item.frame, slot.face_id, ts, "", 1, 0] + [""] * (4 + 2 * len(KEYPOINT_COLUMNS))
  else:
    geometry = [f"{v:.1f}" for v in f.box] + [f"{v:.1f}" for v in np.asarray(f.keypoints)[:4].ravel()]
    head = [item.file, item.frame, slot.face_id, ts, f"{f.score:.3f}", 1, int(f.carried)] + geometry
  # Rounded before thresholding, so every row's AUxx_c is exactly (AUxx_p ≥ 0.5) as written.
  p = np.round(np.asarray(slot.probs, np.float64), 4)
  return head + [f"{v:.4f}" for v in p] + [int(v >= THRESHOLD) for v in p]


# ------------------------------------------------------------------------------------------------ overlays


def _font(size: int):
  from PIL import ImageFont
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: one bitmap size
    return ImageFont.load_default()


_COLOURS = ((0, 220, 90), (255, 170, 0), (60, 160, 255), (255, 60, 200), (230, 230, 40), (160, 100, 255))


def dropped_patch_quads(face: faces.Face, dropped: np.ndarray, size: int, patch: int) -> list[np.ndarray]:
  """The dropped patches of a face's model input as (4, 2) corner quads in image pixels (input → crop →
  image)."""
  to_image = faces.invert_affine(face.affine)
  to_crop = input_to_crop(size, face.crop.shape[0])
  n = size // patch
  out = []
  for k in np.flatnonzero(dropped):
    r, c = divmod(int(k), n)
    corners = np.array([[c, r], [c + 1, r], [c + 1, r + 1], [c, r + 1]], np.float64) * patch - 0.5
    out.append(faces.apply_affine(to_image, faces.apply_affine(to_crop, corners)))
  return out


def draw_overlay(image: np.ndarray, slots: Sequence[Slot], aus: Sequence[int], size: int, patch: int
                 ) -> np.ndarray:
  """(H, W, 3) uint8: ``image`` with each face's box, id and its :data:`TOP_AUS` most probable AUs, and the
  patches ``--drop=pred`` dropped shaded red; "no face" when a frame has none."""
  im = Image.fromarray(np.asarray(image, np.uint8)).convert("RGBA")
  h, w = image.shape[:2]
  width = max(2, round(min(h, w) / 250))
  font = _font(max(12, round(min(h, w) / 40)))
  shade = Image.new("RGBA", im.size, (0, 0, 0, 0))
  sd = ImageDraw.Draw(shade)
  for s in slots:
    if s.face is not None and s.dropped is not None:
      for quad in dropped_patch_quads(s.face, s.dropped, size, patch):
        sd.polygon([tuple(p) for p in quad.tolist()], fill=(255, 0, 0, 90))
  im = Image.alpha_composite(im, shade).convert("RGB")
  d = ImageDraw.Draw(im)
  for s in slots:
    if s.x is None:
      d.text((width * 2, width * 2), "no face", fill=(255, 60, 60), font=font)
      continue
    colour = _COLOURS[s.face_id % len(_COLOURS)]
    x0, y0, x1, y1 = (0, 0, w - 1, h - 1) if s.face is None else (float(v) for v in s.face.box)
    d.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    top = np.argsort(-np.asarray(s.probs))[:TOP_AUS]
    label = [f"id {s.face_id}" + (" (carried)" if s.face is not None and s.face.carried else "")]
    label += [f"AU{aus[i]:02d} {s.probs[i]:.2f}" for i in top]
    d.multiline_text((x0 + width, y1 + width), "\n".join(label), fill=colour, font=font, stroke_width=1,
                     stroke_fill=(0, 0, 0))
  return np.asarray(im, np.uint8)


class OverlayWriter:
  """Writes overlays: ``target`` is the image / video file for a single input, else a folder mirroring the
  input folder (images as ``.png``, videos as ``.mp4``)."""

  def __init__(self, target: str, files: Sequence[str], root: str):
    self.target = os.path.abspath(os.path.expanduser(target))
    self.single = len(files) == 1
    self.root = root if os.path.isdir(root) else os.path.dirname(root)
    if self.single:
      kind, exts = ("video", VIDEO_EXTS) if is_video(files[0]) else ("image", IMAGE_EXTS)
      if not self.target.lower().endswith(exts):
        raise ValueError(f"--overlay={target}: the input is one {kind}; expected a {kind} file name ending in "
                         f"{', '.join(exts)}")
    elif os.path.isfile(self.target):
      raise ValueError(f"--overlay={target}: the input holds {len(files)} files; expected a folder, not a file")
    self.written: list[str] = []
    self._video = None  # (input file, container, stream)

  def path_for(self, file: str) -> str:
    if self.single:
      return self.target
    stem = os.path.splitext(os.path.relpath(file, self.root))[0]
    return os.path.join(self.target, stem + (".mp4" if is_video(file) else ".png"))

  def add(self, file: str, image: np.ndarray) -> None:
    path = self.path_for(file)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not is_video(file):
      Image.fromarray(image).save(path)
      self.written.append(path)
      return
    if self._video is None or self._video[0] != file:
      self._close_video()
      self._video = (file, *_open_video_writer(path, image.shape, video_rate(file)))
      self.written.append(path)
    import av
    _, container, stream = self._video
    h, w = stream.height, stream.width
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")
    for packet in stream.encode(frame):
      container.mux(packet)

  def _close_video(self) -> None:
    if self._video is not None:
      _, container, stream = self._video
      for packet in stream.encode():
        container.mux(packet)
      container.close()
      self._video = None

  def close(self) -> None:
    self._close_video()


def _open_video_writer(path: str, shape: tuple[int, ...], fps: float):
  """A PyAV container and stream for ``path``: H.264 (MPEG-4 part 2 for .avi, VP9 for .webm), yuv420p, so the
  frame is cut to even sides."""
  import fractions

  import av
  ext = os.path.splitext(path)[1].lower()
  codec = {".avi": "mpeg4", ".webm": "libvpx-vp9"}.get(ext, "libx264")
  container = av.open(path, "w")
  stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1001))
  stream.height, stream.width = shape[0] // 2 * 2, shape[1] // 2 * 2
  stream.pix_fmt = "yuv420p"
  return container, stream


# ------------------------------------------------------------------------------------------------ run


def _timed(items: Iterator[Item], timings: dict[str, float]) -> Iterator[Item]:
  """``items``, adding the time spent producing each to ``timings["decode"]``."""
  while True:
    t0 = time.perf_counter()
    try:
      it = next(items)
    except StopIteration:
      return
    finally:
      timings["decode"] += time.perf_counter() - t0
    yield it


def predict_path(loaded: LoadedAUModel, path: str, output: str, *, batch_size: int = 32, skip_bad: bool = False,
                 drop: str = "", drop_threshold: float = 0.5, progress: bool = True, faces_mode: str = "detect",
                 max_faces: int = 1, face_model: str | None = None, detector: faces.FaceDetector | None = None,
                 max_carry: int = MAX_CARRY, overlay: str | None = None) -> dict[str, Any]:
  """Writes the CSV for ``path`` (see the module docstring). Returns ``{"rows", "frames", "faces", "no_face",
  "carried", "bad": [(file, error)], "output", "overlays": [paths], "seconds", "timings": {stage: seconds}}``
  (stages: decode, detect, align, model).

  ``detector``: an open :class:`maejax.faces.FaceDetector` to use (else one is built from ``face_model`` and
  closed at the end). Batches of faces are padded to ``batch_size`` (one compiled shape) and split over the
  local devices when ``batch_size`` is a multiple of their count.
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  if batch_size < 1:
    raise ValueError(f"--batch_size must be ≥ 1, got {batch_size}")
  if faces_mode not in FACES_MODES:
    raise ValueError(f"--faces={faces_mode!r}: expected one of {FACES_MODES}")
  if drop not in ("", "pred"):
    raise ValueError(f"--drop must be '' or 'pred' on unlabelled images, got {drop!r}")
  files = list_inputs(path)
  size = loaded.img_size
  writer = OverlayWriter(overlay, files, os.path.expanduser(path)) if overlay else None
  devices = jax.local_devices()
  sharding = None
  if len(devices) > 1 and batch_size % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    loaded = dataclasses.replace(loaded, variables=jax.device_put(loaded.variables, NamedSharding(mesh, P())))
  own_detector = faces_mode == "detect" and detector is None
  finder = None
  if faces_mode == "detect":
    detector = faces.FaceDetector(face_model) if own_detector else detector
    finder = FaceFinder(detector, max_faces, max_carry)
  timings = {"decode": 0.0, "detect": 0.0, "align": 0.0, "model": 0.0}
  counts = collections.Counter()
  bad: list[tuple[str, str]] = []
  pending: collections.deque[Frame] = collections.deque()
  todo: list[Slot] = []
  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm
      bar = tqdm(total=count_frames(files), unit="frame", desc="predict", file=sys.stderr)
    except ImportError:
      bar = None

  def run_batch(slots: list[Slot]) -> None:
    t0 = time.perf_counter()
    x = au_infer.pad_batch(np.stack([s.x for s in slots]), batch_size)
    x = x if sharding is None else jax.device_put(x, sharding)
    probs = au_infer.predict_probs(loaded, x, drop, drop_threshold)[:len(slots)].astype(np.float64)
    dropped = None
    if writer is not None and drop == "pred":  # which patches were dropped, for the overlay
      fns = au_infer.predictor(loaded.model)
      ids = au_infer.drop_for(loaded.model, np.asarray(fns.occlusion(loaded.variables, x)), drop_threshold)
      dropped = np.ones((len(x), loaded.model.num_patches), bool)
      if ids is None:
        dropped[:] = False
      else:
        np.put_along_axis(dropped, ids, False, 1)
    for i, s in enumerate(slots):
      s.probs = probs[i]
      s.dropped = None if dropped is None else dropped[i]
    timings["model"] += time.perf_counter() - t0

  def flush(w) -> None:
    while pending and pending[0].ready:
      fr = pending.popleft()
      for s in fr.slots:
        w.writerow(csv_row(fr.item, s, len(loaded.aus)))
        counts["rows"] += 1
      if writer is not None:
        writer.add(fr.item.file, draw_overlay(fr.image, fr.slots, loaded.aus, size, loaded.model.patch_size))
      if bar is not None:
        bar.update(1)

  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".partial"  # renamed when complete: a failed run leaves no CSV that looks finished
  start = time.perf_counter()
  try:
    with open(tmp, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(columns(loaded.aus))
      for it in _timed(read_items(files, None if finder else size), timings):
        if it.error is not None:
          if not skip_bad:
            raise ValueError(f"{it.file}: unreadable ({it.error}); pass --skip_bad to skip unreadable files")
          bad.append((it.file, it.error))
          if bar is not None:
            bar.update(1)
          continue
        counts["frames"] += 1
        if finder is None:
          slots = [Slot(None, it.image, 0)]
        else:
          found = finder(it)
          t0 = time.perf_counter()
          slots = [Slot(fc, model_input(fc.crop, size), fc.face_id) for fc in found] or [Slot(None, None, -1)]
          timings["align"] += time.perf_counter() - t0
          counts["faces"] += len(found)
          counts["carried"] += sum(fc.carried for fc in found)
          counts["no_face"] += not found
        pending.append(Frame(it, slots, it.image if writer is not None else None))
        todo += [s for s in slots if s.x is not None]
        while len(todo) >= batch_size:
          run_batch(todo[:batch_size])
          todo = todo[batch_size:]
        flush(w)
      if todo:
        run_batch(todo)
      flush(w)
    os.replace(tmp, output)
  finally:
    if finder is not None:
      timings.update(finder.timings)
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    if own_detector:
      detector.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"rows": counts["rows"], "frames": counts["frames"], "faces": counts["faces"],
          "no_face": counts["no_face"], "carried": counts["carried"], "bad": bad, "output": os.path.abspath(output),
          "overlays": [] if writer is None else writer.written, "seconds": time.perf_counter() - start,
          "timings": timings, "faces_mode": faces_mode}


def summary(result: Mapping[str, Any]) -> str:
  fps = result["frames"] / result["seconds"] if result["seconds"] > 0 else float("nan")
  lines = [f"maejax.predict: {result['rows']} row(s) for {result['frames']} frame(s) written to "
           f"{result['output']} ({fps:.1f} frames/s)"]
  if result["faces_mode"] == "detect":
    lines.append(f"faces: {result['faces']} found ({result['carried']} carried over a missed detection); "
                 f"{result['no_face']} frame(s) without a face (success=0)")
  for path in result["overlays"]:
    lines.append(f"overlay: {path}")
  if result["bad"]:
    lines.append(f"skipped {len(result['bad'])} unreadable file(s):")
    lines += [f"  {path}: {err}" for path, err in result["bad"]]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  from absl import flags, logging
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax warns about every read-only checkpoint it opens
  import jax
  aus = [int(a) for a in FLAGS.aus.split(",")] if FLAGS.aus else None
  loaded = load_au_model(FLAGS.checkpoint, FLAGS.model, aus)
  print(f"maejax.predict: model {loaded.path} ({loaded.img_size} px input, AUs {list(loaded.aus)}), faces "
        f"{FLAGS.faces}, devices {jax.devices()}", flush=True)
  result = predict_path(loaded, FLAGS.input, FLAGS.output, batch_size=FLAGS.batch_size, skip_bad=FLAGS.skip_bad,
                        drop=FLAGS.drop, drop_threshold=FLAGS.drop_threshold, faces_mode=FLAGS.faces,
                        max_faces=FLAGS.max_faces, face_model=FLAGS.face_model, max_carry=FLAGS.max_carry,
                        overlay=FLAGS.overlay)
  print(summary(result), flush=True)
  return 0


def _define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "An au_occl / au_finetune workdir, or one model's directory.",
                      required=True)
  flags.DEFINE_string("input", None, "An image, a video, or a folder of them (recursive).", required=True)
  flags.DEFINE_string("output", "preds.csv", "CSV to write (one row per frame per face; a frame without a face "
                      "gets one row with success=0).")
  flags.DEFINE_string("model", "", "teacher | a student name (kd, kd_drop, occl_aug, ...); default: kd when "
                      "trained, else teacher.")
  flags.DEFINE_enum("faces", "detect", list(FACES_MODES), "detect: find, align (FFHQ-style square at 256 px, "
                    "read whole) and track faces with BlazeFace (needs the faces extra); aligned: the inputs already "
                    "are face crops, each image / frame is only resized to the model's input.")
  flags.DEFINE_integer("max_faces", 1, "With --faces=detect: faces per frame, the largest first.", lower_bound=1)
  flags.DEFINE_integer("max_carry", MAX_CARRY, "With --faces=detect, in video: frames a lost face is carried at "
                       "its last box (rows marked carried=1) before its track ends.", lower_bound=0)
  flags.DEFINE_string("face_model", None, "Local face detector models: a folder with the two BlazeFace .tflite "
                      "files, the mediapipe 0.10.21 wheel, or one .tflite (default: the model cache).")
  flags.DEFINE_string("overlay", None, "Draw boxes, ids and top AU probabilities: out.png for one image, "
                      "out.mp4 for one video, a folder for several inputs.")
  flags.DEFINE_integer("batch_size", 32, "Faces per forward pass (split over the local devices).")
  flags.DEFINE_bool("skip_bad", False, "Skip unreadable files and list them at the end (default: stop, naming "
                    "the file).")
  flags.DEFINE_string("aus", "", "Comma-separated AU numbers of the outputs (default: from the workdir's report, "
                      "else BP4D's 12 / DISFA's 8).")
  flags.DEFINE_enum("drop", "", ["", "pred"], "'pred': drop the patches the model's occlusion predictor finds "
                    "occluded (kd_drop student); shaded on --overlay.")
  flags.DEFINE_float("drop_threshold", 0.5, "With --drop=pred: drop patches predicted more occluded than this.")


if __name__ == "__main__":
  from maejax import cli
  _define_flags()
  cli.run(main, prog="maejax.predict")
