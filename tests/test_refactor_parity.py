"""The architecture redesign (one owner per concept: au_infer, checkpoints, frozen teacher, typed configs) changed
no number: ``configs/au_occl.py:smoke`` gives the same ``report.json`` as the code of the last commit before it,
checked out from this repository's history and run in this test session with the same interpreter."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRE_REFACTOR = "3d1f32d7cda797990a7fe74ea048f20cbbe326ca"  # the last commit before the redesign


def _export(commit: str, dest: str) -> None:
  """The tree of ``commit`` under ``dest`` (git archive), or a skip when this checkout lacks the history."""
  if shutil.which("git") is None:
    pytest.skip("git is not installed: the pre-refactor tree cannot be exported")
  have = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{commit}^{{commit}}"], capture_output=True)
  if have.returncode != 0:
    pytest.skip(f"commit {commit[:12]} is not in this checkout's history (shallow clone?)")
  tar = os.path.join(dest, "tree.tar")
  subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", "-o", tar, commit], check=True)
  with tarfile.open(tar) as t:
    t.extractall(os.path.join(dest, "tree"), filter="data")


@pytest.mark.slow
def test_smoke_report_equals_pre_refactor_code(au_smoke_run, tmp_path):
  _export(PRE_REFACTOR, str(tmp_path))
  old_root, old_wd = tmp_path / "tree", tmp_path / "old_run"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = str(old_root)  # the old package shadows the installed one
  probe = subprocess.run([sys.executable, "-c", "import maejax; print(maejax.__file__)"], cwd=old_root, env=env,
                         capture_output=True, text=True, check=True)
  assert probe.stdout.strip().startswith(str(old_root)), probe.stdout
  cmd = [sys.executable, "-m", "maejax.main", "--config=configs/au_occl.py:smoke", f"--workdir={old_wd}"]
  p = subprocess.run(cmd, cwd=old_root, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]

  with open(old_wd / "report" / "report.json") as f:
    old = json.load(f)
  with open(au_smoke_run.workdir / "report" / "report.json") as f:
    new = json.load(f)
  old.pop("timings")
  new.pop("timings")
  assert new.pop("label_fraction") == 1.0  # metadata the old code did not write: every training label is used
  assert new == old  # every F1 of every row, condition and AU, bit for bit (JSON floats round-trip exactly)
