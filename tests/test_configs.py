"""The configs' ``:ARG`` parser, the loader and the validator ``maejax.main`` runs before any work."""

import inspect
import os

import ml_collections
import pytest

from maejax import config_utils
from maejax.data import occlusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("mae_pretrain", "distill", "au_finetune", "au_occl")


def path(name):
  return os.path.join(ROOT, "configs", f"{name}.py")


def module(name):
  return config_utils.load_sibling(path(name), name)


@pytest.fixture
def common():
  return module("common")


def test_parse_arg_types_defaults_and_bare_variant(common):
  spec = dict(variant="tiny", fold=1, lr=0.5, flag=False, name="x")
  assert common.parse_arg(None, "cfg.py", ("tiny", "big"), **spec) == spec
  got = common.parse_arg("big,fold=2,lr=1e-3,flag=true,name=y", "cfg.py", ("tiny", "big"), **spec)
  assert got == dict(variant="big", fold=2, lr=1e-3, flag=True, name="y")
  assert type(got["fold"]) is int and type(got["lr"]) is float
  assert common.parse_arg("variant=big", "cfg.py", ("tiny", "big"), **spec)["variant"] == "big"


@pytest.mark.parametrize("arg, match", [
    ("tiny,sed=3", r"cfg\.py: unknown config argument 'sed'.*did you mean 'seed'"),
    ("tinny", r"cfg\.py: unknown variant 'tinny'; did you mean 'tiny'"),
    ("fold=two", r"cfg\.py: config argument fold='two': expected an int"),
    ("flag=maybe", r"flag='maybe': expected true or false"),
])
def test_parse_arg_rejects(common, arg, match):
  with pytest.raises(ValueError, match=match):
    common.parse_arg(arg, "cfg.py", ("tiny", "big"), variant="tiny", seed=0, fold=1, flag=False)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_declared_argument_acts(name, monkeypatch):
  """The keys ``get_config`` declares are exactly ``make``'s keyword arguments, with the same defaults, and
  each one changes the config (no key is accepted and ignored)."""
  mod, common = module(name), module("common")
  seen = {}
  real = common.parse_arg

  def spy(arg, config_file, variants, /, **spec):
    seen.update(spec)
    return real(arg, config_file, variants, **spec)

  monkeypatch.setattr(common, "parse_arg", spy)
  mod.get_config()
  params = inspect.signature(mod.make).parameters
  assert seen == {k: p.default for k, p in params.items()}
  variant = {"mae_pretrain": "smoke", "distill": "smoke", "au_finetune": "bp4d", "au_occl": "bp4d"}[name]
  changed = {"fold": 2, "seed": 3, "steps": 7, "fraction": 0.3, "tune": "true", "objective": "sdmae"}
  for key in set(seen) - {"variant"}:
    v = "kd_smoke" if key == "tune" else variant  # the search exists in the study variants only
    v = "mcm_bp4d" if (name, key) == ("mae_pretrain", "fold") else v  # the one pretraining config on BP4D
    base = mod.get_config(v).to_dict()
    assert mod.get_config(f"{v},{key}={changed[key]}").to_dict() != base, key


def test_unknown_seed_key_of_au_finetune_and_steps_of_au_occl():
  assert config_utils.load_config(f"{path('au_finetune')}:tiny,seed=3").seed == 3
  with pytest.raises(ValueError, match=r"unknown config argument 'steps'"):
    config_utils.load_config(f"{path('au_occl')}:smoke,steps=3")


def test_au_occl_variants_students_and_rows():
  for variant, students in (("default", {"occl_aug", "kd", "kd_drop"}),
                            ("smoke", {"occl_aug", "kd", "kd_drop", "linear_head"}),
                            ("bench", {"occl_aug", "kd", "kd_drop", "no_node_kd", "no_edge_kd", "linear_head"})):
    c = config_utils.load_config(f"{path('au_occl')}:{variant}")
    assert set(c.students) == students
    assert {r[1] for r in c.rows} == students | {"teacher"}
    assert c.eval.conditions == occlusion.EVAL_CONDITIONS
    assert c.student.train_conditions == occlusion.TRAIN_CONDITIONS
    config_utils.validate(c)


def test_au_occl_objectives_variant_equal_cpu_budget():
  mod = module("au_occl")
  default = config_utils.load_config(f"{path('au_occl')}:default")
  for objective, cost in mod.OBJECTIVE_CPU_COST.items():
    c = config_utils.load_config(f"{path('au_occl')}:objectives,objective={objective}")
    assert c.mae.model.objective == objective
    assert set(c.students) == {"occl_aug"} and {r[1] for r in c.rows} == {"teacher", "occl_aug"}
    # every objective's pretraining costs the default job's MAE budget in CPU time, to within one step
    assert abs(c.mae.total_steps * cost - default.mae.total_steps) <= cost / 2
    assert c.mae.checkpoint_every == c.mae.total_steps
    assert c.teacher.to_dict() == default.teacher.to_dict() and c.student.to_dict() == default.student.to_dict()
  with pytest.raises(ValueError, match="objective='beit'"):
    config_utils.load_config(f"{path('au_occl')}:objectives,objective=beit")


def test_mcm_modalities_follow_the_data():
  """MCM on the synthetic faces: RGB + the renderer's depth, 1 channel dropped; on BP4D (``:mcm_bp4d``): RGB +
  depth + thermal, 2 of the 5 dropped (the paper's mixing); a dataset without auxiliary modalities is refused."""
  mod = module("mae_pretrain")
  c = config_utils.load_config(f"{path('mae_pretrain')}:mcm")
  assert (c.data.name, tuple(map(tuple, c.mcm.aux)), c.mcm.drop) == ("synthfaces", (("depth", 1),), 1)
  c = config_utils.load_config(f"{path('mae_pretrain')}:mcm_bp4d,fold=3")
  assert (c.data.name, c.data.fold, c.model.objective) == ("bp4d", 3, "mcm")
  assert (tuple(map(tuple, c.mcm.aux)), c.mcm.drop) == ((("depth", 1), ("thermal", 1)), 2)
  assert (c.model.size, c.model.img_size) == ("B", 224)
  disfa = mod.make("vit_b")
  disfa.data.name = "disfa"
  with pytest.raises(ValueError, match=r"config\.data\.name='disfa' has none"):
    mod.set_objective(disfa, "mcm", "vit_b")


def test_load_config_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nosuch.py"):
    config_utils.load_config(str(tmp_path / "nosuch.py"))
  (tmp_path / "empty.py").write_text("X = 1\n")
  with pytest.raises(ValueError, match=r"empty\.py defines no get_config"):
    config_utils.load_config(str(tmp_path / "empty.py"))
  (tmp_path / "cfg.py").write_text("def get_config(arg=None):\n  return {'arg': arg}\n")
  assert config_utils.load_config(str(tmp_path / "cfg.py")) == {"arg": None}
  assert config_utils.load_config(f"{tmp_path / 'cfg.py'}:a=1,b") == {"arg": "a=1,b"}


def _smoke(name):
  return config_utils.load_config(f"{path(name)}:smoke")


@pytest.mark.parametrize("name", CONFIGS)
def test_validate_accepts_every_variant(name):
  for variant in module(name).VARIANTS:
    config_utils.validate(config_utils.load_config(f"{path(name)}:{variant}"))


@pytest.mark.parametrize("name, key, value, match", [
    ("au_finetune", "mode", "evl", r"config\.mode='evl': expected one of 'train', 'eval'; did you mean 'eval'"),
    ("au_occl", "mode", "training", r"config\.mode='training'"),
    ("mae_pretrain", "stage", "mae_pretrian", r"config\.stage='mae_pretrian'.*did you mean 'mae_pretrain'"),
    ("au_finetune", "data.name", "bp4", r"config\.data\.name='bp4'.*did you mean 'bp4d'"),
    ("au_occl", "eval.conditions", ("clean", "glases"), r"conditions item='glases'.*'glasses'"),
    ("au_occl", "student.train_conditions", ("hand", "blok_upper"), r"'blok_upper'"),
    ("au_occl", "rows", (("KD", "kdd", ""),), r"config\.rows\['KD'\] model='kdd'.*did you mean 'kd'"),
    ("au_occl", "rows", (("KD", "kd", "masked"),), r"drop='masked'"),
    ("mae_pretrain", "sharding_rules", (("embed", "fsdq"),), r"sharding_rules\['embed'\]='fsdq'.*'fsdp'"),
    ("distill", "mesh", {"data": -1, "fdsp": 2}, r"config\.mesh axis='fdsp'.*did you mean 'fsdp'"),
    ("distill", "mesh", {"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
    ("distill", "mesh", {"data": 0}, r"config\.mesh\.data=0"),
])
def test_validate_rejects(name, key, value, match):
  c = _smoke(name)
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  with pytest.raises(ValueError, match=match):
    config_utils.validate(c)


def test_validate_rejects_student_override_keys():
  c = _smoke("au_occl")
  c.students.kd = ml_collections.ConfigDict({"nod_kd": 0.0})
  with pytest.raises(ValueError, match=r"config\.students\.kd\.nod_kd: unknown key; did you mean 'node_kd'"):
    config_utils.validate(c)
