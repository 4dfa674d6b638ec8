"""AU inference: the trained-model layout of an AU workdir, restoring a model, the jitted predictor, the
token-drop policy and evaluation per occlusion condition. Used by the AU trainer, ``maejax.predict``, the
notebooks and the benchmarks; it never imports ``maejax.trainers``.

Workdir layout of the AU stages (``au_occl`` writes all of it, ``au_finetune`` the ``stage1`` / ``stage2`` part
at its top level)::

    WORKDIR/mae/                    chained MAE pretraining (au_occl)
    WORKDIR/teacher/stage1/         ME-GraphAU stage 1 (AFG + FGG)
    WORKDIR/teacher/stage2/         stage 2 (MEFL): "the teacher"
    WORKDIR/students/NAME/          one occlusion-robust student per ``config.students`` entry
    WORKDIR/report/                 report.json, per-AU CSV, plots

Each model directory holds ``checkpoints/`` (:mod:`maejax.checkpoints`) whose ``config`` item is an
:class:`~maejax.models.au_model.AUModelConfig`, and, when the trainer calibrated it (``config.eval.calibrate``),
``calibration.json``: per-AU decision thresholds chosen on the validation split (:func:`f1_optimal_thresholds`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from maejax import checkpoints, metrics
from maejax.data import au_pipeline, pipeline
from maejax.models.au_model import AUModel, AUModelConfig

MAE_DIR = "mae"
TEACHER_DIR = "teacher"
STUDENTS_DIR = "students"
REPORT_DIR = "report"
CALIBRATION_FILE = "calibration.json"
DROP_POLICIES = ("", "mask", "pred")  # all tokens | drop the known occluded patches | drop the predicted ones

# ----------------------------------------------------------------------------------------------- layout


def teacher_dir(workdir: str, stage: int = 2) -> str:
  return os.path.join(workdir, TEACHER_DIR, f"stage{stage}")


def student_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, STUDENTS_DIR, name)


def _has_ckpt(path: str) -> bool:
  return os.path.isdir(os.path.join(path, checkpoints.CHECKPOINTS))


def _teacher_dirs(workdir: str) -> list[str]:
  """Where a teacher can be: an au_occl workdir's ``teacher/stage2`` or an au_finetune workdir's ``stage2``."""
  return [p for p in (teacher_dir(workdir), os.path.join(workdir, "stage2")) if _has_ckpt(p)]


def available_models(workdir: str) -> list[str]:
  """Model names of ``workdir``: ``teacher`` (when trained) and the trained students."""
  out = ["teacher"] if _teacher_dirs(workdir) else []
  students = os.path.join(workdir, STUDENTS_DIR)
  if os.path.isdir(students):
    out += sorted(n for n in os.listdir(students) if _has_ckpt(os.path.join(students, n)))
  return out


def model_dir(workdir: str, model: str = "") -> str:
  """The checkpoint directory of ``model`` (``teacher`` or a student name) in an au_occl / au_finetune workdir;
  ``""`` = the ``kd`` student if trained, else the teacher; a directory holding ``checkpoints/`` is itself a
  model directory."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"no directory {workdir}; expected an au_occl / au_finetune workdir")
  if _has_ckpt(workdir) and not model:
    return workdir
  names = available_models(workdir)
  if not model:
    model = "kd" if "kd" in names else "teacher"
  if model == "teacher" and _teacher_dirs(workdir):
    return _teacher_dirs(workdir)[0]
  if model != "teacher" and _has_ckpt(student_dir(workdir, model)):
    return student_dir(workdir, model)
  raise FileNotFoundError(f"model {model!r}: no trained model of that name in {workdir}; available: "
                          f"{names or 'none (expected teacher/stage2/checkpoints or students/NAME/checkpoints)'}")


# ----------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedAUModel:
  """A restored AU model: ``model`` (AUModel), ``variables`` ({"params", "batch_stats"}), the AU numbers of its
  outputs, its checkpoint directory and its config."""

  model: AUModel
  variables: dict
  aus: tuple[int, ...]
  path: str
  config: AUModelConfig
  thresholds: np.ndarray | None = None  # per-AU thresholds of its calibration.json (None: 0.5)

  @property
  def img_size(self) -> int:
    return self.model.img_size


def default_aus(num_aus: int, path: str | None = None) -> tuple[int, ...]:
  """AU numbers of a model with ``num_aus`` outputs: from the ``report/report.json`` of its workdir when there is
  one, else BP4D's 12 or DISFA's 8 (the datasets' AU lists, which the synthetic faces use too)."""
  from maejax.data import folds
  for d in filter(None, (path, os.path.dirname(path or ""), os.path.dirname(os.path.dirname(path or "")))):
    p = os.path.join(d, REPORT_DIR, "report.json")
    if os.path.exists(p):
      with open(p) as f:
        aus = tuple(json.load(f).get("aus", ()))
      if len(aus) == num_aus:
        return aus
  for name in ("bp4d", "disfa"):
    if len(folds.aus(name)) == num_aus:
      return tuple(folds.aus(name))
  raise ValueError(f"the model predicts {num_aus} AUs, which is neither BP4D's 12 nor DISFA's 8: pass their "
                   "numbers with --aus=1,2,4,...")


def load(workdir: str, model: str = "", aus: Sequence[int] | None = None, attention: str | None = None
         ) -> LoadedAUModel:
  """Restores an AU model (params + BatchNorm statistics) from the latest checkpoint of
  :func:`model_dir` ``(workdir, model)``. ``attention``: the attention implementation to run it with (default:
  the one it was trained with; the implementations compute the same function)."""
  path = model_dir(workdir, model)
  saved = checkpoints.read_config(path)
  if "num_aus" not in saved:
    raise ValueError(f"{path}: not an AU model checkpoint (its saved config has no num_aus: {sorted(saved)})")
  cfg = AUModelConfig.from_json(saved)
  if attention:
    cfg = cfg.replace(attention=attention)
  variables, _ = checkpoints.load_variables(path, ("batch_stats",))
  aus = tuple(int(a) for a in aus) if aus else default_aus(cfg.num_aus, path)
  if len(aus) != cfg.num_aus:
    raise ValueError(f"{len(aus)} AUs given ({list(aus)}) but the model in {path} predicts {cfg.num_aus}")
  return LoadedAUModel(cfg.build(), variables, aus, path, cfg, read_calibration(path, cfg.num_aus))


# ------------------------------------------------------------------------------------------- prediction


@dataclasses.dataclass(frozen=True)
class Predictor:
  """Jitted functions of one AU model (shared by every model with the same hyper-parameters: one compilation).

  ``probs(variables, images uint8 (B, S, S, 3), ids_keep (B, K) | None) -> (AU probabilities (B, N), mean
  adjacency (N, N))``; ``occlusion(variables, images) -> (B, L)`` per-patch occluded probability."""

  probs: Any
  occlusion: Any


_PREDICTORS: dict[str, Predictor] = {}


def predictor(model: AUModel) -> Predictor:
  key = repr(model)
  if key not in _PREDICTORS:
    @jax.jit
    def probs(variables, images, ids_keep):
      out = model.apply(variables, pipeline.normalize(images), ids_keep, train=False)
      return out.head.probs, out.head.adjacency.mean(0)

    @jax.jit
    def occlusion(variables, images):
      return jax.nn.sigmoid(model.apply(variables, pipeline.normalize(images), method=AUModel.predict_occlusion))

    _PREDICTORS[key] = Predictor(probs, occlusion)
  return _PREDICTORS[key]


def drop_ids(frac: np.ndarray, threshold: float, bucket: int, min_keep: int) -> np.ndarray | None:
  """The token-drop policy: host-side ``ids_keep (B, K)`` for a batch. K = the batch's largest count of patches
  with occluded fraction ≤ ``threshold``, rounded up to a multiple of ``bucket`` (few distinct shapes to
  compile), at least ``min_keep``; each example keeps its K least-occluded patches. None when nothing needs
  dropping."""
  b, l = frac.shape
  k = int((frac <= threshold).sum(1).max())
  k = min(l, max(min_keep, -(-k // bucket) * bucket))
  if k >= l:
    return None
  order = np.argsort(frac + 1e-6 * np.arange(l)[None], axis=1, kind="stable")[:, :k]
  return np.sort(order, axis=1).astype(np.int32)


def drop_for(model: AUModel, frac: np.ndarray, threshold: float) -> np.ndarray | None:
  """:func:`drop_ids` with the model's bucket: an eighth of its patches."""
  eighth = max(1, model.num_patches // 8)
  return drop_ids(frac, threshold, eighth, eighth)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """Pads the batch axis to ``size`` by repeating the last example (one compiled shape for every batch)."""
  n = len(x)
  return x if n >= size else np.concatenate([x, np.repeat(x[-1:], size - n, 0)])


def predict_probs(loaded: LoadedAUModel, images: np.ndarray, drop: str = "", drop_threshold: float = 0.5
                  ) -> np.ndarray:
  """AU probabilities ``(B, N)`` of ``images (B, S, S, 3)`` uint8 at the model's size. ``drop="pred"`` removes
  the patches the model's occlusion predictor finds occluded (models trained with ``occ_predictor``)."""
  fns = predictor(loaded.model)
  ids = None
  if drop == "pred":
    if not loaded.model.occlusion_predictor:
      raise ValueError(f"drop=pred: the model in {loaded.path} has no occlusion predictor (train it with "
                       "occ_predictor=True, e.g. the kd_drop student)")
    ids = drop_for(loaded.model, np.asarray(fns.occlusion(loaded.variables, images)), drop_threshold)
  elif drop:
    raise ValueError(f"drop must be '' or 'pred' on unlabelled images, got {drop!r}")
  return np.asarray(fns.probs(loaded.variables, images, ids)[0])


# ------------------------------------------------------------------------------------------- evaluation


def evaluate(model: AUModel, variables: Mapping, config, conditions: Sequence[str], *, drop: str = "",
             examples: bool = False, thresholds: np.ndarray | None = None) -> dict[str, dict]:
  """Per-condition ``{"f1": (N,), "ratio": mean occluded fraction, "adjacency": (N, N), "examples"}`` on the
  held-out split of ``config.data`` (``config.eval``: split ("test" default, "val" for tuning), examples,
  batch_size, drop_threshold; ``config.seed`` fixes the example subset and the occlusions). ``drop``: one of
  :data:`DROP_POLICIES`. ``thresholds (N,)``: per-AU decision thresholds (calibration) instead of 0.5."""
  if drop not in DROP_POLICIES:
    raise ValueError(f"row drop must be one of {DROP_POLICIES}, got {drop!r}")
  src = au_pipeline.au_source(config.data, config.eval.get("split", "test"))
  ev = config.eval
  idx = au_pipeline.eval_indices(len(src), ev.get("examples"), config.seed)
  fns = predictor(model)
  out = {}
  for cond in conditions:
    counts = metrics.AUCounts(model.num_aus)
    ratios, adj, shown = [], [], []
    for batch in au_pipeline.eval_batches(src, cond, batch_size=ev.batch_size, size=model.img_size,
                                          patch_size=model.patch_size, num_aus=model.num_aus,
                                          seed=config.seed, indices=idx):
      n = len(batch["au"])
      images = pad_batch(batch["image"], ev.batch_size)
      ids = None
      if drop:
        frac = batch["patch_frac"] if drop == "mask" else np.asarray(fns.occlusion(variables, images))[:n]
        ids = drop_for(model, pad_batch(frac, ev.batch_size), ev.drop_threshold)
      probs, a = fns.probs(variables, images, ids)
      probs = np.asarray(probs)[:n]
      counts.update(probs if thresholds is None else binarize(probs, thresholds), batch["au"])
      ratios.append(batch["patch_frac"].mean(1))
      adj.append(np.asarray(a))
      if examples and not shown:
        shown = [(batch["image"][i], batch["au"][i], probs[i]) for i in range(min(4, n))]
    out[cond] = {"f1": counts.f1(), "ratio": float(np.concatenate(ratios).mean()),
                 "adjacency": np.mean(adj, 0), "examples": shown}
  return out


# ------------------------------------------------------------------------------------------ calibration
# Graceful degradation under occlusion: an F1-optimal threshold per AU, chosen on validation faces under the
# training occlusion mix. Where the occluded face says little about an AU, the best threshold drops toward
# "present", whose F1 is the prior's 2r/(1 + r), instead of the 0.5 threshold's near-zero recall.


def f1_optimal_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> np.ndarray:
  """Per AU, the threshold ``t`` (predict present iff ``p ≥ t``) maximising ``F1 = 2TP / (2TP + FP + FN)`` over
  the known (≥ 0) labels. Candidates: the smallest probability (every face present) and the midpoints between
  consecutive distinct probabilities; among equal F1 the candidate closest to ``default``. An AU with no known
  positive keeps ``default``. ``probs, labels: (M, N)`` → float64 ``(N,)`` (a float32 copy of a threshold could
  round above the probability it must admit)."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels)
  if probs.ndim != 2 or probs.shape != labels.shape:
    raise ValueError(f"probs and labels must both be (M, N), got {probs.shape} and {labels.shape}")
  out = np.full(probs.shape[1], default, np.float64)
  for i in range(probs.shape[1]):
    known = labels[:, i] >= 0
    p, y = probs[known, i], labels[known, i] == 1
    if not y.any():
      continue
    v = np.unique(p)
    cands = np.concatenate([v[:1], (v[:-1] + v[1:]) / 2])
    predicted = len(p) - np.searchsorted(np.sort(p), cands, side="left")
    tp = y.sum() - np.searchsorted(np.sort(p[y]), cands, side="left")
    f1 = 2 * tp / (predicted + y.sum())
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    out[i] = cands[best[np.argmin(np.abs(cands[best] - default))]]
  return out


def binarize(probs: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """``1[p ≥ t_i]`` as float32 ``(B, N)``: decisions that the 0.5 threshold of the F1 counters keeps as they are."""
  return (np.asarray(probs) >= np.asarray(thresholds)[None]).astype(np.float32)


def calibration_data(model: AUModel, variables: Mapping, config, conditions: Sequence[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
  """``(probs, labels)`` ``(M, N)`` on the validation split under a per-face occlusion drawn from
  ``conditions`` (the training mix; no photometric augmentation), deterministic by ``config.seed``;
  ``config.eval.examples`` faces at most."""
  src = au_pipeline.au_source(config.data, "val")
  ev = config.eval
  idx = au_pipeline.eval_indices(len(src), ev.get("examples"), config.seed)
  data = au_pipeline.train_pipeline(
      au_pipeline.Subset(src, idx), global_batch_size=ev.batch_size, size=model.img_size,
      patch_size=model.patch_size, num_aus=model.num_aus, seed=config.seed, occlude=True,
      conditions=tuple(conditions), jitter=0.0, shift=0.0, flip=False, shuffle=False, num_epochs=1,
      drop_remainder=False, process_index=0, process_count=1)
  fns = predictor(model)
  probs, labels = [], []
  for batch in data:
    n = len(batch["au"])
    p, _ = fns.probs(variables, pad_batch(batch["occluded"], ev.batch_size), None)
    probs.append(np.asarray(p)[:n])
    labels.append(batch["au"])
  return np.concatenate(probs), np.concatenate(labels)


def write_calibration(path: str, thresholds: np.ndarray, meta: Mapping[str, Any]) -> str:
  """Writes ``path/calibration.json`` (``thresholds`` and what they were chosen on); returns its path."""
  out = os.path.join(path, CALIBRATION_FILE)
  os.makedirs(path, exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump({"thresholds": [float(t) for t in thresholds], **meta}, f, indent=1)
  os.replace(out + ".tmp", out)
  return out


def read_calibration(path: str, num_aus: int | None = None) -> np.ndarray | None:
  """The thresholds of ``path/calibration.json``, or None when there is none."""
  f = os.path.join(path, CALIBRATION_FILE)
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    t = np.asarray(json.load(fh)["thresholds"], np.float64)
  if num_aus is not None and t.shape != (num_aus,):
    raise ValueError(f"{f}: {t.shape[0]} thresholds for a model with {num_aus} AUs")
  return t
