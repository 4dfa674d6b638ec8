"""Synthetic FACS faces: procedurally rendered faces whose action units (AUs) are known exactly.

Real AU data (BP4D, DISFA) is licensed, so the default runs and the tests use these faces (DESIGN.md §7).
Everything is deterministic from ``seed`` and the example's ``(subject, frame)``; nothing touches the disk.

Generative model of one example:
  * identity (from ``(seed, subject)``): face shape and size, skin tone, hair, eye spacing and size, iris
    colour, brow thickness and height, nose, mouth width and lip thickness, background colour;
  * frame (from ``(seed, subject, frame)``): small rotation, scale, translation and fake yaw, gaze, a lighting
    gradient, pixel noise and a slight blur;
  * AUs (from ``(seed, subject, frame)``): one expression prototype from ``EXPRESSIONS`` switches AUs on with
    per-AU probabilities, independent per-AU noise (``AU_NOISE``) switches more on. An active AU gets an
    intensity ~ U(2, 5); an inactive one is 0 or, with probability ``TRACE_PROB``, a trace ~ U(0, ``TRACE_MAX``).
    Occurrence = intensity ≥ ``threshold`` (2 by default, as in DISFA), so labels near the threshold are
    genuinely ambiguous, as in real data.

Each AU is a small geometric change of its own facial region (brows, eyes, cheeks, nose, mouth, chin); its
size at intensity 5 (× ``AU_GAIN``) is a few percent of the face, comparable to the identity variation of that
region, so detecting it needs to relate features to each other rather than read one pixel.

Records (shared with the BP4D / DISFA builders)::

  {"image": uint8 (H, W, 3), "au": int8 (N,) 0/1, "au_intensity": float32 (N,), "subject": int32 (),
   "frame": int32 (), "landmarks": float32 (K, 2) (x, y) pixels, rows in ``LANDMARK_NAMES`` order}

plus, with ``SynthFaces(depth=True)``, ``"depth": uint8 (H, W, 1)``: a depth map of the same face from its own
geometry (:func:`render_depth`; the RGB image is rendered exactly as without it).

Grid of examples: ``python -m maejax.data.synthfaces --out=synthfaces_grid.png --size=128 --n=16``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFilter

BP4D_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24)
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 6, 9, 12, 25, 26)
ALL_AUS: tuple[int, ...] = (1, 2, 4, 6, 7, 9, 10, 12, 14, 15, 17, 23, 24, 25, 26)

# Image-left first: "left_eye" is the eye with the smaller x.
LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right", "chin")

# Facial region each AU acts on (the tests check that an AU changes pixels of its region only).
AU_REGIONS: dict[int, str] = {
    1: "brows", 2: "brows", 4: "brows", 6: "cheeks", 7: "eyes", 9: "nose", 10: "mouth", 12: "mouth",
    14: "mouth", 15: "mouth", 17: "chin", 23: "mouth", 24: "mouth", 25: "mouth", 26: "chin",
}

# Expression prototypes: (name, probability of the prototype per frame, {AU: P(AU active | prototype)}).
# Probabilities sum to 1. Together with AU_NOISE they give BP4D-like unequal base rates (see
# ``expected_base_rates``): AU 1/2/4/15/23/24 ≈ 0.15–0.25, AU 6/7/10/12/14 ≈ 0.45–0.6.
EXPRESSIONS: tuple[tuple[str, float, dict[int, float]], ...] = (
    ("neutral", 0.13, {}),
    ("happiness", 0.36, {6: 0.85, 12: 0.95, 7: 0.55, 10: 0.55, 14: 0.35, 25: 0.55, 26: 0.15}),
    ("surprise", 0.07, {1: 0.9, 2: 0.9, 25: 0.75, 26: 0.55}),
    ("anger", 0.08, {4: 0.9, 7: 0.9, 23: 0.6, 24: 0.55, 10: 0.3, 17: 0.3}),
    ("sadness", 0.07, {1: 0.8, 4: 0.7, 15: 0.85, 17: 0.6, 14: 0.2}),
    ("disgust", 0.07, {9: 0.9, 10: 0.85, 4: 0.5, 7: 0.55, 17: 0.4, 15: 0.2}),
    ("dimpler", 0.07, {14: 0.9, 12: 0.3, 24: 0.3, 7: 0.3}),
    ("chin_raise", 0.07, {15: 0.6, 17: 0.9, 24: 0.4, 14: 0.3}),
    ("press", 0.08, {23: 0.8, 24: 0.85, 17: 0.4, 7: 0.4}),
)

# Independent per-AU activation probability on top of the prototype.
AU_NOISE: dict[int, float] = {
    1: 0.06, 2: 0.12, 4: 0.04, 6: 0.22, 7: 0.22, 9: 0.03, 10: 0.38, 12: 0.30, 14: 0.30, 15: 0.04,
    17: 0.20, 23: 0.05, 24: 0.03, 25: 0.12, 26: 0.06,
}

ACTIVE_RANGE = (2.0, 5.0)  # intensity of an active AU ~ U(ACTIVE_RANGE)
TRACE_PROB = 0.35  # P(trace intensity ~ U(0, TRACE_MAX) | inactive), else exactly 0
TRACE_MAX = 2.0  # traces reach up to the active range: labels at the threshold are ambiguous
MAX_INTENSITY = 5.0
# Size of every AU's effect relative to the shapes in ``render_face`` (the difficulty knob of DESIGN.md §7).
# 2.0 with 0.06-wide wrinkles keeps every cue legible to a small ViT at 64 px; the lower-face cues of AU14
# (dimples), AU17 (chin boss) and AU23 (tense lip margins) are drawn large and apart from the other mouth AUs'
# folds for the same reason. The measurements behind these values are in benchmarks/README.md.
AU_GAIN = 2.0
# Width of AU wrinkles / furrows / folds in face units (≈ 1.6 px at 64 px).
WRINKLE = 0.06
# Face scale: one face unit (≈ half a face width) is FACE_SCALE × the image side; the features (brows to
# chin) are centred, like a landmark-aligned crop.
FACE_SCALE = 0.42
FACE_CENTER_Y = 0.36


# ----------------------------------------------------------------------------------------------------------
# Label sampler and its exact statistics.


def _rng(seed: int, *keys: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *map(int, keys)]))


def _active_table() -> tuple[np.ndarray, np.ndarray]:
  """``(pi (E,), P (E, 15))``: prototype probabilities and P(AU active | prototype), prototype + noise."""
  pi = np.array([p for _, p, _ in EXPRESSIONS], np.float64)
  proto = np.zeros((len(EXPRESSIONS), len(ALL_AUS)))
  for e, (_, _, aus) in enumerate(EXPRESSIONS):
    for au, p in aus.items():
      proto[e, ALL_AUS.index(au)] = p
  noise = np.array([AU_NOISE[a] for a in ALL_AUS])
  return pi, 1.0 - (1.0 - proto) * (1.0 - noise)


def sample_intensities(rng: np.random.Generator) -> np.ndarray:
  """One frame's AU intensities, ``(15,)`` float32 in ``ALL_AUS`` order, values in [0, 5]."""
  pi, p_active = _active_table()
  e = rng.choice(len(pi), p=pi)
  u = rng.random((4, len(ALL_AUS)))
  active = u[0] < p_active[e]
  lo, hi = ACTIVE_RANGE
  trace = np.where(u[1] < TRACE_PROB, TRACE_MAX * u[2], 0.0)
  return np.where(active, lo + (hi - lo) * u[3], trace).astype(np.float32)


def _occurrence_given_expression(threshold: float) -> tuple[np.ndarray, np.ndarray]:
  """``(pi (E,), q (E, 15))`` with q = P(intensity ≥ threshold | prototype); AUs independent given it."""
  pi, p_active = _active_table()
  lo, hi = ACTIVE_RANGE
  occ_if_active = float(np.clip((hi - threshold) / (hi - lo), 0.0, 1.0))
  occ_if_inactive = 1.0 if threshold <= 0 else TRACE_PROB * float(
      np.clip((TRACE_MAX - threshold) / TRACE_MAX, 0.0, 1.0))
  return pi, p_active * occ_if_active + (1.0 - p_active) * occ_if_inactive


def _au_indices(aus: Sequence[int]) -> list[int]:
  bad = [a for a in aus if a not in ALL_AUS]
  if bad:
    raise ValueError(f"aus: unknown AUs {bad}; expected a subset of {ALL_AUS}")
  return [ALL_AUS.index(a) for a in aus]


def expected_base_rates(aus: Sequence[int] = BP4D_AUS, threshold: float = 2.0) -> np.ndarray:
  """Exact P(AU occurs) under the sampler, ``(N,)`` float64 in ``aus`` order."""
  pi, q = _occurrence_given_expression(threshold)
  return (pi @ q)[_au_indices(aus)]


def expected_cooccurrence(aus: Sequence[int] = BP4D_AUS, threshold: float = 2.0) -> np.ndarray:
  """Exact joint P(AU i and AU j occur), ``(N, N)`` float64; the diagonal is the base rates."""
  pi, q = _occurrence_given_expression(threshold)
  q = q[:, _au_indices(aus)]
  joint = np.einsum("e,ei,ej->ij", pi, q, q)
  np.fill_diagonal(joint, pi @ q)
  return joint


def hidden_au_f1_ceiling(hidden: Sequence[int], aus: Sequence[int] = BP4D_AUS, threshold: float = 2.0,
                         num_samples: int = 40000, seed: int = 0) -> np.ndarray:
  """Per-AU F1 ceiling ``(N,)`` when the AUs ``hidden`` cannot be seen (e.g. under an occluding block).

  The visible AUs are taken as read perfectly (F1 1); a hidden AU is predicted by the Bayes-optimal posterior
  ``P(y_j | visible labels) = Σ_e P(e | visible) q_ej`` of the exact sampler (prototype ``e``, AUs independent given
  it), thresholded at the F1-best cut; F1 is measured on ``num_samples`` frames drawn from the sampler.
  """
  idx = _au_indices(aus)
  missing = [a for a in hidden if a not in aus]
  if missing:
    raise ValueError(f"hidden: AUs {missing} are not among aus={tuple(aus)}")
  hid = [list(aus).index(a) for a in hidden]
  pi, q = _occurrence_given_expression(threshold)
  q = np.clip(q[:, idx], 1e-12, 1 - 1e-12)
  rng = np.random.default_rng(seed)
  y = np.stack([sample_intensities(rng) for _ in range(num_samples)])[:, idx] >= threshold
  vis = [j for j in range(len(idx)) if j not in hid]
  log_lik = (y[:, vis, None] * np.log(q[:, vis].T) + ~y[:, vis, None] * np.log(1 - q[:, vis].T)).sum(1)
  post = np.exp(log_lik - log_lik.max(1, keepdims=True)) * pi
  post /= post.sum(1, keepdims=True)
  f1 = np.ones(len(idx))
  for j in hid:
    p, t = post @ q[:, j], y[:, j]
    cuts = np.unique(p)
    f1[j] = max(2 * (t & (p >= c)).sum() / (t.sum() + (p >= c).sum()) for c in cuts)
  return f1


# ----------------------------------------------------------------------------------------------------------
# Identity and frame parameters.


@dataclasses.dataclass(frozen=True)
class Identity:
  """Per-subject appearance. Geometry is in face units (face centre origin, y down, ~1 = half face width)."""

  face_w: float
  face_h: float
  jaw_taper: float
  skin: tuple[int, int, int]
  lip: tuple[int, int, int]
  hair: tuple[int, int, int]
  hair_style: int  # 0 short, 1 long, 2 bald-ish (thin)
  hairline: float
  background: tuple[int, int, int]
  eye_x: float
  eye_y: float
  eye_w: float
  eye_up: float
  eye_low: float
  iris: tuple[int, int, int]
  brow_gap: float
  brow_thick: float
  brow_color: tuple[int, int, int]
  nose_y: float
  nose_w: float
  mouth_y: float
  mouth_w: float
  lip_up: float
  lip_low: float


@dataclasses.dataclass(frozen=True)
class FrameParams:
  """Per-frame pose, lighting and noise (everything that is not identity or AU)."""

  angle: float  # degrees
  scale: float
  shift: tuple[float, float]  # fraction of the image size
  yaw: float  # fake yaw: features shift horizontally, in face units per unit depth
  gaze: tuple[float, float]
  light_dir: float  # radians
  light_amp: float
  brightness: float
  noise_std: float  # uint8 units
  blur: float  # pixels at the output resolution
  noise_seed: int


def _mix(a, b, t) -> tuple[int, int, int]:
  return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))


_HAIR = ((20, 16, 14), (60, 38, 24), (110, 74, 40), (190, 150, 90), (150, 70, 35), (140, 140, 140))
_IRIS = ((70, 45, 25), (40, 30, 20), (60, 100, 150), (70, 110, 70), (110, 90, 60))


def make_identity(seed: int, subject: int) -> Identity:
  """Deterministic appearance of ``subject`` under ``seed``."""
  r = _rng(seed, 1, subject)
  u = r.random
  tone = u()
  skin = _mix((250, 218, 190), (95, 60, 42), tone)
  skin = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(skin, r.integers(-12, 13, 3), strict=True))
  hair = _HAIR[r.integers(len(_HAIR))]
  hair = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(hair, r.integers(-15, 16, 3), strict=True))
  bg = tuple(int(c) for c in r.integers(30, 226, 3))
  return Identity(
      face_w=0.82 + 0.12 * u(), face_h=1.08 + 0.16 * u(), jaw_taper=0.15 + 0.25 * u(),
      skin=skin, lip=_mix(skin, (150, 50, 60), 0.35 + 0.25 * u()), hair=hair,
      hair_style=int(r.integers(3)), hairline=-0.78 - 0.15 * u(), background=bg,
      eye_x=0.30 + 0.08 * u(), eye_y=-0.16 + 0.06 * (u() - 0.5), eye_w=0.13 + 0.04 * u(),
      eye_up=0.06 + 0.03 * u(), eye_low=0.04 + 0.02 * u(), iris=_IRIS[r.integers(len(_IRIS))],
      brow_gap=0.21 + 0.06 * u(), brow_thick=0.025 + 0.025 * u(),
      brow_color=_mix(hair, (30, 25, 20), 0.3 + 0.3 * u()),
      nose_y=0.20 + 0.08 * u(), nose_w=0.08 + 0.04 * u(),
      mouth_y=0.52 + 0.08 * u(), mouth_w=0.22 + 0.08 * u(), lip_up=0.035 + 0.03 * u(),
      lip_low=0.045 + 0.035 * u(),
  )


def make_frame_params(seed: int, subject: int, frame: int) -> FrameParams:
  """Deterministic pose / lighting / noise of frame ``frame`` of ``subject``."""
  r = _rng(seed, 2, subject, frame)
  u = lambda lo, hi: float(r.uniform(lo, hi))
  return FrameParams(
      angle=u(-5, 5), scale=u(0.95, 1.05), shift=(u(-0.03, 0.03), u(-0.03, 0.03)), yaw=u(-0.05, 0.05),
      gaze=(u(-0.3, 0.3), u(-0.2, 0.2)), light_dir=u(0, 2 * np.pi), light_amp=u(0.0, 0.18),
      brightness=u(0.88, 1.1), noise_std=u(1.5, 5.0), blur=u(0.0, 0.6),
      noise_seed=int(r.integers(2**31)),
  )


NEUTRAL_FRAME = FrameParams(angle=0.0, scale=1.0, shift=(0.0, 0.0), yaw=0.0, gaze=(0.0, 0.0), light_dir=0.0,
                            light_amp=0.0, brightness=1.0, noise_std=0.0, blur=0.0, noise_seed=0)


def frame_intensities(seed: int, subject: int, frame: int) -> np.ndarray:
  """AU intensities of one frame, ``(15,)`` float32 in ``ALL_AUS`` order."""
  return sample_intensities(_rng(seed, 3, subject, frame))


# ----------------------------------------------------------------------------------------------------------
# Rendering.


class _Canvas:
  """Draws polygons given in face units onto a supersampled canvas, applying the frame's similarity."""

  def __init__(self, size: int, ss: int, frame: FrameParams, background):
    self.size, self.ss = size, ss
    self.img = Image.new("RGB", (size * ss, size * ss), background)
    self.draw = ImageDraw.Draw(self.img)
    a = math.radians(frame.angle)
    unit = FACE_SCALE * size * frame.scale
    self.m = unit * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    self.c = np.array([size * (0.5 + frame.shift[0]), size * (FACE_CENTER_Y + frame.shift[1])])

  def to_px(self, pts: np.ndarray) -> np.ndarray:
    """Face units ``(..., 2)`` → output pixel coordinates ``(..., 2)``."""
    return pts @ self.m.T + self.c

  def poly(self, pts: np.ndarray, fill) -> None:
    p = self.to_px(pts) * self.ss
    self.draw.polygon([tuple(q) for q in p.tolist()], fill=fill)

  def line(self, pts: np.ndarray, fill, width: float) -> None:
    p = self.to_px(pts) * self.ss
    w = max(1, int(round(width * math.hypot(*self.m[0]) * self.ss)))
    self.draw.line([tuple(q) for q in p.tolist()], fill=fill, width=w, joint="curve")


def _ellipse(cx, cy, rx, ry, n=28, start=0.0, stop=2 * np.pi) -> np.ndarray:
  t = np.linspace(start, stop, n, endpoint=False if stop - start >= 2 * np.pi else True)
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], -1)


def _thick(center: np.ndarray, half: np.ndarray) -> np.ndarray:
  """Polygon around a polyline ``center (n, 2)`` with per-vertex vertical half-thickness ``half (n,)``."""
  top = center - np.stack([np.zeros_like(half), half], -1)
  bot = center + np.stack([np.zeros_like(half), half], -1)
  return np.concatenate([top, bot[::-1]], 0)


def _shade(a, b, t: float) -> tuple[int, int, int]:
  return _mix(a, b, float(np.clip(t, 0.0, 1.0)))


def _supersample(size: int) -> int:
  return 4 if size <= 64 else 3 if size <= 128 else 2


def render_face(identity: Identity, frame: FrameParams, intensities: np.ndarray, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Renders one face.

  Args:
    identity: subject appearance (``make_identity``).
    frame: pose / lighting / noise (``make_frame_params`` or ``NEUTRAL_FRAME``).
    intensities: ``(15,)`` AU intensities in ``ALL_AUS`` order, each in [0, 5].
    size: output side length in pixels (≥ 16).

  Returns:
    ``image`` uint8 ``(size, size, 3)`` and ``landmarks`` float32 ``(6, 2)`` (x, y) pixels in
    ``LANDMARK_NAMES`` order.
  """
  if size < 16:
    raise ValueError(f"size: expected an image size ≥ 16, got {size}")
  intensities = np.asarray(intensities, np.float32)
  if intensities.shape != (len(ALL_AUS),):
    raise ValueError(f"intensities: expected shape ({len(ALL_AUS)},) in ALL_AUS order, "
                     f"got {intensities.shape}")
  k = {au: AU_GAIN * float(np.clip(v, 0, MAX_INTENSITY)) / MAX_INTENSITY
       for au, v in zip(ALL_AUS, intensities, strict=True)}
  idn = identity
  cv = _Canvas(size, _supersample(size), frame, idn.background)
  skin = tuple(idn.skin)
  dark_skin = _mix(skin, (40, 20, 15), 0.45)
  crease_rgb = tuple(int(c * 0.3) for c in skin)  # multiplicative shading: visible on every skin tone
  line_col = lambda t: _shade(skin, crease_rgb, t)  # wrinkle / crease of strength t

  # Fake yaw: features nearer the camera (nose) shift more than the eyes and the face outline.
  yaw = frame.yaw

  # --- Hair (back), neck, ears, face outline.
  fw, fh = idn.face_w, idn.face_h
  jaw = 0.2 * k[26]  # AU26 jaw drop moves the chin and the lower lip down
  if idn.hair_style != 2:
    back_h = fh * (1.55 if idn.hair_style == 1 else 1.0)
    cv.poly(_ellipse(0, -0.2 + (back_h - fh) * 0.55, fw + 0.14, back_h, 32), idn.hair)
  cv.poly(np.array([[-0.38, 0.5], [0.38, 0.5], [0.45, 2.2], [-0.45, 2.2]]), dark_skin)
  for s in (-1, 1):
    cv.poly(_ellipse(s * fw * 0.98, -0.05, 0.12, 0.22, 16), _mix(skin, dark_skin, 0.5))
  t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
  st = np.sin(t)
  lower = np.clip(st, 0, None)
  chin_part = np.clip((lower - 0.6) / 0.4, 0, None) ** 2  # only the jaw below the mouth moves with AU26
  outline = np.stack([fw * np.cos(t) * (1 - idn.jaw_taper * lower ** 2), fh * st + jaw * chin_part], -1)
  cv.poly(outline, skin)
  # Fringe: hair over the top of the face down to the hairline.
  if idn.hair_style != 2:
    xs = np.linspace(-fw - 0.02, fw + 0.02, 15)
    edge = idn.hairline + 0.05 * np.cos(xs * 3.0) + 0.35 * (xs / fw) ** 4
    top = -fh - 0.1
    arc = _ellipse(0.0, edge[-1], xs[-1], edge[-1] - top, 17, 2 * np.pi, np.pi)  # over the scalp
    fringe = np.concatenate([np.stack([xs, edge], -1), arc[1:-1]], 0)
    cv.poly(fringe, idn.hair)

  ex, ey, ew = idn.eye_x, idn.eye_y, idn.eye_w
  eye_c = [np.array([s * ex + yaw * 0.6, ey]) for s in (-1, 1)]

  # Every AU is a geometric change of its region plus the FACS appearance change that comes with it (wrinkles,
  # furrows, bulges, a dark mouth opening), drawn as shaded lines ``WRINKLE`` face units wide whose darkness
  # grows with the intensity, so a trace (< 2) looks like a weaker version of an occurrence.
  wr = WRINKLE

  # --- Cheeks (AU6): raised cheek bulge + cheek crease; drawn before the eyes so the lids stay on top.
  cheek_up = 0.10 * k[6]
  for s, c in zip((-1, 1), eye_c, strict=True):
    cx = c[0] + s * 0.02
    cy = ey + 0.3 - cheek_up
    cv.poly(_ellipse(cx, cy, 0.17, 0.10, 20), _mix(skin, (200, 90, 90), 0.10 + 0.3 * k[6]))
    arc = _ellipse(cx, cy + 0.02, 0.19, 0.12, 9, np.pi * 1.05, np.pi * 1.95)
    cv.line(arc, line_col(0.1 + 0.7 * k[6]), wr)

  # --- Eyes (AU6 lower lid + crow's feet; AU7 lid tightener: lids narrow, tense lower lid line).
  up = idn.eye_up * (1 - 0.3 * k[7])
  low = idn.eye_low * max(0.1, 1 - 0.55 * k[7] - 0.3 * k[6])
  tt = np.linspace(-1, 1, 15)
  for s, c in zip((-1, 1), eye_c, strict=True):
    x = c[0] + ew * tt
    bulge = 1 - tt ** 2
    y_up = c[1] - up * bulge ** 0.8 + 0.01 * s * tt  # slight tilt: outer corner higher
    y_low = c[1] + low * bulge ** 0.9 + 0.01 * s * tt
    sclera = np.concatenate([np.stack([x, y_up], -1), np.stack([x, y_low], -1)[::-1]], 0)
    cv.poly(sclera, (236, 232, 226))
    # Iris clipped to the eye opening: clamp circle points between the lids.
    ic = c + np.array([frame.gaze[0] * ew * 0.5, frame.gaze[1] * 0.02])
    circ = _ellipse(ic[0], ic[1], 0.055, 0.055, 24)
    lo_b = np.interp(circ[:, 0], x, y_up)
    hi_b = np.interp(circ[:, 0], x, y_low)
    circ[:, 0] = np.clip(circ[:, 0], x[0], x[-1])
    circ[:, 1] = np.clip(circ[:, 1], lo_b, hi_b)
    cv.poly(circ, idn.iris)
    pup = _ellipse(ic[0], ic[1], 0.022, 0.022, 12)
    pup[:, 1] = np.clip(pup[:, 1], np.interp(pup[:, 0], x, y_up), np.interp(pup[:, 0], x, y_low))
    cv.poly(pup, (15, 12, 12))
    cv.line(np.stack([x, y_up], -1), (35, 25, 22), 0.018)
    cv.line(np.stack([x, y_low], -1), _shade(skin, (70, 40, 35), 0.4 + 0.6 * k[7]), 0.01 + 0.015 * k[7])
    if k[7] > 0:  # tensed lower lid: a bulge line under the eye
      cv.line(np.stack([x[2:-2], (y_low + 0.035)[2:-2]], -1), line_col(0.8 * k[7]), wr)
    crease = np.stack([x[2:-2], c[1] - (up + 0.035) * bulge[2:-2] ** 0.6 + 0.01 * s * tt[2:-2]], -1)
    cv.line(crease, line_col(0.3), 0.01)
    if k[6] > 0:  # crow's feet at the outer corner
      ox = c[0] + s * (ew + 0.03)
      for dy in (-0.035, 0.0, 0.035):
        seg = np.array([[ox, c[1] + dy * 0.5], [ox + s * 0.10 * k[6], c[1] + dy * (1 + 0.8 * k[6])]])
        cv.line(seg, line_col(0.9 * k[6]), wr)

  # --- Brows (AU1 inner raise + central forehead lines, AU2 outer raise + lateral forehead lines, AU4 lowerer
  # + glabella furrows).
  bt = np.linspace(0, 1, 9)  # 0 inner, 1 outer
  for s, c in zip((-1, 1), eye_c, strict=True):
    bx = c[0] + s * (-0.13 + 0.34 * bt) + s * (-0.07 * k[4]) * (1 - bt)
    arch = 0.05 * np.sin(np.pi * np.clip(bt * 1.1, 0, 1))
    lift = 0.15 * k[1] * (1 - bt) ** 1.5 + 0.15 * k[2] * bt ** 1.5 - 0.07 * k[4] * (1 - 0.4 * bt)
    by = ey - idn.brow_gap - arch - lift
    half = idn.brow_thick * (1.0 - 0.55 * bt ** 2)
    cv.poly(_thick(np.stack([bx, by], -1), half), idn.brow_color)
  brow_top = ey - idn.brow_gap - 0.05
  for j in range(2):
    yy = brow_top - 0.10 - 0.06 * j
    if k[1] > 0:  # central forehead: a shallow arch above the inner brows
      cv.line(_ellipse(yaw * 0.6, yy + 0.04, 0.16, 0.04, 9, np.pi * 1.15, np.pi * 1.85), line_col(0.85 * k[1]), wr)
    if k[2] > 0:  # lateral forehead: above each outer brow
      for s, c in zip((-1, 1), eye_c, strict=True):
        ox = c[0] + s * 0.14
        cv.line(np.array([[ox - 0.08, yy - 0.02 * s], [ox, yy - 0.03], [ox + 0.08, yy + 0.02 * s]]),
                line_col(0.85 * k[2]), wr)
  if k[4] > 0:
    for s in (-1, 1):
      x0 = yaw * 0.6 + s * 0.04
      cv.line(np.array([[x0, ey - idn.brow_gap - 0.04], [x0 + s * 0.012, ey - idn.brow_gap + 0.08]]),
              line_col(0.95 * k[4]), wr)

  # --- Nose (AU9 wrinkler: bridge wrinkles, raised and flared nostrils).
  nx, ny, nw = yaw, idn.nose_y, idn.nose_w * (1 + 0.2 * min(k[9], 1.0))  # flare capped: stays on the nose
  nost_y = ny + 0.03 - 0.045 * k[9]
  for s in (-1, 1):
    side = np.array([[nx + s * 0.05, ey + 0.03], [nx + s * 0.06, ny - 0.08],
                     [nx + s * nw * 1.1, nost_y - 0.03]])
    cv.line(side, line_col(0.22), 0.012)
    cv.poly(_ellipse(nx + s * nw * 0.55, nost_y, 0.03, 0.017, 12), _mix(skin, (40, 20, 20), 0.6))
  cv.line(_ellipse(nx, ny - 0.01, nw * 0.7, 0.04, 9, np.pi * 0.15, np.pi * 0.85), line_col(0.3), 0.012)
  if k[9] > 0:
    for j in range(3):
      yy = ey + 0.08 + 0.045 * j  # below the eye line even with WRINKLE-wide lines
      wrinkle = np.array([[nx - 0.08, yy + 0.015], [nx, yy], [nx + 0.08, yy + 0.015]])
      cv.line(wrinkle, line_col(0.95 * k[9]), wr)

  # --- Mouth. AU10 upper-lip raise (+ nasolabial folds), AU12 corners up/out (+ smile folds), AU14 dimpler,
  # AU15 corners down (+ shaded folds below the corners), AU23 tightener (narrow, thin, rolled lip edges),
  # AU24 pressor (thin, flat, bulges above and below), AU25 lips part, AU26 jaw drop, AU17 chin raiser (lower
  # lip up, chin boss crease and dimpling).
  my = idn.mouth_y
  mx = yaw * 0.8
  mw = idn.mouth_w * (1 + 0.25 * k[12] - 0.15 * k[14] - 0.22 * k[23])
  corner_dy = -0.10 * k[12] + 0.09 * k[15]
  th_up = idn.lip_up * max(0.15, 1 - 0.55 * k[23] - 0.5 * k[24]) * (1 - 0.25 * k[12])
  th_low = idn.lip_low * max(0.15, 1 - 0.55 * k[23] - 0.55 * k[24]) * (1 + 0.35 * k[17])
  gap = 0.07 * k[25] + 0.75 * jaw
  raise10 = 0.06 * k[10]
  t = np.linspace(-1, 1, 21)
  x = mx + mw * t
  b = 1 - t ** 2
  y_line = my + corner_dy * t ** 2 - 0.012 * b * (1 - k[24])  # lip line, flattened by AU24
  y_up_in = y_line - raise10 * 0.35 * b ** 0.5
  y_up_out = y_up_in - th_up * b ** 0.6 - 0.012 * np.cos(np.pi * t) * b - raise10 * b ** 0.4
  y_low_in = y_line + gap * b ** 0.7
  y_low_out = y_low_in + th_low * b ** 0.6 - 0.07 * k[17] * b
  if k[10] > 0:  # nasolabial folds deepen as the upper lip rises
    for s in (-1, 1):
      fold = np.array([[nx + s * (nw + 0.03), nost_y + 0.05],
                       [mx + s * (mw + 0.02), my - 0.06 * k[10] + 0.02]])
      cv.line(fold, line_col(0.9 * k[10]), wr)
  if k[12] > 0:  # smile folds: curved creases up and out from the raised corners
    for s in (-1, 1):
      cx0, cy0 = x[0 if s < 0 else -1], y_line[0]
      fold = np.array([[cx0 + s * 0.03, cy0 + 0.03], [cx0 + s * 0.07, cy0 - 0.04], [cx0 + s * 0.07, cy0 - 0.12]])
      cv.line(fold, line_col(0.9 * k[12]), wr)
  if k[15] > 0:  # depressed corners: shaded folds down from the corners
    for s in (-1, 1):
      cx0, cy0 = x[0 if s < 0 else -1], y_line[0]
      fold = np.array([[cx0, cy0 + 0.01], [cx0 + s * 0.02, cy0 + 0.08], [cx0 + s * 0.015, cy0 + 0.15]])
      cv.line(fold, line_col(0.9 * k[15]), wr)
  if gap > 0.004:
    inner = np.concatenate([np.stack([x, y_up_in], -1), np.stack([x, y_low_in], -1)[::-1]], 0)
    cv.poly(inner, (45, 12, 18))
    teeth_h = np.minimum(gap * b ** 0.7, 0.025 + 0.4 * raise10 * b)
    cv.poly(np.concatenate([np.stack([x[3:-3], y_up_in[3:-3]], -1),
                            np.stack([x[3:-3], (y_up_in + teeth_h)[3:-3]], -1)[::-1]], 0), (235, 230, 220))
  lip_col = _mix(idn.lip, (90, 20, 30), 0.8 * k[23])  # tightened lips: a darker, narrow red margin
  cv.poly(np.concatenate([np.stack([x, y_up_out], -1), np.stack([x, y_up_in], -1)[::-1]], 0), lip_col)
  cv.poly(np.concatenate([np.stack([x, y_low_in], -1), np.stack([x, y_low_out], -1)[::-1]], 0),
          _mix(lip_col, (255, 255, 255), 0.06))
  cv.line(np.stack([x, y_line if gap <= 0.004 else y_up_in], -1), _mix(idn.lip, (40, 10, 10), 0.5 + 0.4 * k[24]),
          0.01 + 0.015 * k[24])
  if k[23] > 0:  # tightened lips: tense, rolled-in margins
    for yy in (y_up_out - 0.012, y_low_out + 0.012):
      cv.line(np.stack([x[2:-2], yy[2:-2]], -1), line_col(0.9 * k[23]), wr)
  if k[24] > 0:  # pressed lips bulge the skin above and below the mouth
    for yy in (y_up_out - 0.035, y_low_out + 0.035):
      cv.line(np.stack([x[4:-4], yy[4:-4]], -1), line_col(0.75 * k[24]), wr)
  if k[14] > 0:  # dimpler: the tightened corners pull a crease into a dimple (a dark dot) beside each corner,
    # out and down from the corner, clear of the smile folds (up) and the depressor folds (straight down)
    for s in (-1, 1):
      corner = np.array([x[0 if s < 0 else -1], y_line[-1]])
      dimple = corner + np.array([s * 0.11, 0.03])
      cv.poly(_ellipse(*dimple, 0.045, 0.055, 12), _shade(skin, crease_rgb, 0.95 * k[14]))
      cv.line(np.stack([corner, dimple]), line_col(0.9 * k[14]), wr)
  chin_y = fh + jaw
  crease_y = y_low_out.max() + 0.5 * (chin_y - y_low_out.max()) * (1 - 0.3 * k[17])
  cv.line(_ellipse(mx, crease_y - 0.03, 0.11, 0.04, 9, np.pi * 0.2, np.pi * 0.8),
          line_col(0.15 + 0.75 * k[17]), 0.012 + 0.012 * k[17])
  if k[17] > 0:  # chin boss pushed up: a lighter bulge on the chin, and its dimpling ("orange peel")
    cv.poly(_ellipse(mx, crease_y + 0.1, 0.12, 0.08, 16), _mix(skin, (255, 240, 225), 0.25 * k[17]))
    for dx, dy in ((-0.05, 0.06), (0.0, 0.09), (0.05, 0.06), (-0.025, 0.13), (0.025, 0.13)):
      cv.poly(_ellipse(mx + dx, crease_y + dy, 0.03, 0.024, 8), _shade(skin, (90, 50, 40), 0.8 * k[17]))

  # --- Output resolution, blur, lighting and noise.
  img = cv.img.reduce(cv.ss)
  if frame.blur > 0.05:
    img = img.filter(ImageFilter.GaussianBlur(frame.blur))
  arr = np.asarray(img, np.float32)
  if frame.light_amp > 0 or frame.brightness != 1 or frame.noise_std > 0:
    g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    d = math.cos(frame.light_dir) * g[None, :] + math.sin(frame.light_dir) * g[:, None]
    arr = arr * (frame.brightness * (1 + 2 * frame.light_amp * d))[..., None]
    if frame.noise_std > 0:
      noise = np.random.default_rng(frame.noise_seed).normal(0, frame.noise_std, arr.shape)
      arr = arr + noise.astype(np.float32)
  image = np.clip(arr + 0.5, 0, 255).astype(np.uint8)

  lm = np.array([eye_c[0], eye_c[1], [nx, ny], [x[0], y_line[0]], [x[-1], y_line[-1]], [0.0, chin_y]])
  return image, cv.to_px(lm).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Depth: a second modality from the same geometry (for multimodal pretraining, MCM).

DEPTH_RANGE = 1.0  # face units of height that map to 255


def render_depth(identity: Identity, frame: FrameParams, intensities: np.ndarray, size: int) -> np.ndarray:
  """Height above the background of every pixel of the face :func:`render_face` draws, as uint8 ``(size, size)``
  (0 = background, 255 = ``DEPTH_RANGE`` face units towards the camera).

  Each output pixel centre is mapped back to face units through the inverse of the frame's similarity (rotation,
  scale, shift: the one ``render_face`` draws with), and the height there is the sum of analytic surfaces placed
  where ``render_face`` places the parts (so identity, pose and the AUs move the depth with the image):
    * head: an ellipsoid cap ``0.2 + 0.5·sqrt(1 − (x/w)² − (y/h)²)`` over the face outline (``face_w × face_h``, the
      jaw lowered by AU26), the hair behind it at 0.1, the neck at 0.15;
    * nose: a Gaussian ridge of height 0.3 from between the eyes to the tip (with the fake yaw's shift);
    * eye sockets: Gaussian dips of 0.08 at the eye centres;
    * cheeks: Gaussian bulges of ``0.04 + 0.12·k₆`` raised with AU6 as the drawn cheeks are;
    * mouth: a dip as deep as the lips are parted (AU25 / AU26); the chin boss bulges with AU17.
  Pixel noise, blur and lighting are image effects and do not touch the depth.
  """
  k = {au: AU_GAIN * float(np.clip(v, 0, MAX_INTENSITY)) / MAX_INTENSITY
       for au, v in zip(ALL_AUS, np.asarray(intensities, np.float32), strict=True)}
  idn = identity
  a = math.radians(frame.angle)
  unit = FACE_SCALE * size * frame.scale
  m = unit * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
  c = np.array([size * (0.5 + frame.shift[0]), size * (FACE_CENTER_Y + frame.shift[1])])
  g = np.arange(size, dtype=np.float64) + 0.5
  px = np.stack(np.meshgrid(g, g, indexing="xy"), -1)  # (size, size, 2) (x, y) pixel centres
  pts = (px - c) @ np.linalg.inv(m).T
  x, y = pts[..., 0], pts[..., 1]
  gauss = lambda cx, cy, sx, sy: np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))

  z = np.zeros((size, size))
  if idn.hair_style != 2:
    back_h = idn.face_h * (1.55 if idn.hair_style == 1 else 1.0)
    hair = ((x / (idn.face_w + 0.14)) ** 2 + ((y + 0.2 - (back_h - idn.face_h) * 0.55) / back_h) ** 2) <= 1
    z = np.where(hair, 0.1, z)
  z = np.where((np.abs(x) <= 0.38 + 0.04 * np.clip(y - 0.5, 0, None)) & (y >= 0.5), 0.15, z)
  jaw = 0.2 * k[26]
  h = np.where(y > 0, idn.face_h + jaw, idn.face_h)
  r2 = (x / idn.face_w) ** 2 + (y / h) ** 2
  face = r2 <= 1
  z = np.where(face, 0.2 + 0.5 * np.sqrt(np.clip(1 - r2, 0, None)), z)

  yaw = frame.yaw
  ex, ey = idn.eye_x, idn.eye_y
  along = np.clip((y - ey) / (idn.nose_y - ey), 0, 1)  # 0 between the eyes, 1 at the tip
  ridge_x = yaw * (0.6 + 0.4 * along)  # the fake yaw shifts the tip (nearer the camera) more than the bridge
  on_nose = (y > ey) & (y < idn.nose_y + 0.06)
  bumps = 0.3 * along * on_nose * np.exp(-0.5 * ((x - ridge_x) / (idn.nose_w * 0.9)) ** 2)
  for s in (-1, 1):
    bumps = bumps - 0.08 * gauss(s * ex + yaw * 0.6, ey, idn.eye_w, 0.07)
    bumps = bumps + (0.04 + 0.12 * k[6]) * gauss(s * ex + yaw * 0.6 + s * 0.02, ey + 0.3 - 0.10 * k[6], 0.14, 0.09)
  gap = 0.07 * k[25] + 0.75 * jaw
  bumps = bumps - 1.5 * gap * gauss(yaw * 0.8, idn.mouth_y + gap / 2, idn.mouth_w * 0.8, 0.03 + gap / 2)
  bumps = bumps + 0.06 * k[17] * gauss(yaw * 0.8, idn.mouth_y + 0.25, 0.12, 0.08)
  z = np.where(face, z + bumps, z)
  return np.clip(np.round(z / DEPTH_RANGE * 255), 0, 255).astype(np.uint8)


def depth_of(seed: int, subject: int, frame: int, size: int) -> np.ndarray:
  """The depth map ``(size, size, 1)`` uint8 of ``(seed, subject, frame)`` (the record's ``"depth"``)."""
  inten = frame_intensities(seed, subject, frame)
  return render_depth(_identity(seed, subject), make_frame_params(seed, subject, frame), inten, size)[:, :, None]


# ----------------------------------------------------------------------------------------------------------
# Random-access source, subject splits.


def train_test_subjects(num_subjects: int, test_fraction: float = 0.25, seed: int = 0
                        ) -> tuple[list[int], list[int]]:
  """Subject-exclusive ``(train, test)`` subject ids, a deterministic shuffle of ``range(num_subjects)``."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
  perm = _rng(seed, 4).permutation(num_subjects)
  n_test = max(1, int(round(num_subjects * test_fraction)))
  return sorted(perm[n_test:].tolist()), sorted(perm[:n_test].tolist())


def train_val_subjects(train: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
  """A subject-exclusive validation split carved from the training subjects ``train``: ``(train − val, val)``
  with ``max(1, round(len(train)·val_fraction))`` validation subjects drawn by ``seed`` (hyper-parameters and
  thresholds are chosen on them, never on the test subjects)."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
  train = sorted(int(s) for s in train)
  if len(train) < 2:
    raise ValueError(f"val_fraction: {len(train)} training subject(s) cannot be split into train and val")
  n_val = min(len(train) - 1, max(1, int(round(len(train) * val_fraction))))
  val = _rng(seed, 6).permutation(train)[:n_val]
  return sorted(set(train) - set(val.tolist())), sorted(val.tolist())


def subject_folds(num_subjects: int, num_folds: int = 3, seed: int = 0) -> list[list[int]]:
  """Splits ``range(num_subjects)`` into ``num_folds`` disjoint, near-equal subject parts (like BP4D's)."""
  if num_folds < 2 or num_folds > num_subjects:
    raise ValueError(f"num_folds: expected 2 ≤ num_folds ≤ num_subjects={num_subjects}, got {num_folds}")
  perm = _rng(seed, 5).permutation(num_subjects)
  return [sorted(p.tolist()) for p in np.array_split(perm, num_folds)]


def fold_subjects(num_subjects: int, fold: int, num_folds: int = 3, seed: int = 0
                  ) -> tuple[list[int], list[int]]:
  """``(train, test)`` subjects of cross-validation fold ``fold``: test on one part, train on the rest."""
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold: expected 0 ≤ fold < {num_folds}, got {fold}")
  parts = subject_folds(num_subjects, num_folds, seed)
  test = parts[fold]
  train = sorted(s for i, p in enumerate(parts) if i != fold for s in p)
  return train, test


class SynthFaces:
  """Random-access source of synthetic FACS faces, usable as ``grain.MapDataset.source(SynthFaces(...))``.

  Index ``i`` maps to ``subject = subjects[i // frames_per_subject]``, ``frame = i % frames_per_subject``;
  a record depends only on ``(seed, subject, frame)``, so a subject's records are identical in every subset.
  Picklable and needs no disk.
  """

  def __init__(self, seed: int = 0, num_subjects: int = 60, frames_per_subject: int = 200,
               image_size: int = 64, aus: Sequence[int] = BP4D_AUS, subjects: Sequence[int] | None = None,
               threshold: float = 2.0, depth: bool = False):
    if num_subjects < 1:
      raise ValueError(f"num_subjects: expected ≥ 1, got {num_subjects}")
    if frames_per_subject < 1:
      raise ValueError(f"frames_per_subject: expected ≥ 1, got {frames_per_subject}")
    if image_size < 16:
      raise ValueError(f"image_size: expected ≥ 16, got {image_size}")
    self._au_idx = np.array(_au_indices(aus), np.int64)
    subjects = list(range(num_subjects)) if subjects is None else [int(s) for s in subjects]
    bad = [s for s in subjects if not 0 <= s < num_subjects]
    if bad:
      raise ValueError(f"subjects: ids {bad} outside range({num_subjects})")
    self.seed, self.num_subjects, self.frames_per_subject = int(seed), num_subjects, frames_per_subject
    self.image_size, self.aus, self.subjects, self.threshold = image_size, tuple(aus), subjects, threshold
    self.depth = depth  # add the "depth" record key (render_depth)

  def __len__(self) -> int:
    return len(self.subjects) * self.frames_per_subject

  def subject_frame(self, index: int) -> tuple[int, int]:
    """``(subject, frame)`` of ``index``."""
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for SynthFaces of length {len(self)}")
    return self.subjects[index // self.frames_per_subject], index % self.frames_per_subject

  def labels(self, index: int) -> dict[str, np.ndarray]:
    """``au`` and ``au_intensity`` of ``index`` without rendering."""
    subject, frame = self.subject_frame(int(index))
    inten = frame_intensities(self.seed, subject, frame)[self._au_idx]
    return {"au": (inten >= self.threshold).astype(np.int8), "au_intensity": inten}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    subject, frame = self.subject_frame(int(index))
    inten = frame_intensities(self.seed, subject, frame)
    frame_params = make_frame_params(self.seed, subject, frame)
    image, landmarks = render_face(_identity(self.seed, subject), frame_params, inten, self.image_size)
    inten = inten[self._au_idx]
    record = {
        "image": image,
        "au": (inten >= self.threshold).astype(np.int8),
        "au_intensity": inten,
        "subject": np.int32(subject),
        "frame": np.int32(frame),
        "landmarks": landmarks,
    }
    if self.depth:
      record["depth"] = depth_of(self.seed, subject, frame, self.image_size)
    return record

  def __repr__(self) -> str:
    return (f"SynthFaces(seed={self.seed}, num_subjects={self.num_subjects}, "
            f"frames_per_subject={self.frames_per_subject}, image_size={self.image_size}, aus={self.aus}, "
            f"{len(self.subjects)} subjects)")


@functools.lru_cache(maxsize=256)
def _identity(seed: int, subject: int) -> Identity:
  return make_identity(seed, subject)


# ----------------------------------------------------------------------------------------------------------
# TFDS builder (array_record; works without TensorFlow).


@dataclasses.dataclass
class SynthFacesConfig(tfds.core.BuilderConfig):
  """What to render: image size, how many subjects and frames, which AUs, and the subject split."""

  image_size: int = 64
  num_subjects: int = 60
  frames_per_subject: int = 200
  seed: int = 0
  aus: tuple[int, ...] = BP4D_AUS
  test_fraction: float = 0.25


class SynthFacesBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS dataset of ``SynthFaces`` records; splits ``train`` / ``test`` are subject-exclusive.

  Build without TensorFlow and read back with grain::

    b = SynthFacesBuilder(data_dir=..., config="64px", file_format="array_record")
    b.download_and_prepare()
    source = b.as_data_source()["train"]  # records as in the module docstring
  """

  name = "synth_faces"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SynthFacesConfig(name="64px", image_size=64),
      SynthFacesConfig(name="224px", image_size=224),
      SynthFacesConfig(name="64px_disfa", image_size=64, aus=DISFA_AUS),
  ]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Nothing is downloaded, so there is no checksums file to find next to the code; and tfds' default
    # probe needs the optional `importlib_resources` package, which a TF-free install may lack.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s, n = cfg.image_size, len(cfg.aus)
    return self.dataset_info_from_configs(
        description="Procedurally rendered FACS faces with exact AU labels (maejax.data.synthfaces).",
        features=tfds.features.FeaturesDict({
            # A zlib-compressed Tensor rather than tfds.features.Image: encoding PNGs through Image makes tfds
            # import TensorFlow whenever it is installed (+3 s, +1 GB); this path never does.
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "au": tfds.features.Tensor(shape=(n,), dtype=np.int8),
            "au_intensity": tfds.features.Tensor(shape=(n,), dtype=np.float32),
            "subject": tfds.features.Scalar(dtype=np.int32),
            "frame": tfds.features.Scalar(dtype=np.int32),
            "landmarks": tfds.features.Tensor(shape=(len(LANDMARK_NAMES), 2), dtype=np.float32),
        }),
        supervised_keys=None,
    )

  def _source(self, subjects: Sequence[int]) -> SynthFaces:
    cfg = self.builder_config
    return SynthFaces(seed=cfg.seed, num_subjects=cfg.num_subjects, frames_per_subject=cfg.frames_per_subject,
                      image_size=cfg.image_size, aus=cfg.aus, subjects=subjects)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is rendered
    cfg = self.builder_config
    train, test = train_test_subjects(cfg.num_subjects, cfg.test_fraction, cfg.seed)
    return {"train": self._generate_examples(self._source(train)),
            "test": self._generate_examples(self._source(test))}

  def _generate_examples(self, source: SynthFaces):
    for i in range(len(source)):
      rec = source[i]
      yield f"{int(rec['subject'])}_{int(rec['frame'])}", rec


# ----------------------------------------------------------------------------------------------------------
# Grid of examples.


def _label_text(au: Sequence[int], aus: Sequence[int]) -> str:
  on = [str(a) for a, y in zip(aus, au, strict=True) if y]
  return "AU " + (",".join(on) if on else "-")


def make_grid(source: SynthFaces, indices: Sequence[int], cols: int | None = None) -> Image.Image:
  """Tiles records ``indices`` of ``source`` with their active AUs written below each face."""
  cols = cols or int(math.ceil(math.sqrt(len(indices))))
  rows = int(math.ceil(len(indices) / cols))
  s, text_h = source.image_size, 14
  grid = Image.new("RGB", (cols * s, rows * (s + text_h)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for n, i in enumerate(indices):
    rec = source[i]
    x, y = (n % cols) * s, (n // cols) * (s + text_h)
    grid.paste(Image.fromarray(rec["image"]), (x, y))
    draw.text((x + 2, y + s + 1), _label_text(rec["au"], source.aus), fill=(0, 0, 0))
  return grid


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Write a PNG grid of synthetic FACS faces with AU labels.")
  parser.add_argument("--out", default="synthfaces_grid.png")
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--n", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--aus", default="all", choices=("bp4d", "disfa", "all"))
  args = parser.parse_args(argv)
  aus = {"bp4d": BP4D_AUS, "disfa": DISFA_AUS, "all": ALL_AUS}[args.aus]
  src = SynthFaces(seed=args.seed, image_size=args.size, aus=aus)
  step = max(1, len(src) // args.n)
  make_grid(src, [(i * step + 37 * i) % len(src) for i in range(args.n)]).save(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
