"""User errors of the ``python -m maejax.X`` commands reach the console as one line, ``<prog>: error: ...``, exit
status 2, no traceback; and the main job's workdir lock. Each case fails before any training (checks first)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_au import make_bp4d

ROOT = Path(__file__).resolve().parent.parent


def run(module, *args, env=None, cwd=ROOT):
  full_env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MAEJAX_DEBUG")}
  full_env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **(env or {}))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=300)


def error_line(proc, prog, *names, ignore_info=False):
  """The single non-empty stderr line (absl INFO progress lines dropped when ``ignore_info``), checked to be
  ``<prog>: error: ...`` naming each of ``names``."""
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  if ignore_info:
    lines = [line for line in lines if not (line[:1] == "I" and line[1:5].isdigit())]
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith(f"{prog}: error: "), lines[0]
  for name in names:
    assert name in lines[0], (name, lines[0])
  return lines[0]


def main(*args, workdir):
  return run("maejax.main", *args, f"--workdir={workdir}")


def test_unknown_override_key_is_named_with_the_closest_keys(tmp_path):
  proc = main("--config=configs/mae_pretrain.py:smoke", "--config.nosuchkey=1", workdir=tmp_path)
  error_line(proc, "maejax.main", "nosuchkey")
  proc = main("--config=configs/mae_pretrain.py:smoke", "--config.model.widht=8", workdir=tmp_path)
  error_line(proc, "maejax.main", "config.model has no field 'widht'", "did you mean 'width'")


def test_missing_config_file(tmp_path):
  proc = main("--config=configs/nosuch.py", workdir=tmp_path)
  error_line(proc, "maejax.main", "configs/nosuch.py not found")


def test_unknown_variant(tmp_path):
  line = error_line(main("--config=configs/au_occl.py:nosuch", workdir=tmp_path), "maejax.main",
                    "configs/au_occl.py", "'nosuch'")
  assert "default, bench, smoke, bp4d, disfa" in line
  error_line(main("--config=configs/au_occl.py:smok", workdir=tmp_path), "maejax.main", "did you mean 'smoke'")


def test_unknown_config_argument_suggests_the_declared_one(tmp_path):
  proc = main("--config=configs/au_finetune.py:tiny,sed=3", workdir=tmp_path)
  error_line(proc, "maejax.main", "configs/au_finetune.py", "'sed'", "did you mean 'seed'")


def test_bad_mode(tmp_path):
  proc = main("--config=configs/au_finetune.py:smoke", "--config.mode=evl", workdir=tmp_path)
  error_line(proc, "maejax.main", "config.mode='evl'", "'train', 'eval'")
  assert not os.listdir(tmp_path)  # rejected before the workdir is touched


def test_debug_shows_the_traceback(tmp_path):
  proc = run("maejax.main", "--config=configs/au_occl.py:nosuch", f"--workdir={tmp_path}",
             env={"MAEJAX_DEBUG": "1"})
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "nosuch" in proc.stderr
  proc = main("--config=configs/au_occl.py:nosuch", "--debug", workdir=tmp_path)
  assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_predict_with_a_missing_checkpoint(tmp_path):
  proc = run("maejax.predict", f"--checkpoint={tmp_path / 'nosuch'}", f"--input={tmp_path}")
  error_line(proc, "maejax.predict", str(tmp_path / "nosuch"))


def test_convert_with_a_missing_source(tmp_path):
  proc = run("maejax.convert", f"--src={tmp_path / 'nosuch.pth'}", f"--dst={tmp_path / 'out'}")
  error_line(proc, "maejax.convert", str(tmp_path / "nosuch.pth"))
  assert not (tmp_path / "out").exists()


def test_prepare_with_a_corrupt_label_file(tmp_path):
  make_bp4d(tmp_path / "bp4d", n_frames=2)
  path = tmp_path / "bp4d/AUCoding/AU_OCC/F007_T1.csv"
  path.write_text(path.read_text().replace(",0,", ",5,", 1))
  proc = run("maejax.data.prepare", "--dataset=bp4d", f"--manual_dir={tmp_path / 'bp4d'}",
             f"--data_dir={tmp_path / 'tfds'}")
  error_line(proc, "maejax.data.prepare", "F007_T1.csv", "line 2")


def _write_lock(workdir, pid):
  workdir.mkdir(parents=True, exist_ok=True)
  lock = workdir / ".maejax.lock"
  lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": "2000-01-01T00:00:00"}))
  return lock


def test_busy_workdir_is_refused(tmp_path):
  lock = _write_lock(tmp_path, os.getpid())  # this test process is alive: the workdir is held
  proc = main("--config=configs/au_finetune.py:smoke", workdir=tmp_path)
  error_line(proc, "maejax.main", f"in use by pid {os.getpid()}", socket.gethostname())
  assert lock.exists() and str(os.getpid()) in lock.read_text()


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize("holder", ["dead", "garbled"])
def test_stale_lock_is_replaced(tmp_path, holder):
  """A lock of a process that no longer runs (or an unreadable one) is taken over: the run gets past it, to
  the missing encoder init (a one-line error raised inside the stage), and releases the lock on exit."""
  lock = _write_lock(tmp_path, _dead_pid())
  if holder == "garbled":
    lock.write_text("{half a lock")
  proc = main("--config=configs/au_finetune.py:smoke", f"--config.init={tmp_path / 'no_encoder'}",
              "--config.compilation_cache=", workdir=tmp_path)
  error_line(proc, "maejax.main", str(tmp_path / "no_encoder"))
  assert "maejax: stage au_finetune" in proc.stdout
  assert not lock.exists()


ROUTING = """
import logging as pl, sys
from absl import flags, logging
from maejax import main
flags.FLAGS(["main", "--config=configs/mae_pretrain.py:smoke", *sys.argv[2:]])
logging.use_absl_handler()  # as app.run does
main.route_console_log()
main.log_to_file(sys.argv[1], 0)
root = pl.getLogger()
for path, level, msg in (("/site-packages/orbax/checkpoint/manager.py", pl.WARNING, "orbax-warning"),
                         ("/site-packages/orbax/checkpoint/manager.py", pl.ERROR, "orbax-error"),
                         ("/maejax/trainers/au.py", pl.WARNING, "maejax-warning"),
                         ("/maejax/trainers/au.py", pl.INFO, "maejax-info")):
  root.handle(root.makeRecord("absl", level, path, 1, msg, (), None))
"""


@pytest.mark.parametrize("verbosity", [None, 0])
def test_console_shows_warnings_and_the_log_file_everything(tmp_path, verbosity):
  extra = [] if verbosity is None else [f"--verbosity={verbosity}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", ROUTING, str(tmp_path), *extra], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  shown = {m for m in ("orbax-warning", "orbax-error", "maejax-warning", "maejax-info") if m in proc.stderr}
  if verbosity is None:  # Orbax's records (its errors too: a failed save raises maejax's one-line error) in the file
    assert shown == {"maejax-warning"}
  else:
    assert shown == {"orbax-warning", "orbax-error", "maejax-warning", "maejax-info"}
  log = (tmp_path / "main.log").read_text()
  assert all(m in log for m in ("orbax-warning", "orbax-error", "maejax-warning", "maejax-info"))
