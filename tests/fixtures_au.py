"""Generators of tiny BP4D / DISFA trees in the official layouts, with their ground truth.

Every image is 64×48 (W×H): a solid colour in the centred 48×48 square (columns 8..55, 8-aligned so JPEG
blocks do not mix it with the border) and a near-black border outside it, so a correct centre crop is one flat
colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 48
BORDER = (8, 8, 8)

# The AU lists and a subject of each part, typed from DESIGN.md §6 (independent of maejax.data.folds).
BP4D_AUS = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS = (1, 2, 4, 6, 9, 12, 25, 26)
BP4D_FIXTURE_SUBJECTS = ("F001", "M011", "F007")  # parts 1, 2, 3
DISFA_FIXTURE_SUBJECTS = ("SN001", "SN013", "SN003")  # parts 1, 2, 3


def face_image(colour: tuple[int, int, int]) -> np.ndarray:
  """uint8 (48, 64, 3): `colour` in the centred 48×48 square, BORDER outside it."""
  image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
  image[:] = BORDER
  left = (WIDTH - HEIGHT) // 2
  image[:, left:left + HEIGHT] = colour
  return image


def write_image(path: Path, image: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pil = Image.fromarray(image)
  if path.suffix.lower() in (".jpg", ".jpeg"):
    pil.save(path, format="JPEG", quality=95, subsampling=0)
  else:
    pil.save(path)


def corrupt(path: Path) -> None:
  """Overwrites an image with bytes that no decoder accepts (keeps the name)."""
  path.write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete JPEG" + bytes(range(50)))


def _colour(i: int, j: int, k: int) -> tuple[int, int, int]:
  return (60 + 30 * i % 180, 70 + 45 * j % 170, 80 + 25 * k % 160)


def make_bp4d(root: Path, *, subjects=BP4D_FIXTURE_SUBJECTS, tasks=("T1", "T2"), n_frames: int = 5,
              first_frame: int = 10, images_subdir: str = "2D+3D", seed: int = 0, image_fn=None) -> dict:
  """Writes <root>/AUCoding/AU_OCC/<s>_<t>.csv and <root>/<images_subdir>/<s>/<t>/<frame>.jpg.

  The first subject's images are zero-padded (0010.jpg), the others not (10.jpg). Each task folder also holds
  one unlabelled image (frame 999). Frame `first_frame` of subject 0 / task 0 has AU 4 = 9 (not scored).
  `image_fn(subject index, task index, frame index)` → uint8 (H, W, 3) replaces the colour squares.
  Returns {(subject, task, frame): {"au": int8 (12,) with −1 for 9, "colour": (r, g, b), "path": Path}}.
  """
  rng = np.random.default_rng(seed)
  root = Path(root)
  labels_dir = root / "AUCoding" / "AU_OCC"
  labels_dir.mkdir(parents=True, exist_ok=True)
  truth = {}
  for si, subject in enumerate(subjects):
    for ti, task in enumerate(tasks):
      rows = [",".join(str(c) for c in range(100))]
      for fi in range(n_frames):
        frame = first_frame + fi
        values = rng.integers(0, 2, size=100)
        values[0] = frame
        values[3] = 9  # AU 3 is not one of the 12: its 9s must not matter
        if si == 0 and ti == 0 and fi == 0:
          values[4] = 9
        if si == 1 and fi == 2:
          values[17] = 9
        rows.append(",".join(str(v) for v in values))
        au = np.asarray([-1 if values[a] == 9 else values[a] for a in BP4D_AUS], np.int8)
        colour = _colour(si, ti, fi)
        name = f"{frame:04d}.jpg" if si == 0 else f"{frame}.jpg"
        path = root / images_subdir / subject / task / name
        write_image(path, face_image(colour) if image_fn is None else image_fn(si, ti, fi))
        truth[(subject, task, frame)] = {"au": au, "colour": colour, "path": path}
      write_image(root / images_subdir / subject / task / "999.jpg", face_image((250, 250, 250)))
      (labels_dir / f"{subject}_{task}.csv").write_text("\n".join(rows) + "\n")
  return truth


def make_disfa(root: Path, *, subjects=DISFA_FIXTURE_SUBJECTS, n_frames: int = 5, layout: str = "frames",
               image_base: int = 1, image_name: str | None = None, seed: int = 0, image_fn=None) -> dict:
  """Writes <root>/ActionUnit_Labels/<s>/<s>_au<N>.txt (frames 1..n) and either
  <root>/frames/<s>/<number>.png|jpg (layout="frames"; subject 0 as 00001.png, the others as 1.jpg, or all as
  `image_name.format(number)`; plus an unlabelled frame n+1) or
  <root>/Videos_LeftCamera/LeftVideo<s>_comp.avi (layout="video", lossless FFV1, n+1 frames; needs PyAV).

  The video's frame f (counted from 0) is label frame f + 1 and image number f + image_base: image_base=0 is
  the 0-based numbering of extraction scripts that count from 0. Subject 0: AU1 intensity 1 at frame 1 and 2
  at frame 2. `image_fn(subject index, video frame index)` → uint8 (H, W, 3) replaces the colour squares.
  Returns {(subject, label frame): {"intensity": float32 (8,), "au": int8 (8,), "colour": (r, g,
  b), "path": Path | None}}.
  """
  rng = np.random.default_rng(seed)
  root = Path(root)
  truth = {}
  for si, subject in enumerate(subjects):
    intensity = rng.integers(0, 6, size=(n_frames, len(DISFA_AUS)))
    if si == 0:
      intensity[0, 0], intensity[1, 0] = 1, 2
    label_dir = root / "ActionUnit_Labels" / subject
    label_dir.mkdir(parents=True, exist_ok=True)
    for ai, au in enumerate(DISFA_AUS):
      lines = [f"{f + 1},{intensity[f, ai]}" for f in range(n_frames)]
      (label_dir / f"{subject}_au{au}.txt").write_text("\n".join(lines) + "\n")

    def image_path(f, si=si, subject=subject):
      number = f + image_base
      if image_name is not None:
        name = image_name.format(number)
      else:
        name = f"{number:05d}.png" if si == 0 else f"{number}.jpg"
      return root / "frames" / subject / name

    images = [face_image(_colour(si, 1, f)) if image_fn is None else image_fn(si, f) for f in range(n_frames + 1)]
    if layout == "frames":
      for f, image in enumerate(images):
        write_image(image_path(f), image)
    elif layout == "video":
      write_video(root / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi", images)
    else:
      raise ValueError(layout)
    for f in range(n_frames):
      truth[(subject, f + 1)] = {
        "intensity": intensity[f].astype(np.float32),
        "au": (intensity[f] >= 2).astype(np.int8),
        "colour": _colour(si, 1, f),
        "path": image_path(f) if layout == "frames" else None,
      }
  return truth


def write_video(path: Path, images: list[np.ndarray]) -> None:
  """Writes uint8 (H, W, 3) frames as a lossless FFV1 AVI with PyAV."""
  import av

  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("ffv1", rate=25)
    stream.height, stream.width = images[0].shape[:2]
    stream.pix_fmt = "bgr0"
    for image in images:
      for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def face_frame(face: np.ndarray, height: int, width: int, offset: tuple[int, int] = (0, 0), scale: float = 1.0,
               background: int = 120) -> np.ndarray:
  """uint8 (height, width, 3): `face` (a photo, e.g. skimage's astronaut) resized by `scale` and pasted centred
  in a flat canvas, moved by `offset` (dx, dy) px: a full-size dataset frame with the face somewhere in it."""
  img = Image.fromarray(face)
  img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
  canvas = np.full((height, width, 3), background, np.uint8)
  x = (width - img.width) // 2 + offset[0]
  y = (height - img.height) // 2 + offset[1]
  canvas[y:y + img.height, x:x + img.width] = np.asarray(img)
  return canvas
