"""MAE pretraining. ``--config=configs/mae_pretrain.py`` (tiny CPU default on synthetic faces) or
``:vit_b`` / ``:vit_l`` / ``:vit_h`` (the paper's recipe at 224 px); ``steps=N`` sets total_steps
(e.g. ``:smoke,steps=4``).

Other objectives (``model.objective``): ``:bootmae``, ``:sdae``, ``:sdmae``, ``:mcm`` (tiny, CPU) and
``:bootmae_smoke`` … ``:mcm_smoke`` (CI); ``:mcm_bp4d,fold=K`` (MCM at ViT-B on the prepared BP4D training
faces of fold K with depth + thermal: prepare with ``--aux_subdirs=depth:Depth,thermal:Thermal``, see
``maejax/data/bp4d.py``; set ``data.data_dir``); :func:`set_objective` turns any of these configs (also another stage's
``c.mae``) into one of them, with the section ``c.<objective>`` (and ``c.ema`` for the self-teachers)."""

import ml_collections

from maejax.config_utils import load_sibling

common = load_sibling(__file__, "common")

OBJECTIVES = ("bootmae", "sdae", "sdmae", "mcm")
VARIANTS = ("tiny", "smoke", "vit_b", "vit_l", "vit_h", *OBJECTIVES, *(f"{o}_smoke" for o in OBJECTIVES), "mcm_bp4d")
# MCM's auxiliary modalities per dataset (record key, channels) and channels dropped per sample: BP4D prepared with
# depth + thermal gives the paper's 5 channels with 2 dropped; the synthetic faces carry the renderer's depth map.
MCM_AUX = {"synthfaces": ((("depth", 1),), 1), "bp4d": ((("depth", 1), ("thermal", 1)), 2)}


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
  m.objective = "mae"  # "mae" | "bootmae" | "sdae" | "sdmae" | "mcm" (see set_objective)
  return m


def ema(kind: str, m0: float, m1: float = 1.0, knots=(), values=(), every: int = 1) -> ml_collections.ConfigDict:
  """Momentum schedule of a self-teacher (trainers/common.py::ema_momentum_schedule); ``knots`` are fractions of
  the run's EMA updates, one update every ``every`` steps."""
  return ml_collections.ConfigDict(dict(kind=kind, m0=m0, m1=m1, knots=tuple(knots), values=tuple(values),
                                        every=every))


def set_objective(c: ml_collections.ConfigDict, objective: str, size: str = "tiny") -> ml_collections.ConfigDict:
  """Makes the MAE config ``c`` (of ``size``: "tiny", "smoke" or a paper size) pretrain with ``objective``.

  Self-teacher momenta: the papers' schedules span 300–800 epochs; the CPU sizes keep the fraction of training
  per time constant 1/(1 − m) instead (a 300-step run with m = 0.999 would never move its teacher).
  """
  paper = size not in ("tiny", "smoke")
  c.model.objective = objective
  if objective == "bootmae":
    c.bootmae = ml_collections.ConfigDict(dict(
        feature_target=True, target_aware=True, pixel_context_block=0, feature_context_block=-1, decoder_depth=2,
        feature_decoder_heads=0, feature_weight=1.0, feature_ramp=0.25, weight_mask=True, pixel_norm="bootmae",
        block_masking=True, block_mask_fraction=0.61))
    # Official (ViT-B, 800 epochs): 0.999 → 0.9999 over the first 100 epochs, → 0.99999 by epoch 400.
    c.ema = ema("knots", 0.0, knots=(0.0, 0.125, 0.5),
                values=(0.999, 0.9999, 0.99999) if paper else (0.99, 0.995, 0.998))
    c.model.decoder_depth = 2
  elif objective == "sdae":
    c.sdae = ml_collections.ConfigDict(dict(k_folds=3, cos_axis="feature", drop_path=0.25 if paper else 0.0))
    # Official: one update per epoch, cosine 0.96 → 0.99 over 300 epochs.
    c.ema = ema("cosine", 0.96 if paper else 0.9, 0.99, every=1251 if paper else (2 if size == "smoke" else 20))
  elif objective == "sdmae":
    heads = dict(out_dim=4096, hidden=2048, bottleneck=256) if paper else dict(out_dim=256, hidden=256, bottleneck=64)
    c.sdmae = ml_collections.ConfigDict(dict(
        p=0.2, tau_s=0.1, tau_t=0.04, center_momentum=0.9, center_mode="sdmae", stop_grad=True, pixel_norm="sdmae",
        **heads))
  elif objective == "mcm":
    if c.data.name not in MCM_AUX:
      raise ValueError(f"mae_pretrain: objective 'mcm' needs auxiliary modalities; config.data.name="
                       f"{c.data.name!r} has none (expected one of {sorted(MCM_AUX)})")
    aux, drop = MCM_AUX[c.data.name]
    c.mcm = ml_collections.ConfigDict(dict(aux=aux, drop=drop, dropped_everywhere=True))
  else:
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``VARIANT[,steps=N][,fold=K]`` (``fold``: the BP4D fold of ``:mcm_bp4d``)."""
  return make(**common.parse_arg(arg, __file__, VARIANTS, variant="tiny", steps=0, fold=1))


def make(variant: str = "tiny", *, steps: int = 0, fold: int = 1) -> ml_collections.ConfigDict:
  """The config of ``variant``; ``steps`` > 0 replaces its total_steps."""
  common.check_variant(__file__, variant, VARIANTS)
  objective, _, size = variant.partition("_")
  if variant == "mcm_bp4d":
    # The ViT-B MAE recipe on fold ``fold``'s BP4D training faces (~100k frames): 400 epochs at batch 1024, 40 of
    # warm-up (maejax's choice; the MCM paper's schedule is not verified, see SEED_METHODS.md §6).
    c = make("vit_b")
    c.data.name, c.data.fold, c.data.data_dir = "bp4d", fold, ""
    c.batch_size = 1024
    c.total_steps = steps or 400 * 100
    c.optim.warmup_steps = 40 * 100
    return set_objective(c, "mcm", "vit_b")
  if objective in OBJECTIVES:
    return set_objective(make(size or "tiny", steps=steps), objective, size or "tiny")
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
    c.model.attention = "xla"  # accelerator sizes: XLA's fused attention (--config.model.attention=cudnn on GPU)
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000
  if steps:
    c.total_steps = steps
  return c
