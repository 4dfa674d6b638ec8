"""The reconstruction figures of the pixel-decoder objectives (BootMAE, SD-MAE, MCM), read back from the PNG and
checked against NumPy references written from the equations: the visible patches are the input's, the masked
patches the decoder's prediction de-normalised with the input patch's own statistics."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maejax import config_utils
from maejax.models import bootmae, mcm, sdmae
from maejax.models.mae import MAEConfig
from maejax.trainers import objectives

ROOT = pathlib.Path(__file__).resolve().parent.parent
MC = MAEConfig(img_size=32, patch_size=8, width=32, depth=2, num_heads=4, decoder_width=32, decoder_depth=1,
               decoder_heads=4)
P, S, L = 8, 32, 16  # patch, image side, patches
SEED = 3
PAD, SCALE = 2, 2  # viz.mae_reconstruction_grid's layout
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def smoke_config(objective="mcm"):
  return config_utils.load_config(f"{ROOT / 'configs' / 'mae_pretrain.py'}:{objective}_smoke")


@pytest.fixture(scope="module")
def inputs():
  """Two held-out synthetic faces ``(2, 32, 32, 4)`` uint8: RGB, then depth."""
  return objectives.figure_images(smoke_config(), S, depth=True)


def init(model, *args):
  r = jax.random.PRNGKey(0)
  return nn.meta.unbox(model.init({"params": r, "masking": r}, *args))


def patchify(x):
  """``(n, S, S, c)`` → ``(n, L, p·p·c)`` in (h, w, p, q, c) order."""
  n, g, c = x.shape[0], S // P, x.shape[-1]
  return x.reshape(n, g, P, g, P, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, P * P * c)


def unpatchify(x, c):
  n, g = x.shape[0], S // P
  return x.reshape(n, g, g, P, P, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, S, S, c)


def visible(seed, n):
  """``(n, L)`` bool, True = kept: the ``int(L/4)`` smallest of the figure's noise ``U(0, 1)`` from ``seed``."""
  noise = np.asarray(jax.random.uniform(jax.random.PRNGKey(seed), (n, L)))
  keep = np.zeros((n, L), bool)
  np.put_along_axis(keep, np.argsort(noise, axis=1)[:, :L // 4], True, axis=1)
  return keep, jnp.asarray(noise)


def pixel_mask(keep):
  return np.kron(keep.reshape(-1, S // P, S // P), np.ones((P, P), bool))


def read_panels(path, rows):
  """The PNG's ``(rows, 3, S, S, 3)`` panels (original, masked, reconstruction), after checking its size."""
  im = Image.open(path)
  assert im.size == ((3 * (S + PAD) + PAD) * SCALE, (rows * (S + PAD) + PAD) * SCALE)
  a = np.asarray(im.convert("RGB"))[::SCALE, ::SCALE]
  return np.stack([np.stack([a[PAD + i * (S + PAD):][:S, PAD + j * (S + PAD):][:, :S] for j in range(3)])
                   for i in range(rows)])


def to_uint8(x):
  return np.clip(np.round(x * 255), 0, 255).astype(np.int64)


def rgb_norm(u8):
  return (u8 / 255.0 - MEAN) / STD


def check_rows(panels, original_u8, recon_u8, keep):
  """Original = input; masked panel and reconstruction = input at the visible patches; reconstruction =
  ``recon_u8`` at the masked ones (±1 for rounding); masked patches of the masked panel are one fill value."""
  vis = pixel_mask(keep)
  orig = np.broadcast_to(original_u8, original_u8.shape[:-1] + (3,)).astype(np.int64)
  recon = np.broadcast_to(recon_u8, recon_u8.shape[:-1] + (3,))
  np.testing.assert_array_equal(panels[:, 0], orig)
  np.testing.assert_array_equal(panels[:, 1][vis], orig[vis])
  np.testing.assert_array_equal(panels[:, 2][vis], orig[vis])
  assert np.abs(panels[:, 2][~vis].astype(np.int64) - recon[~vis]).max() <= 1
  assert len(np.unique(panels[:, 1][~vis], axis=0)) == 1
  assert not (keep.all(1) | (~keep).all(1)).any()  # both kinds of patch present in every image


@pytest.mark.parametrize("pixel_norm", ["bootmae", "mae"])
def test_bootmae_figure_pastes_the_input_and_denormalises_with_the_patch_stats(inputs, tmp_path, pixel_norm):
  model = bootmae.BootMAE(MC, bootmae.BootMAEConfig(pixel_norm=pixel_norm))
  rgb = inputs[..., :3]
  v = init(model, jnp.zeros((1, S, S, 3)))["params"]
  path = objectives.bootmae_figure(model, v, rgb, str(tmp_path / "f.png"), SEED)
  keep, noise = visible(SEED, 2)
  out = model.apply({"params": v}, jnp.asarray(rgb_norm(rgb), jnp.float32), noise)
  np.testing.assert_array_equal(np.asarray(out.mask) == 0, keep)
  pred, x = np.asarray(out.pixels, np.float64), patchify(rgb_norm(rgb))
  if pixel_norm == "bootmae":  # per patch and channel, biased variance, eps 1e-5
    xc, pc = x.reshape(2, L, -1, 3), pred.reshape(2, L, -1, 3)
    rec = (pc * np.sqrt(xc.var(2, keepdims=True) + 1e-5) + xc.mean(2, keepdims=True)).reshape(pred.shape)
  else:  # norm-pix: per patch, unbiased variance, eps 1e-6
    rec = pred * np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6) + x.mean(-1, keepdims=True)
  check_rows(read_panels(path, 2), rgb, to_uint8(unpatchify(rec, 3) * STD + MEAN), keep)


@pytest.mark.parametrize("pixel_norm", ["sdmae", "mae"])
def test_sdmae_figure_pastes_the_input_and_denormalises_with_the_patch_stats(inputs, tmp_path, pixel_norm):
  model = sdmae.SDMAE(MC, sdmae.SDMAEConfig(out_dim=16, hidden=16, bottleneck=8, pixel_norm=pixel_norm))
  rgb = inputs[..., :3]
  v = init(model, jnp.zeros((1, S, S, 3)))
  path = objectives.sdmae_figure(model, v["params"], rgb, str(tmp_path / "f.png"), SEED)
  keep, noise = visible(SEED, 2)
  pixels, mask, _, _ = model.apply(v, jnp.asarray(rgb_norm(rgb), jnp.float32), noise)
  np.testing.assert_array_equal(np.asarray(mask) == 0, keep)
  pred, x = np.asarray(pixels, np.float64), patchify(rgb_norm(rgb))
  if pixel_norm == "sdmae":  # per patch and channel, (x − μ) / (σ_unbiased + 1e-6)
    xc, pc = x.reshape(2, L, -1, 3), pred.reshape(2, L, -1, 3)
    rec = (pc * (xc.std(2, ddof=1, keepdims=True) + 1e-6) + xc.mean(2, keepdims=True)).reshape(pred.shape)
  else:
    rec = pred * np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6) + x.mean(-1, keepdims=True)
  check_rows(read_panels(path, 2), rgb, to_uint8(unpatchify(rec, 3) * STD + MEAN), keep)


def test_mcm_figure_has_an_rgb_and_a_depth_row_per_image_with_every_channel_kept(inputs, tmp_path):
  assert inputs[..., 3].max() > 100 and (inputs[..., 3] == 0).any()  # a face's depth in front of the background
  model = mcm.MCM(MC)
  v = init(model, jnp.zeros((1, S, S, 4)), jnp.ones((1, 4)))["params"]
  path = objectives.mcm_figure(model, v, inputs, str(tmp_path / "f.png"), SEED)
  keep, noise = visible(SEED, 2)
  x = np.concatenate([rgb_norm(inputs[..., :3]), (inputs[..., 3:] / 255.0 - 0.5) / 0.5], -1)
  preds, mask = model.apply({"params": v}, jnp.asarray(x, jnp.float32), jnp.ones((2, 4)), noise)
  np.testing.assert_array_equal(np.asarray(mask) == 0, keep)
  panels = read_panels(path, 4)  # image 0 RGB, image 0 depth, image 1 RGB, image 1 depth

  def norm_pix_inverse(pred, patches):
    return pred * np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6) + patches.mean(-1, keepdims=True)

  rgb = norm_pix_inverse(np.asarray(preds["image"], np.float64), patchify(x[..., :3]))
  depth = norm_pix_inverse(np.asarray(preds["depth"], np.float64), patchify(x[..., 3:]))
  check_rows(panels[0::2], inputs[..., :3], to_uint8(unpatchify(rgb, 3) * STD + MEAN), keep)
  check_rows(panels[1::2], inputs[..., 3:], to_uint8(unpatchify(depth, 1) * 0.5 + 0.5), keep)
  assert (panels[1::2] == panels[1::2, ..., :1]).all()  # depth rows are gray
  # No channel dropping: the figure's prediction is the all-channels one, not one with depth zeroed.
  dropped, _ = model.apply({"params": v}, jnp.asarray(x, jnp.float32), jnp.asarray([[1, 1, 1, 0]] * 2), noise)
  assert np.abs(np.asarray(dropped["image"]) - np.asarray(preds["image"])).max() > 1e-3


def test_every_pixel_decoder_objective_has_a_figure_and_sdae_none():
  for name in ("bootmae", "sdmae", "mcm", "sdae"):
    figure = objectives.build(smoke_config(name), with_data=False).figure
    assert (figure is None) == (name == "sdae"), name


@pytest.mark.slow  # 35–55 s on 2 busy cores: compiling the sharded step dominates
def test_objectives_train_writes_the_reconstruction_png(tmp_path):
  cfg = smoke_config("mcm")
  cfg.total_steps, cfg.eval_every, cfg.checkpoint_every, cfg.log_every, cfg.batch_size = 2, 2, 2, 1, 8
  objectives.train(cfg, str(tmp_path))
  path = tmp_path / "reconstruction_000002.png"
  assert path.exists() and not (tmp_path / "reconstruction_000001.png").exists()
  read_panels(path, 4)  # decodes, 2 images × (RGB, depth) rows at 32 px
