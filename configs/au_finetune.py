"""AU teacher fine-tuning (ME-GraphAU stages 1 and 2 on clean faces).

``--config=configs/au_finetune.py`` (tiny CPU default on synthetic faces; set ``--config.init=<MAE workdir or
converted checkpoint>``, empty = encoder from scratch), ``:smoke``, ``:bp4d`` / ``:disfa`` (ViT-B 224 px,
paper recipe; ``fold=1..3``, e.g. ``:bp4d,fold=2``); ``seed=N`` sets config.seed, ``steps=N`` both teacher
stages' total_steps.
"""

import ml_collections

from maejax.config_utils import load_sibling

common = load_sibling(__file__, "common")

VARIANTS = ("tiny", "smoke", "bp4d", "disfa")


def model(img_size: int, patch_size: int, size: str = "", width=None, depth=None, num_heads=None,
          num_aus: int = 12, channels: int = 64, top_k: int = 4, head_pool: int = 2) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.size = size
  m.img_size = img_size
  m.patch_size = patch_size
  m.width = width
  m.depth = depth
  m.num_heads = num_heads
  m.mlp_ratio = 4.0
  m.num_aus = num_aus
  m.channels = channels  # C of node / edge features (512 in ME-GraphAU)
  m.top_k = top_k  # FGG top-K (4 BP4D, 3 DISFA)
  m.head_pool = head_pool  # average-pool the patch grid by this factor before the head (MEFL cost ∝ T²)
  m.attention = "einsum"  # "einsum": fastest on CPU; on GPU/TPU "xla", or "cudnn" (GPU, bf16: fused flash attention)
  return m


def run(steps: int, batch: int, lr: float, warmup: int, wd: float = 5e-4, **kw) -> ml_collections.ConfigDict:
  r = ml_collections.ConfigDict()
  r.total_steps = steps
  r.batch_size = batch
  r.optim = common.adamw(lr, wd, warmup)
  r.optim.scale_by_batch = False
  r.optim.b2 = 0.999
  r.log_every = kw.pop("log_every", 10)
  r.checkpoint_every = kw.pop("checkpoint_every", max(steps, 1))
  for k, v in kw.items():
    r[k] = v
  return r


def teacher(s1_steps: int, s2_steps: int, batch: int, lr1: float, lr2: float, edge_weight: float,
            layer_decay: float, warmup: int = 10) -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.stage1 = run(s1_steps, batch, lr1, warmup, layer_decay=layer_decay, edge_weight=0.0)
  t.stage2 = run(s2_steps, batch, lr2, warmup, layer_decay=layer_decay, edge_weight=edge_weight)
  return t


def au_data(variant: str, fold: int = 1) -> ml_collections.ConfigDict:
  if variant in ("bp4d", "disfa"):
    d = common.synthfaces(224)
    d.name = variant
    d.fold = fold
    d.data_dir = ""  # TFDS data_dir of `python -m maejax.data.prepare`
    d.jitter = 0.2  # colour jitter strength (brightness / contrast / saturation)
    d.shift = 1 / 14  # max random translation, fraction of the side (ME-GraphAU's 224-of-256 crop)
    d.flip = True  # random horizontal flip
  else:
    d = common.synthfaces(32 if variant == "smoke" else 64)
    # No extra augmentation: the generator already draws pose, scale, shift, lighting, noise and blur per frame.
    # Measured (tiny teacher, 64 px, batch 64, step 490): WAL loss 0.362 (still flat) with ME-GraphAU's shift /
    # flip / colour jitter, 0.267 without.
    d.jitter, d.shift, d.flip = 0.0, 0.0, False
  d.aus = ()  # synthfaces: () = BP4D's 12 AUs
  return d


def evaluation(examples: int, batch: int) -> ml_collections.ConfigDict:
  e = ml_collections.ConfigDict()
  e.examples = examples  # held-out examples per condition (0 = the whole test split)
  e.batch_size = batch
  e.drop_threshold = 0.5  # token dropping: drop patches more occluded than this
  e.conditions = ("clean",)
  e.split = "test"  # "test" (held-out subjects) or "val" (data.val_fraction of the training subjects: tuning)
  e.calibrate = False  # au_occl: per-AU F1-optimal thresholds on "val"; adds a "ROW (cal)" row per row
  return e


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``VARIANT[,fold=K][,seed=N][,steps=N]``."""
  return make(**common.parse_arg(arg, __file__, VARIANTS, variant="tiny", fold=1, seed=0, steps=0))


def make(variant: str = "tiny", *, fold: int = 1, seed: int = 0, steps: int = 0) -> ml_collections.ConfigDict:
  """The config of ``variant`` on ``fold`` (BP4D / DISFA); ``steps`` > 0 replaces both teacher stages'
  total_steps."""
  common.check_variant(__file__, variant, VARIANTS)
  c = common.base("au_finetune")
  c.seed = seed
  c.mode = "train"  # "train" | "eval" (rebuild the evaluation from the checkpoints)
  c.compilation_cache = "~/.cache/maejax/xla"  # persistent XLA cache ("" = off)
  c.init = ""  # encoder init: an MAE / DMAE workdir or a `maejax.convert` output
  c.data = au_data(variant, fold)
  if variant == "tiny":
    c.model = model(64, 8, width=128, depth=4, num_heads=4)
    # From scratch (init = ""): the encoder trains at the full lr (layer decay 1.0; 0.75 with an MAE init).
    c.teacher = teacher(900, 200, 64, 1e-3, 3e-4, 0.05, 1.0, warmup=50)
    c.eval = evaluation(768, 128)
  elif variant == "smoke":
    c.model = model(32, 8, width=32, depth=2, num_heads=4, channels=16)
    c.data.num_subjects = 8
    c.data.frames_per_subject = 20
    c.teacher = teacher(6, 4, 16, 1e-3, 3e-4, 0.05, 0.75, warmup=1)
    c.eval = evaluation(32, 16)
  else:
    n, k = (12, 4) if variant == "bp4d" else (8, 3)
    c.model = model(224, 16, size="B", num_aus=n, channels=512, top_k=k, head_pool=2)
    c.model.attention = "xla"  # accelerator sizes: XLA's fused attention (--config.model.attention=cudnn on GPU)
    # ME-GraphAU: AdamW wd 5e-4, lr 1e-4 (stage 1) / 1e-5 (stage 2), cosine, 20 epochs, batch 64;
    # λ = 0.05 (BP4D). Steps: ~100k BP4D training frames per fold / 64 ≈ 1.5k steps per epoch.
    epoch = 1500 if variant == "bp4d" else 1000
    c.teacher = teacher(20 * epoch, 20 * epoch, 64, 1e-4, 1e-5, 0.05, 0.65, warmup=epoch)
    c.teacher.stage1.optim.b2 = 0.999
    c.eval = evaluation(0, 128)
    c.log_every = 100
  if steps:
    c.teacher.stage1.total_steps = c.teacher.stage2.total_steps = steps
  return c
