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
import sys
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


# -------------------------------------------------------------------------------------------------- EMA
# A momentum (EMA) copy of some parameters, for self-teachers (BootMAE, SdAE; BYOL, DINO, MoCo v3).
# Kept in ``TrainState.extra["ema"] = {"params": ξ, "step": s}``: ``ξ`` is sharded as the parameters it copies,
# checkpointed and restored with the rest of the state; ``s`` = optimizer steps taken (the update index and the
# objectives' ramps read it). Updated after the optimizer step, from the new parameters θ_{t+1} (timm ModelEma).

EMA_SCHEDULES = ("constant", "knots", "cosine")


def ema_momentum_schedule(kind: str = "constant", m0: float = 0.996, m1: float = 1.0, num_updates: int = 1,
                          knots: Sequence[float] = (), values: Sequence[float] = ()) -> optax.Schedule:
  """Momentum ``m(i)`` of EMA update ``i = 0, 1, …`` (an optax-style schedule).

  * ``"constant"``: ``m(i) = m0``.
  * ``"knots"``: piecewise linear through ``(knots[j], values[j])`` (knots in updates, increasing), constant
    outside; BootMAE's ``0.999 → 0.9999`` over the first 100 epochs, then ``→ 0.99999`` over 300 more, is
    ``knots=(0, 100·n_ep, 400·n_ep), values=(0.999, 0.9999, 0.99999)``; a stepwise schedule repeats a knot
    (``knots=(0, 5, 5), values=(a, a, b)``).
  * ``"cosine"``: ``m(i) = m1 + ½ (m0 − m1)(1 + cos(π i / n))`` for ``i < n = num_updates``, then ``m1``:
    from ``m0`` to ``m1``; ``m1 = 1`` is BYOL / DINO's ``1 − (1 − m0)(cos(π i/n) + 1)/2``; SdAE's per-epoch
    schedule is ``m0 = 0.96, m1 = 0.99``, ``n`` = epochs.
  """
  if kind == "constant":
    return lambda i: jnp.asarray(m0, jnp.float32)
  if kind == "knots":
    if len(knots) != len(values) or not knots:
      raise ValueError(f"ema knots {tuple(knots)} and values {tuple(values)} must be non-empty and of equal length")
    if any(b < a for a, b in zip(knots[:-1], knots[1:], strict=True)):
      raise ValueError(f"ema knots must be non-decreasing, got {tuple(knots)}")
    x = np.asarray(knots, np.float64)
    y = np.asarray(values, np.float64)

    def knotted(i):
      i = jnp.asarray(i, jnp.float32)
      # Linear between consecutive knots; a repeated knot is a step (the later value from that update on).
      out = jnp.asarray(y[0], jnp.float32)
      for j in range(1, len(x)):
        span = max(x[j] - x[j - 1], 0.0)
        t = jnp.clip((i - x[j - 1]) / span, 0.0, 1.0) if span > 0 else (i >= x[j]).astype(jnp.float32)
        out = jnp.where(i >= x[j - 1], y[j - 1] + (y[j] - y[j - 1]) * t, out)
      return out

    return knotted
  if kind == "cosine":
    n = max(int(num_updates), 1)

    def cosine(i):
      t = jnp.minimum(jnp.asarray(i, jnp.float32), n) / n
      return (m1 + 0.5 * (m0 - m1) * (1.0 + jnp.cos(jnp.pi * t))).astype(jnp.float32)

    return cosine
  raise ValueError(f"unknown ema schedule {kind!r}; expected one of {EMA_SCHEDULES}")


@dataclasses.dataclass(frozen=True)
class EMA:
  """Which parameters get a momentum copy, how often it is updated and with what momentum.

  Every ``every`` optimizer steps (after step ``s`` with ``s % every == 0``; update index ``i = s / every − 1``):
  ``ξ ← m(i)·ξ + (1 − m(i))·θ`` over the parameter subtrees named in ``keys`` (``()`` = all parameters).
  ``ξ₀ = θ₀`` (the copy starts as the initial, possibly warm-started, parameters).
  """

  schedule: optax.Schedule
  every: int = 1
  keys: tuple[str, ...] = ()

  def select(self, params: PyTree) -> PyTree:
    """The subtree of ``params`` that is tracked (``{key: params[key]}``, or all of it)."""
    if not self.keys:
      return params
    missing = [k for k in self.keys if k not in params]
    if missing:
      raise ValueError(f"EMA keys {missing} are not top-level parameter names; expected some of {sorted(params)}")
    return {k: params[k] for k in self.keys}

  def init(self, params: PyTree) -> dict[str, Any]:
    return {"params": self.select(params), "step": jnp.zeros((), jnp.int32)}

  def update(self, ema_state: Mapping[str, Any], params: PyTree) -> dict[str, Any]:
    """One optimizer step later: the step count advances; every ``every`` steps the copy moves towards the
    (new) parameters."""
    step = ema_state["step"] + 1
    i = step // self.every - 1
    m = jnp.where(step % self.every == 0, self.schedule(i), 1.0).astype(jnp.float32)
    new = jax.tree_util.tree_map(lambda e, p: ema_update(e, p, m), ema_state["params"],
                                 jax.lax.stop_gradient(self.select(params)))
    return {"params": new, "step": step}


def ema_update(ema: jax.Array, param: jax.Array, momentum: jax.Array) -> jax.Array:
  """``ξ ← m·ξ + (1 − m)·θ`` in the parameter's dtype (``m = 1`` leaves ``ξ`` unchanged bit for bit)."""
  m = momentum.astype(ema.dtype)
  return jnp.where(momentum == 1.0, ema, m * ema + (1 - m) * param.astype(ema.dtype))


# ------------------------------------------------------------------------------------------------- step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, grad_accum_steps: int = 1,
                    ema: EMA | None = None):
  """``step(state, batch) -> (state, metrics)``: fold the step into the rng, average gradients over
  ``grad_accum_steps`` micro-batches (a scan, so memory is one micro-batch), apply AdamW, then (``ema``) move
  the momentum copy in ``extra["ema"]`` towards the new parameters."""

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
    if ema is not None:
      extra = dict(extra, ema=ema.update(extra["ema"], params))
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
                   frozen: PyTree | None = None, ema: EMA | None = None) -> Trainer:
  """Builds the sharded state (params from ``init_fn(rng) -> variables`` or ``init_params``) and the step.

  ``init_fn`` returns flax variables (boxed with logical axes): ``{"params": …, other collections…}``.
  ``frozen``: device arrays the loss reads but never trains (a teacher); passed to the jitted step as an
  argument — never baked into the program as constants, never checkpointed — and to the loss as
  ``loss_fn(params, extra, batch, rng, frozen)``.
  ``ema``: keep a momentum copy of (some of) the params in ``extra["ema"]`` (see :class:`EMA`), started from the
  initial params (after ``init_params``); the loss reads it there and must return it unchanged.
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
  if ema is not None:
    ema_sh = {"params": ema.select(p_sh), "step": replicated(mesh)}
    extra = dict(extra, ema=jax.jit(ema.init, out_shardings=ema_sh)(params))
    extra_sh = dict(extra_sh, ema=ema_sh)
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
    step = make_train_step(loss_fn, tx, grad_accum_steps, ema)
    jitted = jax.jit(step, in_shardings=(shardings, bsh), out_shardings=(shardings, rep), donate_argnums=(0,))
    return Trainer(mesh=mesh, state=state, state_shardings=shardings, step_fn=jitted)

  def step_with_frozen(state, batch, frozen_values):
    bound = lambda p, e, b, r: loss_fn(p, e, b, r, frozen_values)
    return make_train_step(bound, tx, grad_accum_steps, ema)(state, batch)

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


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  losses: list[tuple[int, float]]
  preempted: bool


def itstime(step: int, every: int, total_steps: int, first: bool = False) -> bool:
  """Whether a periodic action runs at ``step`` (1-based): every ``every`` steps, at the last step, and at the
  first step of a run when ``first``."""
  return (every > 0 and step % every == 0) or step == total_steps or first


class ProgressLine:
  """One live console line per stage: ``name  step/total  steps/s  ETA  loss``, rewritten in place on a
  terminal, printed at most every ``every_secs`` otherwise; :meth:`done` prints the stage's one-line summary."""

  def __init__(self, name: str, start: int, total_steps: int, enabled: bool, every_secs: float = 30.0):
    self.name, self.start, self.total = name, start, total_steps
    self.enabled = enabled
    self.tty = enabled and sys.stdout.isatty()
    self.every_secs = every_secs
    self.t0 = self.t_first = time.time()
    self.step_first = start
    self.last_print = 0.0

  def first_step_done(self, step: int) -> None:
    """Rates are measured from the end of the first (compiling) step on."""
    self.t_first, self.step_first = time.time(), step

  def update(self, step: int, loss: float) -> None:
    if not self.enabled:
      return
    now = time.time()
    done = step - self.step_first
    rate = done / (now - self.t_first) if done > 0 and now > self.t_first else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    eta_text = "--" if eta != eta else time.strftime("%H:%M:%S" if eta >= 3600 else "%M:%S", time.gmtime(eta))
    line = (f"{self.name:<16} step {step:>{len(str(self.total))}}/{self.total}  {rate:6.2f} steps/s  "
            f"ETA {eta_text}  loss {loss:.4f}")
    if self.tty:
      print("\r" + line, end="", flush=True)
    elif (rate and now - self.last_print >= self.every_secs) or step == self.total:  # no rate yet: nothing to say
      print(line, flush=True)
      self.last_print = now

  def done(self, step: int, losses: Sequence[tuple[int, float]], preempted: bool) -> None:
    """``losses``: ``(step, loss)`` of the steps run."""
    if not self.enabled:
      return
    if self.tty:
      print(flush=True)
    took = time.time() - self.t0
    what = f"preempted at step {step}" if preempted else f"{step - self.start} steps"
    if losses:
      (s0, l0), (s1, l1) = losses[0], losses[-1]
      what += f", loss {l0:.4f} (step {s0}) -> {l1:.4f} (step {s1})"
    print(f"{self.name}: {what} in {took:.0f}s", flush=True)


class MetricsLog:
  """Step metrics kept on the device and fetched to the host in one transfer at log / save steps (the step never
  waits on the host): the finiteness check, the per-step loss log (``<name>_loss.jsonl``) and the averaged
  scalars written through clu."""

  def __init__(self, name: str, workdir: str, writer, is_main: bool):
    self.name, self.workdir, self.writer = name, workdir, writer
    self.pending: list[tuple[int, Mapping[str, jax.Array]]] = []
    self.losses: list[tuple[int, float]] = []
    self.file = open(os.path.join(workdir, f"{name}_loss.jsonl"), "a", buffering=1) if is_main else None

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self.pending.append((step, metrics))

  def flush(self, last_good_step: int | None) -> dict[str, float] | None:
    """Fetches the pending steps; raises :class:`NonFiniteLoss` at the first non-finite one; writes their mean
    as one TensorBoard point at the last step. Returns the last step's metrics."""
    if not self.pending:
      return None
    fetched = jax.device_get([m for _, m in self.pending])
    steps = [s for s, _ in self.pending]
    self.pending = []
    for step, m in zip(steps, fetched, strict=True):
      loss, gnorm = float(m["loss"]), float(m.get("grad_norm", 0.0))
      if not (np.isfinite(loss) and np.isfinite(gnorm)):
        raise NonFiniteLoss(f"{self.name}: non-finite loss {loss} (grad norm {gnorm}) at step {step}; stopping. "
                            f"The last checkpoint (step {last_good_step}) is intact in {self.workdir}/checkpoints")
      self.losses.append((step, loss))
      if self.file:
        self.file.write(json.dumps({"step": step, "loss": loss}) + "\n")
    mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
    self.writer.write_scalars(steps[-1], mean)
    return {k: float(v) for k, v in fetched[-1].items()}

  def close(self) -> None:
    if self.file:
      self.file.close()


def _restore_or_describe(ck: Checkpointer, trainer: Trainer, data_iter, name: str, workdir: str,
                         is_main: bool) -> tuple[TrainState, int]:
  """The state to start from: the latest checkpoint of ``workdir`` (data iterator restored in place) or the
  fresh one (its parameter overview goes to the log)."""
  from clu import parameter_overview
  if ck.latest_step() is not None:
    start = int(ck.latest_step())
    if is_main:
      print(f"{name}: resuming from step {start} in {workdir}", flush=True)
    return ck.restore(trainer.state, trainer.state_shardings, data_iter), start
  if is_main:
    logging.info("%s: parameter overview\n%s", name,
                 parameter_overview.get_parameter_overview(jax.device_get(trainer.state.params)))
  return trainer.state, 0


def train_loop(trainer: Trainer, data_iter: Iterator[Mapping[str, np.ndarray]], total_steps: int,
               workdir: str, config: ml_collections.ConfigDict, model_config: Mapping[str, Any],
               eval_fn: Callable[[TrainState, int], None] | None = None, name: str = "train") -> LoopResult:
  """Runs ``total_steps`` steps with resume, periodic checkpoints, clu metrics, a progress line and SIGTERM
  handling. Metrics reach the host only every ``log_every`` steps and before a checkpoint or an evaluation, so
  only states whose losses and gradients were all finite are saved or evaluated."""
  from clu import metric_writers, periodic_actions

  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  ck = Checkpointer(workdir, keep=config.get("keep_checkpoints", 3), save_every=config.get("checkpoint_every", 1000))
  state, start = _restore_or_describe(ck, trainer, data_iter, name, workdir, is_main)
  writer = metric_writers.create_default_writer(os.path.join(workdir, "tb"), just_logging=not is_main,
                                                asynchronous=False)
  writer.write_hparams(_flat_config(config))
  log_every = int(config.get("log_every", 10))
  eval_every = int(config.get("eval_every", 10**9))
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=None,
                                           every_steps=log_every)
  log = MetricsLog(name, workdir, writer, is_main)
  progress = ProgressLine(name, start, total_steps, enabled=is_main)
  preempted, step, last = False, start, None
  try:
    with Preemption() as pre:
      for step in range(start + 1, total_steps + 1):
        state, metrics = trainer.step_fn(state, global_batch(next(data_iter), trainer.mesh))
        log.add(step, metrics)
        report(step, t=time.time())
        if step == start + 1:
          jax.block_until_ready(metrics)
          progress.first_step_done(step)
          logging.info("%s: first step (compile included) took %.1fs", name, time.time() - progress.t0)
        evaluate = eval_fn is not None and step % eval_every == 0
        save = step % ck.save_every == 0 or pre.requested or evaluate
        if itstime(step, log_every, total_steps) or save:
          last = log.flush(ck.latest_step()) or last
          progress.update(step, last["loss"])
        if pre.requested and not save:  # SIGTERM arrived while this step's metrics were being fetched
          save = True
          last = log.flush(ck.latest_step()) or last
        if save:
          ck.save(step, state, data_iter, model_config, force=pre.requested)
        if evaluate:
          eval_fn(state, step)
        if pre.requested:
          logging.warning("%s: preempted at step %d; checkpoint saved.", name, step)
          preempted = True
          break
      last = log.flush(ck.latest_step()) or last
    if not preempted and total_steps > start:
      if ck.latest_step() != total_steps:
        ck.save(total_steps, state, data_iter, model_config, force=True)
      if eval_fn is not None and total_steps % eval_every != 0:
        eval_fn(state, total_steps)
  finally:
    writer.flush()
    log.close()
    ck.close()
  progress.done(step, log.losses, preempted)
  return LoopResult(state=state, losses=log.losses, preempted=preempted)


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
