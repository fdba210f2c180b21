"""Orbax checkpoints: exact round trips, data position, keep-N, inference loading, corrupt and mismatched steps."""
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dyngen import checkpoint
from dyngen import data as data_lib
from dyngen.models import layers
from dyngen.train import state as state_lib


def make_state(seed: int, width: int = 8) -> state_lib.TrainState:
  """A TrainState with every kind of leaf the trainer saves: fp32 params, int32 step, uint32 key, optax tuples."""
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((width, 4)), jnp.float32),
                      "bias": jnp.asarray(rng.standard_normal((4,)), jnp.float32)}}
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(params)
  _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  return state_lib.TrainState(step=jnp.int32(seed), params=params, opt_state=opt_state,
                              ema_params=jax.tree.map(lambda p: 0.5 * p, params),
                              rng=jax.random.PRNGKey(seed))


def abstract_of(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run_config():
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(name="dit", hidden_size=8, depth=1))
  config.batch_size = 4
  return config


def save_steps(directory, steps, *, max_to_keep=None, data_iterator=None):
  with checkpoint.create_manager(directory, max_to_keep=max_to_keep) as manager:
    for step in steps:
      checkpoint.save(manager, step, make_state(step), config=run_config(), data_iterator=data_iterator)
    manager.wait_until_finished()


def corrupt(step_dir):
  """Truncates every array data file of a step, as a crash of the storage layer would."""
  data_files = [f for f in (step_dir / checkpoint.STATE).rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data_files
  for data_file in data_files:
    data_file.write_bytes(data_file.read_bytes()[:7])


def test_state_config_and_data_position_round_trip_exactly(tmp_path, digits_data_dir):
  data_config = data_lib.default_config("digits")
  data_config.data_dir = digits_data_dir
  pipeline = lambda: data_lib.create_input_pipeline(data_config, global_batch_size=4, seed=3)
  uninterrupted = pipeline()
  reference = [next(uninterrupted)["label"] for _ in range(6)]

  iterator = pipeline()
  for _ in range(2):
    next(iterator)
  state = make_state(7)
  with checkpoint.create_manager(tmp_path) as manager:
    checkpoint.save(manager, 2, state, config=run_config(), data_iterator=iterator)
    manager.wait_until_finished()

  fresh = pipeline()
  with checkpoint.create_manager(tmp_path) as manager:
    restored, step = checkpoint.restore_latest(manager, abstract_of(state), data_iterator=fresh)
  assert step == 2
  assert_trees_identical(restored, state)
  # The restored iterator continues with batch 3 of the uninterrupted order.
  np.testing.assert_array_equal(np.stack([next(fresh)["label"] for _ in range(4)]), np.stack(reference[2:]))
  saved_config, _ = checkpoint.load_for_inference(tmp_path)
  assert saved_config.to_dict() == run_config().to_dict()


def test_keeps_the_newest_n_and_ignores_unfinished_saves(tmp_path):
  save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=2)
  # A save killed halfway leaves a temporary folder; it is never listed as a step.
  (tmp_path / "5.orbax-checkpoint-tmp-1234").mkdir()
  assert checkpoint.latest_step(tmp_path) == 4
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_load_for_inference_from_workdir_checkpoint_dir_and_step_dir(tmp_path):
  save_steps(tmp_path / "checkpoints", [10, 20])
  for path, step in ((tmp_path, 20), (tmp_path / "checkpoints", 20), (tmp_path / "checkpoints" / "10", 10)):
    config, ema = checkpoint.load_for_inference(path)
    assert config.model.hidden_size == 8
    assert_trees_identical(ema, make_state(step).ema_params)


def test_inference_checkpoint_round_trip(tmp_path):
  params = make_state(3).params
  config = run_config()
  path = checkpoint.save_inference_checkpoint(tmp_path / "converted", config, params)
  loaded_config, loaded = checkpoint.load_for_inference(path)
  assert loaded_config.to_dict() == config.to_dict()
  assert_trees_identical(loaded, params)
  with pytest.raises(FileExistsError, match="already holds a checkpoint for step 0"):
    checkpoint.save_inference_checkpoint(tmp_path / "converted", config, params)


def test_corrupt_newest_step_falls_back_to_the_previous_one(tmp_path, caplog):
  save_steps(tmp_path, [1, 2])
  corrupt(tmp_path / "2")
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"cannot read the checkpoint at .*2"):
    checkpoint.load_for_inference(tmp_path / "2")
  with caplog.at_level(logging.WARNING):
    _, ema = checkpoint.load_for_inference(tmp_path)
  assert_trees_identical(ema, make_state(1).ema_params)
  assert "newer step(s) [2] could not be read" in caplog.text

  # Resuming training also falls back, and moves the unreadable step aside so step 2 can be saved again.
  with caplog.at_level(logging.WARNING), checkpoint.create_manager(tmp_path) as manager:
    restored, step = checkpoint.restore_latest(manager, abstract_of(make_state(1)))
  assert step == 1
  assert_trees_identical(restored, make_state(1))
  assert "Resuming from step 1" in caplog.text
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()


def test_every_step_corrupt_is_an_error(tmp_path):
  save_steps(tmp_path, [1])
  corrupt(tmp_path / "1")
  with checkpoint.create_manager(tmp_path) as manager:
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"none of the checkpoints .* could be read"):
      checkpoint.restore_latest(manager, abstract_of(make_state(1)))


def test_checkpoint_of_another_model_size_is_refused_by_name(tmp_path):
  save_steps(tmp_path, [1])
  wider = abstract_of(make_state(1, width=16))
  with checkpoint.create_manager(tmp_path) as manager:
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"params/dense/kernel: saved \(8, 4\)"):
      checkpoint.restore_latest(manager, wider)
  assert (tmp_path / "1").is_dir()  # A mismatch is not corruption: nothing is moved.


def test_missing_or_empty_paths_are_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_for_inference(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="expected a training workdir"):
    checkpoint.load_for_inference(tmp_path)
  with checkpoint.create_manager(tmp_path / "empty") as manager:
    assert checkpoint.restore_latest(manager, abstract_of(make_state(1))) is None


def test_scanned_and_unrolled_block_layouts_are_told_apart(tmp_path):
  """A run started with model.scan_blocks=False resumed with True (or back) names the switch to flip."""
  def state_with(params):
    return make_state(1).replace(params=params, opt_state=(), ema_params=params)

  unrolled = {f"blocks_{i}": {"kernel": jnp.full((3,), i, jnp.float32)} for i in range(2)}
  with checkpoint.create_manager(tmp_path) as manager:
    checkpoint.save(manager, 1, state_with(unrolled), config=run_config())
    manager.wait_until_finished()
  scanned = layers.stack_block_params(unrolled, 2)
  with checkpoint.create_manager(tmp_path) as manager:
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match=r"holds unrolled blocks but the configured model scans them: set "
                             r"model.scan_blocks=False"):
      checkpoint.restore_latest(manager, abstract_of(state_with(scanned)))
    restored, _ = checkpoint.restore_latest(manager, abstract_of(state_with(unrolled)))
  assert_trees_identical(layers.stack_block_params(restored.params, 2), scanned)
