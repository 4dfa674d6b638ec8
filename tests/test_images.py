"""Image sources for MAE pretraining: a folder of images and a TFDS image dataset (a tiny local builder)."""

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from fixtures_au import corrupt
from PIL import Image

from maejax.data.images import (
  IMAGE_EXTS,
  VIDEO_EXTS,
  BadInputs,
  ImageFolderSource,
  TfdsImageSource,
  centre_square_box,
  index_frames,
  landmark_box,
  load_rgb,
  open_image_source,
  read_landmarks_csv,
)


def _write_tree(root):
  """Five images in nested folders with mixed formats/modes, plus files that are not images.

  Returns {relative path: expected uint8 (H, W, 3)}."""
  rng = np.random.default_rng(0)
  expected = {}

  def save(rel, array, **kw):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)
    return path

  rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
  save("b/face1.png", rgb)
  expected["b/face1.png"] = rgb
  grey = rng.integers(0, 256, (7, 5), dtype=np.uint8)
  save("a/z/grey.PNG", grey)
  expected["a/z/grey.PNG"] = np.repeat(grey[..., None], 3, -1)
  rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
  rgba[..., 3] = 255
  save("a/alpha.png", rgba)
  expected["a/alpha.png"] = rgba[..., :3]
  bmp = rng.integers(0, 256, (4, 9, 3), dtype=np.uint8)
  save("c.bmp", bmp)
  expected["c.bmp"] = bmp
  webp = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
  save("d/e.webp", webp, lossless=True)
  expected["d/e.webp"] = webp
  flat = np.full((16, 16, 3), 77, np.uint8)
  save("d/flat.jpeg", flat, quality=95)
  expected["d/flat.jpeg"] = flat  # JPEG of a flat colour decodes to the same colour (±1)
  (root / "notes.txt").write_text("not an image")
  (root / "d" / "labels.csv").write_text("1,2\n")
  return expected


def test_image_folder_source(tmp_path):
  expected = _write_tree(tmp_path)
  src = ImageFolderSource(tmp_path)
  rel = [Path(p).relative_to(tmp_path).as_posix() for p in src.paths]
  assert rel == sorted(expected)  # recursive, sorted by relative path, non-images ignored
  assert len(src) == 6
  for i, name in enumerate(rel):
    record = src[i]
    assert set(record) == {"image"}
    image = record["image"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    np.testing.assert_allclose(image, expected[name], atol=1 if name.endswith("jpeg") else 0)
  assert np.array_equal(src[-1]["image"], src[len(src) - 1]["image"])
  with pytest.raises(IndexError):
    src[len(src)]
  clone = pickle.loads(pickle.dumps(src))
  assert np.array_equal(clone[2]["image"], src[2]["image"])
  assert isinstance(open_image_source(str(tmp_path)), ImageFolderSource)


def test_image_folder_corrupt_file(tmp_path):
  _write_tree(tmp_path)
  bad = tmp_path / "b" / "face1.png"
  corrupt(bad)
  src = ImageFolderSource(tmp_path)
  index = src.paths.index(str(bad))
  with pytest.raises(ValueError, match=re.escape(str(bad))):
    src[index]
  skipping = ImageFolderSource(tmp_path, skip_bad=True)
  assert len(skipping) == len(src) - 1 and str(bad) not in skipping.paths
  assert skipping.bad.count == 1 and str(bad) in skipping.bad.examples[0]
  assert "skipped 1 bad images" in skipping.bad.summary()


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    ImageFolderSource(tmp_path / "nope")
  (tmp_path / "x.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="No images"):
    ImageFolderSource(tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    load_rgb(tmp_path / "missing.jpg")


def test_boxes_and_landmarks_file(tmp_path):
  assert centre_square_box(48, 64) == (8, 0, 56, 48)
  assert centre_square_box(30, 20) == (0, 5, 20, 25)
  # Extent 20 x 10 around centre (20, 15): side 1.4 * 20 = 28.
  np.testing.assert_allclose(landmark_box(np.array([[10, 10], [30, 20], [20, 15]])), (6, 1, 34, 29))
  path = tmp_path / "lm.csv"
  path.write_text("frame,x0,y0,x1,y1\n3,1,2,3,4\n4,5,6,7,8\n")
  points = read_landmarks_csv(path)
  assert sorted(points) == [3, 4]
  np.testing.assert_array_equal(points[4], [[5, 6], [7, 8]])
  path.write_text("3,1,2,3,4\n4,5,6,7\n")
  with pytest.raises(ValueError, match=re.escape(str(path)) + ": line 2"):
    read_landmarks_csv(path)


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A 4-example grey-scale image dataset written locally (stands in for imagenet2012)."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default needs `importlib_resources` when this file is imported as part of a package.
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "label": tfds.features.ClassLabel(num_classes=2),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(4), "validation": self._generate_examples(2)}

  def _generate_examples(self, n):
    import io

    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(np.full((3 + i, 5, 1), 10 * i, np.uint8)[..., 0]).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": i % 2}


def test_tfds_image_source(tmp_path):
  TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  src = TfdsImageSource("tiny_images", split="train", data_dir=tmp_path)
  assert len(src) == 4
  heights = set()
  for i in range(len(src)):
    image = src[i]["image"]
    assert image.dtype == np.uint8 and image.shape[1:] == (5, 3)
    value = int(image[0, 0, 0])
    assert value % 10 == 0 and (image == value).all()
    heights.add(image.shape[0] - value // 10)
  assert heights == {3}  # each example decoded to its own size: height 3 + i, value 10 i
  clone = pickle.loads(pickle.dumps(src))
  assert np.array_equal(clone[1]["image"], src[1]["image"])
  val = open_image_source("tfds:tiny_images:validation", data_dir=tmp_path)
  assert isinstance(val, TfdsImageSource) and len(val) == 2
  with pytest.raises(ValueError, match="no feature 'img'"):
    TfdsImageSource("tiny_images", data_dir=tmp_path, image_key="img")[0]


# The formats maejax reads, typed here independently of maejax.data.images.
EVERY_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
EVERY_VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv")


def test_every_image_ext_is_listed_and_decoded(tmp_path):
  assert IMAGE_EXTS == EVERY_IMAGE_EXT and VIDEO_EXTS == EVERY_VIDEO_EXT
  grey = np.arange(6 * 8, dtype=np.uint8).reshape(6, 8) * 5
  for ext in EVERY_IMAGE_EXT:  # lossless saves of one grey image, upper-case names for half of them
    name = f"img{ext.upper()}" if ext in (".gif", ".tif", ".ppm") else f"img{ext}"
    kwargs = {"quality": 100, "subsampling": 0} if ext in (".jpg", ".jpeg") else {}
    kwargs |= {"lossless": True} if ext == ".webp" else {}
    (tmp_path / ext[1:]).mkdir()
    Image.fromarray(grey).save(tmp_path / ext[1:] / name, **kwargs)
  (tmp_path / "clip.mp4").write_bytes(b"not read: a video")
  src = ImageFolderSource(tmp_path)
  assert sorted(Path(p).suffix.lower() for p in src.paths) == sorted(EVERY_IMAGE_EXT)
  for i, path in enumerate(src.paths):
    image = src[i]["image"]
    atol = 2 if path.endswith(("jpg", "jpeg")) else 0
    np.testing.assert_allclose(image, np.repeat(grey[..., None], 3, -1), atol=atol, err_msg=path)


def test_index_frames_reads_the_trailing_number(tmp_path):
  for name in ("frame_000012.jpg", "frame_000003.png", "SN001_7.bmp", "notes.txt", "labels.csv"):
    (tmp_path / name).write_bytes(b"")
  assert index_frames(tmp_path, BadInputs(False)) == {
    12: tmp_path / "frame_000012.jpg", 3: tmp_path / "frame_000003.png", 7: tmp_path / "SN001_7.bmp"}
  (tmp_path / "thumb.jpg").write_bytes(b"")
  (tmp_path / "12.jpg").write_bytes(b"")
  duplicate = f"{tmp_path / 'frame_000012.jpg'}: frame 12 also stored as {tmp_path / '12.jpg'}"
  with pytest.raises(ValueError, match=re.escape(duplicate)):
    index_frames(tmp_path, BadInputs(False))
  bad = BadInputs(True)
  assert sorted(index_frames(tmp_path, bad)) == [3, 7, 12] and bad.count == 2
  assert any("thumb.jpg: image name does not end in a frame number" in line for line in bad.examples)
