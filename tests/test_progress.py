"""Progress of long work and the EMA warm-up: what a person watching a run sees.

- `LoopProgress` inside a jitted sampling loop calls the host at the steps it says, the loop stays one
  `lax.scan` (the model is traced once) and the samples are bit-identical to a silent loop.
- `Meter` lines carry the rate and an ETA computed from a controlled clock.
- The EMA warm-up follows min(decay, (1 + s) / (warmup + s)) step by step, against a float64 numpy EMA.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dyngen import progress
from dyngen.diffusion import create_diffusion
from dyngen.train import state as state_lib
from dyngen.train import step as step_lib


@pytest.fixture
def host_lines(monkeypatch):
  """The lines dyngen.progress logs, as formatted strings."""
  lines = []
  monkeypatch.setattr(progress.logging, "info", lambda fmt, *args: lines.append(fmt % args))
  return lines


def test_loop_progress_reports_from_inside_one_compiled_loop(host_lines):
  d = create_diffusion(timestep_respacing="20")
  traced = []

  def model_fn(x, t):
    traced.append(1)
    return jnp.concatenate([0.5 * x, jnp.zeros_like(x)], axis=-1)

  x_T = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  reporter = progress.LoopProgress("Sampling batch", reports=5, min_seconds=0.0)
  sample = jax.jit(lambda z, progress: d.p_sample_loop(model_fn, z, key=jax.random.key(2), progress=progress),
                   static_argnums=1)
  with_progress = np.asarray(sample(x_T, reporter))
  assert len(traced) == 1  # One scan: the model is traced once, the callback did not unroll the loop.
  silent = np.asarray(sample(x_T, None))
  np.testing.assert_array_equal(with_progress, silent)
  # Step 1 starts the clock (no line); then every 20 // 5 = 4 steps, the last one included.
  steps = [int(line.split("step ")[1].split("/")[0]) for line in host_lines]
  assert steps == [4, 8, 12, 16, 20], host_lines
  assert all(line.startswith("Sampling batch: step ") and "/20, " in line and "steps/s, ETA" in line
             for line in host_lines)
  # A second run of the compiled loop restarts the clock at its own step 1.
  host_lines.clear()
  sample(x_T, reporter).block_until_ready()
  assert len(host_lines) == 5


def test_loop_progress_is_quiet_for_short_loops(host_lines):
  d = create_diffusion(timestep_respacing="ddim10")
  model_fn = lambda x, t: jnp.concatenate([0.5 * x, jnp.zeros_like(x)], axis=-1)
  reporter = progress.LoopProgress("Sampling batch", min_seconds=60.0)
  jax.jit(lambda z: d.ddim_sample_loop(model_fn, z, progress=reporter))(jnp.ones((1, 2, 2, 1))).block_until_ready()
  assert host_lines == []


def test_meter_rate_and_eta(host_lines, monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
  meter = progress.Meter("Sampling", total=1000, unit="images", min_seconds=10.0)
  clock[0] = 105.0
  assert not meter.update(100)  # 5 s since the start: too soon for a line.
  clock[0] = 120.0
  assert meter.update(400)  # 400 images in 20 s: 20 images/s, 600 left: 30 s.
  assert host_lines == ["Sampling: 400/1000 images, 20 images/s, ETA 30 s"]
  clock[0] = 150.0
  assert meter.update(1000)
  assert host_lines[-1] == "Sampling: 1000 images in 50 s (20 images/s)"
  assert progress.format_seconds(185) == "3 min 05 s" and progress.format_seconds(7620) == "2 h 07 min"


@pytest.mark.parametrize("decay, warmup", [(0.999, 3.0), (0.9, 10.0), (0.999, 0.0)])
def test_ema_warmup_follows_its_formula(decay, warmup):
  # A quadratic objective on a 3-vector: the step's own AdamW, then the EMA; the reference is a float64 EMA of
  # the step's params with decay min(decay, (1 + s) / (warmup + s)) written out here.
  target = np.array([1.0, -2.0, 0.5], np.float32)

  def objective(params, batch, keys, step):
    loss = jnp.sum((params["w"] - target) ** 2)
    return loss, {}

  optimizer = optax.adam(0.1)
  params = {"w": jnp.zeros(3, jnp.float32)}
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                               ema_params={"w": jnp.zeros(3, jnp.float32)}, rng=jax.random.PRNGKey(0))
  step_fn = jax.jit(lambda state: step_lib.train_step(state, None, objective=objective, optimizer=optimizer,
                                                      learning_rate_fn=optax.constant_schedule(0.1),
                                                      ema_decay=decay, ema_warmup=warmup))
  ema = np.zeros(3, np.float64)
  for s in range(30):
    state, metrics = step_fn(state)
    expected_decay = min(decay, (1 + s) / (warmup + s)) if warmup else decay
    ema = expected_decay * ema + (1 - expected_decay) * np.asarray(state.params["w"], np.float64)
    assert float(metrics["ema_decay"]) == pytest.approx(expected_decay, rel=1e-7)
  # float32 EMA arithmetic over 30 steps against float64: a few roundings per step.
  np.testing.assert_allclose(np.asarray(state.ema_params["w"]), ema, rtol=1e-5, atol=1e-6)
  if warmup:
    # The first update's decay is 1 / warmup: the random start is mostly gone after one step.
    assert float(step_lib.ema_decay_at(0, decay, warmup)) == pytest.approx(min(decay, 1 / warmup))


def test_inception_progress_restarts_per_run(host_lines, monkeypatch):
  # The trainer's ADM evaluator runs the Inception on the reference once, then on each evaluation's samples.
  from dyngen.train import evaluation  # pylint: disable=g-import-not-at-top
  clock = [0.0]
  monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
  report = evaluation.inception_progress()
  for run_seconds in (40.0, 80.0):  # Two runs of 128 images in batches of 64.
    report(64, 128)
    clock[0] += run_seconds
    report(128, 128)
  # Rates count from the end of each run's first batch (which includes compiling): 64 images in 40 s, in 80 s.
  assert host_lines == ["Inception features: 128 images in 40 s (1.6 images/s)",
                        "Inception features: 128 images in 1 min 20 s (0.8 images/s)"]
