"""Sampling outputs: uint8 conversion, grids, the ADM .npz format, and `--mode=sample` from a checkpoint."""
import jax
import numpy as np
import pytest
from PIL import Image

from dyngen import checkpoint
from dyngen.train import sample as sample_lib
from dyngen.train import trainer


def test_to_uint8_matches_dit_sample_ddp():
  # DiT's sample_ddp.py: clamp(127.5 * x + 128, 0, 255).to(uint8), which truncates.
  values = np.array([-2.0, -1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 3.0], np.float32)
  expected = np.array([0, 0, 0, 128, 191, 255, 255, 255], np.uint8)
  np.testing.assert_array_equal(sample_lib.to_uint8(values), expected)


def test_image_grid_places_images_row_major_with_padding():
  images = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
  grid = sample_lib.image_grid(images, columns=3, padding=1)
  assert grid.shape == (1 + 2 * (2 + 1), 1 + 3 * (3 + 1), 1)
  # Image i sits at row i // 3, column i % 3; padding stays 0.
  for i in range(5):
    top, left = 1 + (i // 3) * 3, 1 + (i % 3) * 4
    assert (grid[top:top + 2, left:left + 3] == 10 * (i + 1)).all()
  assert grid[0].max() == 0 and grid[:, 0].max() == 0
  assert grid[4:6, 9:12].max() == 0  # The sixth cell is empty.


def test_balanced_labels():
  np.testing.assert_array_equal(sample_lib.balanced_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])


def test_sample_mode_writes_adm_npz_and_png(tmp_path, tiny_config):
  config = tiny_config(sample__num_samples=12, sample__batch_size=8, sample__cfg_scale=1.5)
  # Weights as `python -m dyngen.convert` would leave them: an inference checkpoint outside the workdir.
  # Random final-layer weights so that the samples are not the trivial output of a zero-initialised model.
  params = jax.device_get(trainer.Run(config).initial_state().params)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape).astype(np.float32), params)
  config.sample.checkpoint = checkpoint.save_inference_checkpoint(tmp_path / "converted", config, params)

  npz_path = trainer.sample(config, tmp_path / "workdir")
  with np.load(npz_path) as arrays:
    images, labels = arrays["arr_0"], arrays["arr_1"]
  assert images.dtype == np.uint8 and images.shape == (12, 8, 8, 1)
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  assert len({image.tobytes() for image in images}) == 12  # Every sample is its own image.
  png = Image.open(npz_path.replace(".npz", ".png"))
  assert png.mode == "L" and png.size[0] > 8
  # A notebook user gets the same samples from the same checkpoint, labels and seed.
  loaded_config, ema_params = checkpoint.load_for_inference(config.sample.checkpoint)
  notebook_images = sample_lib.notebook_sampler(loaded_config).generate(
      ema_params, labels[:8], cfg_scale=1.5, seed=loaded_config.sample.seed)
  np.testing.assert_array_equal(notebook_images, images[:8])


@pytest.mark.slow  # ~40 s on a quiet 2-core CPU: three sampling subprocesses
def test_sample_mode_resumes_after_kill_with_every_image_once(tmp_path):
  """kill -9 during `--mode=sample`; the rerun samples only the missing batches and equals an uninterrupted run.

  A tiny random DiT in a converted-style checkpoint; 8 batches of 2 images at 60 DDPM steps each, so the
  process is killed after its second batch file appears and before the last.
  """
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dyngen import models  # pylint: disable=g-import-not-at-top
  from dyngen.bench import measure  # pylint: disable=g-import-not-at-top
  from dyngen.configs import quickstart  # pylint: disable=g-import-not-at-top

  config = quickstart.get_config("runlocal")
  config.model.update(dict(depth=1, hidden_size=32, num_heads=2))
  model = models.build(config.model)
  x = np.zeros((1, 8, 8, 1), np.float32)
  params = jax.device_get(measure.random_params(model, x, np.zeros(1, np.int32), np.zeros(1, np.int32), scale=0.05))
  source = checkpoint.save_inference_checkpoint(tmp_path / "converted", ml_collections.ConfigDict(config.to_dict()),
                                                params)
  repo = pathlib.Path(__file__).resolve().parents[1]
  flags = ["--config=configs/quickstart.py:runlocal", f"--config.sample.checkpoint={source}",
           "--config.sample.num_samples=16", "--config.sample.batch_size=2", "--config.sample.num_steps=60",
           "--mode=sample"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def command(workdir):
    return [sys.executable, "-m", "dyngen.main", f"--workdir={workdir}", *flags]

  killed = tmp_path / "killed"
  process = subprocess.Popen(command(killed), cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  batches = None
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    batches = list((killed / "samples").glob("*/batch_*.npz"))
    if len(batches) >= 2:
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  process.wait()
  assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert 2 <= len(batches) < 8
  resumed = subprocess.run(command(killed), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming:" in resumed.stderr
  whole = subprocess.run(command(tmp_path / "whole"), cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-3000:]
  (resumed_npz,) = (killed / "samples").glob("*.npz")
  (whole_npz,) = (tmp_path / "whole" / "samples").glob("*.npz")
  with np.load(resumed_npz) as got, np.load(whole_npz) as want:
    np.testing.assert_array_equal(got["arr_0"], want["arr_0"])  # every image once, in order, bit for bit
    np.testing.assert_array_equal(got["arr_1"], want["arr_1"])
    assert got["arr_0"].shape == (16, 8, 8, 1)


def test_sampler_refuses_labels_outside_the_models_classes(tiny_config):
  """The colab recipe's ImageNet labels on the 10-class digits model gave all-NaN samples without a word."""
  sampler = trainer.Run(tiny_config()).sampler()
  with pytest.raises(ValueError, match=r"labels 207, 360 outside the model's 10 classes: expected \[0, 10\)"):
    sampler.generate({}, [1, 207, 360], cfg_scale=1.5, seed=0)
