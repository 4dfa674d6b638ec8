"""Image sources for MAE pretraining, and the image helpers shared by the AU dataset builders.

Sources (random access, grain-ready: `len(src)`, `src[i] -> {"image": uint8 (H, W, 3)}`):
  * `ImageFolderSource(root)`: every image file (`IMAGE_EXTS`, any case) under `root` (recursive), sorted by
    relative path, decoded with Pillow and converted to RGB.
  * `TfdsImageSource(name, split=..., data_dir=...)`: any TFDS image dataset prepared in array_record format
    (e.g. "imagenet2012"), read with `tfds.data_source`, returning the same record format.
  * `open_image_source("tfds:imagenet2012:train" | "/path/to/folder")` picks one of the two.

`IMAGE_EXTS` / `VIDEO_EXTS` are the one list of image / video file extensions of maejax: import them from here.

Bad inputs follow one policy everywhere in `maejax.data`: an unreadable or corrupt file raises an error naming
it; only when the caller passes `skip_bad=True` is it skipped, and every skip is counted and logged
(`BadInputs`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

# Lower case, with the dot; compare with `path.suffix.lower()` or `name.lower().endswith(IMAGE_EXTS)`.
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")

# A frame image's stem: an optional prefix, then the frame number ("0012", "12", "frame_000012").
_FRAME_STEM = re.compile(r"^(.*?)(\d+)$")

log = logging.getLogger(__name__)


class BadInputs:
  """Raises on a bad input, or — with `skip_bad` — counts it and remembers the first few for the log.

  Usage: `bad.report(FileNotFoundError(f"{path}: ..."), path)` raises the error unless `skip_bad`, in which
  case it returns and the caller skips the item. `bad.summary()` is the line to log at the end.
  """

  def __init__(self, skip_bad: bool, what: str = "inputs", keep: int = 5):
    self.skip_bad = bool(skip_bad)
    self.what = what
    self.keep = keep
    self.count = 0
    self.examples: list[str] = []

  def report(self, error: Exception, path: Any = None) -> None:
    if not self.skip_bad:
      error.args = (f"{error} [skip_bad=True / --skip_bad skips and counts such inputs instead]",)
      raise error
    self.count += 1
    if len(self.examples) < self.keep:
      line = f"{path}: {error}" if path is not None and str(path) not in str(error) else str(error)
      self.examples.append(line)
      log.warning("skip_bad: skipping %s", line)

  def summary(self) -> str:
    if not self.count:
      return f"skipped 0 bad {self.what}"
    first = "\n  ".join(self.examples)
    return f"skipped {self.count} bad {self.what} (skip_bad=True); first {len(self.examples)}:\n  {first}"

  def log(self) -> None:
    if self.count:
      log.warning("%s", self.summary())


def load_rgb(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file fully with Pillow. Returns uint8 (H, W, 3) RGB.

  Raises FileNotFoundError for a missing file and ValueError naming the file for a corrupt/unreadable one.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as img:
      img.load()
      return np.asarray(_to_rgb(img), dtype=np.uint8)
  except FileNotFoundError:
    raise FileNotFoundError(f"Image file not found: {path}") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot decode image {path}: {e}") from e


def load_grey(path: str | os.PathLike) -> np.ndarray:
  """Decodes a single-channel 8-bit image file (Pillow mode "L": greyscale PNG, JPEG, ...). Returns uint8 (H, W).

  The auxiliary modalities of the AU builders (depth, thermal) are stored this way. Any other mode (RGB, 16-bit
  "I;16", 32-bit "I" / "F", palette, alpha) is a ValueError naming the file: converting it would silently change
  its values. FileNotFoundError for a missing file; ValueError naming the file for a corrupt one.
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as img:
      img.load()
      mode, pixels = img.mode, np.asarray(img)
  except FileNotFoundError:
    raise FileNotFoundError(f"Image file not found: {path}") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot decode image {path}: {e}") from e
  if mode != "L":
    raise ValueError(f"{path}: expected an 8-bit single-channel (greyscale, Pillow mode 'L') image, got mode "
                     f"{mode!r}; write the modality as 8-bit greyscale (e.g. depth scaled to 0..255)")
  return pixels.astype(np.uint8, copy=False)


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode == "RGB":
    return img
  if img.mode in ("RGBA", "LA", "P", "PA") or "transparency" in img.info:
    # Composite onto black so transparent pixels do not carry arbitrary colour values.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")


def centre_square_box(height: int, width: int) -> tuple[float, float, float, float]:
  """The largest centred square of an (height, width) image as (left, top, right, bottom)."""
  side = min(height, width)
  left = (width - side) / 2
  top = (height - side) / 2
  return left, top, left + side, top + side


def landmark_box(points: np.ndarray, margin: float = 1.4) -> tuple[float, float, float, float]:
  """Square face box from 2-D landmarks `points: (K, 2)` as (x, y) pixels: centred on the landmarks' bounding
  box, side = margin · max(box width, box height). Returns (left, top, right, bottom); may extend past the
  image.
  """
  points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
  lo, hi = points.min(axis=0), points.max(axis=0)
  cx, cy = (lo + hi) / 2
  half = margin * float(max(hi - lo)) / 2
  if half <= 0:
    raise ValueError(f"Degenerate landmarks (all points equal): {points.tolist()}")
  return cx - half, cy - half, cx + half, cy + half


def crop_resize(image: np.ndarray, box: tuple[float, float, float, float], size: int = 256) -> np.ndarray:
  """Crops `box` = (left, top, right, bottom) from `image: uint8 (H, W, 3)` and resizes it to (size, size, 3).

  Areas of the box outside the image are black. Resampling is Pillow's antialiased bilinear.
  """
  left, top, right, bottom = (int(round(v)) for v in box)
  pil = Image.fromarray(image).crop((left, top, right, bottom))
  return np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def read_landmarks_csv(path: str | os.PathLike) -> dict[int, np.ndarray]:
  """Reads a landmarks file: one line per frame, `frame,x1,y1,x2,y2,...,xK,yK` (pixels of the source image,
  any number K >= 2 of points, same K on every line); an optional first line starting with "frame" is a
  header.

  Returns {frame number: float32 (K, 2) array of (x, y)}; ValueError naming the file and line when malformed.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Landmarks file not found: {path} (expected lines frame,x1,y1,...,xK,yK)")
  out: dict[int, np.ndarray] = {}
  num_values = None
  with open(path, encoding="utf-8-sig") as f:
    for line_no, line in enumerate(f, start=1):
      line = line.strip()
      if not line or (line_no == 1 and line.lower().startswith("frame")):
        continue
      cells = line.split(",")
      try:
        frame = int(cells[0])
        values = [float(c) for c in cells[1:]]
      except ValueError:
        raise ValueError(f"{path}: line {line_no}: expected frame,x1,y1,...,xK,yK numbers, got {line!r}"
                         ) from None
      if len(values) < 4 or len(values) % 2 or (num_values is not None and len(values) != num_values):
        raise ValueError(f"{path}: line {line_no}: expected an even number (>= 4, same on every line) of "
                         f"coordinates after the frame number, got {len(values)}")
      if frame in out:
        raise ValueError(f"{path}: line {line_no}: frame {frame} appears twice")
      num_values = len(values)
      out[frame] = np.asarray(values, dtype=np.float32).reshape(-1, 2)
  return out


def face_crop(image: np.ndarray, points: np.ndarray | None, size: int = 256) -> np.ndarray:
  """The face crop of the AU datasets: `landmark_box(points)` when landmarks are given, else the centred
  square; resized to (size, size, 3) uint8. `image: uint8 (H, W, 3)`, `points: (K, 2)` (x, y) or None.
  """
  return crop_resize(image, face_box(image.shape[:2], points), size)


def face_box(shape: tuple[int, int], points: np.ndarray | None) -> tuple[float, float, float, float]:
  """The box of :func:`face_crop` for an image of ``shape`` (H, W): ``landmark_box(points)``, or the centred
  square when ``points`` is None."""
  return centre_square_box(*shape) if points is None else landmark_box(points)


def crop_channels(crop_rgb: Callable[[np.ndarray], np.ndarray], channels: Sequence[np.ndarray]) -> list[np.ndarray]:
  """The crops of single-channel images ``channels: [uint8 (H, W)]`` by an RGB frame's crop function ``crop_rgb:
  uint8 (H, W, 3) → (S, S, 3)``, so an auxiliary modality (depth, thermal) is cut exactly like the frame.

  The channels go three at a time into the colour channels of one image (zeros fill a last partial group). Every
  resampling step of the crops (Pillow's crop / bilinear resize / affine transform, box reduce, edge padding) works
  on each channel alone, so each result is that channel's own crop. Returns [uint8 (S, S, 1)] in input order.
  """
  channels = [np.asarray(c) for c in channels]
  if any(c.ndim != 2 or c.shape != channels[0].shape or c.dtype != np.uint8 for c in channels):
    raise ValueError(f"crop_channels: expected uint8 (H, W) images of one size, got shapes "
                     f"{[c.shape for c in channels]} and dtypes {[str(c.dtype) for c in channels]}")
  out: list[np.ndarray] = []
  for start in range(0, len(channels), 3):
    group = channels[start:start + 3]
    packed = np.zeros(group[0].shape + (3,), np.uint8)
    for i, c in enumerate(group):
      packed[:, :, i] = c
    crop = crop_rgb(packed)
    out += [np.ascontiguousarray(crop[:, :, i:i + 1]) for i in range(len(group))]
  return out


ALIGNS = ("detect", "landmarks", "center")  # how the AU builders crop a frame: see FaceCropper
NO_FACE_FILE = "no_face.txt"
NUM_KEYPOINTS = 5  # record landmarks: eye (image-left), eye, nose tip, mouth corners (occlusion.py's order)
UNKNOWN_LANDMARKS = np.full((NUM_KEYPOINTS, 2), -1.0, np.float32)  # au_pipeline reads −1 rows as "unknown"


class FaceAligner(Protocol):
  """What ``align="detect"`` needs (``maejax.faces.FrameAligner`` is one): ``detect(image)`` → the largest face as
  a JSON-ready dict or None; ``crop(image, detection, size)`` → ``(crop uint8 (size, size, 3), keypoints (5, 2)
  float32 in the crop)``; ``signature`` names the models, so cached detections of other models are not reused."""

  signature: str

  def detect(self, image: np.ndarray) -> dict | None: ...

  def crop(self, image: np.ndarray, detection: dict, size: int) -> tuple[np.ndarray, np.ndarray]: ...


class DetectionCache:
  """Face detections of a dataset, one JSON file per sequence (``<folder>/<sequence>.json``): ``{"signature",
  "frames": {frame: {"src", "det"}}}``. ``src`` identifies the source pixels (file name and size, plus the frame
  index for a video): an entry is reused only when the signature and ``src`` match, so a changed image or other
  detector models detect again. ``det`` None = no face found."""

  def __init__(self, folder: str | os.PathLike, signature: str):
    self.folder = Path(folder)
    self.signature = signature
    self._tables: dict[str, dict] = {}
    self._dirty: set[str] = set()

  def _table(self, sequence: str) -> dict:
    if sequence not in self._tables:
      table = {}
      path = self.folder / f"{sequence}.json"
      if path.is_file():
        try:
          with open(path) as f:
            saved = json.load(f)
          if saved.get("signature") == self.signature:
            table = saved.get("frames", {})
        except (OSError, ValueError):
          log.warning("%s: unreadable detection cache, detecting again", path)
      self._tables[sequence] = table
    return self._tables[sequence]

  def lookup(self, sequence: str, frame: int, src: str) -> tuple[bool, dict | None]:
    """``(found, detection)`` of a frame."""
    entry = self._table(sequence).get(str(frame))
    if entry is None or entry.get("src") != src:
      return False, None
    return True, entry.get("det")

  def store(self, sequence: str, frame: int, src: str, det: dict | None) -> None:
    self._table(sequence)[str(frame)] = {"src": src, "det": det}
    self._dirty.add(sequence)

  def save(self) -> None:
    """Writes the changed sequences (each atomically: a cache file is either the old one or the new one)."""
    if not self._dirty:
      return
    self.folder.mkdir(parents=True, exist_ok=True)
    for sequence in sorted(self._dirty):
      fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f"{sequence}.json.")
      with os.fdopen(fd, "w") as f:
        json.dump({"signature": self.signature, "frames": self._tables[sequence]}, f)
      os.replace(tmp, self.folder / f"{sequence}.json")
    self._dirty.clear()


def source_id(path: str | os.PathLike, index: int | None = None) -> str:
  """``src`` of :class:`DetectionCache`: the file's name and size (and frame index in a video)."""
  path = Path(path)
  out = f"{path.name}:{path.stat().st_size}"
  return out if index is None else f"{out}:{index}"


class FaceCropper:
  """The face crop of an AU dataset frame, by ``align`` (one of :data:`ALIGNS`):

  * ``"detect"``: the largest face found by ``aligner`` (:class:`FaceAligner`), its FFHQ-style square; the
    detections are cached per sequence in ``cache_dir`` (:class:`DetectionCache`), so a rebuild does not detect
    again. Record landmarks: the keypoints in the crop. A frame without a face has no record: it is counted and
    listed (``no_face``; :meth:`finish` writes :data:`NO_FACE_FILE`).
  * ``"landmarks"``: the 1.4 × landmark-box square of the dataset's own points (:func:`face_crop`).
  * ``"center"``: the centred square, for corpora of face crops.

  With the last two the record landmarks are unknown (−1 rows; occluders then assume a centred face)."""

  def __init__(self, align: str, aligner: FaceAligner | None = None, cache_dir: str | os.PathLike | None = None,
               size: int = 256):
    if align not in ALIGNS:
      raise ValueError(f"align={align!r}: expected one of {ALIGNS}")
    if align == "detect" and aligner is None:
      raise ValueError("align='detect' needs a face aligner: build with `python -m maejax.data.prepare` (which makes "
                       "one from maejax.faces) or pass aligner=maejax.faces.FrameAligner()")
    self.align, self.aligner, self.size = align, aligner, size
    self.cache = None if align != "detect" or cache_dir is None else DetectionCache(cache_dir, aligner.signature)
    self.no_face: list[str] = []
    self.detector_calls = 0
    self.cache_hits = 0

  def __call__(self, sequence: str, frame: int, src: str, image: np.ndarray, points: np.ndarray | None,
               where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(crop (size, size, 3) uint8, landmarks (5, 2) float32)`` or None when no face is found (``where``,
    the frame's file, is listed)."""
    out = self.crop_with_aux(sequence, frame, src, image, points, where, ())
    return None if out is None else out[:2]

  def crop_with_aux(self, sequence: str, frame: int, src: str, image: np.ndarray, points: np.ndarray | None,
                    where: str, aux: Sequence[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """As :meth:`__call__`, plus the crops of ``aux``: single-channel uint8 ``(H, W)`` images pixel-aligned with
    ``image: (H, W, 3)`` (depth, thermal), each cut with the frame's own box (``align="detect"``: its similarity
    transform) by :func:`crop_channels`. Returns ``(crop, landmarks, [aux crop uint8 (size, size, 1)])`` or None."""
    wrong = [np.shape(a) for a in aux if np.shape(a) != image.shape[:2]]
    if wrong:
      raise ValueError(f"{where}: auxiliary images of shape(s) {wrong} are not pixel-aligned with the frame "
                       f"{image.shape[:2]}")
    crop_fn = self._crop_fn(sequence, frame, src, image, points, where)
    if crop_fn is None:
      return None
    crop, landmarks = crop_fn(image)
    return crop, landmarks, crop_channels(lambda x: crop_fn(x)[0], aux)

  def _crop_fn(self, sequence: str, frame: int, src: str, image: np.ndarray, points: np.ndarray | None,
               where: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The crop of this frame as a function of an (H, W, 3) image of the frame's size: ``x → (crop (size, size,
    3), landmarks (5, 2))``; None when no face is found."""
    if self.align != "detect":
      box = face_box(image.shape[:2], points if self.align == "landmarks" else None)
      return lambda x: (crop_resize(x, box, self.size), UNKNOWN_LANDMARKS)
    found, det = (False, None) if self.cache is None else self.cache.lookup(sequence, frame, src)
    if found:
      self.cache_hits += 1
    else:
      det = self.aligner.detect(image)
      self.detector_calls += 1
      if self.cache is not None:
        self.cache.store(sequence, frame, src, det)
    if det is None:
      self.no_face.append(f"{sequence}\t{frame}\t{where}")
      return None

    def crop(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      out, keypoints = self.aligner.crop(x, det, self.size)
      return out, np.asarray(keypoints, np.float32).reshape(NUM_KEYPOINTS, 2)

    return crop

  def save(self) -> None:
    if self.cache is not None:
      self.cache.save()

  def finish(self, data_dir: str | os.PathLike, what: str) -> None:
    """Saves the cache; writes ``data_dir/no_face.txt`` (sequence, frame, file per line; empty when every frame
    had a face) and logs how many frames had no face."""
    self.save()
    if self.align != "detect":
      return
    path = Path(data_dir) / NO_FACE_FILE
    path.write_text("".join(line + "\n" for line in self.no_face))
    if self.no_face:
      log.warning("%s: %d labelled frame(s) without a detected face are not in the dataset; listed in %s",
                  what, len(self.no_face), path)
    log.info("%s: face detection ran on %d frame(s), %d read from the detection cache %s", what,
             self.detector_calls, self.cache_hits, None if self.cache is None else self.cache.folder)


def check_align(align: str, landmarks_dir) -> None:
  """ValueError unless ``align`` is one of :data:`ALIGNS` and ``landmarks_dir`` is given exactly when
  ``align="landmarks"``."""
  if align not in ALIGNS:
    raise ValueError(f"align={align!r}: expected one of {ALIGNS}")
  if (align == "landmarks") != (landmarks_dir is not None):
    raise ValueError("landmarks_dir / --landmarks_dir goes with align='landmarks' / --align=landmarks, got "
                     f"align={align!r} and landmarks_dir={landmarks_dir!r}")


def detection_cache_dir(dl_manager: Any, name: str) -> Path:
  """Where a builder caches its face detections: ``<download dir>/face_detections/<name>`` (``<data_dir>/
  downloads`` by default), outside the versioned dataset folder, so a rebuild or a new version reuses them."""
  return Path(dl_manager.download_dir) / "face_detections" / name


def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
  """Encodes `image: uint8 (H, W, 3)` as JPEG (given quality, 4:4:4) or PNG bytes with Pillow."""
  buf = io.BytesIO()
  pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
  if fmt == "jpeg":
    pil.save(buf, format="JPEG", quality=quality, subsampling=0)
  elif fmt == "png":
    pil.save(buf, format="PNG")
  else:
    raise ValueError(f"Unknown image format {fmt!r}; expected 'jpeg' or 'png'.")
  return buf.getvalue()


def index_frames(folder: Path, bad: BadInputs) -> dict[int, Path]:
  """Maps image number -> path for the image files (`IMAGE_EXTS`) of `folder` named `[<prefix>]<number>.<ext>`.

  The number is the stem's trailing digits, zero padding ignored: "0012.jpg", "12.png" and "frame_000012.jpg"
  are all number 12. Files with other extensions are ignored; an image whose stem does not end in digits, or two
  files with the same number, is a bad input (ValueError naming it).
  """
  frames: dict[int, Path] = {}
  for path in sorted(folder.iterdir()):
    if not path.is_file() or path.suffix.lower() not in IMAGE_EXTS:
      continue
    match = _FRAME_STEM.match(path.stem)
    if not match:
      bad.report(ValueError(f"{path}: image name does not end in a frame number (expected e.g. 0012.jpg or "
                            "frame_0012.jpg)"), path)
      continue
    number = int(match.group(2))
    if number in frames:
      bad.report(ValueError(f"{path}: frame {number} also stored as {frames[number]}"), path)
      continue
    frames[number] = path
  return frames


def landmarks_folder(manual_dir: Path, landmarks_dir: str | os.PathLike | None, dataset: str) -> Path | None:
  """The landmarks folder of an AU builder: `landmarks_dir` as given when absolute, else under `manual_dir`;
  None when not given. FileNotFoundError naming it when it is not a folder."""
  if landmarks_dir is None:
    return None
  folder = Path(landmarks_dir)
  if not folder.is_absolute():
    folder = manual_dir / folder
  if not folder.is_dir():
    raise FileNotFoundError(f"{dataset} landmarks folder not found: {folder}")
  return folder


def list_images(root: str | os.PathLike) -> list[Path]:
  """All image files (IMAGE_EXTS, any case) under `root`, recursively, sorted by relative path."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"Image folder not found: {root}")
  found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class ImageFolderSource(Sequence):
  """Random-access source over a folder of (face) images, for MAE pretraining.

  `src[i] -> {"image": uint8 (H, W, 3)}` (RGB, original size); order = sorted relative paths, so it is
  deterministic across machines. A corrupt file raises ValueError naming it when read. With `skip_bad=True`
  every file is decoded once at construction and the bad ones are left out, counted (`self.bad.count`) and
  logged.
  """

  def __init__(self, root: str | os.PathLike, *, skip_bad: bool = False):
    self.root = Path(root)
    paths = list_images(self.root)
    if not paths:
      raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) found under {self.root}")
    self.bad = BadInputs(skip_bad, what="images")
    if skip_bad:
      good = []
      for p in paths:
        try:
          load_rgb(p)
        except (FileNotFoundError, ValueError) as e:
          self.bad.report(e, p)
          continue
        good.append(p)
      self.bad.log()
      paths = good
      if not paths:
        raise ValueError(f"All {self.bad.count} images under {self.root} are unreadable.")
    self._paths = [os.fspath(p) for p in paths]

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images")
    return {"image": load_rgb(self._paths[index])}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={os.fspath(self.root)!r}, len={len(self)})"


def _as_rgb_array(image: Any, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{where}: expected an image of shape (H, W, 1|3|4), got {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] == 4:
    image = image[..., :3]
  return image


class TfdsImageSource(Sequence):
  """A TFDS image dataset (array_record, e.g. "imagenet2012") as `src[i] -> {"image": uint8 (H, W, 3)}`.

  Opens `tfds.data_source(name, split=split, data_dir=data_dir)` lazily, so the object pickles into grain
  worker processes. Grey images are repeated to 3 channels and an alpha channel is dropped.
  """

  def __init__(self, name: str, *, split: str = "train", data_dir: str | os.PathLike | None = None,
               image_key: str = "image"):
    self.name = name
    self.split = split
    self.data_dir = None if data_dir is None else os.fspath(data_dir)
    self.image_key = image_key
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds

      self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
    return self._source

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:  # type: ignore[override]
    record = self._open()[index]
    if self.image_key not in record:
      raise ValueError(f"TFDS dataset {self.name!r} has no feature {self.image_key!r}; "
                       f"features: {sorted(record)}")
    where = f"{self.name}[{self.split}][{index}][{self.image_key!r}]"
    return {"image": _as_rgb_array(record[self.image_key], where)}

  def __repr__(self) -> str:
    return f"TfdsImageSource(name={self.name!r}, split={self.split!r}, len={len(self)})"


def open_image_source(spec: str, *, data_dir: str | os.PathLike | None = None,
                      skip_bad: bool = False) -> ImageFolderSource | TfdsImageSource:
  """`"tfds:<name>[:<split>]"` -> TfdsImageSource (split defaults to "train"); else a folder path."""
  if spec.startswith("tfds:"):
    _, name, *rest = spec.split(":", 2)
    if not name:
      raise ValueError(f"Bad image source {spec!r}; expected tfds:<name>[:<split>].")
    return TfdsImageSource(name, split=rest[0] if rest else "train", data_dir=data_dir)
  return ImageFolderSource(spec, skip_bad=skip_bad)


AU_FEATURE_KEYS = ("image", "au", "au_intensity", "landmarks", "subject", "subject_id", "task", "frame")


def au_features(num_aus: int, image_size: int = 256, aux: Sequence[str] = ()):
  """The TFDS features of an AU dataset record (BP4D, DISFA): ``image`` JPEG ``(S, S, 3)``, ``au`` int8 (−1 =
  unknown), ``au_intensity`` float32 (−1 = none), ``landmarks`` float32 (5, 2) (x, y) in the crop (eyes, nose
  tip, mouth corners; −1 = unknown), ``subject`` index, ``subject_id``, ``task``, ``frame``; and per key of
  ``aux`` (auxiliary modalities, e.g. "depth") a single-channel PNG ``(S, S, 1)`` aligned with ``image``."""
  import tensorflow_datasets as tfds
  clash = sorted(set(aux) & set(AU_FEATURE_KEYS))
  if clash:
    raise ValueError(f"auxiliary modality key(s) {clash} clash with the record features {AU_FEATURE_KEYS}")
  return tfds.features.FeaturesDict({
    **{k: tfds.features.Image(shape=(image_size, image_size, 1), encoding_format="png") for k in aux},
    "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="jpeg"),
    "au": tfds.features.Tensor(shape=(num_aus,), dtype=np.int8),
    "au_intensity": tfds.features.Tensor(shape=(num_aus,), dtype=np.float32),
    "landmarks": tfds.features.Tensor(shape=(NUM_KEYPOINTS, 2), dtype=np.float32),
    "subject": tfds.features.Scalar(dtype=np.int32),
    "subject_id": tfds.features.Text(),
    "task": tfds.features.Text(),
    "frame": tfds.features.Scalar(dtype=np.int32),
  })
