r"""AU inference throughput: ViT encoder + ME-GraphAU head (``maejax.models.au_graph.GraphAUHead``) forward,
all patch tokens vs a fraction of them dropped through ``ids_keep`` (occluded patches left out, DESIGN.md §5).

  python benchmarks/au_infer.py                   # ViT-B/16, 224 px, batch 32, 12 AUs, stage-2 head, 50 % kept
  python benchmarks/au_infer.py --size=mu --img_size=32 --patch_size=8 --batch=4 --channels=32 --steps=3

Inference mode (BatchNorm running statistics), fp32 unless ``--dtype``; parameters randomly initialised (the
cost does not depend on their values). The head sees the encoder's final-normed patch tokens (cls dropped).
"""

from __future__ import annotations

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax.data import pipeline
from maejax.models.au_graph import GraphAUHead
from maejax.models.vit import ViT, vit_size

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "B", "encoder size")
flags.DEFINE_integer("img_size", 224, "image side")
flags.DEFINE_integer("patch_size", 16, "patch side")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_integer("num_aus", 12, "AUs (12 BP4D, 8 DISFA)")
flags.DEFINE_integer("top_k", 4, "top-K of the FGG graph")
flags.DEFINE_integer("stage", 2, "head stage (1 = AFG + FGG, 2 = MEFL)")
flags.DEFINE_integer("channels", 512, "head width C")
flags.DEFINE_list("keep", ["1.0", "0.5"], "fractions of patch tokens the encoder sees")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "computation dtype")
flags.DEFINE_integer("steps", 5, "timed steps per case (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed steps per case after compilation")


class AUModel(nn.Module):
  encoder: ViT
  head: GraphAUHead

  def __call__(self, images, ids_keep=None):
    tokens = self.encoder(images, ids_keep).tokens[:, 1:]  # (B, K, D) patch tokens
    return self.head(tokens, train=False).probs  # (B, N)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  dtype = jnp.dtype(FLAGS.dtype)
  encoder = ViT(FLAGS.img_size, FLAGS.patch_size, **vit_size(FLAGS.size), dtype=dtype)
  model = AUModel(encoder, GraphAUHead(FLAGS.num_aus, FLAGS.channels, FLAGS.top_k, FLAGS.stage, dtype))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.batch, FLAGS.img_size, FLAGS.img_size, 3), dtype=np.uint8)
  dummy = jnp.zeros((1, FLAGS.img_size, FLAGS.img_size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), dummy)
  variables = flax.core.unfreeze(nn.meta.unbox(variables))
  forward = jax.jit(lambda v, x, ids: model.apply(v, pipeline.normalize(x), ids))
  x = jnp.asarray(images)
  num_patches = encoder.num_patches
  cases = []
  for frac in (float(f) for f in FLAGS.keep):
    k = int(round(num_patches * frac))
    ids = None
    if k < num_patches:  # a random subset per image, in patch order
      ids = jnp.asarray(np.sort(np.argsort(rng.random((FLAGS.batch, num_patches)), axis=1)[:, :k], axis=1))
    compiled, compile_s = bc.timed(lambda ids=ids: forward.lower(variables, x, ids).compile())
    step = lambda c=compiled, ids=ids: jax.block_until_ready(c(variables, x, ids))
    cases.append(bc.Case(f"encoder + GraphAUHead, {k}/{num_patches} tokens", step, FLAGS.batch,
                         compile_s=compile_s, memory_gib=bc.xla_memory_gib(compiled),
                         flops=bc.xla_flops(compiled)))
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)

  print()
  print(bc.machine_info())
  print(f"config: ViT-{FLAGS.size}/{FLAGS.patch_size} {FLAGS.img_size}px batch {FLAGS.batch}, GraphAUHead "
        f"stage {FLAGS.stage} N={FLAGS.num_aus} C={FLAGS.channels} K={FLAGS.top_k}, {FLAGS.dtype}, inference; "
        f"{FLAGS.steps} timed steps per case after {FLAGS.warmup} warm-up, interleaved")
  print(bc.case_table(cases, "AU inference (forward only)"))
  for c in cases:
    print(f"  {c.name}: XLA flops/step {bc.fmt(c.flops, '.3e')}")
  if len(cases) > 1:
    r = cases[0].median / cases[-1].median
    print(f"speed-up from dropping tokens ({cases[-1].name.split(', ')[-1]}): {r:.2f}x")


if __name__ == "__main__":
  app.run(main)
