"""Stage 2: DMAE distillation (Bai et al.): student MAE + feature alignment to a frozen teacher's shallow block.

The teacher comes from an Orbax checkpoint: a ``mae_pretrain`` workdir or the output of ``maejax.convert``.
Only the student and its projection head(s) are trained; the teacher is a frozen input of the jitted step,
truncated at its deepest aligned block and run on the student's visible tokens.

The student trains with ``config.model.objective``: ``"mae"`` is DMAE itself (pixel loss + α·alignment,
:class:`DMAEStudent`); BootMAE, SdAE, SD-MAE or MCM (``trainers/objectives.py``, unchanged: their EMA, centre and
data) take the pixel loss's place: loss = the objective's loss + α·the same alignment term
(``models/dmae.py::distill_term``) of the objective's encoder blocks on its visible tokens. The teacher reads the
RGB images at those tokens (for MCM: the RGB channels, before channel dropping). An objective student's params
are the objective's (with its MAE ``encoder``, which the AU stages read) plus ``distill_heads``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from maejax import checkpoints, sharding
from maejax.data import pipeline
from maejax.models.dmae import DMAEStudent, ProjectionHeads, distill_term, dmae_loss
from maejax.models.mae import MAE, MAEConfig
from maejax.trainers import common, objectives
from maejax.trainers import mae as mae_stage

HEADS = "distill_heads"  # an objective student's projection heads, beside the objective's own params


def load_teacher(path: str, student: MAEConfig) -> tuple[MAE, dict, MAEConfig]:
  """``(teacher MAE, params, its saved config)`` from a workdir or a converted checkpoint.

  The teacher computes in the student's dtype and attention implementation (``config.model``): they say how this
  run computes, not what the teacher is, and a converted checkpoint records neither.
  """
  if not path:
    raise ValueError("config.distill.teacher must name the teacher checkpoint: a mae_pretrain workdir or the "
                     "output directory of `python -m maejax.convert`")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.distill.teacher={path!r} does not exist (train it with "
                            "`python -m maejax.main --config=configs/mae_pretrain.py --workdir=...` or convert "
                            "official weights with `python -m maejax.convert`)")
  params, saved = checkpoints.load_params(path)
  cfg = MAEConfig.from_json(saved)
  return cfg.build(dtype=student.dtype, attention=student.attention), params, cfg


def check_teacher(teacher: MAE, student: MAE, pairs) -> None:
  """The aligned blocks exist and both models cut the same images into the same patches."""
  for s, t in pairs:
    if not (0 <= s < student.depth and 0 <= t < teacher.depth):
      raise ValueError(f"config.distill.pairs: ({s}, {t}) is outside student blocks 0..{student.depth - 1} / "
                       f"teacher blocks 0..{teacher.depth - 1}")
  if teacher.img_size != student.img_size or teacher.patch_size != student.patch_size:
    raise ValueError(f"teacher ({teacher.img_size} px, patch {teacher.patch_size}) and student "
                     f"({student.img_size} px, patch {student.patch_size}) must see the same patches")
  if teacher.in_chans != student.in_chans:
    raise ValueError(f"teacher ({teacher.in_chans} channels) and student ({student.in_chans} channels) must read "
                     "the same images")


def frozen_teacher(teacher: MAE, teacher_params, d: ml_collections.ConfigDict, mesh, rules):
  """The teacher's params placed on ``mesh`` by the sharding ``rules`` (an encoder-only checkpoint gives the
  encoder only, which the truncated teacher needs)."""
  img = teacher.img_size
  dummy = jnp.zeros((1, img, img, teacher.in_chans), jnp.float32)
  enc_only = "decoder" not in teacher_params
  if enc_only and d.teacher_mode == "full":
    raise ValueError("config.distill.teacher_mode='full' needs a teacher checkpoint with its decoder")

  def teacher_init(r):
    variables = teacher.init({"params": r, "masking": r}, dummy)
    return {"params": {"encoder": variables["params"]["encoder"]}} if enc_only else variables

  return sharding.shard_like_params(teacher_init, teacher_params, mesh, rules)


def distill_loss_fn(model: DMAEStudent, teacher: MAE, d: ml_collections.ConfigDict):
  """``loss_fn(params, extra, batch, rng, teacher_params)`` of the DMAE objective (:func:`dmae_loss`)."""
  def loss_fn(params, extra, batch, rng, teacher_p):
    images = pipeline.normalize(batch["image"])
    rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
    loss, aux = dmae_loss(model, params, teacher, teacher_p, images, rngs, alpha=d.alpha, distance=d.distance,
                          teacher_mode=d.teacher_mode)
    return loss, (aux, extra)
  return loss_fn


def objective_distill_loss_fn(objective: objectives.Objective, heads: ProjectionHeads, teacher: MAE,
                              d: ml_collections.ConfigDict):
  """``loss_fn(params, extra, batch, rng, teacher_params)`` of an objective student: the objective's loss and
  state updates exactly as ``objectives.build`` defines them, plus α·the DMAE alignment (:func:`distill_term`) of
  the same forward pass's encoder blocks. Metrics: the objective's, its loss as ``objective_loss``, the total as
  ``loss``, and ``distill_loss`` / ``teacher_extra`` as in DMAE."""
  student_blocks = tuple(sorted({s for s, _ in heads.pairs}))
  teacher_blocks = [t for _, t in heads.pairs]

  def loss_fn(params, extra, batch, rng, teacher_p):
    own = {k: v for k, v in params.items() if k != HEADS}
    loss, (metrics, extra), visible = objective.loss_fn(own, extra, batch, rng, student_blocks)
    projected = heads.apply({"params": params[HEADS]}, visible.blocks)
    images = pipeline.normalize(batch["image"])  # RGB, what the teacher MAE reads
    total, m = distill_term(loss, projected, visible, teacher, teacher_p, images, teacher_blocks, alpha=d.alpha,
                            distance=d.distance, teacher_mode=d.teacher_mode)
    return total, (dict(metrics, **m, loss=total, objective_loss=loss), extra)
  return loss_fn


@dataclasses.dataclass
class Student:
  """A distillation student as the shared trainer takes it: ``init_fn(rng) -> variables``, ``loss_fn(params,
  extra, batch, rng, teacher_params)``, the EMA (or None), the data, the evaluation (or None) and the model config
  saved with the checkpoints (before the distillation fields)."""

  init_fn: Any
  loss_fn: Any
  ema: common.EMA | None
  data: Any
  eval_fn: Any
  saved_config: dict


def mae_student(config: ml_collections.ConfigDict, workdir: str, teacher: MAE, pairs) -> Student:
  """DMAE's student: an MAE with one projection head per pair (:class:`DMAEStudent`, params ``student`` and
  ``head_{s}_{t}``), on the MAE pipeline, with the MAE reconstruction evaluation."""
  d = config.distill
  student_cfg = MAEConfig.from_config(config.model)
  student_mae = student_cfg.build()
  model = DMAEStudent(student_mae, teacher.width, pairs, d.head, d.get("head_hidden") or None)
  img = student_mae.img_size
  dummy = jnp.zeros((1, img, img, student_mae.in_chans), jnp.float32)
  return Student(
      init_fn=lambda r: model.init({"params": r, "masking": r}, dummy),
      loss_fn=distill_loss_fn(model, teacher, d), ema=None,
      data=iter(pipeline.mae_pipeline(config.data, config.batch_size, img, config.seed)),
      eval_fn=mae_stage.reconstruction_eval(config, student_mae, workdir, lambda params: params["student"]),
      saved_config=student_cfg.to_json())


def objective_student(config: ml_collections.ConfigDict, teacher: MAE, pairs) -> Student:
  """A student trained with ``config.model.objective`` (``objectives.build``: its model, EMA, data and saved
  config) plus projection heads under ``params["distill_heads"]``."""
  d = config.distill
  objective = objectives.build(config)
  heads = ProjectionHeads(teacher.width, pairs, d.head, d.get("head_hidden") or None)
  width = MAEConfig.from_config(config.model).width

  def init_fn(r):
    variables = objective.init_fn(r)
    blocks = {s: jnp.zeros((1, 1, width), jnp.float32) for s, _ in pairs}
    head_params = heads.init(jax.random.fold_in(r, 1), blocks)["params"]
    return {**variables, "params": {**variables["params"], HEADS: head_params}}

  return Student(init_fn=init_fn, loss_fn=objective_distill_loss_fn(objective, heads, teacher, d),
                 ema=objective.ema, data=objective.data, eval_fn=None, saved_config=objective.saved_config)


def build(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> tuple[common.Trainer, Student, dict]:
  """The trainer on ``config.mesh`` (or ``mesh``) with the frozen teacher, the student, and the model config saved
  with the checkpoints (the student's, plus ``distill_pairs`` and the ``teacher`` path)."""
  d = config.distill
  student_cfg = MAEConfig.from_config(config.model)
  teacher, teacher_params, teacher_cfg = load_teacher(d.teacher, student_cfg)
  pairs = tuple(tuple(int(i) for i in p) for p in d.pairs)
  check_teacher(teacher, student_cfg.build(), pairs)
  objective = objectives.objective_of(config)
  logging.info("distill: %s student, teacher %s from %s, pairs %s, head %s, distance %s, teacher %s", objective,
               teacher_cfg, d.teacher, pairs, d.head, d.distance, d.teacher_mode)
  student = (mae_student(config, workdir, teacher, pairs) if objective == "mae"
             else objective_student(config, teacher, pairs))
  mesh = mesh or sharding.make_mesh(config.mesh)
  frozen = frozen_teacher(teacher, teacher_params, d, mesh, config.sharding_rules)
  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  trainer = common.create_trainer(student.init_fn, student.loss_fn, tx, mesh, config.sharding_rules, config.seed,
                                  config.get("grad_accum_steps", 1), frozen=frozen, ema=student.ema)
  model_cfg = dict(student.saved_config, distill_pairs=[list(p) for p in pairs],
                   teacher=os.path.abspath(d.teacher))
  return trainer, student, model_cfg


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  """Runs DMAE distillation into ``workdir`` (resuming when it has a checkpoint)."""
  trainer, student, model_cfg = build(config, workdir)
  return common.train_loop(trainer, student.data, config.total_steps, workdir, config, model_cfg,
                           eval_fn=student.eval_fn, name="distill")
