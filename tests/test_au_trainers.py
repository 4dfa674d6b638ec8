"""AU stages: config checks, eval mode without checkpoints, and the end-to-end ``au_occl.py:smoke`` job
(train, report, then ``mode=eval`` rebuilding the same report from the checkpoints)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maejax import config_utils, report
from maejax.trainers import au

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant="smoke"):
  return config_utils.load_config(os.path.join(ROOT, "configs", f"au_occl.py:{variant}"))


def test_configs_load():
  for v in ("default", "bench", "smoke", "bp4d", "disfa"):
    c = _config(v)
    assert c.stage == "au_occl"
    assert {r[1] for r in c.rows} <= set(c.students) | {"teacher"}
  assert _config("disfa").model.num_aus == 8 and _config("bp4d").model.size == "B"
  with pytest.raises(ValueError, match="variant"):
    _config("huge")


def test_seed_drives_the_whole_chain():
  """``seed`` (config argument or a later ``--config.seed`` override) also seeds the chained MAE stage."""
  assert _config("bench,seed=3").mae.seed == 3
  c = _config("bench")
  assert c.mae.seed == 0
  c.seed = 5  # what `--config.seed=5` does
  assert c.mae.seed == 5 and c.to_dict()["mae"]["seed"] == 5


def test_preempted_stage_stops_the_chain(tmp_path, monkeypatch):
  """SIGTERM during the chained MAE stage (train_loop reports ``preempted``) must stop the job there, not train
  the teacher on the unfinished MAE."""
  from maejax.trainers import common
  calls = []

  def preempted_loop(trainer, data, total_steps, workdir, *args, **kw):
    calls.append(workdir)
    return common.LoopResult(state=trainer.state, losses=[], preempted=True)

  monkeypatch.setattr(common, "train_loop", preempted_loop)
  c = _config()
  c.compilation_cache = ""
  with pytest.raises(common.Preempted, match="mae: preempted"):
    au.train_occl(c, str(tmp_path))
  assert len(calls) == 1 and calls[0].endswith("mae")
  assert not (tmp_path / "teacher").exists() and not (tmp_path / "students").exists()


def test_unknown_student_key_names_it():
  c = _config()
  c.students.kd.alpha = 3.0
  with pytest.raises(ValueError, match="students.kd.alpha"):
    au.student_models(c)


def test_eval_mode_without_checkpoints_names_the_stage(tmp_path):
  c = _config()
  c.mode = "eval"
  c.compilation_cache = ""
  with pytest.raises(FileNotFoundError, match="teacher_stage1"):
    au.train_occl(c, str(tmp_path))


def test_report_table_and_csv(tmp_path):
  aus = (1, 2)
  ex = [(np.zeros((8, 8, 3), np.uint8), np.array([1, 0]), np.array([0.7, 0.2]))]
  res = {name: {c: {"f1": np.array([f, f / 2]), "ratio": r, "adjacency": np.eye(2), "examples": ex}
                for c, r in (("clean", 0.0), ("block_upper", 0.5), ("block_lower", 0.5), ("block_random", 0.4))}
         for name, f in (("teacher", 0.8), ("KD student", 0.6))}
  text = report.write_report(str(tmp_path), res, aus, ("clean", "block_upper", "block_lower", "block_random"))
  lines = text.splitlines()
  assert lines[2].split()[:2] == ["teacher", "60.0"]  # mean of 0.8 and 0.4
  assert lines[3].split()[-1] == "45.0"  # KD student "blocks" column
  with open(tmp_path / "per_au_f1.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 8 and rows[0]["AU2"] == "0.4000"
  for png in ("f1_vs_ratio.png", "examples.png", "relation_graph_teacher.png"):
    assert (tmp_path / png).stat().st_size > 0


def _run(args, workdir):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  cmd = [sys.executable, "-m", "maejax.main", "--config=configs/au_occl.py:smoke", f"--workdir={workdir}", *args]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  return p.stdout + p.stderr


@pytest.mark.slow
def test_smoke_end_to_end_then_eval_mode(au_smoke_run):
  # The smoke job itself runs once per session in conftest.py (shared with the predict and notebook tests).
  wd, out = au_smoke_run.workdir, au_smoke_run.output
  rows = [r[0] for r in _config().rows]
  for r in rows:
    assert r in out
  with open(wd / "report" / "report.json") as f:
    first = json.load(f)["avg_f1"]
  assert list(first) == rows
  for name in ("per_au_f1.csv", "f1_vs_ratio.png", "examples.png"):
    assert (wd / "report" / name).exists()
  for stage in ("mae", "teacher/stage1", "teacher/stage2", "students/kd", "students/kd_drop"):
    assert (wd / stage / "checkpoints").is_dir()

  out2 = _run(["--config.mode=eval"], wd)
  assert "trained in" not in out2 and "first step" not in out2
  with open(wd / "report" / "report.json") as f:
    second = json.load(f)["avg_f1"]
  assert second == first  # same checkpoints, same fixed occlusions → the same report
