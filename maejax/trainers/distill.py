"""Stage 2: DMAE distillation (Bai et al.): student MAE + feature alignment to a frozen teacher's shallow block.

The teacher comes from an Orbax checkpoint: a ``mae_pretrain`` workdir or the output of ``maejax.convert``.
Only the student and its projection head(s) are trained; the teacher is a frozen input of the jitted step,
truncated at its deepest aligned block and run on the student's visible tokens.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from maejax import checkpoints, sharding
from maejax.data import pipeline
from maejax.models.dmae import DMAEStudent, dmae_loss
from maejax.models.mae import MAE, MAEConfig
from maejax.trainers import common
from maejax.trainers import mae as mae_stage


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
  """The aligned blocks exist and both models cut the images into the same patches."""
  for s, t in pairs:
    if not (0 <= s < student.depth and 0 <= t < teacher.depth):
      raise ValueError(f"config.distill.pairs: ({s}, {t}) is outside student blocks 0..{student.depth - 1} / "
                       f"teacher blocks 0..{teacher.depth - 1}")
  if teacher.img_size != student.img_size or teacher.patch_size != student.patch_size:
    raise ValueError(f"teacher ({teacher.img_size} px, patch {teacher.patch_size}) and student "
                     f"({student.img_size} px, patch {student.patch_size}) must see the same patches")


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


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  """Runs DMAE distillation into ``workdir`` (resuming when it has a checkpoint)."""
  d = config.distill
  student_cfg = MAEConfig.from_config(config.model)
  student_mae = student_cfg.build()
  teacher, teacher_params, teacher_cfg = load_teacher(d.teacher, student_cfg)
  pairs = tuple(tuple(int(i) for i in p) for p in d.pairs)
  check_teacher(teacher, student_mae, pairs)
  logging.info("distill: teacher %s from %s, pairs %s, head %s, distance %s, teacher %s", teacher_cfg, d.teacher,
               pairs, d.head, d.distance, d.teacher_mode)
  model = DMAEStudent(student_mae, teacher.width, pairs, d.head, d.get("head_hidden") or None)
  mesh = sharding.make_mesh(config.mesh)
  frozen = frozen_teacher(teacher, teacher_params, d, mesh, config.sharding_rules)
  img = student_mae.img_size
  dummy = jnp.zeros((1, img, img, student_mae.in_chans), jnp.float32)
  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  trainer = common.create_trainer(init_fn, distill_loss_fn(model, teacher, d), tx, mesh, config.sharding_rules,
                                  config.seed, config.get("grad_accum_steps", 1), frozen=frozen)
  data = iter(pipeline.mae_pipeline(config.data, config.batch_size, img, config.seed))
  eval_fn = mae_stage.reconstruction_eval(config, student_mae, workdir, lambda params: params["student"])
  model_cfg = dict(student_cfg.to_json(), distill_pairs=[list(p) for p in pairs],
                   teacher=os.path.abspath(d.teacher))
  return common.train_loop(trainer, data, config.total_steps, workdir, config, model_cfg, eval_fn=eval_fn,
                           name="distill")
