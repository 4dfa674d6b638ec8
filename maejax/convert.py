"""Import official MAE and HuggingFace ViTMAE PyTorch weights into maejax params; save them with Orbax.

Source formats (detected from the key names):

* ``official``: facebookresearch/mae ``models_mae.py`` names. ``mae_pretrain_vit_*.pth`` holds the encoder
  only under ``'model'`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}.*``, ``norm.*``); ``mae_visualize_vit_*.pth`` adds ``mask_token``,
  ``decoder_embed``, ``decoder_pos_embed``, ``decoder_blocks.N.*``, ``decoder_norm`` and ``decoder_pred``. The
  fused ``attn.qkv`` Linear(D, 3D) weight ``(3D, D)`` is ``cat(q, k, v)`` along the output axis, each
  head-major ``(H, Dh)``.
* ``hf_v4``: transformers 4 ``ViTMAEForPreTraining`` names (``vit.embeddings.*``,
  ``vit.encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``intermediate.dense``, ``output.dense``, ``layernorm_before/after``, ``vit.layernorm``,
  ``decoder.decoder_layers.N.*``, ...).
* ``hf_v5``: transformers 5 names (``vit.layers.N.attention.{q,k,v,o}_proj``, ``vit.layers.N.mlp.fc{1,2}``,
  ``decoder.decoder_layers.N.*``, ...).

A ``ViTMAEModel`` state dict (no ``vit.`` prefix) is accepted too. Encoder-only sources give
``{'encoder': ...}``; full sources give ``{'encoder': ..., 'decoder': ...}`` matching
:class:`maejax.models.mae.MAE`.

Sizes are inferred from the shapes; the number of heads (invisible in the shapes) comes from ``num_heads`` /
``decoder_heads``, else a HF ``config.json``, else the standard table (``VIT_SIZES``; the official decoder is
512-d with 16 heads). Position embeddings are not maejax params (maejax computes the fixed sin-cos table): the
checkpoint's table must equal :func:`maejax.models.vit.sincos_pos_embed_2d` (``allow_pos_embed_mismatch=True``
skips this check, and the checkpoint's table is then DROPPED: the converted model uses the fixed table).

Every missing, unexpected or mis-shaped key is reported in one ``ValueError``; nothing is written then.

Saved layout (an Orbax composite checkpoint directory)::

    DST/params   StandardSave of the params pytree ({'encoder': ..., ['decoder': ...]})
    DST/config   JsonSave of MAEConfig fields (img_size, patch_size, in_chans, width, ..., decoder_*);
                 decoder_* are None for an encoder-only source, norm_pix_loss / mask_ratio unless a HF config
                 gives them (None: the MAEConfig default)

CLI::

    python -m maejax.convert --src=mae_pretrain_vit_base.pth --dst=/tmp/mae_b16 [--num_heads=12]
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from maejax.models.mae import MAE, MAEConfig
from maejax.models.vit import VIT_SIZES, sincos_pos_embed_2d

FORMATS = ("official", "hf_v4", "hf_v5")
POS_EMBED_ATOL = 1e-5
OFFICIAL_DECODER_HEADS = {512: 16}  # the official MAE decoder (all sizes): 512-d, 8 blocks, 16 heads

Params = dict[str, Any]


# ----------------------------------------------------------------------------------------------------------
# Reading.


def _to_numpy(x: Any) -> np.ndarray:
  if hasattr(x, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through float32)
    x = x.detach().cpu()
    if not x.dtype.is_floating_point:
      return x.numpy()
    return x.float().numpy()
  return np.asarray(x)


def _unwrap(obj: Any, where: str) -> dict[str, np.ndarray]:
  """Finds the state dict in a loaded object (``{'model': sd, ...}`` of the official checkpoints)."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where}: expected a state dict (a mapping of names to arrays), "
                     f"got {type(obj).__name__}")
  for wrapper in ("model", "state_dict"):
    if wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  sd = {}
  for k, v in obj.items():
    if not isinstance(k, str):
      raise ValueError(f"{where}: state dict keys must be strings, got {k!r}")
    sd[k] = _to_numpy(v)
  # DistributedDataParallel prefix, if the whole dict carries it.
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd


def _load_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors import safe_open

    try:
      with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}
    except TypeError:  # e.g. bf16, which numpy cannot hold: read through torch
      with safe_open(path, framework="pt") as f:
        return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}
  import torch  # only needed for .pth / .bin

  obj = torch.load(path, map_location="cpu", weights_only=True)
  return _unwrap(obj, path)


def read_source(src: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict | None]:
  """Reads a state dict and, for a HF directory, its ``config.json``.

  ``src``: a ``.pth`` / ``.bin`` / ``.safetensors`` file, a HF model directory (``model.safetensors`` or
  ``pytorch_model.bin`` + ``config.json``), or an in-memory mapping of names to numpy arrays / torch tensors
  (optionally wrapped as ``{'model': ...}``). Returns ``(state_dict of float32/int numpy arrays, hf_config)``.
  """
  if isinstance(src, Mapping):
    return _unwrap(src, "state dict"), None
  path = os.fspath(src)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist; expected a .pth/.safetensors file or a HF "
                            "model directory")
  if not os.path.isdir(path):
    return _load_file(path), None
  hf_config = None
  cfg_path = os.path.join(path, "config.json")
  if os.path.exists(cfg_path):
    with open(cfg_path) as f:
      hf_config = json.load(f)
  for name in ("model.safetensors", "pytorch_model.bin"):
    if os.path.exists(os.path.join(path, name)):
      return _load_file(os.path.join(path, name)), hf_config
  raise FileNotFoundError(f"HF directory {path!r} holds neither model.safetensors nor pytorch_model.bin "
                          "(sharded checkpoints are not supported)")


# ----------------------------------------------------------------------------------------------------------
# Format detection and key tables.


def detect_format(sd: Mapping[str, Any]) -> tuple[str, str]:
  """``(format, prefix)``: format in :data:`FORMATS`; prefix ``'vit.'`` for HF ``ViTMAEForPreTraining``
  (``''`` for a bare HF ``ViTMAEModel`` and for the official format)."""
  keys = list(sd)
  if any(k.startswith(("blocks.", "patch_embed.")) or k == "cls_token" for k in keys):
    return "official", ""
  prefix = "vit." if any(k.startswith("vit.") for k in keys) else ""
  if any(k.startswith(f"{prefix}layers.") or ".q_proj." in k for k in keys):
    return "hf_v5", prefix
  if any(k.startswith(f"{prefix}encoder.layer.") or ".attention.attention.query." in k for k in keys):
    return "hf_v4", prefix
  raise ValueError("cannot detect the checkpoint format: expected official MAE keys (blocks.N.attn.qkv...), "
                   "HF transformers 4 keys (vit.encoder.layer.N...) or transformers 5 keys "
                   "(vit.layers.N...); "
                   f"got keys like {sorted(keys)[:8]}")


@dataclasses.dataclass(frozen=True)
class _Names:
  """Source key names of one format."""

  cls_token: str
  pos_embed: str
  patch_w: str
  patch_b: str
  norm: str  # final encoder norm prefix
  block: str  # encoder block prefix with {i}
  mask_token: str
  decoder_embed: str
  decoder_pos_embed: str
  decoder_block: str
  decoder_norm: str
  decoder_pred: str
  # Inside a block: maejax sub-path -> source sub-key.
  norm1: str
  norm2: str
  attn_out: str
  fc1: str
  fc2: str
  qkv: tuple[str, ...]  # one fused key (official) or three (HF)


def _names(fmt: str, prefix: str) -> _Names:
  if fmt == "official":
    return _Names("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm",
                  "blocks.{i}.", "mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks.{i}.",
                  "decoder_norm", "decoder_pred", "norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2",
                  ("attn.qkv",))
  common = dict(cls_token=f"{prefix}embeddings.cls_token",
                pos_embed=f"{prefix}embeddings.position_embeddings",
                patch_w=f"{prefix}embeddings.patch_embeddings.projection.weight",
                patch_b=f"{prefix}embeddings.patch_embeddings.projection.bias", norm=f"{prefix}layernorm",
                mask_token="decoder.mask_token", decoder_embed="decoder.decoder_embed",
                decoder_pos_embed="decoder.decoder_pos_embed", decoder_block="decoder.decoder_layers.{i}.",
                decoder_norm="decoder.decoder_norm", decoder_pred="decoder.decoder_pred",
                norm1="layernorm_before", norm2="layernorm_after")
  if fmt == "hf_v5":
    return _Names(block=f"{prefix}layers.{{i}}.", attn_out="attention.o_proj", fc1="mlp.fc1", fc2="mlp.fc2",
                  qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"), **common)
  return _Names(block=f"{prefix}encoder.layer.{{i}}.", attn_out="attention.output.dense",
                fc1="intermediate.dense", fc2="output.dense",
                qkv=tuple(f"attention.attention.{n}" for n in ("query", "key", "value")), **common)


def _count_blocks(sd: Mapping[str, Any], template: str) -> int:
  """1 + the largest N of keys ``template.format(i=N) + ...`` (0 if none)."""
  pat = re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)"))
  idx = [int(m.group(1)) for k in sd if (m := pat.match(k))]
  return 1 + max(idx) if idx else 0


def _shape(sd, key) -> tuple[int, ...] | None:
  return tuple(sd[key].shape) if key in sd else None


def _heads_for(width: int, given: int | None, what: str, table: Mapping[int, int]) -> int:
  heads = given if given is not None else table.get(width)
  if heads is None:
    raise ValueError(f"cannot infer the number of {what} heads for width {width} (not a standard size "
                     f"{dict(table)}); pass num_heads/decoder_heads (CLI: --num_heads/--decoder_heads)")
  if heads <= 0 or width % heads:
    raise ValueError(f"{what} width {width} is not divisible by {heads} heads")
  return int(heads)


def infer_config(sd: Mapping[str, Any], fmt: str, prefix: str = "", *, num_heads: int | None = None,
                 decoder_heads: int | None = None, hf_config: Mapping[str, Any] | None = None) -> dict:
  """:class:`MAEConfig` fields from the shapes of ``sd`` (heads from the arguments / ``hf_config`` / table).

  ``decoder_*`` are None when the source has no decoder (None: the MAEConfig default).
  """
  n = _names(fmt, prefix)
  hf_config = dict(hf_config or {})
  patch = _shape(sd, n.patch_w)
  if patch is None or len(patch) != 4 or patch[2] != patch[3]:
    raise ValueError(f"cannot infer width/patch size: expected key {n.patch_w!r} of shape (D, C, p, p), "
                     f"got {patch}")
  width, in_chans, patch_size = patch[0], patch[1], patch[2]
  depth = _count_blocks(sd, n.block)
  if depth == 0:
    raise ValueError(f"no encoder blocks found: expected keys {n.block.format(i=0)}...")
  fc1 = _shape(sd, n.block.format(i=0) + n.fc1 + ".weight")
  mlp_ratio = fc1[0] / width if fc1 and len(fc1) == 2 else 4.0
  pos = _shape(sd, n.pos_embed)
  if pos is not None and len(pos) == 3 and pos[1] > 1 and round((pos[1] - 1) ** 0.5) ** 2 == pos[1] - 1:
    img_size = round((pos[1] - 1) ** 0.5) * patch_size
  elif "image_size" in hf_config:
    img_size = int(hf_config["image_size"])
  else:
    raise ValueError(f"cannot infer the image size: expected key {n.pos_embed!r} of shape "
                     f"(1, 1 + L, {width}) with L a square number of patches, got {pos}")
  table = {w: h for w, _, h in VIT_SIZES.values()}
  config = dict(img_size=int(img_size), patch_size=int(patch_size), in_chans=int(in_chans), width=int(width),
                depth=int(depth),
                num_heads=_heads_for(width, num_heads if num_heads is not None
                                     else hf_config.get("num_attention_heads"), "encoder", table),
                mlp_ratio=float(mlp_ratio), decoder_width=None, decoder_depth=None, decoder_heads=None,
                norm_pix_loss=hf_config.get("norm_pix_loss"), mask_ratio=hf_config.get("mask_ratio"))
  has_decoder = any(k.startswith("decoder") or k == n.mask_token for k in sd)
  if has_decoder:
    emb = _shape(sd, n.decoder_embed + ".weight")
    if emb is None or len(emb) != 2:
      raise ValueError(f"cannot infer the decoder width: expected key {n.decoder_embed + '.weight'!r} "
                       f"of shape (decoder_width, {width}), got {emb}")
    dec_width = emb[0]
    config.update(decoder_width=int(dec_width), decoder_depth=int(_count_blocks(sd, n.decoder_block)),
                  decoder_heads=_heads_for(dec_width, decoder_heads if decoder_heads is not None
                                           else hf_config.get("decoder_num_attention_heads"), "decoder",
                                           {**table, **OFFICIAL_DECODER_HEADS}))
  return config


# ----------------------------------------------------------------------------------------------------------
# Conversion.

# A rule: source key, expected source shape, and what it becomes: (maejax path, value) pairs.
_Rule = tuple[str, tuple[int, ...], Callable[[np.ndarray], list[tuple[tuple[str, ...], np.ndarray]]]]


def _block_rules(n: _Names, src: str, dst: tuple[str, ...], width: int, heads: int,
                 hidden: int) -> list[_Rule]:
  """Rules of one pre-norm transformer block (torch Linear weight is (out, in); flax kernel is (in, out))."""
  hd = width // heads
  rules: list[_Rule] = []
  for norm_src, norm_dst in ((n.norm1, "norm1"), (n.norm2, "norm2")):
    rules += [(f"{src}{norm_src}.weight", (width,), lambda a, d=norm_dst: [(dst + (d, "scale"), a)]),
              (f"{src}{norm_src}.bias", (width,), lambda a, d=norm_dst: [(dst + (d, "bias"), a)])]
  names = ("query", "key", "value")
  if len(n.qkv) == 1:  # fused Linear(D, 3D): output rows are [q | k | v], each head-major (H, Dh)
    def qkv_w(a):
      return [(dst + ("attn", nm, "kernel"), w.T.reshape(width, heads, hd))
              for nm, w in zip(names, np.split(a, 3, axis=0), strict=True)]

    def qkv_b(a):
      return [(dst + ("attn", nm, "bias"), b.reshape(heads, hd))
              for nm, b in zip(names, np.split(a, 3), strict=True)]

    rules += [(f"{src}{n.qkv[0]}.weight", (3 * width, width), qkv_w),
              (f"{src}{n.qkv[0]}.bias", (3 * width,), qkv_b)]
  else:
    for key, nm in zip(n.qkv, names, strict=True):
      rules += [(f"{src}{key}.weight", (width, width),
                 lambda a, nm=nm: [(dst + ("attn", nm, "kernel"), a.T.reshape(width, heads, hd))]),
                (f"{src}{key}.bias", (width,), lambda a, nm=nm: [(dst + ("attn", nm, "bias"),
                                                                  a.reshape(heads, hd))])]
  rules += [
      (f"{src}{n.attn_out}.weight", (width, width),
       lambda a: [(dst + ("attn", "out", "kernel"), a.T.reshape(heads, hd, width))]),
      (f"{src}{n.attn_out}.bias", (width,), lambda a: [(dst + ("attn", "out", "bias"), a)]),
      (f"{src}{n.fc1}.weight", (hidden, width), lambda a: [(dst + ("mlp", "fc1", "kernel"), a.T)]),
      (f"{src}{n.fc1}.bias", (hidden,), lambda a: [(dst + ("mlp", "fc1", "bias"), a)]),
      (f"{src}{n.fc2}.weight", (width, hidden), lambda a: [(dst + ("mlp", "fc2", "kernel"), a.T)]),
      (f"{src}{n.fc2}.bias", (width,), lambda a: [(dst + ("mlp", "fc2", "bias"), a)]),
  ]
  return rules


def _linear_rules(key: str, dst: tuple[str, ...], fan_in: int, fan_out: int) -> list[_Rule]:
  return [(f"{key}.weight", (fan_out, fan_in), lambda a: [(dst + ("kernel",), a.T)]),
          (f"{key}.bias", (fan_out,), lambda a: [(dst + ("bias",), a)])]


def _norm_rules(key: str, dst: tuple[str, ...], width: int) -> list[_Rule]:
  return [(f"{key}.weight", (width,), lambda a: [(dst + ("scale",), a)]),
          (f"{key}.bias", (width,), lambda a: [(dst + ("bias",), a)])]


def _rules(n: _Names, cfg: Mapping[str, Any]) -> tuple[list[_Rule], dict[str, tuple[int, int]]]:
  """All conversion rules, and the position tables to check: ``{key: (width, grid_size)}``."""
  w, p, c = cfg["width"], cfg["patch_size"], cfg["in_chans"]
  grid = cfg["img_size"] // p
  hidden = round(w * cfg["mlp_ratio"])
  enc = ("encoder",)
  rules: list[_Rule] = [
      (n.cls_token, (1, 1, w), lambda a: [(enc + ("cls_token",), a)]),
      (n.pos_embed, (1, 1 + grid * grid, w), lambda a: []),
      (n.patch_w, (w, c, p, p), lambda a: [(enc + ("patch_embed", "kernel"), a.transpose(2, 3, 1, 0))]),
      (n.patch_b, (w,), lambda a: [(enc + ("patch_embed", "bias"), a)]),
      *_norm_rules(n.norm, enc + ("norm",), w),
  ]
  for i in range(cfg["depth"]):
    rules += _block_rules(n, n.block.format(i=i), enc + (f"blocks_{i}",), w, cfg["num_heads"], hidden)
  pos_tables = {n.pos_embed: (w, grid)}
  if cfg["decoder_width"] is not None:
    dw, dec = cfg["decoder_width"], ("decoder",)
    d_hidden = round(dw * cfg["mlp_ratio"])
    rules += [
        (n.mask_token, (1, 1, dw), lambda a: [(dec + ("mask_token",), a)]),
        (n.decoder_pos_embed, (1, 1 + grid * grid, dw), lambda a: []),
        *_linear_rules(n.decoder_embed, dec + ("decoder_embed",), w, dw),
        *_norm_rules(n.decoder_norm, dec + ("decoder_norm",), dw),
        *_linear_rules(n.decoder_pred, dec + ("decoder_pred",), dw, p * p * c),
    ]
    for i in range(cfg["decoder_depth"]):
      rules += _block_rules(n, n.decoder_block.format(i=i), dec + (f"decoder_blocks_{i}",), dw,
                            cfg["decoder_heads"], d_hidden)
    pos_tables[n.decoder_pos_embed] = (dw, grid)
  return rules, pos_tables


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def convert_state_dict(sd: Mapping[str, Any], *, num_heads: int | None = None,
                       decoder_heads: int | None = None, hf_config: Mapping[str, Any] | None = None,
                       allow_pos_embed_mismatch: bool = False) -> tuple[Params, dict, dict]:
  """Converts a PyTorch state dict (any of :data:`FORMATS`) to maejax params.

  Returns ``(params, config, info)``: ``params`` = ``{'encoder': ...}`` or
  ``{'encoder': ..., 'decoder': ...}`` of float32 numpy arrays (the ``params`` collection of
  :class:`~maejax.models.mae.MAE`); ``config`` = :class:`MAEConfig` fields (see :func:`infer_config`);
  ``info`` = ``{'format', 'has_decoder', 'num_params', 'pos_embed_max_abs_diff', 'heads_from'}``.

  Raises ``ValueError`` listing every missing / unexpected / mis-shaped key, or when a position table differs
  from the fixed sin-cos table by more than ``POS_EMBED_ATOL`` (unless ``allow_pos_embed_mismatch``).
  """
  sd = _unwrap(sd, "state dict") if not all(isinstance(v, np.ndarray) for v in sd.values()) else dict(sd)
  fmt, prefix = detect_format(sd)
  cfg = infer_config(sd, fmt, prefix, num_heads=num_heads, decoder_heads=decoder_heads, hf_config=hf_config)
  rules, pos_tables = _rules(_names(fmt, prefix), cfg)

  expected = {key: shape for key, shape, _ in rules}
  problems = [f"missing key {k!r} (expected shape {s})" for k, s in expected.items() if k not in sd]
  problems += [f"unexpected key {k!r} (shape {tuple(sd[k].shape)})" for k in sd if k not in expected]
  problems += [f"mis-shaped key {k!r}: expected shape {s}, got {tuple(sd[k].shape)}"
               for k, s in expected.items() if k in sd and tuple(sd[k].shape) != s]
  if problems:
    raise ValueError(f"{len(problems)} problem(s) converting a {fmt} checkpoint (inferred config {cfg}):\n  "
                     + "\n  ".join(problems))

  pos_diff = {}
  for key, (width, grid) in pos_tables.items():
    ref = sincos_pos_embed_2d(width, grid, cls_token=True)
    pos_diff[key] = float(np.max(np.abs(sd[key][0].astype(np.float64) - ref)))
  bad = {k: d for k, d in pos_diff.items() if not d <= POS_EMBED_ATOL}
  if bad and not allow_pos_embed_mismatch:
    raise ValueError(
        "position embedding(s) differ from the fixed 2-D sin-cos table that maejax computes "
        f"(max-abs diff {bad}, tolerance {POS_EMBED_ATOL}): the converted model would not reproduce the "
        "checkpoint. Pass allow_pos_embed_mismatch=True (CLI --allow_pos_embed_mismatch) to convert anyway; "
        "the checkpoint's table is then dropped and replaced by the sin-cos table.")

  params: Params = {}
  for key, _, fn in rules:
    for path, value in fn(sd[key]):
      _set(params, path, np.ascontiguousarray(value, dtype=np.float32))
  num = int(sum(v.size for k, v in sd.items() if k not in pos_tables))
  def source(arg, hf_key):
    return "argument" if arg is not None else "config.json" if hf_key in (hf_config or {}) else "size table"

  info = dict(format=fmt, has_decoder=cfg["decoder_width"] is not None, num_params=num,
              pos_embed_max_abs_diff=pos_diff,
              heads_from=(source(num_heads, "num_attention_heads"),
                          source(decoder_heads, "decoder_num_attention_heads")))
  if hf_config and float(hf_config.get("layer_norm_eps", 1e-6)) != 1e-6:
    info["note"] = (f"HF config layer_norm_eps={hf_config['layer_norm_eps']}; maejax uses the official 1e-6")
  if hf_config and hf_config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"HF config hidden_act={hf_config['hidden_act']!r}: maejax implements exact 'gelu' only")
  return params, cfg, info


# ----------------------------------------------------------------------------------------------------------
# Orbax save / load and model construction.


def save_converted(dst: str | os.PathLike, params: Params, config: Mapping[str, Any], *,
                   overwrite: bool = False) -> str:
  """Validates the config (:meth:`MAEConfig.from_json`), then writes the converted checkpoint
  (:func:`maejax.checkpoints.save_converted`)."""
  from maejax import checkpoints

  MAEConfig.from_json(config)
  return checkpoints.save_converted(dst, params, config, overwrite=overwrite)


def build_model(config: Mapping[str, Any], **overrides) -> MAE:
  """The MAE of a converted ``config`` (:meth:`MAEConfig.from_json`: None entries take the defaults, e.g. the
  official 512-d decoder for an encoder-only source), with ``overrides`` (MAEConfig fields)."""
  return MAEConfig.from_json(config).build(**overrides)


def convert(src: str | os.PathLike | Mapping[str, Any], dst: str | os.PathLike | None = None, *,
            num_heads: int | None = None, decoder_heads: int | None = None,
            allow_pos_embed_mismatch: bool = False, overwrite: bool = False) -> tuple[Params, dict, dict]:
  """Reads ``src`` (see :func:`read_source`), converts it, and saves it at ``dst`` if given.

  Returns ``(params, config, info)`` as :func:`convert_state_dict`. Nothing is written if conversion fails.
  """
  if dst is not None and os.path.exists(os.fspath(dst)) and not overwrite:
    raise FileExistsError(f"destination {os.fspath(dst)!r} already exists; choose a new directory or pass "
                          "overwrite=True (CLI --overwrite)")
  sd, hf_config = read_source(src)
  params, config, info = convert_state_dict(sd, num_heads=num_heads, decoder_heads=decoder_heads,
                                            hf_config=hf_config,
                                            allow_pos_embed_mismatch=allow_pos_embed_mismatch)
  if dst is not None:
    info["dst"] = save_converted(dst, params, config, overwrite=overwrite)
  return params, config, info


# ----------------------------------------------------------------------------------------------------------
# CLI.


def main(argv) -> None:
  from absl import app, flags, logging

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments {argv[1:]}")
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  # A bad source or destination raises ValueError / FileNotFoundError / FileExistsError: maejax.cli prints it as
  # one line and exits with status 2.
  params, config, info = convert(f.src, f.dst, num_heads=f.num_heads, decoder_heads=f.decoder_heads,
                                 allow_pos_embed_mismatch=f.allow_pos_embed_mismatch, overwrite=f.overwrite)
  import jax

  counts = {k: int(sum(x.size for x in jax.tree_util.tree_leaves(v))) for k, v in params.items()}
  print(f"source      {f.src}")
  print(f"format      {info['format']} ({'encoder + decoder' if info['has_decoder'] else 'encoder only'})")
  print(f"encoder     img {config['img_size']}, patch {config['patch_size']}, width {config['width']}, "
        f"depth {config['depth']}, heads {config['num_heads']} ({info['heads_from'][0]}), "
        f"mlp ratio {config['mlp_ratio']:g}")
  if info["has_decoder"]:
    print(f"decoder     width {config['decoder_width']}, depth {config['decoder_depth']}, "
          f"heads {config['decoder_heads']} ({info['heads_from'][1]})")
  print(f"pos-embed   max-abs diff to sin-cos {info['pos_embed_max_abs_diff']}")
  print(f"params      {sum(counts.values()):,} ({', '.join(f'{k} {v:,}' for k, v in counts.items())})")
  if "note" in info:
    print(f"note        {info['note']}")
  print(f"saved       {info['dst']}")


def _define_flags() -> None:
  from absl import flags

  flags.DEFINE_string("src", None, "official .pth, HF .safetensors/.bin, or a HF model directory",
                      required=True)
  flags.DEFINE_string("dst", None, "output directory (Orbax checkpoint, must not exist)", required=True)
  flags.DEFINE_integer("num_heads", None,
                       "encoder heads (default: HF config.json or the standard size table)")
  flags.DEFINE_integer("decoder_heads", None, "decoder heads (default: HF config.json, or 16 for 512-d)")
  flags.DEFINE_bool("allow_pos_embed_mismatch", False,
                    "convert even if the checkpoint's position table is not the fixed sin-cos table (it is "
                    "dropped: maejax always uses the sin-cos table)")
  flags.DEFINE_bool("overwrite", False, "replace an existing --dst")


if __name__ == "__main__":
  from maejax import cli

  _define_flags()
  cli.run(main, prog="maejax.convert")
