"""grain pipelines for AU detection: training views (clean for the teacher, OCCLUDED for the student) and
evaluation under a fixed named occlusion per example.

Training record → :class:`AUTrainAugment` (uint8 out):
  ``image (S, S, 3)``      the clean face after shift / flip / colour jitter (what the teacher sees);
  ``occluded (S, S, 3)``   the SAME augmented face with a random occlusion (``occlusion.sample_occlusion``);
  ``patch_frac (L,)``      float32 occluded fraction of every patch (row-major, the ViT token order);
  ``au (N,)``              int8 1 / 0 / −1 (unknown; BP4D's 9).
Evaluation record → :class:`AUEvalView`: resize, then ``occlusion.occlude(condition, condition_seed(seed,
index, condition))``, so every model sees the same occluded pixels for the same example.

Augmentations (ME-GraphAU's recipe scaled to any size): resize to ``S`` (as the evaluation view), random
translation by up to ±S/14 px (edge padding; ME-GraphAU's 224-of-256 crop range), horizontal flip, colour
jitter (brightness / contrast / saturation). Landmarks follow the shift and flip so realistic occluders (mask,
glasses, hand) land on the face.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from PIL import Image

from maejax.data import occlusion
from maejax.data.pipeline import _as_rgb, build

# Landmark rows that swap under a horizontal flip: eyes (0, 1) and mouth corners (3, 4).
_FLIP_ORDER = np.array([1, 0, 2, 4, 3, 5])


def labels_of(record: Mapping[str, Any], num_aus: int | None = None) -> np.ndarray:
  """``au`` as int8 with 1 / 0 / −1 (anything else, e.g. BP4D's 9, counts as unknown)."""
  au = np.asarray(record["au"]).astype(np.int16)
  au = np.where((au == 0) | (au == 1), au, -1).astype(np.int8)
  if num_aus is not None and au.shape != (num_aus,):
    raise ValueError(f"record 'au' has shape {au.shape}, expected ({num_aus},)")
  return au


def _landmarks(record: Mapping[str, Any], h: int, w: int) -> np.ndarray | None:
  lm = record.get("landmarks")
  if lm is None:
    return None
  lm = np.asarray(lm, np.float32)
  if lm.ndim != 2 or lm.shape[0] < 5 or not np.isfinite(lm).all() or (lm < 0).any():
    return None  # unknown landmarks (e.g. −1 rows): occluders assume a centred face
  return lm


def color_jitter(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """Brightness, contrast and saturation each scaled by ``U(1 − s, 1 + s)`` (torchvision ColorJitter's
  factors), in a random order. ``(H, W, 3)`` uint8 → uint8."""
  if strength <= 0:
    return image
  x = image.astype(np.float32)
  for op in rng.permutation(3):
    f = rng.uniform(1 - strength, 1 + strength)
    if op == 0:
      x = x * f
    elif op == 1:
      x = (x - x.mean()) * f + x.mean()
    else:
      gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
      x = (x - gray[..., None]) * f + gray[..., None]
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class AUTrainAugment:
  """Random shift + flip + colour jitter, then the student's occluded view of the same face (see module)."""

  size: int
  patch_size: int
  num_aus: int
  occlude: bool = True
  conditions: Sequence[str] = occlusion.TRAIN_CONDITIONS
  fills: Sequence[str] = ("black", "mean", "noise")
  jitter: float = 0.2
  flip: bool = True
  shift: float = 1 / 14  # max translation as a fraction of S (ME-GraphAU's 224-of-256 crop: 1/14)

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = _as_rgb(record["image"])
    h, w = image.shape[:2]
    lm = _landmarks(record, h, w)
    if (h, w) != (self.size, self.size):  # the evaluation view's resize: train and test faces share one scale
      image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
      if lm is not None:
        lm = lm * np.array([self.size / w, self.size / h], np.float32)
    # Random translation by up to ±shift·S (ME-GraphAU's 224-of-256 crop range is S/14) on an edge-padded
    # image, at the scale of the evaluation view: cropping S of the resized S·8/7 image instead would show every
    # training face 8/7 larger than the (plain-resized) test faces.
    pad = int(round(self.size * self.shift))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    image = padded[top:top + self.size, left:left + self.size]
    if lm is not None:
      lm = lm + np.array([pad - left, pad - top], np.float32)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
      if lm is not None:
        lm = lm[_FLIP_ORDER[:len(lm)]] * np.array([-1, 1], np.float32) + np.array([self.size - 1, 0], np.float32)
    image = color_jitter(np.ascontiguousarray(image), rng, self.jitter)
    out = {"image": image, "au": labels_of(record, self.num_aus)}
    if self.occlude:
      occluded, _, frac = occlusion.sample_occlusion(image, rng, self.patch_size, self.conditions, lm, self.fills)
      out.update(occluded=occluded, patch_frac=frac.astype(np.float32))
    return out


@dataclasses.dataclass(frozen=True)
class AUEvalView:
  """Deterministic evaluation view of example ``index`` under ``condition`` (fixed per example)."""

  size: int
  patch_size: int
  num_aus: int
  condition: str
  seed: int = 0

  def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = _as_rgb(record["image"])
    h, w = image.shape[:2]
    lm = _landmarks(record, h, w)
    if (h, w) != (self.size, self.size):
      image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
      if lm is not None:
        lm = lm * np.array([self.size / w, self.size / h], np.float32)
    seed = occlusion.condition_seed(self.seed, int(index), self.condition)
    occluded, _, frac = occlusion.occlude(image, self.condition, seed, self.patch_size, lm)
    return {"image": occluded, "patch_frac": frac.astype(np.float32), "au": labels_of(record, self.num_aus),
            "index": np.int32(index)}


def train_pipeline(source: Any, *, global_batch_size: int, size: int, patch_size: int, num_aus: int, seed: int,
                   occlude: bool = True, conditions: Sequence[str] = occlusion.TRAIN_CONDITIONS,
                   jitter: float = 0.2, shift: float = 1 / 14, flip: bool = True, worker_count: int = 0,
                   labelled: np.ndarray | None = None, labelled_per_batch: int = 0, **kw) -> grain.IterDataset:
  """Infinite shuffled training batches (see module docstring for the keys).

  ``labelled``: the indices of ``source`` that keep their labels (:func:`labelled_subset`; None = all). With
  ``labelled_per_batch = 0`` the batches hold the labelled frames only (a teacher); with ``k > 0`` every batch
  holds ``k`` labelled frames followed by ``B − k`` of the other frames with every label −1 (:func:`mixed_build`).
  """
  unknown = [c for c in conditions if c not in occlusion.CONDITIONS]
  if unknown:
    raise ValueError(f"train_conditions: unknown {unknown}; expected names from {sorted(occlusion.CONDITIONS)}")
  aug = AUTrainAugment(size, patch_size, num_aus, occlude, tuple(conditions), jitter=jitter, shift=shift,
                       flip=flip)
  if labelled is not None:
    rest = np.setdiff1d(np.arange(len(source)), labelled)
    if labelled_per_batch > 0 and len(rest):
      return mixed_build((Subset(source, labelled), Subset(source, rest, hide_labels=True)),
                         (labelled_per_batch, global_batch_size - labelled_per_batch), seed=seed, augment=aug,
                         worker_count=worker_count, **kw)
    source = Subset(source, labelled)
  return build(source, global_batch_size=global_batch_size, seed=seed, augment=aug, worker_count=worker_count,
               **kw)


# ------------------------------------------------------------------------------------- label-scarce regime


def labelled_subset(n: int, fraction: float, seed: int) -> np.ndarray | None:
  """Sorted indices of the ``max(1, round(n·fraction))`` training frames that keep their labels, drawn without
  replacement by ``seed`` (the same subset for the teacher and every student of a run); None when
  ``fraction == 1`` (every frame labelled, the pipelines exactly as without this option)."""
  if not 0 < fraction <= 1:
    raise ValueError(f"config.data.label_fraction: expected a value in (0, 1], got {fraction}")
  if fraction == 1:
    return None
  k = max(1, int(round(n * fraction)))
  rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 15]))
  return np.sort(rng.choice(n, k, replace=False))


@dataclasses.dataclass(frozen=True)
class Subset:
  """Random-access view of ``source`` at ``indices``; ``hide_labels`` sets every AU label to −1 (the frame
  feeds the label-free terms only). Picklable, for grain worker processes."""

  source: Any
  indices: np.ndarray
  hide_labels: bool = False

  def __len__(self) -> int:
    return len(self.indices)

  def _hide(self, record: Mapping[str, Any]) -> dict[str, Any]:
    if not self.hide_labels:
      return dict(record)
    return {**record, "au": np.full(np.shape(record["au"]), -1, np.int8)}

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self._hide(self.source[int(self.indices[int(i)])])

  def labels(self, i: int) -> dict[str, Any]:
    j = int(self.indices[int(i)])
    return self._hide(self.source.labels(j) if hasattr(self.source, "labels") else self.source[j])


def _concat_batches(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def mixed_build(sources: Sequence[Any], per_batch: Sequence[int], *, seed: int, augment: Any,
                process_index: int | None = None, process_count: int | None = None, worker_count: int = 0
                ) -> grain.IterDataset:
  """Batches that concatenate ``per_batch[j]`` examples of ``sources[j]``, in order, in EVERY batch (the
  fixed labelled : unlabelled ratio of semi-supervised training). Each source is shuffled, repeated and
  augmented on its own stream (seeds ``seed + 2j``, ``seed + 2j + 1``), batched to its share, and the shares
  are interleaved by ``grain.MapDataset.mix`` (equal proportions: one batch of each in turn) and joined;
  the iterator state is one index, checkpointed with the train state. With several processes each process's
  batch holds ``per_batch[j] / process_count`` examples of source ``j``."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if any(k <= 0 or k % process_count for k in per_batch):
    raise ValueError(f"labelled / unlabelled examples per batch {tuple(per_batch)}: each must be > 0 and "
                     f"divisible by the {process_count} processes (config.data.labelled_per_batch < batch size)")
  shares = []
  for j, (src, k) in enumerate(zip(sources, per_batch, strict=True)):
    ds = grain.MapDataset.source(src).shuffle(seed=seed + 2 * j).repeat(None)
    ds = ds.random_map(augment, seed=seed + 2 * j + 1).batch(k // process_count, drop_remainder=True)
    shares.append(ds)
  ds = grain.MapDataset.mix(shares).batch(len(shares), batch_fn=_concat_batches)
  if process_count > 1:
    ds = ds[process_index::process_count]
  it = ds.to_iter_dataset()
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def eval_indices(n_total: int, max_examples: int | None, seed: int = 0) -> np.ndarray:
  """A fixed, sorted subset of ``max_examples`` indices (all when None / larger than the split)."""
  if not max_examples or max_examples >= n_total:
    return np.arange(n_total)
  return np.sort(np.random.default_rng(seed).choice(n_total, max_examples, replace=False))


def eval_batches(source: Any, condition: str, *, batch_size: int, size: int, patch_size: int, num_aus: int,
                 seed: int = 0, indices: Sequence[int] | None = None):
  """Yields evaluation batches (numpy dicts: ``image``, ``patch_frac``, ``au``, ``index``) of ``condition``
  over ``indices`` (default: the whole split), last batch possibly smaller."""
  if condition not in occlusion.CONDITIONS:
    raise ValueError(f"eval condition: unknown {condition!r}; expected one of {sorted(occlusion.CONDITIONS)}")
  idx = np.arange(len(source)) if indices is None else np.asarray(indices)
  view = AUEvalView(size, patch_size, num_aus, condition, seed)
  ds = grain.MapDataset.source(list(idx)).map(lambda i: view(int(i), source[int(i)]))
  yield from ds.batch(batch_size, drop_remainder=False)


# ------------------------------------------------------------------------------------------- AU datasets

AU_DATASETS = ("synthfaces", "bp4d", "disfa")


def au_names(data_cfg) -> tuple[int, ...]:
  """AU numbers of the dataset of ``config.data`` (synthfaces: BP4D's 12 unless ``data.aus`` lists others)."""
  from maejax.data import folds, synthfaces
  if data_cfg.name == "synthfaces":
    return tuple(data_cfg.get("aus") or synthfaces.BP4D_AUS)
  if data_cfg.name in ("bp4d", "disfa"):
    return folds.aus(data_cfg.name)
  raise ValueError(f"config.data.name must be one of {AU_DATASETS} for AU stages, got {data_cfg.name!r}")


def au_source(data_cfg, split: str) -> Any:
  """AU records for ``split`` ("train" / "val" / "test"): synthetic faces (subject-exclusive split; "val" is
  carved from the training subjects by ``data.val_fraction``; from the render cache in ``data.cache_dir`` unless
  it is ``""``) or the prepared BP4D / DISFA TFDS data of fold ``data.fold`` (1..3). For BP4D / DISFA with
  ``data.val_fraction > 0``, "val" is the fold's training records of the subjects of
  ``folds.train_val_subjects`` (by ``data.seed``) and "train" the other training records (:class:`SubjectSubset`
  views); "test" is always the fold's test part."""
  if data_cfg.name == "synthfaces":
    from maejax.data.pipeline import synthfaces_source
    return synthfaces_source(data_cfg, split, au_names(data_cfg))
  if data_cfg.name in ("bp4d", "disfa"):
    return _tfds_au_source(data_cfg, split)
  raise ValueError(f"config.data.name must be one of {AU_DATASETS} for AU stages, got {data_cfg.name!r}")


def _tfds_au_source(data_cfg, split: str) -> Any:
  import tensorflow_datasets as tfds

  from maejax.data import folds, prepare
  name, fold, data_dir = data_cfg.name, int(data_cfg.fold), data_cfg.get("data_dir") or None
  val_fraction = data_cfg.get("val_fraction", 0.0)
  if split == "val" and not val_fraction:
    raise ValueError(f"{name} split 'val': set config.data.val_fraction (e.g. 0.2) to hold a fraction of fold "
                     f"{fold}'s training subjects out for validation")
  if split not in ("train", "val") or not val_fraction:
    return prepare.data_source(name, f"fold{fold}_{split}", data_dir=data_dir)
  source = prepare.data_source(name, f"fold{fold}_train", data_dir=data_dir)
  undecoded = prepare.data_source(name, f"fold{fold}_train", data_dir=data_dir,
                                  decoders={"image": tfds.decode.SkipDecoding()})
  subject = record_subjects(undecoded)
  names = folds.subjects(name)
  if len(subject) and (subject.min() < 0 or subject.max() >= len(names)):
    raise ValueError(f"{name} fold {fold} (split {undecoded.split!r} in {undecoded.dataset_info.data_dir}): record "
                     f"subject indices {subject.min()}..{subject.max()} outside 0..{len(names) - 1}; rebuild it "
                     "with `python -m maejax.data.prepare`")
  present = [names[i] for i in np.unique(subject)]
  train, val = folds.train_val_subjects(name, fold, val_fraction, seed=data_cfg.get("seed", 0), present=present)
  keep = [names.index(s) for s in (val if split == "val" else train)]
  return SubjectSubset(source, np.flatnonzero(np.isin(subject, keep)), undecoded)


SUBJECTS_FILE = "subjects.{split}.npy"


def record_subjects(undecoded: Any) -> np.ndarray:
  """int32 ``(len(undecoded),)``: the ``subject`` feature of every record of a prepared BP4D / DISFA split, in
  record order. ``undecoded``: the split's TFDS data source with ``decoders={"image": SkipDecoding()}``, so no
  JPEG is decoded. The array is cached as ``subjects.<split>.npy`` (e.g. ``subjects.part1+part2.npy``) in the
  prepared dataset's folder, beside ``dataset_info.json``, and read again while it is newer than that file and
  of the split's length; a folder that cannot be written only costs the reading of the records every time."""
  n = len(undecoded)
  folder = os.fspath(undecoded.dataset_info.data_dir)
  path = os.path.join(folder, SUBJECTS_FILE.format(split=undecoded.split))
  info = os.path.join(folder, "dataset_info.json")
  try:
    if os.path.getmtime(path) >= os.path.getmtime(info):
      cached = np.load(path)
      if cached.shape == (n,):
        return cached.astype(np.int32)
  except (OSError, ValueError):
    pass  # no cache yet, or an unreadable one: read the records
  subject = np.empty(n, np.int32)
  for start in range(0, n, 1024):
    keys = list(range(start, min(n, start + 1024)))
    subject[start:start + len(keys)] = [int(r["subject"]) for r in undecoded.__getitems__(keys)]
  tmp = f"{path[:-len('.npy')]}.{os.getpid()}.tmp.npy"
  try:
    np.save(tmp, subject)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning("record subjects of %s not cached (%s); they are read from the records on every call", path, e)
    if os.path.exists(tmp):
      os.remove(tmp)
  return subject


@dataclasses.dataclass(frozen=True)
class SubjectSubset:
  """Random-access view of the records of a prepared BP4D / DISFA split at ``indices`` (those of some subjects);
  ``labels(i)`` reads record ``i`` from ``undecoded`` (the same split with the image left as JPEG bytes), so the
  WAL weights' label sample decodes no image. Picklable, for grain worker processes."""

  source: Any
  indices: np.ndarray
  undecoded: Any = None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return self.source[int(self.indices[int(i)])]

  def labels(self, i: int) -> dict[str, Any]:
    return (self.source if self.undecoded is None else self.undecoded)[int(self.indices[int(i)])]


def sample_labels(source: Any, num_aus: int, max_examples: int = 4000, seed: int = 0) -> np.ndarray:
  """``(M, N)`` int8 labels of a fixed subset of ``source`` (e.g. for the WAL weights of a training split)."""
  idx = eval_indices(len(source), max_examples, seed)
  get = source.labels if hasattr(source, "labels") else source.__getitem__
  return np.stack([labels_of(get(int(i)), num_aus) for i in idx])
