"""Occlusions of face images for occlusion-robust AU detection (DESIGN.md §5).

Every occlusion is a boolean pixel mask ``(H, W)`` (True = occluded) filled with black, the image's mean
colour, noise, a texture cut from another image, or the object's own colour. All functions are pure NumPy
and take an ``int`` seed or an ``np.random.Generator``; each returns

  ``(occluded uint8 (H, W, 3), mask bool (H, W), patch_fraction float32 (H/p · W/p,))``

where ``patch_fraction`` is the occluded fraction of each ``p×p`` patch in row-major order (the ViT token
order), so a model can drop patches that are mostly occluded.

Shapes placed on the face (``mask``, ``glasses``, ``hand``) use landmarks ``(K ≥ 5, 2)`` (x, y) pixels in the
order left eye, right eye, nose tip, left mouth corner, right mouth corner (``synthfaces.LANDMARK_NAMES``;
image-left first); without landmarks they assume a centred, upright face.

Evaluation conditions are named (``CONDITIONS``) and fixed per example through ``condition_seed``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

FILLS = ("black", "mean", "noise", "texture", "color")

# Default landmarks of a centred face, as fractions of (W, H): eyes, nose tip, mouth corners, chin.
_DEFAULT_LANDMARKS = np.array([[0.38, 0.45], [0.62, 0.45], [0.5, 0.58], [0.41, 0.68], [0.59, 0.68],
                               [0.5, 0.84]])

SeedLike = int | np.random.Generator


def _as_rng(seed: SeedLike) -> np.random.Generator:
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check_ratio(ratio: float, name: str = "ratio") -> None:
  if not 0.0 < ratio < 1.0:
    raise ValueError(f"{name}: expected a fraction in (0, 1), got {ratio}")


def _check_image(image: np.ndarray) -> None:
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image: expected uint8 (H, W, 3), got {image.dtype} {image.shape}")


def _check_patch(shape: tuple[int, int], patch_size: int) -> None:
  h, w = shape
  if patch_size < 1 or h % patch_size or w % patch_size:
    raise ValueError(f"patch_size: expected a positive divisor of the image size {h}x{w}, got {patch_size}")


# ----------------------------------------------------------------------------------------------------------
# Masks.


def random_patches_mask(shape: tuple[int, int], ratio: float, rng: SeedLike, square: int | None = None,
                        aligned: bool = False) -> np.ndarray:
  """Random ``square×square`` squares covering ``ratio`` of the image (overlaps counted once).

  Squares are added at random positions until the covered pixel count reaches ``round(ratio·H·W)``; the
  last square is trimmed (its new pixels taken in row-major order) so the ratio is met to one pixel. With
  ``aligned`` the squares sit on the ``square`` grid. ``square`` defaults to ``max(2, H // 16)``.

  Returns:
    bool ``(H, W)``.
  """
  _check_ratio(ratio)
  rng = _as_rng(rng)
  h, w = shape
  square = max(2, h // 16) if square is None else square
  if not 1 <= square <= min(h, w):
    raise ValueError(f"square: expected a side in [1, {min(h, w)}], got {square}")
  mask = np.zeros((h, w), bool)
  target = int(round(ratio * h * w))
  covered = 0
  while covered < target:
    if aligned:
      y = rng.integers(h // square) * square
      x = rng.integers(w // square) * square
    else:
      y, x = rng.integers(h - square + 1), rng.integers(w - square + 1)
    win = mask[y:y + square, x:x + square]
    new = ~win
    n_new = int(new.sum())
    if covered + n_new > target:  # trim the last square
      keep = np.flatnonzero(new.reshape(-1))[: target - covered]
      new = np.zeros(new.size, bool)
      new[keep] = True
      new = new.reshape(win.shape)
      n_new = target - covered
    win |= new
    covered += n_new
  return mask


def half_mask(shape: tuple[int, int], side: str) -> np.ndarray:
  """The ``upper`` / ``lower`` / ``left`` / ``right`` half of the image, bool ``(H, W)``."""
  h, w = shape
  mask = np.zeros((h, w), bool)
  if side == "upper":
    mask[: h // 2] = True
  elif side == "lower":
    mask[h // 2:] = True
  elif side == "left":
    mask[:, : w // 2] = True
  elif side == "right":
    mask[:, w // 2:] = True
  else:
    raise ValueError(f"side: expected one of upper, lower, left, right, got {side!r}")
  return mask


def random_block_mask(shape: tuple[int, int], ratio: float, rng: SeedLike) -> np.ndarray:
  """One axis-aligned rectangle of area ≈ ``ratio·H·W`` with random aspect (1/2–2) and position."""
  _check_ratio(ratio)
  rng = _as_rng(rng)
  h, w = shape
  area = ratio * h * w
  aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
  bh = int(np.clip(round(np.sqrt(area * aspect)), 1, h))
  bw = int(np.clip(round(area / bh), 1, w))
  bh = int(np.clip(round(area / bw), 1, h))
  y, x = rng.integers(h - bh + 1), rng.integers(w - bw + 1)
  mask = np.zeros((h, w), bool)
  mask[y:y + bh, x:x + bw] = True
  return mask


def _landmarks(shape: tuple[int, int], landmarks: np.ndarray | None) -> np.ndarray:
  """``(6, 2)`` eyes, nose, mouth corners, chin in pixels; the chin is estimated when not given."""
  h, w = shape
  if landmarks is None:
    return _DEFAULT_LANDMARKS * np.array([w, h])
  lm = np.asarray(landmarks, np.float64)
  if lm.ndim != 2 or lm.shape[0] < 5 or lm.shape[1] != 2:
    raise ValueError(f"landmarks: expected (K ≥ 5, 2) (x, y) pixels, got shape {lm.shape}")
  if lm.shape[0] >= 6:
    return lm[:6]
  mouth = lm[3:5].mean(0)
  return np.concatenate([lm[:5], [mouth + 0.9 * (mouth - lm[2])]], 0)


def _face_frame(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """Eye midpoint, unit eye axis (x), unit down axis (y) and inter-ocular distance."""
  eye_mid = lm[:2].mean(0)
  ax = lm[1] - lm[0]
  iod = float(np.linalg.norm(ax)) + 1e-6
  ax = ax / iod
  down = np.array([-ax[1], ax[0]])
  return eye_mid, ax, down, iod


def _draw(shape: tuple[int, int], polys: Sequence[np.ndarray], lines: Sequence[tuple[np.ndarray, float]] = ()
          ) -> np.ndarray:
  h, w = shape
  img = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(img)
  for p in polys:
    d.polygon([tuple(q) for q in np.asarray(p).tolist()], fill=255)
  for p, width in lines:
    d.line([tuple(q) for q in np.asarray(p).tolist()], fill=255, width=max(1, int(round(width))))
  return np.asarray(img) > 127


def _place(origin, ax, down, pts) -> np.ndarray:
  """Face-frame points ``(n, 2)`` (units of pixels along the eye axis / down axis) → image pixels."""
  pts = np.asarray(pts, np.float64)
  return origin + pts[:, :1] * ax + pts[:, 1:] * down


def surgical_mask_mask(shape: tuple[int, int], landmarks: np.ndarray | None = None) -> np.ndarray:
  """A surgical mask over the lower face: from the nose bridge to below the chin, cheek to cheek."""
  lm = _landmarks(shape, landmarks)
  eye_mid, ax, down, iod = _face_frame(lm)
  top = float(np.dot(lm[2] - eye_mid, down)) * 0.45  # between the eyes and the nose tip
  bottom = float(np.dot(lm[5] - eye_mid, down)) + 0.15 * iod
  half = 1.05 * iod
  t = np.linspace(0, np.pi, 12)
  body = [[-half, top + 0.1 * iod], [-0.2 * iod, top], [0.2 * iod, top], [half, top + 0.1 * iod]]
  body += [[half * np.cos(a) * 0.95, bottom - (bottom - top) * 0.35 * (1 - np.sin(a))] for a in t]
  poly = _place(eye_mid, ax, down, body)
  straps = [(_place(eye_mid, ax, down, [[s * half, top + 0.15 * iod], [s * 1.5 * iod, top - 0.1 * iod]]),
             0.06 * iod) for s in (-1, 1)]
  return _draw(shape, [poly], straps)


def glasses_mask(shape: tuple[int, int], landmarks: np.ndarray | None = None) -> np.ndarray:
  """Sunglasses over the eyes: two lenses, a bridge and temple arms to the sides of the head."""
  lm = _landmarks(shape, landmarks)
  eye_mid, ax, down, iod = _face_frame(lm)
  t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
  lenses = [_place(eye_mid, ax, down, np.stack([s * 0.5 * iod + 0.42 * iod * np.cos(t),
                                                0.02 * iod + 0.3 * iod * np.sin(t)], -1)) for s in (-1, 1)]
  bridge = _place(eye_mid, ax, down, [[-0.2 * iod, -0.1 * iod], [0.2 * iod, -0.1 * iod],
                                      [0.2 * iod, 0.0], [-0.2 * iod, 0.0]])
  arms = [(_place(eye_mid, ax, down, [[s * 0.9 * iod, -0.05 * iod], [s * 1.5 * iod, -0.08 * iod]]),
           0.08 * iod) for s in (-1, 1)]
  return _draw(shape, [*lenses, bridge], arms)


def hand_mask(shape: tuple[int, int], landmarks: np.ndarray | None = None, rng: SeedLike = 0) -> np.ndarray:
  """A hand-like blob over the mouth: a palm and four fingers, jittered by ``rng``."""
  rng = _as_rng(rng)
  lm = _landmarks(shape, landmarks)
  _, ax, down, iod = _face_frame(lm)
  mouth = lm[3:5].mean(0)
  side = 1.0 if rng.random() < 0.5 else -1.0  # which side the fingers point to
  tilt = rng.uniform(-0.35, 0.35)
  c, s = np.cos(tilt), np.sin(tilt)
  ax, down = c * ax + s * down, -s * ax + c * down
  centre = mouth + rng.uniform(-0.1, 0.1, 2) * iod
  t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
  palm = _place(centre, ax, down, np.stack([-side * 0.25 * iod + 0.55 * iod * np.cos(t),
                                            0.1 * iod + 0.42 * iod * np.sin(t)], -1))
  fingers = []
  for j in range(4):
    fy = (-0.25 + 0.2 * j) * iod
    length = (0.75 - 0.08 * abs(j - 1.5)) * iod
    fingers.append(_place(centre, ax, down, np.stack([side * (0.1 * iod + length / 2 * (1 + np.cos(t))),
                                                      fy + 0.085 * iod * np.sin(t)], -1)))
  return _draw(shape, [palm, *fingers])


# ----------------------------------------------------------------------------------------------------------
# Fills and application.


_COLORS = {"mask": (170, 205, 225), "glasses": (25, 25, 30), "hand": (205, 160, 130)}


def fill_values(image: np.ndarray, fill: str, rng: SeedLike, texture: np.ndarray | None = None,
                color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
  """The ``(H, W, 3)`` uint8 content that replaces occluded pixels.

  ``black``: zeros; ``mean``: the image's mean colour; ``noise``: uniform noise; ``texture``: a random crop
  of ``texture`` (another image, any size ≥ 8×8) resized to the image; ``color``: the constant ``color``.
  """
  _check_image(image)
  h, w, _ = image.shape
  if fill == "black":
    return np.zeros_like(image)
  if fill == "mean":
    return np.broadcast_to(np.round(image.reshape(-1, 3).mean(0)).astype(np.uint8), image.shape).copy()
  if fill == "noise":
    return _as_rng(rng).integers(0, 256, image.shape, dtype=np.uint8)
  if fill == "color":
    return np.broadcast_to(np.asarray(color, np.uint8), image.shape).copy()
  if fill == "texture":
    if texture is None:
      raise ValueError("texture: fill='texture' needs a texture image (H', W', 3) uint8")
    texture = np.asarray(texture)
    if texture.ndim != 3 or texture.shape[-1] != 3 or min(texture.shape[:2]) < 8:
      raise ValueError(f"texture: expected an (H' ≥ 8, W' ≥ 8, 3) image, got shape {texture.shape}")
    rng = _as_rng(rng)
    th, tw = texture.shape[:2]
    ch, cw = rng.integers(max(4, th // 2), th + 1), rng.integers(max(4, tw // 2), tw + 1)
    y, x = rng.integers(th - ch + 1), rng.integers(tw - cw + 1)
    crop = Image.fromarray(texture[y:y + ch, x:x + cw].astype(np.uint8))
    return np.asarray(crop.resize((w, h), Image.Resampling.BILINEAR))
  raise ValueError(f"fill: expected one of {FILLS}, got {fill!r}")


def patch_fraction_np(mask: np.ndarray, patch_size: int) -> np.ndarray:
  """Occluded fraction per ``patch_size²`` patch of ``mask (H, W)``, ``(H/p · W/p,)`` float32, row-major."""
  h, w = mask.shape
  _check_patch((h, w), patch_size)
  p = patch_size
  return mask.reshape(h // p, p, w // p, p).mean((1, 3), dtype=np.float32).reshape(-1)


def patch_fraction_from_mask(mask, patch_size: int):
  """jnp version for device use: ``mask (B, H, W)`` bool/float → ``(B, L)`` float32 mean over each patch."""
  import jax.numpy as jnp  # noqa: PLC0415 — data workers use the numpy functions and need not import jax

  b, h, w = mask.shape
  _check_patch((h, w), patch_size)
  p = patch_size
  m = jnp.asarray(mask, jnp.float32).reshape(b, h // p, p, w // p, p)
  return m.mean(axis=(2, 4)).reshape(b, (h // p) * (w // p))


def apply_mask(image: np.ndarray, mask: np.ndarray, patch_size: int, fill: str = "black", rng: SeedLike = 0,
               texture: np.ndarray | None = None, color: Sequence[int] = (0, 0, 0)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Fills ``mask`` in ``image``: ``(occluded uint8 (H, W, 3), mask bool (H, W), patch_fraction (L,))``."""
  _check_image(image)
  _check_patch(image.shape[:2], patch_size)
  mask = np.asarray(mask, bool)
  if mask.shape != image.shape[:2]:
    raise ValueError(f"mask: expected shape {image.shape[:2]}, got {mask.shape}")
  out = np.where(mask[..., None], fill_values(image, fill, rng, texture, color), image).astype(np.uint8)
  return out, mask, patch_fraction_np(mask, patch_size)


# ----------------------------------------------------------------------------------------------------------
# Named conditions.

MaskFn = Callable[[tuple[int, int], np.random.Generator, "np.ndarray | None"], np.ndarray]


def _patches(ratio: float | None) -> MaskFn:
  def fn(shape, rng, lm):
    del lm
    r = rng.uniform(0.1, 0.5) if ratio is None else ratio
    return random_patches_mask(shape, r, rng)
  return fn


# name -> (mask function (shape, rng, landmarks) -> bool (H, W), default fill)
CONDITIONS: dict[str, tuple[MaskFn, str]] = {
    "clean": (lambda shape, rng, lm: np.zeros(shape, bool), "black"),
    "patches_10": (_patches(0.1), "black"),
    "patches_30": (_patches(0.3), "black"),
    "patches_50": (_patches(0.5), "black"),
    "patches_random": (_patches(None), "black"),  # ratio ~ U(0.1, 0.5)
    "block_upper": (lambda shape, rng, lm: half_mask(shape, "upper"), "black"),
    "block_lower": (lambda shape, rng, lm: half_mask(shape, "lower"), "black"),
    "block_left": (lambda shape, rng, lm: half_mask(shape, "left"), "black"),
    "block_right": (lambda shape, rng, lm: half_mask(shape, "right"), "black"),
    "block_random": (lambda shape, rng, lm: random_block_mask(shape, rng.uniform(0.25, 0.5), rng), "black"),
    "mask": (lambda shape, rng, lm: surgical_mask_mask(shape, lm), "color"),
    "glasses": (lambda shape, rng, lm: glasses_mask(shape, lm), "color"),
    "hand": (lambda shape, rng, lm: hand_mask(shape, lm, rng), "color"),
}

EVAL_CONDITIONS: tuple[str, ...] = ("clean", "patches_10", "patches_30", "patches_50", "block_upper",
                                    "block_lower", "block_random", "mask", "glasses", "hand")
TRAIN_CONDITIONS: tuple[str, ...] = ("clean", "patches_random", "block_upper", "block_lower", "block_left",
                                     "block_right", "block_random", "mask", "glasses", "hand")


def condition_seed(base_seed: int, index: int, condition: str) -> int:
  """A fixed seed for example ``index`` under ``condition``, stable across processes and Python runs."""
  ss = np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index), zlib.crc32(condition.encode())])
  return int(ss.generate_state(1, np.uint32)[0])


def occlusion_mask(shape: tuple[int, int], condition: str, seed: SeedLike,
                   landmarks: np.ndarray | None = None) -> np.ndarray:
  """Pixel mask ``(H, W)`` bool of a named condition."""
  if condition not in CONDITIONS:
    raise ValueError(f"condition: unknown {condition!r}; expected one of {sorted(CONDITIONS)}")
  return CONDITIONS[condition][0](tuple(shape), _as_rng(seed), landmarks)


def occlude(image: np.ndarray, condition: str, seed: SeedLike, patch_size: int,
            landmarks: np.ndarray | None = None, fill: str | None = None, texture: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies a named condition (see ``CONDITIONS``) to ``image (H, W, 3)`` uint8.

  ``fill`` defaults to the condition's own (black for patches/blocks, the object's colour for shapes). For
  evaluation pass ``seed=condition_seed(base_seed, index, condition)`` so occlusions are fixed per example.

  Returns:
    ``(occluded uint8 (H, W, 3), mask bool (H, W), patch_fraction float32 (H/p · W/p,))``.
  """
  _check_image(image)
  _check_patch(image.shape[:2], patch_size)
  rng = _as_rng(seed)
  mask = occlusion_mask(image.shape[:2], condition, rng, landmarks)
  fill = CONDITIONS[condition][1] if fill is None else fill
  return apply_mask(image, mask, patch_size, fill, rng, texture, _COLORS.get(condition, (0, 0, 0)))


def sample_condition(rng: np.random.Generator, conditions: Sequence[str] = TRAIN_CONDITIONS,
                     weights: Sequence[float] | None = None) -> str:
  """Draws one condition name (uniformly unless ``weights`` is given)."""
  unknown = [c for c in conditions if c not in CONDITIONS]
  if unknown or not conditions:
    raise ValueError(f"conditions: unknown {unknown} or empty; expected names from {sorted(CONDITIONS)}")
  p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
  return str(conditions[rng.choice(len(conditions), p=p)])


def sample_occlusion(image: np.ndarray, rng: np.random.Generator, patch_size: int,
                     conditions: Sequence[str] = TRAIN_CONDITIONS, landmarks: np.ndarray | None = None,
                     fills: Sequence[str] = ("black", "mean", "noise"), texture: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Training augmentation: a random condition from ``conditions`` with a random fill from ``fills``
  (realistic shapes keep their own colour half of the time). Same return as ``occlude``."""
  condition = sample_condition(rng, conditions)
  fill = str(fills[rng.integers(len(fills))])
  if CONDITIONS[condition][1] == "color" and rng.random() < 0.5:
    fill = "color"
  return occlude(image, condition, rng, patch_size, landmarks, fill, texture)
