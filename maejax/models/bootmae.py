"""BootMAE (Dong et al., ECCV 2022): MAE with a bootstrapped feature target and target-aware decoders.

One encoder ``f_θ`` on the visible tokens, two decoders (SEED_METHODS.md §1, from LightDXY/BootMAE):

* pixel regressor: ``x̂ = D_pix(z; h⁽⁰⁾)`` predicts the per-patch, per-channel normalised pixels of the masked
  patches (``losses.bootmae_pixel_target``);
* feature predictor: ``ŷ = D_feat(z; h⁽ᴸ⁻¹⁾)`` predicts ``y = f_ξ(x)``, the last-block output (no final norm, cls
  dropped) of the momentum encoder ``ξ ← d·ξ + (1 − d)·θ`` run on the FULL image; loss on the masked patches
  between ``LN(y)`` and ``LN(ŷ)`` (LayerNorm without affine, ``losses.bootmae_feature_loss``).
* target-aware decoders: every decoder block is ``u ← u + SA(LN₁u); u ← u + CA(LN₃u, LN₄h); u ← u + MLP(LN₂u)``,
  cross-attending to the encoder's block output ``h`` of the visible tokens (+cls): block 0 (low-level
  information) for pixels, the last block for features, so the encoder need not carry them to its output.
* decoder input ``[W z ; e_mask + PE[masked]]`` unshuffled: only the mask tokens get a position embedding (the
  visible tokens carry the encoder's).
* total ``L = L_pix + λ(t)·L_feat``, ``λ(t) = λ₀·min(1, progress / ramp)`` (``ramp = 0.25`` of training);
  pixel and feature terms weight patch ``l`` by ``w = m ⊙ (1 + AvgPool3×3(m))`` (``losses.block_weights``) and
  divide by the masked count; BEiT block-wise masking (``data.pipeline.block_mask_noise``).

Ablations (:class:`BootMAEConfig`): ``feature_target=False`` (pixels only), ``target_aware=False`` (plain
self-attention decoders), ``weight_mask=False``, ``pixel_norm="mae"``, ``feature_ramp=0``, and block masking is a
data option (``bootmae.block_masking``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax import losses
from maejax.models.dmae import VisibleBlocks
from maejax.models.mae import MAEConfig, random_masking
from maejax.models.vit import (
  Attention,
  Block,
  Mlp,
  Projection,
  _p,
  attention,
  fused_qkv_init,
  gather_tokens,
  layer_norm,
  patchify,
  sincos_pos_embed_2d,
  unpatchify,
  xavier_uniform,
)

Array = jax.Array
PIXEL_NORMS = ("bootmae", "mae")


@dataclasses.dataclass(frozen=True)
class BootMAEConfig:
  """``config.bootmae``: BootMAE's settings (defaults = the official ViT-B recipe)."""

  feature_target: bool = True  # the EMA feature predictor and its loss (False: pixel branch only)
  target_aware: bool = True  # decoders cross-attend to encoder block features of the visible tokens
  pixel_context_block: int = 0  # encoder block the pixel decoder attends to
  feature_context_block: int = -1  # encoder block the feature decoder attends to (-1 = last)
  decoder_depth: int = 2  # blocks of each decoder
  feature_decoder_heads: int = 0  # 0 = the encoder's heads (official: both decoders use the encoder's heads)
  feature_weight: float = 1.0  # λ₀
  feature_ramp: float = 0.25  # λ rises linearly over this fraction of training (0 = λ₀ throughout)
  weight_mask: bool = True  # w = m ⊙ (1 + AvgPool3×3(m)); False = plain masked mean
  pixel_norm: str = "bootmae"  # "bootmae": per patch+channel, ddof 0, eps 1e-5; "mae": norm-pix (ddof 1, 1e-6)
  block_masking: bool = True  # BEiT block-wise masking (host side), topped up at random to the mask ratio
  block_mask_fraction: float = 0.61  # patches block-masked before the random top-up (official 120/196)

  def __post_init__(self):
    if self.pixel_norm not in PIXEL_NORMS:
      raise ValueError(f"bootmae.pixel_norm={self.pixel_norm!r}: expected one of {PIXEL_NORMS}")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> BootMAEConfig:
    return _from_section(cls, cfg, "bootmae")


def _from_section(cls, cfg, name):
  cfg = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f"unknown config.{name} keys {unknown}; expected a subset of {sorted(fields)}")
  return cls(**cfg)


class CrossAttention(nn.Module):
  """``softmax(q·kᵀ/√Dh)·v`` with ``q`` from the decoder tokens ``x: (B, T, W)`` and ``k, v`` from a context
  ``ctx: (B, S, C)`` of another width; output ``(B, T, W)``."""

  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: Array, ctx: Array) -> Array:
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"decoder width {width} is not divisible by num_heads {self.num_heads}")
    hd = width // self.num_heads
    dense = lambda name: Projection(
        (self.num_heads, hd), dtype=self.dtype, name=name,
        kernel_init=_p(fused_qkv_init(width), "embed", "heads", "kv"),
        bias_init=_p(nn.initializers.zeros, "heads", "kv"))
    out = attention(dense("query")(x), dense("key")(ctx), dense("value")(ctx), self.attention)
    return Projection(
        (width,), in_axes=2, dtype=self.dtype, name="out",
        kernel_init=_p(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=-1),
                       "heads", "kv", "embed"),
        bias_init=_p(nn.initializers.zeros, "embed"))(out)


class CrossAttnBlock(nn.Module):
  """Target-aware decoder block: ``u + SA(LN₁u)``, then ``u + CA(LN₃u, LN₄ctx)``, then ``u + MLP(LN₂u)``."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: Array, ctx: Array) -> Array:
    width = x.shape[-1]
    x = x + Attention(self.num_heads, self.dtype, self.attention, name="attn")(layer_norm("norm1", self.dtype)(x))
    x = x + CrossAttention(self.num_heads, self.dtype, self.attention, name="cross_attn")(
        layer_norm("norm3", self.dtype)(x), layer_norm("norm4", self.dtype)(ctx))
    return x + Mlp(int(width * self.mlp_ratio), self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))


class BootDecoder(nn.Module):
  """``[W z ; e_mask + PE[masked]]`` unshuffled, ``depth`` (cross-attention) blocks, LN, Linear → ``out_dim``.

  ``latent: (B, 1+K, D)``, ``mask, ids_restore: (B, L)``, ``context: (B, 1+K, D)`` or None → ``(B, L, out_dim)``.
  The pixel head ``Linear(W → p²·C)`` is the official ``ConvTranspose2d(W, C, p, stride=p)`` on the patch grid.
  """

  num_patches: int
  out_dim: int
  width: int
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, latent: Array, mask: Array, ids_restore: Array, context: Array | None) -> Array:
    x = nn.Dense(self.width, dtype=self.dtype, name="embed", kernel_init=_p(xavier_uniform, "embed", "decoder_embed"),
                 bias_init=_p(nn.initializers.zeros, "decoder_embed"))(latent)
    b, l = ids_restore.shape
    mask_token = self.param("mask_token", _p(nn.initializers.normal(0.02), None, None, "decoder_embed"),
                            (1, 1, self.width))
    tokens = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (b, l + 1 - x.shape[1], self.width))], axis=1)
    tokens = gather_tokens(tokens, ids_restore)
    pos = jnp.asarray(sincos_pos_embed_2d(self.width, int(round(self.num_patches**0.5)), cls_token=False), x.dtype)
    tokens = tokens + mask[:, :, None].astype(x.dtype) * pos[None]  # only mask tokens get a position embedding
    x = jnp.concatenate([x[:, :1], tokens], axis=1)
    for i in range(self.depth):
      kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype, attention=self.attention,
                name=f"blocks_{i}")
      x = CrossAttnBlock(**kw)(x, context) if context is not None else Block(**kw)(x, True)
    x = layer_norm("norm", self.dtype)(x)
    return nn.Dense(self.out_dim, dtype=self.dtype, name="pred", kernel_init=_p(xavier_uniform, "decoder_embed", None),
                    bias_init=_p(nn.initializers.zeros, None))(x)[:, 1:]


@dataclasses.dataclass(frozen=True)
class BootMAEOutput:
  """``pixels: (B, L, p²·C)``; ``features: (B, L, D)`` or None; ``mask, ids_restore: (B, L)``; ``ids_keep: (B, K)``;
  ``latent: (B, 1+K, D)``."""

  pixels: Array
  features: Array | None
  mask: Array
  ids_restore: Array
  ids_keep: Array
  latent: Array


jax.tree_util.register_dataclass(BootMAEOutput, data_fields=["pixels", "features", "mask", "ids_restore",
                                                             "ids_keep", "latent"], meta_fields=[])


class BootMAE(nn.Module):
  """Parameters: ``encoder`` (an MAE :class:`ViT`), ``decoder`` (pixels), ``feature_decoder`` (features)."""

  mae: MAEConfig
  boot: BootMAEConfig = BootMAEConfig()

  def setup(self):
    mc, bc = self.mae, self.boot
    self.encoder = mc.build_encoder()
    common = dict(num_patches=self.num_patches, depth=bc.decoder_depth, mlp_ratio=mc.mlp_ratio,
                  dtype=jnp.dtype(mc.dtype), attention=mc.attention)
    self.decoder = BootDecoder(out_dim=mc.patch_size**2 * mc.in_chans, width=mc.decoder_width,
                               num_heads=mc.decoder_heads, **common)
    if bc.feature_target:
      self.feature_decoder = BootDecoder(out_dim=mc.width, width=mc.width,
                                         num_heads=bc.feature_decoder_heads or mc.num_heads, **common)

  @property
  def num_patches(self) -> int:
    return (self.mae.img_size // self.mae.patch_size) ** 2

  def context_blocks(self) -> tuple[int, int]:
    return self.boot.pixel_context_block % self.mae.depth, self.boot.feature_context_block % self.mae.depth

  def __call__(self, images: Array, noise: Array | None = None, *, train: bool = False,
               return_blocks: Sequence[int] = ()) -> BootMAEOutput | tuple[BootMAEOutput, VisibleBlocks]:
    """``images: (B, H, W, C)``, ``noise: (B, L)`` (small = kept; block masking passes ``block − U(0,1)``).
    With ``return_blocks`` (encoder block indices) also the :class:`VisibleBlocks` of this pass (DMAE reads them)."""
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], self.num_patches))
    ids_keep, mask, ids_restore = random_masking(noise, self.mae.mask_ratio)
    pix_blk, feat_blk = self.context_blocks()
    enc = self.encoder(images, ids_keep, train=train, return_blocks=(pix_blk, feat_blk, *return_blocks))
    aware = self.boot.target_aware
    pixels = self.decoder(enc.tokens, mask, ids_restore, enc.blocks[pix_blk] if aware else None)
    features = None
    if self.boot.feature_target:
      features = self.feature_decoder(enc.tokens, mask, ids_restore, enc.blocks[feat_blk] if aware else None)
    out = BootMAEOutput(pixels=pixels, features=features, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep,
                        latent=enc.tokens)
    if not return_blocks:
      return out
    return out, VisibleBlocks({b: enc.blocks[b] for b in return_blocks}, ids_keep, mask, ids_restore)

  def targets(self, images: Array) -> Array:
    """Momentum-encoder features ``y = f_ξ(x)``: all L tokens + cls, all blocks, no final norm, cls dropped
    (official ``get_feature``); apply with the EMA encoder params. ``(B, L, D)``."""
    last = self.mae.depth - 1
    return self.encoder(images, None, stop_after=last, return_blocks=(last,)).blocks[last][:, 1:]

  def reconstruct(self, out: BootMAEOutput, images: Array) -> Array:
    """The pixel decoder's prediction as images ``(B, H, W, C)``, de-normalised with the per-patch statistics
    of ``images`` (the pass's input) as its ``pixel_norm`` target defines them (:func:`pixel_target_inverse`)."""
    mc = self.mae
    pixels = pixel_target_inverse(out.pixels, patchify(images, mc.patch_size), mc.in_chans, self.boot.pixel_norm)
    return unpatchify(pixels, mc.patch_size, mc.in_chans)


def pixel_target_inverse(pred: Array, patches: Array, channels: int, pixel_norm: str) -> Array:
  """Pixels from a predicted pixel target, with the mean and variance of the input's own patches, masked ones
  included (the official MAE visualisation's de-normalisation: a figure, not a prediction the model could make
  alone). ``pred, patches: (B, L, p²·C)``.

  * ``"bootmae"`` (``losses.bootmae_pixel_target``): ``x̂ = t̂·sqrt(σ²_{l,c} + 1e-5) + μ_{l,c}``, ddof 0;
  * ``"sdmae"`` (``losses.sdmae_pixel_target``): ``x̂ = t̂·(σ_{l,c} + 1e-6) + μ_{l,c}``, ddof 1;
  * ``"mae"`` (``losses.norm_pix_target``): ``x̂ = t̂·sqrt(σ²_l + 1e-6) + μ_l`` over the whole patch, ddof 1.
  """
  pred, patches = pred.astype(jnp.float32), patches.astype(jnp.float32)
  if pixel_norm == "mae":
    mean, var = patches.mean(-1, keepdims=True), patches.var(-1, keepdims=True, ddof=1)
    return pred * jnp.sqrt(var + 1e-6) + mean
  if pixel_norm not in ("bootmae", "sdmae"):
    raise ValueError(f"pixel_norm={pixel_norm!r}: expected one of ('bootmae', 'sdmae', 'mae')")
  mean, var = losses.patch_channel_stats(patches, channels, ddof=0 if pixel_norm == "bootmae" else 1)
  std = jnp.sqrt(var + 1e-5) if pixel_norm == "bootmae" else jnp.sqrt(var) + 1e-6
  x = pred.reshape(pred.shape[:-1] + (-1, channels))
  return (x * std + mean).reshape(pred.shape)


def bootmae_loss(model: BootMAE, params: Any, ema_encoder: Any, images: Array, rngs: Mapping[str, Array] | None,
                 progress: Array, *, noise: Array | None = None, train: bool = True,
                 return_blocks: Sequence[int] = ()) -> tuple[Array, dict] | tuple[Array, dict, VisibleBlocks]:
  """``L = L_pix + λ₀·min(1, progress/ramp)·L_feat``; ``ema_encoder`` = the momentum copy of ``params["encoder"]``
  (no gradient), ``progress ∈ (0, 1]`` = fraction of training done at this step. With ``return_blocks`` a third
  item: the pass's :class:`VisibleBlocks`."""
  bc, mc = model.boot, model.mae
  res = model.apply({"params": params}, images, noise, train=train, rngs=rngs, return_blocks=return_blocks)
  out, *visible = res if return_blocks else (res,)
  patches = patchify(images, mc.patch_size).astype(jnp.float32)
  target = (losses.bootmae_pixel_target(patches, mc.in_chans) if bc.pixel_norm == "bootmae"
            else losses.norm_pix_target(patches))
  grid = mc.img_size // mc.patch_size
  weights = losses.block_weights(out.mask, grid) if bc.weight_mask else None
  pixel = losses.weighted_masked_mse(out.pixels.astype(jnp.float32), target, out.mask, weights)
  metrics = {"pixel_loss": pixel}
  total = pixel
  if bc.feature_target:
    y = model.apply({"params": {"encoder": jax.lax.stop_gradient(ema_encoder)}}, images, method=BootMAE.targets)
    feature = losses.bootmae_feature_loss(out.features, y, out.mask, weights)
    lam = bc.feature_weight * losses.linear_ramp(progress, bc.feature_ramp)
    total = pixel + lam * feature
    metrics.update(feature_loss=feature, feature_weight=lam)
  return (total, dict(metrics, loss=total), *visible)
