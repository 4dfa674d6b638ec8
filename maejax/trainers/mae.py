"""Stage 1: MAE pretraining (He et al.): 75 % masking, norm-pix MSE on masked patches. The other objectives
(``config.model.objective``: BootMAE, SdAE, SD-MAE, MCM) are trained by ``trainers/objectives.py`` through the
same entry, :func:`train`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maejax import sharding, viz
from maejax.data import pipeline
from maejax.models.mae import MAE, MAEConfig
from maejax.models.vit import patchify, unpatchify
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
  """original / masked / reconstruction PNG for fixed images and fixed masking noise."""
  images = pipeline.normalize(jnp.asarray(images_uint8))
  noise = jax.random.uniform(jax.random.PRNGKey(seed), (images.shape[0], model.num_patches))
  out = model.apply({"params": params}, images, noise)
  recon = model.apply({"params": params}, out, images, method=MAE.reconstruct)
  p = model.patch_size
  mask = np.asarray(out.mask)[:, :, None]
  orig_p = np.asarray(patchify(images, p))
  masked = unpatchify(jnp.asarray(orig_p * (1 - mask) + mask * orig_p.min()), p)
  pasted = unpatchify(jnp.asarray(orig_p * (1 - mask) + np.asarray(patchify(recon, p)) * mask), p)
  return viz.mae_reconstruction_grid(np.asarray(images_uint8), pipeline.denormalize(np.asarray(masked)),
                                     pipeline.denormalize(np.asarray(pasted)), path)


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
  """``eval_fn(state, step)`` writing ``reconstruction_<step>.png`` for fixed held-out images (process 0)."""
  fixed = pipeline.fixed_images(pipeline.make_source(config.data, "test"), config.get("viz_indices", (0, 1)),
                                model.img_size)

  def eval_fn(state, step):
    if jax.process_index() == 0:
      path = os.path.join(workdir, f"reconstruction_{step:06d}.png")
      reconstruction_figure(model, mae_params_of(jax.device_get(state.params)), fixed, path, config.seed)
      logging.info("wrote %s", path)

  return eval_fn
