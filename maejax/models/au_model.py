"""AU detector of the occlusion-robust pipeline (DESIGN.md §1, §5):

  ViT encoder (MAE / fine-tuned) → latent→AU transform → graph (or linear) AU head,

plus an optional small per-patch occlusion predictor used to drop occluded tokens from the encoder input.

* The teacher is this model with ``transform_depth = 0``: encoder tokens go (pooled) straight to the head.
* The student sees the occluded face; the transform (``transform_depth`` transformer blocks on the visible
  tokens) maps MAE latents to the features the head expects.
* Token dropping passes ``ids_keep: (B, K)`` to the encoder exactly like MAE masking; the transform scatters
  the K visible tokens back onto the patch grid and average-pools them over ``head_pool × head_pool`` cells
  (cells with no visible token get a learned ``missing`` embedding). Pooling keeps the MEFL head affordable:
  its edge attention costs ``N² · T²`` and 65 tokens would be 16× the 17 tokens of a 4×4 grid + cls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from maejax.models.au_graph import AUHeadOutput, GraphAUHead, LinearAUHead
from maejax.models.vit import Block as VitBlock
from maejax.models.vit import ViT, _p, layer_norm, patchify

Array = jax.Array


@flax.struct.dataclass
class AUModelOutput:
  """``head``: the head's :class:`AUHeadOutput` (probs ``(B, N)``, node feats ``(B, N, C)``, edges
  ``(B, N², C)``…); ``occ_logits``: ``(B, L)`` per-patch occlusion logits of the predictor, or None;
  ``tokens``: ``(B, L, D)`` the transform's patch tokens on the patch grid before pooling (the teacher's, with
  ``transform_depth = 0``: its encoder tokens), zeros where a token was dropped; ``token_valid``: ``(B, L)``
  1 where a token is present. Latent KD reads the last two; unused, they cost nothing under jit."""

  head: AUHeadOutput
  occ_logits: Array | None = None
  tokens: Array | None = None
  token_valid: Array | None = None


def scatter_to_grid(tokens: Array, ids_keep: Array | None, num_patches: int) -> tuple[Array, Array]:
  """Visible patch tokens ``(B, K, D)`` at positions ``ids_keep (B, K)`` → grid ``(B, L, D)`` and validity
  ``(B, L)`` (1 where a token is present). ``ids_keep=None`` means all L tokens in order."""
  b, k, d = tokens.shape
  if ids_keep is None:
    return tokens, jnp.ones((b, k), tokens.dtype)
  rows = jnp.arange(b)[:, None]
  grid = jnp.zeros((b, num_patches, d), tokens.dtype).at[rows, ids_keep].set(tokens)
  valid = jnp.zeros((b, num_patches), tokens.dtype).at[rows, ids_keep].set(1.0)
  return grid, valid


def masked_pool(grid: Array, valid: Array, pool: int) -> tuple[Array, Array]:
  """Average of the valid tokens in each ``pool × pool`` cell of a square grid.

  ``grid: (B, L, D)``, ``valid: (B, L)`` → pooled ``(B, L/pool², D)`` and token counts ``(B, L/pool²)``.
  """
  b, l, d = grid.shape
  g = int(round(l**0.5))
  if g * g != l or g % pool:
    raise ValueError(f"head_pool {pool} must divide the patch grid side {g} (L = {l})")
  s = g // pool
  x = (grid * valid[..., None]).reshape(b, s, pool, s, pool, d).sum((2, 4)).reshape(b, s * s, d)
  n = valid.reshape(b, s, pool, s, pool).sum((2, 4)).reshape(b, s * s)
  return x / jnp.maximum(n, 1.0)[..., None], n


class LatentTransform(nn.Module):
  """Learned latent→AU transform: ``depth`` pre-norm transformer blocks on the visible tokens (+ LN), then
  scatter to the grid and masked average pooling. ``(B, 1+K, D)`` → ``(B, 1 + (g/pool)², D)``."""

  num_patches: int
  depth: int = 0
  num_heads: int = 4
  pool: int = 2
  attention: str = "einsum"  # see :func:`maejax.models.vit.attention`

  @nn.compact
  def __call__(self, tokens: Array, ids_keep: Array | None, return_grid: bool = False):
    """Pooled tokens; with ``return_grid`` also the pre-pooling grid ``(B, L, D)`` and its validity ``(B, L)``."""
    d = tokens.shape[-1]
    x = tokens
    for i in range(self.depth):
      x = VitBlock(self.num_heads, attention=self.attention, name=f"blocks_{i}")(x, True)
    if self.depth:
      x = layer_norm("norm")(x)
    grid, valid = scatter_to_grid(x[:, 1:], ids_keep, self.num_patches)
    pooled, counts = masked_pool(grid, valid, self.pool)
    missing = self.param("missing", _p(nn.initializers.normal(0.02), "embed"), (d,))
    pooled = jnp.where(counts[..., None] > 0, pooled, missing.astype(pooled.dtype))
    out = jnp.concatenate([x[:, :1], pooled], axis=1)
    return (out, grid, valid) if return_grid else out


class OcclusionPredictor(nn.Module):
  """Per-patch occluded-fraction predictor on raw pixels: patch MLP → 3×3 conv over the patch grid →
  logit. ``images (B, H, W, 3)`` normalised → ``(B, L)`` logits (sigmoid = predicted occluded fraction)."""

  patch_size: int
  hidden: int = 32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    b, h, w, _ = images.shape
    g = h // self.patch_size
    x = patchify(images, self.patch_size)  # (B, L, p²·3)
    x = nn.gelu(nn.Dense(self.hidden, name="embed")(x))
    x = x.reshape(b, g, g, self.hidden)
    x = nn.gelu(nn.Conv(self.hidden, (3, 3), padding="SAME", name="context")(x))
    return nn.Dense(1, name="out")(x).reshape(b, g * g)


class AUModel(nn.Module):
  """``model(images (B, H, W, 3) normalised, ids_keep (B, K) | None, train) -> AUModelOutput``.

  Submodules: ``encoder`` (:class:`ViT`, same parameter tree as ``MAE.encoder``), ``transform``
  (:class:`LatentTransform`), ``head`` (graph or linear), ``occ_predictor`` (when ``occlusion_predictor``).
  ``freeze_encoder`` stops gradients at the encoder output, so no encoder backward pass is computed.
  """

  img_size: int = 64
  patch_size: int = 8
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_aus: int = 12
  channels: int = 64
  top_k: int = 4
  stage: int = 2
  head: str = "graph"
  transform_depth: int = 0
  head_pool: int = 2
  occlusion_predictor: bool = False
  freeze_encoder: bool = False
  dtype: Any = jnp.float32
  attention: str = "einsum"  # see :func:`maejax.models.vit.attention`

  @property
  def num_patches(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  def setup(self):
    if self.head not in ("graph", "linear"):
      raise ValueError(f"model.head must be 'graph' or 'linear', got {self.head!r}")
    self.encoder = ViT(self.img_size, self.patch_size, 3, self.width, self.depth, self.num_heads,
                       self.mlp_ratio, 0.0, self.dtype, attention=self.attention)
    self.transform = LatentTransform(self.num_patches, self.transform_depth, self.num_heads, self.head_pool,
                                     attention=self.attention)
    if self.head == "graph":
      self.au_head = GraphAUHead(self.num_aus, self.channels, self.top_k, self.stage, self.dtype)
    else:
      self.au_head = LinearAUHead(self.num_aus, self.channels, self.top_k, self.dtype)
    if self.occlusion_predictor:
      self.occ_predictor = OcclusionPredictor(self.patch_size)

  def predict_occlusion(self, images: Array) -> Array:
    """Per-patch occlusion logits ``(B, L)``."""
    return self.occ_predictor(images)

  def __call__(self, images: Array, ids_keep: Array | None = None, *, train: bool = False,
               occ_images: Array | None = None) -> AUModelOutput:
    tokens = self.encoder(images, ids_keep, train=train).tokens  # (B, 1+K, D)
    if self.freeze_encoder:
      tokens = jax.lax.stop_gradient(tokens)
    pooled, grid, valid = self.transform(tokens, ids_keep, return_grid=True)
    head = self.au_head(pooled, train)
    occ = None
    if self.occlusion_predictor:
      # The predictor learns from its own loss only; it never changes the encoder input's gradient.
      occ = self.occ_predictor(jax.lax.stop_gradient(images if occ_images is None else occ_images))
    return AUModelOutput(head=head, occ_logits=occ, tokens=grid, token_valid=valid)


def keep_least_occluded(frac: Array, keep: int, rng: Array | None = None) -> Array:
  """``ids_keep (B, keep)`` of the ``keep`` least-occluded patches of ``frac (B, L)``; ties are broken at
  random with ``rng`` (else by index). Kept ids are returned in patch order."""
  score = frac.astype(jnp.float32)
  if rng is not None:
    score = score + 1e-3 * jax.random.uniform(rng, frac.shape)
  ids = jnp.argsort(score, axis=1)[:, :keep]
  return jnp.sort(ids, axis=1)


@dataclasses.dataclass(frozen=True)
class AUModelConfig:
  """The AU model's hyper-parameters: what a checkpoint saves as its ``config`` item and what
  :meth:`build` turns into an :class:`AUModel`. ``config.model`` of the AU configs fills the encoder and head
  fields (:meth:`from_config`); the stage (teacher / student) fills the rest."""

  img_size: int = 64  # input side in pixels
  patch_size: int = 8
  width: int = 128  # encoder width D
  depth: int = 4  # encoder blocks
  num_heads: int = 4
  mlp_ratio: float = 4.0
  num_aus: int = 12  # N, outputs of the head
  channels: int = 64  # C of node / edge features (512 in ME-GraphAU)
  top_k: int = 4  # FGG top-K neighbours (4 BP4D, 3 DISFA)
  stage: int = 2  # 1: AFG + FGG (ME-GraphAU stage 1); 2: + MEFL edges and gated GCN
  head: str = "graph"  # "graph" | "linear" (ablation without the graph)
  transform_depth: int = 0  # transformer blocks of the latent→AU transform (0 = the teacher)
  head_pool: int = 2  # average-pool the patch grid by this factor before the head
  occlusion_predictor: bool = False  # per-patch occlusion predictor for token dropping
  freeze_encoder: bool = False  # stop gradients at the encoder output
  attention: str = "einsum"  # attention implementation (:func:`maejax.models.vit.attention`): not the math

  @classmethod
  def fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, model_cfg, **overrides) -> AUModelConfig:
    """From ``config.model`` (a ConfigDict or mapping; ``size`` "B"/"L"/"H" fills width/depth/heads, None
    entries keep the defaults, keys of other stages' models are ignored) and ``overrides``."""
    from maejax.models.vit import vit_size
    out = {k: model_cfg[k] for k in cls.fields() if k in model_cfg and model_cfg[k] is not None}
    if model_cfg.get("size"):
      out = {**vit_size(model_cfg["size"]), **out}
    return cls.from_json({**out, **overrides})

  @classmethod
  def from_json(cls, saved) -> AUModelConfig:
    """From a saved config (strict: an unknown key is an error naming it)."""
    unknown = sorted(set(saved) - set(cls.fields()))
    if unknown:
      raise ValueError(f"unknown AU model config keys {unknown}; expected a subset of {list(cls.fields())}")
    return cls(**{k: v for k, v in saved.items() if v is not None})

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> AUModelConfig:
    return dataclasses.replace(self, **changes)

  def build(self) -> AUModel:
    return AUModel(**self.to_json())
