"""Pieces every stage's config shares (mesh, sharding rules, logging, the synthetic data default) and the
parser of the ``--config=FILE.py:ARG`` argument."""

import os
from collections.abc import Sequence

import ml_collections

from maejax import sharding
from maejax.cli import closest_names


def base(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.batch_size = 64  # global, across all processes
  c.total_steps = 200
  c.grad_accum_steps = 1
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  # Mesh axes and sizes; one -1 takes the remaining devices. FSDP / tensor parallel are config changes.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  c.sharding_rules = sharding.DEFAULT_RULES  # logical parameter axis -> mesh axis
  c.data = synthfaces()
  return c


def synthfaces(image_size: int = 64) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = "synthfaces"  # or "folder" (data.path) or "tfds" (data.tfds_name, data.data_dir)
  d.seed = 0
  d.num_subjects = 60
  d.frames_per_subject = 200
  d.test_fraction = 0.25
  d.val_fraction = 0.0  # AU stages: > 0 carves a subject-exclusive "val" split out of the training subjects
  # AU label-scarce regime: the fraction of training frames that keep their labels (a fixed subset by config.seed;
  # the others get −1) and the labelled frames in every student batch (0 = a quarter of the batch).
  d.label_fraction = 1.0
  d.labelled_per_batch = 0
  d.image_size = image_size
  d.crop_scale = (0.2, 1.0)
  d.worker_count = 0
  # Render cache of the synthetic faces (maejax.data.face_cache), shared by every stage and run; "" = off.
  d.cache_dir = "~/.cache/maejax/synthfaces"
  d.path = ""
  d.tfds_name = ""
  d.data_dir = ""
  return d


def adamw(base_lr: float, weight_decay: float, warmup_steps: int) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.base_lr = base_lr  # peak lr = base_lr * batch_size / 256
  o.scale_by_batch = True
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = weight_decay
  o.warmup_steps = warmup_steps
  o.min_lr = 0.0
  o.grad_clip = 0.0
  return o


_TRUE, _FALSE = ("1", "true", "yes", "y"), ("0", "false", "no", "n")


def _convert(config_file: str, key: str, text: str, default):
  """``text`` as the type of ``default`` (bool / int / float / str)."""
  kind = type(default)
  try:
    if kind is bool:
      if text.lower() in _TRUE + _FALSE:
        return text.lower() in _TRUE
      raise ValueError
    return kind(text)
  except ValueError:
    expected = {bool: "true or false", int: "an int", float: "a float"}.get(kind, kind.__name__)
    raise ValueError(f"{config_file}: config argument {key}={text!r}: expected {expected} (default "
                     f"{default!r})") from None


def _where(config_file: str) -> str:
  """``config_file`` relative to the working directory when it lies below it (as users type it)."""
  rel = os.path.relpath(config_file)
  return config_file if rel.startswith("..") else rel


def check_variant(config_file: str, variant: str, variants: Sequence[str]) -> None:
  if variant not in variants:
    raise ValueError(f"{_where(config_file)}: unknown variant {variant!r}{closest_names(variant, variants)} "
                     f"(variants: {', '.join(variants)})")


def parse_arg(arg: str | None, config_file: str, variants: Sequence[str], /, **spec) -> dict:
  """Parses the ``ARG`` of ``--config=FILE.py:ARG`` against the keys a config declares (big_vision style).

  ``spec`` declares every accepted key with its typed default, e.g. ``variant="tiny", fold=1, steps=0``.
  ``ARG`` is ``"key=value,..."``; a bare word is the variant (``"bp4d,fold=2"`` == ``"variant=bp4d,fold=2"``).
  Values are converted to the default's type. An undeclared key, a value of the wrong type or a variant not in
  ``variants`` raises ``ValueError`` naming the config file and the closest valid names.

  Returns:
    ``{key: value}`` for every key of ``spec`` (the default where ``ARG`` does not set it).
  """
  where = _where(config_file)
  if "variant" not in spec:
    raise TypeError("parse_arg: spec must declare variant=<default variant>")
  out = dict(spec)
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, eq, text = part.partition("=")
    key = key.strip()
    if not eq:
      key, text = "variant", part
    if key not in spec:
      raise ValueError(f"{where}: unknown config argument {key!r} in {arg!r}{closest_names(key, list(spec))} "
                       f"(accepted: {', '.join(spec)})")
    out[key] = _convert(where, key, text.strip(), spec[key])
  check_variant(config_file, out["variant"], variants)
  return out
