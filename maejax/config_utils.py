"""Helpers for the Python config files in ``configs/``."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def load_sibling(config_file: str, name: str) -> ModuleType:
  """Imports ``<dir of config_file>/<name>.py``.

  ``ml_collections.config_flags`` loads a config file by path, not as part of a package, so config files cannot
  import each other with ``import``; they call ``load_sibling(__file__, "common")`` instead.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config module {name!r} not found at {path}")
  key = f"_maejax_config_{name}_{abs(hash(path))}"
  if key in sys.modules:
    return sys.modules[key]
  spec = importlib.util.spec_from_file_location(key, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[key] = module
  spec.loader.exec_module(module)
  return module
