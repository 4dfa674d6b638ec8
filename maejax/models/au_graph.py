"""Graph AU detection head of ME-GraphAU (Luo et al., IJCAI 2022), in flax.linen.

Facts matched (DESIGN.md §4; reference CVI-SZU/ME-GraphAU, ``model/ANFL.py``, ``model/MEFL.py``,
``model/graph_edge_model.py``, ``model/basic_block.py``):

* ``global_linear``: backbone tokens ``(B, T, C_in)`` → Linear + BN + ReLU → ``X_face: (B, T, C)``; the BN is
  per channel (``BatchNorm1d(C)`` on ``(B, C, T)``), statistics over batch and tokens.
* AFG: one Linear + BN + ReLU per AU on every token → ``U: (B, N, T, C)`` (the N blocks are one batched kernel
  ``(N, C, C)``, each AU with its own BN); node feature ``v_i = mean_t U_i``.
* FGG (stage 1): ``S = v̂ v̂ᵀ`` with ``v̂`` the DETACHED node features, ``A`` = top-K per row, normalised
  ``D^-1/2 A D^-1/2`` (D = row sums), one GCN layer ``x ← ReLU(x + BN(Â·V(x) + U(x)))``; BN over the node axis
  (``BatchNorm1d(N)`` on ``(B, N, C)``: statistics per node over batch and channels).
* MEFL (stage 2): GEM builds N² edge features from cross attention (FAM, ARM), then two gated GCN layers
  update nodes and edges (bias-free linears, per-edge / per-node BN). The top-K graph is not used by stage 2.
* Classifier: ``p_i = cos(ReLU(s_i), v_i)`` with learnable class vectors ``s_i``; since ``v_i ≥ 0`` (after
  ReLU) ``p_i ∈ [0, 1]``; threshold 0.5, no sigmoid. Edge classifier ``Linear(C, 4)`` on every edge.

Edge ordering (``create_e_matrix`` of the reference): edge index ``e = i·N + j`` is the ordered pair
``(i, j)``; its feature is ``ARM_ij = CrossAttn(query = FAM_j, key/value = FAM_i)`` and its relation label is
``2·y_i + y_j`` (``tool/BP4D_deal_AU_relation.py``). In the gated GCN the gate of edge ``(i, j)`` is
normalised by a softmax over ``j`` and node ``i`` aggregates ``V x_j`` over ``j``.

Initialisation follows the reference: Linear weights ``N(0, 2/fan_out)`` (``LinearBlock``, CrossAttn q/k/v
with their own fan-out), GCN weights ``N(0, 2/C)``, BN 1/0, class vectors and edge classifier xavier-uniform.
Deviations: biases start at zero (torch draws them uniformly; those followed by a BN cancel anyway); flax's
BN keeps the biased batch variance in its running average (torch: unbiased); top-K breaks ties by index so
every row has exactly K neighbours (the reference's ``>= threshold`` keeps all ties).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from maejax.models.vit import _p

Array = jax.Array
Dtype = Any

# torch BatchNorm defaults: momentum 0.1 (flax counts the other way), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

xavier_uniform = nn.initializers.xavier_uniform()


def he_normal_out(fan_out: int) -> nn.initializers.Initializer:
  """``N(0, 2 / fan_out)``: the reference's ``weight.data.normal_(0, sqrt(2 / fan_out))``."""
  return nn.initializers.normal(math.sqrt(2.0 / fan_out))


# ----------------------------------------------------------------------------------------------------------
# Output.


@flax.struct.dataclass
class AUHeadOutput:
  """What an AU head returns (a frozen dataclass registered as a pytree).

  Attributes:
    probs: ``(B, N)`` AU occurrence probabilities in ``[0, 1]`` (cosine of non-negative vectors; threshold
      0.5).
    node_feats: ``(B, N, C)`` final node features (input of the classifier; node-level KD target).
    adjacency: ``(B, N, N)`` 0/1 top-K graph of the detached AFG node-feature similarity, exactly K ones per
      row. Stage 1 aggregates over it; stage 2 and the linear head only report it (for plotting).
    edge_feats: ``(B, N·N, C)`` final edge features, edge ``i·N + j`` = ordered pair ``(i, j)``; ``None`` for
      stage 1 and the linear head.
    edge_logits: ``(B, N·N, 4)`` relation logits for the label ``2·y_i + y_j``; ``None`` where edge_feats is.
  """

  probs: Array
  node_feats: Array
  adjacency: Array
  edge_feats: Array | None = None
  edge_logits: Array | None = None


# ----------------------------------------------------------------------------------------------------------
# Graph helpers (pure functions, one equation each).


def node_similarity(node_feats: Array) -> Array:
  """Dot-product similarity of DETACHED node features: ``(B, N, C)`` → ``(B, N, N)`` (float32)."""
  v = jax.lax.stop_gradient(node_feats).astype(jnp.float32)
  return jnp.einsum("bic,bjc->bij", v, v)


def topk_adjacency(similarity: Array, k: int) -> Array:
  """0/1 adjacency with the ``k`` largest entries of each row set to 1 (ties broken by lower index).

  ``similarity: (B, N, N)`` → ``(B, N, N)`` float32 with exactly ``k`` ones per row.
  """
  n = similarity.shape[-1]
  if not 1 <= k <= n:
    raise ValueError(f"top_k must be in [1, num_aus={n}], got {k}")
  _, idx = jax.lax.top_k(similarity, k)  # (B, N, k)
  return jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.float32), axis=-2)


def normalize_digraph(adjacency: Array) -> Array:
  """``D^-1/2 A D^-1/2`` with ``D`` the row sums (out-degrees) of ``A: (B, N, N)``, as the reference."""
  deg = jnp.sum(jax.lax.stop_gradient(adjacency), axis=-1)  # (B, N)
  d = jnp.where(deg > 0, deg, 1.0) ** -0.5
  return d[:, :, None] * adjacency * d[:, None, :]


def cosine_probs(node_feats: Array, class_vectors: Array, eps: float = 1e-12) -> Array:
  """``p_i = <v_i/|v_i|, ReLU(s_i)/|ReLU(s_i)|>``: ``(B, N, C)``, ``(N, C)`` → ``(B, N)``.

  Normalisation is ``x / max(|x|, eps)`` (torch ``F.normalize``), so an all-zero vector gives 0.
  """
  def unit(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)

  s = unit(jax.nn.relu(class_vectors.astype(jnp.float32)))
  v = unit(node_feats.astype(jnp.float32))
  return jnp.einsum("bnc,nc->bn", v, s)


# ----------------------------------------------------------------------------------------------------------
# Blocks.


def _bn(train: bool, axis, axes: tuple, dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, axis=axis, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                      dtype=dtype, name=name, scale_init=_p(nn.initializers.ones, *axes),
                      bias_init=_p(nn.initializers.zeros, *axes))


class LinearBlock(nn.Module):
  """Linear + BN (per output channel, stats over all other axes) + ReLU: ``(..., C_in)`` → ``(..., C)``."""

  features: int
  in_axis: str = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = nn.Dense(self.features, dtype=self.dtype, name="fc",
                 kernel_init=_p(he_normal_out(self.features), self.in_axis, "au_channels"),
                 bias_init=_p(nn.initializers.zeros, "au_channels"))(x)
    return nn.relu(_bn(train, -1, ("au_channels",), self.dtype, "bn")(x))


class AUFeatureGenerator(nn.Module):
  """AFG: one LinearBlock per AU on every token, batched: ``(B, T, C)`` → ``U: (B, N, T, C)``."""

  num_aus: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    c = x.shape[-1]
    kernel = self.param("kernel", _p(he_normal_out(c), "au_nodes", "au_channels_in", "au_channels"),
                        (self.num_aus, c, c))
    bias = self.param("bias", _p(nn.initializers.zeros, "au_nodes", "au_channels"), (self.num_aus, c))
    u = jnp.einsum("btc,ncd->bntd", x.astype(self.dtype), kernel.astype(self.dtype))
    u = u + bias[None, :, None].astype(self.dtype)
    # Each AU has its own BatchNorm1d(C): per (AU, channel) statistics over batch and tokens.
    return nn.relu(_bn(train, (1, 3), ("au_nodes", "au_channels"), self.dtype, "bn")(u))


class FacialGraphGCN(nn.Module):
  """FGG GCN layer (stage 1): ``x ← ReLU(x + BN_node(Â·V(x) + U(x)))``; ``x: (B, N, C)``, ``Â: (B, N, N)``."""

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, adj_norm: Array, train: bool) -> Array:
    c = x.shape[-1]
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name,
                                  kernel_init=_p(he_normal_out(c), "au_channels_in", "au_channels"),
                                  bias_init=_p(nn.initializers.zeros, "au_channels"))
    aggregate = jnp.einsum("bij,bjc->bic", adj_norm.astype(self.dtype), dense("V")(x))
    return nn.relu(x + _bn(train, 1, ("au_nodes",), self.dtype, "bn")(aggregate + dense("U")(x)))


class CrossAttn(nn.Module):
  """``softmax(q(y)·k(x)ᵀ · (C/2)^-½) · v(x)`` with q, k: Linear C→C/2 and v: Linear C→C.

  ``y: (..., Tq, C)`` queries, ``x: (..., Tk, C)`` keys/values (leading axes broadcast) → ``(..., Tq, C)``.
  """

  dtype: Dtype = jnp.float32

  def __call__(self, y: Array, x: Array) -> Array:
    q, k, v = self.project(y, x)
    return self.attend(q, k, v)

  @nn.compact
  def project(self, y: Array, x: Array) -> tuple[Array, Array, Array]:
    """q(y), k(x), v(x); split out so that GEM can project each node once instead of once per edge."""
    c = y.shape[-1]
    if c % 2:
      raise ValueError(f"CrossAttn needs an even channel count, got {c}")
    dense = lambda features, name, axis: nn.Dense(
        features, dtype=self.dtype, name=name,
        kernel_init=_p(he_normal_out(features), "au_channels_in", axis),
        bias_init=_p(nn.initializers.zeros, axis))
    return (dense(c // 2, "q", "au_half")(y), dense(c // 2, "k", "au_half")(x),
            dense(c, "v", "au_channels")(x))

  @staticmethod
  def attend(q: Array, k: Array, v: Array) -> Array:
    scale = q.shape[-1] ** -0.5  # (C/2)^-½
    dots = jnp.einsum("...qc,...kc->...qk", q, k) * scale
    attn = jax.nn.softmax(dots.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kc->...qc", attn, v)


class GraphEdgeModel(nn.Module):
  """GEM: N² multi-dimensional edge features from AU maps ``U: (B, N, T, C)`` and ``X_face: (B, T, C)``.

  ``FAM_i = CrossAttn(U_i, X_face)``; ``ARM_ij = CrossAttn(query FAM_j, key/value FAM_i)`` for all ordered
  pairs (edge ``i·N + j``); edge = mean over tokens of ``BN_edge(Linear(ARM_ij))``, the BN per edge over
  (batch, tokens, channels) (``BatchNorm2d(N²)`` of the reference). Returns ``(B, N·N, C)``.
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, u: Array, x_face: Array, train: bool) -> Array:
    b, n, t, c = u.shape
    fam_attn = CrossAttn(self.dtype, name="FAM")
    q, k, v = fam_attn.project(u, x_face[:, None])  # (B, N, T, C/2), (B, 1, T, C/2), (B, 1, T, C)
    fam = CrossAttn.attend(q, k, v)  # (B, N, T, C)

    # Project every node's FAM once; pair (i, j) queries with FAM_j and attends over FAM_i.
    q, k, v = CrossAttn(self.dtype, name="ARM").project(fam, fam)
    dots = jnp.einsum("bjqc,bikc->bijqk", q, k) * (q.shape[-1] ** -0.5)
    attn = jax.nn.softmax(dots.astype(jnp.float32), axis=-1).astype(v.dtype)
    arm = jnp.einsum("bijqk,bikc->bijqc", attn, v).reshape(b, n * n, t, c)

    edge = nn.Dense(c, dtype=self.dtype, name="edge_proj",
                    kernel_init=_p(he_normal_out(c), "au_channels_in", "au_channels"),
                    bias_init=_p(nn.initializers.zeros, "au_channels"))(arm)
    edge = _bn(train, 1, ("au_edges",), self.dtype, "bn")(edge)
    return edge.mean(axis=2)


class GatedGCN(nn.Module):
  """One residual gated GCN layer of MEFL (bias-free linears A, B, E, U, V), nodes ``(B, N, C)``, edges
  ``(B, N·N, C)`` with edge ``i·N + j`` = pair (i, j):

    e_ij ← e_ij + ReLU(BN_edge(A x_i + B x_j + E e_ij))
    g_ij = softmax_j(sigmoid(e_ij))                 (per channel)
    x_i ← ReLU(x_i + BN_node(U x_i + (1/N) Σ_j g_ij ⊙ V x_j))
  """

  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, edge: Array, train: bool) -> tuple[Array, Array]:
    b, n, c = x.shape
    dense = lambda name: nn.Dense(c, use_bias=False, dtype=self.dtype, name=name,
                                  kernel_init=_p(he_normal_out(c), "au_channels_in", "au_channels"))
    ax, bx = dense("A")(x), dense("B")(x)
    msg = (ax[:, :, None] + bx[:, None, :]).reshape(b, n * n, c) + dense("E")(edge)
    edge = edge + nn.relu(_bn(train, 1, ("au_edges",), self.dtype, "bn_edge")(msg))

    gate = jax.nn.softmax(jax.nn.sigmoid(edge.astype(jnp.float32)).reshape(b, n, n, c), axis=2)
    vx = dense("V")(x)
    agg = jnp.einsum("bijc,bjc->bic", gate.astype(vx.dtype), vx) / n
    x = nn.relu(x + _bn(train, 1, ("au_nodes",), self.dtype, "bn_node")(dense("U")(x) + agg))
    return x, edge


class CosineClassifier(nn.Module):
  """``p_i = cos(ReLU(s_i), v_i)``, class vectors ``s: (N, C)`` (xavier-uniform); ``(B, N, C)`` → ``(B, N)``.
  """

  @nn.compact
  def __call__(self, node_feats: Array) -> Array:
    n, c = node_feats.shape[-2:]
    s = self.param("class_vectors", _p(xavier_uniform, "au_nodes", "au_channels"), (n, c))
    return cosine_probs(node_feats, s)


# ----------------------------------------------------------------------------------------------------------
# Heads.


def _check_tokens(tokens: Array) -> None:
  if tokens.ndim != 3:
    raise ValueError(f"tokens must be (B, T, C_in), got shape {tokens.shape}")


class GraphAUHead(nn.Module):
  """ME-GraphAU head: ``head(tokens: (B, T, C_in), train) -> AUHeadOutput``.

  Attributes:
    num_aus: N (12 for BP4D, 8 for DISFA).
    channels: C, the width of node and edge features (512 in the reference; needs to be even for stage 2).
    top_k: K of the FGG top-K graph (4 BP4D, 3 DISFA).
    stage: 1 = AFG + FGG (ANFL), 2 = AFG + GEM + two gated GCN layers (MEFL).
    dtype: computation dtype (params are float32; similarities, softmaxes and the classifier run in float32).
  """

  num_aus: int
  channels: int = 512
  top_k: int = 4
  stage: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, train: bool) -> AUHeadOutput:
    _check_tokens(tokens)
    if self.stage not in (1, 2):
      raise ValueError(f"stage must be 1 (AFG+FGG) or 2 (MEFL), got {self.stage}")
    if not 1 <= self.top_k <= self.num_aus:
      raise ValueError(f"top_k must be in [1, num_aus={self.num_aus}], got {self.top_k}")
    if self.stage == 2 and self.channels % 2:
      raise ValueError(f"channels must be even for stage 2 (CrossAttn uses C/2), got {self.channels}")

    x_face = LinearBlock(self.channels, dtype=self.dtype, name="global_linear")(tokens, train)  # (B, T, C)
    u = AUFeatureGenerator(self.num_aus, self.dtype, name="afg")(x_face, train)  # (B, N, T, C)
    v = u.mean(axis=2)  # (B, N, C)
    adjacency = topk_adjacency(node_similarity(v), self.top_k)

    edge_feats = edge_logits = None
    if self.stage == 1:
      v = FacialGraphGCN(self.dtype, name="fgg")(v, normalize_digraph(adjacency), train)
    else:
      edge_feats = GraphEdgeModel(self.dtype, name="gem")(u, x_face, train)
      for i in range(2):
        v, edge_feats = GatedGCN(self.dtype, name=f"gnn_{i}")(v, edge_feats, train)
      edge_logits = nn.Dense(4, dtype=self.dtype, name="edge_fc",
                             kernel_init=_p(xavier_uniform, "au_channels", None),
                             bias_init=_p(nn.initializers.zeros, None))(edge_feats).astype(jnp.float32)
    probs = CosineClassifier(name="classifier")(v)
    return AUHeadOutput(probs=probs, node_feats=v, adjacency=adjacency, edge_feats=edge_feats,
                        edge_logits=edge_logits)


class LinearAUHead(nn.Module):
  """Ablation "without the graph": global linear + AFG + cosine classifier, no FGG / MEFL.

  Same call and output structure as :class:`GraphAUHead`; ``edge_feats`` and ``edge_logits`` are ``None`` and
  ``adjacency`` is the top-K graph of the node features, reported only.
  """

  num_aus: int
  channels: int = 512
  top_k: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array, train: bool) -> AUHeadOutput:
    _check_tokens(tokens)
    x_face = LinearBlock(self.channels, dtype=self.dtype, name="global_linear")(tokens, train)
    v = AUFeatureGenerator(self.num_aus, self.dtype, name="afg")(x_face, train).mean(axis=2)
    adjacency = topk_adjacency(node_similarity(v), self.top_k)
    return AUHeadOutput(probs=CosineClassifier(name="classifier")(v), node_feats=v, adjacency=adjacency)
