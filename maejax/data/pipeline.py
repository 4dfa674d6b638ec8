"""grain input pipelines: random-access source → shuffle → augment → batch → split across JAX processes.

Order of operations (and why):
  ``MapDataset.source(src).shuffle(seed).repeat(epochs)``  a new permutation every epoch;
  ``.random_map(augment, seed)``   per-element rng derived from the element's global position, so an example is
                                   augmented identically whatever the number of processes;
  ``.batch(per_process_batch)[process_index::process_count]``   global batch ``t`` is the concatenation of the
                                   processes' ``t``-th local batches = elements ``t·G … t·G+G−1`` of the global
                                   stream, the same as a single process reading batch ``G``. Per epoch every
                                   example is read exactly once, by exactly one process.
  ``.to_iter_dataset()`` (+ ``mp_prefetch`` worker processes)  whose state grain checkpoints with Orbax.

Images leave the pipeline as uint8 (4× less host→device traffic); :func:`normalize` runs on the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images_uint8: jax.Array) -> jax.Array:
  """``(B, H, W, 3)`` uint8 → float32 normalised with the ImageNet mean/std (as the official MAE)."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images: np.ndarray) -> np.ndarray:
  """Inverse of :func:`normalize`, to uint8."""
  x = np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- augmentations


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box ``(top, left, h, w)``: 10 tries of area ∈ scale, log-uniform aspect
  ratio; else the centre crop clamped to ``ratio``."""
  area = height * width
  log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = float(np.exp(rng.uniform(*log_ratio)))
    w = int(round(np.sqrt(target * aspect)))
    h = int(round(np.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class MAEAugment:
  """RandomResizedCrop(scale 0.2–1, bicubic) + horizontal flip, as the official MAE pretraining."""

  size: int
  scale: tuple[float, float] = (0.2, 1.0)
  flip: bool = True

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = _as_rgb(record["image"])
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], self.scale)
    pil = Image.fromarray(image[top:top + h, left:left + w])
    out = np.asarray(pil.resize((self.size, self.size), Image.BICUBIC))
    if self.flip and rng.random() < 0.5:
      out = out[:, ::-1]
    return {"image": np.ascontiguousarray(out)}


@dataclasses.dataclass(frozen=True)
class Resize:
  """Deterministic resize to ``size`` (evaluation)."""

  size: int

  def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    image = _as_rgb(record["image"])
    if image.shape[:2] != (self.size, self.size):
      image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC))
    return {**{k: v for k, v in record.items() if k != "image"}, "image": image}


def _as_rgb(image: Any) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 image (H, W, 3), got dtype {image.dtype} shape {image.shape}")
  return image[:, :, :3]


# ---------------------------------------------------------------------------------------------- sources


def synthfaces_source(cfg: ml_collections.ConfigDict, split: str, aus: Sequence[int] | None = None) -> Any:
  """The synthetic faces of ``split`` ("train" / "test": subject-exclusive, ``data.test_fraction``; "val": the
  ``data.val_fraction`` of the training subjects, which "train" then leaves out; "all"), read from the render
  cache in ``data.cache_dir`` (``""`` renders on the fly). ``aus``: default BP4D's 12."""
  from maejax.data import face_cache, synthfaces
  train, test = synthfaces.train_test_subjects(cfg.num_subjects, cfg.get("test_fraction", 0.25), seed=cfg.seed)
  val = None
  if cfg.get("val_fraction", 0.0):
    train, val = synthfaces.train_val_subjects(train, cfg.val_fraction, seed=cfg.seed)
  elif split == "val":
    raise ValueError("synthfaces split 'val': set config.data.val_fraction (e.g. 0.2) to carve a validation split "
                     "from the training subjects")
  subjects = {"train": train, "val": val, "test": test, "all": None}
  if split not in subjects:
    raise ValueError(f"synthfaces split must be one of {sorted(subjects)}, got {split!r}")
  src = synthfaces.SynthFaces(seed=cfg.seed, num_subjects=cfg.num_subjects, frames_per_subject=cfg.frames_per_subject,
                              image_size=cfg.image_size, aus=tuple(aus or synthfaces.BP4D_AUS),
                              subjects=subjects[split])
  return face_cache.maybe_cached(src, cfg.get("cache_dir", face_cache.DEFAULT_CACHE_DIR))


def make_source(cfg: ml_collections.ConfigDict, split: str = "train") -> Any:
  """A random-access source from ``config.data``: ``synthfaces`` (default; rendered once into
  ``data.cache_dir``, see ``face_cache``; ``""`` renders on the fly), ``folder`` (any folder of images),
  ``tfds`` (a prepared TFDS dataset, e.g. imagenet2012) or ``bp4d`` / ``disfa`` (the prepared AU data of fold
  ``data.fold``: :func:`au_data_source`)."""
  name = cfg.name
  if name == "synthfaces":
    return synthfaces_source(cfg, split)
  if name in AU_DATA:
    return au_data_source(cfg, split)
  if name == "folder":
    from maejax.data import images
    if not cfg.path:
      raise ValueError("config.data.path must name a folder of images when config.data.name='folder'")
    return images.ImageFolderSource(cfg.path, skip_bad=cfg.get("skip_bad", False))
  if name == "tfds":
    from maejax.data import images
    return images.TfdsImageSource(cfg.tfds_name, split=split, data_dir=cfg.get("data_dir") or None)
  raise ValueError(f"config.data.name must be 'synthfaces', 'folder', 'tfds', 'bp4d' or 'disfa', got {name!r}")


AU_DATA = ("bp4d", "disfa")  # prepared by `python -m maejax.data.prepare`


def au_data_source(cfg: ml_collections.ConfigDict, split: str, aux: Sequence[str] = ()) -> Any:
  """The prepared BP4D / DISFA records (``data.name``) of split ``"fold<data.fold>_<split>"`` from
  ``data.data_dir``; with ``aux`` (auxiliary modality keys) the BP4D build prepared with them (``--aux_subdirs``;
  ValueError naming a key no build has). Records: ``image`` uint8 (256, 256, 3), each aux key (256, 256, 1), the
  labels."""
  from maejax.data import prepare
  fold = cfg.get("fold")
  if fold is None:
    raise ValueError(f"config.data.fold: data.name={cfg.name!r} reads the prepared split fold<k>_{split} (k = 1..3); "
                     "config.data has no fold: add one to the config (e.g. c.data.fold = 1, as au_finetune's bp4d "
                     "variant does)")
  return prepare.data_source(cfg.name, f"fold{int(fold)}_{split}", data_dir=cfg.get("data_dir") or None, aux=aux)


def aux_source(cfg: ml_collections.ConfigDict, split: str, aux: Sequence[str]) -> Any:
  """:func:`make_source` whose records also carry the auxiliary modalities ``aux`` (record keys, uint8 (H, W, 1)
  each, aligned with ``image``): synthfaces' rendered depth (:class:`WithDepth`; ``aux`` must be ("depth",)) or
  the BP4D build prepared with them (:func:`au_data_source`)."""
  aux = tuple(aux)
  if cfg.name == "synthfaces":
    if aux != ("depth",):
      raise ValueError(f"auxiliary modalities {list(aux)}: synthfaces renders depth only (mcm.aux=(('depth', 1),)); "
                       "prepared BP4D (config.data.name='bp4d') carries the keys it was prepared with")
    return WithDepth(make_source(cfg, split), cfg.seed, cfg.image_size)
  if cfg.name == "bp4d":
    return au_data_source(cfg, split, aux)
  raise ValueError(f"config.data.name={cfg.name!r}: auxiliary modalities {list(aux)} exist for synthfaces (depth) "
                   "and bp4d (prepared with python -m maejax.data.prepare --aux_subdirs=...) only")


# ------------------------------------------------------------------------------------------------ build


def build(source: Any, *, global_batch_size: int, seed: int, augment: Any | None = None,
          random_augment: bool = True, shuffle: bool = True, num_epochs: int | None = None,
          process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
          drop_remainder: bool = True) -> grain.IterDataset:
  """The pipeline described in the module docstring; yields dicts of per-process numpy batches."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the {process_count} "
                     "processes")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  if augment is not None:
    ds = ds.random_map(augment, seed=seed + 1) if random_augment else ds.map(augment)
  ds = ds.batch(global_batch_size // process_count, drop_remainder=drop_remainder)
  if process_count > 1:
    ds = ds[process_index::process_count]
  it = ds.to_iter_dataset()
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def mae_pipeline(data_cfg: ml_collections.ConfigDict, global_batch_size: int, img_size: int, seed: int,
                 split: str = "train", **kw) -> grain.IterDataset:
  """Images for MAE pretraining / distillation: RandomResizedCrop + flip, uint8 ``(b, S, S, 3)``."""
  src = make_source(data_cfg, split)
  return build(src, global_batch_size=global_batch_size, seed=seed,
               augment=MAEAugment(img_size, tuple(data_cfg.get("crop_scale", (0.2, 1.0)))),
               worker_count=data_cfg.get("worker_count", 0), **kw)


# ------------------------------------------------------------------------------- objectives beyond MAE


def block_mask(rng: np.random.Generator, grid: int, num_masked: int, min_patches: int, max_patches: int,
               min_aspect: float = 0.3) -> np.ndarray:
  """BEiT's block-wise masking (BootMAE's generator): ``(grid, grid)`` uint8, 1 = masked.

  Repeatedly draws a block of area ``U(min_patches, budget)`` patches (``budget = min(max_patches, num_masked −
  masked so far)``) and log-uniform aspect ratio in ``[min_aspect, 1/min_aspect]`` at a random position, up to 10
  tries, accepting it if it adds between 1 and ``budget`` new patches; stops when ``num_masked`` patches are
  masked or no try adds any.
  """
  mask = np.zeros((grid, grid), np.uint8)
  count = 0
  log_ratio = (np.log(min_aspect), np.log(1 / min_aspect))
  while count < num_masked:
    budget = min(num_masked - count, max_patches)
    added = 0
    for _ in range(10):
      area = rng.uniform(min_patches, budget) if budget > min_patches else float(budget)
      aspect = np.exp(rng.uniform(*log_ratio))
      h = int(round(np.sqrt(area * aspect)))
      w = int(round(np.sqrt(area / aspect)))
      if 0 < h < grid and 0 < w < grid:
        top, left = int(rng.integers(0, grid - h + 1)), int(rng.integers(0, grid - w + 1))
        new = h * w - int(mask[top:top + h, left:left + w].sum())
        if 0 < new <= budget:
          mask[top:top + h, left:left + w] = 1
          added = new
          break
    if added == 0:
      break
    count += added
  return mask


@dataclasses.dataclass(frozen=True)
class BlockMaskNoise:
  """Adds ``"mask_noise": (L,) float32 = block − U(0, 1)`` to a record: argsort keeps the smallest, so
  :func:`maejax.models.mae.random_masking` removes every block-masked patch first and tops the mask up to its
  ratio at random (BootMAE's ``argsort(1 − (1 − mask + u))``)."""

  grid: int
  num_masked: int
  min_patches: int
  max_patches: int

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    m = block_mask(rng, self.grid, self.num_masked, self.min_patches, self.max_patches).reshape(-1)
    return {**record, "mask_noise": (m - rng.random(m.shape)).astype(np.float32)}


def block_mask_noise(grid: int, fraction: float) -> BlockMaskNoise:
  """BootMAE's block masking scaled to a ``grid × grid`` patch grid: ``fraction·L`` patches in blocks of
  ``16/196·L … 60/196·L`` patches (the official 120 / 16 / 60 of 196 at 14 × 14)."""
  n = grid * grid
  return BlockMaskNoise(grid, max(1, int(round(fraction * n))), max(1, int(round(16 / 196 * n))),
                        max(2, int(round(60 / 196 * n))))


DEPTH_MEAN, DEPTH_STD = 0.5, 0.5


def normalize_depth(depth_uint8: jax.Array) -> jax.Array:
  """``(B, H, W, 1)`` uint8 depth (or any auxiliary modality: thermal, ...) → float32 in about [−1, 1]."""
  return (depth_uint8.astype(jnp.float32) / 255.0 - DEPTH_MEAN) / DEPTH_STD


def denormalize_depth(depth: np.ndarray) -> np.ndarray:
  """Inverse of :func:`normalize_depth`, to uint8 ``(..., 1)``."""
  x = np.asarray(depth, np.float32) * DEPTH_STD + DEPTH_MEAN
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class WithDepth:
  """A synthetic-faces source whose records also carry ``"depth": (H, W, 1)`` uint8 (synthfaces.depth_of), also
  when the images come from the render cache."""

  source: Any
  seed: int
  size: int

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    from maejax.data import synthfaces
    r = self.source[index]
    return {**r, "depth": synthfaces.depth_of(self.seed, int(r["subject"]), int(r["frame"]), self.size)}


@dataclasses.dataclass(frozen=True)
class MultiModalAugment:
  """:class:`MAEAugment` applied with ONE crop box and flip to every key of ``keys`` (aligned modalities):
  RandomResizedCrop (bicubic) + horizontal flip; uint8 ``(S, S, C)`` each."""

  size: int
  keys: tuple[str, ...] = ("image", "depth")
  scale: tuple[float, float] = (0.2, 1.0)
  flip: bool = True

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    missing = [k for k in self.keys if k not in record]
    if missing:
      raise ValueError(f"MultiModalAugment: record has no key(s) {missing}; keys: {sorted(record)}")
    arrays = {k: np.asarray(record[k]) for k in self.keys}
    arrays["image"] = _as_rgb(arrays["image"])
    wrong = {k: a.shape for k, a in arrays.items() if a.shape[:2] != arrays["image"].shape[:2]}
    if wrong:
      raise ValueError(f"MultiModalAugment: modalities {wrong} are not the size of the image "
                       f"{arrays['image'].shape[:2]}")
    top, left, h, w = random_resized_crop_box(rng, *arrays["image"].shape[:2], self.scale)
    flip = self.flip and rng.random() < 0.5
    out = {}
    for k, a in arrays.items():
      crop = a[top:top + h, left:left + w]
      pil = Image.fromarray(crop[:, :, 0] if crop.shape[-1] == 1 else crop)
      r = np.asarray(pil.resize((self.size, self.size), Image.BICUBIC)).reshape(self.size, self.size, -1)
      out[k] = np.ascontiguousarray(r[:, ::-1] if flip else r)
    return out


@dataclasses.dataclass(frozen=True)
class Then:
  """``second(first(record, rng), rng)``: two random maps as one (picklable, for grain's worker processes)."""

  first: Any
  second: Any

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.second(self.first(record, rng), rng)


def objective_pipeline(data_cfg: ml_collections.ConfigDict, global_batch_size: int, img_size: int, seed: int, *,
                       block_masking: BlockMaskNoise | None = None, aux: Sequence[str] = ()) -> grain.IterDataset:
  """:func:`mae_pipeline` for the objectives beyond MAE: optionally with BootMAE's block-mask noise
  (``"mask_noise": (b, L)``) and / or auxiliary modalities ``aux`` (record keys, e.g. ("depth",) of the synthetic
  faces or ("depth", "thermal") of prepared BP4D: :func:`aux_source`), each ``(b, S, S, 1)`` with the image's crop
  and flip."""
  scale = tuple(data_cfg.get("crop_scale", (0.2, 1.0)))
  if aux:
    src = aux_source(data_cfg, "train", aux)
    augment = MultiModalAugment(img_size, ("image", *aux), scale)
  else:
    src = make_source(data_cfg, "train")
    augment = MAEAugment(img_size, scale)
  if block_masking is not None:
    augment = Then(augment, block_masking)
  return build(src, global_batch_size=global_batch_size, seed=seed, augment=augment,
               worker_count=data_cfg.get("worker_count", 0))


def fixed_images(source: Any, indices: Sequence[int], size: int) -> np.ndarray:
  """A few deterministic images ``(n, S, S, 3)`` uint8, e.g. for reconstruction PNGs."""
  resize = Resize(size)
  return np.stack([resize(source[int(i)])["image"] for i in indices])
