"""Shared test setup: the repository root on sys.path, markers, glibc's huge-page tunable for workers."""
import os
import pathlib
import sys

import ml_collections
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: takes more than ~30 s on a 2-core CPU (end-to-end runs).")
  # The pytest-xdist workers and the processes tests start (dyngen.main, launchers) are started after this:
  # they get the malloc tunable that dyngen.main gives itself (dyngen/host_memory.py). This process runs no
  # test under -n, so it need not restart.
  from dyngen import host_memory  # pylint: disable=g-import-not-at-top
  if host_memory.restart_needed(os.environ):
    os.environ["GLIBC_TUNABLES"] = host_memory.with_tunable(os.environ)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """Compiled XLA programs cached on disk for this session: trainer tests compile the same train step in
  several fresh trainers (resume after a kill), and XLA:CPU compiles take most of their time."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A tfds data_dir private to this test session; the embedded digits are built into it on first use."""
  return str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture
def tiny_config(digits_data_dir):
  """make(**overrides) -> a complete run config of a 1-block DiT of width 32 on the 8x8 digits.

  Overrides are dotted field names with '__' for '.', e.g. make(num_train_steps=6, optimizer__learning_rate=1).
  """
  from dyngen.recipes import common  # pylint: disable=g-import-not-at-top
  from dyngen import data as data_lib  # pylint: disable=g-import-not-at-top

  def make(**overrides):
    config = common.training_config()
    config.data = data_lib.default_config("digits")
    config.data.data_dir = digits_data_dir
    config.data.read_threads = 1
    config.model = ml_collections.ConfigDict(dict(
        name="dit", input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
        mlp_ratio=2.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True, attention="xla",
        attention_chunk_size=1024, dtype="float32", remat=False))
    config.batch_size = 8
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.sample_every_steps = 0
    config.profile.num_steps = 0
    config.optimizer.learning_rate = 1e-3
    config.sample.update(dict(num_steps=4, batch_size=8, num_samples=8, grid_size=8, guidance_channels=0))
    for name, value in overrides.items():
      *parents, leaf = name.split("__")
      section = config
      for parent in parents:
        section = section[parent]
      section[leaf] = value
    return config

  return make
