"""The device mesh and how arrays are laid out on it (big_vision ``sharding.py`` style).

Parameters carry logical axis names (``embed``, ``mlp``, ``heads``, …); ``rules`` map them to mesh axes, so FSDP
or tensor parallelism is a config change. Batches are split over the ``data`` and ``fsdp`` axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis. Unlisted logical axes (and dims a mesh axis does not divide) replicate.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("decoder_embed", "fsdp"),
    ("teacher_embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("patch", None),
)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh from ``{"data": -1, "fsdp": 1, "model": 1}``; one ``-1`` takes the remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(mesh_config.keys())
  unknown = set(names) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {', '.join(MESH_AXES)}")
  sizes = [int(v) for v in mesh_config.values()]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(mesh_config)}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % fixed:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(mesh_config)}")
    sizes[sizes.index(-1)] = len(devices) // fixed
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                     f"{len(devices)} available")
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Replicates a dimension instead where its mesh axes are absent from ``mesh`` or do not divide it (e.g. 2
  heads on a 4-way model axis)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
    names = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a in mesh.shape)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append((names[0] if len(names) == 1 else names) if names and dim % size == 0 else None)
  return P(*out)


def param_shardings(boxed_abstract: PyTree, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]]) -> PyTree:
  """NamedShardings for (boxed, abstract) params from their logical axis names and ``rules``."""
  specs = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = nn.meta.unbox(boxed_abstract)
  return jax.tree_util.tree_map(
      lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)), mesh_specs, shapes,
      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Per-process numpy batch → global jax arrays sharded over the batch axes of ``mesh``."""
  sh = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in local.items()}


def shard_like_params(init_fn, values: PyTree, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, Any]],
                      optional: tuple[str, ...] = ("decoder",)) -> PyTree:
  """Places ``values`` (e.g. a loaded teacher's params) with the shardings their logical axes give; ``init_fn``
  (``rng -> variables``) is the matching model's init, only traced for the axis names. Subtrees named in
  ``optional`` may be absent from ``values`` (an encoder-only checkpoint has no decoder)."""
  boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))["params"]
  sh = param_shardings(boxed, mesh, rules)
  flat_v = flax.traverse_util.flatten_dict(flax.core.unfreeze(values))
  flat_sh = flax.traverse_util.flatten_dict(flax.core.unfreeze(sh))
  missing = sorted("/".join(k) for k in flat_sh if k not in flat_v and k[0] not in optional)
  if missing:
    raise ValueError(f"frozen parameters lack {missing[:8]}{' …' if len(missing) > 8 else ''}")
  return flax.traverse_util.unflatten_dict(
      {k: jax.device_put(jnp.asarray(v), flat_sh[k]) for k, v in flat_v.items() if k in flat_sh})
