"""maejax.checkpoints: a save that fails for lack of disk space leaves the last complete checkpoint (which still
restores), removes its partial directory and says so in one line; the workdir lock."""

import contextlib
import errno
import glob
import json
import os
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from maejax import checkpoints


def _state(n: int, fill: float):
  """A state of ``n`` incompressible float32 values (Orbax compresses) whose first value is ``fill``."""
  w = np.random.default_rng(int(fill)).standard_normal(n).astype(np.float32)
  w[0] = fill
  return {"params": {"w": jnp.asarray(w)}, "step": jnp.int32(0)}


def _restore(ck, like):
  import jax
  rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: rep, like)
  return ck.restore(like, shardings)


def _check_failed_save(err: pytest.ExceptionInfo, workdir: str, first_step: int) -> None:
  msg = str(err.value)
  assert "\n" not in msg and "disk full" in msg and os.path.abspath(workdir) in msg and "MiB free" in msg, msg
  assert err.value.errno == errno.ENOSPC
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
  assert checkpoints.latest_step(workdir) == first_step


def test_injected_write_error_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
  wd = str(tmp_path / "run")
  ck = checkpoints.Checkpointer(wd, save_every=1, with_data=False)
  ck.save(1, _state(8, 1.0), None, {"width": 8})
  real = epath.Path.write_text

  def full_disk(self, *a, **kw):  # the JSON config item is written through epath: fail it as a full disk would
    raise OSError(errno.ENOSPC, "No space left on device", str(self))

  monkeypatch.setattr(epath.Path, "write_text", full_disk)
  with pytest.raises(checkpoints.CheckpointWriteError) as err:
    ck.save(2, _state(8, 2.0), None, {"width": 8})
  monkeypatch.setattr(epath.Path, "write_text", real)
  _check_failed_save(err, wd, 1)
  ck.close()
  ck = checkpoints.Checkpointer(wd, save_every=1, with_data=False)
  np.testing.assert_array_equal(_restore(ck, _state(8, 0.0))["params"]["w"], _state(8, 1.0)["params"]["w"])
  ck.save(2, _state(8, 2.0), None, {"width": 8})  # space is back: the next save works
  assert ck.latest_step() == 2
  ck.close()


def test_real_full_filesystem(tmp_path):
  """On a 3 MiB tmpfs (needs root to mount; skipped otherwise) a 1 MiB state saves once, then the disk fills."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
  if p.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'not root'}); the injected-error test covers it")
  try:
    wd = str(mnt / "run")
    ck = checkpoints.Checkpointer(wd, save_every=1, keep=10, with_data=False)
    n = 256 * 1024  # 1 MiB of float32
    ck.save(1, _state(n, 1.0), None, {"n": n})
    with pytest.raises(checkpoints.CheckpointWriteError) as err:
      for step in range(2, 6):
        ck.save(step, _state(n, float(step)), None, {"n": n})
    last = checkpoints.latest_step(wd)
    assert last is not None and last >= 1
    _check_failed_save(err, wd, last)
    ck.close()
    ck = checkpoints.Checkpointer(wd, save_every=1, keep=10, with_data=False)
    np.testing.assert_array_equal(_restore(ck, _state(n, 0.0))["params"]["w"], _state(n, float(last))["params"]["w"])
    ck.close()
  finally:
    with contextlib.suppress(Exception):
      subprocess.run(["umount", str(mnt)], check=False)


def test_workdir_lock(tmp_path):
  wd = str(tmp_path)
  with checkpoints.WorkdirLock(wd) as lock:
    with open(lock.path) as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(checkpoints.WorkdirBusy, match=f"pid {os.getpid()}"):
      checkpoints.WorkdirLock(wd).acquire()
  assert not os.path.exists(lock.path)  # released on exit
  # A lock of a process that no longer runs on this host is stale and replaced.
  dead = subprocess.Popen(["true"])
  dead.wait()
  with open(os.path.join(wd, checkpoints.LOCK_FILE), "w") as f:
    json.dump({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}, f)
  with checkpoints.WorkdirLock(wd) as lock:
    with open(lock.path) as f:
      assert json.load(f)["pid"] == os.getpid()


def _main(workdir, *args):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAEJAX_DEBUG")}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "maejax.main", "--config=configs/mae_pretrain.py:smoke", f"--workdir={workdir}",
         "--config.checkpoint_every=1", "--config.keep_checkpoints=100", "--config.eval_every=1000", *args]
  return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_on_a_full_disk_then_resume(tmp_path):
  """``python -m maejax.main`` whose disk fills mid-run: exit 2, one stderr line naming the workdir and the free
  space, no traceback, no partial checkpoint; with space again the same command resumes from the last complete
  step. Needs root to mount a tmpfs (skipped otherwise)."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
  if p.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or 'not root'})")
  try:
    wd = mnt / "run"
    full = _main(wd)
    lines = [line for line in full.stderr.splitlines() if line.strip()]
    assert full.returncode == 2, full.stdout[-2000:] + full.stderr[-3000:]
    assert len(lines) == 1, full.stderr[-3000:]  # no traceback, no late write callbacks, no warnings at exit
    assert lines[-1].startswith("maejax.main: error: disk full") and str(wd) in lines[-1] and "MiB free" in lines[-1]
    assert not glob.glob(str(wd / "checkpoints" / "*.orbax-checkpoint-tmp*"))
    last = checkpoints.latest_step(str(wd))
    assert last is not None and 1 <= last < 12
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    again = _main(wd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {last}" in again.stdout
    assert checkpoints.latest_step(str(wd)) == 12
  finally:
    with contextlib.suppress(Exception):
      subprocess.run(["umount", str(mnt)], check=False)


def test_closed_loop_callbacks_are_dropped_and_nothing_else(monkeypatch):
  """The unraisable hook a Checkpointer installs: a real ``Event loop is closed`` report (a callback handed to a
  closed asyncio loop from a finaliser, as tensorstore's threads do after a failed save) is dropped; any other
  unraisable report, the same message raised elsewhere included, reaches the previous hook."""
  import asyncio
  import gc

  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
  checkpoints.drop_closed_loop_callbacks()
  checkpoints.drop_closed_loop_callbacks()  # idempotent: one wrapper
  loop = asyncio.new_event_loop()
  loop.close()

  class LateCallback:
    def __init__(self, action):
      self.action = action

    def __del__(self):
      self.action()

  def same_message_elsewhere():
    raise RuntimeError("Event loop is closed")

  def other():
    raise ValueError("a real error")

  for action in (lambda: loop.call_soon_threadsafe(print), same_message_elsewhere, other):
    LateCallback(action)
    gc.collect()
  assert seen == [repr(RuntimeError("Event loop is closed")), repr(ValueError("a real error"))]
