"""maejax.au_infer and the AU model's config schema: the workdir layout, the token-drop policy, AUModelConfig."""

import os

import numpy as np
import pytest

from maejax import au_infer
from maejax.models.au_model import AUModel, AUModelConfig

# The keys every AU checkpoint saved before the attention field existed.
OLD_SAVED = {"img_size": 32, "patch_size": 8, "width": 32, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0,
             "num_aus": 12, "channels": 16, "top_k": 4, "stage": 2, "head": "graph", "transform_depth": 1,
             "head_pool": 2, "occlusion_predictor": True, "freeze_encoder": False}


def test_config_reads_old_checkpoints_and_round_trips():
  cfg = AUModelConfig.from_json(OLD_SAVED)
  assert cfg.attention == "einsum" and cfg.transform_depth == 1 and cfg.occlusion_predictor
  assert AUModelConfig.from_json(cfg.to_json()) == cfg
  model = cfg.build()
  assert isinstance(model, AUModel)
  assert {k: getattr(model, k) for k in AUModelConfig.fields()} == cfg.to_json()
  # Every AUModel field that changes the model is in the schema (nothing a checkpoint would silently drop).
  assert set(AUModelConfig.fields()) == {f for f in AUModel.__dataclass_fields__ if f not in ("parent", "name",
                                                                                              "dtype")}


def test_config_is_strict_and_fills_sizes():
  with pytest.raises(ValueError, match="widht"):
    AUModelConfig.from_json({**OLD_SAVED, "widht": 3})
  cfg = AUModelConfig.from_config({"size": "B", "img_size": 224, "patch_size": 16, "width": None, "depth": None,
                                   "num_heads": None, "decoder_width": 512}, stage=1)
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.stage) == (768, 12, 12, 1)  # DESIGN.md §2: ViT-B/16


def test_model_dir_layout(tmp_path):
  wd = tmp_path / "run"
  for sub in ("teacher/stage2", "students/kd", "students/occl_aug", "students/empty_no_ckpt"):
    (wd / sub).mkdir(parents=True)
  for sub in ("teacher/stage2", "students/kd", "students/occl_aug"):
    (wd / sub / "checkpoints").mkdir()
  assert au_infer.available_models(str(wd)) == ["teacher", "kd", "occl_aug"]
  assert au_infer.model_dir(str(wd)) == os.path.join(wd, "students", "kd")
  assert au_infer.model_dir(str(wd), "teacher") == os.path.join(wd, "teacher", "stage2")
  with pytest.raises(FileNotFoundError, match="occl_aug"):  # names what exists
    au_infer.model_dir(str(wd), "kd_drop")
  with pytest.raises(FileNotFoundError, match="no directory"):
    au_infer.model_dir(str(tmp_path / "missing"))


def test_drop_ids_keeps_the_least_occluded_patches():
  rng = np.random.default_rng(0)
  frac = rng.uniform(size=(3, 16)).astype(np.float32)
  ids = au_infer.drop_ids(frac, 0.5, bucket=4, min_keep=4)
  k = max(4, -(-int((frac <= 0.5).sum(1).max()) // 4) * 4)  # the batch's largest visible count, bucketed
  assert ids.shape == (3, k)
  for row, kept in zip(frac, ids, strict=True):
    assert np.all(np.diff(kept) > 0)  # patch order
    np.testing.assert_array_equal(np.sort(row[kept]), np.sort(row)[:k])  # the k least occluded
  assert au_infer.drop_ids(np.zeros((2, 16), np.float32), 0.5, 4, 4) is None  # nothing to drop
  np.testing.assert_array_equal(au_infer.pad_batch(np.arange(3)[:, None], 5)[:, 0], [0, 1, 2, 2, 2])
