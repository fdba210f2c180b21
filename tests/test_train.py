"""The trainer end to end on a 1-block DiT: resume after a kill, NaN handling, the update rule."""
import grain
import jax
import ml_collections
import numpy as np
import pytest

from dyngen import checkpoint
from dyngen import data as data_lib
from dyngen import sharding
from dyngen.train import state as state_lib
from dyngen.train import trainer

_REAL_PIPELINE = data_lib.create_input_pipeline


class SimulatedKill(BaseException):
  """Stands in for SIGKILL: nothing after it runs except `finally` blocks (no new checkpoint is written)."""


class WatchedIterator(grain.DatasetIterator):
  """Passes batches through, keeping a copy of each; can poison batch `poison_at` (1-based) with NaN and
  'kill' the process when batch `kill_at` is requested. Checkpoints save and restore the inner position."""

  def __init__(self, parent, record, kill_at=None, poison_at=None):
    super().__init__(parent)
    self.record, self.kill_at, self.poison_at = record, kill_at, poison_at

  def __next__(self):
    if self.kill_at is not None and len(self.record) + 1 == self.kill_at:
      raise SimulatedKill()
    batch = next(self._parent)
    batch = {"image": np.array(batch["image"]), "label": np.array(batch["label"])}
    if self.poison_at is not None and len(self.record) + 1 == self.poison_at:
      batch["image"][0, 0, 0, 0] = np.nan
    self.record.append(batch)
    return batch

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def watch_pipeline(monkeypatch, **kwargs):
  """Routes the trainer's input pipeline through a WatchedIterator; returns its list of batches."""
  record = []
  monkeypatch.setattr(data_lib, "create_input_pipeline",
                      lambda *a, **k: WatchedIterator(_REAL_PIPELINE(*a, **k), record, **kwargs))
  return record


def assert_trees_identical(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_kill_is_bit_identical(tmp_path, tiny_config, monkeypatch):
  config = tiny_config(num_train_steps=6, checkpoint_every_steps=3, log_every_steps=1)
  batches_full = watch_pipeline(monkeypatch)
  full = trainer.train_and_evaluate(config, tmp_path / "full")

  # The killed run dies when it asks for batch 5: step 3's checkpoint was started, step 4 is lost.
  batches_killed = watch_pipeline(monkeypatch, kill_at=5)
  with pytest.raises(SimulatedKill):
    trainer.train_and_evaluate(config, tmp_path / "killed")
  assert checkpoint.latest_step(tmp_path / "killed" / "checkpoints") == 3

  # A fresh trainer on the same workdir resumes at step 3 and runs to 6.
  batches_resumed = watch_pipeline(monkeypatch)
  resumed = trainer.train_and_evaluate(config, tmp_path / "killed")

  # Bit-identical (no tolerance): same batches, same per-step keys, same compiled computation.
  assert int(resumed.step) == int(full.step) == 6
  assert_trees_identical(resumed.params, full.params)
  assert_trees_identical(resumed.ema_params, full.ema_params)
  assert_trees_identical(resumed.opt_state, full.opt_state)
  assert_trees_identical(resumed.rng, full.rng)
  assert len(batches_full) == 6 and len(batches_killed) == 4 and len(batches_resumed) == 3
  assert_trees_identical(batches_killed[:3] + batches_resumed, batches_full)
  # The data order itself is not trivial: consecutive batches differ.
  assert not np.array_equal(batches_full[0]["label"], batches_full[1]["label"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config, monkeypatch):
  # Metrics reach the host only at checkpoints here (every 2 steps), so the NaN of step 5 is found at
  # step 6, one step late: step 6 must not be saved, and step 4 must stay readable and finite.
  config = tiny_config(num_train_steps=8, checkpoint_every_steps=2, log_every_steps=100)
  watch_pipeline(monkeypatch, poison_at=5)
  with pytest.raises(trainer.NonFiniteLossError, match=r"step 5.*last good checkpoint \(step 4\)"):
    trainer.train_and_evaluate(config, tmp_path)
  assert checkpoint.latest_step(tmp_path / "checkpoints") == 4
  saved_config, ema_params = checkpoint.load_for_inference(tmp_path)
  assert saved_config.num_train_steps == 8
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(ema_params))


def test_first_update_is_adamw_and_ema_of_it(tmp_path, tiny_config):
  """Step 1 of AdamW from zero moments moves a parameter by lr * g / (|g| + eps) (bias correction makes
  m_hat = g, v_hat = g^2): by lr to fp32 rounding unless |g| is tiny, never more. With adaLN-Zero only the
  zero-initialised final linear layer has a gradient at step 1 (every other path is multiplied by it), so
  it alone moves. EMA is decay * p0 + (1 - decay) * p1. All three follow from the update rules."""
  # The recipe of the other tests (lr 1e-3, DiT's decay 0.9999), so the compiled step is reused.
  config = tiny_config(num_train_steps=1, checkpoint_every_steps=1)
  lr, decay = config.optimizer.learning_rate, config.ema.decay
  initial = jax.device_get(trainer.Run(config).initial_state())
  final = jax.device_get(trainer.train_and_evaluate(config, tmp_path))
  moved = {"/".join(str(k.key) for k in path): np.abs(p1 - p0) for (path, p1), p0 in zip(
      jax.tree_util.tree_flatten_with_path(final.params)[0], jax.tree.leaves(initial.params)) if np.any(p1 != p0)}
  assert sorted(moved) == ["final_layer/linear/bias", "final_layer/linear/kernel"]
  for delta in moved.values():
    assert delta.max() <= lr * (1 + 1e-5)
    assert np.median(delta) == pytest.approx(lr, rel=1e-3)
  for ema, p0, p1 in zip(jax.tree.leaves(final.ema_params), jax.tree.leaves(initial.params),
                         jax.tree.leaves(final.params)):
    # The EMA moves by (1 - decay) (p1 - p0) = 1e-7 here; fp32 resolves it to ~4e-9 (ulp of |p| < 0.1).
    np.testing.assert_allclose(ema - p0, (1 - decay) * (p1.astype(np.float64) - p0), rtol=0, atol=1e-8)


def test_learning_rate_warms_up_linearly_then_stays_constant():
  config = ml_collections.ConfigDict(dict(learning_rate=1e-4, warmup_steps=10))
  schedule = state_lib.learning_rate_schedule(config)
  # Linear from 0 at step 0 to the peak at `warmup_steps`, then constant (analytic values).
  for step, expected in ((0, 0.0), (5, 5e-5), (10, 1e-4), (1000, 1e-4)):
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
  config.warmup_steps = 0
  assert float(state_lib.learning_rate_schedule(config)(0)) == pytest.approx(1e-4, rel=1e-7)


def test_bfloat16_compute_keeps_float32_state_and_tracks_the_float32_loss(tiny_config):
  batch = next(_REAL_PIPELINE(tiny_config().data, global_batch_size=8, seed=0))
  results = {}
  for dtype in ("float32", "bfloat16"):
    run = trainer.Run(tiny_config(model__dtype=dtype))
    state = run.initial_state()
    # Random weights everywhere (adaLN-Zero would make the output, and so the comparison, trivial).
    rng = np.random.default_rng(0)
    noisy = jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(np.float32),
                         jax.device_get(state.params))
    state = state.replace(params=jax.device_put(noisy, run.state_shardings.params))
    with run.context():
      state, metrics = run.compiled_train_step()(state, sharding.make_global_batch(batch, run.batch_sharding))
    results[dtype] = jax.device_get(metrics)
    # Parameters, EMA and Adam moments stay float32 whatever the compute dtype.
    assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.ema_params, state.opt_state[0].mu))} == {
        np.dtype(np.float32)}
  # bfloat16 keeps 8 significant bits (relative rounding 2^-9 per op); through a 1-block model the batch
  # loss and gradient norm move by a few 1e-4 (measured 2e-4 and 4e-4), but they do move: compute is bf16.
  assert results["bfloat16"]["loss"] != results["float32"]["loss"]
  assert results["bfloat16"]["loss"] == pytest.approx(results["float32"]["loss"], rel=5e-3)
  assert results["bfloat16"]["grad_norm"] == pytest.approx(results["float32"]["grad_norm"], rel=1e-2)
