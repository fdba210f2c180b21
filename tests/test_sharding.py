"""Meshes and logical sharding; training and sampling on 8 fake CPU devices agree with one device.

The 8-device tests need XLA_FLAGS set before JAX starts: `test_on_eight_fake_cpu_devices` runs them in
one subprocess with --xla_force_host_platform_device_count=8, so the rest of the suite keeps one device
(in this process they show as skipped).
"""
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from dyngen import data as data_lib
from dyngen import sharding
from dyngen.train import trainer

FAKE_DEVICES = 8
ON_EIGHT_DEVICES = jax.device_count() == FAKE_DEVICES
eight_devices = pytest.mark.skipif(not ON_EIGHT_DEVICES,
                                   reason="runs inside the subprocess of test_on_eight_fake_cpu_devices")


@pytest.mark.skipif(ON_EIGHT_DEVICES, reason="this process is that subprocess")
def test_on_eight_fake_cpu_devices():
  """Runs the @eight_devices tests of this file in a process with 8 fake CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES}", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "eight_devices", __file__],
      env=env, cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, f"failed on {FAKE_DEVICES} devices:\n{result.stdout[-8000:]}"
  assert re.search(r"\b2 passed", result.stdout), result.stdout[-2000:]


def test_resolve_mesh_shape():
  assert sharding.resolve_mesh_shape((-1, 1, 1), ("data", "fsdp", "tensor"), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 2), ("data", "fsdp", "tensor"), 8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape((1, 1, 1), ("data", "fsdp", "tensor"), 1) == (1, 1, 1)
  with pytest.raises(ValueError, match=r"has a size that is neither positive nor -1"):
    sharding.resolve_mesh_shape((0, -1, 1), ("data", "fsdp", "tensor"), 8)
  with pytest.raises(ValueError, match=r"repeats an axis name"):
    sharding.resolve_mesh_shape((-1, 1), ("data", "data"), 8)


def test_rules_from_json_and_batch_axes():
  # After a JSON round trip (the config saved in a checkpoint) tuples are lists.
  rules = sharding.rules_as_tuples([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["kv", None]])
  assert rules == (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("kv", None))
  assert sharding.mesh_axes_of("batch", rules) == ("data", "fsdp")
  assert sharding.mesh_axes_of("kv", rules) == ()
  assert sharding.mesh_axes_of("unlisted", rules) == ()
  with pytest.raises(ValueError, match=r"must be a pair"):
    sharding.rules_as_tuples([("batch",)])
  with pytest.raises(ValueError, match=r"logical axis 'embed' has more than one rule"):
    sharding.rules_as_tuples([("embed", "fsdp"), ("embed", None)])


def train_a_few_steps(config, devices, batches, initial_state=None):
  """Runs the jitted train step on `batches`; starts from `initial_state` (host arrays) laid out on this
  mesh, or from a fresh `jit(init)` on it."""
  run = trainer.Run(config, devices=devices)
  train_step = run.compiled_train_step()
  if initial_state is None:
    state = run.initial_state()
  else:
    state = jax.device_put(initial_state, run.state_shardings)
  with run.context():
    for batch in batches:
      state, metrics = train_step(state, sharding.make_global_batch(batch, run.batch_sharding))
  return run, state, metrics


@eight_devices
def test_eight_devices_training_and_sampling_match_one_device(tiny_config):
  # Two blocks under one scan: the stacked parameters' leading "layers" axis stays unsharded.
  config = tiny_config(batch_size=8, sample__batch_size=8, optimizer__learning_rate=1e-3, model__depth=2,
                       model__scan_blocks=True)
  iterator = data_lib.create_input_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
  batches = [next(iterator) for _ in range(3)]
  config.mesh.shape = (1, 1, 1)
  run_one = trainer.Run(config, devices=jax.devices()[:1])
  initial_state = jax.device_get(run_one.initial_state())
  _, state_one, metrics_one = train_a_few_steps(config, jax.devices()[:1], batches, initial_state)
  labels = np.arange(8, dtype=np.int32)
  key = jax.random.PRNGKey(1)
  images_one = run_one.sampler().sample_batch(state_one.ema_params, labels, key, cfg_scale=2.0)

  for mesh_shape in ((2, 4, 1), (2, 2, 2)):
    config.mesh.shape = mesh_shape
    # (2, 2, 2) also initialises on the mesh (jit with out_shardings); init is deterministic in the seed.
    start = initial_state if mesh_shape == (2, 4, 1) else None
    run_all, state_all, metrics_all = train_a_few_steps(config, jax.devices(), batches, start)
    # The layout is what the rules say: fc1's kernel (layers, embed, mlp) over (-, fsdp, tensor), batch over
    # data x fsdp.
    fc1 = state_all.params["blocks"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape == (2, 32, 64)
    assert fc1.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len(fc1.sharding.device_set) == FAKE_DEVICES
    assert len({str(shard.index) for shard in fc1.addressable_shards}) == mesh_shape[1] * mesh_shape[2]
    assert run_all.batch_sharding.spec == PartitionSpec(("data", "fsdp"))

    # fp32 tolerance: sharding changes only the order of sums (batch mean, partitioned matmuls); after 3
    # AdamW steps at lr 1e-3 the differences stay at the rounding level of the parameters.
    np.testing.assert_allclose(float(metrics_all["loss"]), float(metrics_one["loss"]), rtol=1e-5)
    for tree_all, tree_one in ((state_all.params, state_one.params), (state_all.ema_params, state_one.ema_params),
                               (state_all.opt_state, state_one.opt_state)):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-6),
                   tree_all, tree_one)

  # Guided sampling with the batch split 4 ways and the weights over (fsdp, tensor) gives the one-device
  # images; a 4-step DDPM chain carries the ~1e-6 weight differences, values are O(1).
  images_all = run_all.sampler().sample_batch(state_all.ema_params, labels, key, cfg_scale=2.0)
  assert images_all.shape == (8, 8, 8, 1)
  np.testing.assert_allclose(images_all, images_one, rtol=1e-4, atol=1e-4)


@eight_devices
def test_eight_devices_width_that_fsdp_cannot_split_is_refused_before_compute(tiny_config):
  # Width 36 is fine for the model (9 per head) but not for 8-way FSDP of its embed axis.
  config = tiny_config(mesh__shape=(1, 8, 1), model__hidden_size=36, model__num_heads=4)
  with pytest.raises(ValueError, match=r"'blocks_0'.*has shape \(36, .*sharded over mesh axes \('fsdp',\) "
                                       r"\(8 ways\), which does not divide it"):
    trainer.Run(config)
