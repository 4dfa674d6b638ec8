"""Masked autoencoder (He et al. 2022), following the official ``models_mae.py`` equation by equation.

``random_masking`` is the paper's per-sample shuffle; the encoder sees only the kept tokens; the decoder appends
mask tokens, unshuffles with ``ids_restore`` and predicts the pixels of every patch; the loss (``losses.py``) is
the per-patch MSE on masked patches only, against norm-pix targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maejax import losses
from maejax.models.vit import (
  Block,
  EncoderOutput,
  ViT,
  _p,
  check_attention,
  gather_tokens,
  layer_norm,
  patchify,
  sincos_pos_embed_2d,
  unpatchify,
  vit_size,
  xavier_uniform,
)

Array = jax.Array


def check_mask_ratio(mask_ratio: float) -> None:
  if not 0.0 < float(mask_ratio) < 1.0:
    raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """Tokens the encoder sees: ``int(L · (1 − r))`` as in the official code."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(noise: Array, mask_ratio: float) -> tuple[Array, Array, Array]:
  """Per-sample random masking by argsort of ``noise: (B, L)`` (small noise = kept).

  Returns ``ids_keep: (B, K)``, ``mask: (B, L)`` with 1 = removed, in the original patch order, and
  ``ids_restore: (B, L)`` that undoes the shuffle.
  """
  check_mask_ratio(mask_ratio)
  b, l = noise.shape
  keep = num_kept(l, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :keep]
  mask = jnp.ones((b, l), jnp.float32).at[:, :keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return ids_keep, mask, ids_restore


@dataclasses.dataclass(frozen=True)
class MAEOutput:
  """``loss`` scalar; ``pred: (B, L, p²·C)``; ``mask: (B, L)`` (1 = removed); ``ids_restore: (B, L)``;
  ``ids_keep: (B, K)``; ``latent: (B, 1+K, D)`` final-normed encoder tokens; ``blocks``: requested
  intermediate encoder block outputs ``(B, 1+K, D)``."""

  loss: Array
  pred: Array
  mask: Array
  ids_restore: Array
  ids_keep: Array
  latent: Array
  blocks: dict[int, Array]


jax.tree_util.register_dataclass(
    MAEOutput, data_fields=["loss", "pred", "mask", "ids_restore", "ids_keep", "latent", "blocks"],
    meta_fields=[])


class Decoder(nn.Module):
  """MAE decoder: Linear D→Dd, mask tokens, unshuffle, + pos-emb, blocks, LN, Linear Dd→p²·C."""

  num_patches: int
  patch_dim: int  # p·p·C
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "einsum"  # see :func:`maejax.models.vit.attention`
  return_hidden: bool = False  # also return the final-normed decoder tokens (SD-MAE reads them)

  @nn.compact
  def __call__(self, latent: Array, ids_restore: Array) -> Array | tuple[Array, Array]:
    """``latent: (B, 1+K, D)``, ``ids_restore: (B, L)`` → ``pred: (B, L, p²·C)`` (``patch_dim`` wide), and with
    ``return_hidden`` also ``hidden: (B, L, Dd)``, the decoder tokens after its final LN, cls dropped."""
    x = nn.Dense(self.width, dtype=self.dtype, name="decoder_embed",
                 kernel_init=_p(xavier_uniform, "embed", "decoder_embed"),
                 bias_init=_p(nn.initializers.zeros, "decoder_embed"))(latent)
    b, l = ids_restore.shape
    mask_token = self.param("mask_token", _p(nn.initializers.normal(0.02), None, None, "decoder_embed"),
                            (1, 1, self.width))
    n_mask = l + 1 - x.shape[1]
    tokens = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token.astype(x.dtype), (b, n_mask, self.width))], axis=1)
    tokens = gather_tokens(tokens, ids_restore)  # unshuffle to the original patch order
    x = jnp.concatenate([x[:, :1], tokens], axis=1)
    grid = int(round(self.num_patches**0.5))
    x = x + jnp.asarray(sincos_pos_embed_2d(self.width, grid, cls_token=True), x.dtype)[None]
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for i in range(self.depth):
      x = block_cls(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, dtype=self.dtype, attention=self.attention,
                    name=f"decoder_blocks_{i}")(x, True)
    hidden = layer_norm("decoder_norm", self.dtype)(x)
    x = nn.Dense(self.patch_dim, dtype=self.dtype, name="decoder_pred",
                 kernel_init=_p(xavier_uniform, "decoder_embed", "patch"),
                 bias_init=_p(nn.initializers.zeros, "patch"))(hidden)
    return (x[:, 1:], hidden[:, 1:]) if self.return_hidden else x[:, 1:]


class MAE(nn.Module):
  """ViT-MAE. Parameters: ``encoder`` (a :class:`ViT`) and ``decoder`` (a :class:`Decoder`).

  ``mask_token_in_encoder=True`` gives the paper's no-skipping baseline (mask tokens go through the encoder):
  same loss definition. The fields are documented on :class:`MAEConfig`, which builds this module.
  """

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  norm_pix_loss: bool = True
  mask_ratio: float = 0.75
  drop_path: float = 0.0
  mask_token_in_encoder: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "einsum"

  def setup(self):
    check_mask_ratio(self.mask_ratio)
    self.encoder = ViT(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                       width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                       drop_path=self.drop_path, dtype=self.dtype, remat=self.remat, attention=self.attention)
    self.decoder = Decoder(num_patches=self.num_patches, patch_dim=self.patch_size**2 * self.in_chans,
                           width=self.decoder_width, depth=self.decoder_depth, num_heads=self.decoder_heads,
                           mlp_ratio=self.mlp_ratio, dtype=self.dtype, remat=self.remat, attention=self.attention)
    if self.mask_token_in_encoder:
      self.encoder_mask_token = self.param(
          "encoder_mask_token", _p(nn.initializers.normal(0.02), None, None, "embed"), (1, 1, self.width))

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  def mask(self, batch: int, noise: Array | None = None, mask_ratio: float | None = None):
    """Draws ``noise ~ U(0, 1): (B, L)`` from the ``masking`` rng stream unless given; see random_masking."""
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (batch, self.num_patches))
    elif noise.shape != (batch, self.num_patches):
      raise ValueError(f"noise must have shape (B, L) = {(batch, self.num_patches)}, got {noise.shape}")
    return random_masking(noise, self.mask_ratio if mask_ratio is None else mask_ratio)

  def encode(self, images: Array, noise: Array | None = None, *, mask_ratio: float | None = None,
             train: bool = False, return_blocks=()) -> tuple[EncoderOutput, Array, Array, Array]:
    """Masks and encodes the visible patches. Returns ``(encoder_out, ids_keep, mask, ids_restore)``."""
    ids_keep, mask, ids_restore = self.mask(images.shape[0], noise, mask_ratio)
    if self.mask_token_in_encoder:
      x = self.encoder.embed_patches(images)
      tok = jnp.broadcast_to(self.encoder_mask_token.astype(x.dtype), x.shape)
      # The token carries its patch's position embedding, as in BEiT / SimMIM-style encoders.
      pos = jnp.asarray(sincos_pos_embed_2d(self.width, self.img_size // self.patch_size, False), x.dtype)
      x = jnp.where(mask[:, :, None] > 0, tok + pos[None], x)
      out = self.encoder(None, patch_tokens=x, train=train, return_blocks=return_blocks)
      # Keep only the visible tokens for the decoder so that the rest of the model is unchanged.
      vis = gather_tokens(out.tokens[:, 1:], ids_keep)
      out = EncoderOutput(tokens=jnp.concatenate([out.tokens[:, :1], vis], axis=1), blocks=out.blocks)
    else:
      out = self.encoder(images, ids_keep, train=train, return_blocks=return_blocks)
    return out, ids_keep, mask, ids_restore

  def __call__(self, images: Array, noise: Array | None = None, *, mask_ratio: float | None = None,
               train: bool = False, return_blocks=()) -> MAEOutput:
    """``images: (B, H, W, C)`` (normalised, channels last) → :class:`MAEOutput`."""
    enc, ids_keep, mask, ids_restore = self.encode(images, noise, mask_ratio=mask_ratio, train=train,
                                                   return_blocks=return_blocks)
    pred = self.decoder(enc.tokens, ids_restore)
    target = patchify(images, self.patch_size)
    loss = losses.mae_loss(pred.astype(jnp.float32), target.astype(jnp.float32), mask, self.norm_pix_loss)
    return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore, ids_keep=ids_keep,
                     latent=enc.tokens, blocks=enc.blocks)

  def reconstruct(self, out: MAEOutput, images: Array) -> Array:
    """Predicted pixels as images ``(B, H, W, C)``; with norm-pix the per-patch mean/std of ``images`` are
    put back (the model predicts normalised patches)."""
    pred = out.pred.astype(jnp.float32)
    if self.norm_pix_loss:
      target = patchify(images, self.patch_size).astype(jnp.float32)
      mean = target.mean(-1, keepdims=True)
      var = target.var(-1, keepdims=True, ddof=1)
      pred = pred * jnp.sqrt(var + 1e-6) + mean
    return unpatchify(pred, self.patch_size, self.in_chans)


@dataclasses.dataclass(frozen=True)
class MAEConfig:
  """The MAE hyper-parameters: built from ``config.model``, saved with every checkpoint, read back from it.

  ``to_json`` is what a checkpoint stores; ``from_json`` reads it back (and the configs of older checkpoints
  and of ``maejax.convert``, which hold a subset of these fields; None means the default). ``objective`` (the
  pretraining objective, ``config.model.objective``) and ``objective_config`` (its settings, saved beside these
  fields by the other objectives) are read past: the encoder is an MAE encoder whatever trained it.
  """

  img_size: int = 224  # image side in pixels (square images)
  patch_size: int = 16  # patch side p; the encoder sees (img_size / p)² patches
  in_chans: int = 3  # image channels C
  width: int = 768  # encoder width D (ViT-B)
  depth: int = 12  # encoder blocks
  num_heads: int = 12  # encoder attention heads
  mlp_ratio: float = 4.0  # MLP hidden width / block width, encoder and decoder
  decoder_width: int = 512  # the official decoder for every encoder size: 512-d, 8 blocks, 16 heads
  decoder_depth: int = 8
  decoder_heads: int = 16
  norm_pix_loss: bool = True  # targets are per-patch normalised pixels (unbiased variance)
  mask_ratio: float = 0.75  # fraction r of patches removed; the encoder sees int(L·(1 − r))
  drop_path: float = 0.0  # encoder stochastic depth, rising linearly to this rate at the last block
  mask_token_in_encoder: bool = False  # the paper's no-skipping baseline: mask tokens go through the encoder
  dtype: str = "float32"  # compute dtype ("bfloat16": bf16 compute); params are float32 either way
  remat: bool = False  # rematerialise every block in the backward pass (less memory, more compute)
  attention: str = "einsum"  # softmax(q·kᵀ/√Dh)·v implementation: "einsum" | "xla" | "cudnn" (vit.attention)

  def __post_init__(self):
    object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)
    check_attention(self.attention)

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def _check_keys(cls, keys, where: str, extra: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(keys) - set(cls.fields()) - set(extra))
    if unknown:
      raise ValueError(f"unknown {where} keys {unknown}; expected a subset of {sorted(cls.fields() + extra)}")

  @classmethod
  def from_json(cls, saved: Mapping[str, Any]) -> MAEConfig:
    """From a saved model config (``to_json`` output, or a subset of it); None entries take the default."""
    cls._check_keys(saved, "MAE model config", extra=OBJECTIVE_KEYS)
    return cls(**{k: v for k, v in saved.items() if v is not None and k not in OBJECTIVE_KEYS})

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> MAEConfig:
    """From ``config.model``: these fields plus ``size`` (``"B"``, ``"L"``, ``"H"``, … of :func:`vit_size`),
    which fills width / depth / num_heads that are None or absent."""
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    cls._check_keys(cfg, "config.model", extra=("size", "objective"))
    size = cfg.pop("size", None)
    cfg.pop("objective", None)
    given = {k: v for k, v in cfg.items() if v is not None}
    return cls(**{**(vit_size(size) if size else {}), **given})

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> MAEConfig:
    self._check_keys(changes, "MAE model config")
    return dataclasses.replace(self, **changes)

  def build(self, **overrides) -> MAE:
    """The :class:`MAE` of this config, with ``overrides`` (fields of this class; None ones are ignored)."""
    cfg = self.replace(**{k: v for k, v in overrides.items() if v is not None})
    return MAE(**{**cfg.to_json(), "dtype": jnp.dtype(cfg.dtype)})

  def build_encoder(self, **overrides) -> ViT:
    """The :class:`ViT` encoder of this config (the one :class:`MAE` builds), ``overrides`` as ViT fields."""
    kw = dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans, width=self.width,
              depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path=self.drop_path,
              dtype=jnp.dtype(self.dtype), remat=self.remat, attention=self.attention)
    return ViT(**{**kw, **overrides})

  def build_decoder(self, patch_dim: int | None = None, **overrides) -> Decoder:
    """The MAE :class:`Decoder` of this config predicting ``patch_dim`` values per patch (default p²·C)."""
    kw = dict(num_patches=(self.img_size // self.patch_size) ** 2,
              patch_dim=patch_dim or self.patch_size**2 * self.in_chans, width=self.decoder_width,
              depth=self.decoder_depth, num_heads=self.decoder_heads, mlp_ratio=self.mlp_ratio,
              dtype=jnp.dtype(self.dtype), remat=self.remat, attention=self.attention)
    return Decoder(**{**kw, **overrides})


OBJECTIVE_KEYS = ("objective", "objective_config")


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
