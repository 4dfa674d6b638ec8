r"""Builds the BP4D / DISFA TFDS datasets from Python (the `tfds build` CLI needs TensorFlow; this does not).

  python -m maejax.data.prepare --dataset=bp4d --manual_dir=/data/BP4D --data_dir=~/tensorflow_datasets \
      [--images_subdir=2D+3D] [--landmarks_dir=...] [--skip_bad]
  python -m maejax.data.prepare --dataset=disfa --manual_dir=/data/DISFA --data_dir=~/tensorflow_datasets \
      [--frame_index_base=0] [--landmarks_dir=...] [--skip_bad]

Reading back (random access, straight into `grain.MapDataset.source`):
  src = data_source("bp4d", "fold1_train", data_dir=...)   # == tfds.data_source("bp4d", split="part1+part2")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds
from absl import app, flags, logging

from maejax.data import folds
from maejax.data.bp4d import Bp4d
from maejax.data.disfa import Disfa

BUILDERS = {"bp4d": Bp4d, "disfa": Disfa}


def make_builder(dataset: str, *, data_dir: str | os.PathLike | None = None, skip_bad: bool = False,
                 **builder_kwargs) -> tfds.core.DatasetBuilder:
  """The `Bp4d` / `Disfa` builder (array_record). builder_kwargs: images_subdir (BP4D), frame_index_base
  (DISFA), landmarks_dir."""
  name = dataset.lower()
  if name not in BUILDERS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(BUILDERS)}.")
  data_dir = None if data_dir is None else os.path.expanduser(os.fspath(data_dir))
  return BUILDERS[name](data_dir=data_dir, skip_bad=skip_bad, **builder_kwargs)


def prepare(dataset: str, manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
            skip_bad: bool = False, **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Builds `dataset` ("bp4d" | "disfa") from the official files in `manual_dir` into `data_dir`.

  Returns the prepared builder; `builder.bad.count` is the number of skipped bad inputs (0 unless skip_bad).
  """
  manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f"manual_dir not found: {manual_dir}")
  builder = make_builder(dataset, data_dir=data_dir, skip_bad=skip_bad, **builder_kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def data_source(dataset: str, split: str, *, data_dir: str | os.PathLike | None = None,
                **kwargs: Any) -> Sequence[dict[str, Any]]:
  """Random-access records of a prepared dataset. `split`: "part1".."part3", any TFDS split string
  ("part1+part3"), or a fold split "fold<k>_train" / "fold<k>_test" (k = 1..3)."""
  builder = make_builder(dataset, data_dir=data_dir)
  return builder.as_data_source(split=folds.resolve_split(split), **kwargs)


_DATASET = flags.DEFINE_enum("dataset", None, sorted(BUILDERS), "Which AU dataset to build.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official release (see the builder's "
                                  "MANUAL_DOWNLOAD_INSTRUCTIONS).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write to "
                                "(default ~/tensorflow_datasets).")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Skip (count and log) bad inputs instead of failing.")
_IMAGES_SUBDIR = flags.DEFINE_string("images_subdir", "2D+3D", "BP4D: frames folder under manual_dir.")
_LANDMARKS_DIR = flags.DEFINE_string("landmarks_dir", None, "Optional landmarks folder "
                                     "(see the builder docs).")
_FRAME_INDEX_BASE = flags.DEFINE_integer(
  "frame_index_base", 1, "DISFA: number of the first extracted frame image in frames/<subject>/; 0 pairs "
  "image i with label frame i + 1 (frames written from 0, e.g. 0.png or frame_000000.jpg).", lower_bound=0,
  upper_bound=1)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  kwargs: dict[str, Any] = {"landmarks_dir": _LANDMARKS_DIR.value}
  if _DATASET.value == "bp4d":
    kwargs["images_subdir"] = _IMAGES_SUBDIR.value
    if _FRAME_INDEX_BASE.present:
      raise ValueError("--frame_index_base is a DISFA option (BP4D image names are the label frame numbers)")
  else:
    kwargs["frame_index_base"] = _FRAME_INDEX_BASE.value
  builder = prepare(_DATASET.value, _MANUAL_DIR.value, _DATA_DIR.value, skip_bad=_SKIP_BAD.value, **kwargs)
  for split, info in sorted(builder.info.splits.items()):
    logging.info("%s %s: %d examples", builder.name, split, info.num_examples)
  logging.info("%s: %s; %d unlabelled images not used. Written to %s", builder.name, builder.bad.summary(),
               builder.num_unlabelled_images, builder.data_dir)


if __name__ == "__main__":
  from maejax import cli
  flags.mark_flags_as_required(["dataset", "manual_dir"])
  cli.run(main, prog="maejax.data.prepare")
