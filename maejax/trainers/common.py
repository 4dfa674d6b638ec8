"""What every stage shares: train state, mesh and sharding rules, optimizer, the jitted step, Orbax checkpoints,
clu metrics/progress and the preemption-safe loop.

A stage (``trainers/mae.py``, ``trainers/distill.py``, …) supplies a model, a loss function and a data
iterator; :func:`train_loop` does the rest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding

from maejax.checkpoints import Checkpointer
from maejax.sharding import batch_sharding, global_batch, param_shardings, replicated

PyTree = Any
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, tuple[dict, PyTree]]]

# ------------------------------------------------------------------------------------------------ state


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training. ``rng`` is a raw uint32 key so Orbax can save it; ``extra`` holds
  non-trained collections (e.g. BatchNorm statistics) and is ``{}`` when unused."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array
  extra: PyTree


# -------------------------------------------------------------------------------------------- optimizer


def weight_decay_mask(params: PyTree) -> PyTree:
  """Official MAE: no weight decay on biases and LayerNorm (1-D) parameters."""
  def decays(path, x):
    name = getattr(path[-1], "key", str(path[-1]))
    return not (name in ("bias", "scale") or x.ndim <= 1)
  return jax.tree_util.tree_map_with_path(decays, params)


def layer_decay_multipliers(params: PyTree, depth: int, decay: float) -> PyTree:
  """Layer-wise lr decay (BEiT / MAE fine-tuning): layer id 0 = patch embed + cls, ``i+1`` = encoder block i,
  ``depth+1`` = everything after the encoder. Multiplier ``decay^(depth + 1 − layer_id)``."""
  def mult(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    lid = depth + 1
    if "encoder" in keys:
      lid = 0
      for k in keys:
        m = re.fullmatch(r"blocks_(\d+)", k)
        if m:
          lid = int(m.group(1)) + 1
      if "norm" in keys and not any(k.startswith("blocks_") for k in keys):
        lid = depth + 1
    return decay ** (depth + 1 - lid)
  return jax.tree_util.tree_map_with_path(mult, params)


def lr_schedule(cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int) -> optax.Schedule:
  """``lr = base_lr · batch / 256``, linear warmup then cosine to ``min_lr``."""
  peak = cfg.base_lr * batch_size / 256.0 if cfg.get("scale_by_batch", True) else cfg.base_lr
  warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, 1),
                                            end_value=cfg.get("min_lr", 0.0))


def make_optimizer(cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int,
                   lr_multipliers: PyTree | None = None, trainable: PyTree | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (β1, β2, wd without biases/LN), optional clipping, per-parameter lr multipliers, frozen params."""
  schedule = lr_schedule(cfg, batch_size, total_steps)
  parts = []
  if cfg.get("grad_clip"):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8)))
  parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask))
  if lr_multipliers is not None:
    parts.append(_scale_by_tree(lr_multipliers))
  parts.append(optax.scale_by_learning_rate(schedule))
  tx = optax.chain(*parts)
  if trainable is not None:
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "freeze", trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, schedule


def _scale_by_tree(multipliers: PyTree) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ------------------------------------------------------------------------------------------------- step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum_steps: int = 1):
  """``step(state, batch) -> (state, metrics)``: fold the step into the rng, average gradients over
  ``grad_accum_steps`` micro-batches (a scan, so memory is one micro-batch), apply AdamW."""

  def grads_and_metrics(params, extra, batch, rng):
    (_, (metrics, new_extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, extra, batch, rng)
    return grads, metrics, new_extra

  def step(state: TrainState, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if grad_accum_steps == 1:
      grads, metrics, extra = grads_and_metrics(state.params, state.extra, batch, rng)
    else:
      micro = jax.tree_util.tree_map(
          lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]), batch)

      def body(carry, xs):
        acc, extra = carry
        i, mb = xs
        g, m, extra = grads_and_metrics(state.params, extra, mb, jax.random.fold_in(rng, i))
        return (jax.tree_util.tree_map(jnp.add, acc, g), extra), m

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      (grads, extra), ms = jax.lax.scan(body, (zeros, state.extra), (jnp.arange(grad_accum_steps), micro))
      grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grads)
      metrics = jax.tree_util.tree_map(lambda m: m.mean(0), ms)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, extra=extra), metrics

  return step


@dataclasses.dataclass
class Trainer:
  """A jitted, sharded train step and the state it runs on."""

  mesh: jax.sharding.Mesh
  state: TrainState
  state_shardings: TrainState
  step_fn: Callable  # (state, batch) -> (state, metrics); frozen inputs already bound


def create_trainer(init_fn: Callable[[jax.Array], PyTree], loss_fn: LossFn, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]], seed: int,
                   grad_accum_steps: int = 1, init_params: PyTree | None = None,
                   frozen: PyTree | None = None) -> Trainer:
  """Builds the sharded state (params from ``init_fn(rng) -> variables`` or ``init_params``) and the step.

  ``init_fn`` returns flax variables (boxed with logical axes): ``{"params": …, other collections…}``.
  ``frozen``: device arrays the loss reads but never trains (a teacher); passed to the jitted step as an
  argument — never baked into the program as constants, never checkpointed — and to the loss as
  ``loss_fn(params, extra, batch, rng, frozen)``.
  """
  root = jax.random.PRNGKey(seed)
  init_rng, train_rng = jax.random.split(root)
  boxed = jax.eval_shape(init_fn, init_rng)
  var_shardings = param_shardings(boxed, mesh, rules)
  p_sh = var_shardings["params"]
  extra_sh = {k: v for k, v in var_shardings.items() if k != "params"}

  def init_variables(r):
    v = nn.meta.unbox(init_fn(r))
    return v["params"], {k: x for k, x in v.items() if k != "params"}

  params, extra = jax.jit(init_variables, out_shardings=(p_sh, extra_sh))(init_rng)
  if init_params is not None:
    params = _overlay(params, init_params, p_sh)
  opt_abstract = jax.eval_shape(tx.init, params)
  rep = replicated(mesh)
  # Frozen params (``trainable``) leave optax.MaskedNode (no leaves) in the optimizer state: keep it as is.
  opt_sh = optax.tree_map_params(tx, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, opt_abstract, p_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)))
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params, opt_state=opt_state,
                     rng=jax.device_put(train_rng, rep), extra=extra)
  shardings = TrainState(step=rep, params=p_sh, opt_state=opt_sh, rng=rep, extra=extra_sh)
  bsh = batch_sharding(mesh)
  if frozen is None:
    step = make_train_step(loss_fn, tx, grad_accum_steps)
    jitted = jax.jit(step, in_shardings=(shardings, bsh), out_shardings=(shardings, rep), donate_argnums=(0,))
    return Trainer(mesh=mesh, state=state, state_shardings=shardings, step_fn=jitted)

  def step_with_frozen(state, batch, frozen_values):
    bound = lambda p, e, b, r: loss_fn(p, e, b, r, frozen_values)
    return make_train_step(bound, tx, grad_accum_steps)(state, batch)

  frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
  jitted = jax.jit(step_with_frozen, in_shardings=(shardings, bsh, frozen_sh), out_shardings=(shardings, rep),
                   donate_argnums=(0,))
  return Trainer(mesh=mesh, state=state, state_shardings=shardings,
                 step_fn=lambda state, batch: jitted(state, batch, frozen))


def _overlay(params: PyTree, given: PyTree, shardings: PyTree) -> PyTree:
  """Replaces subtrees of ``params`` by ``given`` (same structure where present), keeping shardings."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  new = flax.traverse_util.flatten_dict(flax.core.unfreeze(given))
  sh = flax.traverse_util.flatten_dict(flax.core.unfreeze(shardings))
  for k, v in new.items():
    if k not in flat:
      raise ValueError(f"initial parameter {'/'.join(k)} does not exist in the model")
    if tuple(v.shape) != tuple(flat[k].shape):
      raise ValueError(f"initial parameter {'/'.join(k)} has shape {tuple(v.shape)}, "
                       f"the model expects {tuple(flat[k].shape)}")
    flat[k] = jax.device_put(jnp.asarray(v, flat[k].dtype), sh[k])
  return flax.traverse_util.unflatten_dict(flat)


# --------------------------------------------------------------------------------------------- the loop


class Preemption:
  """SIGTERM → finish the current step, save, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._old or signal.SIG_DFL)


class NonFiniteLoss(RuntimeError):
  pass


class Preempted(Exception):
  """A stage of a chained job was preempted (SIGTERM): its checkpoint is saved, and the later stages must not
  start from its unfinished result. Running the same command again resumes it."""


def stop_if_preempted(result: LoopResult, name: str, workdir: str) -> None:
  """Raises :class:`Preempted` for a chained job whose stage ``name`` (in ``workdir``) was preempted."""
  if result.preempted:
    raise Preempted(f"{name}: preempted; its checkpoint is in {workdir}/checkpoints; run the same command again "
                    "to resume")


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  losses: list[tuple[int, float]]
  preempted: bool


def train_loop(trainer: Trainer, data_iter: Iterator[Mapping[str, np.ndarray]], total_steps: int,
               workdir: str, config: ml_collections.ConfigDict, model_config: Mapping[str, Any],
               eval_fn: Callable[[TrainState, int], None] | None = None, name: str = "train") -> LoopResult:
  """Runs ``total_steps`` steps with resume, periodic checkpoints, clu metrics/progress, SIGTERM handling."""
  from clu import metric_writers, parameter_overview, periodic_actions

  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ck = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3),
                    save_every=config.get("checkpoint_every", 1000))
  state = trainer.state
  start = 0
  if ck.latest_step() is not None:
    start = int(ck.latest_step())
    logging.info("%s: resuming from step %d in %s", name, start, workdir)
    state = ck.restore(state, trainer.state_shardings, data_iter)
  elif is_main:
    logging.info("%s: parameter overview\n%s", name,
                 parameter_overview.get_parameter_overview(jax.device_get(state.params)))

  writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not is_main,
                                                asynchronous=False)
  writer.write_hparams({k: v for k, v in _flat_config(config).items()})
  progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                             every_secs=None, every_steps=config.get("log_every", 10))
  log_every = int(config.get("log_every", 10))
  losses: list[tuple[int, float]] = []
  loss_log = open(os.path.join(workdir, f"{name}_loss.jsonl"), "a", buffering=1) if is_main else None
  acc: dict[str, list[float]] = {}
  pending = None  # metrics of the previous step, fetched one step late so dispatch never waits on the host
  preempted = False

  def finish_pending(pending):
    step_no, m = pending
    hm = host_metrics(m)
    if not (np.isfinite(hm["loss"]) and np.isfinite(hm.get("grad_norm", 0.0))):
      raise NonFiniteLoss(f"{name}: non-finite loss {hm['loss']} (grad norm {hm.get('grad_norm')}) at step "
                          f"{step_no}; stopping. The last "
                          f"checkpoint (step {ck.latest_step()}) is intact in {workdir}/checkpoints")
    losses.append((step_no, hm["loss"]))
    if loss_log:
      loss_log.write(json.dumps({"step": step_no, "loss": hm["loss"]}) + "\n")
    for k, v in hm.items():
      acc.setdefault(k, []).append(v)
    if step_no % log_every == 0 or step_no == total_steps:
      writer.write_scalars(step_no, {k: float(np.mean(v)) for k, v in acc.items()})
      acc.clear()

  try:
    with Preemption() as pre:
      t0 = time.time()
      for step in range(start + 1, total_steps + 1):
        batch = global_batch(next(data_iter), trainer.mesh)
        state, metrics = trainer.step_fn(state, batch)
        if pending is not None:
          finish_pending(pending)
        pending = (step, metrics)
        progress(step, t=time.time())
        if step == start + 1:
          jax.block_until_ready(metrics)
          logging.info("%s: first step (compile included) took %.1fs", name, time.time() - t0)
        evaluate = eval_fn is not None and step % config.get("eval_every", 10**9) == 0
        # Every ``checkpoint_every`` steps (Orbax's ``should_save`` would also save step 1 of a fresh run).
        if step % ck.save_every == 0 or pre.requested or evaluate:
          # Only a state whose loss and gradients were finite is saved or evaluated.
          finish_pending(pending)
          pending = None
          ck.save(step, state, data_iter, model_config, force=pre.requested)
        if evaluate:
          eval_fn(state, step)
        if pre.requested:
          logging.warning("%s: preempted at step %d; checkpoint saved.", name, step)
          preempted = True
          break
      if pending is not None:
        finish_pending(pending)
    if not preempted:
      if ck.latest_step() != total_steps and total_steps > start:
        ck.save(total_steps, state, data_iter, model_config, force=True)
      if eval_fn is not None and total_steps > start:
        eval_fn(state, total_steps)
  finally:
    writer.flush()
    if loss_log:
      loss_log.close()
    ck.close()
  return LoopResult(state=state, losses=losses, preempted=preempted)


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = {}

  def walk(prefix, d):
    for k, v in d.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        walk(f"{prefix}{k}.", v)
      elif isinstance(v, (int, float, str, bool)):
        flat[prefix + k] = v
  walk("", config)
  return flat
