r"""``maejax.predict`` throughput on a synthetic full-size video: frames/s of each stage (decode, face detection,
alignment, the AU model) and of the whole path, against the targets of issue 16.

  python benchmarks/predict.py                          # 100 frames 1040×1392 (BP4D size), fresh default model
  python benchmarks/predict.py --workdir=WORKDIR        # the au_occl job's student checkpoint (--model=kd)
  python benchmarks/predict.py --frames=20 --batch=8    # seconds, CPU check

The video (H.264, yuv420p, 25 frames/s, written with PyAV into a temporary folder) shows
``skimage.data.astronaut()`` scaled 1.8× on a grey canvas, sliding a few pixels per frame, so the tracker,
smoothing and alignment do their usual work. The run is ``predict.predict_path`` itself (CSV written, no overlay)
with an open detector; a first untimed run on the first frames compiles the model. Stage times are what
``predict_path`` measures per stage (``timings``); "whole path" is frames / wall time of the run.
Targets: detection + alignment ≤ 5 ms per frame; whole path ≥ 25 frames/s.
"""

from __future__ import annotations

import os
import tempfile
import time

import common as bc  # benchmarks/common.py; also puts the repo root on sys.path
import numpy as np
from absl import app, flags, logging
from PIL import Image

from maejax import faces, predict

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "An au_occl workdir: its --model student checkpoint is timed. Default: a "
                    "freshly initialised student of --config's size.")
flags.DEFINE_string("model", "kd", "Student (or teacher) of --workdir.")
flags.DEFINE_string("config", "configs/au_occl.py", "Config whose kd student is initialised without --workdir.")
flags.DEFINE_integer("frames", 100, "Frames of the synthetic video.")
flags.DEFINE_integer("height", 1392, "Frame height (BP4D: 1392).")
flags.DEFINE_integer("width", 1040, "Frame width (BP4D: 1040).")
flags.DEFINE_integer("batch", 32, "predict --batch_size.")

TARGET_DETECT_ALIGN_MS = 5.0
TARGET_FPS = 25.0


def write_video(path: str, n: int, height: int, width: int) -> None:
  import av
  import skimage.data
  face = Image.fromarray(skimage.data.astronaut())
  face = np.asarray(face.resize((round(face.width * 1.8), round(face.height * 1.8)), Image.BILINEAR))
  fh, fw = face.shape[:2]
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=25)
    stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
    for t in range(n):
      frame = np.full((height, width, 3), 120, np.uint8)
      x = (width - fw) // 2 + int(20 * np.sin(t / 10))
      y = (height - fh) // 2 + 2 * (t % 40) - 40
      frame[max(y, 0):y + fh, max(x, 0):x + fw] = face[max(-y, 0):height - y, max(-x, 0):width - x]
      for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def fresh_model(spec: str):
  """A kd student of ``spec``'s size, freshly initialised (the cost does not depend on the weights)."""
  import flax
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from maejax import au_infer, config_utils
  from maejax.trainers import au
  config = config_utils.load_config(spec)
  run = au.student_runs(config)["kd"]
  cfg = au.student_config(config.model, run)
  model = cfg.build()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, model.img_size, model.img_size, 3)))
  variables = flax.core.unfreeze(nn.meta.unbox(variables))
  variables.pop("occlusion", None)
  aus = au_infer.default_aus(model.num_aus)
  return au_infer.LoadedAUModel(model, variables, aus, f"fresh init of {spec} student 'kd'", cfg)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.workdir:
    loaded = predict.load_au_model(FLAGS.workdir, FLAGS.model)
    which = f"checkpoint {loaded.path}"
  else:
    loaded = fresh_model(FLAGS.config)
    which = loaded.path + " (no --workdir: weights random, timing only)"
  m = loaded.model
  with tempfile.TemporaryDirectory(prefix="maejax_bench_") as tmp, faces.FaceDetector() as detector:
    video = os.path.join(tmp, "clip.mp4")
    short = os.path.join(tmp, "warm.mp4")
    _, write_s = bc.timed(lambda: write_video(video, FLAGS.frames, FLAGS.height, FLAGS.width))
    write_video(short, min(FLAGS.batch + 1, FLAGS.frames), FLAGS.height, FLAGS.width)
    t0 = time.perf_counter()
    predict.predict_path(loaded, short, os.path.join(tmp, "warm.csv"), batch_size=FLAGS.batch, progress=False,
                         detector=detector)  # compiles the model's batch shape
    warm_s = time.perf_counter() - t0
    res = predict.predict_path(loaded, video, os.path.join(tmp, "p.csv"), batch_size=FLAGS.batch,
                               progress=False, detector=detector)
  n, t = res["frames"], res["timings"]
  rows = []
  for stage in ("decode", "detect", "align", "model"):
    rows.append([stage, f"{1e3 * t[stage] / n:.2f}", f"{n / t[stage]:.1f}" if t[stage] else "-", ""])
  da = 1e3 * (t["detect"] + t["align"]) / n
  rows.append(["detect + align", f"{da:.2f}", f"{1e3 / da:.1f}", bc.verdict(da, TARGET_DETECT_ALIGN_MS, False)])
  fps = n / res["seconds"]
  rows.append(["whole path (wall)", f"{1e3 / fps:.2f}", f"{fps:.1f}", bc.verdict(fps, TARGET_FPS)])

  print()
  print(bc.machine_info())
  print(f"model: {which}; ViT width {m.width} depth {m.depth} patch {m.patch_size}, {m.img_size} px, "
        f"{m.num_aus} AUs; batch {FLAGS.batch}")
  print(f"video: {n} frames {FLAGS.width}×{FLAGS.height} H.264 (written in {write_s:.1f} s); faces found "
        f"{res['faces']}, frames without a face {res['no_face']}, carried {res['carried']}; compile run "
        f"{warm_s:.1f} s (untimed)")
  print(bc.table(["stage", "ms / frame", "frames/s", "target"], rows, "maejax.predict --faces=detect"))


if __name__ == "__main__":
  app.run(main)
