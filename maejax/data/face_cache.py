"""Render cache for synthetic faces: every image of a ``SynthFaces`` dataset rendered once, then read from disk.

Rendering (``synthfaces.render_face``, PIL, supersampled) is ~1.5 ms per 64 px face, and every stage of a job
(MAE pretraining, AU teacher, students, evaluation) asks for the same faces again and again. The first
:class:`CachedSynthFaces` of a dataset renders ALL its subjects once, in parallel, into ``.npy`` files; every
source of that dataset (train / test / fold subsets, any AU list or threshold) then indexes the same files,
memory-mapped read-only, so a record costs a copy instead of a render.

Layout, under ``cache_dir`` (``~/.cache/maejax/synthfaces`` by default; ``data.cache_dir`` in the configs)::

  s{seed}_n{num_subjects}_f{frames_per_subject}_{image_size}px_{hash}/
      images.npy       uint8   (num_subjects · frames_per_subject, S, S, 3)   row = subject · frames + frame
      landmarks.npy    float32 (rows, 6, 2)
      intensities.npy  float32 (rows, 15)   all AUs, ``ALL_AUS`` order (labels are cut from it per source)
      meta.json        what the key was made of (for people; not read back)
  s…_{hash}.lock       ``fcntl.flock`` lock: one process renders, the others wait, then read

``hash`` covers everything that changes pixels: the dataset's ``(seed, num_subjects, frames_per_subject,
image_size)``, the bytes of ``synthfaces.py``, the current values of its module-level constants (so
monkeypatching e.g. ``synthfaces.AU_GAIN`` gives another cache) and the numpy / Pillow versions. A build writes
into a temporary directory renamed into place when complete, so a cache directory is either absent or whole;
files damaged afterwards (truncated, wrong shape) are detected by a size / shape check, and rebuilt when the
cache is opened or reported with the file's path when a worker reads them.

Old caches are not deleted: remove ``cache_dir`` (or single entries) to reclaim the space.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import PIL
from absl import logging

from maejax.data import synthfaces

DEFAULT_CACHE_DIR = "~/.cache/maejax/synthfaces"
FORMAT_VERSION = 1
# Images per task of the parallel build: ~0.2 s of rendering at 64 px; progress is logged per task.
CHUNK_SIZE = 128


def renderer_constants() -> dict[str, Any]:
  """The current values of ``synthfaces``' module-level data (constants, tables, ``NEUTRAL_FRAME``), by name."""
  data_types = (bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset, np.ndarray, np.generic)
  out = {}
  for name, value in vars(synthfaces).items():
    if name.startswith("__"):
      continue
    if isinstance(value, data_types) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
      out[name] = value
  return out


def renderer_fingerprint(constants: Mapping[str, Any] | None = None) -> str:
  """sha256 hex of what the renderer's pixels depend on besides the dataset parameters: ``synthfaces.py``'s
  source bytes, its module-level constants (``renderer_constants()`` by default) and numpy / Pillow versions."""
  constants = renderer_constants() if constants is None else constants
  h = hashlib.sha256()
  with open(synthfaces.__file__, "rb") as f:
    h.update(f.read())
  for name in sorted(constants):
    h.update(f"\n{name}={constants[name]!r}".encode())
  h.update(f"\nnumpy={np.__version__} pillow={PIL.__version__} format={FORMAT_VERSION}".encode())
  return h.hexdigest()


def cache_key(seed: int, num_subjects: int, frames_per_subject: int, image_size: int,
              fingerprint: str | None = None) -> str:
  """Directory name of a dataset's cache: readable parameters + 16 hex digits of the full hash."""
  fingerprint = renderer_fingerprint() if fingerprint is None else fingerprint
  params = f"seed={int(seed)} subjects={int(num_subjects)} frames={int(frames_per_subject)} size={int(image_size)}"
  digest = hashlib.sha256(f"{params}\n{fingerprint}".encode()).hexdigest()[:16]
  return f"s{int(seed)}_n{int(num_subjects)}_f{int(frames_per_subject)}_{int(image_size)}px_{digest}"


def expected_arrays(num_subjects: int, frames_per_subject: int, image_size: int
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{file stem: (shape, dtype)}`` of a complete cache."""
  rows = num_subjects * frames_per_subject
  return {
      "images": ((rows, image_size, image_size, 3), np.dtype(np.uint8)),
      "landmarks": ((rows, len(synthfaces.LANDMARK_NAMES), 2), np.dtype(np.float32)),
      "intensities": ((rows, len(synthfaces.ALL_AUS)), np.dtype(np.float32)),
  }


def open_arrays(path: str, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
  """Memory-maps the cache files in ``path`` read-only; ``ValueError`` naming the file if one is missing,
  truncated or of another shape / dtype than ``expected``."""
  out = {}
  for name, (shape, dtype) in expected.items():
    file = os.path.join(path, f"{name}.npy")
    try:
      arr = np.load(file, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"face cache file {file} is missing or unreadable ({e}); expected {dtype} {shape}. "
                       f"Delete {path} to rebuild it") from e
    size = os.path.getsize(file)
    if arr.shape != shape or arr.dtype != dtype or size != arr.offset + arr.nbytes:
      raise ValueError(f"face cache file {file} is damaged: {arr.dtype} {arr.shape}, {size} bytes; expected "
                       f"{dtype} {shape}, {arr.offset + int(np.prod(shape)) * dtype.itemsize} bytes. "
                       f"Delete {path} to rebuild it")
    out[name] = arr
  return out


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  with open(path, "a") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logging.info("face cache: waiting for %s (another process is rendering this cache)", path)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _set_constants(constants: Mapping[str, Any]) -> None:
  """Worker initialiser: the parent's (possibly monkeypatched) renderer constants."""
  for name, value in constants.items():
    setattr(synthfaces, name, value)


def _render_rows(seed: int, num_subjects: int, frames_per_subject: int, image_size: int, start: int, stop: int
                 ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
  """Rows ``start … stop − 1`` rendered through ``SynthFaces`` itself: ``(start, images, landmarks,
  intensities)``."""
  src = synthfaces.SynthFaces(seed=seed, num_subjects=num_subjects, frames_per_subject=frames_per_subject,
                              image_size=image_size, aus=synthfaces.ALL_AUS)
  recs = [src[i] for i in range(start, stop)]
  return (start, np.stack([r["image"] for r in recs]), np.stack([r["landmarks"] for r in recs]),
          np.stack([r["au_intensity"] for r in recs]))


def _render_into(tmp: str, seed: int, num_subjects: int, frames_per_subject: int, image_size: int,
                 constants: Mapping[str, Any], workers: int, chunk_size: int) -> None:
  expected = expected_arrays(num_subjects, frames_per_subject, image_size)
  out = {name: np.lib.format.open_memmap(os.path.join(tmp, f"{name}.npy"), mode="w+", dtype=dtype, shape=shape)
         for name, (shape, dtype) in expected.items()}
  rows = num_subjects * frames_per_subject
  chunks = [(s, min(s + chunk_size, rows)) for s in range(0, rows, chunk_size)]
  args = (seed, num_subjects, frames_per_subject, image_size)
  # Starting a process costs about what rendering a few chunks does (it re-imports the main script); daemonic
  # processes (e.g. grain workers) may not start children: render in this process then.
  parallel = workers > 1 and len(chunks) > 4 and not multiprocessing.current_process().daemon
  logging.info("face cache: %d chunks of ≤ %d images, %s", len(chunks), chunk_size,
               f"{min(workers, len(chunks))} processes" if parallel else "in this process")
  t0 = last_log = time.perf_counter()
  done = 0

  def store(result) -> None:
    nonlocal done, last_log
    start, images, landmarks, intensities = result
    stop = start + len(images)
    out["images"][start:stop], out["landmarks"][start:stop], out["intensities"][start:stop] = (
        images, landmarks, intensities)
    done += len(images)
    now = time.perf_counter()
    if now - last_log >= 10 or done == rows:
      rate = done / max(now - t0, 1e-9)
      logging.info("face cache: rendered %d/%d images (%.0f images/s, ETA %.0f s)", done, rows, rate,
                   (rows - done) / rate)
      last_log = now

  if parallel:
    # spawn, not fork: the parent may hold JAX / grain threads. Workers get the parent's renderer constants.
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=multiprocessing.get_context(
        "spawn"), initializer=_set_constants, initargs=(dict(constants),)) as pool:
      futures = [pool.submit(_render_rows, *args, start, stop) for start, stop in chunks]
      for fut in concurrent.futures.as_completed(futures):
        store(fut.result())
  else:
    for start, stop in chunks:
      store(_render_rows(*args, start, stop))
  for arr in out.values():
    arr.flush()


def ensure_cache(seed: int, num_subjects: int, frames_per_subject: int, image_size: int,
                 cache_dir: str = DEFAULT_CACHE_DIR, workers: int | None = None, chunk_size: int = CHUNK_SIZE
                 ) -> tuple[str, bool]:
  """The cache directory of a dataset, rendered first if missing or damaged. Safe to call from several
  processes at once (one renders, the others wait for it).

  Args:
    seed, num_subjects, frames_per_subject, image_size: the ``SynthFaces`` dataset (all its subjects).
    cache_dir: parent directory (``~`` expanded).
    workers: rendering processes (default ``os.cpu_count()``); ≤ 1, ≤ 4 chunks, or a daemonic caller renders
      in this process.
    chunk_size: images per rendering task.

  Returns:
    ``(path, built)``: the cache directory and whether this call rendered it.
  """
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  constants = renderer_constants()
  fingerprint = renderer_fingerprint(constants)
  key = cache_key(seed, num_subjects, frames_per_subject, image_size, fingerprint)
  path = os.path.join(cache_dir, key)
  expected = expected_arrays(num_subjects, frames_per_subject, image_size)
  if os.path.isdir(path):
    with contextlib.suppress(ValueError):
      open_arrays(path, expected)
      return path, False
  if getattr(multiprocessing.current_process(), "_inheriting", False):
    # A spawned rendering process re-imports the parent's main script; one that builds a cache at import time
    # would wait forever for the lock its parent holds. (multiprocessing's own check uses the same flag.)
    raise RuntimeError(f"face cache {path}: a starting worker process is building a face cache while importing "
                       "the main script; put the script's work under `if __name__ == '__main__':`")
  os.makedirs(cache_dir, exist_ok=True)
  with _file_lock(path + ".lock"):
    if os.path.isdir(path):  # built by another process while this one waited, or damaged
      try:
        open_arrays(path, expected)
        return path, False
      except ValueError as e:
        logging.warning("face cache: %s; rebuilding it", e)
        shutil.rmtree(path)
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # left by a killed builder (the lock is ours now)
      shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    workers = (os.cpu_count() or 1) if workers is None else workers
    logging.info("face cache: rendering %d subjects × %d frames at %d px into %s", num_subjects,
                 frames_per_subject, image_size, path)
    t0 = time.perf_counter()
    try:
      _render_into(tmp, seed, num_subjects, frames_per_subject, image_size, constants, workers, chunk_size)
      meta = {"format": FORMAT_VERSION, "seed": seed, "num_subjects": num_subjects,
              "frames_per_subject": frames_per_subject, "image_size": image_size, "fingerprint": fingerprint,
              "numpy": np.__version__, "pillow": PIL.__version__,
              "constants": {k: repr(v) for k, v in sorted(constants.items())}}
      with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
      os.rename(tmp, path)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    logging.info("face cache: %s ready in %.1f s", path, time.perf_counter() - t0)
  return path, True


class CachedSynthFaces:
  """A ``SynthFaces`` whose records come from the render cache: same length, indices, records (bit for bit),
  ``labels`` and ``subject_frame``; picklable (each process maps the files on first read).

  Constructing it builds the cache if needed (see :func:`ensure_cache`); ``source`` is the wrapped
  ``SynthFaces`` (its subset, AUs and threshold select the records and labels).
  """

  def __init__(self, source: synthfaces.SynthFaces, cache_dir: str = DEFAULT_CACHE_DIR, workers: int | None = None):
    self.source = source
    self.path, _ = ensure_cache(source.seed, source.num_subjects, source.frames_per_subject, source.image_size,
                                cache_dir, workers)
    self._expected = expected_arrays(source.num_subjects, source.frames_per_subject, source.image_size)
    self._au_idx = np.array([synthfaces.ALL_AUS.index(a) for a in source.aus], np.int64)
    self._arrays: dict[str, np.ndarray] | None = None

  # The wrapped source's public attributes, read-only.
  seed = property(lambda self: self.source.seed)
  num_subjects = property(lambda self: self.source.num_subjects)
  frames_per_subject = property(lambda self: self.source.frames_per_subject)
  image_size = property(lambda self: self.source.image_size)
  aus = property(lambda self: self.source.aus)
  subjects = property(lambda self: self.source.subjects)
  threshold = property(lambda self: self.source.threshold)

  def __len__(self) -> int:
    return len(self.source)

  def subject_frame(self, index: int) -> tuple[int, int]:
    """``(subject, frame)`` of ``index``."""
    return self.source.subject_frame(index)

  def labels(self, index: int) -> dict[str, np.ndarray]:
    """``au`` and ``au_intensity`` of ``index`` (from the cache)."""
    subject, frame = self.source.subject_frame(int(index))
    # fancy indexing copies out of the map
    inten = self._get()["intensities"][subject * self.source.frames_per_subject + frame][self._au_idx]
    return {"au": (inten >= self.source.threshold).astype(np.int8), "au_intensity": inten}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    subject, frame = self.source.subject_frame(int(index))
    row = subject * self.source.frames_per_subject + frame
    arrays = self._get()
    return {
        "image": np.array(arrays["images"][row]),
        **self.labels(index),
        "subject": np.int32(subject),
        "frame": np.int32(frame),
        "landmarks": np.array(arrays["landmarks"][row]),
    }

  def _get(self) -> dict[str, np.ndarray]:
    if self._arrays is None:
      self._arrays = open_arrays(self.path, self._expected)
    return self._arrays

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_arrays": None}  # pickling a memmap would copy the whole file

  def __repr__(self) -> str:
    return f"CachedSynthFaces({self.source!r}, path={self.path!r})"


def maybe_cached(source: synthfaces.SynthFaces, cache_dir: str) -> synthfaces.SynthFaces | CachedSynthFaces:
  """``source`` itself when ``cache_dir`` is ``""`` (cache off), else a :class:`CachedSynthFaces` of it."""
  return CachedSynthFaces(source, cache_dir) if cache_dir else source
