"""Stage 1 with the masked-image-modelling objectives beyond MAE: BootMAE, SdAE, SD-MAE, MCM
(``config.model.objective``; ``"mae"`` stays in ``trainers/mae.py``).

Each objective is a model (``models/bootmae.py``, ``sdae.py``, ``sdmae.py``, ``mcm.py``) and a loss plugged into
``common.create_trainer``: the same sharded step, mesh, Orbax checkpoints and loop as MAE. The self-teachers
(BootMAE, SdAE) keep their momentum encoder in ``TrainState.extra["ema"]`` (``common.EMA``); SD-MAE its centre in
``extra["sd_center"]``. Every objective's params hold an MAE ``encoder``, so the AU stages and DMAE read its
checkpoints as they read an MAE's. Asked for encoder ``blocks``, an objective's loss also returns the
:class:`~maejax.models.dmae.VisibleBlocks` of its forward pass: ``trainers/distill.py`` aligns them to a frozen
DMAE teacher (an objective student).

At its eval steps (``config.eval_every``) each objective with a pixel decoder writes ``reconstruction_<step>.png``
(original / masked / reconstruction, MAE's figure: :func:`pixel_figure`, :func:`figure_eval`): BootMAE's pixel
decoder, SD-MAE's decoder, and MCM's RGB and auxiliary (depth, thermal) decoders. SdAE writes none: its decoder
predicts the teacher's features, not pixels. The shared figure code lives here, below ``trainers/mae.py``, which
draws MAE's figure with it (mae.py dispatches to this module, so the reverse import would be a cycle).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from maejax import sharding, viz
from maejax.data import pipeline
from maejax.models import bootmae, mcm, sdae, sdmae
from maejax.models.mae import MAEConfig
from maejax.trainers import common

OBJECTIVES = ("mae", "bootmae", "sdae", "sdmae", "mcm")


def objective_of(config: ml_collections.ConfigDict) -> str:
  name = config.model.get("objective", "mae") or "mae"
  if name not in OBJECTIVES:
    raise ValueError(f"config.model.objective={name!r}: expected one of {OBJECTIVES}")
  return name


def ema_of(cfg: Mapping[str, Any] | None, total_steps: int, keys: tuple[str, ...]) -> common.EMA:
  """``config.ema`` → :class:`common.EMA`: ``kind`` ("constant" | "knots" | "cosine"), ``m0``, ``m1``, ``knots``
  (fractions of the run's updates) with ``values``, and ``every`` (optimizer steps per update)."""
  cfg = {**dict(kind="constant", m0=0.996, m1=1.0, knots=(), values=(), every=1), **(dict(cfg) if cfg else {})}
  unknown = sorted(set(cfg) - {"kind", "m0", "m1", "knots", "values", "every"})
  if unknown:
    raise ValueError(f"unknown config.ema keys {unknown}; expected kind, m0, m1, knots, values, every")
  every = int(cfg["every"])
  if every < 1:
    raise ValueError(f"config.ema.every={every}: expected ≥ 1")
  n = max(total_steps // every, 1)
  schedule = common.ema_momentum_schedule(cfg["kind"], cfg["m0"], cfg["m1"], n,
                                          tuple(float(k) * n for k in cfg["knots"]), tuple(cfg["values"]))
  return common.EMA(schedule=schedule, every=every, keys=keys)


@dataclasses.dataclass
class Objective:
  """What the shared trainer needs: ``init_fn(rng) -> variables``, ``loss_fn``, the EMA (or None), the data and
  the model config saved with the checkpoints; and the reconstruction figure of its eval steps.

  ``loss_fn(params, extra, batch, rng, blocks=()) -> (loss, (metrics, extra))``; with ``blocks`` (student encoder
  block indices) a third item, the :class:`~maejax.models.dmae.VisibleBlocks` of the same forward pass.
  ``figure(params, inputs_uint8, path, seed) -> path`` draws it for :func:`figure_images` inputs; None: the
  objective has no pixel decoder (SdAE).
  """

  init_fn: Any
  loss_fn: Any
  ema: common.EMA | None
  data: Any
  saved_config: dict
  figure: Callable[..., str] | None = None


def _rngs(rng):
  return {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1),
          "channels": jax.random.fold_in(rng, 2)}


def build(config: ml_collections.ConfigDict, with_data: bool = True) -> Objective:
  """The objective of ``config.model.objective`` (not ``"mae"``) with its settings from ``config.<objective>``;
  ``with_data=False`` leaves ``data`` None (benchmarks feed fixed batches)."""
  name = objective_of(config)
  mc = MAEConfig.from_config(config.model)
  img, total = mc.img_size, config.total_steps
  dummy = jnp.zeros((1, img, img, mc.in_chans), jnp.float32)
  grid = img // mc.patch_size
  data_kw = {}
  if name == "bootmae":
    oc = bootmae.BootMAEConfig.from_config(config.get("bootmae"))
    model = bootmae.BootMAE(mc, oc)
    ema = ema_of(config.get("ema"), total, ("encoder",)) if oc.feature_target else None
    if oc.block_masking:
      data_kw["block_masking"] = pipeline.block_mask_noise(grid, oc.block_mask_fraction)

    def loss_fn(params, extra, batch, rng, blocks=()):
      images = pipeline.normalize(batch["image"])
      teacher = extra["ema"]["params"]["encoder"] if ema else None
      progress = ((extra["ema"]["step"] if ema else 0) + 1) / total
      loss, m, *visible = bootmae.bootmae_loss(model, params, teacher, images, _rngs(rng), progress,
                                               noise=batch.get("mask_noise"), return_blocks=blocks)
      return (loss, (m, extra), *visible)

    figure = functools.partial(bootmae_figure, model)
  elif name == "sdae":
    oc = sdae.SdAEConfig.from_config(config.get("sdae"))
    model = sdae.SdAE(mc, oc)
    ema = ema_of(config.get("ema"), total, ("encoder",))

    def loss_fn(params, extra, batch, rng, blocks=()):
      images = pipeline.normalize(batch["image"])
      loss, m, *visible = sdae.sdae_loss(model, params, extra["ema"]["params"]["encoder"], images, _rngs(rng),
                                         return_blocks=blocks)
      return (loss, (m, extra), *visible)

    figure = None  # the decoder predicts teacher features: no pixels to draw
  elif name == "sdmae":
    oc = sdmae.SDMAEConfig.from_config(config.get("sdmae"))
    model = sdmae.SDMAE(mc, oc)
    ema = None

    def loss_fn(params, extra, batch, rng, blocks=()):
      images = pipeline.normalize(batch["image"])
      loss, (m, center), *visible = sdmae.sdmae_loss(model, params, extra["sd_center"]["center"], images,
                                                     _rngs(rng), return_blocks=blocks)
      return (loss, (m, dict(extra, sd_center={"center": center})), *visible)

    figure = functools.partial(sdmae_figure, model)
  elif name == "mcm":
    oc = mcm.MCMConfig.from_config(config.get("mcm"))
    model = mcm.MCM(mc, oc)
    ema = None
    aux_keys = mcm_aux_keys(oc)
    data_kw["aux"] = aux_keys
    dummy = jnp.zeros((1, img, img, oc.channels), jnp.float32)

    def loss_fn(params, extra, batch, rng, blocks=()):
      x = mcm_input(batch["image"], *(batch[k] for k in aux_keys))
      loss, m, *visible = mcm.mcm_loss(model, params, x, _rngs(rng), return_blocks=blocks)
      return (loss, (m, extra), *visible)

    figure = functools.partial(mcm_figure, model)
  else:
    raise ValueError(f"objective {name!r} is trained by trainers/mae.py")

  if name == "mcm":
    init_fn = lambda r: model.init({"params": r, "masking": r}, dummy, jnp.ones((1, oc.channels)))
  else:
    init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  data = None
  if with_data:
    data = iter(pipeline.objective_pipeline(config.data, config.batch_size, img, config.seed, **data_kw))
  saved = dict(mc.to_json(), objective=name, objective_config=dataclasses.asdict(oc))
  return Objective(init_fn=init_fn, loss_fn=loss_fn, ema=ema, data=data, saved_config=saved, figure=figure)


def create(config: ml_collections.ConfigDict, objective: Objective, mesh=None) -> common.Trainer:
  """The shared trainer for ``objective`` on ``config.mesh`` (or ``mesh``)."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  return common.create_trainer(objective.init_fn, objective.loss_fn, tx, mesh, config.sharding_rules, config.seed,
                               config.get("grad_accum_steps", 1), ema=objective.ema)


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  """Pretrains with ``config.model.objective`` into ``workdir`` (resuming when it has a checkpoint)."""
  name = objective_of(config)
  objective = build(config)
  trainer = create(config, objective)
  eval_fn = None
  if objective.figure is not None:
    aux = mcm_aux_keys(mcm.MCMConfig.from_config(config.get("mcm"))) if name == "mcm" else ()
    inputs = figure_images(config, MAEConfig.from_config(config.model).img_size, aux=aux)
    eval_fn = figure_eval(workdir, lambda params, path: objective.figure(params, inputs, path, config.seed))
  return common.train_loop(trainer, objective.data, config.total_steps, workdir, config, objective.saved_config,
                           eval_fn=eval_fn, name=name)


# ------------------------------------------------------------------------------------- reconstruction figures


def figure_images(config: ml_collections.ConfigDict, img_size: int, depth: bool = False, *,
                  aux: tuple[str, ...] = ()) -> np.ndarray:
  """The fixed held-out inputs of every reconstruction figure: ``config.viz_indices`` of the test split,
  ``(n, S, S, 3)`` uint8; with ``aux`` (MCM's auxiliary record keys; ``depth`` = ``aux=("depth",)``) one channel
  per key follows, in that order (:func:`pipeline.aux_source`: the synthetic faces' depth, prepared BP4D's keys)."""
  aux = tuple(aux) or (("depth",) if depth else ())
  indices = config.get("viz_indices", (0, 1))
  if not aux:
    return pipeline.fixed_images(pipeline.make_source(config.data, "test"), indices, img_size)
  source = pipeline.aux_source(config.data, "test", aux)
  images = pipeline.fixed_images(source, indices, img_size)
  maps = []
  for i in indices:
    record = source[int(i)]
    for key in aux:
      m = np.asarray(record[key])[:, :, 0]
      if m.shape != (img_size, img_size):  # as pipeline.Resize does the image
        m = np.asarray(Image.fromarray(m).resize((img_size, img_size), Image.BICUBIC))
      maps.append(m)
  return np.concatenate([images, np.stack(maps).reshape(len(indices), len(aux), img_size, img_size)
                         .transpose(0, 2, 3, 1)], axis=-1)


def figure_noise(seed: int, batch: int, num_patches: int) -> jax.Array:
  """The masking noise of every reconstruction figure, ``U(0, 1): (B, L)`` from ``seed``: the same masks at
  every eval step and for every objective."""
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, num_patches))


def pixel_figure(reconstruct: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], num_patches: int,
                 images_uint8: np.ndarray, path: str, seed: int = 0) -> str:
  """original / masked / reconstruction PNG of RGB ``images_uint8: (n, S, S, 3)`` masked by :func:`figure_noise`.

  ``reconstruct(images, noise) -> (recon, mask)``: the model's pixel prediction ``(n, S, S, 3)`` for normalised
  ``images`` masked by ``noise: (n, L)``, de-normalised to the space of ``images``, and its mask ``(n, L)``
  (1 = removed). The figure pastes the visible patches of the input over it (``viz.masked_and_pasted``).
  """
  images = pipeline.normalize(jnp.asarray(images_uint8))
  recon, mask = reconstruct(images, figure_noise(seed, images.shape[0], num_patches))
  masked, pasted = viz.masked_and_pasted(np.asarray(images), np.asarray(recon), np.asarray(mask))
  return viz.mae_reconstruction_grid(np.asarray(images_uint8), pipeline.denormalize(masked),
                                     pipeline.denormalize(pasted), path)


def figure_eval(workdir: str, draw: Callable[[Any, str], str]) -> Callable[[common.TrainState, int], None]:
  """``eval_fn(state, step)`` of ``common.train_loop``: on process 0, ``draw(params, path)`` writes
  ``reconstruction_<step>.png`` into ``workdir`` from the host copy of ``state.params``."""

  def eval_fn(state, step):
    if jax.process_index() == 0:
      path = os.path.join(workdir, f"reconstruction_{step:06d}.png")
      draw(jax.device_get(state.params), path)
      logging.info("wrote %s", path)

  return eval_fn


def bootmae_figure(model: bootmae.BootMAE, params: Any, images_uint8: np.ndarray, path: str, seed: int = 0) -> str:
  """:func:`pixel_figure` of BootMAE's pixel decoder (:meth:`BootMAE.reconstruct`). The figure masks with the
  fixed uniform noise of :func:`figure_noise`, not with training's block masking (``bootmae.block_masking``),
  so every objective's figure shows the same masks."""

  def reconstruct(images, noise):
    out = model.apply({"params": params}, images, noise)
    return model.apply({"params": params}, out, images, method=bootmae.BootMAE.reconstruct), out.mask

  return pixel_figure(reconstruct, model.num_patches, images_uint8, path, seed)


def sdmae_figure(model: sdmae.SDMAE, params: Any, images_uint8: np.ndarray, path: str, seed: int = 0) -> str:
  """:func:`pixel_figure` of SD-MAE's decoder (:meth:`SDMAE.reconstruct`)."""
  # The centre enters only the self-distillation loss, never the pixels: zeros stand in for the trained one.
  variables = {"params": params, "sd_center": {"center": jnp.zeros((model.sd.out_dim,), jnp.float32)}}

  def reconstruct(images, noise):
    pixels, mask, _, _ = model.apply(variables, images, noise)
    return model.apply(variables, pixels, images, method=sdmae.SDMAE.reconstruct), mask

  return pixel_figure(reconstruct, model.num_patches, images_uint8, path, seed)


def mcm_aux_keys(oc: mcm.MCMConfig) -> tuple[str, ...]:
  """The record keys of ``config.mcm.aux``; ValueError unless each is one channel (what the pipelines provide)."""
  wide = [(k, c) for k, c in oc.aux if c != 1]
  if wide:
    raise ValueError(f"config.mcm.aux={oc.aux}: the pipelines provide single-channel auxiliary modalities; "
                     f"{wide} have more channels")
  return tuple(k for k, _ in oc.aux)


def mcm_input(image_uint8: jax.Array, *aux_uint8: jax.Array) -> jax.Array:
  """MCM's early-fused input ``(B, H, W, 3 + A)``: normalised RGB, then each auxiliary modality ``(B, H, W, 1)``
  (depth, thermal, ... in ``config.mcm.aux`` order) normalised by :func:`pipeline.normalize_depth`."""
  return jnp.concatenate([pipeline.normalize(image_uint8), *(pipeline.normalize_depth(a) for a in aux_uint8)], -1)


def mcm_figure(model: mcm.MCM, params: Any, inputs_uint8: np.ndarray, path: str, seed: int = 0) -> str:
  """MCM's original / masked / reconstruction PNG for ``inputs_uint8: (n, S, S, 3 + A)`` (RGB, then the auxiliary
  modalities of ``config.mcm.aux``: what :func:`figure_images` gives with ``aux``), every channel kept (no channel
  dropping), masked by :func:`figure_noise`: per image an RGB row, then a gray row per auxiliary modality (depth,
  thermal) from its decoder, all with the same spatial mask (:meth:`MCM.reconstruct`, visible patches pasted)."""
  inputs_uint8 = np.asarray(inputs_uint8)
  n = inputs_uint8.shape[0]
  x = mcm_input(jnp.asarray(inputs_uint8[..., :3]), jnp.asarray(inputs_uint8[..., 3:]))
  keep = jnp.ones((n, model.mcm.channels), jnp.float32)
  preds, mask = model.apply({"params": params}, x, keep, figure_noise(seed, n, model.num_patches))
  recon = model.apply({"params": params}, preds, x, method=mcm.MCM.reconstruct)
  x, mask = np.asarray(x), np.asarray(mask)
  rows, start = [], 0
  for key, c in model.mcm.modalities:
    masked, pasted = viz.masked_and_pasted(x[..., start:start + c], np.asarray(recon[key]), mask)
    to_uint8 = pipeline.denormalize if key == "image" else pipeline.denormalize_depth
    panels = (inputs_uint8[..., start:start + c], to_uint8(masked), to_uint8(pasted))
    rows.append([np.broadcast_to(a, a.shape[:-1] + (3,)) for a in panels])  # 1 channel → gray RGB
    start += c
  originals, masked, pasted = (np.stack([r[j][i] for i in range(n) for r in rows]) for j in range(3))
  return viz.mae_reconstruction_grid(originals, masked, pasted, path)
