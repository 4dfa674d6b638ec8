"""Stages 3 and 4: ``au_finetune`` (the clean-face AU teacher) and ``au_occl`` (occlusion-robust students,
baselines, evaluation and the robustness report). DESIGN.md §1, §4, §5.

``au_finetune``: ViT encoder (MAE / DMAE / converted weights) + graph head, ME-GraphAU's two stages:
  stage 1 (AFG + FGG) with WAL, stage 2 (MEFL, initialised from stage 1) with WAL + λ·edge CE; layer-wise lr
  decay on the encoder.
``au_occl``: chains MAE pretraining → teacher → students (each stage skipped when its final checkpoint exists)
  and evaluates every report row on every occlusion condition. A student is the MAE encoder on the OCCLUDED
  face → latent→AU transform → graph head, trained with
  ``WAL + λ_e·edge CE + α_n·node KD + α_e·edge KD`` against the frozen teacher on the CLEAN face; the
  baseline is the same student with α_n = α_e = 0. Token dropping removes patches whose occluded fraction
  exceeds ``drop_threshold`` from the encoder input, using the known mask or the occlusion predictor.
  ``config.mode = "eval"`` restores every checkpoint and rebuilds the report without training.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maejax import checkpoints, losses, metrics, sharding
from maejax.data import au_pipeline, pipeline, synthfaces
from maejax.models.au_model import AUModel, keep_least_occluded
from maejax.models.vit import vit_size
from maejax.trainers import common

MODEL_KEYS = ("img_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio", "num_aus", "channels",
              "top_k", "stage", "head", "transform_depth", "head_pool", "occlusion_predictor", "freeze_encoder")
AU_DATASETS = ("synthfaces", "bp4d", "disfa")

# ------------------------------------------------------------------------------------------------ model


def model_config(cfg: ml_collections.ConfigDict | Mapping[str, Any], **overrides) -> dict[str, Any]:
  """JSON-able AUModel hyper-parameters from ``config.model`` (``size`` fills width/depth/heads)."""
  out = {k: cfg[k] for k in MODEL_KEYS if k in cfg and cfg[k] is not None}
  if cfg.get("size"):
    out = {**vit_size(cfg["size"]), **out}
  out.update(overrides)
  return out


def build_model(mc: Mapping[str, Any]) -> AUModel:
  unknown = set(mc) - set(MODEL_KEYS)
  if unknown:
    raise ValueError(f"unknown AU model keys {sorted(unknown)}; expected a subset of {MODEL_KEYS}")
  return AUModel(**mc)


# ------------------------------------------------------------------------------------------------- data


def au_names(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """AU numbers of the dataset (synthfaces: BP4D's 12 unless ``data.aus`` lists others)."""
  from maejax.data import folds
  if data_cfg.name == "synthfaces":
    return tuple(data_cfg.get("aus") or synthfaces.BP4D_AUS)
  if data_cfg.name in ("bp4d", "disfa"):
    return folds.aus(data_cfg.name)
  raise ValueError(f"config.data.name must be one of {AU_DATASETS} for AU stages, got {data_cfg.name!r}")


def make_source(data_cfg: ml_collections.ConfigDict, split: str) -> Any:
  """AU records for ``split`` ("train" / "test"): synthetic faces (subject-exclusive split; from the render
  cache in ``data.cache_dir`` unless it is ``""``) or the prepared BP4D / DISFA TFDS data of fold ``data.fold``
  (1..3)."""
  if data_cfg.name == "synthfaces":
    return pipeline.synthfaces_source(data_cfg, split, au_names(data_cfg))
  if data_cfg.name in ("bp4d", "disfa"):
    from maejax.data import prepare
    return prepare.data_source(data_cfg.name, f"fold{int(data_cfg.fold)}_{split}",
                               data_dir=data_cfg.get("data_dir") or None)
  raise ValueError(f"config.data.name must be one of {AU_DATASETS} for AU stages, got {data_cfg.name!r}")


def train_labels(source: Any, num_aus: int, max_examples: int = 4000, seed: int = 0) -> np.ndarray:
  """``(M, N)`` int8 labels of (a fixed subset of) the training split, for the WAL weights."""
  idx = au_pipeline.eval_indices(len(source), max_examples, seed)
  get = source.labels if hasattr(source, "labels") else source.__getitem__
  return np.stack([au_pipeline.labels_of(get(int(i)), num_aus) for i in idx])


# ----------------------------------------------------------------------------------------------- losses


def kd_loss(student, teacher, kind: str):
  """Node-level and edge-level KD terms ``{"node_kd", "edge_kd"}`` (edge only where both heads have edges);
  the caller weights them by α_n, α_e."""
  terms = {"node_kd": losses.node_kd_loss(student.node_feats, teacher.node_feats, kind)}
  if student.edge_feats is not None and teacher.edge_feats is not None:
    terms["edge_kd"] = losses.edge_kd_loss(student.edge_feats, teacher.edge_feats, kind)
  return terms


def weighted_sum(terms: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]) -> jax.Array:
  """``Σ_k w_k · term_k`` (the loss weights are arrays so students that differ only in them share one
  compiled step)."""
  return sum(weights[k] * v for k, v in terms.items())


def occlusion_bce(logits: jax.Array, frac: jax.Array) -> jax.Array:
  """Per-patch BCE of the occlusion predictor against the true occluded fraction (soft target), mean."""
  logits = logits.astype(jnp.float32)
  return jnp.mean(jnp.maximum(logits, 0) - logits * frac + jnp.log1p(jnp.exp(-jnp.abs(logits))))


# ------------------------------------------------------------------------------------------- helpers


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def matching_params(model: AUModel, given: Mapping, img: int) -> dict:
  """The subtrees of ``given`` whose paths and shapes exist in ``model``'s params (for warm starts)."""
  abstract = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, img, img, 3)), train=False),
                            jax.random.PRNGKey(0))
  shapes = {k: v.shape for k, v in _flat(flax.linen.meta.unbox(abstract["params"])).items()}
  keep = {k: v for k, v in _flat(given).items() if k in shapes and tuple(shapes[k]) == tuple(np.shape(v))}
  skipped = sorted("/".join(k) for k in _flat(given) if k not in keep)
  if skipped:
    logging.info("warm start: %d tensors not used (absent or other shape), e.g. %s", len(skipped), skipped[:4])
  return flax.traverse_util.unflatten_dict(keep)


def trainable_mask(params: Mapping, encoder: str, depth: int):
  """Bool tree: what the optimizer updates. ``encoder``: "finetune" | "frozen" | "partial:K" (last K blocks
  and the final norm)."""
  if encoder == "finetune":
    return None
  if encoder == "frozen":
    k = 0
  elif encoder.startswith("partial:"):
    k = int(encoder.split(":", 1)[1])
  else:
    raise ValueError(f"student.encoder must be 'finetune', 'frozen' or 'partial:K', got {encoder!r}")

  def train(path, _):
    keys = [getattr(p, "key", str(p)) for p in path]
    if keys[0] != "encoder":
      return True
    blocks = [int(x.split("_")[1]) for x in keys if x.startswith("blocks_")]
    if blocks:
      return blocks[0] >= depth - k
    return k > 0 and "norm" in keys
  return jax.tree_util.tree_map_with_path(train, params)


def _complete(workdir: str, total_steps: int) -> bool:
  from orbax.checkpoint import CheckpointManager, CheckpointManagerOptions
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir):
    return False
  mgr = CheckpointManager(ckdir, options=CheckpointManagerOptions(read_only=True))
  return mgr.latest_step() == total_steps


def fit(name: str, model: AUModel, run: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        workdir: str, *, init_params: Mapping | None = None, teacher: tuple[AUModel, Mapping] | None = None,
        lr_multipliers: bool = False, mode: str = "train") -> dict:
  """Trains (or, when its final checkpoint exists, restores) one AU model; returns its variables
  ``{"params", "batch_stats"}``. With ``teacher = (model, variables)`` the loss is the student loss."""
  mesh = sharding.make_mesh(config.mesh)
  img, mc = model.img_size, {k: getattr(model, k) for k in MODEL_KEYS}
  dummy = jnp.zeros((1, img, img, 3), jnp.float32)
  num_aus = model.num_aus
  t_vars = None if teacher is None else jax.device_get(teacher[1])
  # Host copies: the train step donates its state, so device arrays given here would be deleted under the caller.
  init_params = None if init_params is None else jax.device_get(init_params)

  loss_weights = {"wal": 1.0, "edge_ce": run.get("edge_weight", 0.0), "node_kd": run.get("node_kd", 0.0),
                  "edge_kd": run.get("edge_kd", 0.0), "occ_bce": run.get("occ_weight", 1.0)}

  def init_fn(rng):
    v = dict(model.init(rng, dummy, train=False))
    v.setdefault("batch_stats", {})
    v["wal_weights"] = jnp.ones((num_aus,), jnp.float32)
    v["loss_weights"] = {k: jnp.zeros((), jnp.float32) for k in loss_weights}
    if t_vars is not None:
      v["teacher"] = jax.tree_util.tree_map(jnp.zeros_like, t_vars)
    return v

  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  params_shape = flax.linen.meta.unbox(abstract["params"])
  trainable = None
  if teacher is not None:
    trainable = trainable_mask(params_shape, run.get("encoder", "finetune"), model.depth)
  mult = None
  if lr_multipliers and run.get("layer_decay", 1.0) < 1.0:
    mult = common.layer_decay_multipliers(params_shape, model.depth, run.layer_decay)
  tx, _ = common.make_optimizer(run.optim, run.batch_size, run.total_steps, mult, trainable)

  kind = run.get("kd_kind", "mse")
  drop_train = bool(run.get("drop_train", False))
  keep_train = max(1, int(round(model.num_patches * run.get("train_keep_ratio", 0.5))))

  def loss_fn(params, extra, batch, rng):
    labels = batch["au"].astype(jnp.int32)
    key = "occluded" if teacher is not None else "image"
    images = pipeline.normalize(batch[key])
    ids_keep = keep_least_occluded(batch["patch_frac"], keep_train, rng) if drop_train else None
    out, new = model.apply({"params": params, "batch_stats": extra["batch_stats"]}, images, ids_keep, train=True,
                           mutable=["batch_stats"])
    terms = {"wal": losses.wal_loss(out.head.probs, labels, extra["wal_weights"])}
    if out.head.edge_logits is not None:
      terms["edge_ce"] = losses.edge_ce_loss(out.head.edge_logits, labels)
    if teacher is not None:
      t_out = teacher[0].apply(extra["teacher"], pipeline.normalize(batch["image"]), train=False)
      terms.update(kd_loss(out.head, jax.tree_util.tree_map(jax.lax.stop_gradient, t_out.head), kind))
      if out.occ_logits is not None:
        terms["occ_bce"] = occlusion_bce(out.occ_logits, batch["patch_frac"])
    loss = weighted_sum(terms, extra["loss_weights"])
    return loss, ({"loss": loss, **terms}, {**extra, "batch_stats": new["batch_stats"]})

  trainer = common.create_trainer(init_fn, loss_fn, tx, mesh, config.sharding_rules, config.seed + run.get(
      "seed_offset", 0), config.get("grad_accum_steps", 1), init_params=init_params)
  train_src = make_source(config.data, "train")
  sh = trainer.state_shardings.extra
  weights = losses.au_pos_weights(train_labels(train_src, num_aus, seed=config.seed))
  extra = {**trainer.state.extra, "wal_weights": jax.device_put(jnp.asarray(weights), sh["wal_weights"]),
           "loss_weights": jax.device_put({k: jnp.float32(v) for k, v in loss_weights.items()},
                                          sh["loss_weights"])}
  if t_vars is not None:
    extra["teacher"] = jax.device_put(t_vars, sh["teacher"])
  trainer.state = trainer.state.replace(extra=extra)

  os.makedirs(workdir, exist_ok=True)
  if _complete(workdir, run.total_steps):
    logging.info("%s: final checkpoint found in %s; restoring instead of training", name, workdir)
    ck = checkpoints.Checkpointer(workdir)
    state = ck.restore(trainer.state, trainer.state_shardings)
    ck.close()
  elif mode == "eval":
    raise FileNotFoundError(f"mode=eval: {name} has no final checkpoint (step {run.total_steps}) in "
                            f"{workdir}/checkpoints; train it first (mode=train)")
  else:
    data = iter(au_pipeline.train_pipeline(
        train_src, global_batch_size=run.batch_size, size=img, patch_size=model.patch_size, num_aus=num_aus,
        seed=config.seed + run.get("seed_offset", 0), occlude=teacher is not None,
        conditions=tuple(run.get("train_conditions", au_pipeline.occlusion.TRAIN_CONDITIONS)),
        jitter=config.data.get("jitter", 0.2), shift=config.data.get("shift", 1 / 14),
        flip=config.data.get("flip", True), worker_count=config.data.get("worker_count", 0)))
    t0 = time.time()
    result = common.train_loop(trainer, data, run.total_steps, workdir, _merge(config, run), mc, name=name)
    common.stop_if_preempted(result, name, workdir)
    state = result.state
    logging.info("%s: trained in %.0fs", name, time.time() - t0)
  return jax.device_get({"params": state.params, "batch_stats": state.extra["batch_stats"]})


def _merge(config: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The loop settings (log / checkpoint cadence) of ``run`` over the top-level ones."""
  c = ml_collections.ConfigDict(config.to_dict())
  for k in ("log_every", "checkpoint_every", "keep_checkpoints"):
    if k in run:
      c[k] = run[k]
  c.run = run.to_dict()
  return c


# ------------------------------------------------------------------------------------------ au_finetune


def load_encoder(path: str) -> tuple[dict, dict]:
  """Encoder params + their config from an MAE/DMAE workdir or a ``maejax.convert`` output."""
  params, mc = checkpoints.load_params(path)
  params = params.get("encoder", params) if isinstance(params, Mapping) else params
  if "blocks_0" not in params:
    raise ValueError(f"{path}: no ViT encoder parameters found (expected an MAE / DMAE checkpoint)")
  return params, mc


def finetune(config: ml_collections.ConfigDict, workdir: str, encoder_params: Mapping | None = None,
             mode: str = "train") -> tuple[AUModel, dict]:
  """ME-GraphAU teacher: stage 1 (AFG + FGG, WAL) in ``workdir/stage1``, then stage 2 (MEFL, WAL + λ·edge
  CE, initialised from stage 1) in ``workdir/stage2``. Returns the stage-2 model and its variables."""
  t = config.teacher
  img = config.model.img_size
  m1 = build_model(model_config(config.model, stage=1, transform_depth=0, head="graph",
                                occlusion_predictor=False, freeze_encoder=False))
  if encoder_params is None and config.get("init") and mode != "eval":
    encoder_params, _ = load_encoder(config.init)
  init = None if encoder_params is None else {"encoder": encoder_params}
  if init is None and mode != "eval":
    logging.warning("au_finetune: no encoder init (config.init empty): training the encoder from scratch")
  v1 = fit("teacher_stage1", m1, t.stage1, config, os.path.join(workdir, "stage1"), init_params=init,
           lr_multipliers=True, mode=mode)
  m2 = build_model({**model_config(config.model), "stage": 2, "transform_depth": 0, "head": "graph",
                    "occlusion_predictor": False, "freeze_encoder": False})
  warm = None if mode == "eval" else matching_params(m2, jax.device_get(v1["params"]), img)
  v2 = fit("teacher_stage2", m2, t.stage2, config, os.path.join(workdir, "stage2"), init_params=warm,
           lr_multipliers=True, mode=mode)
  return m2, v2


def train_finetune(config: ml_collections.ConfigDict, workdir: str):
  """``stage = au_finetune``: the teacher, then its evaluation on clean held-out faces."""
  from maejax import report
  use_compilation_cache(config.get("compilation_cache", ""))
  model, variables = finetune(config, workdir, mode=config.get("mode", "train"))
  res = evaluate(model, variables, config, ("clean",), drop="")
  f1 = res["clean"]["f1"]
  text = report.format_table({"teacher": {"clean": float(np.mean(f1))}}, ("clean",))
  print(text, flush=True)
  return res


# ------------------------------------------------------------------------------------------- evaluation


_PREDICT_CACHE: dict[str, tuple] = {}


def _predict_fn(model: AUModel):
  """Jitted ``predict(variables, images uint8, ids_keep) -> (probs, mean adjacency)`` and the occlusion
  predictor, shared by every model with the same hyper-parameters (one compilation)."""
  key = repr(model)
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = _make_predict(model)
  return _PREDICT_CACHE[key]


def _make_predict(model: AUModel):
  @jax.jit
  def predict(variables, images, ids_keep):
    out = model.apply(variables, pipeline.normalize(images), ids_keep, train=False)
    return out.head.probs, out.head.adjacency.mean(0)

  @jax.jit
  def occ(variables, images):
    return jax.nn.sigmoid(model.apply(variables, pipeline.normalize(images), method=AUModel.predict_occlusion))
  return predict, occ


def drop_ids(frac: np.ndarray, threshold: float, bucket: int, min_keep: int) -> np.ndarray | None:
  """Host-side ids_keep ``(B, K)`` for a batch: K = the batch's largest count of patches with occluded
  fraction ≤ ``threshold``, rounded up to a multiple of ``bucket`` (few distinct shapes to compile), at least
  ``min_keep``; each example keeps its K least-occluded patches. None when nothing needs dropping."""
  b, l = frac.shape
  k = int((frac <= threshold).sum(1).max())
  k = min(l, max(min_keep, -(-k // bucket) * bucket))
  if k >= l:
    return None
  order = np.argsort(frac + 1e-6 * np.arange(l)[None], axis=1, kind="stable")[:, :k]
  return np.sort(order, axis=1).astype(np.int32)


def evaluate(model: AUModel, variables: Mapping, config: ml_collections.ConfigDict, conditions, *,
             drop: str = "", examples: bool = False) -> dict[str, dict]:
  """Per-condition ``{"f1": (N,), "ratio": mean occluded fraction, "adjacency": (N, N)}`` on held-out
  subjects. ``drop``: "" (all tokens), "mask" (known occlusion) or "pred" (occlusion predictor)."""
  if drop not in ("", "mask", "pred"):
    raise ValueError(f"row drop must be '', 'mask' or 'pred', got {drop!r}")
  src = make_source(config.data, "test")
  ev = config.eval
  idx = au_pipeline.eval_indices(len(src), ev.get("examples"), config.seed)
  predict, occ = _predict_fn(model)
  l = model.num_patches
  out = {}
  for cond in conditions:
    counts = metrics.AUCounts(model.num_aus)
    ratios, adj, shown = [], [], []
    for batch in au_pipeline.eval_batches(src, cond, batch_size=ev.batch_size, size=model.img_size,
                                          patch_size=model.patch_size, num_aus=model.num_aus,
                                          seed=config.seed, indices=idx):
      n = len(batch["au"])
      images = batch["image"]
      if n < ev.batch_size:  # pad to one compiled shape
        images = np.concatenate([images, np.repeat(images[-1:], ev.batch_size - n, 0)])
      ids = None
      if drop:
        frac = batch["patch_frac"] if drop == "mask" else np.asarray(occ(variables, images))[:n]
        frac = np.concatenate([frac, np.repeat(frac[-1:], ev.batch_size - n, 0)]) if n < ev.batch_size else frac
        ids = drop_ids(frac, ev.drop_threshold, max(1, l // 8), max(1, l // 8))
      probs, a = predict(variables, images, ids)
      probs = np.asarray(probs)[:n]
      counts.update(probs, batch["au"])
      ratios.append(batch["patch_frac"].mean(1))
      adj.append(np.asarray(a))
      if examples and not shown:
        shown = [(batch["image"][i], batch["au"][i], probs[i]) for i in range(min(4, n))]
    out[cond] = {"f1": counts.f1(), "ratio": float(np.concatenate(ratios).mean()),
                 "adjacency": np.mean(adj, 0), "examples": shown}
  return out


# ---------------------------------------------------------------------------------------------- au_occl


def _mae_encoder(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The MAE encoder params: ``mae.init`` (a workdir / converted checkpoint) or MAE pretraining in
  ``workdir/mae`` (skipped when its final checkpoint exists)."""
  if config.mae.get("init"):
    return load_encoder(config.mae.init)[0]
  if config.data.name != "synthfaces":
    raise ValueError(f"config.mae.init: set it to an MAE / DMAE workdir or a `maejax.convert` output for "
                     f"data.name={config.data.name!r} (the chained MAE pretraining runs on synthetic faces only)")
  mae_dir = os.path.join(workdir, "mae")
  if not _complete(mae_dir, config.mae.total_steps):
    from maejax.trainers import mae
    t0 = time.time()
    common.stop_if_preempted(mae.train(config.mae, mae_dir), "mae", mae_dir)
    logging.info("mae: trained in %.0fs", time.time() - t0)
  return load_encoder(mae_dir)[0]


def student_models(config: ml_collections.ConfigDict) -> dict[str, tuple[AUModel, ml_collections.ConfigDict]]:
  """``name -> (model, run config)`` of every student: ``config.student`` overridden by
  ``config.students[name]``."""
  out = {}
  for name, over in config.students.items():
    run = ml_collections.ConfigDict(config.student.to_dict())
    for k, v in over.items():
      if k not in run:
        raise ValueError(f"config.students.{name}.{k}: unknown key; expected one of {sorted(run.keys())}")
      run[k] = v
    mc = model_config(config.model, stage=2, head=run.head, transform_depth=run.transform_depth,
                      occlusion_predictor=bool(run.occ_predictor), freeze_encoder=run.encoder == "frozen")
    out[name] = (build_model(mc), run)
  return out


def use_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache: students that differ only in loss weights, reruns and eval mode reuse
  compiled steps (compilation dominates the small CPU runs). Empty path = off."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_occl(config: ml_collections.ConfigDict, workdir: str):
  """``stage = au_occl``: MAE → teacher → students → evaluation → report (see module docstring)."""
  from maejax import report
  use_compilation_cache(config.get("compilation_cache", ""))
  mode = config.get("mode", "train")
  if mode not in ("train", "eval"):
    raise ValueError(f"config.mode must be 'train' or 'eval', got {mode!r}")
  t_start = time.time()
  timings = {}
  enc = None if mode == "eval" else _mae_encoder(config, workdir)
  timings["mae"] = time.time() - t_start
  t0 = time.time()
  teacher, t_vars = finetune(config, os.path.join(workdir, "teacher"), enc, mode=mode)
  timings["teacher"] = time.time() - t0
  img = config.model.img_size
  models = {"teacher": (teacher, t_vars)}
  for name, (model, run) in student_models(config).items():
    t0 = time.time()
    init = None
    if mode != "eval":
      init = {}
      if run.encoder_init == "mae":
        init["encoder"] = enc
      elif run.encoder_init == "teacher":
        init["encoder"] = jax.device_get(t_vars["params"]["encoder"])
      else:
        raise ValueError(f"config.students.{name}.encoder_init must be 'mae' or 'teacher', got "
                         f"{run.encoder_init!r}")
      if run.head_init == "teacher":
        warm = matching_params(model, {"au_head": jax.device_get(t_vars["params"]["au_head"])}, img)
        init = {**init, **warm}
    v = fit(f"student_{name}", model, run, config, os.path.join(workdir, "students", name), init_params=init,
            teacher=(teacher, t_vars), mode=mode)
    models[name] = (model, v)
    timings[f"student_{name}"] = time.time() - t0

  t0 = time.time()
  results = {}
  conditions = tuple(config.eval.conditions)
  for row, model_name, drop in config.rows:
    if model_name not in models:
      raise ValueError(f"config.rows.{row}: unknown model {model_name!r}; expected one of {sorted(models)}")
    model, v = models[model_name]
    results[row] = evaluate(model, v, config, conditions, drop=drop, examples=True)
    logging.info("evaluated %s: clean F1 %.3f", row, float(np.mean(results[row]["clean"]["f1"])))
  timings["eval"] = time.time() - t0
  timings["total"] = time.time() - t_start
  text = report.write_report(os.path.join(workdir, "report"), results, au_names(config.data), conditions,
                             timings=timings, seed=config.seed)
  print(text, flush=True)
  return results


def result_json(results: Mapping[str, Mapping[str, Mapping]]) -> str:
  return json.dumps({r: {c: float(np.mean(v["f1"])) for c, v in conds.items()} for r, conds in results.items()})
