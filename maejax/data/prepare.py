r"""Builds the BP4D / DISFA TFDS datasets from Python (the `tfds build` CLI needs TensorFlow; this does not).

  python -m maejax.data.prepare --dataset=bp4d --manual_dir=/data/BP4D --data_dir=~/tensorflow_datasets \
      [--images_subdir=2D+3D] [--align=detect|landmarks|center] [--landmarks_dir=...] [--skip_bad] \
      [--aux_subdirs=depth:Depth,thermal:Thermal]
  python -m maejax.data.prepare --dataset=disfa --manual_dir=/data/DISFA --data_dir=~/tensorflow_datasets \
      [--frame_index_base=0] [--align=detect|landmarks|center] [--landmarks_dir=...] [--skip_bad]

Crops: ``--align=detect`` (default) = the largest face found by BlazeFace (``maejax.faces``, the ``faces``
extra; ``--face_model=PATH`` for local model files), its FFHQ-style square at 256 px, the keypoints stored in
every record (``landmarks``, crop pixels). Detections are cached per sequence under
``<data_dir>/downloads/face_detections/<dataset>/``, so a rebuild does not detect again; frames without a face
are left out, counted in the log and listed in ``no_face.txt`` in the dataset folder. ``--align=landmarks`` with
``--landmarks_dir`` crops 1.4 × the box of the dataset's points; ``--align=center`` the centred square (corpora
of face crops).

BP4D's auxiliary modalities (MCM pretraining): ``--aux_subdirs=depth:Depth,thermal:Thermal`` (record key :
folder under manual_dir) also stores, per labelled frame, the 8-bit greyscale image
``<manual_dir>/<subdir>/<subject>/<task>/<frame>.png`` of each modality, cut with the 2-D frame's crop, as a
(256, 256, 1) PNG feature named by the key. The raw 3-D meshes / thermal recordings are not read: converting them
into that layout is the user's step (see the Bp4d builder's MANUAL_DOWNLOAD_INSTRUCTIONS). Such a build is the
builder config ``aux-<keys>`` beside the plain RGB dataset; DISFA has no auxiliary modalities.

Reading back (random access, straight into `grain.MapDataset.source`):
  src = data_source("bp4d", "fold1_train", data_dir=...)   # == tfds.data_source("bp4d", split="part1+part2")
  src = data_source("bp4d", "fold1_train", data_dir=..., aux=("depth",))   # a build with depth (and maybe more)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags, logging

from maejax.data import folds
from maejax.data.bp4d import Bp4d, check_aux_keys, prepared_aux_config
from maejax.data.disfa import Disfa

BUILDERS = {"bp4d": Bp4d, "disfa": Disfa}


def make_builder(dataset: str, *, data_dir: str | os.PathLike | None = None, skip_bad: bool = False,
                 **builder_kwargs) -> tfds.core.DatasetBuilder:
  """The `Bp4d` / `Disfa` builder (array_record). builder_kwargs: images_subdir, aux_subdirs (BP4D),
  frame_index_base (DISFA), landmarks_dir."""
  name = dataset.lower()
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}.")
  if name != "bp4d" and builder_kwargs.get("aux_subdirs"):
    raise ValueError(f"aux_subdirs / --aux_subdirs: {name} has no auxiliary modalities (depth, thermal); they are "
                     "a BP4D option")
  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  return BUILDERS[name](data_dir=data_dir, skip_bad=skip_bad, **builder_kwargs)


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
            skip_bad: bool = False, align: str = "detect", aligner: Any = None, face_model: str | None = None,
            **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Builds `dataset` ("bp4d" | "disfa") from the official files in `manual_dir` into `data_dir`.

  align: "detect" | "landmarks" | "center" (module docstring). With "detect", `aligner` (an
  `images.FaceAligner`) finds the faces; by default a `maejax.faces.FrameAligner` on `face_model` (None: the
  model cache), closed at the end. Returns the prepared builder; `builder.bad.count` is the number of skipped
  bad inputs (0 unless skip_bad), `builder.cropper.no_face` the frames without a face.
  """
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir not found: {manual_dir}")
  own = align == "detect" and aligner is None
  if own:
    from maejax import faces  # the one place data reaches the face detector (mediapipe is imported lazily)
    aligner = faces.FrameAligner(face_model)
  try:
    builder = make_builder(dataset, data_dir=data_dir, skip_bad=skip_bad, align=align, aligner=aligner,
                           **builder_kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  finally:
    if own:
      aligner.close()
  return builder


def data_source(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None, aux: Sequence[str] = (),
                **kwargs: Any) -> Sequence[dict[str, Any]]:
  """Random-access records of a prepared dataset. `split`: "part1".."part3", any TFDS split string
  ("part1+part3"), or a fold split "fold<k>_train" / "fold<k>_test" (k = 1..3). `aux`: auxiliary modality keys
  the records must carry (BP4D prepared with --aux_subdirs): reads the build that has them
  (`bp4d.prepared_aux_config`; ValueError naming a key no build has)."""
  builder_kwargs = {}
  if aux:
    if dataset.lower() != "bp4d":
      raise ValueError(f"auxiliary modalities {list(aux)}: {dataset} has none; only BP4D is prepared with them "
                       "(--aux_subdirs)")
    builder_kwargs["config"] = prepared_aux_config(data_dir, aux)
  builder = make_builder(dataset, data_dir=data_dir, **builder_kwargs)
  return builder.as_data_source(split=folds.resolve_split(split), **kwargs)


def parse_aux_subdirs(text: str) -> dict[str, str]:
  """``"depth:Depth,thermal:Thermal"`` → ``{"depth": "Depth", "thermal": "Thermal"}`` (record key : folder under
  manual_dir). ValueError naming the bad item: no ``:``, an empty key or folder, a repeated or invalid key."""
  out: dict[str, str] = {}
  for item in text.split(","):
    key, sep, subdir = (v.strip() for v in item.partition(":"))
    if not sep or not key or not subdir:
      raise ValueError(f"--aux_subdirs={text!r}: item {item!r} is not key:subdir (expected e.g. "
                       "depth:Depth,thermal:Thermal)")
    if key in out:
      raise ValueError(f"--aux_subdirs={text!r}: key {key!r} appears twice")
    out[key] = subdir
  check_aux_keys(list(out))
  return out


_DATASET = flags.DEFINE_enum("dataset", None, sorted(BUILDERS), "Which AU dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official release (see the builder's "
                                  "MANUAL_DOWNLOAD_INSTRUCTIONS).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write to "
                                "(default ~/tensorflow_datasets).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Skip (count and log) bad inputs instead of failing.")
_IMAGES_SUBDIR = flags.DEFINE_string("images_subdir", "2D+3D", "BP4D: frames folder under manual_dir.")
_AUX_SUBDIRS = flags.DEFINE_string("aux_subdirs", None, "BP4D: auxiliary modalities to store with every frame, "
                                   "key:folder under manual_dir, e.g. depth:Depth,thermal:Thermal (8-bit greyscale "
                                   "<folder>/<subject>/<task>/<frame>.png, aligned with the 2-D frames).")
_LANDMARKS_DIR = flags.DEFINE_string("landmarks_dir", None, "Landmarks folder of --align=landmarks "
                                     "(see the builder docs).")
_ALIGN = flags.DEFINE_enum("align", "detect", ["detect", "landmarks", "center"], "Face crop: detect (BlazeFace, "
                           "FFHQ-style square; needs the faces extra), landmarks (--landmarks_dir), center (the "
                           "frames already are face crops).")
_FACE_MODEL = flags.DEFINE_string("face_model", None, "--align=detect: local face detector models (a folder with "
                                  "the two BlazeFace .tflite files, the mediapipe 0.10.21 wheel, or one .tflite).")
_FRAME_INDEX_BASE = flags.DEFINE_integer(
  "frame_index_base", 1, "DISFA: number of the first extracted frame image in frames/<subject>/; 0 pairs "
  "image i with label frame i + 1 (frames written from 0, e.g. 0.png or frame_000000.jpg).", lower_bound=0,
  upper_bound=1)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every build step at INFO; the summary below is printed
  kwargs: dict[str, Any] = {"landmarks_dir": _LANDMARKS_DIR.value}
  if _DATASET.value == "bp4d":
    kwargs["images_subdir"] = _IMAGES_SUBDIR.value
    if _AUX_SUBDIRS.value is not None:
      kwargs["aux_subdirs"] = parse_aux_subdirs(_AUX_SUBDIRS.value)
    if _FRAME_INDEX_BASE.present:
      raise ValueError("--frame_index_base is a DISFA option (BP4D image names are the label frame numbers)")
  else:
    if _AUX_SUBDIRS.value is not None:
      raise ValueError(f"--aux_subdirs is a BP4D option: {_DATASET.value} has no auxiliary modalities (depth, "
                       "thermal)")
    kwargs["frame_index_base"] = _FRAME_INDEX_BASE.value
  builder = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value, skip_bad=_SKIP_BAD.value,
                    align=_ALIGN.value, face_model=_FACE_MODEL.value, **kwargs)
  for split, info in sorted(builder.info.splits.items()):
    print(f"{builder.name} {split}: {info.num_examples} examples", flush=True)
  no_face = len(builder.cropper.no_face) if builder.cropper is not None else 0
  if builder.builder_config is not None:
    print(f"{builder.name}: config {builder.builder_config.name}, auxiliary features {list(builder.aux_keys)}",
          flush=True)
  print(f"{builder.name}: {builder.bad.summary()}; {builder.num_unlabelled_images} unlabelled images not used; "
        f"{no_face} labelled frames without a face left out. Written to {builder.data_dir}", flush=True)


if __name__ == "__main__":
  from maejax import cli
  flags.mark_flags_as_required(["dataset", "manual_dir"])
  cli.run(main, prog="maejax.data.prepare")
