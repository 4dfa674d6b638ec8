"""Loading and checking the Python config files in ``configs/``.

``load_config("configs/au_occl.py:smoke")`` is what ``--config=`` of ``python -m maejax.main`` reads, for tests,
notebooks and benchmarks; ``validate(config)`` is the check ``maejax.main`` runs on it before any work.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from maejax.cli import closest_names

STAGES = ("mae_pretrain", "distill", "au_finetune", "au_occl")
MODES = ("train", "eval")
AU_STAGES = ("au_finetune", "au_occl")
EVAL_DROPS = ("", "mask", "pred")  # token dropping of a report row at evaluation


def _exec_file(path: str, module_name: str, register: bool) -> ModuleType:
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  if register:
    sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    if register:
      sys.modules.pop(module_name, None)
    raise
  return module


def load_sibling(config_file: str, name: str) -> ModuleType:
  """Imports ``<dir of config_file>/<name>.py`` (once per path).

  ``ml_collections.config_flags`` loads a config file by path, not as part of a package, so config files cannot
  import each other with ``import``; they call ``load_sibling(__file__, "common")`` instead.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config module {name!r} not found at {path}")
  key = f"_maejax_config_{name}_{abs(hash(path))}"
  if key in sys.modules:
    return sys.modules[key]
  return _exec_file(path, key, register=True)


def load_config(spec: str):
  """The ConfigDict of ``"PATH[:ARG]"``: ``PATH``'s ``get_config(ARG)`` (``get_config()`` without ``:ARG``),
  as ``--config=PATH[:ARG]`` of ``python -m maejax.main`` reads it (before ``--config.key=value`` overrides).

  Raises:
    FileNotFoundError: ``PATH`` does not exist.
    ValueError: ``PATH`` is not a ``.py`` file or defines no ``get_config``, or ``get_config`` rejects
      ``ARG``.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    raise FileNotFoundError(f"config file {path} not found{where}; expected PATH[:ARG], e.g. "
                            "configs/au_occl.py:smoke")
  if not path.endswith(".py"):
    raise ValueError(f"config file {path} is not a Python file (.py) defining get_config(arg)")
  module = _exec_file(path, f"_maejax_config_file_{abs(hash(os.path.abspath(path)))}", register=False)
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ValueError(f"config file {path} defines no get_config(arg) function")
  return get_config(arg) if arg else get_config()


# ------------------------------------------------------------------------------------------------ checks


def _one_of(where: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    hint = closest_names(value, [str(a) for a in allowed]) if isinstance(value, str) else ""
    raise ValueError(f"{where}={value!r}: expected one of {', '.join(repr(a) for a in allowed)}{hint}")


def validate(config: Mapping[str, Any]) -> None:
  """Checks what a stage would otherwise find wrong only after minutes of work (or never): the stage, ``mode``,
  the mesh and sharding rules' axis names and, for the AU stages, the dataset, occlusion conditions, student
  overrides and report rows. Raises ``ValueError`` naming the key, the value and what was expected."""
  from maejax import sharding

  _one_of("config.stage", config.get("stage"), STAGES)
  if "mode" in config:
    _one_of("config.mode", config["mode"], MODES)
  mesh = config.get("mesh") or {}
  for axis, size in mesh.items():
    _one_of("config.mesh axis", axis, sharding.MESH_AXES)
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"config.mesh.{axis}={size!r}: expected a positive int or -1 (the remaining devices)")
  if list(mesh.values()).count(-1) > 1:
    raise ValueError(f"config.mesh={dict(mesh)}: at most one axis may be -1")
  for rule in config.get("sharding_rules") or ():
    if len(rule) != 2:
      raise ValueError(f"config.sharding_rules: {rule!r} is not a (logical axis, mesh axis or None) pair")
    _one_of(f"config.sharding_rules[{rule[0]!r}]", rule[1], (*sharding.MESH_AXES, None))
  if config.get("stage") in AU_STAGES:
    _validate_au(config)


def _validate_au(config: Mapping[str, Any]) -> None:
  from maejax.data import au_pipeline, occlusion

  _one_of("config.data.name", config["data"]["name"], au_pipeline.AU_DATASETS)
  for cond in config.get("eval", {}).get("conditions", ()):
    _one_of("config.eval.conditions item", cond, tuple(occlusion.CONDITIONS))
  if config["stage"] != "au_occl":
    return
  student = config["student"]
  for cond in student.get("train_conditions", ()):
    _one_of("config.student.train_conditions item", cond, tuple(occlusion.CONDITIONS))
  for name, overrides in config["students"].items():
    for key in overrides:
      if key not in student:
        raise ValueError(f"config.students.{name}.{key}: unknown key{closest_names(key, list(student))} (keys of "
                         "config.student)")
  models = ("teacher", *config["students"])
  for row in config["rows"]:
    if len(row) != 3:
      raise ValueError(f"config.rows: {row!r} is not a (row name, model, drop) triple")
    _one_of(f"config.rows[{row[0]!r}] model", row[1], models)
    _one_of(f"config.rows[{row[0]!r}] drop", row[2], EVAL_DROPS)
