"""The benchmark scripts' profile helpers: which compiled HLO instructions are matmuls, and their source paths.

The scripts themselves are timed by hand (benchmarks/README.md); only the HLO parsing that the profile tables
rest on is tested here, on a real compiled module (XLA:CPU wraps dots in library fusions whose kernel names
say nothing, so the classification must come from the HLO)."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common as bc  # noqa: E402


def test_hlo_matmul_ops_finds_the_dots_and_only_them():
  def f(x, w, img, k):
    with jax.named_scope("proj"):
      y = jnp.tanh(x @ w) * 3.0
    with jax.named_scope("conv"):
      c = jax.lax.conv_general_dilated(img, k, (1, 1), "VALID")
    return jnp.exp(y).sum(), c

  args = (jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((2, 3, 16, 16)), jnp.ones((8, 3, 3, 3)))
  hlo = jax.jit(f).lower(*args).compile().as_text()
  matmuls = bc.hlo_matmul_ops(hlo)
  names = bc.hlo_op_names(hlo)
  paths = {names.get(m, "") for m in matmuls}
  assert any("proj/dot_general" in p for p in paths), (paths, hlo)
  # The convolution stays a bare instruction (its metadata went to a bitcast after it in this module).
  assert any(m.startswith("convolution") for m in matmuls), (matmuls, hlo)
  # tanh, exp, the reductions: none of them is a matmul.
  for name, path in names.items():
    if path.endswith(("/tanh", "/exp", "reduce_sum")):
      assert name not in matmuls, (name, path)
