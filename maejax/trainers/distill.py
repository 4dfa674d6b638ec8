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
from maejax.trainers import common
from maejax.trainers import mae as mae_stage


def load_teacher(path: str):
  """``(teacher MAE module, params, model config)`` from a workdir or a converted checkpoint."""
  if not path:
    raise ValueError("config.distill.teacher must name the teacher checkpoint: a mae_pretrain workdir or the "
                     "output directory of `python -m maejax.convert`")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.distill.teacher={path!r} does not exist (train it with "
                            "`python -m maejax.main --config=configs/mae_pretrain.py --workdir=...` or convert "
                            "official weights with `python -m maejax.convert`)")
  params, cfg = checkpoints.load_params(path)
  cfg = {k: v for k, v in cfg.items() if v is not None}
  return mae_stage.build_model(cfg), params, cfg


def check_pairs(pairs, student_depth: int, teacher_depth: int):
  for s, t in pairs:
    if not (0 <= s < student_depth and 0 <= t < teacher_depth):
      raise ValueError(f"config.distill.pairs: ({s}, {t}) is outside student blocks 0..{student_depth - 1} / "
                       f"teacher blocks 0..{teacher_depth - 1}")


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  d = config.distill
  teacher, teacher_params, teacher_cfg = load_teacher(d.teacher)
  student_mae = mae_stage.build_model(config.model)
  pairs = tuple(tuple(int(i) for i in p) for p in d.pairs)
  check_pairs(pairs, student_mae.depth, teacher.depth)
  if teacher.img_size != student_mae.img_size or teacher.patch_size != student_mae.patch_size:
    raise ValueError(f"teacher ({teacher.img_size} px, patch {teacher.patch_size}) and student "
                     f"({student_mae.img_size} px, patch {student_mae.patch_size}) must see the same patches")
  logging.info("distill: teacher %s from %s, pairs %s, head %s, distance %s, teacher %s", teacher_cfg, d.teacher,
               pairs, d.head, d.distance, d.teacher_mode)
  model = DMAEStudent(student_mae, teacher.width, pairs, d.head, d.get("head_hidden") or None)
  mesh = sharding.make_mesh(config.mesh)
  img = student_mae.img_size
  dummy = jnp.zeros((1, img, img, student_mae.in_chans), jnp.float32)
  teacher_init = lambda r: teacher.init({"params": r, "masking": r}, dummy)
  enc_only = "decoder" not in teacher_params
  if enc_only and d.teacher_mode == "full":
    raise ValueError("config.distill.teacher_mode='full' needs a teacher checkpoint with its decoder")
  if enc_only:
    teacher_init = lambda r: {"params": {"encoder": teacher.init(
        {"params": r, "masking": r}, dummy)["params"]["encoder"]}}
  frozen = sharding.shard_like_params(teacher_init, teacher_params, mesh, config.sharding_rules)

  def loss_fn(params, extra, batch, rng, teacher_p):
    images = pipeline.normalize(batch["image"])
    rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
    loss, aux = dmae_loss(model, params, teacher, teacher_p, images, rngs, alpha=d.alpha, distance=d.distance,
                          teacher_mode=d.teacher_mode)
    return loss, (aux, extra)

  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  trainer = common.create_trainer(init_fn, loss_fn, tx, mesh, config.sharding_rules, config.seed,
                                  config.get("grad_accum_steps", 1), frozen=frozen)
  data = iter(pipeline.mae_pipeline(config.data, config.batch_size, img, config.seed))
  eval_fn = mae_stage.reconstruction_eval(config, student_mae, workdir, lambda params: params["student"])
  model_cfg = dict(mae_stage.model_config(config.model), distill_pairs=[list(p) for p in pairs],
                   teacher=os.path.abspath(d.teacher))
  return common.train_loop(trainer, data, config.total_steps, workdir, config, model_cfg, eval_fn=eval_fn,
                           name="distill")
