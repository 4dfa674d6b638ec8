"""Vision Transformer encoder as used by MAE (He et al. 2022), in flax.linen.

Facts matched (DESIGN.md §2): conv patch embedding initialised xavier-uniform as a Linear of fan_in C·p²;
fixed 2-D sin-cos position embedding (float64, zeros row for cls); pre-norm blocks with LayerNorm eps 1e-6,
exact (erf) GELU, qkv bias; the qkv projection is stored per head, ``(D, H, Dh)``, but initialised with the
bounds of the official fused ``Linear(D, 3D)``.

The encoder can
  (a) run on a subset of patch tokens given ``ids_keep`` (MAE masking),
  (b) return the outputs of chosen intermediate blocks (before the final norm), and
  (c) stop after block ``k`` so that a distillation teacher runs only as far as it is needed.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``patch``) so that the
training system can shard by rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# name -> (width, depth, heads). mlp ratio is 4 for all of them.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "mu": (64, 2, 2),  # CPU tests and the tiny default configs
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}


def vit_size(name: str) -> dict[str, int]:
  """``{"width", "depth", "num_heads"}`` for a named ViT size (``Ti``, ``S``, ``B``, ``L``, ``H``, ``mu``)."""
  if name not in VIT_SIZES:
    raise ValueError(f"unknown ViT size {name!r}; expected one of {sorted(VIT_SIZES)}")
  width, depth, heads = VIT_SIZES[name]
  return {"width": width, "depth": depth, "num_heads": heads}


# ----------------------------------------------------------------------------------------------------------
# Position embedding and patches.


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding of the official MAE, computed in float64.

  Per token (row-major over the grid): ``[sin(w·ω), cos(w·ω), sin(h·ω), cos(h·ω)]`` with
  ``ω_k = 1 / 10000^(k / (D/4))`` for ``k < D/4``. Returns ``(1 + L, D)`` with a zeros row for cls, or
  ``(L, D)``.
  """
  if embed_dim % 4:
    raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
  quarter = embed_dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  h, w = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                     indexing="ij")
  w_out = w.reshape(-1)[:, None] * omega[None]
  h_out = h.reshape(-1)[:, None] * omega[None]
  emb = np.concatenate([np.sin(w_out), np.cos(w_out), np.sin(h_out), np.cos(h_out)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb


def patchify(images: Array, patch_size: int) -> Array:
  """``(B, H, W, C)`` → ``(B, L, p·p·C)`` in the official ``(h, w, p, q, c)`` order (channel fastest)."""
  b, hh, ww, c = images.shape
  p = patch_size
  if hh % p or ww % p:
    raise ValueError(f"image size {(hh, ww)} is not divisible by the patch size {p}")
  h, w = hh // p, ww // p
  x = images.reshape(b, h, p, w, p, c)
  x = jnp.einsum("nhpwqc->nhwpqc", x)
  return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: Array, patch_size: int, channels: int = 3) -> Array:
  """Inverse of :func:`patchify`: ``(B, L, p·p·C)`` → ``(B, H, W, C)`` for a square grid."""
  b, l, d = patches.shape
  p = patch_size
  h = int(round(l**0.5))
  if h * h != l or d != p * p * channels:
    raise ValueError(f"cannot unpatchify {patches.shape} with patch size {p} and {channels} channels")
  x = patches.reshape(b, h, h, p, p, channels)
  x = jnp.einsum("nhwpqc->nhpwqc", x)
  return x.reshape(b, h * p, h * p, channels)


# ----------------------------------------------------------------------------------------------------------
# Initialisers (official MAE: xavier-uniform everywhere, zero bias, LN 1/0, tokens N(0, .02)).

xavier_uniform = nn.initializers.xavier_uniform()


def fused_qkv_init(width: int) -> nn.initializers.Initializer:
  """Xavier-uniform with the bound of the fused ``Linear(D, 3D)``: U(±sqrt(6 / (D + 3D)))."""
  bound = float(np.sqrt(6.0 / (width + 3 * width)))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def patch_embed_init(key, shape, dtype=jnp.float32):
  """Conv kernel ``(p, p, C, D)`` initialised as xavier-uniform of a Linear with fan_in C·p², fan_out D."""
  fan_in = int(np.prod(shape[:-1]))
  bound = float(np.sqrt(6.0 / (fan_in + shape[-1])))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _p(init, *axes):
  return nn.with_logical_partitioning(init, axes)


# ----------------------------------------------------------------------------------------------------------
# Blocks.


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")


def check_attention(name: str) -> None:
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {name!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


def attention(q: Array, k: Array, v: Array, implementation: str = "einsum") -> Array:
  """``softmax(q·kᵀ / sqrt(Dh)) v`` for ``(B, T, H, Dh)`` inputs; every implementation computes this function.

  * ``"einsum"``: explicit einsums around :func:`softmax`, logits and weights in float32 (the fastest on
    XLA:CPU; runs on every backend).
  * ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (GPU/TPU).
  * ``"cudnn"``: cuDNN's fused (flash) attention through :func:`padded_attention` (GPU only). cuDNN's kernel
    takes bf16/fp16 inputs only; float32 inputs go through ``"xla"``.
  """
  if implementation == "einsum":
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    weights = softmax(logits.astype(jnp.float32)).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)
  if implementation == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
    return padded_attention(q, k, v)
  check_attention(implementation)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@jax.custom_vjp
def softmax(x: Array) -> Array:
  """``softmax(x)`` over the last axis: ``y = e / Σe`` with ``e = exp(x − max x)``.

  Same function as ``jax.nn.softmax``, with the backward pass written out, ``dx = y ⊙ (dy − Σ(dy ⊙ y))``, and
  the normalisation as a product with the reciprocal of the row sums.
  """
  e = jnp.exp(x - x.max(-1, keepdims=True))  # never differentiated: the VJP below replaces autodiff
  return e * (1.0 / e.sum(-1, keepdims=True))


def _softmax_fwd(x: Array) -> tuple[Array, Array]:
  y = softmax(x)
  return y, y


def _softmax_bwd(y: Array, dy: Array) -> tuple[Array]:
  return (y * (dy - (dy * y).sum(-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def padded_attention(q: Array, k: Array, v: Array, multiple: int = 8, implementation: str | None = "cudnn"
                     ) -> Array:
  """Attention through ``jax.nn.dot_product_attention(implementation=…)`` for any sequence length ``T``.

  cuDNN's fused (flash) attention rejects odd lengths in training, and ViT sequences are odd (cls + 14² = 197).
  q, k, v ``(B, T, H, Dh)`` are zero-padded along ``T`` to a multiple of ``multiple``; the padded keys are
  masked out through ``key_value_seq_lengths`` (so every real query attends to exactly the ``T`` real keys)
  and the padded query rows are sliced off, so they receive no gradient. Same result as :func:`attention`.
  """
  b, t = q.shape[:2]
  padded = -(-t // multiple) * multiple
  if padded != t:
    widths = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
  lengths = jnp.full((b,), t, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :t]


class Projection(nn.Module):
  """Linear map ``y = x·W + b`` whose kernel keeps a multi-axis shape ``in_shape + features`` (the per-head
  ``(D, H, Dh)`` q/k/v kernels, the ``(H, Dh, D)`` output kernel) but is applied as one 2-D matmul.

  Same result as ``nn.DenseGeneral`` with the same parameters. The 2-D form is torch's ``Linear`` and XLA's
  canonical dot, so the kernel's gradient comes out in the kernel's own layout.

  ``kernel_init`` gets the kernel's real multi-axis shape (DenseGeneral passes the flattened 2-D one), so
  initializers that name axes (``variance_scaling(in_axis=(0, 1))`` of the output kernel) see the fans they
  name.
  """

  features: tuple[int, ...]
  in_axes: int = 1  # trailing axes of x contracted with the kernel's leading axes
  kernel_init: nn.initializers.Initializer = xavier_uniform
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_axes:]
    kernel = self.param("kernel", self.kernel_init, in_shape + tuple(self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, tuple(self.features), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    lead = x.shape[:x.ndim - self.in_axes]
    y = x.reshape(lead + (-1,)) @ kernel.reshape(int(np.prod(in_shape)), -1) + bias.reshape(-1)
    return y.reshape(lead + tuple(self.features))


class Attention(nn.Module):
  """Multi-head self-attention with separate per-head q/k/v kernels ``(D, H, Dh)``."""

  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "einsum"  # implementation of softmax(q·kᵀ/√Dh)·v, see :func:`attention`

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (B, T, D)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda name: Projection(
        (self.num_heads, head_dim), dtype=self.dtype, name=name,
        kernel_init=_p(fused_qkv_init(width), "embed", "heads", "kv"),
        bias_init=_p(nn.initializers.zeros, "heads", "kv"))
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, T, H, Dh)
    out = attention(q, k, v, self.attention)
    return Projection(
        (width,), in_axes=2, dtype=self.dtype, name="out",
        kernel_init=_p(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                                       out_axis=-1), "heads", "kv", "embed"),
        bias_init=_p(nn.initializers.zeros, "embed"))(out)


def gelu(x: Array) -> Array:
  """Exact GELU, ``x·Φ(x) = ½·x·(1 + erf(x/√2))``, written as torch.nn.GELU() computes it.

  Same function as ``jax.nn.gelu(x, approximate=False)``, which uses ``erfc``; the two differ by float32
  rounding.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(0.5**0.5, x.dtype)))


class Mlp(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1", kernel_init=_p(xavier_uniform, "embed", "mlp"),
                 bias_init=_p(nn.initializers.zeros, "mlp"))(x)
    x = gelu(x)
    return nn.Dense(width, dtype=self.dtype, name="fc2", kernel_init=_p(xavier_uniform, "mlp", "embed"),
                    bias_init=_p(nn.initializers.zeros, "embed"))(x)


def layer_norm(name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name,
                      scale_init=_p(nn.initializers.ones, "embed"),
                      bias_init=_p(nn.initializers.zeros, "embed"))


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (rng stream ``dropout``)."""

  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))``."""

  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  attention: str = "einsum"  # see :func:`attention`

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    width = x.shape[-1]
    y = Attention(self.num_heads, dtype=self.dtype, attention=self.attention, name="attn")(
        layer_norm("norm1", self.dtype)(x))
    x = x + DropPath(self.drop_path, name="drop_path1")(y, deterministic)
    y = Mlp(int(width * self.mlp_ratio), dtype=self.dtype, name="mlp")(layer_norm("norm2", self.dtype)(x))
    return x + DropPath(self.drop_path, name="drop_path2")(y, deterministic)


def gather_tokens(x: Array, ids: Array) -> Array:
  """``x: (B, L, D)``, ``ids: (B, K)`` → ``(B, K, D)``."""
  return jnp.take_along_axis(x, ids[:, :, None].astype(jnp.int32), axis=1)


@dataclasses.dataclass(frozen=True)
class EncoderOutput:
  """``tokens``: final-normed ``(B, 1+K, D)`` (None when stopped early); ``blocks``: block index → output."""

  tokens: Array | None
  blocks: dict[int, Array]


jax.tree_util.register_dataclass(EncoderOutput, data_fields=["tokens", "blocks"], meta_fields=[])


class ViT(nn.Module):
  """MAE ViT encoder. Images ``(B, H, W, C)`` in, tokens ``(B, 1 + K, D)`` (cls first) out."""

  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention: str = "einsum"  # see :func:`attention`

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def check_images(self, images: Array) -> None:
    expected = (self.img_size, self.img_size, self.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) "
                       f"(batch, height, width, channels), got {tuple(images.shape)}")

  def setup(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
    p = self.patch_size
    self.patch_embed = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                               kernel_init=_p(patch_embed_init, None, None, "patch", "embed"),
                               bias_init=_p(nn.initializers.zeros, "embed"))
    self.cls_token = self.param("cls_token", _p(nn.initializers.normal(0.02), None, None, "embed"),
                                (1, 1, self.width))
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    dpr = np.linspace(0, self.drop_path, self.depth)  # stochastic depth rule of the official code
    self.blocks = [block_cls(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_path=float(dpr[i]),
                             dtype=self.dtype, attention=self.attention) for i in range(self.depth)]
    self.norm = layer_norm(None, self.dtype)

  def embed_patches(self, images: Array) -> Array:
    """Patch embedding + fixed position embedding: ``(B, H, W, C)`` → ``(B, L, D)``."""
    self.check_images(images)
    x = self.patch_embed(images.astype(self.dtype))
    x = x.reshape(x.shape[0], -1, self.width)
    pos = sincos_pos_embed_2d(self.width, self.grid_size, cls_token=False)
    return x + jnp.asarray(pos, x.dtype)[None]

  def __call__(self, images: Array | None, ids_keep: Array | None = None, *, train: bool = False,
               return_blocks: Sequence[int] = (), stop_after: int | None = None,
               patch_tokens: Array | None = None) -> EncoderOutput:
    """Encodes ``images`` (or pre-embedded ``patch_tokens: (B, L, D)``), keeping only ``ids_keep: (B, K)``.

    ``return_blocks`` lists 0-based block indices whose outputs (before the final norm) are returned;
    ``stop_after=k`` runs blocks ``0..k`` only and skips the final norm (``tokens`` is then None).
    """
    x = self.embed_patches(images) if patch_tokens is None else patch_tokens
    if ids_keep is not None:
      x = gather_tokens(x, ids_keep)  # position embedding was added before masking
    # The cls row of the sin-cos table is zeros, so cls + pos_embed[0] == cls.
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)

    last = self.depth - 1 if stop_after is None else stop_after
    wanted = set(return_blocks)
    if not 0 <= last < self.depth or any(not 0 <= i <= last for i in wanted):
      raise ValueError(f"blocks {sorted(wanted)} / stop_after={stop_after} are outside 0..{last} "
                       f"(depth {self.depth})")
    blocks = {}
    for i in range(last + 1):
      x = self.blocks[i](x, not train)
      if i in wanted:
        blocks[i] = x
    tokens = self.norm(x) if stop_after is None else None
    return EncoderOutput(tokens=tokens, blocks=blocks)
