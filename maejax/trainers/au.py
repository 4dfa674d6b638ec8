"""Stages 3 and 4: ``au_finetune`` (the clean-face AU teacher) and ``au_occl`` (occlusion-robust students,
baselines, evaluation and the robustness report). DESIGN.md §1, §4, §5. Orchestration only: the model and its
config are :mod:`maejax.models.au_model`, the losses :mod:`maejax.losses`, inference, evaluation and the
workdir layout :mod:`maejax.au_infer`, checkpoints :mod:`maejax.checkpoints`.

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

The frozen inputs of a step — the teacher's variables, the WAL weights and the loss weights — are passed
through ``create_trainer(frozen=...)``: arguments of the jitted step, never part of a checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from maejax import au_infer, checkpoints, losses, sharding
from maejax.data import au_pipeline, pipeline
from maejax.models.au_model import AUModel, AUModelConfig, keep_least_occluded
from maejax.trainers import common

ENCODER_MODES = ("finetune", "frozen", "partial:K")

# ------------------------------------------------------------------------------------------------ models


def teacher_config(model_cfg: ml_collections.ConfigDict, stage: int) -> AUModelConfig:
  """The teacher of ME-GraphAU ``stage`` (1: AFG + FGG, 2: MEFL): encoder tokens straight to the graph head."""
  return AUModelConfig.from_config(model_cfg, stage=stage, transform_depth=0, head="graph",
                                   occlusion_predictor=False, freeze_encoder=False)


def student_runs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """``name -> run config`` of every student: ``config.student`` overridden by ``config.students[name]``."""
  out = {}
  for name, over in config.students.items():
    run = ml_collections.ConfigDict(config.student.to_dict())
    for k, v in over.items():
      if k not in run:
        raise ValueError(f"config.students.{name}.{k}: unknown key; expected one of {sorted(run.keys())}")
      run[k] = v
    out[name] = run
  return out


def student_config(model_cfg: ml_collections.ConfigDict, run: ml_collections.ConfigDict) -> AUModelConfig:
  """A student: the MAE encoder (occluded face) → latent→AU transform → head, as ``run`` says."""
  return AUModelConfig.from_config(model_cfg, stage=2, head=run.head, transform_depth=run.transform_depth,
                                   occlusion_predictor=bool(run.occ_predictor),
                                   freeze_encoder=run.encoder == "frozen")


def student_models(config: ml_collections.ConfigDict) -> dict[str, tuple[AUModel, ml_collections.ConfigDict]]:
  """``name -> (model, run config)`` of every student of ``config``."""
  return {name: (student_config(config.model, run).build(), run) for name, run in student_runs(config).items()}


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
    raise ValueError(f"student.encoder must be one of {ENCODER_MODES}, got {encoder!r}")

  def train(path, _):
    keys = [getattr(p, "key", str(p)) for p in path]
    if keys[0] != "encoder":
      return True
    blocks = [int(x.split("_")[1]) for x in keys if x.startswith("blocks_")]
    if blocks:
      return blocks[0] >= depth - k
    return k > 0 and "norm" in keys
  return jax.tree_util.tree_map_with_path(train, params)


# ------------------------------------------------------------------------------------------------- fit


# Loss term -> the ``config.student`` weight of the KD-family terms; a term exists only when its weight is not 0,
# so the students without it compile (and compute) exactly what they did before the family existed.
KD_FAMILY = {"prob_kd": "prob_kd", "pseudo": "pseudo_label", "latent_kd": "latent_kd", "triplet_kd": "triplet_kd"}
MUTUAL = "mutual_teacher"  # online KD: the jointly trained teacher's params / batch stats inside the student's state
LATENT_KD_WHERE = ("all", "occluded")


def loss_weights(run: ml_collections.ConfigDict) -> dict[str, float]:
  """The weights of the loss terms of ``run``: WAL 1, λ_e (edge CE), α_n, α_e (KD), occlusion BCE; the
  KD-family terms whose weight is not 0; online KD: the teacher's own WAL (1) and edge CE (λ_e) and its
  distillation from the student (``online_mutual``)."""
  w = {"wal": 1.0, "edge_ce": run.get("edge_weight", 0.0), "node_kd": run.get("node_kd", 0.0),
       "edge_kd": run.get("edge_kd", 0.0), "occ_bce": run.get("occ_weight", 1.0)}
  w.update({term: run[key] for term, key in KD_FAMILY.items() if run.get(key, 0.0)})
  if run.get("online_kd", False):
    w.update(teacher_wal=1.0, teacher_edge_ce=run.get("edge_weight", 0.0),
             teacher_mutual=run.get("online_mutual", 1.0))
  return w


def _split_mutual(tree: Mapping) -> tuple[dict, Mapping | None]:
  """``(student part, online teacher part or None)`` of a params / batch-stats tree."""
  return {k: v for k, v in tree.items() if k != MUTUAL}, tree.get(MUTUAL)


def make_loss_fn(model: AUModel, run: ml_collections.ConfigDict, teacher: AUModel | None):
  """``loss_fn(params, extra, batch, rng, frozen)``; ``frozen``: ``{"wal_weights", "loss_weights"[,
  "teacher"]}``. Without a teacher the model reads the clean face (the teacher stages); with one it reads the
  occluded face and the teacher the clean one. Label terms mask −1 labels (unlabelled frames); KD terms act on
  every frame.

  Online KD (``run.online_kd``, deep mutual learning as FAN-Trans's online distillation): the teacher's params
  are ``params[MUTUAL]`` (trained with the student), it runs in train mode on the clean face, adds its own
  WAL + λ_e·edge CE and ``online_mutual``·probability KD toward the student; each side's KD target is the
  other's stop_gradient'ed output. Otherwise the teacher is ``frozen["teacher"]`` in eval mode."""
  kind = run.get("kd_kind", "mse")
  drop_train = bool(run.get("drop_train", False))
  keep_train = max(1, int(round(model.num_patches * run.get("train_keep_ratio", 0.5))))
  weights = loss_weights(run)
  online = teacher is not None and bool(run.get("online_kd", False))
  temp = float(run.get("prob_kd_T", 1.0))
  where = run.get("latent_kd_where", "all")
  if where not in LATENT_KD_WHERE:
    raise ValueError(f"latent_kd_where must be one of {LATENT_KD_WHERE}, got {where!r}")

  def loss_fn(params, extra, batch, rng, frozen):
    labels = batch["au"].astype(jnp.int32)
    images = pipeline.normalize(batch["occluded" if teacher is not None else "image"])
    ids_keep = keep_least_occluded(batch["patch_frac"], keep_train, rng) if drop_train else None
    s_params, t_params = _split_mutual(params) if online else (params, None)
    s_stats, t_stats = _split_mutual(extra["batch_stats"]) if online else (extra["batch_stats"], None)
    out, new = model.apply({"params": s_params, "batch_stats": s_stats}, images, ids_keep, train=True,
                           mutable=["batch_stats"])
    new_stats = new["batch_stats"]
    terms = {"wal": losses.wal_loss(out.head.probs, labels, frozen["wal_weights"])}
    if out.head.edge_logits is not None:
      terms["edge_ce"] = losses.edge_ce_loss(out.head.edge_logits, labels)
    if teacher is not None:
      clean = pipeline.normalize(batch["image"])
      if online:
        t_out, t_new = teacher.apply({"params": t_params, "batch_stats": t_stats}, clean, train=True,
                                     mutable=["batch_stats"])
        new_stats = {**new_stats, MUTUAL: t_new["batch_stats"]}
        own = {"teacher_wal": losses.wal_loss(t_out.head.probs, labels, frozen["wal_weights"])}
        if t_out.head.edge_logits is not None:
          own["teacher_edge_ce"] = losses.edge_ce_loss(t_out.head.edge_logits, labels)
        own["teacher_mutual"] = losses.prob_kd_loss(t_out.head.probs, out.head.probs, temp)
        t_out = jax.lax.stop_gradient(t_out)
      else:
        own = {}
        t_out = jax.lax.stop_gradient(teacher.apply(frozen["teacher"], clean, train=False))
      t_head = t_out.head
      terms["node_kd"] = losses.node_kd_loss(out.head.node_feats, t_head.node_feats, kind)
      if out.head.edge_feats is not None and t_head.edge_feats is not None:
        terms["edge_kd"] = losses.edge_kd_loss(out.head.edge_feats, t_head.edge_feats, kind)
      if out.occ_logits is not None:
        terms["occ_bce"] = losses.occlusion_bce(out.occ_logits, batch["patch_frac"])
      if "prob_kd" in weights:
        terms["prob_kd"] = losses.prob_kd_loss(out.head.probs, t_head.probs, temp)
      if "pseudo" in weights:
        terms["pseudo"] = losses.pseudo_label_loss(out.head.probs, t_head.probs, labels, frozen["wal_weights"],
                                                   run.get("pseudo_threshold", 0.5))
      if "latent_kd" in weights:
        mask = out.token_valid
        if where == "occluded":
          mask = mask * (batch["patch_frac"] > 0).astype(mask.dtype)
        terms["latent_kd"] = losses.latent_kd_loss(out.tokens, t_out.tokens, mask)
      if "triplet_kd" in weights:
        terms["triplet_kd"] = losses.triplet_kd_loss(out.head.node_feats, t_head.node_feats, labels,
                                                     run.get("triplet_margin", 0.2),
                                                     bool(run.get("triplet_normalize", True)))
      terms.update(own)
    loss = losses.weighted_sum(terms, frozen["loss_weights"])
    return loss, ({"loss": loss, **terms}, {**extra, "batch_stats": new_stats})
  return loss_fn


def build_trainer(model: AUModel, run: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                  frozen: Mapping, *, init_params: Mapping | None, teacher: AUModel | None,
                  lr_multipliers: bool, teacher_stats: Mapping | None = None) -> common.Trainer:
  """The sharded state and step of one AU model (optimizer with layer decay / frozen encoder parts). A
  ``teacher`` without ``frozen["teacher"]`` is trained jointly (online KD): its params are ``init_params[MUTUAL]``,
  its batch statistics start from ``teacher_stats``."""
  mesh = sharding.make_mesh(config.mesh)
  dummy = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  online = teacher is not None and "teacher" not in frozen

  def init_fn(rng):
    v = dict(model.init(rng, dummy, train=False))
    v.setdefault("batch_stats", {})
    if online:  # the jointly trained teacher: params from init_params, batch stats from the trained teacher
      t = teacher.init(rng, dummy, train=False)
      v["params"] = {**v["params"], MUTUAL: t["params"]}
      v["batch_stats"] = {**v["batch_stats"], MUTUAL: jax.tree_util.tree_map(jnp.asarray, teacher_stats)}
    return v

  params_shape = flax.linen.meta.unbox(jax.eval_shape(init_fn, jax.random.PRNGKey(0))["params"])
  trainable = None
  if teacher is not None:
    trainable = trainable_mask(params_shape, run.get("encoder", "finetune"), model.depth)
  mult = None
  if lr_multipliers and run.get("layer_decay", 1.0) < 1.0:
    mult = common.layer_decay_multipliers(params_shape, model.depth, run.layer_decay)
  tx, _ = common.make_optimizer(run.optim, run.batch_size, run.total_steps, mult, trainable)
  placed = {k: jax.device_put(v, sharding.replicated(mesh)) for k, v in frozen.items() if k != "teacher"}
  if "teacher" in frozen:  # the teacher's params laid out by their logical axes, as a trained model's
    t_init = lambda r: teacher.init(r, dummy, train=False)
    placed["teacher"] = {"params": sharding.shard_like_params(t_init, frozen["teacher"]["params"], mesh,
                                                              config.sharding_rules),
                         "batch_stats": jax.device_put(frozen["teacher"]["batch_stats"], sharding.replicated(mesh))}
  return common.create_trainer(init_fn, make_loss_fn(model, run, teacher), tx, mesh, config.sharding_rules,
                               config.seed + run.get("seed_offset", 0), config.get("grad_accum_steps", 1),
                               init_params=init_params, frozen=placed)


def labelled_per_batch(config: ml_collections.ConfigDict, batch_size: int) -> int:
  """Labelled frames in each student batch of the label-scarce regime: ``data.labelled_per_batch`` (0 = a
  quarter of the batch)."""
  k = int(config.data.get("labelled_per_batch", 0)) or max(1, batch_size // 4)
  if not 0 < k < batch_size:
    raise ValueError(f"config.data.labelled_per_batch: expected 0 < k < the batch size {batch_size}, got {k}")
  return k


def train_data(model: AUModel, run: ml_collections.ConfigDict, config: ml_collections.ConfigDict, source,
               occlude: bool, labelled: np.ndarray | None = None):
  """The training batches of one AU model (clean faces for a teacher, occluded + clean for a student).
  ``labelled`` (label fraction < 1): a teacher reads the labelled frames only; a student reads every training
  frame, a fixed number of labelled ones per batch and the rest with their labels hidden."""
  d = config.data
  per_batch = 0 if labelled is None or not occlude else labelled_per_batch(config, run.batch_size)
  return iter(au_pipeline.train_pipeline(
      source, global_batch_size=run.batch_size, size=model.img_size, patch_size=model.patch_size,
      num_aus=model.num_aus, seed=config.seed + run.get("seed_offset", 0), occlude=occlude,
      conditions=tuple(run.get("train_conditions", au_pipeline.occlusion.TRAIN_CONDITIONS)),
      jitter=d.get("jitter", 0.2), shift=d.get("shift", 1 / 14), flip=d.get("flip", True),
      worker_count=d.get("worker_count", 0), labelled=labelled, labelled_per_batch=per_batch))


def fit(name: str, model: AUModel, run: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
        workdir: str, *, init_params: Mapping | None = None, teacher: tuple[AUModel, Mapping] | None = None,
        lr_multipliers: bool = False, mode: str = "train") -> dict:
  """Trains (or, when its final checkpoint exists, restores) one AU model; returns its variables
  ``{"params", "batch_stats"}``. With ``teacher = (model, variables)`` the loss is the student loss (online KD:
  the teacher starts from ``variables`` and trains with the student; only the student's variables return)."""
  # Host copies: the train step donates its state, so device arrays given here would be deleted under the caller.
  init_params = None if init_params is None else jax.device_get(init_params)
  train_src = au_pipeline.au_source(config.data, "train")
  labelled = au_pipeline.labelled_subset(len(train_src), config.data.get("label_fraction", 1.0), config.seed)
  wal_src = train_src if labelled is None else au_pipeline.Subset(train_src, labelled)
  wal = losses.au_pos_weights(au_pipeline.sample_labels(wal_src, model.num_aus, seed=config.seed))
  frozen = {"wal_weights": jnp.asarray(wal, jnp.float32),
            "loss_weights": {k: jnp.float32(v) for k, v in loss_weights(run).items()}}
  online = teacher is not None and bool(run.get("online_kd", False))
  t_stats = None
  if online:
    t_vars = jax.device_get(teacher[1])
    init_params = {**(init_params or {}), MUTUAL: t_vars["params"]}
    t_stats = t_vars["batch_stats"]
  elif teacher is not None:
    frozen["teacher"] = jax.device_get(teacher[1])
  trainer = build_trainer(model, run, config, frozen, init_params=init_params,
                          teacher=None if teacher is None else teacher[0], lr_multipliers=lr_multipliers,
                          teacher_stats=t_stats)
  mc = AUModelConfig.from_json({k: getattr(model, k) for k in AUModelConfig.fields()}).to_json()
  os.makedirs(workdir, exist_ok=True)
  if checkpoints.is_complete(workdir, run.total_steps):
    logging.info("%s: final checkpoint found in %s; restoring instead of training", name, workdir)
    ck = checkpoints.Checkpointer(workdir)
    state = ck.restore(trainer.state, trainer.state_shardings)
    ck.close()
  elif mode == "eval":
    raise FileNotFoundError(f"mode=eval: {name} has no final checkpoint (step {run.total_steps}) in "
                            f"{workdir}/checkpoints; train it first (mode=train)")
  else:
    data = train_data(model, run, config, train_src, occlude=teacher is not None, labelled=labelled)
    t0 = time.time()
    result = common.train_loop(trainer, data, run.total_steps, workdir, _merge(config, run), mc, name=name)
    common.stop_if_preempted(result, name, workdir)
    state = result.state
    logging.info("%s: trained in %.0fs", name, time.time() - t0)
  return jax.device_get({"params": _split_mutual(state.params)[0],
                         "batch_stats": _split_mutual(state.extra["batch_stats"])[0]})


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
  if isinstance(params, Mapping):
    params = params.get("student", params)  # a DMAE workdir: the student MAE beside its projection heads
    params = params.get("encoder", params)
  if "blocks_0" not in params:
    raise ValueError(f"{path}: no ViT encoder parameters found (expected an MAE / DMAE checkpoint)")
  return params, mc


def finetune(config: ml_collections.ConfigDict, workdir: str, encoder_params: Mapping | None = None,
             mode: str = "train") -> tuple[AUModel, dict]:
  """ME-GraphAU teacher: stage 1 (AFG + FGG, WAL) in ``workdir/stage1``, then stage 2 (MEFL, WAL + λ·edge
  CE, initialised from stage 1) in ``workdir/stage2``. Returns the stage-2 model and its variables."""
  t = config.teacher
  m1 = teacher_config(config.model, 1).build()
  if encoder_params is None and config.get("init") and mode != "eval":
    encoder_params, _ = load_encoder(config.init)
  init = None if encoder_params is None else {"encoder": encoder_params}
  if init is None and mode != "eval":
    logging.warning("au_finetune: no encoder init (config.init empty): training the encoder from scratch")
  v1 = fit("teacher_stage1", m1, t.stage1, config, os.path.join(workdir, "stage1"), init_params=init,
           lr_multipliers=True, mode=mode)
  m2 = teacher_config(config.model, 2).build()
  warm = None if mode == "eval" else matching_params(m2, jax.device_get(v1["params"]), m2.img_size)
  v2 = fit("teacher_stage2", m2, t.stage2, config, os.path.join(workdir, "stage2"), init_params=warm,
           lr_multipliers=True, mode=mode)
  return m2, v2


def train_finetune(config: ml_collections.ConfigDict, workdir: str):
  """``stage = au_finetune``: the teacher, then its evaluation on clean held-out faces."""
  from maejax import report
  use_compilation_cache(config.get("compilation_cache", ""))
  model, variables = finetune(config, workdir, mode=config.get("mode", "train"))
  res = au_infer.evaluate(model, variables, config, ("clean",), drop="")
  text = report.format_table({"teacher": {"clean": float(np.mean(res["clean"]["f1"]))}}, ("clean",))
  print(text, flush=True)
  return res


# ---------------------------------------------------------------------------------------------- au_occl


def _mae_encoder(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The MAE encoder params: ``mae.init`` (a workdir / converted checkpoint) or MAE pretraining in
  ``workdir/mae`` (skipped when its final checkpoint exists)."""
  if config.mae.get("init"):
    return load_encoder(config.mae.init)[0]
  if config.data.name != "synthfaces":
    raise ValueError(f"config.mae.init: set it to an MAE / DMAE workdir or a `maejax.convert` output for "
                     f"data.name={config.data.name!r} (the chained MAE pretraining runs on synthetic faces only)")
  mae_dir = os.path.join(workdir, au_infer.MAE_DIR)
  if not checkpoints.is_complete(mae_dir, config.mae.total_steps):
    from maejax.trainers import mae
    t0 = time.time()
    common.stop_if_preempted(mae.train(config.mae, mae_dir), "mae", mae_dir)
    logging.info("mae: trained in %.0fs", time.time() - t0)
  return load_encoder(mae_dir)[0]


def student_init(run: ml_collections.ConfigDict, name: str, model: AUModel, mae_encoder: Mapping,
                 teacher_vars: Mapping) -> dict:
  """A student's initial params: its encoder from the MAE or the teacher, its head from the teacher or random."""
  if run.encoder_init == "mae":
    init = {"encoder": mae_encoder}
  elif run.encoder_init == "teacher":
    init = {"encoder": jax.device_get(teacher_vars["params"]["encoder"])}
  else:
    raise ValueError(f"config.students.{name}.encoder_init must be 'mae' or 'teacher', got {run.encoder_init!r}")
  if run.head_init == "teacher":
    head = {"au_head": jax.device_get(teacher_vars["params"]["au_head"])}
    init.update(matching_params(model, head, model.img_size))
  return init


def use_compilation_cache(path: str) -> None:
  """Persistent XLA compilation cache: students that differ only in loss weights, reruns and eval mode reuse
  compiled steps (compilation dominates the small CPU runs). Empty path = off."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def train_students(config: ml_collections.ConfigDict, workdir: str, mae_encoder, teacher: tuple[AUModel, dict],
                   mode: str, timings: dict) -> dict[str, tuple[AUModel, dict]]:
  """Every student of ``config.students`` against the frozen ``teacher``; ``name -> (model, variables)``."""
  models = {}
  for name, (model, run) in student_models(config).items():
    t0 = time.time()
    init = None if mode == "eval" else student_init(run, name, model, mae_encoder, teacher[1])
    v = fit(f"student_{name}", model, run, config, au_infer.student_dir(workdir, name), init_params=init,
            teacher=teacher, mode=mode)
    models[name] = (model, v)
    timings[f"student_{name}"] = time.time() - t0
  return models


def calibrate(config: ml_collections.ConfigDict, workdir: str, models: Mapping[str, tuple[AUModel, dict]]
              ) -> dict[str, np.ndarray]:
  """``name -> (N,)`` F1-optimal per-AU thresholds of every model, chosen on the validation split under the
  students' training occlusion mix (:func:`au_infer.f1_optimal_thresholds`) and written next to the model's
  checkpoints as ``calibration.json`` (read back by ``au_infer.load``)."""
  conditions = tuple(config.student.get("train_conditions", au_pipeline.occlusion.TRAIN_CONDITIONS))
  out = {}
  for name, (model, v) in models.items():
    probs, labels = au_infer.calibration_data(model, v, config, conditions)
    out[name] = au_infer.f1_optimal_thresholds(probs, labels)
    path = au_infer.teacher_dir(workdir) if name == "teacher" else au_infer.student_dir(workdir, name)
    au_infer.write_calibration(path, out[name], {"split": "val", "conditions": list(conditions),
                                                 "examples": int(len(labels)), "seed": int(config.seed)})
    logging.info("calibrated %s on %d validation faces: thresholds %s", name, len(labels),
                 np.round(out[name], 2).tolist())
  return out


def evaluate_rows(config: ml_collections.ConfigDict, models: Mapping[str, tuple[AUModel, dict]],
                  thresholds: Mapping[str, np.ndarray] | None = None) -> dict:
  """``row -> condition -> result`` of every ``config.rows`` entry (row name, model name, token dropping);
  with ``thresholds`` (calibration) each row is followed by ``"ROW (cal)"``, the same model at its thresholds."""
  results = {}
  for row, model_name, drop in config.rows:
    if model_name not in models:
      raise ValueError(f"config.rows.{row}: unknown model {model_name!r}; expected one of {sorted(models)}")
    model, v = models[model_name]
    results[row] = au_infer.evaluate(model, v, config, tuple(config.eval.conditions), drop=drop, examples=True)
    logging.info("evaluated %s: clean F1 %.3f", row, float(np.mean(results[row]["clean"]["f1"])))
    if thresholds is not None:
      results[f"{row} (cal)"] = au_infer.evaluate(model, v, config, tuple(config.eval.conditions), drop=drop,
                                                  examples=True, thresholds=thresholds[model_name])
  return results


def train_occl(config: ml_collections.ConfigDict, workdir: str):
  """``stage = au_occl``: MAE → teacher → students → evaluation → report (see module docstring)."""
  from maejax import report
  use_compilation_cache(config.get("compilation_cache", ""))
  mode = config.get("mode", "train")
  t_start = time.time()
  timings = {}
  enc = None if mode == "eval" else _mae_encoder(config, workdir)
  timings["mae"] = time.time() - t_start
  t0 = time.time()
  teacher = finetune(config, os.path.join(workdir, au_infer.TEACHER_DIR), enc, mode=mode)
  timings["teacher"] = time.time() - t0
  models = {"teacher": teacher, **train_students(config, workdir, enc, teacher, mode, timings)}
  t0 = time.time()
  thresholds = calibrate(config, workdir, models) if config.eval.get("calibrate", False) else None
  results = evaluate_rows(config, models, thresholds)
  timings["eval"] = time.time() - t0
  timings["total"] = time.time() - t_start
  text = report.write_report(os.path.join(workdir, au_infer.REPORT_DIR), results,
                             au_pipeline.au_names(config.data), tuple(config.eval.conditions), timings=timings,
                             seed=config.seed, label_fraction=float(config.data.get("label_fraction", 1.0)))
  print(text, flush=True)
  return results
