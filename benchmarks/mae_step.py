r"""MAE train step (forward + backward + AdamW): maejax vs HF ``ViTMAEForPreTraining`` (PyTorch), and the
masking speed-up (encoder on visible tokens only vs mask tokens through the encoder).

  python benchmarks/mae_step.py                    # ViT-B/16, 224 px, batch 8, mask .75, 8×512 decoder
  python benchmarks/mae_step.py --nohf --nono_skip --profile_steps=2  # where the maejax step spends its time
  python benchmarks/mae_step.py --size=mu --img_size=32 --patch_size=8 --batch=4 --decoder_width=32 \
      --decoder_depth=1 --decoder_heads=2 --steps=3  # seconds, to check the script

All rows are timed in one process, interleaved step by step. Both models have the same configuration:
LayerNorm eps 1e-6, exact GELU, qkv bias, norm-pix loss, AdamW β (0.9, 0.95) wd 0.05 (maejax exempts biases/LN from
decay as the official recipe does; the cost is the same). PyTorch gets ``torch.set_num_threads(cores)``.
"""

from __future__ import annotations

import os

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD
from maejax.models.mae import MAE, MAEConfig, count_params
from maejax.models.vit import vit_size
from maejax.trainers.mae import mae_loss_fn

FLAGS = flags.FLAGS
flags.DEFINE_string("size", "B", "encoder size (mu, Ti, S, B, L, H)")
flags.DEFINE_integer("img_size", 224, "image side")
flags.DEFINE_integer("patch_size", 16, "patch side")
flags.DEFINE_integer("batch", 8, "batch size")
flags.DEFINE_float("mask_ratio", 0.75, "masking ratio")
flags.DEFINE_integer("decoder_width", 512, "decoder width")
flags.DEFINE_integer("decoder_depth", 8, "decoder blocks")
flags.DEFINE_integer("decoder_heads", 16, "decoder heads")
flags.DEFINE_integer("steps", 5, "timed steps per case (median reported)")
flags.DEFINE_integer("warmup", 1, "untimed steps per case after compilation")
flags.DEFINE_bool("hf", True, "time HF ViTMAEForPreTraining (PyTorch)")
flags.DEFINE_bool("no_skip", True, "time maejax with mask tokens through the encoder")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0 = the number of cores")
flags.DEFINE_string("attn_implementation", "sdpa", "HF attention implementation (sdpa or eager)")
flags.DEFINE_integer("profile_steps", 0, "after the table, trace this many steps of each maejax case with "
                     "jax.profiler and print where the time goes (common.profile_case)")
flags.DEFINE_string("profile_dir", "/tmp/maejax_profile", "where the traces go (one sub-folder per case)")


def maejax_model(**kw) -> MAE:
  return MAEConfig.from_config(dict(
      size=FLAGS.size, img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, decoder_width=FLAGS.decoder_width,
      decoder_depth=FLAGS.decoder_depth, decoder_heads=FLAGS.decoder_heads, mask_ratio=FLAGS.mask_ratio,
      norm_pix_loss=True)).build(**kw)


def maejax_case(name: str, model: MAE, images: np.ndarray) -> bc.Case:
  dummy = jnp.zeros((1,) + images.shape[1:], jnp.float32)
  init_fn = lambda r: model.init({"params": r, "masking": r}, dummy)
  case = bc.jax_train_case(name, init_fn, mae_loss_fn(model), {"image": images})
  n = count_params(jax.eval_shape(lambda: init_fn(jax.random.PRNGKey(0)))["params"])
  case.notes = f"{n / 1e6:.1f} M params"
  return case


def hf_case(images: np.ndarray, threads: int) -> bc.Case:
  import torch
  import transformers
  torch.set_num_threads(threads)
  size = vit_size(FLAGS.size)
  config = transformers.ViTMAEConfig(
      hidden_size=size["width"], num_hidden_layers=size["depth"], num_attention_heads=size["num_heads"],
      intermediate_size=4 * size["width"], hidden_act="gelu", hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6, image_size=FLAGS.img_size,
      patch_size=FLAGS.patch_size, num_channels=3, qkv_bias=True, decoder_hidden_size=FLAGS.decoder_width,
      decoder_num_hidden_layers=FLAGS.decoder_depth, decoder_num_attention_heads=FLAGS.decoder_heads,
      decoder_intermediate_size=4 * FLAGS.decoder_width, mask_ratio=FLAGS.mask_ratio, norm_pix_loss=True,
      attn_implementation=FLAGS.attn_implementation)
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4 * FLAGS.batch / 256, betas=(0.9, 0.95),
                          weight_decay=0.05)
  x = ((images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # NCHW

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(pixel_values=x).loss
    loss.backward()
    opt.step()
    return loss.item()

  n = sum(p.numel() for p in model.parameters())
  return bc.Case(f"HF ViTMAE (torch {torch.__version__}, {FLAGS.attn_implementation})", step, FLAGS.batch,
                 notes=f"{n / 1e6:.1f} M params, {threads} threads")


def ratio_row(name: str, slow: bc.Case, fast: bc.Case, target: float) -> list[str]:
  """Median and best-step ratios; the FLOP ratio is what equal efficiency would give."""
  r = slow.median / fast.median
  flops = f"{slow.flops / fast.flops:.2f}x" if slow.flops and fast.flops else "-"
  return [name, f"{r:.2f}x", f"{min(slow.times) / min(fast.times):.2f}x",
          f"{slow.cpu_median / fast.cpu_median:.2f}x", flops, bc.verdict(r, target)]


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  cores = bc.num_cores()
  threads = FLAGS.torch_threads or cores
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.batch, FLAGS.img_size, FLAGS.img_size, 3),
                                             dtype=np.uint8)
  cases = [maejax_case("maejax (encoder on visible tokens)", maejax_model(), images)]
  print(f"compiled {cases[0].name} in {cases[0].compile_s:.1f}s", flush=True)
  if FLAGS.no_skip:
    cases.append(maejax_case("maejax, mask tokens through encoder", maejax_model(mask_token_in_encoder=True),
                             images))
    print(f"compiled {cases[-1].name} in {cases[-1].compile_s:.1f}s", flush=True)
  if FLAGS.hf:
    cases.append(hf_case(images, threads))
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)

  print()
  print(bc.machine_info([f"torch threads: {threads}" if FLAGS.hf else "torch: not run"]))
  print(f"config: ViT-{FLAGS.size}/{FLAGS.patch_size} {FLAGS.img_size}px batch {FLAGS.batch} mask "
        f"{FLAGS.mask_ratio} decoder {FLAGS.decoder_depth}x{FLAGS.decoder_width} "
        f"({FLAGS.decoder_heads} heads) "
        f"norm-pix, fp32; {FLAGS.steps} timed steps per case after {FLAGS.warmup} warm-up, interleaved")
  print(bc.case_table(cases, "MAE train step (forward + backward + AdamW)"))
  for c in cases:
    print(f"  {c.name}: {c.notes}; XLA flops/step {bc.fmt(c.flops, '.3e')}")
  base = cases[0]
  print()
  rows = []
  if FLAGS.hf:
    rows.append(ratio_row("HF step time / maejax step time", cases[-1], base, 1.5))
  if FLAGS.no_skip:
    rows.append(ratio_row("masking speed-up (mask tokens in encoder / skipped)", cases[1], base, 3.0))
  if rows:
    print(bc.table(["ratio", "median", "min", "CPU time", "XLA flops", "target (on the median)"], rows))
  if FLAGS.profile_steps:
    for i, c in enumerate(x for x in cases if x.compiled is not None):
      print()
      print(bc.profile_case(c, FLAGS.profile_steps, os.path.join(FLAGS.profile_dir, f"case{i}")), flush=True)

if __name__ == "__main__":
  app.run(main)
