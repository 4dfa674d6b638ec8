"""Stage 1 with the masked-image-modelling objectives beyond MAE: BootMAE, SdAE, SD-MAE, MCM
(``config.model.objective``; ``"mae"`` stays in ``trainers/mae.py``).

Each objective is a model (``models/bootmae.py``, ``sdae.py``, ``sdmae.py``, ``mcm.py``) and a loss plugged into
``common.create_trainer``: the same sharded step, mesh, Orbax checkpoints and loop as MAE. The self-teachers
(BootMAE, SdAE) keep their momentum encoder in ``TrainState.extra["ema"]`` (``common.EMA``); SD-MAE its centre in
``extra["sd_center"]``. Every objective's params hold an MAE ``encoder``, so the AU stages and DMAE read its
checkpoints as they read an MAE's. Asked for encoder ``blocks``, an objective's loss also returns the
:class:`~maejax.models.dmae.VisibleBlocks` of its forward pass: ``trainers/distill.py`` aligns them to a frozen
DMAE teacher (an objective student).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from maejax import sharding
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
  the model config saved with the checkpoints.

  ``loss_fn(params, extra, batch, rng, blocks=()) -> (loss, (metrics, extra))``; with ``blocks`` (student encoder
  block indices) a third item, the :class:`~maejax.models.dmae.VisibleBlocks` of the same forward pass.
  """

  init_fn: Any
  loss_fn: Any
  ema: common.EMA | None
  data: Any
  saved_config: dict


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
  elif name == "sdae":
    oc = sdae.SdAEConfig.from_config(config.get("sdae"))
    model = sdae.SdAE(mc, oc)
    ema = ema_of(config.get("ema"), total, ("encoder",))

    def loss_fn(params, extra, batch, rng, blocks=()):
      images = pipeline.normalize(batch["image"])
      loss, m, *visible = sdae.sdae_loss(model, params, extra["ema"]["params"]["encoder"], images, _rngs(rng),
                                         return_blocks=blocks)
      return (loss, (m, extra), *visible)
  elif name == "sdmae":
    oc = sdmae.SDMAEConfig.from_config(config.get("sdmae"))
    model = sdmae.SDMAE(mc, oc)
    ema = None

    def loss_fn(params, extra, batch, rng, blocks=()):
      images = pipeline.normalize(batch["image"])
      loss, (m, center), *visible = sdmae.sdmae_loss(model, params, extra["sd_center"]["center"], images,
                                                     _rngs(rng), return_blocks=blocks)
      return (loss, (m, dict(extra, sd_center={"center": center})), *visible)
  elif name == "mcm":
    oc = mcm.MCMConfig.from_config(config.get("mcm"))
    model = mcm.MCM(mc, oc)
    ema = None
    if [k for k, _ in oc.aux] != ["depth"]:
      raise ValueError(f"config.mcm.aux={oc.aux}: the pipelines provide depth only (('depth', 1),)")
    data_kw["depth"] = True
    dummy = jnp.zeros((1, img, img, oc.channels), jnp.float32)

    def loss_fn(params, extra, batch, rng, blocks=()):
      x = jnp.concatenate([pipeline.normalize(batch["image"]), pipeline.normalize_depth(batch["depth"])], -1)
      loss, m, *visible = mcm.mcm_loss(model, params, x, _rngs(rng), return_blocks=blocks)
      return (loss, (m, extra), *visible)
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
  return Objective(init_fn=init_fn, loss_fn=loss_fn, ema=ema, data=data, saved_config=saved)


def create(config: ml_collections.ConfigDict, objective: Objective, mesh=None) -> common.Trainer:
  """The shared trainer for ``objective`` on ``config.mesh`` (or ``mesh``)."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  tx, _ = common.make_optimizer(config.optim, config.batch_size, config.total_steps)
  return common.create_trainer(objective.init_fn, objective.loss_fn, tx, mesh, config.sharding_rules, config.seed,
                               config.get("grad_accum_steps", 1), ema=objective.ema)


def train(config: ml_collections.ConfigDict, workdir: str) -> common.LoopResult:
  """Pretrains with ``config.model.objective`` into ``workdir`` (resuming when it has a checkpoint)."""
  objective = build(config)
  trainer = create(config, objective)
  return common.train_loop(trainer, objective.data, config.total_steps, workdir, config, objective.saved_config,
                           name=objective_of(config))
