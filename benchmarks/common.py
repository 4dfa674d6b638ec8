"""Timing helpers shared by the benchmark scripts.

Every script measures all the cases of its table in ONE process, interleaving them step by step
(``run_interleaved``), so that a neighbour's load on a shared machine hits every case alike and the ratios
stay meaningful even when the absolute times drift. Each figure is the median of the timed steps; warm-up steps
(after compilation) are not timed, and compilation is timed separately.

Memory: on CPU a background thread samples the process RSS while each case runs (``peak RSS``: the whole
process, so it includes every model the script holds); for jitted functions XLA's own ``memory_analysis`` of
the compiled step (arguments + temporaries) is the per-case figure.

CPU time: the process's CPU seconds per step (all threads, ``time.process_time``), median. On a loaded
machine it is less sensitive than wall time to how much of the cores other processes take (threads waiting
for a core use none), though spin-waiting threads (OpenMP barriers) do count. On GPU/TPU ``memory_stats()`` is read
after each case (its peak is process-wide and only grows).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# Make `maejax` and `configs` importable when a script is run as `python benchmarks/x.py`.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def num_cores() -> int:
  """CPU cores this process may run on (cgroup/affinity aware where the OS tells us)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def machine_info(extra: Sequence[str] = ()) -> str:
  """One block of text: host, cores, load, versions, JAX backend and device kind."""
  import jax
  lines = [f"host: {platform.node()} {platform.machine()} {_cpu_model()}; cores: {num_cores()}; "
           f"load avg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"]
  versions = [f"python {platform.python_version()}", f"jax {jax.__version__}"]
  for mod in ("jaxlib", "flax", "optax", "torch", "transformers", "grain"):
    m = sys.modules.get(mod)
    if m is not None and hasattr(m, "__version__"):
      versions.append(f"{mod} {m.__version__}")
  lines.append("versions: " + ", ".join(versions))
  dev = jax.devices()[0]
  lines.append(f"jax backend: {jax.default_backend()}, {jax.device_count()} device(s), "
               f"kind {dev.device_kind!r}")
  lines.extend(extra)
  return "\n".join(lines)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


# ------------------------------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
  """Peak RSS of this process since it started (``ru_maxrss``; KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
  try:
    import psutil
    return psutil.Process().memory_info().rss / 2**20
  except ImportError:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
  """Samples the process RSS every ``interval`` seconds on a thread; ``peak`` per ``with`` block."""

  def __init__(self, interval: float = 0.02):
    self.interval = interval
    self.peak = 0.0
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, current_rss_mib())
      self._stop.wait(self.interval)

  def __enter__(self):
    self.peak = current_rss_mib()
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self.peak = max(self.peak, current_rss_mib())


def device_memory_gib() -> tuple[float, float] | None:
  """``(bytes_in_use, peak_bytes_in_use)`` in GiB of the first accelerator, or None on CPU."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return None
  stats = dev.memory_stats() or {}
  return stats.get("bytes_in_use", 0) / 2**30, stats.get("peak_bytes_in_use", 0) / 2**30


def xla_memory_gib(compiled: Any) -> float | None:
  """Arguments + outputs + temporaries − aliased (donated) bytes of a compiled XLA executable, in GiB."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - getattr(m, "alias_size_in_bytes", 0))
  return total / 2**30


def xla_flops(compiled: Any) -> float | None:
  """XLA's cost-analysis FLOP count of a compiled executable (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


# ------------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Case:
  """One row of a table. ``step()`` runs one step and BLOCKS until its results are ready."""

  name: str
  step: Callable[[], Any]
  items_per_step: int = 1  # images per step, for images/s
  compile_s: float | None = None
  memory_gib: float | None = None  # XLA's memory analysis of the compiled step, where there is one
  flops: float | None = None
  times: list[float] = dataclasses.field(default_factory=list)
  cpu_times: list[float] = dataclasses.field(default_factory=list)  # process CPU seconds (all threads)
  peak_rss_mib: float = 0.0
  device_peak_gib: float | None = None
  notes: str = ""
  compiled: Any = None  # the compiled XLA executable, where there is one (for its HLO text in profiles)

  @property
  def median(self) -> float:
    return statistics.median(self.times) if self.times else float("nan")

  @property
  def cpu_median(self) -> float:
    return statistics.median(self.cpu_times) if self.cpu_times else float("nan")

  @property
  def spread(self) -> str:
    return f"{min(self.times):.3f}–{max(self.times):.3f}" if self.times else "-"

  @property
  def items_per_s(self) -> float:
    return self.items_per_step / self.median


def run_interleaved(cases: Sequence[Case], steps: int, warmup: int = 1, log: Callable[[str], None] = print
                    ) -> None:
  """``warmup`` untimed steps per case, then ``steps`` timed rounds; each round runs every case once."""
  for c in cases:
    with RssSampler() as s:
      for _ in range(warmup):
        t = time.perf_counter()
        c.step()
        log(f"  warm-up {c.name}: {time.perf_counter() - t:.3f}s")
    c.peak_rss_mib = max(c.peak_rss_mib, s.peak)
  for r in range(steps):
    for c in cases:
      with RssSampler() as s:
        t, cpu = time.perf_counter(), time.process_time()
        c.step()
        dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
      c.times.append(dt)
      c.cpu_times.append(dcpu)
      c.peak_rss_mib = max(c.peak_rss_mib, s.peak)
      mem = device_memory_gib()
      if mem is not None:
        c.device_peak_gib = mem[1]
      log(f"  round {r + 1}/{steps} {c.name}: {dt:.3f}s")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


# -------------------------------------------------------------------------------------------------- tables


def fmt(x: float | None, spec: str = ".3f", none: str = "-") -> str:
  return none if x is None else format(x, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
  """A GitHub-markdown table (pastes into READMEs and issues as is)."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
  out = [title] if title else []
  out += [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  out += [line(r) for r in cells[1:]]
  return "\n".join(out)


def case_table(cases: Sequence[Case], title: str = "") -> str:
  """Step time (median, min–max), images/s, compile time and memory for every case."""
  headers = ["case", "median s/step", "min–max", "CPU s/step", "images/s", "compile s", "XLA mem GiB",
             "peak RSS MiB"]
  if any(c.device_peak_gib is not None for c in cases):
    headers.append("device peak GiB")
  rows = []
  for c in cases:
    row = [c.name, f"{c.median:.3f}", c.spread, f"{c.cpu_median:.2f}", f"{c.items_per_s:.1f}",
           fmt(c.compile_s, ".1f"), fmt(c.memory_gib, ".2f"), f"{c.peak_rss_mib:.0f}"]
    if len(headers) > 8:
      row.append(fmt(c.device_peak_gib, ".2f"))
    rows.append(row)
  return table(headers, rows, title)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
  ok = value >= target if higher_is_better else value <= target
  return f"{'MET' if ok else 'MISSED'} (target {'≥' if higher_is_better else '≤'} {target:g})"


# ------------------------------------------------------------------------------------------- jax train steps


def optim_config(base_lr: float = 1.5e-4):
  """The MAE pretraining AdamW (β 0.9/0.95, wd 0.05 without biases/LN), no warm-up: what a step costs."""
  import ml_collections
  return ml_collections.ConfigDict({"base_lr": base_lr, "scale_by_batch": True, "b1": 0.9, "b2": 0.95,
                                    "weight_decay": 0.05, "warmup_steps": 0, "min_lr": 0.0,
                                    "grad_clip": 0.0})


def jax_train_case(name: str, init_fn: Callable, loss_fn: Callable, batch: dict, seed: int = 0,
                   optim: Any = None) -> Case:
  """A :class:`Case` running the project's own jitted train step (``trainers.common.create_trainer``: sharded
  state, donated, AdamW) on one device, on a fixed ``batch`` (dict of numpy arrays; masking differs per step).

  Compile time = trace + lower + XLA compile of the step; the case then calls the compiled executable.
  """
  import jax

  from maejax import sharding
  from maejax.trainers import common as tc
  batch_size = len(next(iter(batch.values())))
  tx, _ = tc.make_optimizer(optim or optim_config(), batch_size, total_steps=10_000)
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  trainer = tc.create_trainer(init_fn, loss_fn, tx, mesh, sharding.DEFAULT_RULES, seed)
  gbatch = sharding.global_batch(batch, mesh)
  compiled, compile_s = timed(lambda: trainer.step_fn.lower(trainer.state, gbatch).compile())
  holder = {"state": trainer.state}

  def step():
    state, metrics = compiled(holder["state"], gbatch)
    holder["state"] = state
    jax.block_until_ready((state, metrics))
    return metrics

  return Case(name, step, batch_size, compile_s=compile_s, memory_gib=xla_memory_gib(compiled),
              flops=xla_flops(compiled), compiled=compiled)


# ------------------------------------------------------------------------------------------------ profiles

_GEMM_KERNEL = re.compile(r"gemm|xmma|nvjet|cutlass|wgmma|cublas|matmul|triton_dot", re.I)
_ATTN_KERNEL = re.compile(r"sdpa|fmha|flash|attention", re.I)  # cuDNN's fused attention kernels (matched first)


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name → its ``op_name`` metadata (the jax/flax source path) in a compiled module's HLO text."""
  names = {}
  for m in re.finditer(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"', hlo_text,
                       re.M):
    names.setdefault(m.group(1), m.group(2))
    names.setdefault(m.group(1).replace(".", "_"), m.group(2))  # GPU kernels are named with "_" for "."
  return names


def hlo_matmul_ops(hlo_text: str) -> set[str]:
  """Names of the instructions of a compiled module that are matmuls: ``dot`` / ``convolution`` instructions
  and fusions whose computation holds one (on CPU, XLA wraps every dot in a YNNPACK/oneDNN fusion whose kernel
  name says nothing). Also under the "_" spelling, as for :func:`hlo_op_names`."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)}
  has_dot = {c for c, body in bodies.items() if re.search(r"\s(?:dot|convolution)\(", body)}
  out = set()
  for m in re.finditer(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+(\w+)\((.*)$", hlo_text, re.M):
    name, op, rest = m.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if op in ("dot", "convolution") or (op == "fusion" and called and called.group(1) in has_dot):
      out |= {name, name.replace(".", "_")}
  return out


def _op_group(op_name: str) -> str:
  """``jit(step)/transpose(jvp(MAE))/decoder/decoder_blocks_3/attn/query/dot_general`` →
  ``bwd decoder/decoder_blocks_*/attn/query/dot_general``: pass, module path without block indices, primitive."""
  if not op_name:
    return "(no metadata)"
  phase = "bwd" if "transpose(" in op_name else ("fwd" if "jvp(" in op_name else "   ")
  parts = [p for p in op_name.split("/") if not p.startswith(("jit(", "jvp(", "transpose("))]
  return f"{phase} " + re.sub(r"_\d+(?=/|$)", "_*", "/".join(parts))


def profile_case(case: Case, steps: int, log_dir: str, top: int = 30) -> str:
  """Runs ``steps`` steps of ``case`` under ``jax.profiler.trace`` and summarises the device time per step.

  Reads the trace's ``*.trace.json.gz`` (written by jaxlib itself; no TensorBoard plugin needed). Device
  events (GPU/TPU streams; host XLA threads on CPU) are attributed to HLO instructions (``args.hlo_op``) and,
  through the compiled HLO's metadata, to the flax module path that emitted them. Prints: busy time per step vs
  the measured step time (the rest is idle: launch gaps or host work), a kernel-class split (matmul, fused
  attention, everything else) and the ``top`` groups by time.
  """
  import glob
  import gzip
  import json
  import shutil

  import jax
  shutil.rmtree(log_dir, ignore_errors=True)
  case.step()  # nothing left from before in the queue
  t = time.perf_counter()
  with jax.profiler.trace(log_dir):
    for _ in range(steps):
      case.step()
  wall = (time.perf_counter() - t) / steps
  files = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")))
  if not files:
    return f"profile of {case.name}: no trace file under {log_dir}"
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {p for p, n in procs.items() if "/device:" in n}
  # GPU traces hold the kernels on "Stream #…" lines and derived copies of them ("XLA Ops", "XLA Modules"):
  # count the streams only; TPU traces have the "XLA Ops" line; CPU traces the host XLA threads.
  dev_threads = {k: n for k, n in threads.items() if k[0] in device_pids}
  keep = ({k for k, n in dev_threads.items() if "stream" in n.lower()}
          or {k for k, n in dev_threads.items() if n == "XLA Ops"} or set(dev_threads))
  if device_pids:
    ops = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in keep]
  else:
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
  counts: dict[str, int] = {}
  for e in ops:
    line = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
    counts[line] = counts.get(line, 0) + 1
  hlo_text = case.compiled.as_text() if case.compiled is not None else ""
  names, matmuls = hlo_op_names(hlo_text), hlo_matmul_ops(hlo_text)
  groups: dict[str, float] = {}
  classes = {"matmul kernels": 0.0, "fused attention kernels": 0.0, "other (elementwise, reductions, copies)": 0.0}
  kernels: dict[str, float] = {}
  for e in ops:
    dur = e.get("dur", 0.0) / 1e3 / steps  # ms per step
    hlo_op = e.get("args", {}).get("hlo_op")
    g = _op_group(names.get(hlo_op, "")) if hlo_op else f"(kernel without hlo_op) {e['name'][:50]}"
    groups[g] = groups.get(g, 0.0) + dur
    key = ("fused attention kernels" if _ATTN_KERNEL.search(e["name"]) else
           "matmul kernels" if _GEMM_KERNEL.search(e["name"]) or hlo_op in matmuls else
           "other (elementwise, reductions, copies)")
    classes[key] += dur
    kernels[e["name"][:60]] = kernels.get(e["name"][:60], 0.0) + dur
  busy = sum(classes.values())
  step_ms = wall * 1e3
  out = [f"profile of {case.name}: {steps} steps traced ({files[-1]}), {len(ops) // max(steps, 1)} device ops "
         f"per step; {'device streams' if device_pids else 'host XLA threads (no device streams)'}: "
         + ", ".join(f"{n!r} {c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])[:6]),
         f"step {step_ms:.2f} ms (traced), device busy {busy:.2f} ms ({100 * busy / step_ms:.0f} %; summed over "
         "streams and threads, so it can exceed 100 % where they overlap)"]
  out.append(table(["kernel class", "ms/step", "% of busy"],
                   [[k, f"{v:.2f}", f"{100 * v / max(busy, 1e-9):.1f}"] for k, v in classes.items()]))
  rows = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
  out.append(table(["pass + module path + primitive", "ms/step", "% of busy"],
                   [[g, f"{v:.3f}", f"{100 * v / max(busy, 1e-9):.1f}"] for g, v in rows],
                   f"top {len(rows)} of {len(groups)} groups"))
  krows = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
  out.append(table(["kernel (first 60 chars)", "ms/step", "% of busy"],
                   [[k.replace("|", "/"), f"{v:.3f}", f"{100 * v / max(busy, 1e-9):.1f}"] for k, v in krows],
                   "top kernels"))
  return "\n\n".join(out)
