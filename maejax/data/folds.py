"""Subject lists, AU lists and the 3-fold subject-exclusive protocol of BP4D and DISFA.

The folds are the ones used by JAA-Net and ME-GraphAU (DESIGN.md §6): each dataset's subjects are split into
three fixed *parts*; fold k (k = 1, 2, 3) tests on part (4 − k) and trains on the other two parts.

    fold 1: train part1 + part2, test part3
    fold 2: train part1 + part3, test part2
    fold 3: train part2 + part3, test part1

The TFDS builders (`bp4d.py`, `disfa.py`) store one split per part (`part1`, `part2`, `part3`), so no frame is
stored twice; `fold_split(fold, "train")` gives the TFDS split string (e.g. ``"part1+part2"``) of a fold.
`train_val_subjects` holds a seeded subset of a fold's training subjects out for validation (tuning and threshold
calibration), subject-exclusive from the fold's test part by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

DATASETS = ("bp4d", "disfa")
NUM_FOLDS = 3

# AU numbers, in the order of the `au` / `au_intensity` vectors of the records.
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)

BP4D_TASKS = tuple(f"T{i}" for i in range(1, 9))

# Parts in the published order (JAA-Net / ME-GraphAU list files).
BP4D_PARTS = (
  ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023",
   "M008"),
  ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013",
   "M005"),
  ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
)
DISFA_PARTS = (
  ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
  ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
  ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
)

# All subjects, sorted; a subject's position here is its `subject_index` in the records.
BP4D_SUBJECTS = tuple([f"F{i:03d}" for i in range(1, 24)] + [f"M{i:03d}" for i in range(1, 19)])
DISFA_SUBJECTS = tuple(f"SN{i:03d}" for i in range(1, 33) if i not in (14, 15, 19, 20, 22))

_PARTS = {"bp4d": BP4D_PARTS, "disfa": DISFA_PARTS}
_SUBJECTS = {"bp4d": BP4D_SUBJECTS, "disfa": DISFA_SUBJECTS}
_AUS = {"bp4d": BP4D_AUS, "disfa": DISFA_AUS}


def _check_dataset(dataset: str) -> str:
  name = dataset.lower()
  if name not in _PARTS:
    raise ValueError(f"Unknown AU dataset {dataset!r}; expected one of {DATASETS}.")
  return name


def _check_fold(fold: int) -> int:
  if fold not in (1, 2, 3):
    raise ValueError(f"fold must be 1, 2 or 3, got {fold!r}.")
  return fold


def aus(dataset: str) -> tuple[int, ...]:
  """AU numbers of `dataset` ("bp4d" | "disfa"), in record order: 12 for BP4D, 8 for DISFA."""
  return _AUS[_check_dataset(dataset)]


def subjects(dataset: str) -> tuple[str, ...]:
  """All subject ids of `dataset`, sorted (41 for BP4D, 27 for DISFA)."""
  return _SUBJECTS[_check_dataset(dataset)]


def parts(dataset: str) -> tuple[tuple[str, ...], ...]:
  """The three subject parts of `dataset`, in the published order."""
  return _PARTS[_check_dataset(dataset)]


def subject_index(dataset: str, subject: str) -> int:
  """Position of `subject` in `subjects(dataset)`; ValueError for an unknown subject."""
  all_subjects = subjects(dataset)
  if subject not in all_subjects:
    raise ValueError(f"Subject {subject!r} is not a {dataset} subject; expected one of {all_subjects}.")
  return all_subjects.index(subject)


def part_of(dataset: str, subject: str) -> int:
  """The part (1, 2 or 3) that holds `subject`; ValueError if no part holds it."""
  for k, part in enumerate(parts(dataset), start=1):
    if subject in part:
      return k
  raise ValueError(
    f"Subject {subject!r} is in none of the three {dataset} folds (DESIGN.md §6); "
    f"expected one of {subjects(dataset)}.")


def fold_parts(fold: int) -> tuple[tuple[int, int], int]:
  """Parts of `fold`: ((train_part_a, train_part_b), test_part); fold k tests part 4 − k."""
  test = 4 - _check_fold(fold)
  train = tuple(k for k in (1, 2, 3) if k != test)
  return train, test  # type: ignore[return-value]


def fold_subjects(dataset: str, fold: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train_subjects, test_subjects) of `fold` (1..3) of `dataset`; both in published part order."""
  all_parts = parts(dataset)
  train, test = fold_parts(fold)
  train_subjects = tuple(s for k in train for s in all_parts[k - 1])
  return train_subjects, all_parts[test - 1]


def train_val_subjects(dataset: str, fold: int, val_fraction: float, seed: int = 0,
                       present: Iterable[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(train_subjects, val_subjects) of `fold`: a subject-level validation split carved from the fold's training
  subjects, so hyper-parameters and thresholds are chosen on held-out training subjects, never on the test part.

  `max(1, round(val_fraction × n))` of the n candidates (at most n − 1) are drawn by `seed`: the same seed gives
  the same subjects. Candidates are the fold's training subjects, or those of them in `present` (the subjects the
  prepared training split actually holds, so no validation subject is one without frames); a subject in
  `present` outside the fold's training subjects raises. Both tuples keep the published part order.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"config.data.val_fraction: expected a value in (0, 1) (the fraction of the training "
                     f"subjects held out for validation), got {val_fraction!r}")
  fold_train, _ = fold_subjects(dataset, fold)
  candidates = fold_train
  if present is not None:
    present = set(present)
    stray = sorted(present - set(fold_train))
    if stray:
      raise ValueError(f"{dataset} fold {fold}: subjects {stray} are not training subjects of the fold "
                       f"(expected some of {fold_train}; DESIGN.md §6)")
    candidates = tuple(s for s in fold_train if s in present)
  if len(candidates) < 2:
    raise ValueError(f"config.data.val_fraction: {dataset} fold {fold} has {len(candidates)} training subject(s) "
                     f"{candidates}; at least 2 are needed to hold some out for validation")
  n_val = min(len(candidates) - 1, max(1, int(round(len(candidates) * val_fraction))))
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 16]))
  drawn = set(rng.permutation(len(candidates))[:n_val].tolist())
  train = tuple(s for i, s in enumerate(candidates) if i not in drawn)
  val = tuple(s for i, s in enumerate(candidates) if i in drawn)
  return train, val


def part_splits(plans: dict[int, list], generate: Callable, dataset: str) -> dict:
  """Split generators {"part<k>": generate(plans[k])} of the non-empty parts; TFDS cannot write an empty
  split, so a part with no subjects in the manual directory is left out (and logged)."""
  empty = [k for k in (1, 2, 3) if not plans[k]]
  if len(empty) == 3:
    raise ValueError(f"{dataset}: no usable labelled frames found in the manual directory.")
  if empty:
    log.warning("%s: no subjects of part(s) %s in the manual directory; those splits are not written, so "
                "folds that use them cannot be read.", dataset, empty)
  return {part_split(k): generate(plans[k]) for k in (1, 2, 3) if plans[k]}


def part_split(part: int) -> str:
  """TFDS split name of a part: 1 -> "part1"."""
  if part not in (1, 2, 3):
    raise ValueError(f"part must be 1, 2 or 3, got {part!r}.")
  return f"part{part}"


def fold_split(fold: int, which: str) -> str:
  """TFDS split string of a fold: fold_split(1, "train") == "part1+part2", fold_split(1, "test") == "part3"
  (fold k tests part 4 − k)."""
  train, test = fold_parts(fold)
  if which == "train":
    return "+".join(part_split(k) for k in train)
  if which == "test":
    return part_split(test)
  raise ValueError(f"which must be 'train' or 'test', got {which!r}.")


def resolve_split(split: str) -> str:
  """Maps fold split names ("fold1_train", "fold3_test") to part split strings; other splits pass through.

  Example: resolve_split("fold2_train") == "part1+part3"; resolve_split("part2") == "part2".
  """
  if split.startswith("fold") and "_" in split:
    head, which = split.split("_", 1)
    try:
      fold = int(head[len("fold"):])
    except ValueError:
      raise ValueError(f"Bad fold split {split!r}; expected fold<1-3>_<train|test>.") from None
    return fold_split(fold, which)
  return split
