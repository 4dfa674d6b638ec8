"""``python -m maejax.main --config=configs/<stage>.py[:variant] --workdir=DIR [--config.key=value ...]``.

Multi-host (TPU pods, multi-GPU clusters): pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``); on Cloud TPU
``--distributed`` alone lets JAX discover them.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/<stage>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard events and figures go "
                               "(default: ./workdir/<stage>).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
_COORD = flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                             "host:port of process 0 for jax.distributed.")
_NPROC = flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None,
                              "Number of JAX processes.")
_PID = flags.DEFINE_integer("process_id", int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ
                            else None, "This process's id.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "Simulate this many CPU devices (testing sharding).")

STAGES = ("mae_pretrain", "distill", "au_finetune", "au_occl")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CPU_DEVICES.value:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/mae_pretrain.py")
  if _COORD.value or _DISTRIBUTED.value:
    init_distributed()
  import jax
  workdir = _WORKDIR.value or os.path.join("workdir", config.stage)
  logging.set_verbosity(logging.INFO)
  print(f"maejax: stage {config.stage}, workdir {os.path.abspath(workdir)}, "
        f"{jax.process_count()} process(es), devices {jax.devices()}", flush=True)
  from maejax.trainers import common
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
  sys.exit(app.run(main))
