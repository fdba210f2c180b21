"""The ImageNet path end to end, each stage through its own CLI, on a synthetic ImageNet-layout folder.

  class folders of images -> python -m dyngen.latent.extract (random SD-VAE weights of the real architecture,
  a diffusers .safetensors file) -> python -m dyngen.main on configs/dit_s.py and configs/dig_s.py (the
  ImageNet configs, shrunk by --config overrides) -> --mode=sample (decoded by the VAE, ADM npz) ->
  python -m dyngen.evaluate (random Inception weights in pytorch-fid's file format) -> FID, IS, P/R JSON.

What is asserted: every stage exits 0 (DiT's training also runs its periodic FID); training from images
with the VAE encoding on the fly gets the VAE's scaled posterior samples; the latents have the VAE's shape and every image is extracted once;
training reads them (losses finite); the samples are decoded uint8 images of the folder's size; a resumed
--mode=sample adds nothing; the evaluation writes finite metrics. Numbers of trained models are not
meaningful here (two training steps of random weights), so none is asserted beyond finiteness.
"""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tests import test_inception

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64  # 8x8x4 latents: the real VAE architecture at a CPU-friendly size
CLASSES, PER_CLASS = 2, 3


def run(module, *args, env_extra=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
  assert result.returncode == 0, f"{module} {args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
  return result


def shrunk_imagenet_config(config_file, workdir, latent_dir, vae, **model):
  """--config overrides that turn an ImageNet config into a two-step run on the extracted latents."""
  model_fields = dict(dict(input_size=IMAGE_SIZE // 8, num_classes=CLASSES, hidden_size=32, num_heads=2), **model)
  return ([f"--config={config_file}", f"--workdir={workdir}", f"--config.data.latent_dir={latent_dir}",
           f"--config.latent.vae={vae}", "--config.batch_size=4", "--config.num_train_steps=2",
           "--config.log_every_steps=1", "--config.checkpoint_every_steps=2", "--config.sample_every_steps=0",
           "--config.profile.num_steps=0", "--config.sample.num_steps=2", "--config.sample.num_samples=6",
           "--config.sample.batch_size=4", "--config.sample.cfg_scale=1.5"]
          + [f"--config.model.{name}={value}" for name, value in model_fields.items()])


@pytest.mark.slow  # ~2-3 min on a quiet 2-core CPU: eight subprocesses, the VAE and Inception compiled in each
def test_images_to_latents_to_training_to_samples_to_fid(tmp_path):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  from dyngen.latent import autoencoder, weights  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  folder = tmp_path / "imagenet_like"
  for label in range(CLASSES):
    (folder / f"n0000000{label}").mkdir(parents=True)
    for index in range(PER_CLASS):
      # Smooth random images (a low-resolution pattern upsampled), as photographs are smoother than noise.
      low = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
      Image.fromarray(low).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(
          folder / f"n0000000{label}" / f"{index}.JPEG", quality=95)
  vae_dir = tmp_path / "sd-vae"
  vae_dir.mkdir()
  state_dict = weights.seeded_state_dict(autoencoder.AutoencoderKLConfig(), seed=0)
  safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
                              str(vae_dir / "diffusion_pytorch_model.safetensors"))
  inception = test_inception.random_inception_file(tmp_path / "pt_inception.pth", seed=1)
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

  # 1. Latents.
  latent_dir = tmp_path / "latents"
  run("dyngen.latent.extract", f"--data={folder}", f"--vae={vae_dir}", f"--output={latent_dir}",
      f"--image_size={IMAGE_SIZE}", "--batch_size=3", "--shard_size=4", env_extra=cache)
  metadata = json.loads((latent_dir / "metadata.json").read_text())
  assert metadata["num_examples"] == CLASSES * PER_CLASS
  assert tuple(metadata["latent_shape"]) == (IMAGE_SIZE // 8, IMAGE_SIZE // 8, 4)

  # 2. A reference batch made from the folder by the evaluation tool.
  reference = tmp_path / "reference.npz"
  run("dyngen.evaluate", f"--make_reference={reference}", f"--images={folder}", f"--image_size={IMAGE_SIZE}",
      f"--inception={inception}", "--batch_size=3", env_extra=cache)
  # 3. Training from the ImageNet configs (DiT with FID as its periodic evaluation, and DiG), 4. sampling.
  samples = {}
  for family, extra in (("dit", dict(depth=2)), ("dig", dict(depth=4))):
    workdir = tmp_path / f"{family}_run"
    args = shrunk_imagenet_config(f"configs/{family}_s.py:S/2", workdir, latent_dir, vae_dir, **extra)
    evaluation = ([] if family != "dit" else
                  ["--config.evaluation.metric=adm_fid", f"--config.evaluation.reference={reference}",
                   f"--config.evaluation.inception={inception}", "--config.evaluation.num_samples=4"])
    trained = run("dyngen.main", *args, *evaluation, env_extra=cache)
    # The progress lines' mean loss ("Step 2/2 (100%): loss 0.1234, ..."; metrics themselves go to TensorBoard).
    losses = [float(match) for match in re.findall(r"Step \d+/\d+ \(\d+%\): loss ([^,\s]+)",
                                                    trained.stdout + trained.stderr)]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    if evaluation:
      scores = json.loads((workdir / "samples" / "eval_step_2.json").read_text())
      assert math.isfinite(scores["fid"]) and math.isfinite(scores["inception_score"])
    run("dyngen.main", *args, "--mode=sample", env_extra=cache)
    (npz,) = (workdir / "samples").glob(f"{family}_ddpm2_*.npz")
    arrays = np.load(npz)
    assert arrays["arr_0"].shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and arrays["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["arr_1"], [0, 1, 0, 1, 0, 1])
    assert not (workdir / "samples" / npz.stem).exists()  # the per-batch shards are merged and removed
    again = run("dyngen.main", *args, "--mode=sample", env_extra=cache)
    assert "nothing to sample" in again.stderr + again.stdout
    samples[family] = npz

  # Training from images with the VAE encoding on the fly (no extraction): the train step's batch is
  # scale · (a posterior sample) drawn with the step's "latent" key, through the same VAE.
  from dyngen.configs import dit_s  # pylint: disable=g-import-not-at-top
  from dyngen import data as data_lib  # pylint: disable=g-import-not-at-top
  from dyngen.train import objectives, trainer  # pylint: disable=g-import-not-at-top
  config = dit_s.get_config("S/2")
  config.data = data_lib.default_config("folder")
  config.data.update(dict(folder=str(folder), image_size=IMAGE_SIZE, data_dir=str(tmp_path / "tfds")))
  config.latent.vae = str(vae_dir)
  config.model.update(dict(input_size=IMAGE_SIZE // 8, num_classes=CLASSES, hidden_size=32, num_heads=2, depth=1))
  config.batch_size = config.sample.batch_size = 2
  on_the_fly = trainer.Run(config)
  images = rng.uniform(-1, 1, size=(2, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  rng_key = jax.random.key(3)
  batch = on_the_fly.prepare_batch(rng_key, 5, {"image": images, "label": np.array([0, 1], np.int32)})
  expected = on_the_fly.vae.encode_scaled(images, objectives.step_keys(rng_key, 5)["latent"])
  np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
  assert batch["image"].shape == (2, IMAGE_SIZE // 8, IMAGE_SIZE // 8, 4)

  # 5. Evaluation of the sampled npz files.
  for family, npz in samples.items():
    output = tmp_path / f"{family}_metrics.json"
    run("dyngen.evaluate", f"--samples={npz}", f"--reference={reference}", f"--inception={inception}",
        f"--output={output}", "--batch_size=3", env_extra=cache)
    metrics = json.loads(output.read_text())
    for name in ("fid", "sfid", "inception_score", "precision", "recall"):
      assert math.isfinite(metrics[name]), (family, name, metrics)
    assert metrics["fid"] > 0
