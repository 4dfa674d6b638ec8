"""Test-wide setup: 8 simulated CPU devices (set before jax is imported anywhere), and the shared AU smoke run."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def au_smoke_run(tmp_path_factory):
  """The ``configs/au_occl.py:smoke`` job (MAE → teacher → students → report), run once per test session and
  shared by the AU trainer, predict and notebook tests. ``.workdir``: its workdir; ``.output``: its console
  output. Tests may read the workdir, or rebuild the same report in it (``mode=eval``); nothing else.

  ``MAEJAX_TEST_SMOKE_WORKDIR=DIR`` reuses (or creates, then reuses) DIR across sessions while iterating."""
  reuse = os.environ.get("MAEJAX_TEST_SMOKE_WORKDIR")
  wd = os.path.abspath(reuse) if reuse else str(tmp_path_factory.mktemp("au_smoke") / "run")
  log = os.path.join(wd, "console.log")
  if not (reuse and os.path.exists(os.path.join(wd, "report", "report.json")) and os.path.exists(log)):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "maejax.main", "--config=configs/au_occl.py:smoke", f"--workdir={wd}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with open(log, "w") as f:
      f.write(p.stdout + p.stderr)
  with open(log) as f:
    return types.SimpleNamespace(workdir=Path(wd), output=f.read())


def pytest_collection_modifyitems(config, items):
  """Under ``pytest -n N --dist loadgroup``, keep every user of a shared expensive fixture on one worker, so the
  fixture runs once per session instead of once per worker."""
  import pytest as _pytest
  groups = {"au_smoke_run": "au_smoke", "uninterrupted": "mae_smoke"}
  for item in items:
    for fixture, group in groups.items():
      if fixture in getattr(item, "fixturenames", ()):
        item.add_marker(_pytest.mark.xdist_group(group))
        break
