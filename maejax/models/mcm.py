"""MCM: multimodal channel-mixing masked pretraining (Zhang, Yang, Wang, Li, Yin, arXiv 2209.12244; no public
code: recipe from the abstracts, SEED_METHODS.md §6; the details below marked [maejax] are this project's).

* input: N aligned channels, the RGB image plus auxiliary modalities (depth; thermal where a dataset has it);
* channel mixing: per sample, ``drop`` of the N channels are dropped at random (set to 0 = the channel's mean
  after normalisation); the rest form ONE early-fused image for a single ViT;
* early fusion [maejax]: the patch embedding of the N-channel image is one convolution, split into the RGB
  encoder's own ``patch_embed`` (+ position embedding) and an ``aux_embed`` over the auxiliary channels, summed:
  ``E(x) = Conv_rgb(x_rgb) + Conv_aux(x_aux) + PE`` — exactly one conv over the stacked channels. So
  ``params["encoder"]`` is a plain RGB MAE encoder, and fine-tuning on RGB only (the AU stages) is this encoder
  with the auxiliary channels absent (= dropped);
* spatial masking: MAE random masking of the fused tokens;
* one MAE decoder per modality (``decoder`` for RGB, ``decoder_<name>`` for the others), each reconstructing its
  channels' norm-pix patches; the loss of modality ``m`` averages over the masked patches and [maejax, following
  v3's "dropped channels are reconstructed from the remaining ones"] over every patch of a sample that dropped
  one of m's channels; total = mean over modalities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax import losses
from maejax.models.bootmae import _from_section, pixel_target_inverse
from maejax.models.dmae import VisibleBlocks
from maejax.models.mae import MAEConfig, random_masking
from maejax.models.vit import _p, patch_embed_init, patchify, unpatchify

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MCMConfig:
  """``config.mcm``: the auxiliary modalities and channel mixing."""

  aux: tuple[tuple[str, int], ...] = (("depth", 1),)  # (record key, channels) after RGB, in input order
  drop: int = 1  # channels dropped per sample (the paper: 2 of 5 for RGB + depth + thermal)
  dropped_everywhere: bool = True  # a modality with a dropped channel is reconstructed at every patch

  def __post_init__(self):
    object.__setattr__(self, "aux", tuple((str(k), int(c)) for k, c in self.aux))
    if not self.aux:
      raise ValueError("mcm.aux: expected at least one auxiliary modality, e.g. (('depth', 1),)")
    if not 0 <= self.drop < 3 + sum(c for _, c in self.aux):
      raise ValueError(f"mcm.drop={self.drop}: expected 0 ≤ drop < the number of channels")

  @property
  def modalities(self) -> tuple[tuple[str, int], ...]:
    return (("image", 3),) + self.aux

  @property
  def channels(self) -> int:
    return sum(c for _, c in self.modalities)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> MCMConfig:
    return _from_section(cls, cfg, "mcm")


def channel_keep(rng: Array, batch: int, channels: int, drop: int) -> Array:
  """``(B, N)`` float 0/1: per sample, ``drop`` channels chosen uniformly without replacement are 0."""
  rank = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch, channels)), axis=1), axis=1)
  return (rank >= drop).astype(jnp.float32)


class MCM(nn.Module):
  """Parameters: ``encoder`` (an RGB MAE :class:`ViT`), ``aux_embed`` (the auxiliary channels' share of the
  patch embedding), ``decoder`` (RGB) and ``decoder_<key>`` per auxiliary modality."""

  mae: MAEConfig
  mcm: MCMConfig = MCMConfig()

  def setup(self):
    mc, p = self.mae, self.mae.patch_size
    self.encoder = mc.build_encoder()
    self.aux_embed = nn.Conv(mc.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                             dtype=jnp.dtype(mc.dtype), kernel_init=_p(patch_embed_init, None, None, "patch", "embed"))
    self.decoders = {k: mc.build_decoder(patch_dim=p * p * c, name="decoder" if k == "image" else f"decoder_{k}")
                     for k, c in self.mcm.modalities}

  @property
  def num_patches(self) -> int:
    return (self.mae.img_size // self.mae.patch_size) ** 2

  def __call__(self, x: Array, keep: Array, noise: Array | None = None, *, train: bool = False,
               return_blocks: Sequence[int] = ()):
    """``x: (B, H, W, N)`` normalised channels (RGB first), ``keep: (B, N)`` 0/1 → ``(preds {key: (B, L, p²·c)},
    mask (B, L))``; with ``return_blocks`` (encoder block indices) the pass's :class:`VisibleBlocks` follows them
    (DMAE reads it: the blocks of the fused, channel-dropped input)."""
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (x.shape[0], self.num_patches))
    x = x * keep[:, None, None, :].astype(x.dtype)
    tokens = self.encoder.embed_patches(x[..., :3])
    aux = self.aux_embed(x[..., 3:].astype(tokens.dtype))
    tokens = tokens + aux.reshape(tokens.shape)
    ids_keep, mask, ids_restore = random_masking(noise, self.mae.mask_ratio)
    enc = self.encoder(None, ids_keep, train=train, patch_tokens=tokens, return_blocks=return_blocks)
    out = ({k: d(enc.tokens, ids_restore) for k, d in self.decoders.items()}, mask)
    return (*out, VisibleBlocks(enc.blocks, ids_keep, mask, ids_restore)) if return_blocks else out

  def reconstruct(self, preds: Mapping[str, Array], x: Array) -> dict[str, Array]:
    """Each decoder's ``preds[key]: (B, L, p²·c)`` (of the pass on ``x: (B, H, W, N)``) as images
    ``{key: (B, H, W, c)}`` in ``x``'s normalised space, its norm-pix target undone with the per-patch statistics
    of the modality's channels of ``x``."""
    p, out, start = self.mae.patch_size, {}, 0
    for key, c in self.mcm.modalities:
      patches = patchify(x[..., start:start + c], p)
      out[key] = unpatchify(pixel_target_inverse(preds[key], patches, c, "mae"), p, c)
      start += c
    return out


def mcm_loss(model: MCM, params: Any, x: Array, rngs: Mapping[str, Array], *, keep: Array | None = None,
             noise: Array | None = None, train: bool = True,
             return_blocks: Sequence[int] = ()) -> tuple[Array, dict] | tuple[Array, dict, VisibleBlocks]:
  """Mean over modalities of the per-modality norm-pix MSE (weights: masked patches, and with
  ``dropped_everywhere`` every patch of a sample that dropped one of the modality's channels). With
  ``return_blocks`` a third item: the pass's :class:`VisibleBlocks`."""
  mcfg = model.mcm
  if keep is None:
    keep = channel_keep(rngs["channels"], x.shape[0], mcfg.channels, mcfg.drop)
  preds, mask, *visible = model.apply({"params": params}, x, keep, noise, train=train, rngs=rngs,
                                      return_blocks=return_blocks)
  metrics, terms, start = {}, [], 0
  for key, c in mcfg.modalities:
    target = losses.norm_pix_target(patchify(x[..., start:start + c], model.mae.patch_size).astype(jnp.float32))
    weights = mask
    if mcfg.dropped_everywhere:
      dropped = 1.0 - keep[:, start:start + c].min(axis=1)
      weights = jnp.maximum(mask, dropped[:, None])
    term = losses.weighted_masked_mse(preds[key].astype(jnp.float32), target, weights, weights)
    metrics[f"{key}_loss"] = term
    terms.append(term)
    start += c
  total = sum(terms) / len(terms)
  return (total, dict(metrics, loss=total), *visible)
