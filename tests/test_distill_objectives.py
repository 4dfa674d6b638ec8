"""DMAE distillation of objective students (``configs/distill.py:<objective>``): BootMAE, SdAE, SD-MAE and MCM
students trained with their own loss + α·the DMAE alignment to a frozen MAE teacher. The alignment is checked
against a NumPy float64 evaluation of the DMAE formula on the same features, the plain (MAE) student against the
DMAE loss as it was written before the objective students existed."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maejax import checkpoints, config_utils, losses, sharding
from maejax.data import pipeline
from maejax.models.dmae import teacher_features
from maejax.models.mae import MAEConfig
from maejax.trainers import au, common, distill, objectives

ROOT = pathlib.Path(__file__).resolve().parent.parent
OBJECTIVES = ("bootmae", "sdae", "sdmae", "mcm")
# Wider than the smoke student (32), so the heads really project; 2 blocks as the smoke pairs need.
TEACHER = MAEConfig(img_size=32, patch_size=8, width=48, depth=2, num_heads=4, decoder_width=32, decoder_depth=1,
                    decoder_heads=4)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  """A random MAE teacher (LayerNorms at identity, other weights N(0, 0.05²)) written as a converted checkpoint,
  what ``maejax.convert`` writes. Only its shapes are traced: compiling an init would cost more than the tests."""
  model = TEACHER.build()
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(model.init({"params": r, "masking": r}, jnp.zeros((1, 32, 32, 3)))),
                          jax.random.PRNGKey(0))["params"]
  rng = np.random.default_rng(7)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, np.float32)
    return (rng.normal(size=leaf.shape) * 0.05).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return checkpoints.save_converted(tmp_path_factory.mktemp("teacher") / "mae", params, TEACHER.to_json())


def load(variant, teacher):
  cfg = config_utils.load_config(f"{ROOT / 'configs' / 'distill.py'}:{variant}")
  config_utils.validate(cfg)
  cfg.distill.teacher = str(teacher)
  cfg.batch_size = 8
  return cfg


def device_batch(student):
  return {k: jnp.asarray(v) for k, v in next(student.data).items()}


def init_state(student):
  """``(params, extra)`` as the shared trainer starts them (EMA copy included)."""
  variables = nn.meta.unbox(student.init_fn(jax.random.PRNGKey(0)))
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  if student.ema is not None:
    extra["ema"] = student.ema.init(params)
  return params, extra


def f64(x):
  return np.asarray(x, np.float64)


def numpy_alignment(head_params, student_blocks, teacher_blocks, pairs):
  """DMAE in float64: mean over pairs of mean |ŝ/‖ŝ‖ − t/‖t‖|, ``ŝ = s·W + b`` (the linear head)."""
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  terms = []
  for s, t in pairs:
    proj = head_params[f"head_{s}_{t}"]["proj"]
    projected = f64(student_blocks[s]) @ f64(proj["kernel"]) + f64(proj["bias"])
    terms.append(np.abs(unit(projected) - unit(f64(teacher_blocks[t]))).mean())
  return float(np.mean(terms))


def direct_teacher_blocks(teacher_params, images, ids_keep, blocks):
  """The teacher encoder run straight on the visible tokens (no truncation, no DMAE code)."""
  enc = TEACHER.build_encoder().apply({"params": teacher_params["encoder"]}, images, ids_keep,
                                      return_blocks=tuple(blocks))
  return enc.blocks


# ------------------------------------------------------------------------------------------------- config


def test_distill_config_has_every_objective_and_rejects_unknown_names():
  mod = config_utils.load_sibling(str(ROOT / "configs" / "distill.py"), "distill")
  mae_pretrain = config_utils.load_sibling(str(ROOT / "configs" / "mae_pretrain.py"), "mae_pretrain")
  for o in mae_pretrain.OBJECTIVES:
    assert o in mod.VARIANTS and f"{o}_smoke" in mod.VARIANTS
  smoke, sdae = mod.get_config("smoke"), mod.get_config("sdae_smoke,steps=5")
  assert sdae.stage == "distill" and sdae.model.objective == "sdae" and "sdae" in sdae and "ema" in sdae
  assert sdae.total_steps == 5 and sdae.model.width == smoke.model.width
  assert sdae.distill.to_dict() == smoke.distill.to_dict()
  assert mod.get_config("bootmae").model.width == mod.get_config("tiny").model.width
  with pytest.raises(ValueError, match=r"unknown variant 'sdae_smok'; did you mean 'sdae_smoke'"):
    mod.get_config("sdae_smok")
  with pytest.raises(ValueError, match=r"unknown config argument 'stepz'.*did you mean 'steps'"):
    mod.get_config("sdae_smoke,stepz=3")


# --------------------------------------------------------------------------------------------- alignment


# MCM (the RGB teacher of a fused input) and SdAE run by default; BootMAE and SD-MAE are the heavier eager passes.
@pytest.mark.parametrize("objective", ["mcm", "sdae", *(pytest.param(o, marks=pytest.mark.slow)
                                                          for o in ("bootmae", "sdmae"))])
def test_alignment_term_is_dmae_on_the_students_visible_tokens(objective, teacher_dir):
  """total = the objective's own loss (the same value as without distillation) + α · the DMAE alignment, which
  equals a float64 evaluation on the student's exposed blocks and the teacher run directly on the same visible
  tokens of the RGB image (MCM's teacher too)."""
  cfg = load(f"{objective}_smoke", teacher_dir)
  cfg.distill.alpha = 0.7
  pairs = ((0, 1), (1, 1))
  teacher, teacher_params, _ = distill.load_teacher(str(teacher_dir), MAEConfig.from_config(cfg.model))
  student = distill.objective_student(cfg, teacher, pairs)
  params, extra = init_state(student)
  assert "blocks_0" in params["encoder"] and set(params[distill.HEADS]) == {"head_0_1", "head_1_1"}
  batch, rng = device_batch(student), jax.random.PRNGKey(3)
  total, (metrics, _) = student.loss_fn(params, extra, batch, rng, teacher_params)

  objective_alone = objectives.build(cfg, with_data=False)
  own = {k: v for k, v in params.items() if k != distill.HEADS}
  plain_loss, _ = objective_alone.loss_fn(own, extra, batch, rng)
  loss, _, visible = objective_alone.loss_fn(own, extra, batch, rng, (0, 1))
  np.testing.assert_allclose(float(metrics["objective_loss"]), float(plain_loss), rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)

  b, l = visible.mask.shape
  k = visible.ids_keep.shape[1]
  assert visible.blocks[0].shape == (b, 1 + k, cfg.model.width) and k == l // 4
  mask = np.asarray(visible.mask)
  assert (np.take_along_axis(mask, np.asarray(visible.ids_keep), 1) == 0).all() and (mask.sum(1) == l - k).all()
  images = pipeline.normalize(batch["image"])
  if objective != "mcm":  # MCM's encoder reads the fused, channel-dropped input: its blocks are its own
    direct = MAEConfig.from_config(cfg.model).build_encoder().apply(
        {"params": params["encoder"]}, images, visible.ids_keep, return_blocks=(0, 1)).blocks
    for s in (0, 1):
      np.testing.assert_allclose(np.asarray(visible.blocks[s]), np.asarray(direct[s]), atol=1e-5)

  t_blocks = direct_teacher_blocks(teacher_params, images, visible.ids_keep, (1,))
  ref = numpy_alignment(params[distill.HEADS], visible.blocks, t_blocks, pairs)
  np.testing.assert_allclose(float(metrics["distill_loss"]), ref, rtol=1e-5)
  np.testing.assert_allclose(float(total), float(plain_loss) + 0.7 * ref, rtol=1e-5)
  assert float(metrics["loss"]) == float(total)


# ----------------------------------------------------------------------------------------- plain DMAE


def test_plain_distill_is_the_dmae_loss_as_before(teacher_dir, tmp_path):
  """The MAE student keeps its params layout (``student``, ``head_{s}_{t}``) and its loss: bit for bit the DMAE
  loss as ``dmae_loss`` wrote it before ``distill_term`` existed (copied below), and pixel + α·the float64
  alignment."""
  cfg = load("smoke", teacher_dir)
  pairs = ((0, 1),)
  teacher, teacher_params, _ = distill.load_teacher(str(teacher_dir), MAEConfig.from_config(cfg.model))
  student = distill.mae_student(cfg, str(tmp_path), teacher, pairs)
  params, extra = init_state(student)
  assert set(params) == {"student", "head_0_1"} and student.ema is None
  batch, rng = device_batch(student), jax.random.PRNGKey(5)
  total, (metrics, _) = student.loss_fn(params, extra, batch, rng, teacher_params)

  model = distill.DMAEStudent(MAEConfig.from_config(cfg.model).build(), teacher.width, pairs)
  images = pipeline.normalize(batch["image"])
  rngs = {"masking": jax.random.fold_in(rng, 0), "dropout": jax.random.fold_in(rng, 1)}
  out, projected = model.apply({"params": params}, images, None, train=True, rngs=rngs)
  t = teacher_features(teacher, teacher_params, images, out.ids_keep, out.mask, out.ids_restore, [1], "truncated")
  feats = [losses.dmae_feature_loss(s, tf, "l1") for s, tf in zip(projected, t.features, strict=True)]
  before = losses.dmae_total_loss(out.loss, feats, 1.0)
  assert float(total) == float(before) and float(metrics["distill_loss"]) == float(sum(feats) / len(feats))
  assert float(metrics["pixel_loss"]) == float(out.loss)

  t_blocks = direct_teacher_blocks(teacher_params, images, out.ids_keep, (1,))
  ref = numpy_alignment(params, out.blocks, t_blocks, pairs)
  np.testing.assert_allclose(float(total), float(out.loss) + ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------ smoke runs


@pytest.mark.slow
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_student_trains_checkpoints_and_resumes(objective, teacher_dir, tmp_path):
  """A few steps of ``configs/distill.py:<objective>_smoke``, a checkpoint, a resumed step; the heads train (only
  the alignment reaches them); the checkpoint holds an MAE encoder the AU stages read and records the objective,
  the aligned pairs and the teacher."""
  cfg = load(f"{objective}_smoke", teacher_dir)
  cfg.total_steps, cfg.checkpoint_every, cfg.log_every = 3, 3, 1
  wd = str(tmp_path)
  trainer, student, saved = distill.build(cfg, wd, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
  heads_at_init = jax.device_get(trainer.state.params[distill.HEADS])
  first = common.train_loop(trainer, student.data, 3, wd, cfg, saved, eval_fn=student.eval_fn, name="distill")
  assert [s for s, _ in first.losses] == [1, 2, 3] and np.isfinite([v for _, v in first.losses]).all()
  assert checkpoints.latest_step(wd) == 3
  again = common.train_loop(trainer, student.data, 4, wd, cfg, saved, eval_fn=student.eval_fn, name="distill")
  assert [s for s, _ in again.losses] == [4] and np.isfinite(again.losses[0][1])

  params, config = checkpoints.load_params(wd)
  assert config["objective"] == objective and config["distill_pairs"] == [[0, 1]]
  assert config["teacher"] == str(teacher_dir) and config["width"] == cfg.model.width
  assert set(params[distill.HEADS]) == {"head_0_1"}
  # Biases get no weight decay: only the alignment's gradient moves them (Adam: about lr = 4.7e-5 per step).
  bias = lambda heads: np.asarray(heads["head_0_1"]["proj"]["bias"])
  assert np.abs(bias(params[distill.HEADS]) - bias(heads_at_init)).min() > 1e-5
  encoder, _ = au.load_encoder(wd)
  assert "blocks_0" in encoder and set(encoder) == set(params["encoder"])
  if student.ema is not None:
    restored, _ = checkpoints.load_variables(wd, ("ema",))
    assert int(restored["ema"]["step"]) == 4
