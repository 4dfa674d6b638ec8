"""The main job: MAE pretraining → AU teacher → occlusion-robust students → robustness report.

``python -m maejax.main --config=configs/au_occl.py --workdir=DIR`` (default: ≤ 15 min on a 2-core CPU, synthetic
faces), ``:bench`` (more steps, ≤ 30 min; ``--config.seed=N`` for repeats), ``:smoke`` (CI, ≤ 3 min),
``:bp4d`` / ``:disfa`` (ViT-B 224 px on the prepared TFDS data, fold ``fold=1..3``; run the three folds and
``python -m maejax.report DIR1/report DIR2/report DIR3/report`` for the 3-fold average); ``seed=N`` seeds the
whole chain; ``fraction=F`` keeps the labels of a fraction F of the training frames (``data.label_fraction``).
``:objectives,objective=NAME`` (the pretraining objectives downstream at equal CPU cost: the default job's
pretraining budget scaled by NAME's measured step cost, then the teacher and the occlusion-augmented student).
``:kd_study`` (the KD family in the label-scarce regime, one label fraction per run, e.g.
``:kd_study,fraction=0.3``; ``tune=true``: every row's candidate hyper-parameters, reported on the validation
subjects) and ``:kd_smoke`` (its CI-sized version).
A stage whose final checkpoint exists in DIR is skipped; ``--config.mode=eval`` only rebuilds the report.
"""

import ml_collections

from maejax.config_utils import load_sibling
from maejax.data import occlusion

au_finetune = load_sibling(__file__, "au_finetune")
mae_pretrain = load_sibling(__file__, "mae_pretrain")
common = au_finetune.common

VARIANTS = ("default", "bench", "smoke", "bp4d", "disfa", "kd_study", "kd_smoke", "objectives")

# CPU seconds per pretraining step relative to the plain MAE step, tiny configs, 2-core CPU (benchmarks/README.md,
# "benchmarks/objectives_step.py"). :objectives gives every objective the default job's MAE budget in CPU time.
OBJECTIVE_CPU_COST = {"mae": 1.0, "bootmae": 3.41, "sdae": 1.20, "sdmae": 1.02, "mcm": 1.54}

# Students: config.student overridden per name.
STUDENTS = {
    "occl_aug": {"node_kd": 0.0, "edge_kd": 0.0},  # baseline (b): occlusion augmentation, no KD
    "kd": {},
    "kd_drop": {"drop_train": True, "occ_predictor": True},
    "no_node_kd": {"node_kd": 0.0},
    "no_edge_kd": {"edge_kd": 0.0},
    "linear_head": {"head": "linear"},
}
# Report rows (in order): (name, model, token dropping at evaluation: "" | "mask" | "pred"). A variant reports
# the teacher's row and those of the students it trains.
ROWS = (
    ("clean teacher", "teacher", ""),
    ("occl-aug baseline", "occl_aug", ""),
    ("KD student", "kd", ""),
    ("KD + drop (known mask)", "kd_drop", "mask"),
    ("KD + drop (predicted)", "kd_drop", "pred"),
    ("abl: no node KD", "no_node_kd", ""),
    ("abl: no edge KD", "no_edge_kd", ""),
    ("abl: linear head", "linear_head", ""),
)
MAIN_STUDENTS = ("occl_aug", "kd", "kd_drop")
VARIANT_STUDENTS = {
    "default": MAIN_STUDENTS,  # the 15-minute budget: the four main rows; ablations in :bench
    "bench": tuple(STUDENTS),
    # CI: one of each code path (no_node_kd / no_edge_kd share the KD student's)
    "smoke": MAIN_STUDENTS + ("linear_head",),
    "bp4d": tuple(STUDENTS),
    "disfa": tuple(STUDENTS),
    "objectives": ("occl_aug",),  # the pretraining objectives downstream: teacher + occlusion-augmented student
}


# The KD study (issue 15; SEED_METHODS.md §4, §5, §7): which knowledge transfer from the clean-face teacher pays
# when labels are scarce. Every row shares the teacher, the step budget, the occlusion sampling
# (student.train_conditions) and the labelled subset; each student differs from "kd" / "occl_aug" only in the
# weights named here.
STUDY_STUDENTS = {
    "occl_aug": {"node_kd": 0.0, "edge_kd": 0.0},  # baseline: occlusion augmentation, labels only
    "pseudo": {"node_kd": 0.0, "edge_kd": 0.0, "pseudo_label": 1.0},  # baseline: self-training on the teacher
    "prob_kd": {"node_kd": 0.0, "edge_kd": 0.0, "prob_kd": 1.0},  # Hinton's soft targets
    "kd": {},  # node + edge KD (the occlusion-robust AU paper)
    "kd_latent": {"latent_kd": 1.0},
    "kd_triplet": {"triplet_kd": 1.0},
    "online_kd": {"node_kd": 0.0, "edge_kd": 0.0, "prob_kd": 1.0, "online_kd": True},  # mutual learning
}
STUDY_ROWS = (
    ("clean teacher", "teacher", ""),
    ("occl-aug baseline", "occl_aug", ""),
    ("pseudo-label baseline", "pseudo", ""),
    ("probability KD", "prob_kd", ""),
    ("node+edge KD", "kd", ""),
    ("+ latent KD", "kd_latent", ""),
    ("+ triplet KD", "kd_triplet", ""),
    ("online KD", "online_kd", ""),
)
# The hyper-parameter search, the same budget for every row: three candidates of the row's own weights
# (``tune=true`` trains all of them and reports them on the validation subjects, never the test subjects; the
# teacher is shared and not tuned). STUDY_STUDENTS holds the middle candidates until a tuning run picks others.
STUDY_SEARCH = {
    "occl_aug": tuple({"edge_weight": w} for w in (0.02, 0.05, 0.15)),
    "pseudo": tuple({"pseudo_label": w} for w in (0.3, 1.0, 3.0)),
    "prob_kd": tuple({"prob_kd": w} for w in (0.3, 1.0, 3.0)),
    "kd": tuple({"node_kd": w, "edge_kd": w} for w in (0.3, 1.0, 3.0)),
    "kd_latent": tuple({"latent_kd": w} for w in (0.3, 1.0, 3.0)),
    "kd_triplet": tuple({"triplet_kd": w} for w in (0.3, 1.0, 3.0)),
    "online_kd": tuple({"online_mutual": w} for w in (0.3, 1.0, 3.0)),
}


def student(steps: int, batch: int, lr: float, warmup: int) -> ml_collections.ConfigDict:
  s = au_finetune.run(steps, batch, lr, warmup)
  s.encoder = "frozen"  # "frozen" | "finetune" | "partial:K" (last K blocks)
  s.encoder_init = "mae"  # the student's encoder: "mae" (DESIGN §5) or "teacher" (the teacher's encoder)
  s.head_init = "teacher"  # "teacher" (warm start from the teacher's head) or "random"
  s.head = "graph"  # "graph" | "linear" (ablation without the graph)
  s.transform_depth = 1  # transformer blocks of the latent→AU transform
  s.edge_weight = 0.05  # λ_e, edge CE
  s.node_kd = 1.0  # α_n
  s.edge_kd = 1.0  # α_e
  s.kd_kind = "mse"  # "mse" | "cosine" | "l1" | "smooth_l1"
  s.train_conditions = occlusion.TRAIN_CONDITIONS
  s.drop_train = False  # token dropping while training (keeps the train_keep_ratio least-occluded patches)
  s.train_keep_ratio = 0.5
  s.occ_predictor = False  # train the per-patch occlusion predictor (BCE, weight occ_weight)
  s.occ_weight = 1.0
  # The KD family (losses.py, "AU: the KD family"); 0 / False = off.
  s.prob_kd = 0.0  # probability KD (Hinton): BCE to the teacher's clean-face probabilities at temperature T
  s.prob_kd_T = 2.0  # its temperature, on the logit of the probability; also online KD's mutual term
  s.pseudo_label = 0.0  # WAL on the teacher's thresholded clean-face predictions, unlabelled entries only
  s.pseudo_threshold = 0.5
  s.latent_kd = 0.0  # transformed tokens regress the teacher encoder's (per-token normalised) clean tokens
  s.latent_kd_where = "all"  # "all" patches | "occluded" ones only
  s.triplet_kd = 0.0  # per-AU triplet on node features (anchor student, positive / hardest negative teacher)
  s.triplet_margin = 0.2
  s.triplet_normalize = True  # L2-normalise node features first (the margin then lives on [0, 2])
  s.online_kd = False  # train the teacher jointly (its own loss on clean labelled faces + distillation from us)
  s.online_mutual = 1.0  # the teacher's weight on probability KD toward the student (online_kd only)
  s.seed_offset = 1
  s.layer_decay = 1.0
  return s


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: ``VARIANT[,fold=K][,seed=N][,fraction=F][,tune=BOOL][,objective=NAME]``."""
  return make(**common.parse_arg(arg, __file__, VARIANTS, variant="default", fold=1, seed=0, fraction=0.0,
                                 tune=False, objective="mae"))


def make(variant: str = "default", *, fold: int = 1, seed: int = 0, fraction: float = 0.0,
         tune: bool = False, objective: str = "mae") -> ml_collections.ConfigDict:
  """The chained job of ``variant``: the au_finetune config of its size plus ``mae``, ``student``,
  ``students`` and ``rows``; ``fraction``: ``data.label_fraction`` (0 = the variant's: 0.5 for kd_smoke, which
  exercises the labelled / unlabelled batches, else 1); ``tune``: the KD study's search; ``objective``: the
  chained pretraining's objective (``mae.model.objective``: mae, bootmae, sdae, sdmae, mcm; every one saves a
  plain MAE encoder, which the teacher and the students start from)."""
  common.check_variant(__file__, variant, VARIANTS)
  if objective not in OBJECTIVE_CPU_COST:
    raise ValueError(f"{__file__}: objective={objective!r}; expected one of {tuple(OBJECTIVE_CPU_COST)}")
  fraction = fraction or (0.5 if variant == "kd_smoke" else 1.0)
  study = variant in ("kd_study", "kd_smoke")
  if tune and not study:
    raise ValueError(f"{__file__}: tune=true applies to the kd_study / kd_smoke variants, not {variant!r}")
  if study:
    c = _kd_study(variant == "kd_smoke", seed=seed, fraction=fraction, tune=tune)
  else:
    c = _make(variant, fold=fold, seed=seed)
    c.data.label_fraction = fraction
  if objective != "mae":
    size = {"default": "tiny", "bench": "tiny", "kd_study": "tiny", "smoke": "smoke", "kd_smoke": "smoke",
            "objectives": "tiny"}
    mae_pretrain.set_objective(c.mae, objective, size.get(variant, "vit_b"))
  if variant == "objectives":
    c.mae.total_steps = round(c.mae.total_steps / OBJECTIVE_CPU_COST[objective])
    c.mae.checkpoint_every = c.mae.eval_every = c.mae.total_steps
  return c


def _make(variant: str, *, fold: int, seed: int) -> ml_collections.ConfigDict:
  cpu = variant in ("default", "bench", "objectives")
  c = au_finetune.make("tiny" if cpu else variant, fold=fold, seed=seed)
  c.stage = "au_occl"
  c.mae = mae_pretrain.make("tiny" if cpu else "smoke" if variant == "smoke" else "vit_b")
  c.mae.init = ""  # skip pretraining: an MAE / DMAE workdir or a `maejax.convert` output
  c.log_every = 20
  if cpu:
    _cpu_budget(c, bench=variant == "bench")
  elif variant == "smoke":
    c.mae.total_steps = 4
    c.mae.checkpoint_every = 4
    c.mae.eval_every = 4
    c.teacher = au_finetune.teacher(4, 3, 16, 1e-3, 3e-4, 0.05, 0.75, warmup=1)
    c.student = student(3, 16, 1e-3, 1)
    c.student.log_every = 1
    c.eval = au_finetune.evaluation(16, 16)
  else:  # bp4d / disfa: paper-size encoder from a converted official MAE ViT-B (set mae.init)
    # mae.init is required: e.g. the output of `python -m maejax.convert mae_pretrain_vit_base.pth DIR`.
    epoch = 1500 if variant == "bp4d" else 1000
    c.student = student(10 * epoch, 64, 1e-4, epoch)
    c.student.encoder = "partial:4"
    c.student.log_every = 100
    c.eval = au_finetune.evaluation(0, 128)
  c.eval.conditions = occlusion.EVAL_CONDITIONS
  # One seed for the whole chain: the MAE stage follows config.seed (also when --config.seed=N overrides it).
  c.mae.seed = c.get_ref("seed")
  names = VARIANT_STUDENTS[variant]
  c.students = ml_collections.ConfigDict({n: over for n, over in STUDENTS.items() if n in names})
  c.rows = tuple(r for r in ROWS if r[1] == "teacher" or r[1] in names)
  return c


def _kd_study(smoke: bool, *, seed: int, fraction: float, tune: bool) -> ml_collections.ConfigDict:
  """``:kd_study`` / ``:kd_smoke``: the study's rows at one label fraction (1.0, 0.3 and 0.1 in the study), the
  validation subjects held out of training (tuning and threshold calibration), calibrated rows beside the plain
  ones; ``tune``: the rows' search candidates, evaluated on the validation subjects."""
  c = _make("smoke" if smoke else "default", fold=1, seed=seed)
  c.data.label_fraction = fraction
  c.data.val_fraction = 0.25 if smoke else 0.2  # of the training subjects (default data: 45 → 36 train + 9 val)
  if smoke:  # CI: every new loss and row at the smoke size (≤ 3 min on 2 cores)
    c.data.labelled_per_batch = 4
    c.student.train_conditions = ("clean", "patches_random", "block_upper", "block_lower")
  else:
    # Budget (2 CPU cores alone; per-step costs measured for the default job at batch 64: MAE 0.16 s, teacher
    # stage 1 0.22 s, stage 2 0.38 s, student 0.55 s; online KD ≈ 0.8 s: the student step minus the frozen
    # teacher's forward plus a stage-2 training step): MAE 400 steps 64 s; teacher 1000 + 150 steps 277 s;
    # 6 students × 150 steps 495 s; online KD 150 steps 120 s; compilation ≈ 200 s cold (the XLA cache serves
    # the next fractions); calibration of 8 models on 192 validation faces and 16 rows × 6 conditions × 192
    # faces of evaluation ≈ 100 s. One fraction ≈ 21 min cold; the three fractions of one seed ≈ 56 min.
    # tune=true trains 3 candidates per row (21 students): ≈ 35 min per fraction.
    c.teacher.stage1.total_steps, c.teacher.stage2.total_steps = 1000, 150
    c.teacher.stage1.optim.warmup_steps = 50  # the warm-up of the study's measured seeds (0, 1)
    c.data.labelled_per_batch = 16  # of 64: label terms never starve at fraction 0.1 (≈ 6 per batch otherwise)
  c.eval.calibrate = not tune
  if tune:
    c.eval.split = "val"
    students, rows = {}, [STUDY_ROWS[0]]
    for row, name, drop in STUDY_ROWS[1:]:
      for k, over in enumerate(STUDY_SEARCH[name]):
        students[f"{name}_t{k}"] = {**STUDY_STUDENTS[name], **over}
        rows.append((f"{row} [{', '.join(f'{a}={b}' for a, b in over.items())}]", f"{name}_t{k}", drop))
    c.students = ml_collections.ConfigDict(students)
    c.rows = tuple(rows)
  else:
    c.students = ml_collections.ConfigDict(STUDY_STUDENTS)
    c.rows = STUDY_ROWS
  return c


def _cpu_budget(c: ml_collections.ConfigDict, bench: bool) -> None:
  """The 2-core CPU budget of ``default`` (≤ 15 min) and ``bench`` (≤ 30 min)."""
  # Budget (2 CPU cores, batch 64, rendered faces cached; measured): MAE 0.16 s/step, teacher stage 1 0.22 s,
  # stage 2 (MEFL) 0.38 s, student 0.55 s (MEFL + the frozen teacher's forward). The tiny MAE of this budget is
  # a weak initialiser, so the teacher trains its encoder at the full lr (layer decay 1.0) and the students
  # start from the teacher's encoder and head and fine-tune them on occluded faces (options:
  # encoder_init="mae", encoder="frozen" / "partial:K").
  # The teacher's clean F1 grows with MAE pretraining length and then with its own stage-1 length (measurements in
  # benchmarks/README.md, "Results history"). :bench spends its budget there (MAE 1500, teacher 2700 + 200; 24 min
  # alone) and gives the students, which start from the teacher, 150 steps each; the 15-minute default the same
  # split, shorter (MAE 400, teacher 1800 + 200, 3 students).
  c.mae.total_steps = 1500 if bench else 400
  c.mae.batch_size = 64
  c.mae.checkpoint_every = c.mae.eval_every = c.mae.total_steps
  s1, s2 = (2700, 200) if bench else (1800, 200)
  c.teacher = au_finetune.teacher(s1, s2, 64, 1e-3, 3e-4, 0.05, 1.0, warmup=50)
  # Stage 1 from a weak tiny-MAE start: the WAL loss sits on a plateau until a seed-dependent take-off step. A
  # 300-step warm-up narrows the spread of that step (seeds 0, 1, 2, 7: 614–739, against 576–884 with 50) and of
  # the teacher's clean F1 (80.3 ± 1.3 over seeds 0–2; benchmarks/README.md, "Results history").
  c.teacher.stage1.optim.warmup_steps = 300
  c.student = student(150, 64, 5e-4, 20)
  c.student.encoder = "finetune"
  c.student.encoder_init = "teacher"
  c.eval = au_finetune.evaluation(512, 128) if bench else au_finetune.evaluation(192, 96)
