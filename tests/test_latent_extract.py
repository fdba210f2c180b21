"""Latent extraction (dyngen.latent.extract) and the training pipeline that reads it (dyngen.data.latents).

A small ImageNet-layout folder (3 classes of random images of odd sizes) and a small VAE of the real kind
(random weights by the fixture rule, written as a diffusers folder: config.json + safetensors) are made
here. Every stored latent is checked against the VAE run in this process on the same ADM crop
(float32; 1e-5 allows for XLA choosing other conv tilings for another batch size), and the posterior std
against exp(logvar / 2).
"""
import json
import os
import signal
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from dyngen import latent
from dyngen.data import latents as latents_lib
from dyngen.data import transforms
from dyngen.latent import extract
from dyngen.latent import weights as weights_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("n01440764", "n01443537", "n01484850")
IMAGES_PER_CLASS = 5
IMAGE_SIZE = 32
SMALL = latent.AutoencoderKLConfig(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("latent_extract")
  rng = np.random.default_rng(0)
  for label, name in enumerate(CLASSES):
    os.makedirs(root / "images" / name)
    for i in range(IMAGES_PER_CLASS):
      # Landscape, portrait and square images larger and smaller than the crop.
      height, width = [(40, 56), (64, 36), (33, 33), (80, 96), (30, 45)][i]
      Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
          root / "images" / name / f"{i:03d}.png")
  vae_dir = root / "vae"
  os.makedirs(vae_dir)
  save_file(weights_lib.seeded_state_dict(SMALL, seed=1), str(vae_dir / "diffusion_pytorch_model.safetensors"))
  fields = {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32], "layers_per_block": 1,
            "norm_num_groups": 8, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}
  (vae_dir / "config.json").write_text(json.dumps(fields))
  vae = latent.load_autoencoder(vae_dir)
  # The reference: the ADM crop of every file, in the folder dataset's order (classes, then file names).
  crops, labels = [], []
  for label, name in enumerate(CLASSES):
    for i in range(IMAGES_PER_CLASS):
      with Image.open(root / "images" / name / f"{i:03d}.png") as image:
        crops.append(transforms.center_crop_adm(image.convert("RGB"), IMAGE_SIZE))
      labels.append(label)
  x = np.stack(crops).astype(np.float32) / 127.5 - 1
  mean, logvar = vae.encode(x)
  mean_flip, logvar_flip = vae.encode(x[:, :, ::-1])
  reference = dict(mean=np.asarray(mean), std=np.exp(0.5 * np.asarray(logvar)), mean_flip=np.asarray(mean_flip),
                   std_flip=np.exp(0.5 * np.asarray(logvar_flip)), label=np.array(labels))
  return dict(root=root, vae_dir=vae_dir, vae=vae, reference=reference)


def command(setup, output, *extra):
  return [sys.executable, "-m", "dyngen.latent.extract", f"--data={setup['root'] / 'images'}",
          f"--vae={setup['vae_dir']}", f"--output={output}", f"--image_size={IMAGE_SIZE}", "--shard_size=4",
          "--batch_size=2", f"--data_dir={setup['root'] / 'tfds'}", "--log_every_s=0", *extra]


def read_all(output):
  """Every record of the shards in metadata order, as lists per key."""
  from array_record.python import array_record_module
  metadata = json.loads((output / "metadata.json").read_text())
  records = []
  for path in latents_lib.shard_paths(str(output), metadata):
    reader = array_record_module.ArrayRecordReader(path)
    records += [extract.decode_record(r) for r in reader.read_all()]
    reader.close()
  return metadata, records


def check_records(records, reference):
  n = len(CLASSES) * IMAGES_PER_CLASS
  assert [r["index"] for r in records] == list(range(n)), "every image exactly once, in index order"
  np.testing.assert_array_equal([r["label"] for r in records], reference["label"])
  for key in ("mean", "std", "mean_flip", "std_flip"):
    stored = np.stack([r[key] for r in records])
    assert stored.shape == (n, IMAGE_SIZE // 2, IMAGE_SIZE // 2, 4) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, reference[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_extraction_resumes_after_sigkill(setup, tmp_path):
  """Killed (SIGKILL) in the middle of a shard over 2 devices, the rerun writes only the missing shards."""
  output = tmp_path / "latents"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT)
  process = subprocess.Popen(command(setup, output), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, cwd=REPO_ROOT)
  seen = []
  for line in process.stdout:
    seen.append(line)
    # The first batch of shard 1 is in its temporary file: kill while that shard is incomplete.
    if line.startswith("shard 1/4:"):
      process.send_signal(signal.SIGKILL)
      break
  process.wait(timeout=60)
  assert process.returncode == -signal.SIGKILL, "".join(seen)
  assert any("2 local cpu device(s)" in line for line in seen), "".join(seen)
  complete = sorted(p.name for p in output.glob("*.array_record"))
  assert complete[0] == "latents-00000-of-00004.array_record" and len(complete) < 4, complete
  before = {name: os.stat(output / name).st_mtime_ns for name in complete}

  rerun = subprocess.run(command(setup, output), capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                         timeout=120)
  assert rerun.returncode == 0, rerun.stdout + rerun.stderr
  assert f"{len(complete)} of 4 shards complete, {4 - len(complete)} to write" in rerun.stdout, rerun.stdout
  assert {name: os.stat(output / name).st_mtime_ns for name in complete} == before, "complete shards kept"
  assert not list(output.glob("*.tmp-*")), "partial files removed"
  metadata, records = read_all(output)
  assert metadata["num_examples"] == 15 and metadata["latent_shape"] == [16, 16, 4]
  assert metadata["class_names"] == list(CLASSES) and metadata["vae_id"].startswith("sha256:")
  check_records(records, setup["reference"])


def extract_in_process(setup, output, **overrides):
  data_config = extract.data_config_of(str(setup["root"] / "images"), IMAGE_SIZE, str(setup["root"] / "tfds"), 2)
  lines = []
  kwargs = dict(shard_size=4, batch_size=2, log=lines.append, log_every_s=1e9)
  kwargs.update(overrides)
  extract.extract_latents(data_config, setup["vae"], str(output), **kwargs)
  return lines


def test_hosts_share_the_shards(setup, tmp_path):
  """Two processes (here run one after the other) write disjoint shards that together hold every image."""
  output = tmp_path / "latents"
  extract_in_process(setup, output, process_index=1, process_count=2)
  assert sorted(p.name for p in output.glob("*.array_record")) == [
      "latents-00001-of-00004.array_record", "latents-00003-of-00004.array_record"]
  with pytest.raises(FileNotFoundError, match="2 of 4 shards are missing"):
    latents_lib.read_metadata(str(output))
  extract_in_process(setup, output, process_index=0, process_count=2)
  _, records = read_all(output)
  check_records(records, setup["reference"])
  # Another image size into the same folder would mix extractions: refused, naming the field.
  with pytest.raises(ValueError, match="image_size: 32 there, 16 now"):
    data_config = extract.data_config_of(str(setup["root"] / "images"), 16, str(setup["root"] / "tfds"))
    extract.extract_latents(data_config, setup["vae"], str(output), shard_size=4, batch_size=2, log=lambda _: None)
  with pytest.raises(ValueError, match="neither a folder"):
    extract.data_config_of(str(tmp_path / "nothing"), 32)

  # The training pipeline over these shards.
  data_config = latents_lib.default_config(str(output))
  data_config.read_threads = 1
  info = latents_lib.latent_info(data_config)
  assert info.image_shape == (16, 16, 4) and info.num_classes == 3 and info.num_train_examples == 15
  reference = setup["reference"]
  iterator = latents_lib.create_latent_pipeline(data_config, global_batch_size=4, seed=3, process_index=0,
                                                process_count=2)
  batches = [next(iterator) for _ in range(8)]  # 8 batches of 2 = 16 elements: more than one epoch
  assert batches[0]["mean"].shape == (2, 16, 16, 4) and batches[0]["label"].dtype == np.int32
  flipped = 0
  for batch in batches:
    for mean, std, label in zip(batch["mean"], batch["std"], batch["label"]):
      # Each element is one image's posterior, as it is or flipped, with its own label.
      candidates = [(i, flip) for i in range(15) for flip in ("", "_flip")
                    if np.allclose(mean, reference["mean" + flip][i], rtol=1e-5, atol=1e-5)]
      assert len(candidates) == 1
      i, flip = candidates[0]
      flipped += flip == "_flip"
      np.testing.assert_allclose(std, reference["std" + flip][i], rtol=1e-5, atol=1e-5)
      assert label == reference["label"][i]
  assert 0 < flipped < 16  # 16 fair coins: all heads or all tails has probability 3e-5, and the seed is fixed
  # The other host gets the other half of the same global stream; a restored state resumes exactly.
  state = iterator.get_state()
  following = next(iterator)
  resumed = latents_lib.create_latent_pipeline(data_config, global_batch_size=4, seed=3, process_index=0,
                                               process_count=2)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["mean"], following["mean"])
  first_epoch = []
  for host in range(2):
    it = latents_lib.create_latent_pipeline(data_config, global_batch_size=2, seed=3, process_index=host,
                                            process_count=2, num_epochs=1, drop_remainder=False)
    first_epoch += [m for batch in it for m in batch["mean"]]
  assert len(first_epoch) == 15


def test_sample_latents():
  mean = np.full((2000, 2, 2, 4), 0.5, np.float32)
  std = np.full((2000, 2, 2, 4), 2.0, np.float32)
  labels = np.arange(2000, dtype=np.int32)
  # training_batch = {"image": sample_latents(...), "label": ...}; one compiled program for both keys.
  step_batch = jax.jit(latents_lib.training_batch, static_argnums=2)
  batch = step_batch({"mean": mean, "std": std, "label": labels}, jax.random.key(0), 0.18215)
  z = np.asarray(batch["image"])
  np.testing.assert_array_equal(batch["label"], labels)
  # 32000 draws of 0.18215 * N(0.5, 2²): mean within 4 standard errors, std within 2%.
  assert abs(float(z.mean()) - 0.18215 * 0.5) < 4 * 0.18215 * 2 / np.sqrt(z.size)
  assert abs(float(z.std()) / (0.18215 * 2) - 1) < 0.02
  # The noise is the step key's: another key, another sample.
  other = step_batch({"mean": mean, "std": std, "label": labels}, jax.random.key(1), 0.18215)["image"]
  assert not np.allclose(other, z)


def test_missing_extraction_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m dyngen.latent.extract"):
    latents_lib.latent_info(ml_collections.ConfigDict({"latent_dir": str(tmp_path)}))
  with pytest.raises(ValueError, match="latent_dir is empty"):
    latents_lib.create_latent_pipeline(latents_lib.default_config(""), global_batch_size=2, seed=0,
                                       process_index=0, process_count=1)
