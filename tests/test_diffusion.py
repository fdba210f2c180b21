"""Gaussian diffusion: schedules, respacing, training losses, DDPM / DDIM loops and classifier-free guidance.

References: the official DiT diffusion code (tests/data/diffusion_tiny, outputs of the PyTorch code on the tiny
DiT, NCHW; see its manifest.json), an independent float64 numpy implementation of the samplers written from the
papers' formulas (not from the code under test), and analytic identities.

Tolerances are relative, max|err| / max|ref| per array, because unclipped samples reach a few hundred.
"""
import fractions
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import convert
from dyngen import models
from dyngen.diffusion import GaussianDiffusion
from dyngen.diffusion import LossType
from dyngen.diffusion import MeanType
from dyngen.diffusion import VarianceType
from dyngen.diffusion import create_diffusion
from dyngen.diffusion import guided_model_fn
from dyngen.diffusion import likelihoods
from dyngen.diffusion import schedules
from dyngen.diffusion import space_timesteps

DATA = pathlib.Path(__file__).parent / "data" / "diffusion_tiny"

# float32 against the official float32/float64 runs. Measured: losses ≤ 3.3e-6 (the VB term's log/exp in
# float32), samples and per-step arrays ≤ 1.3e-6. The official float32 timestep features differ from XLA's by
# up to ~6e-5 at t ≈ 1000 (fixtures README), i.e. ~1e-6 in the outputs, so 1e-5 is the float32 floor, not slack.
F32_RTOL = 1e-5


def rel_err(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return np.abs(actual - reference).max() / np.abs(reference).max()


def nhwc(a):
  """The fixtures' (..., C, H, W) -> dyngen's (..., H, W, C)."""
  return np.moveaxis(np.asarray(a), -3, -1)


@pytest.fixture(scope="module")
def fixture():
  inputs = np.load(DATA / "inputs.npz")
  outputs = np.load(DATA / "outputs.npz")
  return {k: inputs[k] for k in inputs.files} | {k: outputs[k] for k in outputs.files}


# Schedules and respacing.


def test_schedules_match_official(fixture):
  # Both sides build float64 schedules with the same operations: exact agreement expected (1e-15 for ulps).
  cases = [("train", ""), ("sample", "10"), ("ddimN", "ddim10")]
  for name, respacing in cases:
    diffusion = create_diffusion(respacing)
    np.testing.assert_allclose(diffusion.betas, fixture[f"sched_{name}_betas"], rtol=1e-15, atol=0)
    alphas_cumprod = np.cumprod(1 - np.array(diffusion.betas))
    np.testing.assert_allclose(alphas_cumprod, fixture[f"sched_{name}_alphas_cumprod"], rtol=1e-14, atol=0)
    if name != "train":
      assert diffusion.timestep_map == tuple(fixture[f"sched_{name}_timestep_map"])


def test_space_timesteps_by_hand():
  # 10 steps in sections of 5: 3 of [0..4] stride 2, 2 of [5..9] stride 4.
  assert space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]
  # 11 steps, 2 sections: the first gets the extra step (6 steps: 0..5), the second 5 steps (6..10).
  assert space_timesteps(11, "2,3") == [0, 5, 6, 8, 10]
  assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
  assert space_timesteps(1000, "") == list(range(1000))
  assert space_timesteps(1000, None) == list(range(1000))
  assert space_timesteps(1000, [10]) == space_timesteps(1000, "10")
  # "25": positions k·999/24 rounded half-to-even, computed exactly with fractions (999/24 = 41.625).
  assert space_timesteps(1000, "25") == [round(fractions.Fraction(999 * k, 24)) for k in range(25)]
  # "250": every kept step is distinct, both ends kept, gaps of 4 (999/249 ≈ 4.012).
  steps = space_timesteps(1000, "250")
  assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and set(np.diff(steps)) <= {4, 5}


def test_respaced_process_keeps_alphas_cumprod():
  # The respaced process must have the original ᾱ at the kept steps (independent: ᾱ from the raw linspace).
  original = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  for respacing in ("25", "ddim25", "250", "7,3"):
    diffusion = create_diffusion(respacing)
    np.testing.assert_allclose(np.cumprod(1 - np.array(diffusion.betas)), original[list(diffusion.timestep_map)],
                               rtol=1e-12)


def test_cosine_schedule_telescopes():
  # ∏(1 − β_i) = ᾱ((i+1)/T) / ᾱ(0) wherever the 0.999 cap is inactive (all but the very last steps).
  steps = 1000
  betas = schedules.named_beta_schedule("squaredcos_cap_v2", steps)
  f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  expected = np.array([f((i + 1) / steps) / f(0) for i in range(steps)])
  uncapped = np.flatnonzero(betas < 0.999)
  assert uncapped.size > 990 and betas.max() == 0.999
  first_capped = betas.argmax()
  np.testing.assert_allclose(np.cumprod(1 - betas)[:first_capped], expected[:first_capped], rtol=1e-10)


@pytest.mark.parametrize("respacing,message", [
    ("fast", "not understood"),
    ("10,x", "not understood"),
    ("ddimx", "'ddim' followed by a step count"),
    ("ddim600", "no integer stride gives exactly 600"),
    ("2000", "cannot keep 2000"),
    ("0", "at least one step"),
    ("600,600", "cannot keep 600"),
])
def test_bad_respacing_is_refused(respacing, message):
  with pytest.raises(ValueError, match=message):
    create_diffusion(respacing)


def test_bad_options_are_refused():
  with pytest.raises(ValueError, match="unknown noise_schedule 'cosine'"):
    create_diffusion("", noise_schedule="cosine")
  with pytest.raises(ValueError, match="diffusion_steps must be a positive int"):
    create_diffusion("", diffusion_steps=0)
  with pytest.raises(ValueError, match="betas must be"):
    GaussianDiffusion(betas=(0.1, 1.5), timestep_map=(0, 1))
  with pytest.raises(ValueError, match="timestep_map must hold 2 increasing"):
    GaussianDiffusion(betas=(0.1, 0.2), timestep_map=(1, 0))


def test_diffusion_is_hashable_static_configuration():
  # Samplers close over the diffusion or take it as a jit static argument: equal configs must hash equal.
  a, b = create_diffusion("10"), create_diffusion("10")
  assert a == b and hash(a) == hash(b) and a != create_diffusion("ddim10")
  assert a.num_timesteps == 10


# Training losses.


def training_inputs(fixture, dtype):
  x_start = jnp.asarray(nhwc(fixture["train_x_start"]), dtype)
  noise = jnp.asarray(nhwc(fixture["train_noise"]), dtype)
  return x_start, jnp.asarray(fixture["train_t"], jnp.int32), noise


def test_training_losses_match_official_float32(fixture):
  # The stored official model output replaces the network, so this checks the loss maths alone.
  diffusion = create_diffusion("")
  x_start, t, noise = training_inputs(fixture, jnp.float32)

  @jax.jit
  def run(x_start, t, noise):
    seen = {}

    def model_fn(x_t, t_model):
      seen.update(x_t=x_t, t=t_model)
      return jnp.asarray(nhwc(fixture["train_model_out_f32"]))

    return diffusion.training_losses(model_fn, x_start, t, noise=noise), seen

  terms, seen = run(x_start, t, noise)
  # q_sample: two float32 products and a sum with float32-rounded coefficients on both sides; XLA may fuse
  # them into a multiply-add, hence one float32 ulp (~2.4e-7 at |x_t| ≈ 3.4), not bit equality.
  assert rel_err(seen["x_t"], nhwc(fixture["train_x_t_f32"])) < 1e-7
  np.testing.assert_array_equal(seen["t"], fixture["train_t"])
  for name in ("loss", "mse", "vb"):
    assert terms[name].shape == (4,)
    assert rel_err(terms[name], fixture[f"train_{name}_f32"]) < F32_RTOL, name
    assert rel_err(terms[name], fixture[f"train_{name}_f64"]) < F32_RTOL, name


def test_training_losses_match_official_float64(fixture):
  # In float64 (with the official float32-rounded coefficient gather) the maths is identical to upstream's:
  # measured 2e-15, so 1e-12 would catch any change of formula, order of VB branches or coefficient rounding.
  with jax.enable_x64(True):
    diffusion = create_diffusion("")
    x_start, t, noise = training_inputs(fixture, jnp.float64)
    model_out = jnp.asarray(nhwc(fixture["train_model_out_f64"]))
    np.testing.assert_allclose(jax.jit(diffusion.q_sample)(x_start, t, noise), nhwc(fixture["train_x_t_f64"]),
                               rtol=1e-15)
    losses = jax.jit(lambda x, t, n: diffusion.training_losses(lambda *_: model_out, x, t, noise=n))
    terms = losses(x_start, t, noise)
    for name in ("loss", "mse", "vb"):
      assert terms[name].dtype == jnp.float64
      assert rel_err(terms[name], fixture[f"train_{name}_f64"]) < 1e-12, name


def test_vb_term_trains_only_the_variance_channels(fixture):
  # DiT detaches the mean in the VB term: d vb / d eps = 0, d mse / d var = 0, both other gradients non-zero.
  diffusion = create_diffusion("")
  x_start, t, noise = training_inputs(fixture, jnp.float32)
  x_t = diffusion.q_sample(x_start, t, noise)
  model_out = jnp.asarray(nhwc(fixture["train_model_out_f32"]))
  grads = jax.jit(jax.jacrev(lambda out: {k: v.sum() for k, v in
                                          diffusion.loss_terms(out, x_start, x_t, t, noise).items()}))(model_out)
  assert np.all(grads["vb"][..., :4] == 0) and np.abs(grads["vb"][..., 4:]).max() > 1e-4
  assert np.all(grads["mse"][..., 4:] == 0) and np.abs(grads["mse"][..., :4]).max() > 1e-4


def test_loss_options(fixture):
  x_start, t, noise = training_inputs(fixture, jnp.float32)
  model_out = jnp.asarray(nhwc(fixture["train_model_out_f32"]))

  def losses(diffusion, output=model_out):
    return jax.jit(lambda x, t, n: diffusion.training_losses(lambda *_: output, x, t, noise=n))(x_start, t, noise)

  default = losses(create_diffusion(""))

  # use_kl: the loss is the (undetached) VB term times the number of steps; the forward value equals the MSE
  # path's detached VB term up to float32 rounding.
  kl = losses(create_diffusion("", use_kl=True))
  np.testing.assert_allclose(kl["vb"], default["vb"], rtol=1e-6)
  np.testing.assert_allclose(kl["loss"], 1000 * default["vb"], rtol=1e-6)

  # rescale_learned_sigmas with 500 steps: the VB term weighs 500/1000.
  half = create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=500)
  assert half.loss_type == LossType.RESCALED_MSE
  rescaled = losses(half)
  plain = losses(create_diffusion("", diffusion_steps=500))
  np.testing.assert_allclose(rescaled["vb"], 0.5 * plain["vb"], rtol=1e-6)

  # predict_xstart: the MSE target is x_0; learn_sigma off: no VB term, loss = mse, C output channels.
  fixed = create_diffusion("", learn_sigma=False, predict_xstart=True)
  prediction = model_out[..., :4]
  terms = losses(fixed, prediction)
  np.testing.assert_allclose(terms["mse"], np.mean((np.asarray(x_start) - prediction) ** 2, axis=(1, 2, 3)),
                             rtol=1e-6)
  np.testing.assert_array_equal(terms["vb"], 0)
  np.testing.assert_array_equal(terms["loss"], terms["mse"])


def test_fixed_small_kl_is_the_mean_gap():
  # With σ² = β̃_t (the true posterior variance) the KL per element is (μ̃ − μ)² / (2 β̃_t), in nats.
  diffusion = create_diffusion("", learn_sigma=False, sigma_small=True, use_kl=True)
  rng = np.random.default_rng(0)  # numpy draws: compiling jax.random costs seconds of CPU per shape
  x_start = jnp.asarray(rng.uniform(-1, 1, size=(3, 4, 4, 2)), jnp.float32)
  noise, prediction = jnp.asarray(rng.normal(size=(2,) + x_start.shape), jnp.float32)
  t = jnp.array([1, 300, 999])
  x_t = jax.jit(diffusion.q_sample)(x_start, t, noise)
  vb = jax.jit(diffusion.loss_terms)(prediction, x_start, x_t, t, noise)["vb"]

  # float64 numpy reference.
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  abar_prev = np.append(1.0, abar[:-1])
  x_start64, x_t64, eps64 = (np.asarray(a, np.float64) for a in (x_start, x_t, prediction))
  bt = lambda a: a[np.asarray(t)][:, None, None, None]
  posterior_var = 1 / (1 / (1 - bt(abar_prev)) + (1 - bt(betas)) / bt(betas))  # Bayes: precisions add
  posterior_mean = lambda x0: posterior_var * (np.sqrt(bt(abar_prev)) * x0 / (1 - bt(abar_prev))
                                               + np.sqrt(1 - bt(betas)) * x_t64 / bt(betas))
  x0_model = (x_t64 - np.sqrt(1 - bt(abar)) * eps64) / np.sqrt(bt(abar))
  gap = (posterior_mean(x_start64) - posterior_mean(x0_model)) ** 2 / (2 * posterior_var)
  expected = gap.mean(axis=(1, 2, 3)) / np.log(2)
  # The model's x_0 at t = 999 is amplified ~156× and squared: float32 rounding reaches ~1e-5 relative.
  np.testing.assert_allclose(vb, expected, rtol=5e-5)


def test_variance_types():
  # Learned: the variance channels are the log-variance. Fixed large: β_t, with β̃_1 standing in at step 0.
  # Fixed small: β̃_t (β̃_1 at step 0, where β̃_0 = 0). Values from the raw linspace in float64; float32: 1e-6.
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  posterior_var = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])
  x = jnp.zeros((3, 2, 2, 1))
  index = jnp.array([0, 1, 700])
  expected = {VarianceType.FIXED_LARGE: np.array([posterior_var[0], betas[1], betas[700]]),
              VarianceType.FIXED_SMALL: np.array([posterior_var[0], posterior_var[0], posterior_var[699]])}
  for variance_type, variance in expected.items():
    diffusion = GaussianDiffusion(tuple(betas), tuple(range(1000)), variance_type=variance_type)
    out = jax.jit(diffusion.p_mean_variance)(x, x, index)
    np.testing.assert_allclose(np.asarray(out["variance"]).ravel(), variance, rtol=1e-6)
  learned = GaussianDiffusion(tuple(betas), tuple(range(1000)), variance_type=VarianceType.LEARNED)
  log_variance = jnp.full((3, 2, 2, 1), -3.5)
  out = jax.jit(learned.p_mean_variance)(jnp.concatenate([x, log_variance], -1), x, index)
  np.testing.assert_array_equal(out["log_variance"], log_variance)
  # Predicting x_0: the prediction is the x_0 estimate itself (clipped when asked).
  start_x = GaussianDiffusion(tuple(betas), tuple(range(1000)), MeanType.START_X, VarianceType.FIXED_SMALL)
  out = jax.jit(start_x.p_mean_variance, static_argnums=3)(x + 1.5, x, index, True)
  np.testing.assert_array_equal(out["pred_xstart"], 1.0)


def test_wrong_model_output_channels_are_refused(fixture):
  x_start, t, noise = training_inputs(fixture, jnp.float32)
  with pytest.raises(ValueError, match=r"expected \(4, 8, 8, 8\).*learned variances need 2×C"):
    create_diffusion("").training_losses(lambda x, t: x, x_start, t, noise=noise)
  with pytest.raises(ValueError, match=r"expected \(4, 8, 8, 4\)"):
    create_diffusion("", learn_sigma=False).training_losses(lambda x, t: jnp.concatenate([x, x], -1), x_start, t,
                                                            noise=noise)
  with pytest.raises(ValueError, match="needs either `noise` or a PRNG `key`"):
    create_diffusion("").training_losses(lambda x, t: x, x_start, t)


# Analytic checks of the building blocks.


def test_posterior_matches_bayes_rule():
  # q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0): precision 1/(1 − ᾱ_{t−1}) + α_t/β_t, mean
  # variance·(√ᾱ_{t−1} x_0 / (1 − ᾱ_{t−1}) + √α_t x_t / β_t). Coefficients are float32: 1e-6.
  diffusion = create_diffusion("ddim25")
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[list(diffusion.timestep_map)]
  abar_prev = np.append(1.0, abar[:-1])
  beta = 1 - abar / abar_prev
  index = np.arange(1, 25)
  x_start, x_t = np.random.default_rng(0).normal(size=(2, 24, 1, 1, 3))
  mean, variance, _ = jax.jit(diffusion.q_posterior_mean_variance)(
      jnp.asarray(x_start, jnp.float32), jnp.asarray(x_t, jnp.float32), index)
  per_row = lambda a: a[index][:, None, None, None]
  expected_var = 1 / (1 / per_row(1 - abar_prev) + per_row(1 - beta) / per_row(beta))
  np.testing.assert_allclose(np.asarray(variance), expected_var, rtol=1e-6)
  expected_mean = expected_var * (per_row(np.sqrt(abar_prev)) * x_start / per_row(1 - abar_prev)
                                  + per_row(np.sqrt(1 - beta)) * x_t / per_row(beta))
  assert rel_err(mean, expected_mean) < 1e-5


def test_q_sample_statistics():
  # x_t = √ᾱ x_0 + √(1 − ᾱ) ε: 40000 draws per t; the sample mean is within 5 standard errors of √ᾱ x_0 and
  # the sample variance within 3% of 1 − ᾱ (~4 standard errors: a variance estimate's is √(2/n) = 0.7%).
  diffusion = create_diffusion("")
  n = 40000
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  draw = jax.jit(lambda t, noise: diffusion.q_sample(jnp.full((n, 1, 1, 1), 0.7), jnp.full((n,), t), noise))
  for t_value in (0, 500, 999):
    noise = np.random.default_rng(t_value).normal(size=(n, 1, 1, 1)).astype(np.float32)
    x_t = np.asarray(draw(t_value, noise), np.float64).ravel()
    std = math.sqrt(1 - abar[t_value])
    assert abs(x_t.mean() - math.sqrt(abar[t_value]) * 0.7) < 5 * std / math.sqrt(n)
    assert x_t.var() == pytest.approx(std ** 2, rel=0.03)


def test_discretized_likelihood_is_a_distribution():
  # The 256 levels' probabilities telescope to exactly 1 (shared bin edges); float32: 1e-5.
  levels = jnp.linspace(-1, 1, 256)[:, None]
  means = jnp.array([[-1.2, -0.3, 0.0, 0.45, 0.999]])
  total = jax.jit(lambda log_scale: jnp.exp(likelihoods.discretized_gaussian_log_likelihood(
      levels, means, jnp.full_like(means, log_scale))).sum(axis=0))
  for log_scale in (-6.0, -2.0, 0.0, 1.0):
    np.testing.assert_allclose(total(log_scale), 1.0, atol=1e-5)


def test_normal_kl_matches_numerical_integral():
  # ∫ p log(p/q) by the trapezoid rule on a fine grid (error ≪ 1e-6 for these well-resolved Gaussians).
  grid = np.linspace(-30, 30, 600001)
  log_pdf = lambda x, m, lv: -0.5 * (np.log(2 * np.pi) + lv + (x - m) ** 2 / np.exp(lv))
  for m1, lv1, m2, lv2 in [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.5), (2.0, 1.0, 0.0, -0.7)]:
    p = np.exp(log_pdf(grid, m1, lv1))
    expected = np.trapezoid(p * (log_pdf(grid, m1, lv1) - log_pdf(grid, m2, lv2)), grid)
    assert float(likelihoods.normal_kl(m1, lv1, m2, lv2)) == pytest.approx(expected, abs=1e-6)


# Sampling loops against a float64 numpy reference (other respacings, variance types, eta, clipping).


class ToyModel:
  """A smooth, timestep-dependent stand-in for a network, in jnp or numpy: eps and variance values in (-1, 1)."""

  def __init__(self, channels, learn_sigma):
    rng = np.random.default_rng(7)
    self.a, self.b, self.c = rng.uniform(0.3, 0.9, size=(3, channels))
    self.learn_sigma = learn_sigma

  def __call__(self, x, t, xp=jnp):
    s = xp.asarray(t, x.dtype)[:, None, None, None] / 1000
    eps = xp.tanh(self.a * x + self.b * s)
    if not self.learn_sigma:
      return eps
    return xp.concatenate([eps, xp.tanh(self.c * x - s)], axis=-1)


def reference_loop(kept, model, x_T, step_noise, sampler, learn_sigma, clip, eta=0.0):
  """float64 DDPM / DDIM over the original timesteps `kept`, from the papers' formulas (no shared code)."""
  abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  abar = abar_all[kept]
  abar_prev = np.append(1.0, abar[:-1])
  beta = 1 - abar / abar_prev
  posterior_var = np.append(np.nan, 1 / (1 / (1 - abar_prev[1:]) + (1 - beta[1:]) / beta[1:]))
  x = np.asarray(x_T, np.float64)
  for k, i in enumerate(range(len(kept) - 1, -1, -1)):
    out = model(x, np.full(x.shape[0], kept[i]), xp=np)
    eps = out[..., :x.shape[-1]]
    x0 = (x - np.sqrt(1 - abar[i]) * eps) / np.sqrt(abar[i])
    if clip:
      x0 = np.clip(x0, -1, 1)
    noise = np.asarray(step_noise[k], np.float64)
    if sampler == "ddpm":
      if i == 0:  # ᾱ_{-1} = 1: the posterior collapses onto x_0, and no noise is added.
        x = x0
        continue
      mean = posterior_var[i] * (np.sqrt(abar_prev[i]) * x0 / (1 - abar_prev[i]) + np.sqrt(1 - beta[i]) * x / beta[i])
      if learn_sigma:  # learned range: v in [-1, 1] interpolates log β̃_t .. log β_t
        frac = (out[..., x.shape[-1]:] + 1) / 2
        log_var = frac * np.log(beta[i]) + (1 - frac) * np.log(posterior_var[i])
      else:  # fixed large: σ² = β_t
        log_var = np.log(beta[i])
      x = mean + np.exp(0.5 * log_var) * noise
    else:
      eps_from_x0 = (x - np.sqrt(abar[i]) * x0) / np.sqrt(1 - abar[i])
      sigma = eta * np.sqrt((1 - abar_prev[i]) / (1 - abar[i]) * (1 - abar[i] / abar_prev[i]))
      x = np.sqrt(abar_prev[i]) * x0 + np.sqrt(1 - abar_prev[i] - sigma ** 2) * eps_from_x0 + sigma * noise
  return x


@pytest.mark.parametrize("respacing,sampler,learn_sigma,clip,eta", [
    ("25", "ddpm", True, False, 0.0),
    ("25", "ddpm", False, True, 0.0),
    ("ddim25", "ddim", True, False, 0.0),
    ("ddim25", "ddim", False, True, 0.5),
    ("7,3", "ddim", True, False, 1.0),
])
def test_sampling_loops_match_float64_reference(respacing, sampler, learn_sigma, clip, eta):
  diffusion = create_diffusion(respacing, learn_sigma=learn_sigma)
  steps = diffusion.num_timesteps
  model = ToyModel(channels=3, learn_sigma=learn_sigma)
  rng = np.random.default_rng(1)
  x_T = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
  step_noise = jnp.asarray(rng.normal(size=(steps,) + x_T.shape), jnp.float32)
  if sampler == "ddpm":
    loop = lambda x, n: diffusion.p_sample_loop(model, x, step_noise=n, clip_denoised=clip)
  else:
    loop = lambda x, n: diffusion.ddim_sample_loop(model, x, step_noise=n, clip_denoised=clip, eta=eta)
  final = jax.jit(loop)(x_T, step_noise)
  expected = reference_loop(list(diffusion.timestep_map), model, x_T, step_noise, sampler, learn_sigma, clip, eta)
  # float32 with float32 coefficients vs float64 over 25 steps: measured ≤ 2e-6; 1e-5 relative.
  assert rel_err(final, expected) < F32_RTOL


def test_sampling_loop_is_one_program_and_respects_the_key():
  diffusion = create_diffusion("ddim25")
  traces = []

  def model_fn(x, t):
    traces.append(t.shape)
    return ToyModel(3, True)(x, t)

  x_T = jnp.ones((2, 4, 4, 3))
  loop = jax.jit(lambda x, key: diffusion.p_sample_loop(model_fn, x, key=key))
  jaxpr = jax.make_jaxpr(lambda x, key: diffusion.p_sample_loop(model_fn, x, key=key))(x_T, jax.random.key(0))
  assert "scan" in str(jaxpr) and len(traces) == 1, "25 steps must trace the model once, inside one scan"
  a = loop(x_T, jax.random.key(0))
  b = loop(x_T, jax.random.key(0))
  c = loop(x_T, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
  # The key path is the explicit-noise path fed with jax.random.split(key, S) draws.
  keys = jax.random.split(jax.random.key(0), 25)
  noise = jax.vmap(lambda k: jax.random.normal(k, x_T.shape))(keys)
  with_noise = jax.jit(lambda x, n: diffusion.p_sample_loop(model_fn, x, step_noise=n))(x_T, noise)
  np.testing.assert_allclose(with_noise, a, rtol=1e-6, atol=1e-6)


def test_sampler_input_errors():
  diffusion = create_diffusion("10")
  model = ToyModel(3, True)
  x_T = jnp.ones((2, 4, 4, 3))
  with pytest.raises(ValueError, match="pass a PRNG `key` or explicit `step_noise`"):
    diffusion.p_sample_loop(model, x_T)
  with pytest.raises(ValueError, match="pass a PRNG `key` or explicit `step_noise`"):
    diffusion.ddim_sample_loop(model, x_T, eta=0.5)
  with pytest.raises(ValueError, match=r"step_noise has shape \(9, 2, 4, 4, 3\), expected .*\(10, 2, 4, 4, 3\)"):
    diffusion.p_sample_loop(model, x_T, step_noise=jnp.zeros((9, 2, 4, 4, 3)))
  with pytest.raises(ValueError, match="eta=0.5 adds noise"):
    diffusion.ddim_sample(model, x_T, 3, eta=0.5)
  # eta = 0 needs no randomness at all.
  assert jax.jit(lambda x: diffusion.ddim_sample_loop(model, x))(x_T).shape == x_T.shape


# Classifier-free guidance.


def test_guidance_semantics():
  # A toy apply_fn whose output depends on the label, so the halves differ; numpy reference of the rule.
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 2, 2, 4)).astype(np.float32)
  y = jnp.array([1, 2, 10, 10])
  weights = rng.normal(size=(11, 8)).astype(np.float32)

  def apply_fn(x_in, t, labels):
    # One product per value, so the pass-through channels can be compared bit for bit (no fused multiply-add).
    return jnp.tile(x_in, (1, 1, 1, 2)) * weights[labels][:, None, None, :]

  t = jnp.full((4,), 500)
  raw = np.asarray(apply_fn(jnp.asarray(np.concatenate([x[:2], x[:2]])), t, y))
  for channels, guided in ((3, slice(0, 3)), (None, slice(0, 4))):
    out = np.asarray(jax.jit(guided_model_fn(apply_fn, y, 1.5, guidance_channels=channels))(jnp.asarray(x), t))
    mixed = raw[2:, ..., guided] + 1.5 * (raw[:2, ..., guided] - raw[2:, ..., guided])
    # float32, a few roundings (and possible fused multiply-adds) per value: 1e-6 relative to the array max.
    assert rel_err(out[:2, ..., guided], mixed) < 1e-6 and rel_err(out[2:, ..., guided], mixed) < 1e-6
    rest = slice(guided.stop, 8)
    np.testing.assert_array_equal(out[..., rest], raw[..., rest])
  with pytest.raises(ValueError, match="even batch"):
    guided_model_fn(apply_fn, y[:3], 1.5)(jnp.asarray(x[:3]), t[:3])
  with pytest.raises(ValueError, match=r"guidance_channels must be a positive int, or 0 or None"):
    guided_model_fn(apply_fn, y, 1.5, guidance_channels=-1)
  # 0 (the configs' spelling of "all channels") is None.
  np.testing.assert_array_equal(guided_model_fn(apply_fn, y, 1.5, guidance_channels=0)(jnp.asarray(x), t),
                                guided_model_fn(apply_fn, y, 1.5, guidance_channels=None)(jnp.asarray(x), t))


# The official DiT sampling runs on the tiny DiT (dit_tiny weights).


def tiny_dit_config(**overrides):
  return ml_collections.ConfigDict(dict(
      name="dit", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
      class_dropout_prob=0.1, num_classes=10, learn_sigma=True) | overrides)


@pytest.fixture(scope="module")
def official_runs(fixture):
  """Every sampler of the fixture on the converted tiny DiT, in one jitted program (one compile)."""
  config = tiny_dit_config()
  params = convert.load_torch_params(DATA / "checkpoint.pt", config)
  model = models.build(config)
  apply_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
  y = jnp.asarray(fixture["sample_y"], jnp.int32)
  model_fn = guided_model_fn(apply_fn, y, float(fixture["cfg_scale"]))
  respaced, ddim_striding = create_diffusion("10"), create_diffusion("ddim10")
  x_T = jnp.asarray(nhwc(fixture["sample_x_T"]))
  step_noise = jnp.asarray(nhwc(fixture["sample_noises"]))

  @jax.jit
  def run_all(x_T, step_noise):
    return dict(
        ddpm=respaced.p_sample_loop(model_fn, x_T, step_noise=step_noise, return_trajectory=True),
        ddpm_clip=respaced.p_sample_loop(model_fn, x_T, step_noise=step_noise, clip_denoised=True),
        ddim=respaced.ddim_sample_loop(model_fn, x_T, step_noise=step_noise, return_trajectory=True),
        ddimN=ddim_striding.ddim_sample_loop(model_fn, x_T),
        guided_first=model_fn(x_T, jnp.full((x_T.shape[0],), 999)),
        forward=apply_fn(jnp.asarray(nhwc(fixture["train_x_t_f32"])), jnp.asarray(fixture["train_t"], jnp.int32),
                         jnp.asarray(fixture["train_y"], jnp.int32)),
    )

  return run_all(x_T, step_noise)


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_official_ddpm_loop(official_runs, fixture, precision):
  final, trajectory = official_runs["ddpm"]
  assert rel_err(final, nhwc(fixture[f"ddpm_final_{precision}"])) < F32_RTOL
  assert rel_err(trajectory.sample, nhwc(fixture[f"ddpm_steps_{precision}"])) < F32_RTOL
  assert rel_err(trajectory.pred_xstart, nhwc(fixture[f"ddpm_pred_xstart_{precision}"])) < F32_RTOL
  assert rel_err(official_runs["ddpm_clip"], nhwc(fixture[f"ddpm_clip_final_{precision}"])) < F32_RTOL


@pytest.mark.parametrize("precision", ["f32", "f64"])
def test_official_ddim_loops(official_runs, fixture, precision):
  final, trajectory = official_runs["ddim"]
  assert rel_err(final, nhwc(fixture[f"ddim_final_{precision}"])) < F32_RTOL
  assert rel_err(trajectory.sample, nhwc(fixture[f"ddim_steps_{precision}"])) < F32_RTOL
  assert rel_err(official_runs["ddimN"], nhwc(fixture[f"ddimN_final_{precision}"])) < F32_RTOL


def test_official_forward_and_guided_forward(official_runs, fixture):
  # Plain forward: the model output stored with the training losses.
  assert rel_err(official_runs["forward"], nhwc(fixture["train_model_out_f64"])) < F32_RTOL
  # Guided forward (forward_with_cfg at t = 999): the official first DDPM step stores
  # pred_x0 = √(1/ᾱ) x_T − √(1/ᾱ − 1) ε_guided, which gives back the guided eps of all 4 channels.
  # ᾱ at t = 999 from the raw schedule; the official run rounds its coefficients to float32, so do we.
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[999]
  recip, recipm1 = (float(np.float32(v)) for v in (np.sqrt(1 / abar), np.sqrt(1 / abar - 1)))
  x_T = nhwc(fixture["sample_x_T"]).astype(np.float64)
  eps_official = (recip * x_T - nhwc(fixture["ddpm_pred_xstart_f64"][0])) / recipm1
  eps = np.asarray(official_runs["guided_first"])[..., :4]
  assert rel_err(eps, eps_official) < F32_RTOL
  # The official quirk: the 3 guided channels agree across halves, the 4th is each half's own output.
  np.testing.assert_array_equal(eps[:2, ..., :3], eps[2:, ..., :3])
  assert np.abs(eps[:2, ..., 3] - eps[2:, ..., 3]).max() > 1e-3


def test_official_loops_in_float64(fixture):
  # The float64 model and sampler against the float64 official runs: measured 7e-8 (DDPM) and 1.6e-7 (DDIM).
  # What remains is the float32 timestep features (computed in float32 in both codes, by different sin/cos:
  # ~1e-6 in outputs, fixtures README), so 1e-6 here is 10x tighter than the float32 tests.
  with jax.enable_x64(True):
    config = tiny_dit_config(dtype="float64")
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64),
                          convert.load_torch_params(DATA / "checkpoint.pt", config))
    model = models.build(config)
    model_fn = guided_model_fn(lambda x, t, y: model.apply({"params": params}, x, t, y),
                               jnp.asarray(fixture["sample_y"], jnp.int32), float(fixture["cfg_scale"]))
    diffusion = create_diffusion("10")

    @jax.jit
    def run(x_T, step_noise):
      return (diffusion.p_sample_loop(model_fn, x_T, step_noise=step_noise, return_trajectory=True),
              diffusion.ddim_sample_loop(model_fn, x_T))

    (ddpm, trajectory), ddim = run(jnp.asarray(nhwc(fixture["sample_x_T"]), jnp.float64),
                                   jnp.asarray(nhwc(fixture["sample_noises"]), jnp.float64))
    assert ddpm.dtype == ddim.dtype == jnp.float64
    assert rel_err(trajectory.sample, nhwc(fixture["ddpm_steps_f64"])) < 1e-6
    assert rel_err(trajectory.pred_xstart, nhwc(fixture["ddpm_pred_xstart_f64"])) < 1e-6
    assert rel_err(ddim, nhwc(fixture["ddim_final_f64"])) < 1e-6
