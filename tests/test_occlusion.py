"""Tests of maejax.data.occlusion: coverage, patch fractions, determinism, placement, errors."""

import numpy as np
import pytest

from maejax.data import occlusion as oc
from maejax.data import synthfaces as sf


def _image(size=64, seed=0):
  return np.random.default_rng(seed).integers(1, 255, (size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,square", [(64, None), (64, 8), (96, 5), (224, 14)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_patch_ratio_within_two_percent(size, square, ratio):
  for seed in range(3):
    mask = oc.random_patches_mask((size, size), ratio, seed, square=square)
    assert abs(mask.mean() - ratio) <= 0.02
  aligned = oc.random_patches_mask((size, size), ratio, 0, square=8 if size % 8 == 0 else 4, aligned=True)
  assert abs(aligned.mean() - ratio) <= 0.02


@pytest.mark.parametrize("condition", sorted(oc.CONDITIONS))
def test_patch_fraction_is_mean_pooled_mask_and_pixels(condition):
  img = _image(64)
  out, mask, frac = oc.occlude(img, condition, 7, patch_size=8)
  assert out.dtype == np.uint8 and out.shape == img.shape and mask.dtype == bool and mask.shape == (64, 64)
  # Independent reference: explicit loop over patches.
  ref = np.array([mask[i:i + 8, j:j + 8].mean() for i in range(0, 64, 8) for j in range(0, 64, 8)])
  assert frac.dtype == np.float32 and frac.shape == (64,)
  np.testing.assert_allclose(frac, ref, atol=1e-6)
  np.testing.assert_array_equal(out[~mask], img[~mask])  # unoccluded pixels untouched
  if condition != "clean":
    assert mask.any()
    assert (out[mask] != img[mask]).any(-1).mean() > 0.95  # black / colour fill changes occluded pixels
  else:
    assert not mask.any()


def test_jnp_patch_fraction_matches_numpy():
  masks = np.stack([oc.occlusion_mask((32, 32), c, 3) for c in ("patches_30", "block_random", "mask")])
  got = np.asarray(oc.patch_fraction_from_mask(masks, 4))
  ref = masks.reshape(3, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(3, 64, 16).mean(-1)
  np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("fill", ["black", "mean", "noise", "texture", "color"])
def test_fills_deterministic_and_change_pixels(fill):
  img = _image(48)
  tex = _image(40, seed=9)
  a = oc.occlude(img, "patches_30", 11, 8, fill=fill, texture=tex)
  b = oc.occlude(img, "patches_30", 11, 8, fill=fill, texture=tex)
  c = oc.occlude(img, "patches_30", 12, 8, fill=fill, texture=tex)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert (a[1] != c[1]).any()
  np.testing.assert_array_equal(a[0][~a[1]], img[~a[1]])
  if fill == "mean":
    np.testing.assert_array_equal(a[0][a[1]][0], np.round(img.reshape(-1, 3).mean(0)).astype(np.uint8))
  assert (a[0][a[1]] != img[a[1]]).any(-1).mean() > 0.9


def test_condition_seed_fixed_and_distinct():
  s = oc.condition_seed(0, 5, "patches_30")
  assert s == oc.condition_seed(0, 5, "patches_30")
  assert len({s, oc.condition_seed(0, 6, "patches_30"), oc.condition_seed(0, 5, "patches_50"),
              oc.condition_seed(1, 5, "patches_30")}) == 4
  img = _image(32)
  m1 = oc.occlude(img, "block_random", oc.condition_seed(0, 5, "block_random"), 8)[1]
  m2 = oc.occlude(img, "block_random", oc.condition_seed(0, 5, "block_random"), 8)[1]
  np.testing.assert_array_equal(m1, m2)
  assert 0.2 < m1.mean() < 0.55


def test_halves():
  img = _image(32)
  for cond, sl in [("block_upper", np.s_[:16]), ("block_lower", np.s_[16:]), ("block_left", np.s_[:, :16]),
                   ("block_right", np.s_[:, 16:])]:
    mask = oc.occlude(img, cond, 0, 8)[1]
    ref = np.zeros((32, 32), bool)
    ref[sl] = True
    np.testing.assert_array_equal(mask, ref)


@pytest.mark.parametrize("index", [0, 33, 170])
def test_shapes_land_on_the_right_part_of_the_face(index):
  size = 96
  rec = sf.SynthFaces(image_size=size, num_subjects=2, frames_per_subject=200)[index]
  lm = rec["landmarks"]
  eye_y, nose_y, mouth_y = lm[:2, 1].mean(), lm[2, 1], lm[3:5, 1].mean()
  for condition, lms in [(c, l) for c in ("mask", "glasses", "hand") for l in (lm, None)]:
    mask = oc.occlude(rec["image"], condition, 1, 8, landmarks=lms)[1]
    ys, xs = np.nonzero(mask)
    if lms is None:  # default positions of a centred face: compare with the image, not this face
      eye_y_, nose_y_, mouth_y_ = 0.45 * size, 0.58 * size, 0.68 * size
    else:
      eye_y_, nose_y_, mouth_y_ = eye_y, nose_y, mouth_y
    cy = ys.mean()
    if condition == "mask":
      assert ys.min() > eye_y_ and cy > nose_y_
      assert mask[int(round(mouth_y_)), int(round(xs.mean()))]  # covers the mouth
    elif condition == "glasses":
      assert ys.max() < nose_y_ and abs(cy - eye_y_) < 0.1 * size
      if lms is not None:
        for x, y in lm[:2]:
          assert mask[int(round(y)), int(round(x))]  # covers both eyes
    else:
      assert cy > nose_y_ - 0.05 * size and ys.min() > eye_y_
      if lms is not None:
        assert mask[int(round(mouth_y)), int(round(lm[3:5, 0].mean()))]


def test_sample_occlusion():
  rng = np.random.default_rng(0)
  img = _image(32)
  names = {oc.sample_condition(rng) for _ in range(200)}
  assert names == set(oc.TRAIN_CONDITIONS)
  out, mask, frac = oc.sample_occlusion(img, np.random.default_rng(1), 8)
  assert out.shape == img.shape and frac.shape == (16,)


def test_bad_arguments():
  img = _image(32)
  with pytest.raises(ValueError, match="ratio"):
    oc.random_patches_mask((32, 32), 0.0, 0)
  with pytest.raises(ValueError, match="ratio"):
    oc.random_patches_mask((32, 32), 1.2, 0)
  with pytest.raises(ValueError, match="ratio"):
    oc.random_block_mask((32, 32), -0.1, 0)
  with pytest.raises(ValueError, match="condition"):
    oc.occlude(img, "scarf", 0, 8)
  with pytest.raises(ValueError, match="patch_size"):
    oc.occlude(img, "clean", 0, 5)
  with pytest.raises(ValueError, match="patch_size"):
    oc.patch_fraction_from_mask(np.zeros((1, 32, 32), bool), 6)
  with pytest.raises(ValueError, match="fill"):
    oc.occlude(img, "patches_10", 0, 8, fill="blur")
  with pytest.raises(ValueError, match="texture"):
    oc.occlude(img, "patches_10", 0, 8, fill="texture")
  with pytest.raises(ValueError, match="landmarks"):
    oc.occlude(img, "mask", 0, 8, landmarks=np.zeros((3, 2)))
  with pytest.raises(ValueError, match="conditions"):
    oc.sample_condition(np.random.default_rng(0), ["scarf"])
