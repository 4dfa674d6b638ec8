"""BP4D-Spontaneous AU occurrence as a TFDS builder (array_record, random access for grain).

Reads the official folder layout from the manual directory (see `Bp4d.MANUAL_DOWNLOAD_INSTRUCTIONS`), crops
each labelled frame to a 256×256 face (`align`: "detect" (default) = the largest BlazeFace face, FFHQ-style square,
detections cached per sequence; "landmarks" = 1.4 × the box of the dataset's points; "center" = the centred square;
see `images.FaceCropper`) and writes one split per subject part of the 3-fold protocol
(`maejax.data.folds`): `part1`, `part2`, `part3`. Fold splits are compositions: fold 1 = train "part1+part2",
test "part3", etc. (`folds.fold_split`). Build with `python -m maejax.data.prepare --dataset=bp4d
--manual_dir=... --data_dir=...`.

Record (one per labelled frame):
  image        uint8 (256, 256, 3)  JPEG-encoded on disk (quality 95, 4:4:4)
  au           int8 (12,)           occurrence of AUs 1 2 4 6 7 10 12 14 15 17 23 24: 1, 0, −1 = unscored (9)
  au_intensity float32 (12,)        −1 (BP4D occurrence files carry no intensity)
  landmarks    float32 (5, 2)       eyes, nose tip, mouth corners in the crop (align="detect"), else −1 (unknown)
  subject      int32                index in folds.BP4D_SUBJECTS (int, like synthfaces)
  subject_id   string               "F001"
  task         string               "T1".."T8"
  frame        int32                frame number of the label file
  <aux key>    uint8 (256, 256, 1)  only with `aux_subdirs`: one PNG per auxiliary modality (e.g. depth, thermal)

Auxiliary modalities (for MCM pretraining, `maejax.models.mcm`): `aux_subdirs={"depth": "Depth", "thermal":
"Thermal"}` (`--aux_subdirs=depth:Depth,thermal:Thermal`) reads, for every labelled frame, one 8-bit greyscale
image per modality from `<manual_dir>/<subdir>/<subject>/<task>/<frame>.<ext>`, the same per-frame layout and
frame-number matching as the 2-D frames, pixel-aligned with the 2-D frame of that number (same width and height).
Each is cut with the 2-D frame's own crop (`images.crop_channels`) and resized to 256. maejax does not read the
releases' raw 3-D meshes (BP4D) or thermal recordings (BP4D+): rendering depth from the meshes and extracting
thermal frames into this layout is the user's step. Such a build is the builder config `aux-<key>-<key>...` (keys
sorted; `Bp4dConfig`), written to `<data_dir>/bp4d/aux-depth-thermal/<version>/`, beside the plain RGB dataset in
`<data_dir>/bp4d/<version>/` whose features and path do not change; `prepare.data_source(..., aux=keys)` finds
it (`prepared_aux_config`).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from maejax.data import folds
from maejax.data.images import (
  AU_FEATURE_KEYS,
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
  load_grey,
  load_rgb,
  read_landmarks_csv,
  source_id,
)

log = logging.getLogger(__name__)

IMAGE_SIZE = 256
NOT_SCORED = 9  # BP4D's code for "not scored"; stored as UNKNOWN.
UNKNOWN = -1

_LABEL_NAME = re.compile(r"^([FM]\d{3})_(T\d+)\.csv$")
_HEADER = "a header row of column numbers 0,1,2,...,99 (0 = frame number, N = AU N)"

_INSTRUCTIONS = f"""\
Put the licensed BP4D-Spontaneous release in the manual directory (--manual_dir) like this:

  <manual_dir>/AUCoding/AU_OCC/<subject>_<task>.csv      e.g. F001_T1.csv (official AU occurrence files)
  <manual_dir>/<images_subdir>/<subject>/<task>/<frame>.jpg  e.g. 2D+3D/F001/T1/0012.jpg (per-frame images)

images_subdir defaults to "2D+3D" (pass images_subdir=... / --images_subdir=... for another name). Image file
names end in the frame numbers of the CSV's column 0, zero-padded or not (0012.jpg, 12.png); extensions read:
{", ".join(IMAGE_EXTS)}.
Every label file needs its image folder and every labelled frame its image. Images with no label row (BP4D
codes a segment of each task) are not examples; their count is logged.

Crops (align=... / --align=...): "detect" (default) finds the largest face with BlazeFace (pip install
'maejax[faces]') and cuts its FFHQ-style square; frames without a face are left out and listed in no_face.txt
next to the dataset. "landmarks" uses the dataset's tracked points: landmarks_dir=... / --landmarks_dir=...
holding <subject>_<task>.csv, lines `frame,x1,y1,...,xK,yK` in source-image pixels (optional header line
starting with "frame"); the crop is a square of 1.4 × the landmarks' bounding-box size centred on it. "center"
is the centred square of the image, for frames that already are face crops. Each is resized to 256×256.

Auxiliary modalities (optional, for MCM pretraining; aux_subdirs={{"depth": "Depth", "thermal": "Thermal"}} /
--aux_subdirs=depth:Depth,thermal:Thermal, record key : folder under the manual directory):

  <manual_dir>/<aux_subdir>/<subject>/<task>/<frame>.png     e.g. Depth/F001/T1/0012.png, Thermal/F001/T1/0012.png

one 8-bit single-channel (greyscale) image per labelled frame, named by frame number like the 2-D frames, and
pixel-aligned with the 2-D frame of the same number (same width and height: it is cut with that frame's crop).
maejax does not read the raw releases' 3-D meshes (BP4D) or thermal recordings (BP4D+): their formats are not
implemented here. Converting them into this layout (rendering a depth map from each frame's mesh in the 2-D
camera's view, extracting and registering the thermal frames) is your step. A labelled frame without its
auxiliary image is a bad input like a missing 2-D frame.
"""

AUX_CONFIG_PREFIX = "aux-"
_AUX_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


def read_au_occ_csv(path: str | os.PathLike, aus: tuple[int, ...] = folds.BP4D_AUS) -> dict[int, np.ndarray]:
  """Parses a BP4D `AU_OCC/<subject>_<task>.csv`.

  Header row of integers (0..99): column with header 0 = frame number, column with header N = AU N. Values
  0/1, 9 = not scored. Returns {frame: int8 (len(aus),)} with 9 mapped to −1. Only the columns of `aus` are
  read as labels. ValueError naming the file, the line and what was expected when the file is not text, the
  header is missing or lacks a wanted AU, a row has the wrong length, a value is not 0/1/9 or a frame repeats.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"BP4D label file not found: {path}")
  rows = _read_csv_rows(path)
  if not rows:
    raise ValueError(f"{path}: empty label file; expected {_HEADER}, then one row per frame")
  header = _parse_header(path, *rows[0])
  missing = [a for a in aus if a not in header]
  if missing:
    raise ValueError(f"{path}: line {rows[0][0]}: header has no column for AU(s) {missing}; expected {_HEADER}")
  columns = [header.index(a) for a in aus]
  labels: dict[int, np.ndarray] = {}
  for line_no, row in rows[1:]:
    frame, values = _parse_row(path, line_no, row, len(header), columns, aus)
    if frame in labels:
      raise ValueError(f"{path}: line {line_no}: frame {frame} appears twice")
    labels[frame] = np.asarray([UNKNOWN if v == NOT_SCORED else v for v in values], dtype=np.int8)
  if not labels:
    raise ValueError(f"{path}: no label rows after the header; expected one row per frame")
  return labels


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
  """[(line number, cells)] of the non-blank rows of a CSV file; ValueError naming it when it is not text."""
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
  except (UnicodeDecodeError, csv.Error) as e:
    raise ValueError(f"{path}: not a CSV text file ({e}); expected {_HEADER}, then one row per frame") from None


def _parse_header(path: Path, line_no: int, row: list[str]) -> list[int]:
  """The column numbers of the header row (trailing empty cells dropped)."""
  cells = [c.strip() for c in row]
  while cells and not cells[-1]:
    cells.pop()
  shown = ",".join(cells[:4]) + (",..." if len(cells) > 4 else "")
  where = f"{path}: line {line_no}"
  header = []
  for i, cell in enumerate(cells):
    try:
      number = float(cell)
      if not number.is_integer():
        raise ValueError
    except (ValueError, OverflowError):
      raise ValueError(f"{where}: header cell {i + 1} is {cell!r}, not a column number; expected {_HEADER}"
                       ) from None
    header.append(int(number))
  if header[0] != 0 or len(set(header)) != len(header):
    raise ValueError(f"{where}: expected {_HEADER}, got {shown!r} (is the header row missing?)")
  return header


def _parse_row(path: Path, line_no: int, row: list[str], width: int, columns: list[int],
               aus: tuple[int, ...]) -> tuple[int, list[int]]:
  """(frame, [value of each AU of `aus`]) of one label row of `width` cells; ValueError naming the line."""
  where = f"{path}: line {line_no}"
  cells = [c.strip() for c in row]
  while len(cells) > width and not cells[-1]:
    cells.pop()  # tolerate trailing commas
  if len(cells) != width:
    raise ValueError(f"{where}: {len(cells)} values, expected {width} (one per header column)")
  try:
    frame = int(cells[0])
  except ValueError:
    raise ValueError(f"{where}: the frame number (column 1) and AU values must be integers, got frame "
                     f"{cells[0]!r}") from None
  values = []
  for au, column in zip(aus, columns, strict=True):
    cell = cells[column]
    try:
      values.append(int(cell))
    except ValueError:
      raise ValueError(f"{where}: AU values must be integers 0, 1 or 9 (not scored); AU {au} (column "
                       f"{column + 1}) is {cell!r}") from None
  bad = [(a, v) for a, v in zip(aus, values, strict=True) if v not in (0, 1, NOT_SCORED)]
  if bad:
    raise ValueError(f"{where}: AU values must be 0, 1 or 9 (not scored); got (AU, value) {bad}")
  return frame, values


@dataclasses.dataclass(eq=False)
class Bp4dConfig(tfds.core.BuilderConfig):
  """A BP4D build with auxiliary modalities: ``aux`` = their record keys (sorted), each an extra (256, 256, 1)
  PNG feature. Named ``aux-<key>-<key>...`` (:func:`aux_config`); the plain build has no config."""

  aux: tuple[str, ...] = ()


def check_aux_keys(keys: Sequence[str]) -> tuple[str, ...]:
  """The sorted auxiliary record keys; ValueError naming a key that is not lower-case ``[a-z][a-z0-9_]*``, repeats
  or clashes with a record feature."""
  keys = tuple(keys)
  for k in keys:
    if not isinstance(k, str) or not _AUX_KEY.match(k):
      raise ValueError(f"auxiliary modality key {k!r}: expected a lower-case name [a-z][a-z0-9_]* (e.g. depth)")
  if len(set(keys)) != len(keys):
    raise ValueError(f"auxiliary modality keys {list(keys)}: a key repeats")
  clash = sorted(set(keys) & set(AU_FEATURE_KEYS))
  if clash:
    raise ValueError(f"auxiliary modality key(s) {clash} clash with the record features {AU_FEATURE_KEYS}")
  return tuple(sorted(keys))


def aux_config(keys: Sequence[str]) -> Bp4dConfig:
  """The builder config of a build with the auxiliary modalities ``keys``: ``aux-<key>-...``, keys sorted."""
  keys = check_aux_keys(keys)
  if not keys:
    raise ValueError("aux_config: expected at least one auxiliary modality key")
  return Bp4dConfig(name=AUX_CONFIG_PREFIX + "-".join(keys), aux=keys,
                    description=f"RGB face crops plus the auxiliary modalities {', '.join(keys)}.")


def prepared_aux_config(data_dir: str | os.PathLike | None, keys: Sequence[str]) -> Bp4dConfig:
  """The config of the prepared BP4D build in ``data_dir`` (None: the TFDS default) that carries every key of
  ``keys``: the one with exactly these keys, else the one with the fewest others. ValueError naming the missing
  key(s), what is prepared and the ``--aux_subdirs`` to prepare it with when there is none."""
  wanted = check_aux_keys(keys)
  folder = Path(os.fspath(Bp4d(data_dir=None if data_dir is None else os.fspath(data_dir)).data_dir_root)) / "bp4d"
  prepared = []
  if folder.is_dir():
    for d in sorted(folder.iterdir()):
      if d.name.startswith(AUX_CONFIG_PREFIX) and (d / str(Bp4d.VERSION) / "dataset_info.json").is_file():
        prepared.append(tuple(d.name[len(AUX_CONFIG_PREFIX):].split("-")))
  fits = sorted((k for k in prepared if set(wanted) <= set(k)), key=lambda k: (len(k), k))
  if fits:
    return aux_config(fits[0])
  have = sorted({k for ks in prepared for k in ks})
  missing = [k for k in wanted if k not in have] or list(wanted)
  flag = ",".join(f"{k}:<subdir>" for k in wanted)
  raise ValueError(
    f"BP4D data in {folder} (version {Bp4d.VERSION}) has no build with the auxiliary feature(s) {missing} "
    f"(prepared auxiliary builds: {[AUX_CONFIG_PREFIX + '-'.join(k) for k in prepared] or 'none'}); prepare one "
    f"with python -m maejax.data.prepare --dataset=bp4d --aux_subdirs={flag} --manual_dir=... --data_dir=... "
    "(see the Bp4d builder's MANUAL_DOWNLOAD_INSTRUCTIONS for the layout)")


class Bp4d(tfds.core.GeneratorBasedBuilder):
  """BP4D-Spontaneous AU occurrence, one split per fold part: part1, part2, part3."""

  name = "bp4d"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "AU_OCC labels, 12 AUs, 256×256 face crops, per-part splits.",
    "2.0.0": "Crops from BlazeFace detection (align='detect', FFHQ-style square) by default; `landmarks` feature "
             "(5, 2) in the crop; frames without a face listed in no_face.txt.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default resolves the path through `importlib_resources`, a package tfds does not install.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, skip_bad: bool = False, images_subdir: str = "2D+3D", align: str = "detect",
               aligner: FaceAligner | None = None, landmarks_dir: str | os.PathLike | None = None,
               aux_subdirs: Mapping[str, str] | None = None, **kwargs):
    """skip_bad: count and log bad inputs instead of raising. images_subdir: folder of per-frame images under
    the manual dir. align: one of images.ALIGNS; aligner: the face aligner of align="detect" (needed to build,
    not to read); landmarks_dir: the landmarks folder of align="landmarks" (absolute, or relative to the manual
    dir). aux_subdirs: {record key: folder under the manual dir} of the auxiliary modalities to build (module
    docstring); selects the config :func:`aux_config` of its keys. To read an auxiliary build, pass
    ``config=aux_config(keys)`` (or use ``prepare.data_source(..., aux=keys)``)."""
    check_align(align, landmarks_dir)
    self.aux_subdirs = dict(aux_subdirs or {})
    if self.aux_subdirs:
      empty = [k for k, v in self.aux_subdirs.items() if not str(v).strip()]
      if empty:
        raise ValueError(f"aux_subdirs: no folder given for key(s) {empty}; expected {{key: subdir}}, e.g. "
                         "{'depth': 'Depth'}")
      if kwargs.get("config") is not None:
        raise ValueError("Bp4d: pass aux_subdirs (to build) or config (to read), not both")
      kwargs["config"] = aux_config(self.aux_subdirs)
    self.skip_bad = skip_bad
    self.images_subdir = images_subdir
    self.align, self.aligner = align, aligner
    self.landmarks_dir = landmarks_dir
    self.cropper: FaceCropper | None = None
    self.bad = BadInputs(skip_bad, what="BP4D inputs")
    self.num_unlabelled_images = 0
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @property
  def aux_keys(self) -> tuple[str, ...]:
    """The auxiliary modality keys of this build (sorted; () for the plain RGB build)."""
    return self.builder_config.aux if self.builder_config is not None else ()

  def _info(self) -> tfds.core.DatasetInfo:
    n = len(folds.BP4D_AUS)
    metadata = dict(aus=list(folds.BP4D_AUS), parts=[list(p) for p in folds.BP4D_PARTS], align=self.align)
    if self.aux_keys:
      metadata.update(aux=list(self.aux_keys), aux_subdirs={k: str(self.aux_subdirs.get(k, "")) for k in self.aux_keys})
    return tfds.core.DatasetInfo(
      builder=self,
      description="BP4D-Spontaneous facial action unit occurrence (12 AUs), 256×256 face crops.",
      features=au_features(n, IMAGE_SIZE, self.aux_keys),
      homepage="https://www.cs.binghamton.edu/~lijun/Research/3DFE/3DFE_Analysis.html",
      metadata=tfds.core.MetadataDict(**metadata),
    )

  def _split_generators(self, dl_manager):
    plans = self.scan(Path(dl_manager.manual_dir))
    self.cropper = FaceCropper(self.align, self.aligner, detection_cache_dir(dl_manager, self.name), IMAGE_SIZE)
    return folds.part_splits(plans, self._generate_examples, "BP4D")

  def scan(self, manual_dir: Path) -> dict[int, list[tuple]]:
    """Reads all labels and lists the images without decoding them. Returns {part: [(key, subject, subject
    index, task, frame, au, image_path, points)]}; raises (or, with skip_bad, counts) every structural problem."""
    manual_dir = Path(manual_dir)
    labels_dir = manual_dir / "AUCoding" / "AU_OCC"
    images_dir = manual_dir / self.images_subdir
    if set(self.aux_subdirs) != set(self.aux_keys):
      raise ValueError(f"Bp4d config {self.builder_config_name!r} has the auxiliary keys {list(self.aux_keys)}: "
                       "building it needs aux_subdirs={key: subdir} for exactly those keys")
    aux_dirs = {k: manual_dir / self.aux_subdirs[k] for k in self.aux_keys}
    for d in (labels_dir, images_dir, *aux_dirs.values()):
      if not d.is_dir():
        raise FileNotFoundError(f"BP4D folder not found: {d}\n{_INSTRUCTIONS}")
    landmarks_dir = landmarks_folder(manual_dir, self.landmarks_dir, "BP4D")
    sequences = self._label_files(labels_dir)
    self._check_image_folders_are_labelled(images_dir, labels_dir, sequences)
    if not sequences:
      raise FileNotFoundError(f"No BP4D label files <subject>_<task>.csv in {labels_dir}\n{_INSTRUCTIONS}")
    plans: dict[int, list[tuple]] = {1: [], 2: [], 3: []}
    for (subject, task), label_path in sorted(sequences.items()):
      try:
        part = folds.part_of("bp4d", subject)
      except ValueError as e:
        self.bad.report(ValueError(f"{label_path}: {e}"), label_path)
        continue
      plans[part] += self._plan_sequence(subject, task, label_path, images_dir / subject / task, landmarks_dir,
                                         {k: d / subject / task for k, d in aux_dirs.items()})
    if self.num_unlabelled_images:
      log.info("BP4D: %d images have no label row (outside the AU-coded segments) and are not examples.",
               self.num_unlabelled_images)
    return plans

  def _label_files(self, labels_dir: Path) -> dict[tuple[str, str], Path]:
    """{(subject, task): path} of the `<subject>_<task>.csv` files; other .csv names are bad inputs."""
    sequences = {}
    for path in sorted(labels_dir.iterdir()):
      if path.suffix.lower() != ".csv":
        continue
      match = _LABEL_NAME.match(path.name)
      if not match or match.group(2) not in folds.BP4D_TASKS:
        self.bad.report(ValueError(f"{path}: label file name is not <subject>_<task>.csv with task T1..T8"), path)
        continue
      sequences[(match.group(1), match.group(2))] = path
    return sequences

  def _check_image_folders_are_labelled(self, images_dir: Path, labels_dir: Path,
                                        sequences: dict[tuple[str, str], Path]) -> None:
    """An image folder `<subject>/<task>` without its label file is a bad input: the label file is missing."""
    for subject_dir in sorted(p for p in images_dir.iterdir() if p.is_dir()):
      for task_dir in sorted(p for p in subject_dir.iterdir() if p.is_dir()):
        if (subject_dir.name, task_dir.name) not in sequences:
          expected = labels_dir / f"{subject_dir.name}_{task_dir.name}.csv"
          self.bad.report(FileNotFoundError(f"Missing label file {expected} for image folder {task_dir}"), expected)

  def _plan_sequence(self, subject: str, task: str, label_path: Path, task_dir: Path,
                     landmarks_dir: Path | None, aux_task_dirs: Mapping[str, Path]) -> list[tuple]:
    """The plan items of one label file: its labelled frames that have an image (and landmarks, if used, and an
    image of each auxiliary modality in ``aux_task_dirs``: {key: folder of the sequence})."""
    bad = self.bad
    try:
      labels = read_au_occ_csv(label_path)
    except ValueError as e:
      bad.report(e, label_path)
      return []
    if not task_dir.is_dir():
      bad.report(FileNotFoundError(f"No image folder {task_dir} for label file {label_path}"), task_dir)
      return []
    frames = index_frames(task_dir, bad)
    aux_frames = {}
    for k, aux_dir in aux_task_dirs.items():
      if not aux_dir.is_dir():
        bad.report(FileNotFoundError(f"No {k} folder {aux_dir} for label file {label_path} (auxiliary modality "
                                     f"{k!r}: one image per labelled frame)"), aux_dir)
        return []
      aux_frames[k] = index_frames(aux_dir, bad)
    points = None
    if landmarks_dir is not None:
      lm_path = landmarks_dir / f"{subject}_{task}.csv"
      try:
        points = read_landmarks_csv(lm_path)
      except (FileNotFoundError, ValueError) as e:
        bad.report(e, lm_path)
        return []
    self.num_unlabelled_images += len(set(frames) - set(labels))
    s_index = folds.subject_index("bp4d", subject)
    items = []
    for frame, au in sorted(labels.items()):
      if frame not in frames:
        bad.report(FileNotFoundError(
          f"No image for labelled frame {frame} of {label_path}: expected {task_dir}/{frame}.jpg "
          f"(zero-padded names like {frame:04d}.jpg also match)"), task_dir / f"{frame}.jpg")
        continue
      missing = [k for k in aux_task_dirs if frame not in aux_frames[k]]
      if missing:
        expected = [aux_task_dirs[k] / f"{frame}.png" for k in missing]
        bad.report(FileNotFoundError(
          f"No {' / '.join(missing)} image for labelled frame {frame} of {label_path}: expected "
          f"{', '.join(map(str, expected))} (zero-padded names like {frame:04d}.png and the extensions "
          f"{', '.join(IMAGE_EXTS)} also match)"), expected[0])
        continue
      frame_points = None
      if points is not None:
        if frame not in points:
          bad.report(ValueError(f"{lm_path}: no landmarks for frame {frame}"), lm_path)
          continue
        frame_points = points[frame]
      items.append((f"{subject}_{task}_{frame}", subject, s_index, task, frame, au, frames[frame], frame_points,
                    {k: aux_frames[k][frame] for k in aux_task_dirs}))
    return items

  def _generate_examples(self, plan):
    nan_intensity = np.full((len(folds.BP4D_AUS),), -1.0, np.float32)
    for key, subject, s_index, task, frame, au, image_path, points, aux_paths in plan:
      try:
        image = load_rgb(image_path)
      except (FileNotFoundError, ValueError) as e:
        self.bad.report(e, image_path)
        continue
      aux = self._load_aux(image_path, image.shape[:2], aux_paths)
      if aux is None:
        continue
      cropped = self.cropper.crop_with_aux(f"{subject}_{task}", frame, source_id(image_path), image, points,
                                           str(image_path), list(aux.values()))
      if cropped is None:
        continue
      crop, landmarks, aux_crops = cropped
      yield key, {
        "image": encode_image(crop),
        "au": au,
        "au_intensity": nan_intensity,
        "landmarks": landmarks,
        "subject": s_index,
        "subject_id": subject,
        "task": task,
        "frame": frame,
        **{k: encode_image(a[:, :, 0], "png") for k, a in zip(aux, aux_crops, strict=True)},
      }

  def _load_aux(self, image_path: Path, shape: tuple[int, int],
                aux_paths: Mapping[str, Path]) -> dict[str, np.ndarray] | None:
    """{key: uint8 (H, W)} of a frame's auxiliary images; None (after a bad-input report) when one is unreadable
    or not the size of the 2-D frame ``image_path`` (``shape`` = its (H, W))."""
    out = {}
    for k, path in aux_paths.items():
      try:
        a = load_grey(path)
      except (FileNotFoundError, ValueError) as e:
        self.bad.report(e, path)
        return None
      if a.shape != shape:
        self.bad.report(ValueError(
          f"{path}: {k} image is {a.shape[1]}×{a.shape[0]} (W×H) but the 2-D frame {image_path} is "
          f"{shape[1]}×{shape[0]}; auxiliary images must be pixel-aligned with the 2-D frame of the same number "
          "(same width and height)"), path)
        return None
      out[k] = a
    return out

  def download_and_prepare(self, *args, **kwargs):
    try:
      super().download_and_prepare(*args, **kwargs)
    finally:
      if self.cropper is not None:
        self.cropper.save()
    if self.cropper is not None:
      self.cropper.finish(self.data_dir, "BP4D")
    self.bad.log()

