"""Parity of converted weights against PyTorch references (fp32, tiny config).

References:
  * HF ``ViTMAEForPreTraining`` (transformers 5): loss, logits, mask, ids_restore, and the encoder's last
    hidden state, with the same ``noise``;
  * a functional transcription of the official ``models_mae.py`` forward (timm ``Block`` with the fused qkv
    Linear), run on the official-layout state dict, so that the official key layout built here is checked
    against the official computation and not only against our converter.

Sources converted: transformers 5 names, transformers 4 names (renamed from v5 with :data:`V5_TO_V4` and
checked by loading them with transformers 5's own v4→v5 conversion), official ``mae_pretrain`` (encoder only)
and ``mae_visualize`` (full) layouts.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from maejax import convert  # noqa: E402
from maejax.models.mae import MAE, MAEConfig  # noqa: E402

IMG, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 64, 3, 4
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 32, 2, 4
BATCH, MASK_RATIO = 2, 0.75
GRID = IMG // PATCH
LOSS_RTOL, PRED_ATOL, TOKENS_ATOL = 1e-5, 1e-4, 1e-4
GRAD_RTOL = 2e-5  # max-abs gradient difference relative to the tensor's largest gradient (float32)

# transformers 5 -> transformers 4 ViTMAEForPreTraining key names (the inverse of the "ViTModel" /
# "ViTMAEForPreTraining" renamings in transformers/conversion_mapping.py). Applied in order, as regexes.
V5_TO_V4 = (
    (r"^vit\.layers\.", "vit.encoder.layer."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)

# transformers 5 -> official models_mae.py names, per block and top level.
_OFFICIAL_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.o_proj": "attn.proj",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_OFFICIAL_TOP = {
    "vit.embeddings.cls_token": "cls_token",
    "vit.embeddings.position_embeddings": "pos_embed",
    "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "vit.layernorm.weight": "norm.weight",
    "vit.layernorm.bias": "norm.bias",
    "decoder.mask_token": "mask_token",
    "decoder.decoder_pos_embed": "decoder_pos_embed",
    **{f"decoder.{n}.{t}": f"{n}.{t}" for n in ("decoder_embed", "decoder_norm", "decoder_pred")
       for t in ("weight", "bias")},
}


def sincos_table(dim: int, grid: int) -> np.ndarray:
  """Reference 2-D sin-cos table ``(1 + grid², dim)`` written from the official formula (models_mae.py /
  util/pos_embed.py): half the channels encode w, then half h; each half is [sin(pos·ω), cos(pos·ω)] with
  ω_k = 1 / 10000^(2k / (dim/2)); zeros row for cls."""
  rows = [np.zeros(dim)]
  half = dim // 2
  omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) * 2 / half)
  for h in range(grid):
    for w in range(grid):
      rows.append(np.concatenate([np.sin(w * omega), np.cos(w * omega),
                                  np.sin(h * omega), np.cos(h * omega)]))
  return np.stack(rows)


def hf_model(norm_pix: bool, seed: int = 0):
  """Tiny HF ViTMAE with every parameter perturbed (non-zero biases / mask token, LN ≠ 1/0) and sin-cos
  position tables."""
  config = transformers.ViTMAEConfig(
      image_size=IMG, patch_size=PATCH, num_channels=3, hidden_size=WIDTH, num_hidden_layers=DEPTH,
      num_attention_heads=HEADS, intermediate_size=4 * WIDTH, decoder_hidden_size=DEC_WIDTH,
      decoder_num_hidden_layers=DEC_DEPTH, decoder_num_attention_heads=DEC_HEADS,
      decoder_intermediate_size=4 * DEC_WIDTH, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
      norm_pix_loss=norm_pix, mask_ratio=MASK_RATIO, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  torch.manual_seed(seed)
  model = transformers.ViTMAEForPreTraining(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("position_embeddings", "decoder_pos_embed")):
        continue
      p.add_(0.05 * torch.randn_like(p))
    model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(sincos_table(WIDTH, GRID))[None])
    model.decoder.decoder_pos_embed.copy_(torch.from_numpy(sincos_table(DEC_WIDTH, GRID))[None])
    model.decoder.mask_token.normal_(0.0, 0.02)
  return model


def v5_state_dict(model) -> dict:
  return {k: v.detach().clone() for k, v in model.state_dict().items()}


def to_v4(sd: dict) -> dict:
  out = {}
  for k, v in sd.items():
    for pat, rep in V5_TO_V4:
      k = re.sub(pat, rep, k)
    out[k] = v
  return out


def to_official(sd: dict, full: bool) -> dict:
  """v5 state dict → ``{'model': official state dict}``: ``mae_visualize`` layout if ``full``, else
  ``mae_pretrain``."""
  out = {}
  for k, v in sd.items():
    if k in _OFFICIAL_TOP:
      out[_OFFICIAL_TOP[k]] = v
      continue
    m = re.match(r"^(vit\.layers|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)$", k)
    assert m, k
    stack, i, sub, kind = m.groups()
    blocks = "blocks" if stack == "vit.layers" else "decoder_blocks"
    if sub in ("attention.k_proj", "attention.v_proj"):
      continue
    if sub == "attention.q_proj":  # fused Linear(D, 3D): output rows [q | k | v]
      pre = f"{stack}.{i}.attention."
      out[f"{blocks}.{i}.attn.qkv.{kind}"] = torch.cat([sd[f"{pre}{n}_proj.{kind}"] for n in "qkv"], 0)
    else:
      out[f"{blocks}.{i}.{_OFFICIAL_BLOCK[sub]}.{kind}"] = v
  if not full:
    out = {k: v for k, v in out.items() if not k.startswith(("decoder", "mask_token"))}
  return {"model": out}


def official_forward(sd: dict, imgs, noise, heads: int, dec_heads: int, norm_pix: bool):
  """Transcription of the official ``MaskedAutoencoderViT.forward`` (models_mae.py, timm Block, LN eps 1e-6)
  on an official-layout state dict. Returns ``(latent, mask, ids_restore, pred, loss)`` (last two None when
  the state dict has no decoder). ``imgs: (N, 3, H, W)``, ``noise: (N, L)``."""
  F = torch.nn.functional

  def ln(x, pre):
    return F.layer_norm(x, x.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps=1e-6)

  def lin(x, pre):
    return F.linear(x, sd[pre + ".weight"], sd[pre + ".bias"])

  def block(x, pre, h):
    b, n, c = x.shape
    qkv = lin(ln(x, pre + "norm1"), pre + "attn.qkv").reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
    x = x + lin((attn @ v).transpose(1, 2).reshape(b, n, c), pre + "attn.proj")
    return x + lin(F.gelu(lin(ln(x, pre + "norm2"), pre + "mlp.fc1")), pre + "mlp.fc2")

  def depth(prefix):
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix + "."))

  p = sd["patch_embed.proj.weight"].shape[-1]
  x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
  x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]
  n, l, d = x.shape
  keep = int(l * (1 - MASK_RATIO))
  ids_shuffle = torch.argsort(noise, dim=1)
  ids_restore = torch.argsort(ids_shuffle, dim=1)
  x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, d))
  mask = torch.ones(n, l)
  mask[:, :keep] = 0
  mask = torch.gather(mask, 1, ids_restore)
  cls = sd["cls_token"] + sd["pos_embed"][:, :1]
  x = torch.cat([cls.expand(n, -1, -1), x], dim=1)
  for i in range(depth("blocks")):
    x = block(x, f"blocks.{i}.", heads)
  latent = ln(x, "norm")
  if "decoder_embed.weight" not in sd:
    return latent, mask, ids_restore, None, None

  x = lin(latent, "decoder_embed")
  mask_tokens = sd["mask_token"].repeat(n, l + 1 - x.shape[1], 1)
  x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
  x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
  x = torch.cat([x[:, :1], x_], dim=1) + sd["decoder_pos_embed"]
  for i in range(depth("decoder_blocks")):
    x = block(x, f"decoder_blocks.{i}.", dec_heads)
  pred = lin(ln(x, "decoder_norm"), "decoder_pred")[:, 1:]

  h = imgs.shape[2] // p
  target = imgs.reshape(n, 3, h, p, h, p)
  target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, h * h, p * p * 3)
  if norm_pix:
    mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.0e-6) ** 0.5
  loss = ((pred - target) ** 2).mean(dim=-1)
  loss = (loss * mask).sum() / mask.sum()
  return latent, mask, ids_restore, pred, loss


def inputs(seed: int = 1):
  """Same images and noise for both sides: ``(imgs NCHW torch, noise torch, imgs NHWC jax, noise jax)``."""
  g = torch.Generator().manual_seed(seed)
  imgs = torch.randn(BATCH, 3, IMG, IMG, generator=g)
  noise = torch.rand(BATCH, GRID * GRID, generator=g)
  return imgs, noise, jnp.asarray(imgs.permute(0, 2, 3, 1).numpy()), jnp.asarray(noise.numpy())


def maejax_model(config: dict, norm_pix: bool) -> MAE:
  return MAEConfig.from_json(config).build(norm_pix_loss=norm_pix, mask_ratio=MASK_RATIO)


def _rel(a: float, b: float) -> float:
  return abs(a - b) / abs(b)


def check_full(params, config, ref, norm_pix: bool, label: str) -> None:
  """``ref = (loss, logits, mask, ids_restore)`` torch tensors from the reference, same inputs."""
  assert set(params) == {"encoder", "decoder"}
  _, _, x, noise = inputs()
  out = maejax_model(config, norm_pix).apply({"params": params}, x, noise)
  loss, logits, mask, ids_restore = (t.detach().numpy() for t in ref)
  np.testing.assert_array_equal(np.asarray(out.mask), mask)
  np.testing.assert_array_equal(np.asarray(out.ids_restore), ids_restore)
  pred_diff = float(np.max(np.abs(np.asarray(out.pred) - logits)))
  loss_rel = _rel(float(out.loss), float(loss))
  print(f"\n[parity {label}] loss maejax {float(out.loss):.7f} torch {float(loss):.7f} "
        f"rel diff {loss_rel:.2e}; pred max-abs diff {pred_diff:.2e}")
  assert loss_rel < LOSS_RTOL
  assert pred_diff < PRED_ATOL


def check_encoder(params, config, ref_tokens, label: str) -> None:
  """Final-normed encoder tokens ``(B, 1 + K, D)`` of ``MAE.encode`` vs the reference's."""
  _, _, x, noise = inputs()
  enc, *_ = maejax_model(config, True).apply({"params": params}, x, noise, method=MAE.encode)
  diff = float(np.max(np.abs(np.asarray(enc.tokens) - ref_tokens.detach().numpy())))
  print(f"\n[parity {label}] encoder tokens {tuple(enc.tokens.shape)} max-abs diff {diff:.2e}")
  assert diff < TOKENS_ATOL


def expected_config(full: bool) -> dict:
  dec = dict(decoder_width=DEC_WIDTH, decoder_depth=DEC_DEPTH, decoder_heads=DEC_HEADS) if full else dict(
      decoder_width=None, decoder_depth=None, decoder_heads=None)
  return dict(img_size=IMG, patch_size=PATCH, in_chans=3, width=WIDTH, depth=DEPTH, num_heads=HEADS,
              mlp_ratio=4.0, **dec)


def hf_outputs(model):
  imgs, noise, _, _ = inputs()
  with torch.no_grad():
    out = model(pixel_values=imgs, noise=noise)
  return out.loss, out.logits, out.mask, out.ids_restore


def hf_encoder_tokens(model):
  imgs, noise, _, _ = inputs()
  with torch.no_grad():
    return model.vit(imgs, noise=noise).last_hidden_state


# ------------------------------------------------------------------------------------------------- tests


def test_reference_sincos_table_matches_hf_init():
  """Our reference table is the one transformers itself initialises ViTMAE with (after its h/w rotation)."""
  from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

  t = build_2d_sinusoidal_position_embedding(height=GRID, width=GRID, embed_dim=WIDTH, cls_token=True).numpy()
  t = np.concatenate([t[..., WIDTH // 2:], t[..., :WIDTH // 2]], axis=-1)
  np.testing.assert_allclose(t, sincos_table(WIDTH, GRID), atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_v5_full(norm_pix):
  model = hf_model(norm_pix)
  params, config, info = convert.convert_state_dict(v5_state_dict(model), num_heads=HEADS,
                                                    decoder_heads=DEC_HEADS)
  assert info["format"] == "hf_v5" and info["has_decoder"]
  assert {k: config[k] for k in expected_config(True)} == expected_config(True)
  assert max(info["pos_embed_max_abs_diff"].values()) < 1e-6
  check_full(params, config, hf_outputs(model), norm_pix, f"hf_v5 full norm_pix={norm_pix}")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_v5_gradients(norm_pix):
  """The loss gradient w.r.t. every parameter equals PyTorch autograd's on HF ViTMAE (same weights, images,
  noise). This checks maejax's backward pass as a whole (the hand-written softmax VJP, the erf GELU, the 2-D
  projections) against an independent implementation. The checkpoint conversion only re-indexes weights
  (transposes, reshapes, splits), so it maps torch's gradients to maejax's layout as it maps the weights; the
  fixed sin-cos tables are not parameters on either side that the loss trains, so they keep their values."""
  model = hf_model(norm_pix).train()
  imgs, noise, x, jnoise = inputs()
  model.zero_grad()
  model(pixel_values=imgs, noise=noise).loss.backward()
  grads = {k: (p.grad if p.grad is not None and not k.endswith(("position_embeddings", "decoder_pos_embed"))
               else p).detach().clone() for k, p in model.named_parameters()}
  assert len(grads) == len(v5_state_dict(model))
  torch_g, _, _ = convert.convert_state_dict(grads, num_heads=HEADS, decoder_heads=DEC_HEADS)
  params, config, _ = convert.convert_state_dict(v5_state_dict(model), num_heads=HEADS, decoder_heads=DEC_HEADS)
  mae = maejax_model(config, norm_pix)
  ours = jax.grad(lambda p: mae.apply({"params": p}, x, jnoise).loss)(params)
  flat_t = dict(jax.tree_util.tree_leaves_with_path(torch_g))
  flat_o = dict(jax.tree_util.tree_leaves_with_path(ours))
  assert set(flat_t) == set(flat_o)
  worst = 0.0
  for path, g in flat_o.items():
    name, ref = jax.tree_util.keystr(path), np.asarray(flat_t[path])
    if name.endswith("['key']['bias']"):
      # Exactly zero in exact arithmetic (a key bias adds q·b to every logit of a query row; softmax ignores
      # it); both sides hold rounding noise, so compare it with the scale of the key kernel's gradient.
      scale = float(np.abs(np.asarray(flat_t[path[:-1] + (jax.tree_util.DictKey("kernel"),)])).max())
      assert max(float(np.abs(ref).max()), float(np.abs(np.asarray(g)).max())) < GRAD_RTOL * scale, name
      continue
    scale = float(np.abs(ref).max())
    assert scale > 0, name  # every parameter gets a gradient
    err = float(np.abs(np.asarray(g) - ref).max()) / scale
    worst = max(worst, err)
    assert err < GRAD_RTOL, (name, err)
  print(f"\n[parity hf_v5 gradients norm_pix={norm_pix}] {len(flat_o)} tensors, worst max-abs diff / max-abs "
        f"gradient {worst:.2e}")


def test_hf_v5_encoder_only():
  model = hf_model(True)
  sd = {k: v for k, v in v5_state_dict(model).items() if k.startswith("vit.")}
  params, config, info = convert.convert_state_dict(sd, num_heads=HEADS)
  assert set(params) == {"encoder"} and not info["has_decoder"]
  assert {k: config[k] for k in expected_config(False)} == expected_config(False)
  check_encoder(params, config, hf_encoder_tokens(model), "hf_v5 encoder-only")


def test_v4_names_load_in_transformers(tmp_path):
  """The v4 renaming table is right: transformers 5 loads the renamed dict (through its own v4→v5 key
  conversion) with no missing or unexpected keys and identical weights."""
  from safetensors.torch import save_file

  model = hf_model(True)
  sd = v5_state_dict(model)
  v4 = to_v4(sd)
  assert any(k.startswith("vit.encoder.layer.0.attention.attention.query.") for k in v4)
  save_file({k: v.contiguous() for k, v in v4.items()}, str(tmp_path / "model.safetensors"))
  model.config.save_pretrained(tmp_path)
  loaded, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  for k, v in loaded.state_dict().items():
    torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_hf_v4_full(norm_pix):
  model = hf_model(norm_pix)
  params, config, info = convert.convert_state_dict(to_v4(v5_state_dict(model)), num_heads=HEADS,
                                                    decoder_heads=DEC_HEADS)
  assert info["format"] == "hf_v4"
  check_full(params, config, hf_outputs(model), norm_pix, f"hf_v4 full norm_pix={norm_pix}")


def test_hf_v4_directory_with_config_json(tmp_path):
  """A HF model directory: heads, norm_pix_loss and mask_ratio come from config.json."""
  from safetensors.torch import save_file

  model = hf_model(False)
  save_file({k: v.contiguous() for k, v in to_v4(v5_state_dict(model)).items()},
            str(tmp_path / "model.safetensors"))
  model.config.save_pretrained(tmp_path)
  params, config, info = convert.convert(tmp_path)
  assert config["num_heads"] == HEADS and config["decoder_heads"] == DEC_HEADS
  assert config["norm_pix_loss"] is False and config["mask_ratio"] == MASK_RATIO
  check_full(params, config, hf_outputs(model), False, "hf_v4 directory")


def test_hf_v4_encoder_only():
  model = hf_model(True)
  sd = {k: v for k, v in to_v4(v5_state_dict(model)).items() if k.startswith("vit.")}
  params, config, _ = convert.convert_state_dict(sd, num_heads=HEADS)
  check_encoder(params, config, hf_encoder_tokens(model), "hf_v4 encoder-only")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_official_visualize_full(norm_pix):
  model = hf_model(norm_pix)
  ckpt = to_official(v5_state_dict(model), full=True)
  imgs, noise, _, _ = inputs()
  with torch.no_grad():
    latent, mask, ids_restore, pred, loss = official_forward(ckpt["model"], imgs, noise, HEADS, DEC_HEADS,
                                                             norm_pix)
    # The official-layout transcription and HF agree: the layout built here is the official one.
    hf = hf_outputs(model)
    torch.testing.assert_close(pred, hf[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, hf[0], rtol=1e-5, atol=0)
  params, config, info = convert.convert_state_dict(ckpt, num_heads=HEADS, decoder_heads=DEC_HEADS)
  assert info["format"] == "official" and info["has_decoder"]
  assert {k: config[k] for k in expected_config(True)} == expected_config(True)
  check_full(params, config, (loss, pred, mask, ids_restore), norm_pix, f"official full norm_pix={norm_pix}")
  check_full(params, config, hf, norm_pix, f"official full vs HF norm_pix={norm_pix}")


def test_official_pretrain_encoder_only():
  model = hf_model(True)
  ckpt = to_official(v5_state_dict(model), full=False)
  assert set(ckpt["model"]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                                "norm.weight", "norm.bias"} | {
      f"blocks.{i}.{n}.{t}" for i in range(DEPTH)
      for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for t in ("weight", "bias")}
  imgs, noise, _, _ = inputs()
  with torch.no_grad():
    latent, *_ = official_forward(ckpt["model"], imgs, noise, HEADS, DEC_HEADS, True)
  torch.testing.assert_close(latent, hf_encoder_tokens(model), rtol=0, atol=1e-5)
  params, config, info = convert.convert_state_dict(ckpt, num_heads=HEADS)
  assert info["format"] == "official" and set(params) == {"encoder"}
  check_encoder(params, config, latent, "official encoder-only (mae_pretrain)")


def test_converted_tree_matches_mae_init():
  """The converted params have exactly the tree, shapes and dtypes of ``MAE.init``."""
  import flax

  params, config, _ = convert.convert_state_dict(v5_state_dict(hf_model(True)), num_heads=HEADS,
                                                 decoder_heads=DEC_HEADS)
  _, _, x, noise = inputs()
  k = jax.random.PRNGKey(0)
  ref = maejax_model(config, True).init({"params": k, "masking": k}, x, noise)
  ref = flax.linen.meta.unbox(ref)["params"]
  spec = lambda t: jax.tree_util.tree_map(lambda a: (tuple(a.shape), str(a.dtype)), t)
  assert spec(params) == spec(ref)
