"""Graph AU head: shapes, top-K graph, jit/finiteness/BN updates, gradients, and parity with a small
PyTorch reimplementation of ME-GraphAU written here from the paper's equations (pairs built by torch
``repeat`` and the reference's start/end incidence matrices, independently of the flax code's einsum
broadcasting)."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maejax.models import au_graph
from maejax.models.au_graph import AUHeadOutput, GraphAUHead, LinearAUHead

B, T, C_IN, C = 4, 6, 24, 16
CONFIGS = [(12, 4), (8, 3)]  # BP4D, DISFA


def _tokens(seed=0, b=B):
  return jax.random.normal(jax.random.key(seed), (b, T, C_IN))


def _init(head, x):
  boxed = jax.jit(functools.partial(head.init, train=False))(jax.random.key(1), x)
  return flax.core.unfreeze(flax.linen.meta.unbox(boxed))


@pytest.fixture(scope="module", params=[(n, k, s) for n, k in CONFIGS for s in (1, 2)],
                ids=lambda p: f"N{p[0]}-K{p[1]}-stage{p[2]}")
def case(request):
  """One jitted call per configuration: train-mode outputs, BN updates, d(loss)/d(tokens), eval outputs."""
  n, k, stage = request.param
  head = GraphAUHead(n, channels=C, top_k=k, stage=stage)
  x = _tokens()
  variables = _init(head, x)

  @jax.jit
  def run(variables, x):
    def loss_fn(tokens):
      out, upd = head.apply(variables, tokens, train=True, mutable=["batch_stats"])
      loss = jnp.sum(out.probs * jnp.arange(n))
      if out.edge_logits is not None:
        loss = loss + jnp.sum(out.edge_logits[..., 1])
      return loss, (out, upd)

    grad, (out, upd) = jax.grad(loss_fn, has_aux=True)(x)
    out_eval = head.apply({"params": variables["params"], **upd}, x, train=False)
    return out, upd, grad, out_eval

  out, upd, grad, out_eval = run(variables, x)
  return dict(head=head, variables=variables, x=x, n=n, k=k, stage=stage, out=out, upd=upd, grad=grad,
              out_eval=out_eval)


def test_shapes_range_and_topk(case):
  n, k, out = case["n"], case["k"], case["out"]
  assert isinstance(out, AUHeadOutput)
  assert out.probs.shape == (B, n) and out.node_feats.shape == (B, n, C) and out.adjacency.shape == (B, n, n)
  if case["stage"] == 1:
    assert out.edge_feats is None and out.edge_logits is None
  else:
    assert out.edge_feats.shape == (B, n * n, C) and out.edge_logits.shape == (B, n * n, 4)
  for o in (out, case["out_eval"]):
    probs = np.asarray(o.probs)
    assert np.all(probs >= 0) and np.all(probs <= 1 + 1e-6)
  adj = np.asarray(out.adjacency)
  assert set(np.unique(adj)) <= {0.0, 1.0}
  np.testing.assert_array_equal(adj.sum(-1), k)


def test_finite_and_bn_update(case):
  old, new = case["variables"]["batch_stats"], case["upd"]["batch_stats"]
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new))
  assert changed and all(changed)  # every BN's running statistics moved
  for o in (case["out"], case["out_eval"]):
    for leaf in jax.tree.leaves(o):
      assert np.all(np.isfinite(np.asarray(leaf)))


def test_gradient_reaches_backbone_tokens(case):
  g = np.asarray(case["grad"])
  assert g.shape == (B, T, C_IN)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_logical_axis_names():
  head = GraphAUHead(8, channels=C, top_k=3, stage=2)
  boxed = jax.eval_shape(functools.partial(head.init, train=False), jax.random.key(0), _tokens())["params"]
  is_box = lambda x: isinstance(x, flax.linen.LogicallyPartitioned)
  leaves = jax.tree.leaves(boxed, is_leaf=is_box)
  assert leaves and all(is_box(leaf) for leaf in leaves)
  assert boxed["global_linear"]["fc"]["kernel"].names == ("embed", "au_channels")
  assert boxed["afg"]["kernel"].names == ("au_nodes", "au_channels_in", "au_channels")
  assert boxed["gnn_0"]["bn_edge"]["scale"].names == ("au_edges",)


def test_linear_head_and_numpy_topk():
  n, k = 12, 4
  head = LinearAUHead(n, channels=C, top_k=k)
  x = _tokens(3)
  variables = _init(head, x)
  out, _ = jax.jit(lambda v, x: head.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert out.edge_feats is None and out.edge_logits is None and out.probs.shape == (B, n)
  # LinearAUHead's node features are the AFG means the graph is built from: independent numpy top-K.
  v = np.asarray(out.node_feats, np.float64)
  sim = np.einsum("bic,bjc->bij", v, v)
  expected = np.zeros_like(sim)
  idx = np.argsort(-sim, axis=-1, kind="stable")[..., :k]
  np.put_along_axis(expected, idx, 1.0, axis=-1)
  np.testing.assert_array_equal(np.asarray(out.adjacency), expected)


def test_bad_arguments():
  init = lambda head, x: jax.eval_shape(functools.partial(head.init, train=False), jax.random.key(0), x)
  with pytest.raises(ValueError, match="top_k"):
    init(GraphAUHead(8, channels=C, top_k=9), _tokens())
  with pytest.raises(ValueError, match="stage"):
    init(GraphAUHead(8, channels=C, top_k=3, stage=3), _tokens())
  with pytest.raises(ValueError, match="channels"):
    init(GraphAUHead(8, channels=15, top_k=3, stage=2), _tokens())
  with pytest.raises(ValueError, match="tokens"):
    init(GraphAUHead(8, channels=C, top_k=3), jnp.zeros((2, C_IN)))


# ----------------------------------------------------------------------------------------------------------
# PyTorch reimplementation from the paper's formulas.


def _t(a):
  return torch.tensor(np.asarray(a, np.float32))


def _lin(p, bias=True):
  """flax Dense params → (weight (out, in), bias) in torch layout."""
  return _t(p["kernel"]).T, (_t(p["bias"]) if bias else None)


def _bn_train(x, p, stats=None):
  """torch BatchNorm with channel axis 1 of x (train mode, or eval mode when running stats are given)."""
  rm = rv = None
  if stats is not None:
    rm, rv = _t(stats["mean"]), _t(stats["var"])
  return F.batch_norm(x, rm, rv, _t(p["scale"]), _t(p["bias"]), training=stats is None, eps=1e-5)


def _attn(q, k, v):
  dots = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)
  return torch.softmax(dots, dim=-1) @ v


def _cross_attn(p, y, x):
  return _attn(F.linear(y, *_lin(p["q"])), F.linear(x, *_lin(p["k"])), F.linear(x, *_lin(p["v"])))


def torch_head(params, x, stage, k, stats=None):
  st = (lambda *path: _get(stats, path)) if stats is not None else (lambda *path: None)
  n = params["classifier"]["class_vectors"].shape[0]
  # global linear block: BatchNorm1d(C) over (B, C, T)
  h = F.linear(x, *_lin(params["global_linear"]["fc"]))
  x_face = F.relu(_bn_train(h.permute(0, 2, 1), params["global_linear"]["bn"],
                            st("global_linear", "bn")).permute(0, 2, 1))
  # AFG: one LinearBlock per AU
  afg = params["afg"]
  f_u = []
  for i in range(n):
    h = F.linear(x_face, _t(afg["kernel"][i]).T, _t(afg["bias"][i]))
    bn_p = {"scale": afg["bn"]["scale"][i], "bias": afg["bn"]["bias"][i]}
    bn_s = None
    if stats is not None:
      bn_s = {"mean": stats["afg"]["bn"]["mean"][i], "var": stats["afg"]["bn"]["var"][i]}
    f_u.append(F.relu(_bn_train(h.permute(0, 2, 1), bn_p, bn_s).permute(0, 2, 1)))
  f_u = torch.stack(f_u, dim=1)  # (B, N, T, C)
  f_v = f_u.mean(dim=-2)
  b, _, t, c = f_u.shape
  si = f_v.detach() @ f_v.detach().transpose(1, 2)
  thr = si.topk(k, dim=-1).values[..., -1:]
  adj = (si >= thr).float()
  edge = edge_logits = None
  if stage == 1:
    deg = adj.sum(-1) ** -0.5
    a_norm = deg[:, :, None] * adj * deg[:, None, :]
    g = params["fgg"]
    agg = a_norm @ F.linear(f_v, *_lin(g["V"])) + F.linear(f_v, *_lin(g["U"]))
    f_v = F.relu(f_v + _bn_train(agg, g["bn"], st("fgg", "bn")))
  else:
    gem = params["gem"]
    fam = _cross_attn(gem["FAM"], f_u, x_face[:, None].repeat(1, n, 1, 1))
    feat_end = fam.repeat(1, 1, n, 1).view(b, n * n, t, c)  # edge i·N + j → FAM_i (keys/values)
    feat_start = fam.repeat(1, n, 1, 1).view(b, n * n, t, c)  # edge i·N + j → FAM_j (queries)
    arm = _cross_attn(gem["ARM"], feat_start, feat_end)
    edge = _bn_train(F.linear(arm, *_lin(gem["edge_proj"])), gem["bn"], st("gem", "bn")).mean(dim=-2)
    end = torch.zeros(n * n, n)
    for i in range(n):
      end[i * n:(i + 1) * n, i] = 1
    start = torch.eye(n).repeat(n, 1)
    for layer in range(2):
      g = params[f"gnn_{layer}"]
      lin = lambda name, z, g=g: F.linear(z, _t(g[name]["kernel"]).T)
      msg = end @ lin("A", f_v) + start @ lin("B", f_v) + lin("E", edge)
      edge = edge + F.relu(_bn_train(msg, g["bn_edge"], st(f"gnn_{layer}", "bn_edge")))
      gate = torch.softmax(torch.sigmoid(edge).view(b, n, n, c), dim=2).view(b, n * n, c)
      agg = end.t() @ (gate * (start @ lin("V", f_v))) / n
      f_v = F.relu(f_v + _bn_train(lin("U", f_v) + agg, g["bn_node"], st(f"gnn_{layer}", "bn_node")))
    edge_logits = F.linear(edge, *_lin(params["edge_fc"]))
  sc = F.normalize(F.relu(_t(params["classifier"]["class_vectors"])), p=2, dim=-1)
  probs = (F.normalize(f_v, p=2, dim=-1) * sc[None]).sum(-1)
  return probs, f_v, adj, edge, edge_logits


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_parity_with_torch_reimplementation(case):
  stage, k, x = case["stage"], case["k"], case["x"]
  params = jax.tree.map(np.asarray, case["variables"]["params"])
  names = ("probs", "node_feats", "adjacency", "edge_feats", "edge_logits")
  with torch.no_grad():
    ref_train = torch_head(params, _t(x), stage, k)
    stats = jax.tree.map(np.asarray, case["upd"]["batch_stats"])
    ref_eval = torch_head(params, _t(x), stage, k, stats=stats)  # with the updated running statistics
  for mode, out, ref in (("train", case["out"], ref_train), ("eval", case["out_eval"], ref_eval)):
    for name, r in zip(names, ref, strict=True):
      got = getattr(out, name)
      if r is None:
        assert got is None, name
        continue
      np.testing.assert_allclose(np.asarray(got), r.numpy(), rtol=2e-4, atol=2e-5, err_msg=f"{mode} {name}")

  # Running means follow torch's momentum 0.1 from 0 (flax momentum 0.9).
  h = F.linear(_t(x), *_lin(params["global_linear"]["fc"]))
  np.testing.assert_allclose(np.asarray(case["upd"]["batch_stats"]["global_linear"]["bn"]["mean"]),
                             0.1 * h.mean(dim=(0, 1)).numpy(), rtol=1e-4, atol=1e-6)


def test_cross_attn_parity():
  mod = au_graph.CrossAttn()
  y = jax.random.normal(jax.random.key(0), (2, 3, 5, C))
  x = jax.random.normal(jax.random.key(1), (2, 3, 7, C))
  variables = flax.linen.meta.unbox(jax.jit(mod.init)(jax.random.key(2), y, x))
  got = jax.jit(mod.apply)(variables, y, x)
  p = jax.tree.map(np.asarray, variables["params"])
  with torch.no_grad():
    q = _t(y) @ _t(p["q"]["kernel"]) + _t(p["q"]["bias"])
    kk = _t(x) @ _t(p["k"]["kernel"]) + _t(p["k"]["bias"])
    v = _t(x) @ _t(p["v"]["kernel"]) + _t(p["v"]["bias"])
    ref = torch.softmax(q @ kk.transpose(-1, -2) / (C // 2) ** 0.5, dim=-1) @ v
  assert p["q"]["kernel"].shape == (C, C // 2) and p["v"]["kernel"].shape == (C, C)
  np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-5)


def test_cosine_classifier_parity():
  rng = np.random.default_rng(0)
  v = np.abs(rng.normal(size=(3, 5, C))).astype(np.float32)
  s = rng.normal(size=(5, C)).astype(np.float32)
  s[2] = -np.abs(s[2])  # ReLU(s_2) = 0 → probability 0
  got = np.asarray(au_graph.cosine_probs(jnp.asarray(v), jnp.asarray(s)))
  ref = F.cosine_similarity(_t(v), F.relu(_t(s))[None], dim=-1, eps=1e-12).numpy()
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  assert np.all(got[:, 2] == 0) and np.all((got >= 0) & (got <= 1 + 1e-6))
