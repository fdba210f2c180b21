"""Datasets and the grain pipeline: the embedded digits against scikit-learn, the ADM crop against a
float64 reference, sharding/determinism/resumption against the single-host stream, folders of PNGs, and
the errors users meet. Everything is built into tmp data dirs."""
import io
import os
import subprocess
import sys
import tarfile

import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from sklearn.datasets import load_digits

from dyngen import data
from dyngen.data import digits as digits_lib


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
  config = data.default_config("digits")
  config.data_dir = str(tmp_path_factory.mktemp("tfds"))
  return config


def sklearn_split(split):
  """The independent reference: the split's images straight from scikit-learn, 0..16 scaled to 0..255."""
  digits = load_digits()
  indices = digits_lib.digits_split_indices()[split]
  pixels = np.round(digits.images[indices] * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return pixels, digits.target[indices]


def to_uint8(images):
  """Pipeline float32 [-1, 1] back to 0..255 (exact for images that came from uint8)."""
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


# ---------------------------------------------------------------- digits dataset

def test_digits_split_is_stratified_and_complete():
  split = digits_lib.digits_split_indices()
  targets = load_digits().target
  assert len(split["train"]) == 1497 and len(split["test"]) == 300
  assert np.intersect1d(split["train"], split["test"]).size == 0
  np.testing.assert_array_equal(np.union1d(split["train"], split["test"]), np.arange(1797))
  np.testing.assert_array_equal(np.bincount(targets[split["test"]]), np.full(10, 30))


def test_digits_dataset_matches_sklearn(digits_config):
  info = data.dataset_info(digits_config)
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  assert info.num_examples == {"train": 1497, "test": 300} and info.num_train_examples == 1497
  for split in ("train", "test"):
    images, labels = data.load_split_arrays(digits_config, split)
    reference_images, reference_labels = sklearn_split(split)
    assert images.dtype == np.float32 and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0  # Blank paper and full ink both occur.
    # At the native 8x8 the ADM crop is the identity, so the stored PNGs must give back sklearn exactly.
    np.testing.assert_array_equal(to_uint8(images), reference_images)
    np.testing.assert_array_equal(labels, reference_labels)


def test_digits_upsampled_to_16(digits_config):
  config = digits_config.copy_and_resolve_references()
  config.image_size = 16
  assert data.dataset_info(config).image_shape == (16, 16, 1)
  images, _ = data.load_split_arrays(config, "test")
  reference, _ = sklearn_split("test")
  expected = np.stack([reference_center_crop_adm(image[..., 0], 16) for image in reference])[..., None]
  # Same float64 reference and tolerance as test_center_crop_adm_matches_float64_reference.
  assert np.abs(to_uint8(images).astype(np.float64) - expected).max() <= 1.0


# ---------------------------------------------------------------- ADM centre crop

def _cubic(x, a=-0.5):
  x = np.abs(x)
  return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _box(x):
  return ((x >= -0.5) & (x < 0.5)).astype(np.float64)


def _resample_matrix(in_size, out_size, kernel, support):
  """(out, in) weights of a separable antialiased resize: the kernel stretched by the downscale factor,
  centred on each output pixel's centre in input coordinates, normalised to sum 1."""
  scale = in_size / out_size
  stretch = max(scale, 1.0)
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    centre = (i + 0.5) * scale
    lo = max(int(centre - support * stretch + 0.5), 0)
    hi = min(int(centre + support * stretch + 0.5), in_size)
    taps = np.arange(lo, hi)
    w = kernel((taps - centre + 0.5) / stretch)
    weights[i, taps] = w / w.sum()
  return weights


def _resize(image, width, height, kernel, support):
  """Horizontal pass, then vertical, each rounded to uint8 levels (halves up): what PIL does with 8-bit
  images. Halves are common: upsampling by 2 has dyadic weights (e.g. -9/128)."""
  cols = _resample_matrix(image.shape[1], width, kernel, support)
  image = np.clip(np.floor(np.einsum("xj,yj...->yx...", cols, image) + 0.5), 0, 255)
  rows = _resample_matrix(image.shape[0], height, kernel, support)
  return np.clip(np.floor(np.einsum("yi,ix...->yx...", rows, image) + 0.5), 0, 255)


def reference_center_crop_adm(image, size):
  """float64 ADM centre crop of a uint8 (H, W[, C]) image, rounding to uint8 after every pass as PIL."""
  image = image.astype(np.float64)
  while min(image.shape[:2]) >= 2 * size:
    image = _resize(image, image.shape[1] // 2, image.shape[0] // 2, _box, 0.5)
  scale = size / min(image.shape[:2])
  height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
  image = _resize(image, width, height, _cubic, 2.0)
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


@pytest.mark.parametrize("height, width, channels, size", [
    (64, 48, 3, 8),    # two box halvings (64x48 -> 16x12), bicubic down to 11x8, crop 1 column
    (45, 70, 3, 16),   # one odd halving (45x70 -> 22x35), bicubic down, crop columns
    (37, 37, 1, 16),   # one halving to 18x18, bicubic down, no crop
    (9, 13, 1, 16),    # upsampling: bicubic up to 16x23, crop 3 columns on the left
])
def test_center_crop_adm_matches_float64_reference(height, width, channels, size):
  rng = np.random.default_rng(height * width)
  pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze(-1) if channels == 1 else \
      rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  result = data.center_crop_adm(Image.fromarray(pixels), size)
  expected = reference_center_crop_adm(pixels, size)
  assert result.shape == expected.shape == (size, size) + ((3,) if channels == 3 else ())
  # PIL computes the same weighted sums in fixed point (weights with 22 fractional bits): a sum that
  # lands within ~1e-5 of a .5 can round the other way, so at most 1 level apart.
  assert np.abs(result.astype(np.float64) - expected).max() <= 1.0


def test_center_crop_adm_keeps_constant_images_and_the_centre():
  gray = np.full((100, 60, 3), 77, np.uint8)
  np.testing.assert_array_equal(data.center_crop_adm(Image.fromarray(gray), 16), np.full((16, 16, 3), 77))
  # A 40x120 image: one halving to 20x60, bicubic to 16x48, columns 16:32 kept = input columns 40:80.
  # A white band over input columns 30:90 covers them with 10 pixels to spare on each side (more than
  # the 5-pixel reach of the stretched bicubic kernel): the crop is all white only if it is centred.
  stripes = np.zeros((40, 120), np.uint8)
  stripes[:, 30:90] = 255
  result = data.center_crop_adm(Image.fromarray(stripes), 16)
  np.testing.assert_array_equal(result, np.full((16, 16), 255))
  with pytest.raises(ValueError, match="image_size must be a positive number of pixels, got 0"):
    data.center_crop_adm(Image.fromarray(gray), 0)


# ---------------------------------------------------------------- pipeline: order, shards, flips, state

def test_unshuffled_pipeline_reads_the_split_in_order(digits_config):
  iterator = data.create_input_pipeline(digits_config, global_batch_size=100, seed=0, process_index=0,
                                        process_count=1, split="test", shuffle=False, num_epochs=1)
  batches = list(iterator)
  assert len(batches) == 3  # 300 test images, batches of 100.
  reference_images, reference_labels = sklearn_split("test")
  np.testing.assert_array_equal(to_uint8(np.concatenate([b["image"] for b in batches])), reference_images)
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), reference_labels)


def test_same_seed_same_batches_other_seed_other_batches(digits_config):
  def first_batches(seed):
    return take(data.create_input_pipeline(digits_config, global_batch_size=16, seed=seed, process_index=0,
                                           process_count=1), 3)
  first, again, other = first_batches(7), first_batches(7), first_batches(8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  assert first[0]["image"].shape == (16, 8, 8, 1) and first[0]["label"].shape == (16,)
  assert first[0]["image"].dtype == np.float32 and first[0]["label"].dtype == np.int32


def test_hosts_split_the_global_stream(digits_config):
  # 3 hosts x 4 = global batch 12. Host p's batch s must be rows 4p .. 4p+3 of the one-host batch s (the rows
  # its devices hold in the global array): together the hosts read exactly the one-host stream, in the one-host
  # order, and no example twice within an epoch.
  steps = 130  # > one epoch of 1497 examples (124.75 steps): crosses the reshuffle between epochs.
  single = take(data.create_input_pipeline(digits_config, global_batch_size=12, seed=3, process_index=0,
                                           process_count=1), steps)
  for host in range(3):
    shard = take(data.create_input_pipeline(digits_config, global_batch_size=12, seed=3, process_index=host,
                                            process_count=3), steps)
    for whole, part in zip(single, shard):
      np.testing.assert_array_equal(part["image"], whole["image"][4 * host:4 * (host + 1)])
      np.testing.assert_array_equal(part["label"], whole["label"][4 * host:4 * (host + 1)])
  # The first epoch of the one-host stream is a permutation of the train split.
  stream = to_uint8(np.concatenate([b["image"] for b in single]))
  labels = np.concatenate([b["label"] for b in single])
  reference_images, reference_labels = sklearn_split("train")
  epoch = slice(0, 1497)
  order = np.lexsort(stream[epoch].reshape(1497, -1).T)
  reference_order = np.lexsort(reference_images.reshape(1497, -1).T)
  np.testing.assert_array_equal(stream[epoch][order], reference_images[reference_order])
  np.testing.assert_array_equal(labels[epoch][order], reference_labels[reference_order])
  # The second epoch is shuffled differently.
  assert not np.array_equal(labels[1497:1497 + 60], labels[:60])


def test_random_flip_mirrors_about_half(digits_config):
  config = digits_config.copy_and_resolve_references()
  config.random_flip = True
  iterator = data.create_input_pipeline(config, global_batch_size=1497, seed=0, process_index=0,
                                        process_count=1, shuffle=False, num_epochs=1)
  flipped_or_not = to_uint8(next(iterator)["image"])
  reference, _ = sklearn_split("train")
  is_original = np.all(flipped_or_not == reference, axis=(1, 2, 3))
  is_mirror = np.all(flipped_or_not == reference[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(is_original | is_mirror)
  flipped = np.sum(is_mirror & ~is_original)
  # Fair coin per image: 748.5 +- 19.3 (1 sigma); 5 sigma bounds.
  assert 652 < flipped < 845


def test_iterator_state_resumes_exactly_through_orbax(digits_config, tmp_path):
  config = digits_config.copy_and_resolve_references()
  config.random_flip = True
  def pipeline():
    return data.create_input_pipeline(config, global_batch_size=64, seed=11, process_index=0, process_count=1)
  iterator = pipeline()
  take(iterator, 30)  # Into the second epoch (1497 / 64 = 23.4 steps per epoch).
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.save(30, args=ocp.args.Composite(data_iterator=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 3)

  resumed = pipeline()
  next(resumed)  # A fresh iterator somewhere else: restoring must move it.
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.restore(30, args=ocp.args.Composite(data_iterator=grain.checkpoint.CheckpointRestore(resumed)))
  for want, got in zip(expected, take(resumed, 3)):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  # The state is also usable directly (a JSON-able dict).
  direct = pipeline()
  direct.set_state(iterator.get_state())
  np.testing.assert_array_equal(next(direct)["image"], next(iterator)["image"])


# ---------------------------------------------------------------- folders of images

def write_image_folder(root, rng):
  """Two classes, written in reverse-alphabetical order: labels must follow sorted names."""
  sizes = {"zebra": [(20, 30), (31, 24)], "apple": [(40, 40), (17, 50), (25, 25)]}
  files = {}
  for class_name, shapes in sizes.items():
    os.makedirs(root / class_name)
    for i, shape in enumerate(shapes):
      path = root / class_name / f"{i}.png"
      Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(path)
      files[f"{class_name}/{i}.png"] = path
  # A grayscale JPEG, converted to RGB by the pipeline; and a file that is not an image, ignored.
  Image.fromarray(rng.integers(0, 256, (30, 20), dtype=np.uint8)).save(root / "apple" / "gray.jpg")
  files["apple/gray.jpg"] = root / "apple" / "gray.jpg"
  (root / "apple" / "notes.txt").write_text("not an image")
  return files


def test_folder_dataset(tmp_path):
  files = write_image_folder(tmp_path / "images", np.random.default_rng(0))
  config = data.default_config("folder")
  config.update(data_dir=str(tmp_path / "tfds"), folder=str(tmp_path / "images"), image_size=16,
                random_flip=False)
  info = data.dataset_info(config)
  assert info.class_names == ("apple", "zebra") and info.num_classes == 2
  assert info.num_examples == {"train": 6} and info.image_shape == (16, 16, 3)
  images, labels = data.load_split_arrays(config, "train")
  stored_order = ["apple/0.png", "apple/1.png", "apple/2.png", "apple/gray.jpg", "zebra/0.png", "zebra/1.png"]
  np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1])
  for image, name in zip(images, stored_order):
    with Image.open(files[name]) as original:
      expected = data.center_crop_adm(original.convert("RGB"), 16)
    np.testing.assert_array_equal(to_uint8(image), expected)
  batch = next(data.create_input_pipeline(config, global_batch_size=4, seed=0, process_index=0,
                                          process_count=1))
  assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"]) <= {0, 1}


def test_folder_errors(tmp_path):
  config = data.default_config("folder")
  config.data_dir = str(tmp_path / "tfds")
  with pytest.raises(ValueError, match="config.data.folder must name a folder"):
    data.dataset_info(config)
  config.folder = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    data.dataset_info(config)
  (tmp_path / "empty" / "cats").mkdir(parents=True)
  config.folder = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="has no class subfolders with images"):
    data.dataset_info(config)
  (tmp_path / "broken" / "cats").mkdir(parents=True)
  (tmp_path / "broken" / "cats" / "1.png").write_bytes(b"not a png")
  config.folder = str(tmp_path / "broken")
  with pytest.raises(ValueError, match=r"1.png is not a readable image"):
    data.dataset_info(config)


# ---------------------------------------------------------------- errors

def test_config_errors(digits_config, tmp_path):
  with pytest.raises(ValueError, match="config.data.name='mnist' is not a dataset of dyngen"):
    config = digits_config.copy_and_resolve_references()
    config.name = "mnist"
    data.dataset_info(config)
  with pytest.raises(ValueError, match="global_batch_size=10 must be a positive multiple of process_count=4"):
    data.create_input_pipeline(digits_config, global_batch_size=10, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    data.create_input_pipeline(digits_config, global_batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="split='validation' is not a split of digits"):
    data.create_input_pipeline(digits_config, global_batch_size=4, seed=0, process_index=0, process_count=1,
                               split="validation")
  config = digits_config.copy_and_resolve_references()
  config.image_size = 0
  with pytest.raises(ValueError, match="config.data.image_size must be a positive int"):
    data.dataset_info(config)
  imagenet = data.default_config("imagenet2012")
  imagenet.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="imagenet2012 is not prepared(.|\n)*tfds build imagenet2012"):
    data.dataset_info(imagenet)


# ---------------------------------------------------------------- ImageNet through tfds imagenet2012

def _jpeg(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
  return buffer.getvalue()


def _add_to_tar(tar, name, payload):
  entry = tarfile.TarInfo(name)
  entry.size = len(payload)
  tar.addfile(entry, io.BytesIO(payload))


def test_imagenet_pipeline_on_a_tiny_fake_imagenet(tmp_path):
  """tfds' own imagenet2012 builder prepares fake ILSVRC tars (2 synsets x 3 JPEGs, 2 validation JPEGs)
  in array_record; the pipeline then reads it like the real one. ~10 s: the builder imports tensorflow."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  train_pixels = {}
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
    for synset in ("n01440764", "n01443537"):  # Labels 0 and 1 of the 1000 ImageNet classes.
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(3):
          pixels = rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)
          train_pixels[f"{synset}_{i}.JPEG"] = _jpeg(pixels)
          _add_to_tar(tar, f"{synset}_{i}.JPEG", train_pixels[f"{synset}_{i}.JPEG"])
      _add_to_tar(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
    for i in (1, 2):
      _add_to_tar(tar, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng.integers(0, 256, (60, 40, 3), np.uint8)))
  download_config = tfds.download.DownloadConfig(manual_dir=str(manual))
  # Prepared as TFRecord (tfds' default): refused with the conversion command.
  tfds.builder("imagenet2012", data_dir=str(tmp_path / "tfrecord")).download_and_prepare(
      download_config=download_config)
  config = data.default_config("imagenet2012")
  config.data_dir = str(tmp_path / "tfrecord")
  with pytest.raises(FileNotFoundError, match="stored as \\['tfrecord'\\](.|\n)*tfds convert_format"):
    data.dataset_info(config)

  builder = tfds.builder("imagenet2012", data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=download_config)

  config.update(data_dir=str(tmp_path), image_size=16)
  info = data.dataset_info(config)
  assert info.num_classes == 1000 and info.image_shape == (16, 16, 3)
  assert info.num_examples == {"train": 6, "validation": 2}
  batch = next(data.create_input_pipeline(config, global_batch_size=6, seed=0, process_index=0,
                                          process_count=1, num_epochs=1))
  assert sorted(batch["label"]) == [0, 0, 0, 1, 1, 1]
  # Every image is the ADM crop of one of the JPEGs, possibly mirrored (random_flip is on for ImageNet).
  crops = [data.center_crop_adm(Image.open(io.BytesIO(jpeg)).convert("RGB"), 16) for jpeg in train_pixels.values()]
  for image in to_uint8(batch["image"]):
    assert any(np.array_equal(image, c) or np.array_equal(image, c[:, ::-1]) for c in crops)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(digits_config, tmp_path):
  """worker_count > 0 (grain worker processes) needs a main guard and parsed absl flags: run it as a script.
  Slow: every worker process imports jax and tfds."""
  script = tmp_path / "workers.py"
  script.write_text(f"""
from absl import app
import numpy as np
from dyngen import data

def main(_):
  config = data.default_config("digits")
  config.update(data_dir={digits_config.data_dir!r}, random_flip=True)
  def pipeline(worker_count):
    config.worker_count = worker_count
    return data.create_input_pipeline(config, global_batch_size=32, seed=1, process_index=0, process_count=1)
  in_process, workers = pipeline(0), pipeline(2)
  same = all(np.array_equal(next(in_process)["image"], next(workers)["image"]) for _ in range(6))
  workers.close()
  print("RESULT", same)

if __name__ == "__main__":
  app.run(main)
""")
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.environ.get("PYTHONPATH", "")]))
  result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert "RESULT True" in result.stdout, result.stderr[-3000:]
