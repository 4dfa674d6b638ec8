r"""Input pipeline throughput (images/s) vs what the default MAE train step consumes.

  python benchmarks/pipeline.py                       # 64 and 224 px, 0 and 2 grain workers, rendered and
                                                      # cached faces, + tiny train step
  python benchmarks/pipeline.py --sizes=64 --workers=0 --batches=3 --min_seconds=0 --steps=2   # quick check

Pipelines (the project's own ``maejax.data.pipeline.build``: shuffle → random_map(augment) → batch):
  * ``mae``: synthetic faces at the size, RandomResizedCrop(0.2–1, bicubic) + flip (``mae_pipeline``);
  * ``au+occl``: synthetic faces + flip + a random training occlusion (``occlusion.sample_occlusion``, placed
    with the face's landmarks, random fill) and its per-patch occluded fraction, as the occluded-AU stage
    needs.
Two sources of faces:
  * ``rendered``: ``SynthFaces`` draws every face on request (``data.cache_dir=""``);
  * ``cached``: the render cache (``maejax.data.face_cache``, ``data.cache_dir``, default the configs' own
    ``~/.cache/maejax/synthfaces``, so a cache a training run made is reused). It is built (or found) before
    any timing; the time that took is printed per size (``built`` = rendered by this run, ``reused`` = found).
Two figures per pipeline:
  * ``1-thread images/s``: the per-image work (source + augmentation) run sequentially in this process: what
    one core delivers, unaffected by grain's read-ahead (≥ ``--elements`` images and ≥ ``--min_seconds``);
  * ``grain images/s``: ``batches × batch / time from creating the iterator to receiving the last batch``,
    reading ≥ ``--batches`` batches and for ≥ ``--min_seconds`` (the ``batches`` column says how many).
    grain reads ahead (16 threads in-process, or worker processes, with buffers of hundreds of BATCHES since
    batching happens before ``to_iter_dataset``), so timing batches after a warm-up would mostly time the
    buffer; counting from creation includes start-up (printed too: time to the first batch, ~0.3 s
    in-process, seconds with worker processes) and is a conservative figure; ``--min_seconds`` spreads that
    start-up over a few seconds of reading, as a training run spreads it over its steps (a fast source would
    otherwise be timed mostly on start-up). ``images/s after 1st`` leaves start-up out (and may count some
    read-ahead).
Pipelines run one at a time and each is stopped (threads joined, worker processes ended) before the next
figure: grain's read-ahead would otherwise go on working and steal cores from everything timed after it. The
train step is timed in the same process afterwards. On this machine the pipeline and the step compete
for the same cores during training; the ratio says how much headroom the pipeline has in isolation.
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from maejax import config_utils
from maejax.data import face_cache, occlusion, pipeline
from maejax.trainers import mae as mae_trainer

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["64", "224"], "image sizes")
flags.DEFINE_list("workers", ["0", "2"], "grain worker counts")
flags.DEFINE_list("views", ["mae", "au+occl"], "pipelines to time")
flags.DEFINE_integer("batch", 0, "pipeline batch size; 0 = the tiny config's batch size")
flags.DEFINE_integer("batches", 12, "least batches per grain pipeline")
flags.DEFINE_integer("elements", 64, "least images for the 1-thread figure")
flags.DEFINE_float("min_seconds", 3.0, "least seconds per figure (grain's start-up is amortised over them)")
flags.DEFINE_integer("steps", 5, "timed train steps (median reported)")
flags.DEFINE_list("sources", ["rendered", "cached"], "face sources: rendered on request and/or the render cache")
flags.DEFINE_string("cache_dir", "", "render cache directory (default: the config's data.cache_dir)")
flags.DEFINE_string("config", "", "config argument of configs/mae_pretrain.py (default: the tiny config)")


def load_config(arg: str | None):
  """``configs/mae_pretrain.py``'s ``get_config(arg)``, loaded by path (configs/ is not a package)."""
  path = os.path.join(bc.ROOT, "configs", "mae_pretrain.py")
  return config_utils.load_config(f"{path}:{arg}" if arg else path)


@dataclasses.dataclass(frozen=True)
class OccludedAUView:
  """Flip + a random training occlusion (as the occluded-AU stage sees faces): image, labels, patch
  fractions."""

  patch_size: int

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image = np.asarray(record["image"])
    occluded, _, frac = occlusion.sample_occlusion(image, rng, self.patch_size,
                                                   landmarks=record.get("landmarks"))
    if rng.random() < 0.5:
      occluded = occluded[:, ::-1]  # occlusion placed with the landmarks first, then the flip
      g = int(round(frac.size**0.5))
      frac = frac.reshape(g, g)[:, ::-1].reshape(-1)
    return {"image": np.ascontiguousarray(occluded), "au": record["au"],
            "patch_fraction": np.ascontiguousarray(frac)}


def data_config(data_cfg, size: int, source: str):
  """``data_cfg`` at ``size`` px reading faces from ``source`` ("rendered" or "cached")."""
  if source not in ("rendered", "cached"):
    raise ValueError(f"unknown source {source!r}; expected 'rendered' or 'cached'")
  cfg = data_cfg.copy_and_resolve_references()
  cfg.image_size = size
  cfg.cache_dir = (FLAGS.cache_dir or data_cfg.cache_dir) if source == "cached" else ""
  return cfg


def make_pipeline(view: str, data_cfg, size: int, batch: int, workers: int, patch: int):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.worker_count = workers
  if view == "mae":
    return pipeline.mae_pipeline(cfg, batch, size, seed=0)
  if view == "au+occl":
    return pipeline.build(pipeline.make_source(cfg, "train"), global_batch_size=batch, seed=0,
                          augment=OccludedAUView(patch), worker_count=workers)
  raise ValueError(f"unknown view {view!r}; expected 'mae' or 'au+occl'")


def stop(it, threads_before: set[threading.Thread]) -> None:
  """Stops a grain iterator's read-ahead now: its threads otherwise keep producing batches until the iterator is
  garbage-collected, stealing cores from every later measurement (the train step's included)."""
  close = getattr(it, "close", None)
  if close is not None:
    close()  # cancels pending work and stops worker processes
  del it
  gc.collect()
  # Running tasks (≤ one batch each) finish before their threads exit. (grain also leaves an idle thread pool.)
  busy = lambda: ([t.name for t in set(threading.enumerate()) - threads_before if t.name.startswith("grain")]
                  + [p.name for p in multiprocessing.active_children()])
  deadline = time.perf_counter() + 30
  while busy() and time.perf_counter() < deadline:
    time.sleep(0.05)
  if busy():
    logging.warning("still running after the pipeline stopped: %s", sorted(busy()))


def time_grain(ds, batch: int, batches: int, min_seconds: float) -> tuple[float, float, float, int]:
  """``(images/s from iterator creation to the last batch, seconds to the first batch, images/s after the first
  batch, batches read)``, reading at least ``batches`` batches and for at least ``min_seconds``. The third can be
  flattered by work the read-ahead did before the first batch came out (at most the batches in flight); the
  first includes start-up."""
  threads = set(threading.enumerate())
  t0 = time.perf_counter()
  it = iter(ds)
  first = None
  n = 0
  while n < batches or time.perf_counter() - t0 < min_seconds:
    b = next(it)
    n += 1
    first = time.perf_counter() - t0 if first is None else first
  total = time.perf_counter() - t0
  if b["image"].shape[0] != batch:
    raise ValueError(f"expected batches of {batch}, got {b['image'].shape}")
  stop(it, threads)
  after_first = (n - 1) * batch / (total - first) if n > 1 else float("nan")
  return n * batch / total, first, after_first, n


def time_one_thread(view: str, cfg, size: int, patch: int, elements: int, min_seconds: float) -> float:
  """Images/s of source + augmentation run sequentially in this process (≥ ``elements`` images, ≥
  ``min_seconds``)."""
  source = pipeline.make_source(cfg, "train")
  augment = (pipeline.MAEAugment(size, tuple(cfg.get("crop_scale", (0.2, 1.0)))) if view == "mae"
             else OccludedAUView(patch))
  rng = np.random.default_rng(0)
  order = rng.permutation(len(source))
  t = time.perf_counter()
  n = 0
  while n < elements or time.perf_counter() - t < min_seconds:
    augment(source[int(order[n % len(order)])], rng)
    n += 1
  return n / (time.perf_counter() - t)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = load_config(FLAGS.config)
  batch = FLAGS.batch or config.batch_size
  sizes = [int(s) for s in FLAGS.sizes]
  cache_notes = []
  if "cached" in FLAGS.sources:  # build (or find) every cache before anything is timed
    for size in sizes:
      cfg = data_config(config.data, size, "cached")
      t = time.perf_counter()
      path, built = face_cache.ensure_cache(cfg.seed, cfg.num_subjects, cfg.frames_per_subject, size,
                                            cfg.cache_dir)
      cache_notes.append(f"{size}px cache {'built' if built else 'reused'} in {time.perf_counter() - t:.1f} s: "
                         f"{path}")
      print("  " + cache_notes[-1], flush=True)
  rows = []
  results = {}
  for view in FLAGS.views:
    for size in sizes:
      patch = config.model.patch_size if size == config.model.img_size else 16
      for source in FLAGS.sources:
        cfg = data_config(config.data, size, source)
        one = time_one_thread(view, cfg, size, patch, FLAGS.elements, FLAGS.min_seconds)
        print(f"  {view} {source} {size}px, 1 thread: {one:.1f} images/s", flush=True)
        for workers in (int(w) for w in FLAGS.workers):
          with bc.RssSampler() as rss:
            ips, first, after, n = time_grain(make_pipeline(view, cfg, size, batch, workers, patch), batch,
                                              FLAGS.batches, FLAGS.min_seconds)
          results[(view, source, size, workers)] = ips
          print(f"  {view} {source} {size}px workers={workers}: {ips:.1f} images/s", flush=True)
          rows.append([view, source, size, workers, batch, n, f"{one:.1f}", f"{ips:.1f}", f"{first:.1f}",
                       f"{after:.1f}", f"{rss.peak:.0f}"])

  # What the default (tiny) train step consumes, in the same process.
  model = mae_trainer.build_model(config.model)
  img = model.img_size
  dummy = jnp.zeros((1, img, img, 3), jnp.float32)
  images = np.random.default_rng(0).integers(0, 256, (config.batch_size, img, img, 3), dtype=np.uint8)
  step = bc.jax_train_case("tiny MAE train step", lambda r: model.init({"params": r, "masking": r}, dummy),
                           mae_trainer.mae_loss_fn(model), {"image": images})
  bc.run_interleaved([step], FLAGS.steps, warmup=1, log=lambda s: None)

  print()
  print(bc.machine_info([f"config: configs/mae_pretrain.py:{FLAGS.config or 'tiny'} "
                         f"({img}px, patch {model.patch_size}, width {model.width}, depth {model.depth}, "
                         f"batch {config.batch_size}); synthfaces {config.data.num_subjects} subjects × "
                         f"{config.data.frames_per_subject} frames", *cache_notes]))
  print(bc.table(["view", "faces", "px", "grain workers", "batch", "batches", "1-thread images/s",
                  "grain images/s", "s to 1st batch", "images/s after 1st", "peak RSS MiB"], rows,
                 f"Input pipeline (synthetic faces; grain: ≥ {FLAGS.batches} batches and ≥ {FLAGS.min_seconds:g} s "
                 "from iterator creation)"))
  print()
  print(bc.case_table([step], f"Train step consumption ({img}px tiny config, jitted, AdamW)"))
  print()
  consume = step.items_per_s
  ratio_rows = []
  for (view, source, size, workers), ips in results.items():
    if size == img:
      r = ips / consume
      ratio_rows.append([f"{view} {source} {size}px, {workers} workers / train step", f"{r:.2f}x",
                         bc.verdict(r, 3.0) if view == "mae" else "(AU stage: no step to compare yet)"])
  print(bc.table(["pipeline images/s ÷ step images/s", "ratio", "target"], ratio_rows))


if __name__ == "__main__":
  app.run(main)
