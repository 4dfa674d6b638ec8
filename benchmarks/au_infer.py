r"""AU inference throughput of the au_occl student (``maejax.models.au_model.AUModel`` as the AU trainer builds
it: ViT encoder → latent→AU transform → ME-GraphAU head), all patch tokens vs a fraction dropped through
``ids_keep`` (occluded patches left out of the encoder input, DESIGN.md §5).

  python benchmarks/au_infer.py                   # :bp4d student "kd": ViT-B/16, 224 px, batch 32, 12 AUs, C 512
  python benchmarks/au_infer.py --config=configs/au_occl.py:smoke --batch=4 --steps=3   # seconds, CPU check

The model is ``trainers.au.student_models(config)[--student]``, so its hyper-parameters are the config's;
inference mode (BatchNorm running statistics), fp32 unless ``--dtype``; parameters randomly initialised (the
cost does not depend on their values). Kept tokens are a random subset per image, in patch order, as
``keep_least_occluded`` returns them.
"""

from __future__ import annotations

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from maejax.data import pipeline
from maejax.trainers import au

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", "configs/au_occl.py:bp4d", "au_occl config (file[:variant])")
flags.DEFINE_string("student", "kd", "which student of config.students")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_list("keep", ["1.0", "0.5"], "fractions of patch tokens the encoder sees")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "computation dtype")
flags.DEFINE_integer("steps", 5, "timed steps per case (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed steps per case after compilation")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  students = au.student_models(config)
  if FLAGS.student not in students:
    raise ValueError(f"--student: {FLAGS.student!r} is not in config.students {sorted(students)}")
  model = students[FLAGS.student][0].clone(dtype=jnp.dtype(FLAGS.dtype))
  size = model.img_size
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.batch, size, size, 3), dtype=np.uint8)
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)
  variables = flax.core.unfreeze(nn.meta.unbox(variables))
  forward = jax.jit(lambda v, x, ids: model.apply(v, pipeline.normalize(x), ids, train=False).head.probs)
  x = jnp.asarray(images)
  num_patches = model.num_patches
  cases = []
  for frac in (float(f) for f in FLAGS.keep):
    k = int(round(num_patches * frac))
    ids = None
    if k < num_patches:
      ids = jnp.asarray(np.sort(np.argsort(rng.random((FLAGS.batch, num_patches)), axis=1)[:, :k], axis=1))
    compiled, compile_s = bc.timed(lambda ids=ids: forward.lower(variables, x, ids).compile())
    step = lambda c=compiled, ids=ids: jax.block_until_ready(c(variables, x, ids))
    cases.append(bc.Case(f"student {FLAGS.student!r}, {k}/{num_patches} tokens", step, FLAGS.batch,
                         compile_s=compile_s, memory_gib=bc.xla_memory_gib(compiled),
                         flops=bc.xla_flops(compiled)))
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)

  print()
  print(bc.machine_info())
  print(f"config: {config.stage} student {FLAGS.student!r}: ViT width {model.width} depth {model.depth} patch "
        f"{model.patch_size}, {size}px, transform depth {model.transform_depth}, head {model.head} stage "
        f"{model.stage} N={model.num_aus} C={model.channels} K={model.top_k} pool {model.head_pool}; batch "
        f"{FLAGS.batch}, {FLAGS.dtype}, inference; {FLAGS.steps} timed steps per case after {FLAGS.warmup} "
        "warm-up, interleaved")
  print(bc.case_table(cases, "AU inference (forward only)"))
  for c in cases:
    print(f"  {c.name}: XLA flops/step {bc.fmt(c.flops, '.3e')}")
  if len(cases) > 1:
    r = cases[0].median / cases[-1].median
    print(f"speed-up from dropping tokens ({cases[-1].name.split(', ')[-1]}): {r:.2f}x")


if __name__ == "__main__":
  app.run(main)
