"""MAE pretraining. ``--config=configs/mae_pretrain.py`` (tiny CPU default on synthetic faces) or
``:vit_b`` / ``:vit_l`` / ``:vit_h`` (the paper's recipe at 224 px); ``steps=N`` sets total_steps
(e.g. ``:smoke,steps=4``)."""

import ml_collections

from maejax.config_utils import load_sibling

common = load_sibling(__file__, "common")

VARIANTS = ("tiny", "smoke", "vit_b", "vit_l", "vit_h")


def model(size: str | None, img_size: int, patch_size: int, **kw) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.size = size or ""
  m.img_size = img_size
  m.patch_size = patch_size
  m.width = kw.get("width")
  m.depth = kw.get("depth")
  m.num_heads = kw.get("num_heads")
  m.mlp_ratio = 4.0
  m.decoder_width = kw.get("decoder_width", 512)
  m.decoder_depth = kw.get("decoder_depth", 8)
  m.decoder_heads = kw.get("decoder_heads", 16)
  m.norm_pix_loss = True
  m.mask_ratio = 0.75
  m.drop_path = 0.0
  m.dtype = "float32"  # "bfloat16" computes in bf16 with fp32 params
  m.remat = False
  m.mask_token_in_encoder = False  # the paper's no-skipping baseline
  m.attention = "einsum"  # "einsum": fastest on CPU; on GPU/TPU "xla", or "cudnn" (GPU, bf16: fused flash attention)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``VARIANT[,steps=N]``."""
  return make(**common.parse_arg(arg, __file__, VARIANTS, variant="tiny", steps=0))


def make(variant: str = "tiny", *, steps: int = 0) -> ml_collections.ConfigDict:
  """The config of ``variant``; ``steps`` > 0 replaces its total_steps."""
  common.check_variant(__file__, variant, VARIANTS)
  c = common.base("mae_pretrain")
  if variant == "tiny":
    # ~1 M parameters at 64 px (64 patches of 8x8): learns visibly in a few CPU minutes.
    c.model = model(None, 64, 8, width=128, depth=4, num_heads=4, decoder_width=96, decoder_depth=2,
                    decoder_heads=4)
    c.optim = common.adamw(base_lr=1.5e-3, weight_decay=0.05, warmup_steps=20)
    c.batch_size = 64
    c.total_steps = 300
    c.eval_every = 150
    c.checkpoint_every = 100
  elif variant == "smoke":
    # Seconds on a CPU: for CI and the resume / multi-process tests.
    c.model = model(None, 32, 8, width=32, depth=2, num_heads=4, decoder_width=32, decoder_depth=1,
                    decoder_heads=4)
    c.data = common.synthfaces(32)
    c.data.num_subjects = 8
    c.data.frames_per_subject = 20
    c.optim = common.adamw(base_lr=1.5e-3, weight_decay=0.05, warmup_steps=2)
    c.batch_size = 16
    c.total_steps = 12
    c.log_every = 4
    c.eval_every = 6
    c.checkpoint_every = 4
  else:
    size = {"vit_b": "B", "vit_l": "L", "vit_h": "H"}[variant]
    c.model = model(size, 224, 14 if size == "H" else 16)
    c.data = common.synthfaces(224)
    c.optim = common.adamw(base_lr=1.5e-4, weight_decay=0.05, warmup_steps=40 * 312)  # 40 ImageNet epochs
    c.batch_size = 4096
    c.total_steps = 800 * 312  # 800 epochs of ImageNet-1k at batch 4096
    c.model.dtype = "bfloat16"
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
  if steps:
    c.total_steps = steps
  return c
