"""The one owner of what a run saves and how it is read back.

A training workdir holds ``checkpoints/<step>/`` (Orbax ``CheckpointManager``), each with three items:

* ``state``  the :class:`~maejax.trainers.common.TrainState` (step, params, optimizer state, rng, ``extra``
  collections such as BatchNorm statistics); frozen inputs of the step (a teacher) are never part of it;
* ``data``   the grain iterator state (exact data resume);
* ``config`` JSON of the model's constructor arguments (``MAEConfig`` / ``AUModelConfig`` fields).

A converted checkpoint (``python -m maejax.convert``) is a directory with ``params`` (StandardSave) and ``config``
(JSON). Readers: :meth:`Checkpointer.restore` (full resume onto any mesh), :func:`load_params` (params only, of either
kind), :func:`load_variables` (params + other collections, for evaluation and prediction), :func:`read_config`.

A run holds its workdir with :class:`WorkdirLock`; a save that fails (disk full) removes its partial directory
and raises :class:`CheckpointWriteError`, leaving the last complete checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import glob
import json
import os
import shutil
import socket
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

CHECKPOINTS = "checkpoints"
LOCK_FILE = ".maejax.lock"


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); the message names the workdir and free space."""


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


# -------------------------------------------------------------------------------------------- the lock


class WorkdirLock:
  """Exclusive hold of a workdir for one run: ``WORKDIR/.maejax.lock`` names host, pid and start time.

  Taken with ``O_CREAT | O_EXCL`` (atomic). A lock left by a process that no longer runs on this host is stale
  and is replaced; a lock of another host is trusted (delete the file by hand when that run is known dead).
  Released (the file removed) on exit. In a multi-process job only process 0 takes it.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self.enabled = enabled
    self.held = False

  def acquire(self) -> WorkdirLock:
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        if holder is not None and not self._stale(holder):
          raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by pid {holder.get('pid')} on "
                            f"{holder.get('host')} since {holder.get('started')} (lock {self.path}); wait for "
                            "it to finish or choose another --workdir") from None
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirBusy(f"could not take the lock {self.path}: another run is starting in the same workdir")

  def _holder(self) -> dict | None:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # unreadable or half-written lock: treated as stale

  @staticmethod
  def _stale(holder: Mapping) -> bool:
    if not holder or holder.get("host") != socket.gethostname():
      return not holder
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, KeyError, ValueError, TypeError):
      return False
    return False

  def release(self) -> None:
    if self.held:
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
      self.held = False

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


# ------------------------------------------------------------------------------------ training checkpoints


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def _is_disk_full(e: BaseException) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "No space left on device" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def _is_closed_loop_callback(unraisable) -> bool:
  """A ``RuntimeError('Event loop is closed')`` from asyncio's ``call_soon_threadsafe``: a tensorstore write of a
  failed Orbax save that completes after Orbax closed the event loop the save ran on, and reports its result to
  it. One per pending write (hundreds on a full disk), printed from tensorstore's threads at any time, interleaved,
  until the process exits."""
  if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(unraisable.exc_traceback)
  return bool(frames) and frames[-1].name == "_check_closed" and frames[-1].filename.endswith(
      os.path.join("asyncio", "base_events.py"))


def drop_closed_loop_callbacks() -> None:
  """Installs a ``sys.unraisablehook`` that drops :func:`_is_closed_loop_callback` reports (the failed save's
  :class:`CheckpointWriteError` states their cause once) and passes every other report to the hook it replaces.
  Idempotent."""
  previous = sys.unraisablehook
  if getattr(previous, "_maejax_drops_closed_loop", False):
    return

  def hook(unraisable):
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  hook._maejax_drops_closed_loop = True
  sys.unraisablehook = hook


def _remove_partial(ckdir: str) -> list[str]:
  """Removes Orbax's unfinished step directories (``*.orbax-checkpoint-tmp*``) left by a failed save."""
  partial = sorted(glob.glob(os.path.join(ckdir, "*.orbax-checkpoint-tmp*")))
  for p in partial:
    shutil.rmtree(p, ignore_errors=True)
  return partial


class Checkpointer:
  """Orbax ``CheckpointManager`` over ``workdir/checkpoints``: train state + grain iterator + model config."""

  def __init__(self, workdir: str, keep: int = 3, save_every: int = 1000, with_data: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.with_data = with_data
    self.save_every = max(save_every, 1)
    drop_closed_loop_callbacks()  # before any save: a failed one's late callbacks may fire before it raises
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=self.save_every,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: PyTree, data_iter: Any | None, config: Mapping[str, Any],
           force: bool = False) -> bool:
    """Saves step ``step``. A failed write (disk full) removes the partial step and raises
    :class:`CheckpointWriteError`; earlier complete steps stay."""
    import grain
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(dict(config))}
    if self.with_data and data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
      self.manager.wait_until_finished()
    except Exception as e:
      if not _is_disk_full(e):
        raise
      # The failed save's unstarted writes are coroutines that will never run; Python warns of each at exit.
      warnings.filterwarnings("ignore", message=r"coroutine '.*write_fragment' was never awaited",
                              category=RuntimeWarning)
      _remove_partial(checkpoint_dir(self.workdir))
      free = shutil.disk_usage(self.workdir).free
      err = CheckpointWriteError(
          f"disk full while saving step {step} in {self.workdir} ({free / 2**20:.1f} MiB free); the partial "
          f"checkpoint was removed, the last complete one is step {self._complete_steps()}; free space and run "
          "the same command again to resume")
      err.errno = errno.ENOSPC
      raise err from e
    return saved

  def _complete_steps(self) -> int | None:
    steps = [int(s) for s in os.listdir(checkpoint_dir(self.workdir)) if s.isdigit()]
    return max(steps) if steps else None

  def restore(self, state_like: PyTree, shardings: PyTree, data_iter: Any | None = None,
              step: int | None = None) -> PyTree:
    """Restores the train state onto ``shardings`` (any mesh); the iterator is restored in place when given."""
    import grain
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if self.with_data and data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def close(self):
    self.manager.close()


def latest_step(workdir: str) -> int | None:
  """The newest complete step in ``workdir/checkpoints`` (None when there is none)."""
  ckdir = checkpoint_dir(workdir)
  if not os.path.isdir(ckdir):
    return None
  mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return mgr.latest_step()
  finally:
    mgr.close()


def is_complete(workdir: str, total_steps: int) -> bool:
  """Whether ``workdir`` holds the final checkpoint (step ``total_steps``) of its stage."""
  return latest_step(workdir) == total_steps


# ---------------------------------------------------------------------------------------------- readers


def is_converted(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "params")) and os.path.isdir(os.path.join(path, "config"))


def _step_dir(path: str, step: int | None) -> tuple[str, int]:
  ckdir = checkpoint_dir(path) if os.path.isdir(checkpoint_dir(path)) else os.path.abspath(path)
  if not os.path.isdir(ckdir):
    raise FileNotFoundError(f"no checkpoint at {path}: expected a training workdir (with checkpoints/) or "
                            "the output of `python -m maejax.convert`")
  mgr = ocp.CheckpointManager(ckdir, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = mgr.latest_step() if step is None else step
  finally:
    mgr.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint steps in {ckdir}")
  return os.path.join(ckdir, str(step)), step


def read_config(path: str, step: int | None = None) -> dict:
  """The model config saved with a training checkpoint or a converted one."""
  path = os.path.abspath(path)
  if is_converted(path):
    return load_converted(path)[1]
  step_dir, _ = _step_dir(path, step)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    return dict(ckptr.restore(step_dir, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def _restore_subtree(state_dir: str, select, sharding: jax.sharding.Sharding | None) -> PyTree:
  """Restores only the part ``select(metadata)`` of a saved train state (the rest never leaves the disk)."""
  ckptr = ocp.PyTreeCheckpointer()
  item = select(ckptr.metadata(state_dir).item_metadata)
  abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), item)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  restore_args = jax.tree_util.tree_map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding), abstract)
  return ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                              partial_restore=True))


def load_params(path: str, step: int | None = None) -> tuple[PyTree, dict]:
  """``(params, model config)`` from a training workdir (latest step unless ``step``) or a converted checkpoint."""
  path = os.path.abspath(path)
  if is_converted(path):
    return load_converted(path)
  step_dir, step = _step_dir(path, step)
  config = read_config(path, step)
  params = _restore_subtree(os.path.join(step_dir, "state"), lambda m: {"params": m["params"]}, None)["params"]
  return params, config


def load_variables(path: str, collections: Sequence[str] = ("batch_stats",), step: int | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[dict, dict]:
  """``({"params", *collections}, model config)`` of a training workdir: what evaluation and prediction need
  (optimizer state stays on disk). Collections the checkpoint lacks come back as ``{}``."""
  step_dir, step = _step_dir(path, step)
  config = read_config(path, step)

  def select(meta):
    extra = meta.get("extra") or {}
    return {"params": meta["params"], "extra": {c: extra[c] for c in collections if c in extra}}

  state = _restore_subtree(os.path.join(step_dir, "state"), select, sharding)
  out = {"params": state["params"]}
  out.update({c: state["extra"].get(c, {}) for c in collections})
  return out, config


# ------------------------------------------------------------------------------------ converted checkpoints


def save_converted(dst: str | os.PathLike, params: PyTree, config: Mapping[str, Any], *,
                   overwrite: bool = False) -> str:
  """Writes ``DST/params`` (Orbax StandardSave) and ``DST/config`` (JsonSave). Returns the absolute path."""
  path = os.path.abspath(os.fspath(dst))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"destination {path!r} already exists; choose a new directory or pass "
                          "overwrite=True (CLI --overwrite)")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             config=ocp.args.JsonSave(dict(config))), force=overwrite)
  return path


def load_converted(path: str | os.PathLike, target: PyTree | None = None) -> tuple[PyTree, dict]:
  """Reads a checkpoint written by :func:`save_converted`: ``(params, config)``.

  Without ``target`` the params come back as numpy arrays (as saved). ``target``: a pytree of
  ``jax.ShapeDtypeStruct`` with shardings restores them as sharded jax arrays. ``DST/params`` is a plain
  StandardCheckpointer item and ``DST/config/metadata`` is JSON, so plain Orbax reads them too.
  """
  path = os.path.abspath(os.fspath(path))
  for item in ("params", "config"):
    if not os.path.isdir(os.path.join(path, item)):
      raise FileNotFoundError(f"{path!r} is not a converted maejax checkpoint: missing item {item!r}")
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    out = ckptr.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target),
                                                      config=ocp.args.JsonRestore()))
  return out["params"], dict(out["config"])
