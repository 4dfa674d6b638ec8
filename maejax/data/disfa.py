"""DISFA AU intensity/occurrence as a TFDS builder (array_record, random access for grain).

Reads the official layout from the manual directory (see `Disfa.MANUAL_DOWNLOAD_INSTRUCTIONS`): left-camera
frames either extracted to `frames/<subject>/<frame>.png|jpg` (preferred when present) or decoded from
`Videos_LeftCamera/LeftVideo<subject>_comp.avi` (needs PyAV `pip install av`, or OpenCV). Each labelled frame
is cropped to a 256×256 face (`align`: "detect" (default) = the largest BlazeFace face, FFHQ-style square,
detections cached per subject; "landmarks" = 1.4 × the box of the dataset's points; "center" = the centred
square; see `images.FaceCropper`); one split per subject part of the 3-fold protocol: `part1`, `part2`, `part3`
(fold k = `folds.fold_split(k, "train" | "test")`, e.g. fold 1 trains on "part1+part2" and tests on "part3").

Record (one per labelled frame):
  image        uint8 (256, 256, 3)  JPEG-encoded on disk (quality 95, 4:4:4)
  au           int8 (8,)            occurrence of AUs 1 2 4 6 9 12 25 26: 1 if intensity >= 2 else 0
  au_intensity float32 (8,)         the labelled intensity 0..5
  landmarks    float32 (5, 2)       eyes, nose tip, mouth corners in the crop (align="detect"), else −1 (unknown)
  subject      int32                index in folds.DISFA_SUBJECTS (int, like synthfaces)
  subject_id   string               "SN001"
  task         string               "" (DISFA has no tasks)
  frame        int32                frame number of the label files (1-based)
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from maejax.data import folds
from maejax.data.images import (
  IMAGE_EXTS,
  BadInputs,
  FaceAligner,
  FaceCropper,
  au_features,
  check_align,
  detection_cache_dir,
  encode_image,
  index_frames,
  landmarks_folder,
  load_rgb,
  read_landmarks_csv,
  source_id,
)

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
OCCURRENCE_THRESHOLD = 2  # occurrence = intensity >= 2 (the ME-GraphAU / JAA-Net convention)

_SUBJECT = re.compile(r"^SN\d{3}$")
_VIDEO_NAME = re.compile(r"^LeftVideo(SN\d{3})_comp\.avi$")

_INSTRUCTIONS = f"""\
Put the licensed DISFA release in the manual directory (--manual_dir) like this:

  <manual_dir>/ActionUnit_Labels/<subject>/<subject>_au<N>.txt
      e.g. SN001/SN001_au1.txt, lines `frame,intensity`
  and, per subject, either extracted left-camera frames (used when present)
  <manual_dir>/frames/<subject>/<frame>.png|jpg
      extensions read: {", ".join(IMAGE_EXTS)}
      file number = label frame number (1-based), zero-padded or not, after an optional prefix,
      e.g. ffmpeg -i LeftVideoSN001_comp.avi frames/SN001/%05d.png   (ffmpeg numbers from 1)
      Frames numbered from 0 (0.png or frame_000000.jpg = the video's first frame) are refused unless you pass
      frame_index_base=0 / --frame_index_base=0, which pairs image i with label frame i + 1.
  or the official video (decoded with PyAV `pip install av`, or OpenCV)
  <manual_dir>/Videos_LeftCamera/LeftVideo<subject>_comp.avi
      video frame i (0-based) = label frame i + 1

All 8 AU files (AUs 1 2 4 6 9 12 25 26) are needed per subject, labelling the same frames. Frames with no
label line are not examples; their count is logged.

Crops (align=... / --align=...): "detect" (default) finds the largest face with BlazeFace (pip install
'maejax[faces]') and cuts its FFHQ-style square; frames without a face are left out and listed in no_face.txt
next to the dataset. "landmarks" uses landmarks_dir=... / --landmarks_dir=... holding <subject>.csv, lines
`frame,x1,y1,...,xK,yK` in source-image pixels (optional header line starting with "frame"): a square of 1.4 ×
the landmarks' bounding-box size centred on it. "center" is the centred square, for frames that already are
face crops. Resized to 256×256.
"""


def read_intensity_txt(path: str | os.PathLike) -> dict[int, int]:
  """Parses a DISFA `<subject>_au<N>.txt`: lines `frame,intensity`, frame an integer >= 1, intensity 0..5.

  Returns {frame: intensity}. ValueError naming the file, the line and what was expected for a file that is not
  text, a malformed line, a frame below 1, an out-of-range intensity or a repeated frame; FileNotFoundError for a
  missing file.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"DISFA label file not found: {path}")
  try:
    with open(path, encoding="utf-8-sig") as f:
      lines = list(enumerate(f, start=1))
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a text file ({e}); expected lines `frame,intensity`") from None
  out: dict[int, int] = {}
  for line_no, line in lines:
    line = line.strip()
    if not line:
      continue
    frame, intensity = _parse_label_line(path, line_no, line)
    if frame in out:
      raise ValueError(f"{path}: line {line_no}: frame {frame} appears twice")
    out[frame] = intensity
  if not out:
    raise ValueError(f"{path}: no `frame,intensity` lines")
  return out


def _parse_label_line(path: Path, line_no: int, line: str) -> tuple[int, int]:
  where = f"{path}: line {line_no}"
  cells = [c.strip() for c in line.split(",")]
  try:
    if len(cells) != 2:
      raise ValueError
    frame, intensity = int(cells[0]), int(cells[1])
  except ValueError:
    raise ValueError(f"{where}: expected `frame,intensity` (two integers), got {line[:60]!r}") from None
  if frame < 1:
    raise ValueError(f"{where}: frame numbers start at 1 in DISFA label files, got {frame}")
  if not 0 <= intensity <= 5:
    raise ValueError(f"{where}: intensity must be 0..5, got {intensity}")
  return frame, intensity


def iter_video_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
  """Decodes a video file frame by frame with PyAV (or OpenCV). Yields uint8 (H, W, 3) RGB.

  Raises ModuleNotFoundError when neither is installed and ValueError naming the file when it cannot be
  decoded.
  """
  path = os.fspath(path)
  try:
    import av
  except ImportError:
    av = None
  if av is not None:
    try:
      with av.open(path) as container:
        for frame in container.decode(video=0):
          yield frame.to_ndarray(format="rgb24")
    except av.error.FFmpegError as e:
      raise ValueError(f"Cannot decode video {path}: {e}") from e
    return
  try:
    import cv2
  except ImportError:
    raise ModuleNotFoundError(
      f"Decoding {path} needs PyAV (`pip install av`) or OpenCV; or extract the frames to "
      f"frames/<subject>/<frame>.png (see Disfa.MANUAL_DOWNLOAD_INSTRUCTIONS).") from None
  capture = cv2.VideoCapture(path)
  if not capture.isOpened():
    raise ValueError(f"Cannot open video {path}")
  try:
    while True:
      ok, bgr = capture.read()
      if not ok:
        break
      yield np.ascontiguousarray(bgr[..., ::-1])
  finally:
    capture.release()


class Disfa(tfds.core.GeneratorBasedBuilder):
  """DISFA AU intensity (0..5) and occurrence (>= 2), one split per fold part: part1, part2, part3."""

  name = "disfa"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Left camera, 8 AUs with intensity, 256×256 face crops, per-part splits.",
    "2.0.0": "Crops from BlazeFace detection (align='detect', FFHQ-style square) by default; `landmarks` feature "
             "(5, 2) in the crop; frames without a face listed in no_face.txt.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default resolves the path through `importlib_resources`, a package tfds does not install.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, skip_bad: bool = False, align: str = "detect", aligner: FaceAligner | None = None,
               landmarks_dir: str | os.PathLike | None = None, frame_index_base: int = 1, **kwargs):
    """skip_bad: count and log bad inputs instead of raising. align: one of images.ALIGNS; aligner: the face
    aligner of align="detect" (needed to build, not to read); landmarks_dir: the landmarks folder of
    align="landmarks" (absolute, or relative to the manual dir). frame_index_base: number of the first
    extracted frame image (`frames/<subject>/`); 1 (DISFA's label numbering) or 0, which pairs image i with
    label frame i + 1."""
    if frame_index_base not in (0, 1):
      raise ValueError(f"frame_index_base must be 0 or 1 (the number of the first frame image), got "
                       f"{frame_index_base!r}")
    check_align(align, landmarks_dir)
    self.skip_bad = skip_bad
    self.align, self.aligner = align, aligner
    self.landmarks_dir = landmarks_dir
    self.cropper: FaceCropper | None = None
    self.frame_index_base = frame_index_base
    self.bad = BadInputs(skip_bad, what="DISFA inputs")
    self.num_unlabelled_images = 0
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    n = len(folds.DISFA_AUS)
    return tfds.core.DatasetInfo(
      builder=self,
      description="DISFA facial action unit intensity and occurrence (8 AUs), left camera, 256×256 crops.",
      features=au_features(n, IMAGE_SIZE),
      homepage="http://mohammadmahoor.com/disfa/",
      metadata=tfds.core.MetadataDict(aus=list(folds.DISFA_AUS), parts=[list(p) for p in folds.DISFA_PARTS],
                                      align=self.align),
    )

  def _split_generators(self, dl_manager):
    plans = self.scan(Path(dl_manager.manual_dir))
    self.cropper = FaceCropper(self.align, self.aligner, detection_cache_dir(dl_manager, self.name), IMAGE_SIZE)
    return folds.part_splits(plans, self._generate_examples, "DISFA")

  def _read_subject_labels(self, labels_dir: Path, subject: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{frame: (au int8 (8,), intensity float32 (8,))} of one subject; frames missing from some AU file are
    bad inputs."""
    paths = [labels_dir / subject / f"{subject}_au{au}.txt" for au in folds.DISFA_AUS]
    tables = [(p, read_intensity_txt(p)) for p in paths]
    all_frames = sorted(set().union(*(t.keys() for _, t in tables)))
    out = {}
    for frame in all_frames:
      missing = [p for p, t in tables if frame not in t]
      if missing:
        has = next(p for p, t in tables if frame in t)
        error = ValueError(f"{missing[0]}: frame {frame} has no label line (it is labelled in {has})")
        self.bad.report(error, missing[0])
        continue
      intensity = np.asarray([t[frame] for _, t in tables], dtype=np.float32)
      out[frame] = ((intensity >= OCCURRENCE_THRESHOLD).astype(np.int8), intensity)
    return out

  def scan(self, manual_dir: Path) -> dict[int, list[tuple]]:
    """Reads all labels and lists frame images / videos without decoding them.

    Returns {part: [(key, subject, subject_index, frame, au, intensity, source, points)]}, source being
    ("image", path) or ("video", path, frame index)."""
    manual_dir = Path(manual_dir)
    labels_dir = manual_dir / "ActionUnit_Labels"
    frames_dir = manual_dir / "frames"
    videos_dir = manual_dir / "Videos_LeftCamera"
    if not labels_dir.is_dir():
      raise FileNotFoundError(f"DISFA folder not found: {labels_dir}\n{_INSTRUCTIONS}")
    if not frames_dir.is_dir() and not videos_dir.is_dir():
      raise FileNotFoundError(f"DISFA needs {frames_dir} or {videos_dir}; neither exists.\n{_INSTRUCTIONS}")
    landmarks_dir = landmarks_folder(manual_dir, self.landmarks_dir, "DISFA")
    subjects = self._subjects(labels_dir)
    self._check_media_are_labelled(labels_dir, frames_dir, videos_dir, subjects)
    if not subjects:
      raise FileNotFoundError(f"No DISFA subject folders SN### in {labels_dir}\n{_INSTRUCTIONS}")
    plans: dict[int, list[tuple]] = {1: [], 2: [], 3: []}
    for subject in subjects:
      try:
        part = folds.part_of("disfa", subject)
      except ValueError as e:
        self.bad.report(ValueError(f"{labels_dir / subject}: {e}"), labels_dir / subject)
        continue
      plans[part] += self._plan_subject(subject, labels_dir, frames_dir / subject,
                                        videos_dir / f"LeftVideo{subject}_comp.avi", landmarks_dir)
    if self.num_unlabelled_images:
      log.info("DISFA: %d frame images have no label line and are not examples.", self.num_unlabelled_images)
    return plans

  def _subjects(self, labels_dir: Path) -> list[str]:
    """The subject ids of the label folders; a folder not named like SN001 is a bad input."""
    subjects = []
    for d in sorted(p for p in labels_dir.iterdir() if p.is_dir()):
      if not _SUBJECT.match(d.name):
        self.bad.report(ValueError(f"{d}: label folder name is not a DISFA subject id like SN001"), d)
        continue
      subjects.append(d.name)
    return subjects

  def _check_media_are_labelled(self, labels_dir: Path, frames_dir: Path, videos_dir: Path,
                                subjects: list[str]) -> None:
    """Frames or a video of a subject without label folder is a bad input: its label files are missing."""
    with_media = set()
    if frames_dir.is_dir():
      with_media |= {p.name for p in frames_dir.iterdir() if p.is_dir()}
    if videos_dir.is_dir():
      with_media |= {m.group(1) for p in videos_dir.iterdir() if (m := _VIDEO_NAME.match(p.name))}
    for subject in sorted(with_media - set(subjects)):
      expected = labels_dir / subject / f"{subject}_au1.txt"
      error = FileNotFoundError(f"Missing label files {expected} (and the other AUs) for subject {subject}, "
                                "whose frames/video exist")
      self.bad.report(error, expected)

  def _plan_subject(self, subject: str, labels_dir: Path, subject_frames: Path, video: Path,
                    landmarks_dir: Path | None) -> list[tuple]:
    """The plan items of one subject: its labelled frames that have an image or video frame (and landmarks,
    if used)."""
    bad = self.bad
    try:
      labels = self._read_subject_labels(labels_dir, subject)
    except (FileNotFoundError, ValueError) as e:
      bad.report(e)
      return []
    points = None
    if landmarks_dir is not None:
      lm_path = landmarks_dir / f"{subject}.csv"
      try:
        points = read_landmarks_csv(lm_path)
      except (FileNotFoundError, ValueError) as e:
        bad.report(e, lm_path)
        return []
    if subject_frames.is_dir():
      images = self._label_frame_images(subject_frames, labels)
      self.num_unlabelled_images += len(set(images) - set(labels))
    elif video.is_file():
      images = None
    else:
      bad.report(FileNotFoundError(f"No frames for {subject}: expected {subject_frames}/ or {video}"), video)
      return []
    s_index = folds.subject_index("disfa", subject)
    items = []
    for frame, (au, intensity) in sorted(labels.items()):
      if images is None:
        source = ("video", video, frame - 1)
      elif frame in images:
        source = ("image", images[frame])
      else:
        number = frame - 1 + self.frame_index_base
        bad.report(FileNotFoundError(
          f"No image for labelled frame {frame} of {labels_dir / subject}: expected "
          f"{subject_frames}/{number}.png (or .jpg, zero-padded names also match)"),
          subject_frames / f"{number}.png")
        continue
      frame_points = None
      if points is not None:
        if frame not in points:
          bad.report(ValueError(f"{lm_path}: no landmarks for frame {frame}"), lm_path)
          continue
        frame_points = points[frame]
      items.append((f"{subject}_{frame}", subject, s_index, frame, au, intensity, source, frame_points))
    return items

  def _label_frame_images(self, folder: Path, labels: dict[int, tuple]) -> dict[int, Path]:
    """{label frame: image path} of a subject's frame images: image number i is label frame
    i + 1 − frame_index_base.

    Raises ValueError naming the folder (whatever skip_bad says, since every frame would carry its neighbour's
    labels) when the numbering contradicts frame_index_base: an image numbered 0 while the
    images are read as 1-based, or no image 0 while they are read as 0-based.
    """
    images = index_frames(folder, self.bad)
    if not images:
      return {}
    found = (f"images numbered {min(images)}..{max(images)} ({images[min(images)].name} first), label frames "
             f"{min(labels)}..{max(labels)}")
    if self.frame_index_base == 1 and 0 in images:
      raise ValueError(
        f"{folder}: the frame images look numbered from 0 ({found}), while DISFA label frames count from 1; "
        "reading them as 1-based would give every image the labels of the frame before it. If image i is the video's "
        "frame i counted from 0, pass frame_index_base=0 (--frame_index_base=0) to pair it with label frame "
        "i + 1; otherwise remove the image numbered 0")
    if self.frame_index_base == 0 and 0 not in images:
      raise ValueError(
        f"{folder}: frame_index_base=0 (--frame_index_base=0) reads image i as label frame i + 1, but there is "
        f"no image numbered 0 ({found}): the images look numbered from 1; drop frame_index_base=0")
    shift = 1 - self.frame_index_base
    return {number + shift: path for number, path in images.items()}

  def _images(self, plan) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (plan item, uint8 (H, W, 3) image) for the readable items of `plan`; each video decoded once."""
    i = 0
    while i < len(plan):
      item = plan[i]
      source = item[6]
      if source[0] == "image":
        i += 1
        try:
          yield item, load_rgb(source[1])
        except (FileNotFoundError, ValueError) as e:
          self.bad.report(e, source[1])
        continue
      # A run of items of the same video, in increasing frame order.
      video = source[1]
      run = []
      while i < len(plan) and plan[i][6][0] == "video" and plan[i][6][1] == video:
        run.append(plan[i])
        i += 1
      wanted = {it[6][2]: it for it in run}
      seen = 0
      try:
        for index, image in enumerate(iter_video_frames(video)):
          seen = index + 1
          if index in wanted:
            yield wanted.pop(index), image
          else:
            self.num_unlabelled_images += 1
      except ValueError as e:
        error = ValueError(f"{e} (after {seen} frames; {len(wanted)} labelled frames not read)")
        self.bad.report(error, video)
        continue
      if wanted:
        first = min(wanted)
        self.bad.report(FileNotFoundError(
          f"{video} has {seen} frames but labels go up to frame {max(wanted) + 1}: {len(wanted)} labelled "
          f"frames (from label frame {first + 1}) have no image"), video)

  def _generate_examples(self, plan):
    for item, image in self._images(plan):
      key, subject, s_index, frame, au, intensity, source, points = item
      src = source_id(source[1]) if source[0] == "image" else source_id(source[1], source[2])
      where = str(source[1]) if source[0] == "image" else f"{source[1]}#frame{source[2]}"
      cropped = self.cropper(subject, frame, src, image, points, where)
      if cropped is None:
        continue
      yield key, {
        "image": encode_image(cropped[0]),
        "au": au,
        "au_intensity": intensity,
        "landmarks": cropped[1],
        "subject": s_index,
        "subject_id": subject,
        "task": "",
        "frame": frame,
      }

  def download_and_prepare(self, *args, **kwargs):
    try:
      super().download_and_prepare(*args, **kwargs)
    finally:
      if self.cropper is not None:
        self.cropper.save()
    if self.cropper is not None:
      self.cropper.finish(self.data_dir, "DISFA")
    self.bad.log()
