"""AU predictions for images, folders of images and videos, from a trained AU workdir.

``python -m maejax.predict --checkpoint=WORKDIR --input=PATH --output=preds.csv [--model=kd] [--batch_size=32]``

* ``WORKDIR``: an ``au_occl`` workdir (``--model=teacher`` → ``teacher/stage2``, ``--model=NAME`` →
  ``students/NAME``; default: the ``kd`` student when there is one, else the teacher), an ``au_finetune`` workdir
  (its ``stage2`` teacher) or one model's directory (holding ``checkpoints/``).
* ``PATH``: an image, a video (decoded with PyAV) or a folder of them (searched recursively, sorted).
* Faces are assumed to be **already cropped** to the face (as in training): each image / frame is resized to the
  model's input size, nothing else. No face detector is used, so nothing is downloaded.
* The CSV has one row per image / video frame: ``file``, ``frame`` (1-based, as OpenFace; 1 for a still image),
  ``timestamp`` (seconds, videos only), then ``AU01_p`` … (probability) and ``AU01_c`` … (occurrence,
  probability ≥ 0.5), named like OpenFace's ``AUxx_c`` columns.
* An unreadable file stops the run naming it, unless ``--skip_bad``: then it is skipped and listed in a summary.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from maejax import au_infer
from maejax.au_infer import LoadedAUModel
from maejax.data.images import IMAGE_EXTS, VIDEO_EXTS

THRESHOLD = 0.5  # the AU head's probabilities are thresholded at 0.5 (DESIGN §4), as in training and F1


def load_au_model(workdir: str, model: str = "", aus: Sequence[int] | None = None) -> LoadedAUModel:
  """``--checkpoint`` / ``--model`` / ``--aus`` → the restored model (:func:`maejax.au_infer.load`)."""
  return au_infer.load(workdir, model, aus)


# -------------------------------------------------------------------------------------------- the input


@dataclasses.dataclass
class Item:
  """One image or video frame: ``image`` uint8 (S, S, 3) resized to the model, or ``error`` when unreadable."""

  file: str
  frame: int
  timestamp: float | None = None
  image: np.ndarray | None = None
  error: str | None = None


def list_inputs(path: str) -> list[str]:
  """The image / video files of ``path`` (a file, or a folder searched recursively), sorted."""
  path = os.path.expanduser(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"--input: no file or folder {path}")
  out = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS + VIDEO_EXTS)]
  if not out:
    raise FileNotFoundError(f"--input: no images ({', '.join(IMAGE_EXTS)}) or videos "
                            f"({', '.join(VIDEO_EXTS)}) in {path}")
  return out


def is_video(path: str) -> bool:
  return path.lower().endswith(VIDEO_EXTS)


def _resize(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """RGB uint8 ``(size, size, 3)``: a plain resize (bicubic, as the evaluation pipeline), no crop."""
  im = image if isinstance(image, Image.Image) else Image.fromarray(image)
  im = im.convert("RGB")
  if im.size != (size, size):
    im = im.resize((size, size), Image.BICUBIC)
  return np.asarray(im, np.uint8)


def read_items(files: Sequence[str], size: int) -> Iterator[Item]:
  """Yields every image and every video frame of ``files``; an unreadable file yields one ``Item`` with
  ``error`` set (a video that fails midway keeps the frames decoded before the failure)."""
  for path in files:
    if is_video(path):
      yield from _video_items(path, size)
      continue
    try:
      with Image.open(path) as im:
        image = _resize(im, size)
    except Exception as e:  # noqa: BLE001 -- any decoder error means "unreadable"; reported with the path
      yield Item(path, 1, error=f"{type(e).__name__}: {e}")
      continue
    yield Item(path, 1, image=image)


def _video_items(path: str, size: int) -> Iterator[Item]:
  import av

  n = 0
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise ValueError("no video stream")
      for frame in container.decode(video=0):
        n += 1
        t = None if frame.time is None else float(frame.time)
        yield Item(path, n, t, _resize(frame.to_image(), size))
  except Exception as e:  # noqa: BLE001
    yield Item(path, n + 1, error=f"{type(e).__name__} after {n} frame(s): {e}")
    return
  if n == 0:
    yield Item(path, 1, error="no frames decoded")


def count_frames(files: Sequence[str]) -> int | None:
  """Images + video frames as the containers declare them (for the progress bar); None when unknown."""
  import av
  total = 0
  for path in files:
    if not is_video(path):
      total += 1
      continue
    try:
      with av.open(path) as c:
        n = c.streams.video[0].frames if c.streams.video else 0
    except Exception:  # noqa: BLE001 -- reported when it is decoded
      n = 0
    if not n:
      return None
    total += n
  return total


# ------------------------------------------------------------------------------------------------ run


def columns(aus: Sequence[int]) -> list[str]:
  """``file, frame, timestamp, AUxx_p…, AUxx_c…`` (OpenFace-style zero-padded AU numbers)."""
  return (["file", "frame", "timestamp"] + [f"AU{a:02d}_p" for a in aus] + [f"AU{a:02d}_c" for a in aus])


def _batches(items: Iterator[Item], batch_size: int, skip_bad: bool, bad: list[tuple[str, str]], bar=None):
  batch: list[Item] = []
  for it in items:
    if it.error is not None:
      if not skip_bad:
        raise ValueError(f"{it.file}: unreadable ({it.error}); pass --skip_bad to skip unreadable files")
      bad.append((it.file, it.error))
      if bar is not None:
        bar.update(1)
      continue
    batch.append(it)
    if len(batch) == batch_size:
      yield batch
      batch = []
  if batch:
    yield batch


def predict_path(loaded: LoadedAUModel, path: str, output: str, *, batch_size: int = 32, skip_bad: bool = False,
                 drop: str = "", drop_threshold: float = 0.5, progress: bool = True) -> dict[str, Any]:
  """Writes the CSV for ``path`` (see the module docstring); returns ``{"rows", "bad": [(file, error)], "output"}``.

  Batches are padded to ``batch_size`` (one compiled shape) and split over the local devices when
  ``batch_size`` is a multiple of their count.
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  if batch_size < 1:
    raise ValueError(f"--batch_size must be ≥ 1, got {batch_size}")
  files = list_inputs(path)
  size = loaded.img_size
  devices = jax.local_devices()
  sharding = None
  if len(devices) > 1 and batch_size % len(devices) == 0:
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    loaded = dataclasses.replace(loaded, variables=jax.device_put(loaded.variables, NamedSharding(mesh, P())))
  bar = None
  if progress:
    try:
      from tqdm.auto import tqdm
      bar = tqdm(total=count_frames(files), unit="img", desc="predict", file=sys.stderr)
    except ImportError:
      bar = None
  bad: list[tuple[str, str]] = []
  rows = 0
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + ".partial"  # renamed when complete: a failed run leaves no CSV that looks finished
  try:
    with open(tmp, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(columns(loaded.aus))
      for batch in _batches(read_items(files, size), batch_size, skip_bad, bad, bar):
        images = np.stack([it.image for it in batch])
        n = len(batch)
        if n < batch_size:
          images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, 0)])
        x = images if sharding is None else jax.device_put(images, sharding)
        # Rounded before thresholding, so every row's AUxx_c is exactly (AUxx_p ≥ 0.5) as written.
        probs = np.round(au_infer.predict_probs(loaded, x, drop, drop_threshold)[:n].astype(np.float64), 4)
        for it, p in zip(batch, probs, strict=True):
          ts = "" if it.timestamp is None else f"{it.timestamp:.3f}"
          w.writerow([it.file, it.frame, ts] + [f"{v:.4f}" for v in p] + [int(v >= THRESHOLD) for v in p])
        rows += n
        if bar is not None:
          bar.update(n)
    os.replace(tmp, output)
  finally:
    if bar is not None:
      bar.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  return {"rows": rows, "bad": bad, "output": os.path.abspath(output)}


def summary(result: Mapping[str, Any]) -> str:
  lines = [f"maejax.predict: {result['rows']} row(s) written to {result['output']}"]
  if result["bad"]:
    lines.append(f"skipped {len(result['bad'])} unreadable file(s):")
    lines += [f"  {path}: {err}" for path, err in result["bad"]]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  from absl import flags, logging
  del argv
  FLAGS = flags.FLAGS
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.ERROR)  # Orbax warns about every read-only checkpoint it opens
  import jax
  aus = [int(a) for a in FLAGS.aus.split(",")] if FLAGS.aus else None
  loaded = load_au_model(FLAGS.checkpoint, FLAGS.model, aus)
  print(f"maejax.predict: model {loaded.path} ({loaded.img_size} px input, AUs {list(loaded.aus)}), devices "
        f"{jax.devices()}", flush=True)
  result = predict_path(loaded, FLAGS.input, FLAGS.output, batch_size=FLAGS.batch_size, skip_bad=FLAGS.skip_bad,
                        drop=FLAGS.drop, drop_threshold=FLAGS.drop_threshold)
  print(summary(result), flush=True)
  return 0


def _define_flags():
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "An au_occl / au_finetune workdir, or one model's directory.",
                      required=True)
  flags.DEFINE_string("input", None, "An image, a video, or a folder of them (recursive). Faces must already "
                      "be cropped: each image / frame is only resized to the model's input; no face detector is "
                      "used.", required=True)
  flags.DEFINE_string("output", "preds.csv", "CSV to write (one row per image / frame).")
  flags.DEFINE_string("model", "", "teacher | a student name (kd, kd_drop, occl_aug, ...); default: kd when "
                      "trained, else teacher.")
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass (split over the local devices).")
  flags.DEFINE_bool("skip_bad", False, "Skip unreadable files and list them at the end (default: stop, naming "
                    "the file).")
  flags.DEFINE_string("aus", "", "Comma-separated AU numbers of the outputs (default: from the workdir's report, "
                      "else BP4D's 12 / DISFA's 8).")
  flags.DEFINE_enum("drop", "", ["", "pred"], "'pred': drop the patches the model's occlusion predictor finds "
                    "occluded (kd_drop student).")
  flags.DEFINE_float("drop_threshold", 0.5, "With --drop=pred: drop patches predicted more occluded than this.")


if __name__ == "__main__":
  from maejax import cli
  _define_flags()
  cli.run(main, prog="maejax.predict")
