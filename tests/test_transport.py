"""Flow matching (dyngen.diffusion.transport) against analytic cases, in float64.

Gaussian data x1 ~ N(m, diag(s²)) has, for any path x_t = α_t·x1 + σ_t·x0, the Gaussian marginal
p_t = N(α_t·m, V_t) with V_t = α_t²s² + σ_t², so the exact score, noise and velocity are closed forms
(written here from these formulas, not from the code under test):
  score = −(x − α m) / V,   noise = E[x0 | x_t] = σ (x − α m) / V,
  velocity = α' m + (α'α s² + σ'σ) / V · (x − α m).
Along the probability-flow ODE (x − α_t m) / sqrt(V_t) is constant, which gives the exact flow map; with the
exact score, the SDE keeps the marginals, and its Euler–Maruyama / Heun chain is affine in x and the noise,
so the chain's own mean and variance after every step are exact recursions (computed here in numpy).

The parity with the official code is tests/test_sit_fixture.py; this file checks the mathematics, the solver
orders, reproducibility of the noise, the uniform trainer / sampler interface and the errors.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen.diffusion import ObjectiveInterface
from dyngen.diffusion import create_diffusion
from dyngen.diffusion import create_transport
from dyngen.diffusion import first_channels
from dyngen.diffusion import guided_model_fn
from dyngen.diffusion import interval_guided_model_fn
from dyngen.train import objectives

MEAN = np.array([0.5, -1.0, 2.0])
STD = np.array([0.3, 1.0, 1.5])
SIGMA_MIN, SIGMA_MAX = 0.1, 20.0


def vp_log_mean(t):
  return -0.25 * (1 - t) ** 2 * (SIGMA_MAX - SIGMA_MIN) - 0.5 * (1 - t) * SIGMA_MIN


# (α, α', σ, σ') of each path, transcribed from the SiT paper (t = 0 noise, t = 1 data).
def coefficients(path_type, t):
  if path_type == "Linear":
    return t, 1.0 + 0 * t, 1 - t, -1.0 + 0 * t
  if path_type == "GVP":
    h = math.pi / 2
    return jnp.sin(h * t), h * jnp.cos(h * t), jnp.cos(h * t), -h * jnp.sin(h * t)
  alpha = jnp.exp(vp_log_mean(t))
  d_log = 0.5 * (1 - t) * (SIGMA_MAX - SIGMA_MIN) + 0.5 * SIGMA_MIN
  sigma = jnp.sqrt(1 - alpha ** 2)
  return alpha, alpha * d_log, sigma, -(alpha ** 2) * d_log / sigma


def exact_model(path_type, prediction):
  """model_fn(x, t) of the exact prediction for the Gaussian data. x: (B, 1, 1, 3); t: (B,)."""

  def model_fn(x, t):
    alpha, d_alpha, sigma, d_sigma = (c.astype(x.dtype)[:, None, None, None] for c in coefficients(path_type, t))
    mean, std = MEAN.astype(x.dtype), STD.astype(x.dtype)  # numpy casts: the tests switch x64 on and off
    variance = alpha ** 2 * std ** 2 + sigma ** 2
    centred = x - alpha * mean
    if prediction == "score":
      return -centred / variance
    if prediction == "noise":
      return sigma * centred / variance
    return d_alpha * mean + (d_alpha * alpha * std ** 2 + d_sigma * sigma) / variance * centred

  return model_fn


def exact_flow(path_type, x, t0, t1):
  """The probability-flow ODE's solution at t1 from x at t0 (numpy float64)."""
  a0, _, s0, _ = (np.asarray(c, np.float64) for c in coefficients(path_type, np.float64(t0)))
  a1, _, s1, _ = (np.asarray(c, np.float64) for c in coefficients(path_type, np.float64(t1)))
  v0, v1 = a0 ** 2 * STD ** 2 + s0 ** 2, a1 ** 2 * STD ** 2 + s1 ** 2
  return a1 * MEAN + np.sqrt(v1 / v0) * (x - a0 * MEAN)


@pytest.fixture(scope="module")
def start():
  return np.random.default_rng(0).standard_normal((64, 1, 1, 3))


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_ode_endpoint_matches_the_exact_flow_map(start, path_type, prediction):
  """Heun's endpoint converges to the exact flow map at second order, for every path and prediction."""
  with jax.enable_x64(True):
    transport = create_transport(path_type, prediction)
    t0, t1 = transport.interval(eval=True)
    want = exact_flow(path_type, start, np.float32(t0), np.float32(t1))  # the grid's float32 end points
    model_fn = exact_model(path_type, prediction)
    # The three predictions give the same field (to rounding), so the order is measured on velocity only.
    step_counts = (100, 200) if prediction == "velocity" else (200,)
    errors = [np.abs(np.asarray(transport.sample_ode(model_fn, jnp.asarray(start), "heun2", num_steps=steps + 1))
                     - want).max() for steps in step_counts]
  # Measured at 200 steps: Linear 2.4e-5, GVP 5.7e-5, VP 2.1e-4 (its β_t is largest near t = 0), and a ratio of
  # 3.94 to 3.96 between 100 and 200 steps.
  assert errors[-1] < {"Linear": 5e-5, "GVP": 1e-4, "VP": 4e-4}[path_type]
  if len(errors) == 2:
    assert 3.6 < errors[0] / errors[1] < 4.4


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun2", 2)])
def test_ode_error_falls_at_the_solver_order(start, method, order):
  """Doubling the steps divides the endpoint error by 2^order (Linear path, velocity, exact flow map)."""
  with jax.enable_x64(True):
    transport = create_transport("Linear", "velocity")
    model_fn = exact_model("Linear", "velocity")
    want = exact_flow("Linear", start, 0.0, 1.0)
    errors = [np.abs(np.asarray(transport.sample_ode(model_fn, jnp.asarray(start), method, num_steps=steps + 1))
                     - want).max() for steps in (32, 64, 128, 256)]
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  # Asymptotically 2^order; measured euler 1.980, 1.990, 1.995 and heun2 3.84, 3.92, 3.96 (errors at 256 steps:
  # 1.5e-2 and 1.5e-5).
  np.testing.assert_allclose(ratios, 2.0 ** order, rtol=0.05)
  assert errors[-1] < {1: 2e-2, 2: 2e-5}[order]


def test_dopri5_meets_its_tolerance_and_reverse_inverts(start):
  with jax.enable_x64(True):
    transport = create_transport("GVP", "velocity")
    model_fn = exact_model("GVP", "velocity")
    x = jnp.asarray(start)
    got, trajectory = transport.sample_ode(model_fn, x, "dopri5", num_steps=5, atol=1e-9, rtol=1e-9,
                                           return_trajectory=True)
    # The tolerances bound each step's local error (RMS over the state), so the global error is a small multiple:
    # measured ≤ 8e-8 at the save points (dense output) and 1.0e-7 after the reverse solve back to t = 0.
    grid = np.linspace(0.0, 1.0, 5)
    for k, t in enumerate(grid):
      assert np.abs(np.asarray(trajectory[k]) - exact_flow("GVP", start, 0.0, t)).max() < 3e-7
    back = transport.sample_ode(model_fn, got, "dopri5", num_steps=2, atol=1e-9, rtol=1e-9, reverse=True)
    assert np.abs(np.asarray(back) - start).max() < 3e-7
    np.testing.assert_array_equal(trajectory[0], start)


def sde_chain_moments(method, num_steps, last_step_size=0.04):
  """Exact mean and variance of the Linear-velocity 'sigma' SDE chain with the 'Mean' last step, from N(0, I)."""
  def affine(t, w):  # sde_drift(x, t) = A x + B for the exact model
    alpha, d_alpha, sigma, d_sigma = t, 1.0, 1 - t, -1.0
    variance = alpha ** 2 * STD ** 2 + sigma ** 2
    gain = (d_alpha * alpha * STD ** 2 + d_sigma * sigma) / variance
    return gain - w / variance, d_alpha * MEAN - gain * alpha * MEAN + w * alpha * MEAN / variance

  grid = np.linspace(0.0, 1.0 - last_step_size, num_steps, dtype=np.float32).astype(np.float64)
  dt = grid[1] - grid[0]
  mean, var = np.zeros(3), np.ones(3)
  for t in grid[:-1]:
    noise_var = 2 * (1 - t) * dt  # sqrt(2 w) dW with w = σ_t = 1 − t
    a1, b1 = affine(t, 1 - t)
    if method == "Euler":
      mean, var = (1 + a1 * dt) * mean + b1 * dt, (1 + a1 * dt) ** 2 * var + noise_var
    else:  # noise first, then Heun on the drift: x' = a·x̂ + b
      a2, b2 = affine(t + dt, 1 - (t + dt))
      a = 1 + dt / 2 * (a1 + a2 + dt * a2 * a1)
      b = dt / 2 * (b1 + b2 + dt * a2 * b1)
      mean, var = a * mean + b, a ** 2 * (var + noise_var)
  a, b = affine(grid[-1], 1 - grid[-1])
  return (1 + a * last_step_size) * mean + b * last_step_size, (1 + a * last_step_size) ** 2 * var


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_samples_have_the_chain_and_data_moments(method):
  count, num_steps = 40_000, 50
  with jax.enable_x64(True):
    transport = create_transport("Linear", "velocity")
    x_T = jax.random.normal(jax.random.key(1), (count, 1, 1, 3), jnp.float64)
    samples = np.asarray(transport.sample_sde(exact_model("Linear", "velocity"), x_T, method, num_steps=num_steps,
                                              key=jax.random.key(2)))[:, 0, 0]
  mean, var = sde_chain_moments(method, num_steps)
  # Five standard errors of a 40,000-sample mean and variance (the start noise is part of the sample).
  assert np.all(np.abs(samples.mean(0) - mean) < 5 * np.sqrt(var / count))
  assert np.all(np.abs(samples.var(0) - var) < 5 * var * np.sqrt(2 / count))
  # Against the data itself: the chain's mean is exact to 1e-7, its variance low by the noiseless last step
  # from t = 0.96 and the Euler–Maruyama bias: measured 5.7%, 2.7%, 3.2% (Euler) for s = 0.3, 1, 1.5.
  assert np.all(np.abs(mean - MEAN) < 1e-6)
  assert np.all(np.abs(var / STD ** 2 - 1) < 0.08)


def test_sde_key_noise_is_fold_in_per_step():
  """With a key, step k's noise is N(0, I) from fold_in(key, k) alone: the same as passing it explicitly."""
  transport = create_transport("GVP", "velocity")
  model_fn = exact_model("GVP", "velocity")
  x_T = jax.random.normal(jax.random.key(3), (4, 1, 1, 3))
  key = jax.random.key(4)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(key, k), x_T.shape))(jnp.arange(9))
  by_key = transport.sample_sde(model_fn, x_T, num_steps=10, key=key)
  given = transport.sample_sde(model_fn, x_T, num_steps=10, step_noise=noise)
  # The same noise up to XLA's fusion of a generated vs a given array (one float32 ulp).
  np.testing.assert_allclose(by_key, given, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun2", "sde"])
def test_fixed_step_loops_are_one_scan(sampler):
  """The whole loop is one lax.scan whose body calls the model once per evaluation (not unrolled)."""
  transport = create_transport()
  calls = []
  model = exact_model("Linear", "velocity")

  def counting_model(x, t):
    calls.append(1)
    return model(x, t)

  x_T = jnp.zeros((2, 1, 1, 3))
  if sampler == "sde":
    fn = lambda x: transport.sample_sde(counting_model, x, num_steps=50, key=jax.random.key(0))
  else:
    fn = lambda x: transport.sample_ode(counting_model, x, sampler, num_steps=50)
  jaxpr = jax.make_jaxpr(fn)(x_T).jaxpr
  assert [eqn.primitive.name for eqn in jaxpr.eqns].count("scan") == 1
  # traced once per evaluation in the body (+1 for the SDE's last step), whatever num_steps
  assert len(calls) == {"euler": 1, "heun2": 2, "sde": 2}[sampler]


@pytest.mark.parametrize("method", ["euler", "heun2"])
@pytest.mark.parametrize("path_type,prediction", [("Linear", "velocity"), ("VP", "score")])
def test_ode_evaluations_run_one_by_one_give_sample_ode(method, path_type, prediction):
  """`ode_evaluations` (the routed fast path's per-evaluation form) stepped in a Python loop = `sample_ode`,
  the model seeing each listed time exactly once, in order; a 2C-channel output keeps its first C."""
  transport = create_transport(path_type, prediction)
  model = exact_model(path_type, prediction)
  doubled_model = lambda x, t: jnp.concatenate([model(x, t), 100 + x], axis=-1)  # learn_sigma's 2C layout
  seen = []

  def recording_model(x, t):
    seen.append(float(t[0]))
    return doubled_model(x, t)

  with jax.enable_x64(True):
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((4, 1, 1, 3)))
    model_times, init, update, result = transport.ode_evaluations(method, 9)
    state = init(x_T)
    for e in range(len(model_times)):
      state = update(recording_model, state, jnp.int32(e), None)
    expected = transport.sample_ode(first_channels(doubled_model, 3), x_T, method, num_steps=9)
    # A velocity's drift is the model output: the same float64 arithmetic. A score's drift coefficients are
    # float32 (as SiT's), rounded differently eagerly and inside the compiled scan: float32 ulps.
    tolerance = 1e-12 if prediction == "velocity" else 2e-6
    np.testing.assert_allclose(result(state), expected, rtol=tolerance, atol=tolerance)
  np.testing.assert_array_equal(np.float32(seen), model_times)
  assert len(model_times) == {"euler": 8, "heun2": 16}[method]


def test_sample_loops_record_aux_per_model_evaluation():
  """with_aux: one aux value per model evaluation in evaluation order (heun2 2 per step; SDE + last step)."""
  transport = create_transport()
  model = exact_model("Linear", "velocity")
  with_time = lambda x, t: (model(x, t), {"t": t[0]})
  x_T = jnp.zeros((2, 1, 1, 3))
  _, aux = transport.sample_ode(with_time, x_T, "heun2", num_steps=5, with_aux=True)
  grid = np.linspace(0, 1, 5, dtype=np.float32)
  np.testing.assert_allclose(aux["t"], np.stack([grid[:-1], grid[1:]], 1).reshape(-1), rtol=1e-7)
  _, aux = transport.sample_sde(with_time, x_T, num_steps=5, key=jax.random.key(0), with_aux=True)
  assert aux["t"].shape == (5,)  # 4 Euler–Maruyama steps + the "Mean" last step at 1 − 0.04
  np.testing.assert_allclose(aux["t"][-1], 0.96, rtol=1e-6)
  with pytest.raises(ValueError, match="dopri5 chooses"):
    transport.sample_ode(with_time, x_T, "dopri5", with_aux=True)


# SiT's create_transport rules.


@pytest.mark.parametrize("args,eps", [
    (dict(path_type="Linear"), (0.0, 0.0)),
    (dict(path_type="GVP", train_eps=0.1, sample_eps=0.2), (0.0, 0.0)),  # forced for velocity
    (dict(path_type="Linear", prediction="noise"), (1e-3, 1e-3)),
    (dict(path_type="GVP", prediction="score", loss_weight="likelihood"), (1e-3, 1e-3)),
    (dict(path_type="VP"), (1e-5, 1e-3)),
    (dict(path_type="VP", prediction="noise", train_eps=1e-4, sample_eps=2e-3), (1e-4, 2e-3)),
    (dict(path_type="VP", train_eps=1e-4), (1e-4, None)),  # sample_eps defaults only with train_eps unset
])
def test_create_transport_epsilons(args, eps):
  transport = create_transport(**args)
  assert (transport.train_eps, transport.sample_eps) == eps


def test_intervals():
  assert create_transport().interval() == (0.0, 1.0)
  assert create_transport("Linear", "noise").interval(eval=True) == (1e-3, 1 - 1e-3)
  assert create_transport("VP", "score").interval(eval=True) == (0.0, 1 - 1e-3)
  assert create_transport("VP").interval() == (0.0, 1 - 1e-5)
  assert create_transport("VP").interval(eval=True, reverse=True) == (1.0, pytest.approx(1e-3, abs=1e-15))
  # SDE: ends at 1 − last_step_size; SBDM starts at sample_eps.
  assert create_transport().interval(sde=True, eval=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
  assert create_transport("GVP", "noise").interval(sde=True, eval=True, last_step_size=0.04) == (1e-3, 0.96)


def test_training_t_and_losses_with_drawn_noise():
  transport = create_transport("VP", "noise", "velocity")
  t = jax.jit(transport.draw_training_t, static_argnums=1)(jax.random.key(0), 10_000)
  assert t.dtype == jnp.float32 and float(t.min()) >= 0 and float(t.max()) <= 1 - 1e-5
  assert abs(float(t.mean()) - 0.5) < 0.02
  x1 = jnp.ones((8, 1, 1, 3))
  losses = jax.jit(lambda key: transport.training_losses(exact_model("VP", "noise"), x1, key=key))
  terms = losses(jax.random.key(1))
  assert terms["loss"].shape == (8,) and terms["t"].shape == (8,)
  # The exact E[x0 | x_t] is not x0: the loss is the conditional variance, positive and finite.
  assert np.all(np.isfinite(terms["loss"])) and np.all(terms["loss"] > 0)
  np.testing.assert_array_equal(terms["loss"], losses(jax.random.key(1))["loss"])
  assert np.abs(np.asarray(terms["loss"] - losses(jax.random.key(2))["loss"])).max() > 1e-3


def test_velocity_loss_is_zero_at_the_conditional_target():
  """A model that returns the true u_t (it peeks at x0) has loss 0; the mean flat squared error otherwise."""
  transport = create_transport("GVP")
  x1 = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
  x0 = jax.random.normal(jax.random.key(1), (4, 2, 2, 3))
  t = jnp.array([0.0, 0.3, 0.7, 1.0])
  h = math.pi / 2
  u_t = (h * jnp.cos(h * t))[:, None, None, None] * x1 - (h * jnp.sin(h * t))[:, None, None, None] * x0
  terms = transport.training_losses(lambda x, s: u_t, x1, t=t, x0=x0)
  np.testing.assert_allclose(terms["loss"], 0, atol=1e-12)
  terms = transport.training_losses(lambda x, s: u_t + 0.5, x1, t=t, x0=x0)
  np.testing.assert_allclose(terms["loss"], 0.25, rtol=1e-6)


# The interface shared with GaussianDiffusion.


def test_interface_for_the_gaussian_diffusion_is_its_own_calls():
  diffusion = create_diffusion("", learn_sigma=True)
  interface = ObjectiveInterface(diffusion)
  assert interface.learns_variance and not interface.is_flow
  key = jax.random.key(0)
  t = interface.draw_training_t(key, 6)
  np.testing.assert_array_equal(t, jax.random.randint(key, (6,), 0, 1000, dtype=jnp.int32))
  model_fn = lambda x, s: jnp.concatenate([x * 0.1, jnp.zeros_like(x)], axis=-1)
  x = jax.random.normal(jax.random.key(1), (6, 2, 2, 3))
  got, want = jax.jit(lambda x: (interface.training_losses(model_fn, x, t, key),
                                  diffusion.training_losses(model_fn, x, t, key=key)))(x)
  for name in ("loss", "mse", "vb"):
    np.testing.assert_array_equal(got[name], want[name])
  sampler = create_diffusion("5", learn_sigma=True)
  config = ml_collections.ConfigDict(dict(sampler="ddim", num_steps=5, eta=0.0, clip_denoised=False))
  got, want = jax.jit(lambda x: (ObjectiveInterface(sampler).sample_loop(model_fn, x, key, config),
                                 sampler.ddim_sample_loop(model_fn, x, key=key)))(x)
  np.testing.assert_array_equal(got, want)


def test_interface_for_a_transport_drops_learn_sigma_channels():
  transport = create_transport("Linear", "velocity")
  interface = transport.interface
  assert not interface.learns_variance and interface.is_flow
  exact = exact_model("Linear", "velocity")
  doubled = lambda x, t: jnp.concatenate([exact(x, t), jnp.full_like(x, 7.0)], axis=-1)  # a learn_sigma model
  x = jax.random.normal(jax.random.key(1), (6, 1, 1, 3))
  key = jax.random.key(2)
  t = interface.draw_training_t(key, 6)
  got, want = jax.jit(lambda x: (interface.training_losses(doubled, x, t, key),
                                  transport.training_losses(exact, x, key=key, t=t)))(x)
  np.testing.assert_array_equal(got["loss"], want["loss"])
  np.testing.assert_array_equal(got["vb"], np.zeros(6))
  for sampler, direct in (
      ("heun2", lambda x: transport.sample_ode(exact, x, "heun2", num_steps=7)),
      ("sde_heun", lambda x: transport.sample_sde(exact, x, "Heun", num_steps=7, key=key))):
    config = ml_collections.ConfigDict(dict(sampler=sampler, num_steps=7))
    got, want = jax.jit(lambda x: (interface.sample_loop(doubled, x, key, config), direct(x)))(x)
    np.testing.assert_array_equal(got, want, err_msg=sampler)
  with pytest.raises(ValueError, match=r"unknown flow-matching sampler 'ddpm'"):
    interface.sample_loop(doubled, x, key, ml_collections.ConfigDict(dict(sampler="ddpm", num_steps=7)))


# Bad input.


def test_unknown_names_are_named():
  with pytest.raises(ValueError, match=r"unknown path_type 'linear'.*'GVP', 'Linear', 'VP'"):
    create_transport("linear")
  with pytest.raises(ValueError, match=r"unknown prediction 'eps'.*'velocity', 'score', 'noise'"):
    create_transport(prediction="eps")
  with pytest.raises(ValueError, match=r"unknown loss_weight 'lambda'"):
    create_transport(prediction="noise", loss_weight="lambda")
  with pytest.raises(ValueError, match=r"train_eps must lie in \[0, 0.5\).*-0.1"):
    create_transport("VP", train_eps=-0.1)
  transport = create_transport()
  x = jnp.zeros((2, 1, 1, 3))
  model_fn = exact_model("Linear", "velocity")
  with pytest.raises(ValueError, match=r"unknown ODE sampling_method 'rk4'.*'euler', 'heun2', 'dopri5'"):
    transport.sample_ode(model_fn, x, "rk4")
  with pytest.raises(ValueError, match=r"unknown SDE sampling_method 'euler'.*'Euler', 'Heun'"):
    transport.sample_sde(model_fn, x, "euler", key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"unknown diffusion_form 'sgima'"):
    transport.sample_sde(model_fn, x, diffusion_form="sgima", key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"unknown last_step 'mean'"):
    transport.sample_sde(model_fn, x, last_step="mean", key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"num_steps counts time-grid points .* got 1"):
    transport.sample_ode(model_fn, x, "euler", num_steps=1)


def test_bad_arrays_are_named():
  transport = create_transport()
  model_fn = exact_model("Linear", "velocity")
  x = jnp.zeros((2, 1, 1, 3))
  with pytest.raises(ValueError, match=r"t must lie in \[0, 1\].*\[-0.5, 1.0\]"):
    transport.training_losses(model_fn, x, t=jnp.array([-0.5, 1.0]), x0=x)
  with pytest.raises(ValueError, match=r"t has shape \(3,\), expected \(2,\)"):
    transport.training_losses(model_fn, x, t=jnp.zeros(3), x0=x)
  with pytest.raises(ValueError, match=r"x0 has shape \(2, 1, 1, 4\)"):
    transport.training_losses(model_fn, x, t=jnp.zeros(2), x0=jnp.zeros((2, 1, 1, 4)))
  with pytest.raises(ValueError, match=r"needs a PRNG `key`"):
    transport.training_losses(model_fn, x)
  with pytest.raises(ValueError, match=r"step_noise has shape \(10, 2, 1, 1, 3\), expected .* \(9, 2, 1, 1, 3\)"):
    transport.sample_sde(model_fn, x, num_steps=10, step_noise=jnp.zeros((10, 2, 1, 1, 3)))
  with pytest.raises(ValueError, match=r"pass a PRNG `key` or explicit `step_noise`"):
    transport.sample_sde(model_fn, x, num_steps=10)
  doubled = lambda x, t: jnp.concatenate([x, x], axis=-1)
  with pytest.raises(ValueError, match=r"\(2, 1, 1, 6\).*first_channels\(model_fn, 3\)"):
    transport.sample_ode(doubled, x, "euler", num_steps=3)
  np.testing.assert_array_equal(transport.sample_ode(first_channels(doubled, 3), x, "euler", num_steps=3), x)
  with pytest.raises(ValueError, match=r"sample_eps=None"):
    create_transport("VP", train_eps=1e-4).sample_ode(model_fn, x, "euler", num_steps=3)


def test_stratified_training_t():
  key = jax.random.key(7)
  diffusion = ObjectiveInterface(create_diffusion("", learn_sigma=True))
  np.testing.assert_array_equal(diffusion.draw_training_t(key, 16, stratified=True),
                                objectives.draw_timesteps(key, 16, 1000, stratified=True))
  t = np.asarray(create_transport("VP").interface.draw_training_t(key, 4000, stratified=True))
  quarter = np.arange(4000) % 4
  t1 = 1 - 1e-5
  assert np.all(t >= quarter * t1 / 4 - 1e-6) and np.all(t <= (quarter + 1) * t1 / 4 + 1e-6)


def test_guidance_interval():
  """Inside the (closed) interval the output is guided_model_fn's; outside, guidance at scale 1 (conditional)."""
  def apply_fn(x, t, y):  # a toy model whose conditional and null rows differ
    return x * (1.0 + y[:, None, None, None].astype(x.dtype)) + t[:, None, None, None]

  y = jnp.array([3, 5, 10, 10])
  x = jax.random.normal(jax.random.key(0), (4, 2, 2, 4))
  x = jnp.concatenate([x[:2], x[:2]])
  model_fn = jax.jit(interval_guided_model_fn(apply_fn, y, 4.0, guidance_interval=(0.3, 0.7)))  # t traced
  for time, inside in ((0.3, True), (0.5, True), (0.7, True), (0.29, False), (0.9, False)):
    t = jnp.full((4,), time)  # every sampler gives all rows the same t
    out = model_fn(x, t)
    guided = guided_model_fn(apply_fn, y, 4.0 if inside else 1.0)(x, t)
    np.testing.assert_allclose(out, guided, rtol=1e-6, atol=1e-5, err_msg=str(time))  # jit vs eager: ulps of ~30
  conditional = apply_fn(x, t, y)  # outside: the guided channels of both halves are the conditional rows'
  np.testing.assert_allclose(out[2:, ..., :3], conditional[:2, ..., :3], rtol=1e-6)
  np.testing.assert_allclose(out[2:, ..., 3], conditional[2:, ..., 3], rtol=1e-6)  # the 4th channel: own row
  with pytest.raises(ValueError, match=r"low <= high, got \(0.7, 0.3\)"):
    interval_guided_model_fn(apply_fn, y, 4.0, guidance_interval=(0.7, 0.3))
