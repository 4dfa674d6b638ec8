"""The objectives beyond MAE (BootMAE, SdAE, SD-MAE, MCM) and the EMA of the shared train state, against
independent references: closed forms, NumPy float64 recurrences and torch (CPU) written from the equations."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maejax import checkpoints, config_utils, losses, sharding
from maejax.data import pipeline, synthfaces
from maejax.models import bootmae, mcm, sdae, sdmae
from maejax.models.mae import MAEConfig, random_masking
from maejax.models.vit import sincos_pos_embed_2d
from maejax.trainers import common, objectives
from maejax.trainers import mae as mae_stage

ROOT = pathlib.Path(__file__).resolve().parent.parent
MC = MAEConfig(img_size=32, patch_size=8, width=32, depth=2, num_heads=4, decoder_width=32, decoder_depth=1,
               decoder_heads=4)
RNG = np.random.default_rng(0)


def t(x):
  return torch.from_numpy(np.asarray(x, np.float64))


def init(model, *args):
  r = jax.random.PRNGKey(0)
  return nn.meta.unbox(model.init({"params": r, "masking": r}, *args))


# ------------------------------------------------------------------------------------------------ EMA


def test_ema_schedules_closed_form():
  i = np.arange(0, 60)
  const = common.ema_momentum_schedule("constant", 0.99)
  np.testing.assert_array_equal(np.asarray(jax.vmap(const)(i)), np.float32(0.99))
  cos = common.ema_momentum_schedule("cosine", 0.96, 0.99, num_updates=50)
  ref = 0.99 + 0.5 * (0.96 - 0.99) * (1 + np.cos(np.pi * np.minimum(i, 50) / 50))
  np.testing.assert_allclose(np.asarray(jax.vmap(cos)(i)), ref, atol=1e-7)
  byol = common.ema_momentum_schedule("cosine", 0.996, 1.0, num_updates=50)
  np.testing.assert_allclose(np.asarray(jax.vmap(byol)(i)), 1 - (1 - 0.996) * (np.cos(np.pi * np.minimum(i, 50) / 50)
                                                                            + 1) / 2, atol=1e-7)
  # BootMAE: d(e) = 0.999 + e/100·(0.9999 − 0.999) for e < 100, then 0.9999 + min(300, e − 100)/300·(0.99999 − 0.9999).
  boot = common.ema_momentum_schedule("knots", knots=(0, 100, 400), values=(0.999, 0.9999, 0.99999))
  e = np.array([0, 50, 100, 250, 400, 800])
  ref = np.where(e < 100, 0.999 + e / 100 * (0.9999 - 0.999),
                 0.9999 + np.minimum(300, e - 100) / 300 * (0.99999 - 0.9999))
  np.testing.assert_allclose(np.asarray(jax.vmap(boot)(e)), ref, rtol=0, atol=1e-7)
  step = common.ema_momentum_schedule("knots", knots=(0, 5, 5), values=(0.9, 0.9, 0.99))
  np.testing.assert_allclose(np.asarray(jax.vmap(step)(np.arange(8))), [0.9] * 5 + [0.99] * 3, atol=1e-7)
  with pytest.raises(ValueError, match="unknown ema schedule"):
    common.ema_momentum_schedule("cosin")


def test_ema_updates_match_numpy_recurrence_every_k():
  ema = common.EMA(common.ema_momentum_schedule("cosine", 0.5, 0.9, num_updates=4), every=2, keys=("a",))
  params = [{"a": RNG.normal(size=(3,)).astype(np.float32), "b": np.zeros(2, np.float32)} for _ in range(9)]
  state = ema.init(params[0])
  ref = params[0]["a"].astype(np.float64)
  for s in range(1, 9):
    state = ema.update(state, params[s])
    if s % 2 == 0:
      i = s // 2 - 1
      m = 0.9 + 0.5 * (0.5 - 0.9) * (1 + np.cos(np.pi * min(i, 4) / 4))
      ref = m * ref + (1 - m) * params[s]["a"]
    np.testing.assert_allclose(np.asarray(state["params"]["a"]), ref, rtol=1e-6, err_msg=f"step {s}")
  assert set(state["params"]) == {"a"} and int(state["step"]) == 8
  # With constant θ: ξ_n = θ + dⁿ(ξ₀ − θ).
  const = common.EMA(common.ema_momentum_schedule("constant", 0.8))
  st = const.init({"w": np.zeros(2, np.float32)})
  for _ in range(5):
    st = const.update(st, {"w": np.ones(2, np.float32)})
  np.testing.assert_allclose(np.asarray(st["params"]["w"]), 1 - 0.8**5, rtol=1e-6)


def test_ema_in_the_train_state_follows_the_new_params_and_is_sharded_like_them():
  cfg = config_utils.load_config(f"{ROOT / 'configs' / 'mae_pretrain.py'}:smoke")
  model = mae_stage.build_model(cfg.model)
  init_fn = lambda r: model.init({"params": r, "masking": r}, jnp.zeros((1, 32, 32, 3)))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 2}, jax.devices()[:2])
  tx, _ = common.make_optimizer(cfg.optim, 16, 10)
  ema = common.EMA(common.ema_momentum_schedule("constant", 0.7), keys=("encoder",))
  tr = common.create_trainer(init_fn, mae_stage.mae_loss_fn(model), tx, mesh, cfg.sharding_rules, seed=0, ema=ema)
  kernel = lambda tree: tree["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"]
  assert kernel(tr.state.extra["ema"]["params"]).sharding == kernel(tr.state.params).sharding
  ref = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), jax.device_get(tr.state.params["encoder"]))
  state = tr.state
  for _ in range(3):
    batch = {"image": RNG.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)}
    state, _ = tr.step_fn(state, sharding.global_batch(batch, mesh))
    new = jax.device_get(state.params["encoder"])
    ref = jax.tree_util.tree_map(lambda e, p: 0.7 * e + 0.3 * p, ref, new)
  got = jax.device_get(state.extra["ema"]["params"]["encoder"])
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(state.extra["ema"]["step"]) == 3


# -------------------------------------------------------------------------------------------- BootMAE


def test_block_weights_match_torch_avg_pool():
  mask = (RNG.random((3, 16)) < 0.7).astype(np.float32)
  ref = torch.nn.functional.avg_pool2d(t(mask).reshape(3, 1, 4, 4), 3, 1, 1).reshape(3, 16).numpy()
  np.testing.assert_allclose(np.asarray(losses.block_weights(jnp.asarray(mask), 4)), mask * (1 + ref), atol=1e-6)


def test_bootmae_pixel_target_and_losses_match_torch():
  patches = RNG.normal(size=(2, 16, 8 * 8 * 3)).astype(np.float32)
  x = t(patches).reshape(2, 16, 64, 3)
  ref = ((x - x.mean(2, keepdim=True)) / (x.var(2, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(2, 16, -1)
  np.testing.assert_allclose(np.asarray(losses.bootmae_pixel_target(jnp.asarray(patches))), ref.numpy(), atol=2e-5)
  pred, target = RNG.normal(size=(2, 16, 32)), RNG.normal(size=(2, 16, 32)) * 3 + 1
  mask = (RNG.random((2, 16)) < 0.75).astype(np.float64)
  w = mask * (1 + F.avg_pool2d(t(mask).reshape(2, 1, 4, 4), 3, 1, 1).reshape(2, 16).numpy())
  ln = lambda a: F.layer_norm(t(a), (32,), eps=1e-6)
  ref = ((ln(target) - ln(pred)) ** 2).mean(-1).mul(t(w)).sum() / t(mask).sum()
  got = losses.bootmae_feature_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                    jnp.asarray(mask, jnp.float32), jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
  np.testing.assert_allclose(float(losses.linear_ramp(jnp.float32(0.1), 0.25)), 0.4, rtol=1e-6)


def test_block_masking_keeps_no_block_masked_patch():
  gen = pipeline.block_mask_noise(8, 0.61)
  rng = np.random.default_rng(1)
  for _ in range(20):
    rec = gen({"image": None}, rng)
    noise = rec["mask_noise"][None]
    blocks = noise[0] > 0  # block − u > 0 exactly where the block mask is 1
    assert 5 <= blocks.sum() <= 39
    ids_keep, mask, _ = random_masking(jnp.asarray(noise), 0.75)
    assert not blocks[np.asarray(ids_keep[0])].any() and np.asarray(mask).sum() == 48
    # The same keep-set as the official argsort(1 − (1 − mask + u)).
    u = blocks.astype(np.float64) - noise[0]
    ref = torch.argsort(1 - (1 - t(blocks.astype(np.float64)) + t(u)))[:16].numpy()
    assert set(ref.tolist()) == set(np.asarray(ids_keep[0]).tolist())


def test_bootmae_decoder_block_matches_a_torch_reference():
  block = bootmae.CrossAttnBlock(num_heads=2)
  x, ctx = RNG.normal(size=(2, 5, 8)).astype(np.float32), RNG.normal(size=(2, 3, 6)).astype(np.float32)
  v = init(block, x, ctx)["params"]
  got = np.asarray(block.apply({"params": v}, x, ctx))
  p = jax.tree_util.tree_map(lambda a: t(a), v)

  def ln(a, name):
    return F.layer_norm(a, a.shape[-1:], p[name]["scale"], p[name]["bias"], eps=1e-6)

  def mha(q_in, kv_in, a):
    q = torch.einsum("btd,dhk->bthk", q_in, a["query"]["kernel"]) + a["query"]["bias"]
    k = torch.einsum("btd,dhk->bthk", kv_in, a["key"]["kernel"]) + a["key"]["bias"]
    vv = torch.einsum("btd,dhk->bthk", kv_in, a["value"]["kernel"]) + a["value"]["bias"]
    w = torch.softmax(torch.einsum("bqhk,bshk->bhqs", q, k) / q.shape[-1] ** 0.5, -1)
    return torch.einsum("bhqs,bshk->bqhk", w, vv).flatten(2) @ a["out"]["kernel"].flatten(0, 1) + a["out"]["bias"]

  y = t(x)
  y = y + mha(ln(y, "norm1"), ln(y, "norm1"), p["attn"])
  y = y + mha(ln(y, "norm3"), ln(t(ctx), "norm4"), p["cross_attn"])
  h = ln(y, "norm2") @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
  y = y + F.gelu(h) @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  np.testing.assert_allclose(got, y.numpy(), atol=1e-5)


def test_bootmae_targets_are_the_full_image_last_block_and_ablations_build():
  model = bootmae.BootMAE(MC)
  x = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
  v = init(model, x)["params"]
  y = model.apply({"params": {"encoder": v["encoder"]}}, x, method=bootmae.BootMAE.targets)
  enc = MC.build_encoder()
  ref = enc.apply({"params": v["encoder"]}, x, None, return_blocks=(1,)).blocks[1][:, 1:]
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=0)
  assert y.shape == (2, 16, 32)
  plain = bootmae.BootMAE(MC, bootmae.BootMAEConfig(feature_target=False, target_aware=False))
  pv = init(plain, x)["params"]
  assert set(pv) == {"encoder", "decoder"} and "cross_attn" not in pv["decoder"]["blocks_0"]
  loss, m = bootmae.bootmae_loss(plain, pv, None, x, {"masking": jax.random.PRNGKey(1)}, jnp.float32(1.0))
  assert np.isfinite(float(loss)) and "feature_loss" not in m


# ----------------------------------------------------------------------------------------------- SdAE


def test_sdae_folds_are_disjoint_masked_and_of_equal_size():
  noise = jnp.asarray(RNG.random((3, 16)))
  ids_keep, mask, ids_restore = random_masking(noise, 0.75)
  folds = np.asarray(sdae.fold_ids(ids_restore, 4, 3))
  assert folds.shape == (3, 3, 4)
  for b in range(3):
    flat = folds[b].reshape(-1)
    assert len(set(flat.tolist())) == 12 and np.asarray(mask)[b, flat].all()
    assert set(flat.tolist()) == set(np.argsort(np.asarray(noise[b]))[4:].tolist())
  assert sdae.fold_ids(ids_restore, 4, 5).shape == (3, 5, 2)  # 12 masked, 5 folds: S' = 10


def test_sdae_teacher_fold_is_encoded_as_a_visible_set():
  model = sdae.SdAE(MC, sdae.SdAEConfig(drop_path=0.0))
  x = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
  v = init(model, x)["params"]
  folds = jnp.asarray(np.stack([RNG.permutation(16)[:12].reshape(3, 4) for _ in range(2)]))
  got = model.apply({"params": {"encoder": v["encoder"]}}, x, folds, method=sdae.SdAE.teacher)
  enc = MC.build_encoder()
  for j in range(3):
    ref = enc.apply({"params": v["encoder"]}, x, folds[:, j]).tokens[:, 1:]
    np.testing.assert_allclose(np.asarray(got.reshape(2, 3, 4, -1)[:, j]), np.asarray(ref), atol=1e-5)


def test_sdae_target_and_cosine_losses_match_torch():
  out = RNG.normal(size=(6, 4, 32)) * 2 + 0.5
  mean, var = t(out).mean(-1, keepdim=True), t(out).var(-1, keepdim=True)
  ref_target = (t(out) - mean) / (var + 1e-6) ** 0.5
  target = losses.sdae_target(jnp.asarray(out, jnp.float32))
  np.testing.assert_allclose(np.asarray(target), ref_target.numpy(), atol=1e-5)
  pred = RNG.normal(size=(6, 4, 32))
  token = losses.sdae_cosine_loss(jnp.asarray(pred, jnp.float32), target, "token")
  np.testing.assert_allclose(float(token), float(1 - F.cosine_similarity(ref_target, t(pred)).mean()), rtol=1e-5)
  feat = losses.sdae_cosine_loss(jnp.asarray(pred, jnp.float32), target, "feature")
  r = ref_target.numpy()
  cos = (r * pred).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(pred, axis=-1)
  np.testing.assert_allclose(float(feat), 1 - cos.mean(), rtol=1e-5)


# --------------------------------------------------------------------------------------------- SD-MAE


def test_dino_ce_and_center_match_torch_over_three_steps():
  center, tc = jnp.zeros(5), torch.zeros(5, dtype=torch.float64)
  for _ in range(3):
    s, te = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 5))
    got = losses.dino_ce(jnp.asarray(s, jnp.float32), jnp.asarray(te, jnp.float32), center, 0.1, 0.04)
    probs = F.softmax((t(te) - tc) / 0.04, dim=-1)
    ref = torch.sum(-probs * F.log_softmax(t(s) / 0.1, dim=-1), dim=-1).mean()
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-4)
    center = losses.center_update(center, jnp.asarray(te, jnp.float32), 0.04, 0.9, "sdmae")
    tc = 0.9 * tc + 0.1 * probs.mean(0)
    np.testing.assert_allclose(np.asarray(center), tc.numpy(), atol=1e-6)
  # A hand-worked two-class case: teacher (1, 0) at τ = 1 → p = softmax(1, 0); student logits 0 → −log ½.
  ce = losses.dino_ce(jnp.zeros((1, 2)), jnp.asarray([[1.0, 0.0]]), jnp.zeros(2), 1.0, 1.0)
  np.testing.assert_allclose(float(ce), np.log(2), rtol=1e-6)


def test_sdmae_pixel_target_weight_norm_and_stop_gradient():
  patches = RNG.normal(size=(2, 4, 8 * 8 * 3)).astype(np.float32)
  x = t(patches).reshape(2, 4, 64, 3)
  ref = ((x - x.mean(2, keepdim=True)) / (x.var(2, unbiased=True, keepdim=True).sqrt() + 1e-6)).reshape(2, 4, -1)
  np.testing.assert_allclose(np.asarray(losses.sdmae_pixel_target(jnp.asarray(patches))), ref.numpy(), atol=2e-5)
  w = sdmae.weight_norm(jnp.asarray(RNG.normal(size=(6, 9)), jnp.float32))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(w), axis=0), 1.0, rtol=1e-6)

  img = jnp.asarray(RNG.normal(size=(2, 32, 32, 3)), jnp.float32)
  for stop in (True, False):
    model = sdmae.SDMAE(MC, sdmae.SDMAEConfig(out_dim=16, hidden=16, bottleneck=8, stop_grad=stop, p=1.0))
    v = init(model, img)
    loss = lambda p, model=model, c=v["sd_center"]["center"]: sdmae.sdmae_loss(
        model, p, c, img, {"masking": jax.random.PRNGKey(3)})[0]
    g = jax.grad(loss)(v["params"])
    norm = float(optax_norm(g["decoder_head"]))
    assert (norm == 0.0) if stop else (norm > 0.0), (stop, norm)
    assert float(optax_norm(g["encoder_head"])) > 0


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------------------ MCM


def test_mcm_channel_dropping_and_early_fusion_is_one_convolution():
  keep = np.asarray(mcm.channel_keep(jax.random.PRNGKey(0), 64, 5, 2))
  assert (keep.sum(1) == 3).all() and set(np.unique(keep)) == {0.0, 1.0}
  assert (keep.mean(0) > 0.4).all()  # every channel is dropped sometimes, none always
  model = mcm.MCM(MC)
  x = jnp.asarray(RNG.normal(size=(2, 32, 32, 4)), jnp.float32)
  v = init(model, x, jnp.ones((2, 4)))["params"]
  fused = model.apply({"params": v}, x, method=lambda m, a: m.encoder.embed_patches(a[..., :3])
                      + m.aux_embed(a[..., 3:]).reshape(2, 16, -1))
  kernel = jnp.concatenate([v["encoder"]["patch_embed"]["kernel"], v["aux_embed"]["kernel"]], axis=2)
  conv = jax.lax.conv_general_dilated(x, kernel, (8, 8), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = conv.reshape(2, 16, -1) + v["encoder"]["patch_embed"]["bias"] + sincos_pos_embed_2d(32, 4, False)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=1e-5)
  preds, mask = model.apply({"params": v}, x, jnp.ones((2, 4)), rngs={"masking": jax.random.PRNGKey(1)})
  assert preds["image"].shape == (2, 16, 192) and preds["depth"].shape == (2, 16, 64)
  loss, m = mcm.mcm_loss(model, v, x, {"masking": jax.random.PRNGKey(1), "channels": jax.random.PRNGKey(2)})
  assert np.isfinite(float(loss)) and set(m) == {"image_loss", "depth_loss", "loss"}


def test_depth_is_an_extra_key_that_leaves_the_rgb_untouched():
  plain, deep = synthfaces.SynthFaces(num_subjects=3, frames_per_subject=4, image_size=32), \
      synthfaces.SynthFaces(num_subjects=3, frames_per_subject=4, image_size=32, depth=True)
  for i in (0, 5, 11):
    a, b = plain[i], deep[i]
    assert set(b) - set(a) == {"depth"} and b["depth"].shape == (32, 32, 1) and b["depth"].dtype == np.uint8
    np.testing.assert_array_equal(a["image"], b["image"])
    assert b["depth"].max() > 100 and (b["depth"] == 0).any()  # a face in front of the background
  rec = pipeline.MultiModalAugment(16)(deep[0], np.random.default_rng(0))
  assert rec["image"].shape == (16, 16, 3) and rec["depth"].shape == (16, 16, 1)


# ------------------------------------------------------------------------------------ smoke training


# BootMAE's smoke run (train, SIGTERM, resume with the EMA bit for bit) is in tests/test_training.py.
@pytest.mark.parametrize("objective", ["sdae", "sdmae", "mcm"])
def test_objective_smoke_trains_checkpoints_and_resumes(objective, tmp_path):
  cfg = config_utils.load_config(f"{ROOT / 'configs' / 'mae_pretrain.py'}:{objective}_smoke")
  config_utils.validate(cfg)
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every = 3, 3, 1
  cfg.batch_size = 8
  obj = objectives.build(cfg)
  trainer = objectives.create(cfg, obj, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  first = common.train_loop(trainer, obj.data, 3, str(tmp_path), cfg, obj.saved_config, name=objective)
  assert [s for s, _ in first.losses] == [1, 2, 3] and np.isfinite([v for _, v in first.losses]).all()
  assert checkpoints.latest_step(str(tmp_path)) == 3
  again = common.train_loop(trainer, obj.data, 4, str(tmp_path), cfg, obj.saved_config, name=objective)
  assert [s for s, _ in again.losses] == [4] and np.isfinite(again.losses[0][1])
  params, saved = checkpoints.load_params(str(tmp_path))
  assert "blocks_0" in params["encoder"] and saved["objective"] == objective
  assert MAEConfig.from_json(saved).width == cfg.model.width  # the encoder loads as an MAE encoder
  if obj.ema is not None:
    restored, _ = checkpoints.load_variables(str(tmp_path), ("ema",))
    assert int(restored["ema"]["step"]) == 4


def test_unknown_objective_is_rejected():
  cfg = config_utils.load_config(f"{ROOT / 'configs' / 'mae_pretrain.py'}:smoke")
  cfg.model.objective = "bootmea"
  with pytest.raises(ValueError, match=r"config\.model\.objective='bootmea'"):
    objectives.build(cfg)

