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


# ------------------------------------------------------------------------------------------ the KD study


def test_kd_study_configs():
  from maejax.trainers.au import loss_weights, student_runs
  for frac in (1.0, 0.3, 0.1):
    c = _config(f"kd_study,fraction={frac}")
    assert c.data.label_fraction == frac and c.data.val_fraction > 0 and c.eval.split == "test"
    assert c.eval.calibrate and {r[1] for r in c.rows} == set(c.students) | {"teacher"}
  runs = student_runs(_config("kd_study"))
  base = {"wal", "edge_ce", "node_kd", "edge_kd", "occ_bce"}
  assert set(loss_weights(runs["kd"])) == base  # the paper's student: the terms it always had
  assert set(loss_weights(runs["kd_triplet"])) == base | {"triplet_kd"}
  assert set(loss_weights(runs["online_kd"])) == base | {"prob_kd", "teacher_wal", "teacher_edge_ce",
                                                         "teacher_mutual"}
  # The existing variants' students carry no new term.
  for name, run in student_runs(_config("bench")).items():
    assert set(loss_weights(run)) == base, name
  # Tuning: the same number of candidates for every row, evaluated on the validation subjects only.
  t = _config("kd_study,fraction=0.1,tune=true")
  assert t.eval.split == "val" and not t.eval.calibrate
  per_row = {}
  for _, model, _ in t.rows[1:]:
    per_row[model.rsplit("_t", 1)[0]] = per_row.get(model.rsplit("_t", 1)[0], 0) + 1
  assert set(per_row.values()) == {3} and len(per_row) == 7
  assert _config("kd_smoke").data.label_fraction == 0.5
  with pytest.raises(ValueError, match="tune"):
    _config("default,tune=true")


def test_online_kd_each_side_learns_from_the_other_only():
  """Online KD: the teacher's mutual term trains only the teacher, the student's prob-KD term only the
  student; the frozen path gives the teacher nothing to train."""
  import jax
  import jax.numpy as jnp

  c = _config("kd_smoke")
  run = au.student_runs(c)["online_kd"]
  model = au.student_config(c.model, run).build()
  teacher = au.teacher_config(c.model, 2).build()
  x = jnp.zeros((4, 32, 32, 3))
  sv, tv = model.init(jax.random.PRNGKey(0), x), teacher.init(jax.random.PRNGKey(1), x)
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
           "occluded": jnp.asarray(rng.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
           "patch_frac": jnp.zeros((4, 16)), "au": jnp.asarray(rng.integers(-1, 2, (4, 12)), jnp.int8)}
  params = {**sv["params"], au.MUTUAL: tv["params"]}
  extra = {"batch_stats": {**sv["batch_stats"], au.MUTUAL: tv["batch_stats"]}}
  loss_fn = au.make_loss_fn(model, run, teacher)

  # One compiled gradient; the weights are arguments (as in training).
  grad_fn = jax.jit(jax.grad(lambda p, w: loss_fn(p, extra, batch, jax.random.PRNGKey(0),
                                                  {"wal_weights": jnp.ones(12), "loss_weights": w})[0]))

  def grads(only):
    g = dict(grad_fn(params, {k: jnp.float32(k == only) for k in au.loss_weights(run)}))
    g_t = g.pop(au.MUTUAL)
    norm = lambda tree: float(sum(jnp.abs(v).sum() for v in jax.tree_util.tree_leaves(tree)))
    return norm(g), norm(g_t)

  s, t = grads("teacher_mutual")
  assert s == 0.0 and t > 0
  s, t = grads("prob_kd")
  assert s > 0 and t == 0.0
  s, t = grads("teacher_wal")
  assert s == 0.0 and t > 0


@pytest.mark.slow
def test_kd_smoke_end_to_end(tmp_path):
  """Every new loss and row of the study at the smoke size: label fraction 0.5, mixed batches, validation
  split, calibration files, calibrated rows; an online-KD student restores through au_infer.load."""
  from maejax import au_infer
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  wd = tmp_path / "run"
  cmd = [sys.executable, "-m", "maejax.main", "--config=configs/au_occl.py:kd_smoke", f"--workdir={wd}"]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
  c = _config("kd_smoke")
  with open(wd / "report" / "report.json") as f:
    rows = list(json.load(f)["avg_f1"])
  assert rows == [r for row in c.rows for r in (row[0], f"{row[0]} (cal)")]
  for name in c.students:
    assert (wd / "students" / name / "calibration.json").exists()
  loaded = au_infer.load(str(wd), "online_kd")
  assert loaded.thresholds.shape == (12,) and au.MUTUAL in loaded.variables["params"]
  probs = au_infer.predict_probs(loaded, np.zeros((2, 32, 32, 3), np.uint8))
  assert probs.shape == (2, 12) and np.isfinite(probs).all()
