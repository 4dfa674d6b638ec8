"""SdAE (Chen et al., ECCV 2022): a student MAE whose decoder predicts an EMA teacher's features of multi-fold
masked views (SEED_METHODS.md §2, from AbrahamYabo/SdAE).

* student: MAE encoder on the visible ``K`` tokens, MAE decoder whose head outputs ``D`` (encoder width)
  features per patch: ``ŷ: (B, L, D)``;
* teacher ``f_ξ``: the EMA of the student ENCODER, fed only the masked patches, split into ``k`` disjoint folds:
  with ``S`` masked patches (in the random order of the shuffle), ``S' = S − (S mod k)``, fold ``j`` = masked ids
  ``j·S'/k … (j+1)·S'/k − 1``; each fold (patch embedding + position embedding, cls prepended) runs through all
  blocks and the final LN: ``t: (B·k, S'/k, D)``. With 75 % masking and ``k = 3`` each fold is as large as the
  visible set (the paper's balanced views);
* target ``t̃ = (t − mean_D t) / sqrt(var_D t + 1e-6)`` (unbiased variance, ``losses.sdae_target``);
* loss ``1 − mean cos(t̃, ŷ_F)`` with ``ŷ_F`` the student predictions at the same ids (``losses.sdae_cosine_loss``:
  over features by default, ``cos_axis="token"`` for the official code's axis). No pixel loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maejax import losses
from maejax.models.bootmae import _from_section
from maejax.models.dmae import VisibleBlocks
from maejax.models.mae import MAEConfig, random_masking
from maejax.models.vit import gather_tokens

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SdAEConfig:
  """``config.sdae``: SdAE's settings (defaults = the official ViT-B recipe)."""

  k_folds: int = 3  # teacher views of the masked patches (ncrop_loss)
  cos_axis: str = "feature"  # "feature": per-token cosine; "token": the official code's F.cosine_similarity dim=1
  drop_path: float = 0.25  # student encoder stochastic depth

  def __post_init__(self):
    if self.cos_axis not in losses.COS_AXES:
      raise ValueError(f"sdae.cos_axis={self.cos_axis!r}: expected one of {losses.COS_AXES}")
    if self.k_folds < 1:
      raise ValueError(f"sdae.k_folds={self.k_folds}: expected ≥ 1")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> SdAEConfig:
    return _from_section(cls, cfg, "sdae")


def fold_ids(ids_restore: Array, keep: int, k: int) -> Array:
  """The masked patch ids split into ``k`` disjoint folds: ``(B, k, S'/k)``, ``S' = S − (S mod k)``,
  ``S = L − keep``; the masked ids in the shuffle's (random) order, the last ``S mod k`` left out."""
  ids_shuffle = jnp.argsort(ids_restore, axis=1)  # inverse permutation: ids_restore = argsort(ids_shuffle)
  masked = ids_shuffle[:, keep:]
  s = masked.shape[1] - masked.shape[1] % k
  if s == 0:
    raise ValueError(f"{masked.shape[1]} masked patches cannot fill {k} folds")
  return masked[:, :s].reshape(masked.shape[0], k, s // k)


class SdAE(nn.Module):
  """Parameters: ``encoder`` (an MAE :class:`ViT`) and ``decoder`` (an MAE decoder predicting ``D`` features)."""

  mae: MAEConfig
  sd: SdAEConfig = SdAEConfig()

  def setup(self):
    self.encoder = self.mae.build_encoder(drop_path=self.sd.drop_path)
    self.decoder = self.mae.build_decoder(patch_dim=self.mae.width)

  @property
  def num_patches(self) -> int:
    return (self.mae.img_size // self.mae.patch_size) ** 2

  def __call__(self, images: Array, noise: Array | None = None, *, train: bool = False,
               return_blocks: Sequence[int] = ()):
    """Student: ``(pred (B, L, D), mask (B, L), ids_keep (B, K), ids_restore (B, L))``; with ``return_blocks``
    (encoder block indices) the pass's :class:`VisibleBlocks` follows them (DMAE reads it)."""
    if noise is None:
      noise = jax.random.uniform(self.make_rng("masking"), (images.shape[0], self.num_patches))
    ids_keep, mask, ids_restore = random_masking(noise, self.mae.mask_ratio)
    enc = self.encoder(images, ids_keep, train=train, return_blocks=return_blocks)
    out = (self.decoder(enc.tokens, ids_restore), mask, ids_keep, ids_restore)
    return (*out, VisibleBlocks(enc.blocks, ids_keep, mask, ids_restore)) if return_blocks else out

  def teacher(self, images: Array, folds: Array) -> Array:
    """Teacher on the folds (apply with the EMA encoder): ``folds: (B, k, n)`` → ``(B·k, n, D)``, final-normed,
    cls dropped. A fold is encoded exactly as the encoder encodes a visible set ``ids_keep = fold``."""
    b, k, n = folds.shape
    x = gather_tokens(self.encoder.embed_patches(images), folds.reshape(b, k * n))
    x = x.reshape(b * k, n, x.shape[-1])
    return self.encoder(None, patch_tokens=x).tokens[:, 1:]


def sdae_loss(model: SdAE, params: Any, ema_encoder: Any, images: Array, rngs: Mapping[str, Array] | None, *,
              noise: Array | None = None, train: bool = True,
              return_blocks: Sequence[int] = ()) -> tuple[Array, dict] | tuple[Array, dict, VisibleBlocks]:
  """``1 − cos(t̃, ŷ)`` over the teacher's folds of the masked patches; ``ema_encoder``: momentum encoder params.
  With ``return_blocks`` a third item: the pass's :class:`VisibleBlocks`."""
  pred, mask, ids_keep, ids_restore, *visible = model.apply({"params": params}, images, noise, train=train,
                                                            rngs=rngs, return_blocks=return_blocks)
  folds = fold_ids(ids_restore, ids_keep.shape[1], model.sd.k_folds)
  t = model.apply({"params": {"encoder": jax.lax.stop_gradient(ema_encoder)}}, images, folds, method=SdAE.teacher)
  b, k, n = folds.shape
  student = gather_tokens(pred, folds.reshape(b, k * n)).reshape(b * k, n, -1)
  loss = losses.sdae_cosine_loss(student, losses.sdae_target(t), model.sd.cos_axis)
  return (loss, {"loss": loss, "masked_fraction": mask.mean()}, *visible)
