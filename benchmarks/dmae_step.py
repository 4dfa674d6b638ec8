r"""DMAE train step cost: plain MAE step (ViT-B student) vs DMAE with a ViT-L teacher truncated at the aligned
block (the paper's saving) vs the full ViT-L teacher + decoder (what the released PyTorch code runs).

  python benchmarks/dmae_step.py                 # ViT-B student, ViT-L teacher, 224 px, batch 8, pairs 8:17
  python benchmarks/dmae_step.py --student=mu --teacher=mu --pairs=0:1 --img_size=32 --patch_size=8 \
      --batch=4 --decoder_width=32 --decoder_depth=1 --decoder_heads=2 --steps=3   # to check the script

The teacher's parameters are RANDOMLY INITIALISED (the cost of a step does not depend on their values). They
live in the train state's ``extra`` (frozen, no optimizer state, passed to the jitted step as an argument,
not baked into the executable as constants). In ``full`` mode the teacher's pixel loss is returned in the
step's metrics (``teacher_extra``), so XLA cannot drop the teacher's last blocks and decoder.
"""

from __future__ import annotations

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax.data import pipeline
from maejax.models.dmae import DMAEStudent, dmae_loss
from maejax.models.mae import MAE, MAEConfig
from maejax.trainers.mae import mae_loss_fn

FLAGS = flags.FLAGS
flags.DEFINE_string("student", "B", "student encoder size")
flags.DEFINE_string("teacher", "L", "teacher encoder size")
flags.DEFINE_string("pairs", "8:17", "aligned (student block:teacher block) pairs, 0-based, comma separated")
flags.DEFINE_integer("img_size", 224, "image side")
flags.DEFINE_integer("patch_size", 16, "patch side")
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_float("mask_ratio", 0.75, "masking ratio")
flags.DEFINE_integer("decoder_width", 512, "decoder width (student and teacher)")
flags.DEFINE_integer("decoder_depth", 8, "decoder blocks (student and teacher)")
flags.DEFINE_integer("decoder_heads", 16, "decoder heads (student and teacher)")
flags.DEFINE_integer("steps", 5, "timed steps per case (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed steps per case after compilation")
flags.DEFINE_bool("full", True, "also time the full teacher (all blocks + decoder)")


def mae(size: str) -> MAE:
  return MAEConfig.from_config(dict(
      size=size, img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, decoder_width=FLAGS.decoder_width,
      decoder_depth=FLAGS.decoder_depth, decoder_heads=FLAGS.decoder_heads, mask_ratio=FLAGS.mask_ratio,
      norm_pix_loss=True)).build()


def parse_pairs(text: str) -> tuple[tuple[int, int], ...]:
  try:
    pairs = tuple((int(a), int(b)) for a, b in (p.split(":") for p in text.split(",") if p))
  except ValueError:
    raise ValueError(f"--pairs must look like '8:17' or '4:8,8:17', got {text!r}") from None
  if not pairs:
    raise ValueError("--pairs is empty")
  return pairs


def dmae_loss_fn(student: DMAEStudent, teacher: MAE, mode: str):
  """A ``trainers.common`` loss function; the frozen teacher's params are ``extra["teacher"]``."""

  def loss_fn(params, extra, batch, rng):
    images = pipeline.normalize(batch["image"])
    rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
    total, metrics = dmae_loss(student, params, teacher, extra["teacher"], images, rngs, teacher_mode=mode)
    return total, (metrics, extra)  # metrics carry "teacher_extra" out of the step

  return loss_fn


def ratio_row(name: str, a: bc.Case, b: bc.Case, verdict: str) -> list[str]:
  """Median and best-step time ratios; the FLOP ratio is what equal efficiency would give."""
  flops = f"{a.flops / b.flops:.2f}x" if a.flops and b.flops else "-"
  return [name, f"{a.median / b.median:.2f}x", f"{min(a.times) / min(b.times):.2f}x",
          f"{a.cpu_median / b.cpu_median:.2f}x", flops, verdict]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  pairs = parse_pairs(FLAGS.pairs)
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.img_size, FLAGS.img_size, 3),
                                             dtype=np.uint8)
  dummy = jnp.zeros((1, FLAGS.img_size, FLAGS.img_size, 3), jnp.float32)
  plain = mae(FLAGS.student)
  teacher = mae(FLAGS.teacher)
  student = DMAEStudent(plain, teacher_width=teacher.width, pairs=pairs)

  def dmae_init(r):
    r_s, r_t = jax.random.split(r)
    return {"params": student.init({"params": r_s, "masking": r_s}, dummy)["params"],
            "teacher": teacher.init({"params": r_t, "masking": r_t}, dummy)["params"]}

  cases = [bc.jax_train_case(f"plain MAE, ViT-{FLAGS.student} student",
                             lambda r: plain.init({"params": r, "masking": r}, dummy), mae_loss_fn(plain),
                             {"image": images})]
  print(f"compiled {cases[-1].name} in {cases[-1].compile_s:.1f}s", flush=True)
  modes = ("truncated", "full") if FLAGS.full else ("truncated",)
  deepest = max(t for _, t in pairs)
  for mode in modes:
    what = (f"blocks 0..{deepest} on visible tokens" if mode == "truncated"
            else f"all {teacher.depth} blocks + decoder")
    cases.append(bc.jax_train_case(f"DMAE, ViT-{FLAGS.teacher} teacher {mode} ({what})", dmae_init,
                                   dmae_loss_fn(student, teacher, mode), {"image": images}))
    print(f"compiled {cases[-1].name} in {cases[-1].compile_s:.1f}s", flush=True)
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)

  print()
  print(bc.machine_info())
  print(f"config: student ViT-{FLAGS.student}/{FLAGS.patch_size}, teacher ViT-{FLAGS.teacher}/"
        f"{FLAGS.patch_size} (random init), pairs {pairs}, {FLAGS.img_size}px batch {FLAGS.batch} mask "
        f"{FLAGS.mask_ratio}, decoders {FLAGS.decoder_depth}x{FLAGS.decoder_width}, fp32, AdamW; "
        f"{FLAGS.steps} timed steps per case after {FLAGS.warmup} warm-up, interleaved")
  print(bc.case_table(cases, "DMAE train step (forward + backward + AdamW)"))
  for c in cases:
    print(f"  {c.name}: XLA flops/step {bc.fmt(c.flops, '.3e')}")
  print()
  r = cases[1].median / cases[0].median
  rows = [ratio_row("DMAE (truncated teacher) / plain MAE", cases[1], cases[0],
                    bc.verdict(r, 1.45, higher_is_better=False))]
  if FLAGS.full:
    r = cases[2].median / cases[1].median
    rows.append(ratio_row("DMAE full teacher / truncated teacher", cases[2], cases[1], bc.verdict(r, 1.2)))
  print(bc.table(["ratio", "median", "min", "CPU time", "XLA flops", "target (on the median)"], rows))

if __name__ == "__main__":
  app.run(main)
