"""maejax.convert: Orbax round trip, the CLI, and the errors for bad checkpoints (nothing written then).

The numerical parity of converted weights is in ``test_parity_hf.py``; the tiny HF model and the
official-layout builder are shared from there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_parity_hf import (  # noqa: E402
  DEC_HEADS,
  DEC_WIDTH,
  DEPTH,
  GRID,
  HEADS,
  WIDTH,
  hf_model,
  inputs,
  sincos_table,
  to_official,
  v5_state_dict,
)

from maejax import checkpoints, convert  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sd():
  """Tiny transformers-5 ViTMAEForPreTraining state dict (torch tensors) with sin-cos position tables."""
  return v5_state_dict(hf_model(True))


def _leaves(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_round_trip_orbax(sd, tmp_path):
  params, config, _ = convert.convert_state_dict(sd, num_heads=HEADS, decoder_heads=DEC_HEADS)
  dst = tmp_path / "ckpt"
  convert.save_converted(dst, params, config)
  loaded, loaded_config = checkpoints.load_converted(dst)
  assert loaded_config == config
  a, b = _leaves(params), _leaves(loaded)
  assert a.keys() == b.keys()
  for k in a:
    assert a[k].dtype == b[k].dtype == np.float32, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The restored checkpoint builds and runs the matching model, with the same outputs.
  _, _, x, noise = inputs()
  model = convert.build_model(loaded_config)
  out1 = model.apply({"params": params}, x, noise)
  out2 = model.apply({"params": loaded}, x, noise)
  np.testing.assert_array_equal(np.asarray(out1.pred), np.asarray(out2.pred))
  with pytest.raises(FileExistsError, match="already exists"):
    convert.save_converted(dst, params, config)
  # With an abstract target (what a trainer passes) the params come back as jax arrays with its sharding.
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)
  sharded, _ = checkpoints.load_converted(dst, target)
  for k, v in _leaves(sharded).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(sharded))


def test_encoder_only_round_trip_and_safetensors(sd, tmp_path):
  from safetensors.torch import save_file

  src = tmp_path / "enc.safetensors"
  save_file({k: v.contiguous() for k, v in sd.items() if k.startswith("vit.")}, str(src))
  params, config, info = convert.convert(src, tmp_path / "ckpt", num_heads=HEADS)
  assert set(params) == {"encoder"} and config["decoder_width"] is None
  loaded, loaded_config = checkpoints.load_converted(tmp_path / "ckpt")
  assert loaded_config == config
  for k, v in _leaves(params).items():
    np.testing.assert_array_equal(v, _leaves(loaded)[k], err_msg=k)
  # Encoder-only configs build an MAE with the default (official 512-d) decoder, to be trained from scratch.
  assert convert.build_model(loaded_config).decoder_width == 512


def test_cli_official_pth(sd, tmp_path):
  src, dst = tmp_path / "mae_visualize_vit_tiny.pth", tmp_path / "out"
  ckpt = to_official(sd, full=True)
  torch.save(ckpt, src)
  proc = subprocess.run(
      [sys.executable, "-m", "maejax.convert", f"--src={src}", f"--dst={dst}", f"--num_heads={HEADS}",
       f"--decoder_heads={DEC_HEADS}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "official" in proc.stdout and "encoder + decoder" in proc.stdout, proc.stdout
  assert "heads 4 (argument)" in proc.stdout, proc.stdout
  loaded, config = checkpoints.load_converted(dst)
  params, expected_config, _ = convert.convert_state_dict(ckpt, num_heads=HEADS, decoder_heads=DEC_HEADS)
  assert config == expected_config
  for k, v in _leaves(params).items():
    np.testing.assert_array_equal(v, _leaves(loaded)[k], err_msg=k)


def test_bad_keys_are_all_listed_and_nothing_written(sd, tmp_path):
  bad = dict(sd)
  del bad["vit.layers.1.attention.k_proj.bias"]
  bad["vit.layers.0.attention.extra.weight"] = torch.zeros(3)
  bad["decoder.decoder_pred.weight"] = torch.zeros(10, DEC_WIDTH)
  dst = tmp_path / "never"
  with pytest.raises(ValueError) as e:
    convert.convert(bad, dst, num_heads=HEADS, decoder_heads=DEC_HEADS)
  msg = str(e.value)
  assert "3 problem(s)" in msg
  assert "missing key 'vit.layers.1.attention.k_proj.bias' (expected shape (64,))" in msg
  assert "unexpected key 'vit.layers.0.attention.extra.weight' (shape (3,))" in msg
  assert "mis-shaped key 'decoder.decoder_pred.weight': expected shape (192, 32), got (10, 32)" in msg
  assert not dst.exists()


def test_missing_block_official(sd):
  ckpt = to_official(sd, full=False)
  for k in [k for k in ckpt["model"] if k.startswith("blocks.1.")]:
    del ckpt["model"][k]
  with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.attn\.qkv\.weight' \(expected shape "
                                       r"\(192, 64\)\)"):
    convert.convert_state_dict(ckpt, num_heads=HEADS)


def test_wrong_pos_embed(sd, tmp_path):
  bad = dict(sd)
  # A table with h and w swapped (the canonical layout before HF's rotation) is not the MAE table.
  table = sincos_table(WIDTH, GRID)
  bad["vit.embeddings.position_embeddings"] = torch.from_numpy(
      np.concatenate([table[:, WIDTH // 2:], table[:, :WIDTH // 2]], axis=1)[None]).float()
  dst = tmp_path / "never"
  with pytest.raises(ValueError, match="vit.embeddings.position_embeddings.*sin-cos") as e:
    convert.convert(bad, dst, num_heads=HEADS, decoder_heads=DEC_HEADS)
  assert "decoder.decoder_pos_embed" not in str(e.value)
  assert not dst.exists()
  # The documented escape hatch converts anyway (and reports the difference).
  _, _, info = convert.convert_state_dict(bad, num_heads=HEADS, decoder_heads=DEC_HEADS,
                                          allow_pos_embed_mismatch=True)
  assert info["pos_embed_max_abs_diff"]["vit.embeddings.position_embeddings"] > 0.5


def test_heads_must_be_known(sd):
  # 32-d decoder is no standard size: its head count cannot be guessed.
  with pytest.raises(ValueError, match="decoder heads for width 32"):
    convert.convert_state_dict(sd, num_heads=HEADS)
  with pytest.raises(ValueError, match="not divisible by 5 heads"):
    convert.convert_state_dict(sd, num_heads=5, decoder_heads=DEC_HEADS)


def test_user_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    convert.convert(tmp_path / "nope.pth")
  with pytest.raises(ValueError, match="cannot detect the checkpoint format"):
    convert.convert_state_dict({"foo.weight": np.zeros(3, np.float32)})
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    convert.convert(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a converted maejax checkpoint"):
    checkpoints.load_converted(tmp_path)


def test_standard_sizes_infer_heads():
  """ViT-B/16 shapes (no weights needed beyond shapes): 12 heads; the 512-d official decoder: 16 heads."""
  shapes = {"patch_embed.proj.weight": (768, 3, 16, 16), "pos_embed": (1, 197, 768),
            "blocks.11.norm1.weight": (768,), "blocks.0.mlp.fc1.weight": (3072, 768),
            "decoder_embed.weight": (512, 768), "decoder_blocks.7.norm1.weight": (512,)}
  config = convert.infer_config({k: np.empty(s, np.float32) for k, s in shapes.items()}, "official")
  got = tuple(config[k] for k in ("img_size", "patch_size", "width", "depth", "num_heads"))
  assert got == (224, 16, 768, 12, 12)
  assert (config["decoder_width"], config["decoder_depth"], config["decoder_heads"]) == (512, 8, 16)
  assert DEPTH == 3  # the tiny config used above is not a standard size


def test_bf16_distill_config_builds_a_bf16_teacher(sd, tmp_path):
  """The teacher computes in the distill config's model dtype and attention (a converted checkpoint records
  neither; a float32 teacher under a bf16 student would double the teacher's cost)."""
  import jax.numpy as jnp

  from maejax.config_utils import load_config
  from maejax.models.dmae import teacher_features
  from maejax.models.mae import MAEConfig
  from maejax.trainers import distill

  params, config, _ = convert.convert_state_dict(sd, num_heads=HEADS, decoder_heads=DEC_HEADS)
  convert.save_converted(tmp_path / "teacher", params, config)
  cfg = load_config(os.path.join(REPO, "configs", "distill.py:smoke"))
  cfg.model.dtype = "bfloat16"
  cfg.model.attention = "xla"
  teacher, teacher_params, saved = distill.load_teacher(str(tmp_path / "teacher"), MAEConfig.from_config(cfg.model))
  assert teacher.dtype == jnp.bfloat16 and teacher.attention == "xla"
  assert saved.dtype == "float32" and teacher.width == WIDTH and teacher.depth == DEPTH
  _, _, imgs, noise = inputs()
  mask_out = teacher.apply({"params": teacher_params}, imgs, noise)
  feats = teacher_features(teacher, teacher_params, imgs, mask_out.ids_keep, mask_out.mask, mask_out.ids_restore,
                           [DEPTH - 1])
  assert feats.features[0].dtype == jnp.bfloat16
