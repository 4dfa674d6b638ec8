"""``python -m maejax.main --config=configs/<stage>.py[:variant] --workdir=DIR [--config.key=value ...]``.

The console shows what maejax prints (stage, progress, results) and warnings; the full absl INFO log (Orbax,
clu, parameter tables, the config) goes to ``WORKDIR/main.log``. ``--verbosity=0`` (absl's flag) shows that INFO
log on the console too. A user error (bad config key or value, missing file, busy workdir) is one line on stderr
and exit status 2 (``--debug`` for its traceback); see ``maejax.cli``.

Multi-host (TPU pods, multi-GPU clusters): pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); on Cloud TPU
``--distributed`` alone lets JAX discover them.
"""

from __future__ import annotations

import os

# TensorFlow (imported by clu's metric writers; TensorBoard events are its only use here) prints start-up notices
# to stderr as it loads: the oneDNN notice unless TF_ENABLE_ONEDNN_OPTS is set (oneDNN only speeds up TF's own
# ops, which do no training math here), others below TF_CPP_MIN_LOG_LEVEL (2 keeps its errors). Set before
# anything imports TensorFlow; a value already in the environment wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging as py_logging  # noqa: E402

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maejax import cli, config_utils  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/<stage>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events, figures and main.log go "
                               "(default: ./workdir/<stage>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "host:port of process 0 for jax.distributed.")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                              "Number of JAX processes.")
_PID = flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ
                            else None, "This process's id.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulate this many CPU devices (testing sharding).")

STAGES = config_utils.STAGES


def run(config, workdir: str):
  """Dispatches one stage."""
  if config.stage == "mae_pretrain":
    from maejax.trainers import mae
    return mae.train(config, workdir)
  if config.stage == "distill":
    from maejax.trainers import distill
    return distill.train(config, workdir)
  if config.stage == "au_finetune":
    from maejax.trainers import au
    return au.train_finetune(config, workdir)
  if config.stage == "au_occl":
    from maejax.trainers import au
    return au.train_occl(config, workdir)
  raise ValueError(f"config.stage must be one of {STAGES}, got {config.stage!r}")


def init_distributed():
  """``jax.distributed.initialize`` from the flags / environment; must run before any other JAX call."""
  import jax
  # Cross-process collectives on the CPU backend (tests, CPU clusters); no effect on GPU / TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if _COORD.value:
    kw = dict(coordinator_address=_COORD.value, num_processes=_NPROC.value, process_id=_PID.value)
  jax.distributed.initialize(**kw)


def _not_orbax_warning(record: py_logging.LogRecord) -> bool:
  """Orbax's own records go to the file only: a warning on every read-only restore (each stage restores the one
  before), and on a failed save an error with a traceback from each of its writer threads, which
  :class:`maejax.checkpoints.CheckpointWriteError` sums up in one line."""
  # asyncio reports the same failed writes again as "exception was never retrieved" from Orbax's event loop.
  return f"{os.sep}orbax{os.sep}" not in record.pathname and f"{os.sep}asyncio{os.sep}" not in record.pathname


def route_console_log() -> None:
  """The console (absl's stderr handler) shows WARNING and above except Orbax's warnings, or the level of
  ``--verbosity`` when given; the loggers pass INFO on (for ``log_to_file``)."""
  verbosity_given = flags.FLAGS["verbosity"].present
  absl_level = flags.FLAGS.verbosity if verbosity_given else logging.WARNING
  logging.set_verbosity(max(absl_level, logging.INFO))  # absl levels: WARNING -1 < INFO 0 < DEBUG 1
  console = logging.get_absl_handler()
  console.setLevel(logging.converter.absl_to_standard(absl_level))
  if not verbosity_given:
    console.addFilter(_not_orbax_warning)


class _LogFile(py_logging.FileHandler):
  """The workdir's log file. A record that cannot be written (the workdir's disk is full) is dropped without the
  stderr report ``logging`` prints by default: the run's own error says that the disk is full."""

  def handleError(self, record: py_logging.LogRecord) -> None:
    del record


def log_to_file(workdir: str, process_index: int) -> str:
  """Adds ``WORKDIR/main.log`` (``main.process<N>.log`` on process N > 0), INFO and above in absl's format, to
  the root logger; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "main.log" if process_index == 0 else f"main.process{process_index}.log")
  handler = _LogFile(path)
  handler.setFormatter(logging.PythonFormatter())
  handler.setLevel(py_logging.INFO)
  py_logging.getLogger().addHandler(handler)
  return path


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
  config = _CONFIG.value
  if config is None:
    raise ValueError("--config is required, e.g. --config=configs/mae_pretrain.py")
  config_utils.validate(config)
  route_console_log()
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
  if _COORD.value or _DISTRIBUTED.value:
    init_distributed()
  import jax

  from maejax import checkpoints
  from maejax.trainers import common
  workdir = _WORKDIR.value or os.path.join("workdir", config.stage)
  with checkpoints.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    log = log_to_file(workdir, jax.process_index())
    print(f"maejax: stage {config.stage}, workdir {os.path.abspath(workdir)}, "
          f"{jax.process_count()} process(es), devices {jax.devices()}; log {log}", flush=True)
    try:
      result = run(config, workdir)
    except common.Preempted as e:  # a chained job stops at the preempted stage (exit 0, as a single stage does)
      print(f"maejax: {e}", flush=True)
      return 0
  if getattr(result, "losses", None) and jax.process_index() == 0:
    first, last = result.losses[0], result.losses[-1]
    print(f"maejax: {config.stage} done: loss {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} "
          f"(step {last[0]}); workdir {os.path.abspath(workdir)}", flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main, prog="maejax.main", config_flag="config", load_config=config_utils.load_config)
