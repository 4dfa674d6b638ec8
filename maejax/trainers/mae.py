"""Stage 1: MAE pretraining (He et al.): 75 % masking, norm-pix MSE on masked patches. The other objectives
(``config.model.objective``: BootMAE, SdAE, SD-MAE, MCM) are trained by ``trainers/objectives.py`` through the
same entry, :func:`train`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maejax import sharding
from maejax.data import pipeline
from maejax.models.mae import MAE, MAEConfig
from maejax.trainers import common, objectives


def build_model(cfg: ml_collections.ConfigDict | Mapping[str, Any], **overrides) -> MAE:
  """MAE from ``config.model`` (a ConfigDict: :meth:`MAEConfig.from_config`) or from a checkpoint's saved
  model config (a dict: :meth:`MAEConfig.from_json`), with ``overrides`` (MAEConfig fields)."""
  if isinstance(cfg, ml_collections.ConfigDict):
    return MAEConfig.from_config(cfg).build(**overrides)
  return MAEConfig.from_json(cfg).build(**overrides)


def mae_loss_fn(model: MAE):
  def loss_fn(params, extra, batch, rng):
    images = pipeline.normalize(batch["image"])
    rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
    out = model.apply({"params": params}, images, train=True, rngs=rngs)
    return out.loss, ({"loss": out.loss}, extra)
  return loss_fn


def reconstruction_figure(model: MAE, params, images_uint8: np.ndarray, path: str, seed: int = 0) -> str:
  """original / masked / reconstruction PNG for fixed images and fixed masking noise (``objectives.pixel_figure``:
  the figure every pixel-decoder objective draws)."""

  def reconstruct(images, noise):
    out = model.apply({"params": params}, images, noise)
    return model.apply({"params": params}, out, images, method=MAE.reconstruct), out.mask

  return objectives.pixel_figure(reconstruct, model.num_patches, images_uint8, path, seed)


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  """Runs MAE pretraining (or ``config.model.objective``) into ``workdir`` (resuming when it has a checkpoint)."""
  if objectives.objective_of(config) != "mae":
    return objectives.train(config, workdir)
  mc = MAEConfig.from_config(config.model)
  model = mc.build()
  mesh = sharding.make_mesh(config.mesh)
  img = model.img_size
  dummy = jnp.zeros((1, img, img, model.in_chans), jnp.float32)
  init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  trainer = common.create_trainer(init_fn, mae_loss_fn(model), tx, mesh, config.sharding_rules, config.seed,
                                  config.get("grad_accum_steps", 1))
  data = iter(pipeline.mae_pipeline(config.data, config.batch_size, img, config.seed))
  eval_fn = reconstruction_eval(config, model, workdir, lambda params: params)
  return common.train_loop(trainer, data, config.total_steps, workdir, config, mc.to_json(), eval_fn=eval_fn,
                           name="mae")


def reconstruction_eval(config: ml_collections.ConfigDict, model: MAE, workdir: str, mae_params_of):
  """``eval_fn(state, step)`` writing ``reconstruction_<step>.png`` for fixed held-out images (process 0);
  ``mae_params_of(params)``: the MAE's params within the train state's."""
  fixed = objectives.figure_images(config, model.img_size)
  return objectives.figure_eval(
      workdir, lambda params, path: reconstruction_figure(model, mae_params_of(params), fixed, path, config.seed))
