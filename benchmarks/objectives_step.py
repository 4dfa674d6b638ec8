r"""Train step (forward + backward + AdamW + EMA where there is one) of every pretraining objective against the
plain MAE step: BootMAE, SdAE, SD-MAE, MCM (``config.model.objective``).

  python benchmarks/objectives_step.py                 # the tiny CPU configs (configs/mae_pretrain.py:<objective>)
  python benchmarks/objectives_step.py --vit_b --batch=8 --steps=3   # ViT-B/16 at 224 px (paper-size objectives)

All cases are timed in one process, interleaved step by step (benchmarks/common.py), on one device, each on a
fixed batch of the size and kind its objective reads (uint8 images; BootMAE's block-mask noise; MCM's depth). The
FLOP ratio is XLA's ``cost_analysis`` of each compiled step over the MAE step's. Compute dtype is float32.
"""

from __future__ import annotations

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax import sharding
from maejax.config_utils import load_sibling
from maejax.data import pipeline
from maejax.models.mae import count_params
from maejax.trainers import mae as mae_stage
from maejax.trainers import objectives

FLAGS = flags.FLAGS
flags.DEFINE_bool("vit_b", False, "ViT-B/16 at 224 px (the objectives' paper sizes) instead of the tiny configs")
flags.DEFINE_integer("batch", 0, "batch size (0 = the tiny config's 64, or 8 with --vit_b)")
flags.DEFINE_integer("steps", 10, "timed steps per case (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps per case after compilation")
flags.DEFINE_list("objectives", list(objectives.OBJECTIVES), "objectives to time (mae is the reference)")


def config_of(objective: str):
  mp = load_sibling(f"{bc.ROOT}/configs/mae_pretrain.py", "mae_pretrain")
  size = "vit_b" if FLAGS.vit_b else "tiny"
  c = mp.make(size)
  if objective != "mae":
    mp.set_objective(c, objective, size)
  c.model.dtype = "float32"
  c.batch_size = FLAGS.batch or (8 if FLAGS.vit_b else 64)
  return c


def batch_of(c, objective: str) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b, s = c.batch_size, c.model.img_size
  batch = {"image": rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)}
  if objective == "bootmae" and c.bootmae.block_masking:
    gen = pipeline.block_mask_noise(s // c.model.patch_size, c.bootmae.block_mask_fraction)
    batch["mask_noise"] = np.stack([gen({}, rng)["mask_noise"] for _ in range(b)])
  if objective == "mcm":
    batch["depth"] = rng.integers(0, 256, (b, s, s, 1), dtype=np.uint8)
  return batch


def case(objective: str) -> bc.Case:
  c = config_of(objective)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  if objective == "mae":
    model = mae_stage.build_model(c.model)
    dummy = jnp.zeros((1, c.model.img_size, c.model.img_size, 3), jnp.float32)
    init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
    obj = objectives.Objective(init_fn=init_fn, loss_fn=mae_stage.mae_loss_fn(model), ema=None, data=None,
                               saved_config={})
  else:
    obj = objectives.build(c, with_data=False)
  trainer = objectives.create(c, obj, mesh)
  gbatch = sharding.global_batch(batch_of(c, objective), mesh)
  compiled, compile_s = bc.timed(lambda: trainer.step_fn.lower(trainer.state, gbatch).compile())
  holder = {"state": trainer.state}

  def step():
    state, metrics = compiled(holder["state"], gbatch)
    holder["state"] = state
    jax.block_until_ready((state, metrics))
    return metrics

  out = bc.Case(objective, step, c.batch_size, compile_s=compile_s, memory_gib=bc.xla_memory_gib(compiled),
                flops=bc.xla_flops(compiled), compiled=compiled)
  n = count_params(trainer.state.params)
  out.notes = f"{n / 1e6:.2f} M params" + (", EMA encoder" if obj.ema else "")
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  names = ["mae"] + [o for o in FLAGS.objectives if o != "mae"]
  cases = []
  for name in names:
    cases.append(case(name))
    print(f"compiled {name} in {cases[-1].compile_s:.1f}s", flush=True)
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)
  print()
  print(bc.machine_info())
  size = "ViT-B/16 224 px" if FLAGS.vit_b else "tiny (configs/mae_pretrain.py:<objective>, 64 px, patch 8)"
  print(f"config: {size}, batch {cases[0].items_per_step}, float32, one device")
  print(bc.case_table(cases, "Train step per objective (forward + backward + AdamW [+ EMA])"))
  ref = cases[0]
  rows = []
  for c in cases:
    flops = f"{c.flops / ref.flops:.2f}x" if c.flops and ref.flops else "-"
    rows.append([c.name, f"{c.median / ref.median:.2f}x", f"{c.cpu_median / ref.cpu_median:.2f}x", flops,
                 bc.fmt(c.flops, ".3e"), c.notes])
  print()
  print(bc.table(["objective", "step time / MAE", "CPU time / MAE", "XLA flops / MAE", "XLA flops/step", "notes"],
                 rows))


if __name__ == "__main__":
  app.run(main)
