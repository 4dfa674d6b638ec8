r"""MAE pretraining throughput and MFU on one accelerator: ViT-B/16 and ViT-L/16, bf16 compute, fp32 params.

  python benchmarks/gpu_mfu.py                    # ViT-B batch 256, ViT-L batch 128, 224 px (< 5 min on an H100)
  python benchmarks/gpu_mfu.py --models=L --batch_l=256 --remat
  python benchmarks/gpu_mfu.py --tiny             # CPU-sized check of the script (seconds)
  python benchmarks/gpu_mfu.py --attention=xla,cudnn --profile_steps=3 --check_attention

``--attention`` takes a list of the model's attention implementations (``model.attention``, see
``models.vit.attention``): every (model, attention) pair is one case of the same interleaved table. ``einsum`` is
the explicit-softmax form (the CPU default), ``xla`` is ``jax.nn.dot_product_attention(implementation="xla")``,
``cudnn`` is cuDNN's fused attention through ``models.vit.padded_attention`` (sequence zero-padded to a multiple
of 8, padded keys masked by length, because cuDNN's fused attention rejects the odd ViT lengths 50 and 197 in
training). ``--check_attention`` first compares each implementation's bf16 output and gradients with a float32
XLA reference on the MAE encoder/decoder shapes. ``--profile_steps`` traces that many steps of every case with
``jax.profiler`` and prints where the device time goes (``common.profile_case``).

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s of the device. Model FLOPs are analytic (see
``mae_step_flops``): encoder on the visible tokens (1 + K, K = int(L·(1 − r))) and decoder on all 1 + L tokens,
matmuls (2·m·n·k) + attention scores and weighted sum (4·T²·D per block), patch embedding over all L patches
(maejax embeds before masking), decoder embed and prediction; × 3 for forward + backward (the usual convention:
it slightly overstates the patch embedding, whose input needs no gradient). LayerNorm, GELU, softmax, loss and
AdamW are not counted. XLA's own cost analysis of the compiled step is printed for comparison; it counts every
op, but fused attention kernels (custom calls, e.g. cuDNN) may be missing from it.
"""

from __future__ import annotations

import functools
import itertools
import os

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax.models.mae import MAEConfig, num_kept
from maejax.models.vit import ATTENTION_IMPLEMENTATIONS, attention, vit_size
from maejax.trainers.mae import mae_loss_fn

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["B", "L"], "encoder sizes to run")
flags.DEFINE_integer("batch_b", 256, "batch size for ViT-B")
flags.DEFINE_integer("batch_l", 128, "batch size for ViT-L")
flags.DEFINE_integer("batch", 0, "batch size for every model (overrides --batch_b / --batch_l)")
flags.DEFINE_integer("img_size", 224, "image side")
flags.DEFINE_integer("patch_size", 16, "patch side")
flags.DEFINE_float("mask_ratio", 0.75, "masking ratio")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "computation dtype (params stay float32)")
flags.DEFINE_bool("remat", False, "rematerialise blocks (less memory, ~1/3 more compute, not counted in MFU)")
flags.DEFINE_integer("steps", 10, "timed steps per model (median reported)")
flags.DEFINE_integer("warmup", 2, "untimed steps per model after compilation")
flags.DEFINE_list("attention", ["xla"], f"attention implementations to compare, from {ATTENTION_IMPLEMENTATIONS}")
ATTENTION_ALIASES = {"cudnn_pad": "cudnn"}  # the name used by the recorded commands of the READMEs
flags.DEFINE_integer("profile_steps", 0, "trace this many steps of every case and print the device-time split")
flags.DEFINE_string("profile_dir", "/tmp/maejax_profile", "where the traces go (one sub-folder per case)")
flags.DEFINE_bool("check_attention", False, "compare attention implementations with a float32 reference first")
flags.DEFINE_bool("tiny", False, "CPU-sized check: a 'mu' ViT at 32 px, batch 4, 1×32 decoder")

# Peak dense bf16 FLOP/s per chip, matched against jax's device_kind (first match wins).
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
)


def peak_flops(device_kind: str) -> float | None:
  for key, value in PEAK_BF16:
    if key.lower() in device_kind.lower():
      return value
  return None


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """Forward FLOPs of one pre-norm transformer block per sample: qkv + out (4·D²) and MLP (2·r·D²) matmuls,
  and attention scores + weighted sum (2 · 2·T²·D)."""
  matmul = 2 * tokens * (4 + 2 * mlp_ratio) * width**2
  attention = 4 * tokens**2 * width
  return matmul + attention


def mae_step_flops(size: str, img_size: int, patch_size: int, mask_ratio: float, decoder_width: int,
                   decoder_depth: int, batch: int) -> float:
  """Model FLOPs of one MAE train step (forward + backward = 3 × forward), see the module docstring."""
  s = vit_size(size)
  d, dd = s["width"], decoder_width
  patches = (img_size // patch_size) ** 2
  patch_dim = patch_size**2 * 3
  t_enc, t_dec = 1 + num_kept(patches, mask_ratio), 1 + patches
  encoder = 2 * patches * patch_dim * d + s["depth"] * block_flops(t_enc, d)
  decoder = 2 * t_enc * d * dd + decoder_depth * block_flops(t_dec, dd) + 2 * t_dec * dd * patch_dim
  return 3.0 * batch * (encoder + decoder)


def check_attention(names, shapes, dtype) -> None:
  """Relative error ‖out − ref‖/‖ref‖ of each implementation's output and q/k/v gradients vs float32 XLA."""
  ref_fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
  rows = []
  for b, t, h, d in shapes:
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v, ct = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys)
    def value_and_grads(fn, dt, q=q, k=k, v=v, ct=ct):
      def cast_fn(q32, k32, v32):
        return fn(q32.astype(dt), k32.astype(dt), v32.astype(dt)).astype(jnp.float32)
      out, vjp = jax.vjp(cast_fn, q, k, v)
      return (out, *vjp(ct))
    ref = jax.jit(lambda: value_and_grads(ref_fn, jnp.float32))()
    for name in names:
      try:
        got = jax.jit(lambda n=name: value_and_grads(functools.partial(attention, implementation=n), dtype))()
        errs = [float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r)) for a, r in zip(got, ref, strict=True)]
        finite = all(bool(jnp.isfinite(a).all()) for a in got)
        rows.append([f"{b}x{t}x{h}x{d}", name, *(f"{e:.2e}" for e in errs), str(finite)])
      except Exception as e:  # noqa: BLE001 - report and go on: the point is to see which kernels run
        rows.append([f"{b}x{t}x{h}x{d}", name, f"FAILED: {type(e).__name__}: {str(e)[:80]}", "", "", "", ""])
  print(bc.table(["B×T×H×Dh", "attention", "out", "dq", "dk", "dv", "finite"], rows,
                 f"attention vs float32 XLA reference, computed in {jnp.dtype(dtype).name} (relative L2 error)"))
  print(flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.tiny:
    sizes, img, patch, dec = ["mu"], 32, 8, (32, 1, 2)
    batches = {"mu": FLAGS.batch or 4}
  else:
    sizes, img, patch, dec = FLAGS.models, FLAGS.img_size, FLAGS.patch_size, (512, 8, 16)
    batches = {s: FLAGS.batch or {"B": FLAGS.batch_b, "L": FLAGS.batch_l}.get(s, FLAGS.batch_b) for s in sizes}
  dtype = jnp.dtype(FLAGS.dtype)
  attentions = [ATTENTION_ALIASES.get(a, a) for a in FLAGS.attention]
  for name in attentions:
    if name not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"unknown --attention {name!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
  if FLAGS.check_attention:
    seq = (img // patch) ** 2
    shapes = [(8, 1 + num_kept(seq, FLAGS.mask_ratio), 12, 64), (8, 1 + seq, 16, 32)]
    check_attention(attentions, shapes, dtype)
  kind = jax.devices()[0].device_kind
  peak = peak_flops(kind)
  cases, model_flops = [], {}
  dummy = jnp.zeros((1, img, img, 3), jnp.float32)
  failed = []
  for size, attn in itertools.product(sizes, attentions):
    model = MAEConfig.from_config(dict(
        size=size, img_size=img, patch_size=patch, decoder_width=dec[0], decoder_depth=dec[1],
        decoder_heads=dec[2], mask_ratio=FLAGS.mask_ratio, norm_pix_loss=True, dtype=FLAGS.dtype,
        remat=FLAGS.remat, attention=attn)).build()
    b = batches[size]
    images = np.random.default_rng(0).integers(0, 256, (b, img, img, 3), dtype=np.uint8)
    name = f"ViT-{size}/{patch} MAE, batch {b}, attention {attn}"
    try:
      case = bc.jax_train_case(name, lambda r, m=model: m.init({"params": r, "masking": r}, dummy),
                               mae_loss_fn(model), {"image": images})
    except Exception as e:  # noqa: BLE001 - one unsupported kernel must not cost the other cases
      failed.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
      print(f"FAILED to build {failed[-1]}", flush=True)
      continue
    print(f"compiled {case.name} in {case.compile_s:.1f}s", flush=True)
    model_flops[case.name] = mae_step_flops(size, img, patch, FLAGS.mask_ratio, dec[0], dec[1], b)
    cases.append(case)
  bc.run_interleaved(cases, FLAGS.steps, FLAGS.warmup)

  print()
  print(bc.machine_info([f"peak dense bf16: {peak / 1e12:.0f} TFLOP/s" if peak else
                         f"peak dense bf16: N/A (unknown device kind {kind!r})"]))
  print(f"attention: {attentions}; config: {img}px patch {patch} mask {FLAGS.mask_ratio}, decoder "
        f"{dec[1]}x{dec[0]}, compute "
        f"{FLAGS.dtype}, params float32, remat {FLAGS.remat}, AdamW; {FLAGS.steps} timed steps after "
        f"{FLAGS.warmup} warm-up, interleaved")
  print(bc.case_table(cases, "MAE pretraining step"))
  print()
  rows = []
  for c in cases:
    mf = model_flops[c.name]
    achieved = mf / c.median
    mfu = f"{100 * achieved / peak:.1f} %" if peak else "N/A"
    xla = f"{c.flops:.3e} ({c.flops / mf:.2f}x)" if c.flops else "-"
    xla_mfu = f"{100 * c.flops / c.median / peak:.1f} %" if (peak and c.flops) else "N/A"
    rows.append([c.name, f"{c.median * 1e3:.1f}", f"{c.items_per_s:.0f}", f"{mf:.3e}", xla,
                 f"{achieved / 1e12:.2f}", mfu, xla_mfu])
  print(bc.table(["model", "ms/step", "images/s", "model FLOPs/step", "XLA flops/step (÷ model)",
                  "achieved TFLOP/s", "MFU", "MFU (XLA flops)"], rows, "Model FLOPs utilisation"))
  for f in failed:
    print(f"not run: {f}")
  if FLAGS.profile_steps:
    for i, c in enumerate(cases):
      print()
      print(bc.profile_case(c, FLAGS.profile_steps, os.path.join(FLAGS.profile_dir, f"case{i}")), flush=True)


if __name__ == "__main__":
  app.run(main)
