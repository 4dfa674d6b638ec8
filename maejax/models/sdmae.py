"""SD-MAE (Luo & Chen 2022, arXiv 2203.16983): MAE plus DINO-style self-distillation on the visible patches
(SEED_METHODS.md §3, from irsLu/SD-MAE; its attribution to the authors is probable, not stated).

The decoder attends over all tokens (it is the teacher), the encoder over the visible ones only (the student):

* student vector ``s = mean_K g_e(z_vis)``: the encoder's final-normed visible tokens through a projection head;
* teacher vector ``t = mean_K g_d(h_vis)``: the decoder's final-normed tokens at the visible positions through a
  second head; both heads are :class:`DINOHead` (MLP → L2-normalise → weight-normed linear, ``g ≡ 1``);
* ``L_SD = mean_b[−Σ_k softmax((t_b − c)/τ_t)_k log softmax(s_b/τ_s)_k]`` (``losses.dino_ce``), centre
  ``c ← m·c + (1 − m)·mean_b softmax((t_b − c)/τ_t)`` (the code's probability centre; ``"dino"``: logits);
* pixel loss on the masked patches against ``(x − μ)/(σ + 1e-6)`` per patch and channel (``pixel_norm="sdmae"``)
  or MAE's norm-pix (``"mae"``);
* ``L = p·L_SD + (1 − p)·L_pix``, ``p = 0.2``, ``τ_s = 0.1``, ``τ_t = 0.04``, ``m = 0.9`` — from the code's
  defaults; the paper's text could not be re-read to confirm them (SEED_METHODS.md tags them [code]).

The code does not detach the teacher distribution (gradients of ``L_SD`` reach the decoder): ``stop_grad=False``;
maejax defaults to DINO's ``stop_grad=True``. maejax's encoder has a cls token (SD-MAE's has none): only the patch
tokens enter the heads. The centre lives in the ``sd_center`` collection (``TrainState.extra``).
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
from maejax.models.vit import _p, gather_tokens, gelu, patchify, unpatchify, xavier_uniform

Array = jax.Array
PIXEL_NORMS = ("sdmae", "mae")


@dataclasses.dataclass(frozen=True)
class SDMAEConfig:
  """``config.sdmae``: SD-MAE's settings (defaults = its code's; ``out_dim`` / ``hidden`` / ``bottleneck`` are
  sized down by the tiny configs)."""

  p: float = 0.2  # weight of the self-distillation term; 1 − p on the pixel term
  out_dim: int = 4096  # prototypes K of the DINO heads
  hidden: int = 2048  # head MLP width
  bottleneck: int = 256  # head bottleneck before the weight-normed layer
  tau_s: float = 0.1  # student (encoder) temperature
  tau_t: float = 0.04  # teacher (decoder) temperature
  center_momentum: float = 0.9
  center_mode: str = "sdmae"  # "sdmae": EMA of teacher probabilities (the code); "dino": of teacher logits
  stop_grad: bool = True  # detach the teacher distribution (DINO); False = SD-MAE's code
  pixel_norm: str = "sdmae"  # "sdmae": per patch+channel (x−μ)/(σ_unbiased+1e-6); "mae": norm-pix

  def __post_init__(self):
    if self.center_mode not in losses.CENTER_MODES:
      raise ValueError(f"sdmae.center_mode={self.center_mode!r}: expected one of {losses.CENTER_MODES}")
    if self.pixel_norm not in PIXEL_NORMS:
      raise ValueError(f"sdmae.pixel_norm={self.pixel_norm!r}: expected one of {PIXEL_NORMS}")
    if not 0.0 <= self.p <= 1.0:
      raise ValueError(f"sdmae.p={self.p}: expected a weight in [0, 1]")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> SDMAEConfig:
    return _from_section(cls, cfg, "sdmae")


class DINOHead(nn.Module):
  """``x → Linear-GELU-Linear-GELU-Linear(bottleneck) → x/‖x‖ → x·(V/‖V‖_col)``: 3-layer MLP, L2-normalisation,
  a weight-normed linear layer without bias whose gain is fixed to 1 (each output unit's weight vector has unit
  norm). ``(..., C)`` → ``(..., out_dim)``."""

  out_dim: int
  hidden: int
  bottleneck: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda n, name: nn.Dense(n, name=name, kernel_init=_p(xavier_uniform, None, None),
                                     bias_init=_p(nn.initializers.zeros, None))
    x = gelu(dense(self.hidden, "fc1")(x))
    x = gelu(dense(self.hidden, "fc2")(x))
    x = losses.l2_normalize(dense(self.bottleneck, "fc3")(x))
    v = self.param("last_v", _p(xavier_uniform, None, None), (self.bottleneck, self.out_dim))
    return x @ weight_norm(v)


def weight_norm(v: Array) -> Array:
  """``V / ‖V‖`` per output column (torch ``weight_norm(Linear, dim=0)`` with ``g = 1``): kernel ``(in, out)``."""
  return v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))


class SDMAE(nn.Module):
  """Parameters: ``encoder``, ``decoder`` (the MAE's), ``encoder_head`` (g_e), ``decoder_head`` (g_d);
  collection ``sd_center``: the centre ``c: (out_dim,)``."""

  mae: MAEConfig
  sd: SDMAEConfig = SDMAEConfig()

  def setup(self):
    self.encoder = self.mae.build_encoder()
    self.decoder = self.mae.build_decoder(return_hidden=True)
    head = dict(out_dim=self.sd.out_dim, hidden=self.sd.hidden, bottleneck=self.sd.bottleneck)
    self.encoder_head = DINOHead(**head)
    self.decoder_head = DINOHead(**head)
    self.center = self.variable("sd_center", "center", _p(nn.initializers.zeros, None), None, (self.sd.out_dim,))

  @property
  def num_patches(self) -> int:
    return (self.mae.img_size // self.mae.patch_size) ** 2

  def __call__(self, images: Array, noise: Array | None = None, *, train: bool = False,
               return_blocks: Sequence[int] = ()):
    """``(pixels (B, L, p²·C), mask (B, L), s (B, out_dim), t (B, out_dim))``; with ``return_blocks`` (encoder
    block indices) the pass's :class:`VisibleBlocks` follows them (DMAE reads it)."""
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], self.num_patches))
    ids_keep, mask, ids_restore = random_masking(noise, self.mae.mask_ratio)
    enc = self.encoder(images, ids_keep, train=train, return_blocks=return_blocks)
    pixels, hidden = self.decoder(enc.tokens, ids_restore)
    s = self.encoder_head(enc.tokens[:, 1:]).mean(1)
    t = self.decoder_head(gather_tokens(hidden, ids_keep)).mean(1)
    out = (pixels, mask, s, t)
    return (*out, VisibleBlocks(enc.blocks, ids_keep, mask, ids_restore)) if return_blocks else out

  def reconstruct(self, pixels: Array, images: Array) -> Array:
    """The decoder's ``pixels: (B, L, p²·C)`` (first output of the pass on ``images``) as images ``(B, H, W, C)``,
    de-normalised with the per-patch statistics of ``images`` as its ``pixel_norm`` target defines them."""
    mc = self.mae
    x = pixel_target_inverse(pixels, patchify(images, mc.patch_size), mc.in_chans, self.sd.pixel_norm)
    return unpatchify(x, mc.patch_size, mc.in_chans)


def sdmae_loss(model: SDMAE, params: Any, center: Array, images: Array, rngs: Mapping[str, Array] | None, *,
               noise: Array | None = None, train: bool = True, return_blocks: Sequence[int] = ()
               ) -> tuple[Array, tuple[dict, Array]] | tuple[Array, tuple[dict, Array], VisibleBlocks]:
  """``p·L_SD + (1 − p)·L_pix``; returns the loss, its metrics and the updated centre, and with
  ``return_blocks`` a third item: the pass's :class:`VisibleBlocks`."""
  sd, mc = model.sd, model.mae
  pixels, mask, s, t, *visible = model.apply({"params": params, "sd_center": {"center": center}}, images, noise,
                                             train=train, rngs=rngs, return_blocks=return_blocks)
  patches = patchify(images, mc.patch_size).astype(jnp.float32)
  target = (losses.sdmae_pixel_target(patches, mc.in_chans) if sd.pixel_norm == "sdmae"
            else losses.norm_pix_target(patches))
  pixel = losses.weighted_masked_mse(pixels.astype(jnp.float32), target, mask)
  sd_loss = losses.dino_ce(s, t, center, sd.tau_s, sd.tau_t, sd.stop_grad)
  total = losses.sdmae_total_loss(pixel, sd_loss, sd.p)
  new_center = losses.center_update(center, t, sd.tau_t, sd.center_momentum, sd.center_mode)
  return (total, ({"loss": total, "pixel_loss": pixel, "sd_loss": sd_loss}, new_center), *visible)
