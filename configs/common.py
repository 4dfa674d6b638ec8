"""Pieces every stage's config shares (mesh, sharding rules, logging, the synthetic data default)."""

import ml_collections


def base(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.batch_size = 64  # global, across all processes
  c.total_steps = 200
  c.grad_accum_steps = 1
  c.log_every = 10
  c.eval_every = 100
  c.checkpoint_every = 50
  c.keep_checkpoints = 3
  # Mesh axes and sizes; one -1 takes the remaining devices. FSDP / tensor parallel are config changes.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  # Logical parameter axis -> mesh axis. Unlisted logical axes (and dims a mesh axis does not divide) replicate.
  c.sharding_rules = (("embed", "fsdp"), ("decoder_embed", "fsdp"), ("teacher_embed", "fsdp"),
                      ("mlp", "model"), ("heads", "model"), ("kv", None), ("patch", None))
  c.data = synthfaces()
  return c


def synthfaces(image_size: int = 64) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.name = "synthfaces"  # or "folder" (data.path) or "tfds" (data.tfds_name, data.data_dir)
  d.seed = 0
  d.num_subjects = 60
  d.frames_per_subject = 200
  d.test_fraction = 0.25
  d.image_size = image_size
  d.crop_scale = (0.2, 1.0)
  d.worker_count = 0
  # Render cache of the synthetic faces (maejax.data.face_cache), shared by every stage and run; "" = off.
  d.cache_dir = "~/.cache/maejax/synthfaces"
  d.path = ""
  d.tfds_name = ""
  d.data_dir = ""
  return d


def adamw(base_lr: float, weight_decay: float, warmup_steps: int) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.base_lr = base_lr  # peak lr = base_lr * batch_size / 256
  o.scale_by_batch = True
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = weight_decay
  o.warmup_steps = warmup_steps
  o.min_lr = 0.0
  o.grad_clip = 0.0
  return o


def parse_arg(arg: str | None) -> dict[str, str]:
  """``"vit_b"`` or ``"variant=vit_b,steps=10"`` → dict (big_vision style)."""
  out: dict[str, str] = {}
  for part in (arg or "").split(","):
    if not part:
      continue
    k, _, v = part.partition("=")
    if v:
      out[k] = v
    else:
      out["variant"] = k
  return out
