"""DMAE distillation. Default: a tiny student distilled from the tiny ``mae_pretrain`` teacher in
``workdir/mae_pretrain`` (run that stage first). ``:vit_l_to_vit_b`` is the paper's setting: ViT-B student,
ViT-L teacher (``--config.distill.teacher=`` a converted ``mae_pretrain_vit_large.pth`` or a workdir), student
block 8 aligned to teacher block 17 (0-based). ``steps=N`` sets total_steps.

Objective students: ``:bootmae``, ``:sdae``, ``:sdmae``, ``:mcm`` (tiny) and ``:bootmae_smoke`` … ``:mcm_smoke``
(CI) train the student with that objective (``mae_pretrain.set_objective``: its section and EMA) in place of the
pixel loss, plus α·the same DMAE alignment to the same teacher (an RGB MAE, also for MCM)."""

import ml_collections

from maejax.config_utils import load_sibling

common = load_sibling(__file__, "common")
mae_pretrain = load_sibling(__file__, "mae_pretrain")

OBJECTIVES = mae_pretrain.OBJECTIVES
VARIANTS = ("tiny", "smoke", "vit_l_to_vit_b", *OBJECTIVES, *(f"{o}_smoke" for o in OBJECTIVES))


def distill(teacher: str, pairs) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.teacher = teacher
  d.pairs = pairs  # ((student block, teacher block), ...), 0-based
  d.head = "linear"  # "linear" | "mlp1" | "mlp2"
  d.head_hidden = 0  # 0 = teacher width
  d.distance = "l1"  # "l1" | "l2" | "smooth_l1" | "cosine"
  d.alpha = 1.0
  d.teacher_mode = "truncated"  # "truncated" (the paper's saving) | "full" (teacher blocks + decoder, as released)
  return d


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``VARIANT[,steps=N]``."""
  return make(**common.parse_arg(arg, __file__, VARIANTS, variant="tiny", steps=0))


def make(variant: str = "tiny", *, steps: int = 0) -> ml_collections.ConfigDict:
  """The config of ``variant``: the MAE config of the student's size plus ``distill``; ``steps`` > 0 replaces
  total_steps. ``OBJECTIVE[_smoke]``: the ``tiny`` (``smoke``) config whose student trains with ``OBJECTIVE``."""
  common.check_variant(__file__, variant, VARIANTS)
  objective, _, size = variant.partition("_")
  if objective in OBJECTIVES:
    return mae_pretrain.set_objective(make(size or "tiny", steps=steps), objective, size or "tiny")
  c = mae_pretrain.make({"smoke": "smoke", "vit_l_to_vit_b": "vit_b"}.get(variant, "tiny"))
  c.stage = "distill"
  if variant == "tiny":
    c.model.width, c.model.depth, c.model.num_heads = 64, 4, 4  # half the teacher's width
    c.distill = distill("workdir/mae_pretrain", ((2, 2),))
  elif variant == "smoke":
    c.model.width, c.model.depth, c.model.num_heads = 32, 2, 4
    c.distill = distill("", ((0, 1),))
  else:
    c.distill = distill("", ((8, 17),))
    c.total_steps = 100 * 312  # 100 ImageNet epochs at batch 4096
  if steps:
    c.total_steps = steps
  return c
