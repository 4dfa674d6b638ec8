"""ViT / MAE / DMAE core against independent references (formulas evaluated separately in NumPy)."""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import losses
from maejax.models.dmae import DMAEStudent, ProjectionHead, dmae_loss, teacher_features
from maejax.models.mae import MAE, MAEConfig, random_masking
from maejax.models.vit import (
  ATTENTION_IMPLEMENTATIONS,
  ViT,
  attention,
  patchify,
  sincos_pos_embed_2d,
  unpatchify,
  vit_size,
)

TINY = dict(img_size=32, patch_size=8, width=64, depth=4, num_heads=2, decoder_width=32, decoder_depth=2,
            decoder_heads=2)


def init(model, *args, **kw):
  rngs = {"params": jax.random.key(0), "masking": jax.random.key(1)}
  return nn.meta.unbox(model.init(rngs, *args, **kw))


def images(b=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


# ----------------------------------------------------------------------------------- position embedding


def reference_sincos(d, g):
  """The formula of DESIGN.md §2 written out token by token, float64."""
  out = np.zeros((1 + g * g, d))
  q = d // 4
  for h in range(g):
    for w in range(g):
      row = 1 + h * g + w
      for k in range(q):
        om = 1.0 / 10000.0 ** (k / q)
        out[row, k] = math.sin(w * om)
        out[row, q + k] = math.cos(w * om)
        out[row, 2 * q + k] = math.sin(h * om)
        out[row, 3 * q + k] = math.cos(h * om)
  return out


@pytest.mark.parametrize("d,g", [(16, 3), (64, 4), (768, 14)])
def test_sincos_matches_formula(d, g):
  ours = sincos_pos_embed_2d(d, g)
  assert ours.dtype == np.float64 and ours.shape == (1 + g * g, d)
  np.testing.assert_allclose(ours, reference_sincos(d, g), rtol=0, atol=1e-12)


def test_sincos_rejects_bad_dim():
  with pytest.raises(ValueError, match="divisible by 4"):
    sincos_pos_embed_2d(30, 2)


# ------------------------------------------------------------------------------------------- patches


def test_patchify_order_and_roundtrip():
  x = np.random.default_rng(0).normal(size=(2, 16, 24, 3)).astype(np.float32)
  x = x[:, :16, :16]
  p = 4
  got = np.asarray(patchify(jnp.asarray(x), p))
  # Independent: patch (i, j) row-major, pixels (pi, pj) row-major, channel fastest.
  ref = np.stack([np.stack([x[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(-1)
                            for i in range(4) for j in range(4)]) for b in range(2)])
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(np.asarray(unpatchify(jnp.asarray(got), p)), x)


# ------------------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.33])
def test_random_masking_counts_and_restore(ratio):
  b, l = 5, 49
  noise = jax.random.uniform(jax.random.key(3), (b, l))
  ids_keep, mask, ids_restore = random_masking(noise, ratio)
  keep = int(l * (1 - ratio))
  assert ids_keep.shape == (b, keep)
  np.testing.assert_array_equal(np.asarray(mask.sum(1)), np.full(b, l - keep))
  n = np.asarray(noise)
  for i in range(b):
    order = np.argsort(n[i], kind="stable")
    np.testing.assert_array_equal(np.asarray(ids_keep[i]), order[:keep])
    expect = np.ones(l)
    expect[order[:keep]] = 0
    np.testing.assert_array_equal(np.asarray(mask[i]), expect)
    np.testing.assert_array_equal(order[np.asarray(ids_restore[i])], np.arange(l))


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match="mask_ratio"):
    random_masking(jnp.zeros((1, 4)), ratio)
  with pytest.raises(ValueError, match="mask_ratio"):
    init(MAE(**TINY, mask_ratio=ratio), images())


# ---------------------------------------------------------------------------------------------- loss


def reference_mae_loss(pred, imgs, mask, p, norm_pix):
  pred, imgs, mask = map(lambda a: np.asarray(a, np.float64), (pred, imgs, mask))
  b, h, w, c = imgs.shape
  tgt = np.asarray(patchify(jnp.asarray(imgs), p), np.float64)
  if norm_pix:
    mu = tgt.mean(-1, keepdims=True)
    var = tgt.var(-1, ddof=1, keepdims=True)
    tgt = (tgt - mu) / np.sqrt(var + 1e-6)
  per = ((pred - tgt) ** 2).mean(-1)
  return (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_forward_loss_matches_formula(norm_pix):
  model = MAE(**TINY, norm_pix_loss=norm_pix)
  x = images()
  params = init(model, x)
  noise = jax.random.uniform(jax.random.key(7), (2, 16))
  out = model.apply(params, x, noise)
  assert out.pred.shape == (2, 16, 8 * 8 * 3) and out.latent.shape == (2, 1 + 4, 64)
  ref = reference_mae_loss(out.pred, x, out.mask, 8, norm_pix)
  np.testing.assert_allclose(float(out.loss), ref, rtol=1e-5)
  assert np.isfinite(float(out.loss))
  rec = model.apply(params, out, x, method=MAE.reconstruct)
  assert rec.shape == x.shape


def test_mae_jit_grad_and_size_table():
  model = MAE(**TINY)
  x = images()
  params = init(model, x)
  g = jax.jit(jax.grad(lambda p: model.apply(p, x, rngs={"masking": jax.random.key(2)}).loss))(params)
  leaves = jax.tree_util.tree_leaves(g)
  assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
  assert vit_size("B") == {"width": 768, "depth": 12, "num_heads": 12}
  assert vit_size("L") == {"width": 1024, "depth": 24, "num_heads": 16}
  assert vit_size("H") == {"width": 1280, "depth": 32, "num_heads": 16}
  with pytest.raises(ValueError, match="unknown ViT size 'XL'"):
    MAEConfig.from_config({"size": "XL"})


def test_vit_b_param_count_matches_official():
  # Official ViT-B/16 MAE encoder: 85,798,656 weights without pos_embed (86,389,248 with the 197x768 buffer);
  # independent count from the architecture formula.
  d, L, p = 768, 12, 16
  per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
  expected = p * p * 3 * d + d + d + L * per_block + 2 * d
  shapes = jax.eval_shape(lambda: nn.meta.unbox(
      ViT(width=d, depth=L, num_heads=12).init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))))
  n = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
  assert n == expected


def test_qkv_init_bounds_match_fused_linear():
  d = 64
  params = init(ViT(img_size=32, patch_size=8, width=d, depth=1, num_heads=2), images())
  q = np.asarray(params["params"]["blocks_0"]["attn"]["query"]["kernel"])
  bound = math.sqrt(6 / (d + 3 * d))
  assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound


@pytest.mark.parametrize("d, heads", [(64, 2), (768, 12)])
def test_init_bounds_of_the_other_linears_are_xavier(d, heads):
  """Official MAE: xavier-uniform U(±sqrt(6 / (fan_in + fan_out))) for every Linear. The attention output
  kernel is stored (H, Dh, D) but is the Linear(D, D) ``attn.proj``: its bound is sqrt(6 / 2D), which needs the
  initializer to see the (H, Dh, D) shape (on a flattened (D, D) one its (0, 1) in-axes would count fan_out as
  1)."""
  params = init(ViT(img_size=32, patch_size=8, width=d, depth=1, num_heads=heads), images())["params"]
  blk = params["blocks_0"]
  for kernel, fan_in, fan_out in [(blk["attn"]["out"]["kernel"], d, d), (blk["mlp"]["fc1"]["kernel"], d, 4 * d),
                                  (blk["mlp"]["fc2"]["kernel"], 4 * d, d)]:
    bound = math.sqrt(6 / (fan_in + fan_out))
    w = np.abs(np.asarray(kernel))
    assert w.max() <= bound and w.max() > 0.9 * bound, (kernel.shape, w.max(), bound)


def test_bad_images_rejected():
  model = MAE(**TINY)
  params = init(model, images())
  with pytest.raises(ValueError, match=r"expected images of shape \(B, 32, 32, 3\)"):
    model.apply(params, images(size=48), rngs={"masking": jax.random.key(0)})
  with pytest.raises(ValueError, match="expected images"):
    model.apply(params, jnp.zeros((2, 32, 32, 1)), rngs={"masking": jax.random.key(0)})
  with pytest.raises(ValueError, match="noise must have shape"):
    model.apply(params, images(), jnp.zeros((2, 15)))


def test_mask_tokens_in_encoder_variant_runs():
  model = MAE(**TINY, mask_token_in_encoder=True)
  x = images()
  params = init(model, x)
  out = model.apply(params, x, rngs={"masking": jax.random.key(0)})
  assert out.latent.shape == (2, 1 + 4, 64) and np.isfinite(float(out.loss))


# ---------------------------------------------------------------------------------------------- DMAE


def test_encoder_truncation_equals_full_block_output():
  vit = ViT(img_size=32, patch_size=8, width=64, depth=4, num_heads=2)
  x = images()
  params = init(vit, x)
  ids = jnp.array([[0, 5, 9, 15], [3, 4, 1, 2]])
  full = vit.apply(params, x, ids, return_blocks=(1, 2))
  part = vit.apply(params, x, ids, return_blocks=(1, 2), stop_after=2)
  assert part.tokens is None and full.tokens.shape == (2, 5, 64)
  for b in (1, 2):
    np.testing.assert_array_equal(np.asarray(part.blocks[b]), np.asarray(full.blocks[b]))
  with pytest.raises(ValueError, match="outside"):
    vit.apply(params, x, ids, return_blocks=(3,), stop_after=2)


def test_dmae_loss_zero_for_identical_features_through_identity_head():
  feats = jax.random.normal(jax.random.key(0), (2, 5, 16))
  head = ProjectionHead(16)
  hp = {"params": {"proj": {"kernel": jnp.eye(16), "bias": jnp.zeros(16)}}}
  for dist in losses.DISTANCES:
    assert float(losses.dmae_feature_loss(head.apply(hp, feats), feats, dist)) == pytest.approx(0, abs=1e-6)
  # Independent value for a non-trivial pair: mean |a/|a| - b/|b||.
  other = feats + 1.0
  a = np.asarray(feats) / np.linalg.norm(np.asarray(feats), axis=-1, keepdims=True)
  b = np.asarray(other) / np.linalg.norm(np.asarray(other), axis=-1, keepdims=True)
  np.testing.assert_allclose(float(losses.dmae_feature_loss(feats, other)), np.abs(a - b).mean(), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown distance"):
    losses.feature_distance(feats, feats, "huber")


def _dmae_setup():
  student = DMAEStudent(MAE(**TINY), teacher_width=96, pairs=((1, 3),))
  teacher = MAE(**{**TINY, "width": 96, "depth": 6, "num_heads": 3})
  x = images()
  sp = init(student, x)["params"]
  tp = init(teacher, x)["params"]
  return student, teacher, sp, tp, x


def test_dmae_truncated_teacher_equals_full_teacher_and_gradients():
  student, teacher, sp, tp, x = _dmae_setup()
  rngs = {"masking": jax.random.key(4)}
  out, _ = student.apply({"params": sp}, x, rngs=rngs)
  tr = teacher_features(teacher, tp, x, out.ids_keep, out.mask, out.ids_restore, [3], "truncated")
  fu = teacher_features(teacher, tp, x, out.ids_keep, out.mask, out.ids_restore, [3], "full")
  np.testing.assert_allclose(np.asarray(tr.features[0]), np.asarray(fu.features[0]), atol=1e-6)
  # Teacher features on the student's visible tokens equal the teacher run on those tokens directly.
  direct = teacher.apply({"params": tp}, x, out.ids_keep, return_blocks=(3,),
                         method=lambda m, *a, **k: m.encoder(*a, **k))
  np.testing.assert_allclose(np.asarray(tr.features[0]), np.asarray(direct.blocks[3]), atol=1e-6)

  for mode in ("truncated", "full"):
    loss_fn = lambda s, t, mode=mode: dmae_loss(student, s, teacher, t, x, rngs, teacher_mode=mode)[0]
    gs, gt = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(sp, tp)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree_util.tree_leaves(gt))
    head_g = gs["head_1_3"]["proj"]["kernel"]
    block_g = gs["student"]["encoder"]["blocks_0"]["attn"]["query"]["kernel"]
    assert float(jnp.abs(head_g).max()) > 0 and float(jnp.abs(block_g).max()) > 0
  total, aux = dmae_loss(student, sp, teacher, tp, x, rngs)
  np.testing.assert_allclose(float(total), float(aux["pixel_loss"] + aux["distill_loss"]), rtol=1e-6)


def reference_attention(q, k, v):
  """softmax(q·kᵀ / sqrt(Dh)) v in float64 NumPy, ``(B, T, H, Dh)`` inputs."""
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(qn.shape[-1])
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, vn)


# cuDNN's kernel needs a GPU; on CPU "cudnn" runs float32 inputs through XLA, which is checked here too.
@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("t", [7, 50])
def test_attention_implementations_match_float64_reference(implementation, t):
  q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 3, 16)) for i in range(3))
  out = jax.jit(attention, static_argnums=3)(q, k, v, implementation)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v), rtol=0, atol=2e-6)


def _attention_before_the_field(q, k, v):
  """What ``vit.attention`` computed on XLA:CPU before the implementation became a module field (copied)."""
  from maejax.models.vit import softmax
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  weights = softmax(logits.astype(jnp.float32)).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_default_attention_is_the_cpu_path_bit_for_bit(dtype):
  """The default of every module (``"einsum"``) computes exactly what ran on CPU before, values and gradients."""
  assert ViT.attention == MAE.attention == MAEConfig.attention == "einsum"
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 17, 4, 16)).astype(dtype) for i in range(3))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32))), (0, 1, 2)))
  new, old = loss(attention)(q, k, v), loss(_attention_before_the_field)(q, k, v)
  for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(old), strict=True):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_attention_field_reaches_every_block():
  """MAE(attention="xla") runs XLA's attention in encoder and decoder: same loss as "einsum" up to rounding, and
  an unknown name is an error naming the choices (from the module and from the config)."""
  x = images()
  noise = jax.random.uniform(jax.random.key(7), (2, 16))
  params = init(MAE(**TINY), x)
  losses_ = {a: float(MAE(**TINY, attention=a).apply(params, x, noise).loss) for a in ("einsum", "xla")}
  np.testing.assert_allclose(losses_["xla"], losses_["einsum"], rtol=1e-5)
  with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'; expected one of \('einsum'"):
    MAE(**TINY, attention="flash").apply(params, x, noise)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    MAEConfig(attention="flash")


# ------------------------------------------------------------------------------------------- MAEConfig


def test_mae_config_fields_are_the_mae_fields():
  mae_fields = {f.name for f in dataclasses.fields(MAE)} - {"parent", "name"}
  assert set(MAEConfig.fields()) == mae_fields
  defaults = MAEConfig().build()
  for f in MAEConfig.fields():
    want = getattr(MAE, f)
    got = getattr(defaults, f)
    assert (jnp.dtype(got) == jnp.dtype(want)) if f == "dtype" else got == want, f


def test_mae_config_json_round_trip_and_build():
  cfg = MAEConfig(**TINY, dtype=jnp.bfloat16, mask_ratio=0.9, remat=True, attention="xla")
  saved = json.loads(json.dumps(cfg.to_json()))
  assert saved["dtype"] == "bfloat16" and set(saved) == set(MAEConfig.fields())
  assert MAEConfig.from_json(saved) == cfg
  model = cfg.build(mask_ratio=0.5)
  assert isinstance(model, MAE) and model.dtype == jnp.bfloat16 and model.mask_ratio == 0.5
  assert model.attention == "xla" and model.remat and model.width == 64
  with pytest.raises(ValueError, match=r"unknown MAE model config keys \['heads'\]"):
    cfg.build(heads=3)


def test_mae_config_from_json_is_strict():
  with pytest.raises(ValueError) as e:
    MAEConfig.from_json({"width": 64, "widht": 64, "decoder_layers": 2})
  msg = str(e.value)
  assert "unknown MAE model config keys ['decoder_layers', 'widht']" in msg
  for name in MAEConfig.fields():
    assert repr(name) in msg


def test_mae_config_reads_older_checkpoint_configs():
  """The configs that existing checkpoints hold: a training workdir's (the 12 keys saved before MAEConfig) and
  a converted one's (``maejax.convert``: in_chans, None for an absent decoder and unknown loss settings)."""
  workdir = {"img_size": 32, "patch_size": 8, "width": 64, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0,
             "decoder_width": 32, "decoder_depth": 2, "decoder_heads": 2, "norm_pix_loss": False,
             "mask_ratio": 0.6, "drop_path": 0.1}
  cfg = MAEConfig.from_json(workdir)
  assert {k: getattr(cfg, k) for k in workdir} == workdir
  assert (cfg.dtype, cfg.attention, cfg.in_chans, cfg.remat) == ("float32", "einsum", 3, False)
  converted = {"img_size": 224, "patch_size": 16, "in_chans": 3, "width": 768, "depth": 12, "num_heads": 12,
               "mlp_ratio": 4.0, "decoder_width": None, "decoder_depth": None, "decoder_heads": None,
               "norm_pix_loss": None, "mask_ratio": None}
  cfg = MAEConfig.from_json(converted)
  assert (cfg.decoder_width, cfg.decoder_depth, cfg.decoder_heads) == (512, 8, 16)  # the official decoder
  assert cfg.norm_pix_loss is True and cfg.mask_ratio == 0.75


def test_mae_config_from_config_size_fill():
  import ml_collections
  m = ml_collections.ConfigDict({"size": "L", "img_size": 224, "patch_size": 16, "width": None, "depth": None,
                                 "num_heads": None, "dtype": "bfloat16", "attention": "einsum"})
  cfg = MAEConfig.from_config(m)
  assert (cfg.width, cfg.depth, cfg.num_heads) == (1024, 24, 16) and cfg.dtype == "bfloat16"
  # An explicit value wins over the size; no size at all keeps the given fields.
  assert MAEConfig.from_config({"size": "B", "depth": 6}).depth == 6
  assert MAEConfig.from_config({"size": "", "width": 64, "num_heads": 2}).width == 64
  with pytest.raises(ValueError, match=r"unknown config.model keys \['heads'\]"):
    MAEConfig.from_config({"size": "B", "heads": 3})


@pytest.mark.parametrize("t", [7, 197])
def test_padded_attention_matches_unpadded_forward_and_gradients(t):
  """The cuDNN-oriented padding (zero rows + key lengths, padded queries sliced off) changes neither the output
  nor any gradient: checked through the XLA implementation against a float64 numpy softmax and its autodiff."""
  from maejax.models.vit import padded_attention
  q, k, v = (jax.random.normal(jax.random.key(i), (2, t, 3, 8)) for i in range(3))
  qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", qn, kn) / np.sqrt(8)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = padded_attention(q, k, v, multiple=8, implementation="xla")
  assert out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", w, vn), atol=1e-5)
  loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
  g_pad = jax.grad(loss(lambda *a: padded_attention(*a, multiple=8, implementation="xla")), (0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(attention), (0, 1, 2))(q, k, v)
  for a, b in zip(g_pad, g_ref, strict=True):
    assert bool(jnp.isfinite(a).all())
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_softmax_value_and_hand_written_gradient():
  """``vit.softmax`` (the CPU attention's, with its VJP written out) against the float64 formula (with ±80
  offsets: large logits must not overflow), its VJP against finite differences (``check_grads``, reverse mode)
  and against the gradient of ``jax.nn.softmax``."""
  from jax.test_util import check_grads

  from maejax.models.vit import softmax
  x = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 4 + jnp.array([0.0, 80.0, -80.0])[:, None, None]
  xn = np.asarray(x, np.float64)
  ref = np.exp(xn - xn.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(softmax(x)), ref, rtol=1e-5, atol=1e-7)
  check_grads(softmax, (x[0] / 4,), order=1, modes=["rev"], eps=1e-2, atol=1e-3, rtol=1e-3)
  g = jax.random.normal(jax.random.key(1), x.shape)
  ours = jax.grad(lambda a: jnp.sum(softmax(a) * g))(x)
  theirs = jax.grad(lambda a: jnp.sum(jax.nn.softmax(a) * g))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-6)


def test_gelu_is_torch_exact_gelu():
  """``vit.gelu`` = torch.nn.functional.gelu (exact erf form), value and derivative Φ(x) + x·φ(x)."""
  torch = pytest.importorskip("torch")
  from maejax.models.vit import gelu
  x = np.linspace(-12, 12, 2001, dtype=np.float32)
  ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), ref, atol=1e-6)
  xd = x.astype(np.float64)
  phi = np.exp(-xd**2 / 2) / np.sqrt(2 * np.pi)
  cdf = 0.5 * (1 + np.vectorize(math.erf)(xd / np.sqrt(2)))
  np.testing.assert_allclose(np.asarray(jax.vmap(jax.grad(gelu))(jnp.asarray(x))), cdf + xd * phi, atol=1e-6)


@pytest.mark.parametrize("in_axes, in_shape, features", [(1, (6,), (2, 3)), (2, (2, 3), (6,))])
def test_projection_equals_dense_general(in_axes, in_shape, features):
  """``vit.Projection`` (one 2-D matmul) computes what ``nn.DenseGeneral`` computes with the same parameters,
  values and gradients."""
  from maejax.models.vit import Projection
  x = jax.random.normal(jax.random.key(0), (4, 5) + in_shape)
  ours = Projection(features, in_axes=in_axes)
  ref = nn.DenseGeneral(features, axis=tuple(range(-in_axes, 0)))
  params = init(ours, x)
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(jnp.shape, init(ref, x))
  params = jax.tree_util.tree_map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(ref.apply(params, x)), atol=1e-5)
  grad = lambda m: jax.grad(lambda p, a: jnp.sum(jnp.sin(m.apply(p, a))), (0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(grad(ours)), jax.tree_util.tree_leaves(grad(ref)), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
