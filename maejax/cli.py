"""The command-line entry of every ``python -m maejax.X``: absl flags, and user errors as one line.

``run(main, prog="maejax.main")`` replaces ``app.run(main)``. A user error (a bad flag or config key, a missing
file, a busy workdir, a checkpoint that cannot be written) prints one line to stderr,
``<prog>: error: <what, where, what was expected>``, and exits with status 2; other exceptions are bugs and keep
their traceback. ``--debug`` (or ``MAEJAX_DEBUG=1``) shows the traceback of user errors too.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

EXIT_USER_ERROR = 2
# Exceptions that are the user's to fix (bad input, a path, a busy workdir); maejax raises them with a message
# that names the key or path and what was expected.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, flags.Error,
                                                app.UsageError)
# Raised while absl parses ``--config.key=value``: ml_collections' lookup of a key the config does not have.
OVERRIDE_ERRORS: tuple[type[BaseException], ...] = (KeyError, AttributeError)


def closest_names(name: str, valid: Sequence[str]) -> str:
  """``"; did you mean 'seed'?"`` for a misspelt ``name`` (empty when nothing in ``valid`` is close)."""
  close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
  return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class UserError(Exception):
  """A user error whose message is ready to print."""


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
  """``maejax.checkpoints``' user errors, where that module is loaded (else nothing can have raised them)."""
  module = sys.modules.get("maejax.checkpoints")
  return (module.CheckpointWriteError, module.WorkdirBusy) if module else ()


def debug_requested(argv: Sequence[str]) -> bool:
  """``--debug`` on the command line or ``MAEJAX_DEBUG=1``; read from ``argv`` because flag parsing may be
  what failed."""
  env = os.environ.get("MAEJAX_DEBUG", "").lower() not in ("", "0", "false", "no")
  return env or any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def one_line(e: BaseException) -> str:
  """The exception's message on one line (a KeyError's key unquoted)."""
  text = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
  text = " ".join(str(text).split())
  return text or type(e).__name__


def _config_path(config, dotted: str) -> str | None:
  """Why ``--config.<dotted>`` names no field of ``config`` (``None`` when it does)."""
  node, done = config, []
  for part in dotted.split("."):
    where = "config" + "".join(f".{k}" for k in done)
    if not hasattr(node, "keys"):
      return f"--config.{dotted}: {where} is a {type(node).__name__}, not a config with fields"
    if part not in node:
      return f"--config.{dotted}: {where} has no field {part!r}{closest_names(part, list(node.keys()))}"
    node, done = node[part], done + [part]
  return None


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
  """The last ``--flag=VALUE`` / ``--flag VALUE`` of ``argv``."""
  value = None
  for i, a in enumerate(argv):
    if a.startswith(f"--{flag}="):
      value = a.split("=", 1)[1]
    elif a == f"--{flag}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def explain_override_error(argv: Sequence[str], error: BaseException, flag: str,
                           load_config: Callable[[str], Any]) -> str:
  """Names the ``--config.a.b=…`` override of ``argv`` that the config lacks, with the closest field names.

  ml_collections reports only the missing key (``AttributeError: "'nosuchkey'"``), so the config is loaded
  again from ``--config=`` and each override's path is looked up."""
  spec = _flag_value(argv, flag)
  overrides = [a[len(flag) + 3:].split("=", 1)[0] for a in argv if a.startswith(f"--{flag}.")]
  if spec is not None:
    config = load_config(spec)
    for dotted in overrides:
      reason = _config_path(config, dotted)
      if reason:
        return reason
  return f"--{flag}.<key> override: unknown key {one_line(error)}"


def run(main: Callable[[list[str]], int | None], prog: str | None = None, config_flag: str | None = None,
        load_config: Callable[[str], Any] | None = None) -> None:
  """``app.run(main)`` with one-line user errors (see the module docstring); exits with main's return value.

  ``config_flag``: the name of an ``ml_collections.config_flags`` config-file flag. Its file is loaded with
  ``load_config`` (``maejax.config_utils.load_config``, passed in so that this module imports nothing of maejax)
  before absl parses the flags, because config_flags reports a missing
  file or a rejected ``:ARG`` as a traceback inside the message (or only when the config is first used), and
  an override of a missing key as the bare key.
  """
  prog = prog or os.path.basename(sys.argv[0])
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool("debug", False, "Show the traceback of user errors too (also: MAEJAX_DEBUG=1).")
  debug = debug_requested(sys.argv)

  def parse(argv: list[str]) -> list[str]:
    spec = _flag_value(argv, config_flag) if config_flag else None
    if spec:
      load_config(spec)
    try:
      return flags.FLAGS(argv)
    except OVERRIDE_ERRORS as e:
      if not config_flag:
        raise
      raise UserError(explain_override_error(argv, e, config_flag, load_config)) from e

  def main_(argv: list[str]) -> int | None:
    try:
      return main(argv)
    except app.UsageError as e:  # app.run would print the whole flag list with it
      raise UserError(str(e)) from e

  try:
    app.run(main_, flags_parser=parse)
  except (UserError, *USER_ERRORS, *_checkpoint_errors()) as e:
    if debug:
      raise
    print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)
