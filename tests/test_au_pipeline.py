"""AU data pipeline (train views, fixed evaluation occlusions) and the AU model's token plumbing."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maejax import au_infer, losses
from maejax.data import au_pipeline, occlusion, synthfaces
from maejax.models import au_model
from maejax.trainers import au as au_trainer


@pytest.fixture(scope="module")
def source():
  return synthfaces.SynthFaces(seed=0, num_subjects=4, frames_per_subject=6, image_size=32)


def test_labels_of_maps_unscored_to_unknown():
  out = au_pipeline.labels_of({"au": np.array([0, 1, 9, -1], np.int8)})
  np.testing.assert_array_equal(out, [0, 1, -1, -1])
  with pytest.raises(ValueError, match="au"):
    au_pipeline.labels_of({"au": np.zeros(3, np.int8)}, num_aus=12)


def test_train_view_is_the_same_face_occluded(source):
  aug = au_pipeline.AUTrainAugment(32, 8, 12, conditions=("block_upper",), fills=("black",), jitter=0.3)
  rec = source[3]
  out = aug(rec, np.random.default_rng(0))
  assert out["image"].shape == out["occluded"].shape == (32, 32, 3)
  assert out["image"].dtype == out["occluded"].dtype == np.uint8
  assert out["patch_frac"].shape == (16,) and out["patch_frac"].dtype == np.float32
  np.testing.assert_array_equal(out["au"], rec["au"])
  # Upper half black, lower half identical to the clean (teacher) view.
  np.testing.assert_array_equal(out["occluded"][:16], 0)
  np.testing.assert_array_equal(out["occluded"][16:], out["image"][16:])
  np.testing.assert_allclose(out["patch_frac"], np.repeat([1.0, 0.0], 8))


def test_train_view_patch_fraction_matches_pixels(source):
  aug = au_pipeline.AUTrainAugment(32, 8, 12)
  for seed in range(6):
    out = aug(source[seed], np.random.default_rng(seed))
    changed = (out["occluded"] != out["image"]).any(-1)
    # Every changed pixel lies in an occluded patch (a fill may coincide with the image on a few pixels).
    frac_changed = occlusion.patch_fraction_np(changed, 8)
    assert (frac_changed <= out["patch_frac"] + 1e-6).all()


def test_occluders_follow_flipped_landmarks(source):
  """A surgical mask placed from the transformed landmarks covers the lower face, flipped or not."""
  rec = source[0]
  for seed in range(8):
    aug = au_pipeline.AUTrainAugment(32, 8, 12, conditions=("mask",), fills=("black",), jitter=0.0)
    out = aug(rec, np.random.default_rng(seed))
    rows = out["patch_frac"].reshape(4, 4).sum(1)
    # The faces fill the frame (brows near the top, chin near the bottom): the top patch row (forehead, brows)
    # stays visible and the occluded area is centred well below the eyes.
    centroid_y = (rows * (np.arange(4) + 0.5) * 8).sum() / rows.sum()
    assert rows[0] < 0.1 and centroid_y > rec["landmarks"][:2, 1].max() + 4, (rows, centroid_y)


def test_color_jitter_zero_is_identity_and_range():
  img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(au_pipeline.color_jitter(img, np.random.default_rng(0), 0.0), img)
  out = au_pipeline.color_jitter(img, np.random.default_rng(0), 0.5)
  assert out.dtype == np.uint8 and out.shape == img.shape


def test_eval_view_is_fixed_per_example_and_condition(source):
  v = au_pipeline.AUEvalView(32, 8, 12, "patches_30", seed=1)
  a, b = v(5, source[5]), v(5, source[5])
  np.testing.assert_array_equal(a["image"], b["image"])
  seed = occlusion.condition_seed(1, 5, "patches_30")
  ref, _, frac = occlusion.occlude(source[5]["image"], "patches_30", seed, 8, source[5]["landmarks"])
  np.testing.assert_array_equal(a["image"], ref)
  np.testing.assert_allclose(a["patch_frac"], frac)
  assert abs(frac.mean() - 0.3) < 0.02
  other = au_pipeline.AUEvalView(32, 8, 12, "patches_30", seed=1)(6, source[6])
  assert not np.array_equal(other["patch_frac"], a["patch_frac"])


def test_eval_batches_cover_indices(source):
  batches = list(au_pipeline.eval_batches(source, "clean", batch_size=4, size=32, patch_size=8, num_aus=12,
                                          indices=[0, 2, 3, 7, 9]))
  assert [len(b["au"]) for b in batches] == [4, 1]
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), [0, 2, 3, 7, 9])
  np.testing.assert_array_equal(batches[0]["image"][1], source[2]["image"])
  with pytest.raises(ValueError, match="condition"):
    next(au_pipeline.eval_batches(source, "nope", batch_size=4, size=32, patch_size=8, num_aus=12))


def test_train_pipeline_batches(source):
  it = iter(au_pipeline.train_pipeline(source, global_batch_size=4, size=32, patch_size=8, num_aus=12, seed=0,
                                       process_index=0, process_count=1))
  b = next(it)
  assert b["image"].shape == b["occluded"].shape == (4, 32, 32, 3)
  assert b["patch_frac"].shape == (4, 16) and b["au"].shape == (4, 12)
  with pytest.raises(ValueError, match="train_conditions"):
    au_pipeline.train_pipeline(source, global_batch_size=4, size=32, patch_size=8, num_aus=12, seed=0,
                               conditions=("clean", "bogus"))


# ------------------------------------------------------------------------------------------- model plumbing


def test_scatter_and_masked_pool_match_numpy():
  rng = np.random.default_rng(0)
  b, l, d = 2, 16, 3
  ids = np.stack([np.sort(rng.choice(l, 7, replace=False)) for _ in range(b)])
  tok = rng.normal(size=(b, 7, d)).astype(np.float32)
  grid, valid = au_model.scatter_to_grid(jnp.asarray(tok), jnp.asarray(ids), l)
  pooled, counts = au_model.masked_pool(grid, valid, 2)
  for i in range(b):
    full = np.zeros((l, d), np.float32)
    m = np.zeros(l, bool)
    full[ids[i]], m[ids[i]] = tok[i], True
    for cell in range(4):
      cy, cx = divmod(cell, 2)
      members = [r * 4 + c for r in (2 * cy, 2 * cy + 1) for c in (2 * cx, 2 * cx + 1)]
      sel = [j for j in members if m[j]]
      assert counts[i, cell] == len(sel)
      ref = full[sel].mean(0) if sel else np.zeros(d)
      np.testing.assert_allclose(pooled[i, cell], ref, atol=1e-6)
  with pytest.raises(ValueError, match="head_pool"):
    au_model.masked_pool(grid, valid, 3)


def test_keep_least_occluded_and_drop_ids():
  frac = np.array([[0.0, 1.0, 0.2, 0.9, 0.0, 0.6, 0.4, 0.0]], np.float32)
  ids = np.asarray(au_model.keep_least_occluded(jnp.asarray(frac), 4))
  np.testing.assert_array_equal(ids, [[0, 2, 4, 7]])
  # Threshold 0.5 keeps 5 patches, rounded up to a multiple of 2 → 6: the 6 least occluded.
  np.testing.assert_array_equal(au_infer.drop_ids(frac, 0.5, 2, 2), [[0, 2, 4, 5, 6, 7]])
  assert au_infer.drop_ids(np.zeros((2, 8), np.float32), 0.5, 2, 2) is None


@pytest.mark.parametrize("head", ["graph", "linear"])
def test_au_model_shapes_with_and_without_dropping(head):
  m = au_model.AUModel(img_size=32, patch_size=8, width=32, depth=2, num_heads=4, num_aus=5, channels=8,
                       top_k=2, head=head, transform_depth=1, occlusion_predictor=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  v = m.init(jax.random.PRNGKey(0), x)
  out = m.apply(v, x)
  assert out.head.probs.shape == (2, 5) and out.occ_logits.shape == (2, 16)
  ids = jnp.asarray([[0, 1, 2, 5, 6, 9], [3, 4, 8, 10, 12, 15]])
  out2 = m.apply(v, x, ids)
  assert out2.head.probs.shape == (2, 5)
  assert np.isfinite(np.asarray(out2.head.probs)).all()
  if head == "graph":
    assert out2.head.edge_feats.shape == (2, 25, 8)
  else:
    assert out2.head.edge_feats is None


def test_frozen_encoder_gets_no_gradient():
  m = au_model.AUModel(img_size=32, patch_size=8, width=32, depth=1, num_heads=4, num_aus=3, channels=8, top_k=2,
                       stage=1, freeze_encoder=True, transform_depth=1)
  x = jnp.ones((2, 32, 32, 3))
  v = m.init(jax.random.PRNGKey(0), x)
  g = jax.grad(lambda p: m.apply({**v, "params": p}, x).head.probs.sum())(v["params"])
  assert all(float(jnp.abs(a).sum()) == 0 for a in jax.tree_util.tree_leaves(g["encoder"]))
  assert any(float(jnp.abs(a).sum()) > 0 for a in jax.tree_util.tree_leaves(g["transform"]))


def test_trainable_mask_partial():
  params = {"encoder": {"blocks_0": {"w": 0}, "blocks_1": {"w": 0}, "norm": {"scale": 0}, "cls_token": 0},
            "au_head": {"w": 0}}
  m = au_trainer.trainable_mask(params, "partial:1", depth=2)
  assert m == {"encoder": {"blocks_0": {"w": False}, "blocks_1": {"w": True}, "norm": {"scale": True},
                           "cls_token": False}, "au_head": {"w": True}}
  assert au_trainer.trainable_mask(params, "finetune", 2) is None
  with pytest.raises(ValueError, match="student.encoder"):
    au_trainer.trainable_mask(params, "half", 2)


def test_occlusion_bce_matches_formula():
  logits = np.array([[-2.0, 0.0, 3.0]], np.float32)
  t = np.array([[0.0, 0.5, 1.0]], np.float32)
  s = 1 / (1 + np.exp(-logits))
  ref = np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)))
  np.testing.assert_allclose(float(losses.occlusion_bce(jnp.asarray(logits), jnp.asarray(t))), ref, rtol=1e-5)


def test_train_view_has_the_eval_scale(source):
  """Training faces are shifted copies of the evaluation view (same scale), never zoomed: the old S·8/7 resize
  + S crop showed every training face 14 % larger than the faces the model is evaluated on."""
  rec = source[2]
  ev = au_pipeline.AUEvalView(32, 8, 12, "clean")(2, rec)["image"]
  pad = 2  # round(32 / 14)
  padded = np.pad(ev, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  crops = {(t, l): padded[t:t + 32, l:l + 32] for t in range(2 * pad + 1) for l in range(2 * pad + 1)}
  aug = au_pipeline.AUTrainAugment(32, 8, 12, occlude=False, jitter=0.0, flip=False)
  shifts = set()
  for seed in range(12):
    img = aug(rec, np.random.default_rng(seed))["image"]
    hits = [k for k, c in crops.items() if np.array_equal(img, c)]
    assert hits, f"seed {seed}: training view is not a shifted evaluation view"
    shifts.update(hits)
  assert len(shifts) > 1  # the translation is random


# ------------------------------------------------------------------------------------- label-scarce regime


def test_labelled_subset_is_fixed_by_seed():
  a = au_pipeline.labelled_subset(1000, 0.3, seed=0)
  assert len(a) == 300 and len(np.unique(a)) == 300 and (np.diff(a) > 0).all() and a.max() < 1000
  np.testing.assert_array_equal(a, au_pipeline.labelled_subset(1000, 0.3, seed=0))
  assert not np.array_equal(a, au_pipeline.labelled_subset(1000, 0.3, seed=1))
  assert au_pipeline.labelled_subset(1000, 1.0, seed=0) is None  # every frame labelled: the old pipelines
  assert len(au_pipeline.labelled_subset(10, 0.01, seed=0)) == 1
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="label_fraction"):
      au_pipeline.labelled_subset(10, bad, seed=0)


class _Indexed:
  """Records that carry their own index (``au`` = the index's low bits), for checking what a batch holds."""

  def __len__(self):
    return 40

  def __getitem__(self, i):
    return {"idx": np.int32(i), "au": np.array([i % 2, (i // 2) % 2], np.int8)}


def _keep(record, rng):
  return dict(record)


def test_mixed_batches_hold_a_fixed_labelled_share_and_resume():
  src = _Indexed()
  labelled = au_pipeline.labelled_subset(len(src), 0.25, seed=3)
  rest = np.setdiff1d(np.arange(len(src)), labelled)
  parts = (au_pipeline.Subset(src, labelled), au_pipeline.Subset(src, rest, hide_labels=True))
  it = iter(au_pipeline.mixed_build(parts, (3, 5), seed=0, augment=_keep, process_index=0, process_count=1))
  seen = []
  for _ in range(12):
    b = next(it)
    assert b["idx"].shape == (8,)
    assert np.isin(b["idx"][:3], labelled).all() and np.isin(b["idx"][3:], rest).all()
    np.testing.assert_array_equal(b["au"][3:], -1)  # hidden labels
    np.testing.assert_array_equal(b["au"][:3], np.stack([src[i]["au"] for i in b["idx"][:3]]))
    seen.extend(b["idx"][:3].tolist())
  assert set(seen) == set(labelled.tolist())  # 36 draws cover the 10 labelled frames (an epoch every 10)
  # The iterator state is checkpointable: a restored iterator continues with the same batches.
  state = it.get_state()
  nxt = [next(it)["idx"] for _ in range(3)]
  it2 = iter(au_pipeline.mixed_build(parts, (3, 5), seed=0, augment=_keep, process_index=0, process_count=1))
  it2.set_state(state)
  for want in nxt:
    np.testing.assert_array_equal(next(it2)["idx"], want)
  with pytest.raises(ValueError, match="labelled_per_batch"):
    au_pipeline.mixed_build(parts, (0, 8), seed=0, augment=_keep, process_index=0, process_count=1)


def test_train_pipeline_with_label_fraction(source):
  labelled = au_pipeline.labelled_subset(len(source), 0.5, seed=0)
  kw = dict(global_batch_size=4, size=32, patch_size=8, num_aus=12, seed=0, labelled=labelled,
            process_index=0, process_count=1)
  teacher = next(iter(au_pipeline.train_pipeline(source, occlude=False, labelled_per_batch=0, **kw)))
  assert "occluded" not in teacher and (teacher["au"] >= 0).all()  # the teacher reads labelled frames only
  student = next(iter(au_pipeline.train_pipeline(source, labelled_per_batch=1, **kw)))
  assert (student["au"][:1] >= 0).all() and (student["au"][1:] == -1).all()
  assert student["occluded"].shape == (4, 32, 32, 3)
  # The WAL weights' sample of the labelled subset never sees a hidden label.
  sub = au_pipeline.Subset(source, labelled)
  y = au_pipeline.sample_labels(sub, 12)
  np.testing.assert_array_equal(y, np.stack([source.labels(int(i))["au"] for i in labelled]))


def test_val_split_is_carved_from_training_subjects():
  from maejax.data import pipeline as data_pipeline
  cfg = ml_collections.ConfigDict({"num_subjects": 12, "test_fraction": 0.25, "seed": 0, "frames_per_subject": 3,
                                   "image_size": 32, "cache_dir": ""})
  before = data_pipeline.synthfaces_source(cfg, "train").subjects
  with pytest.raises(ValueError, match="val_fraction"):
    data_pipeline.synthfaces_source(cfg, "val")
  cfg.val_fraction = 0.25
  train, val, test = (data_pipeline.synthfaces_source(cfg, s).subjects for s in ("train", "val", "test"))
  assert len(val) == 2 and not set(val) & set(train) and not set(val) & set(test)
  assert sorted(train + val) == sorted(before)
  assert (train, val) == synthfaces.train_val_subjects(before, 0.25, seed=0)


def test_model_exposes_transformed_tokens_on_the_grid():
  m = au_model.AUModel(img_size=32, patch_size=8, width=32, depth=2, num_heads=4, channels=16, transform_depth=1)
  t = au_model.AUModel(img_size=32, patch_size=8, width=32, depth=2, num_heads=4, channels=16, transform_depth=0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  tv = t.init(jax.random.PRNGKey(1), x)
  out = t.apply(tv, x)
  enc = t.apply(tv, x, method=lambda mod, im: mod.encoder(im, None, train=False).tokens)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(enc[:, 1:]))  # the teacher: encoder tokens
  assert out.token_valid.shape == (2, 16) and float(out.token_valid.min()) == 1.0
  mv = m.init(jax.random.PRNGKey(2), x)
  ids = jnp.array([[0, 3, 5, 9], [1, 2, 14, 15]])
  o = m.apply(mv, x, ids)
  assert o.tokens.shape == (2, 16, 32)
  np.testing.assert_array_equal(np.asarray(o.token_valid).sum(1), [4, 4])
  np.testing.assert_array_equal(np.asarray(o.tokens)[0, 1], 0.0)  # a dropped patch: zeros, valid 0
