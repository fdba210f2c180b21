"""Gaussian diffusion with DiT's semantics: forward process, training losses, and DDPM / DDIM sampling loops.

A `GaussianDiffusion` is a frozen, hashable description of one (possibly respaced) process; its methods are pure
functions of arrays, so they run under `jax.jit` and the diffusion object can be closed over or passed as a
static argument. Every sampling loop is one `lax.scan`: jit it and the whole loop is one XLA program.

Conventions (dyngen's): arrays are NHWC; `model_fn(x, t)` takes x: (B, H, W, C) and t: (B,) int32 ORIGINAL
timesteps (the respacing map is applied here) and returns (B, H, W, C_out), where C_out = 2C with a learned
variance (last axis [prediction, variance values]) and C otherwise. Methods that take an `index` work in this
process's own (respaced) steps 0..num_timesteps-1; without respacing they coincide with original timesteps.

Precision follows the official code: schedules are float64 numpy, and each coefficient is gathered as float32
before it meets the arrays (so a float64 run still sees float32-rounded coefficients, exactly as upstream).

Step indices outside [0, num_timesteps) are never clamped (a plain gather would clamp them, so a respaced
250-step process would give t = 249, 500 and 999 the same x_t). Policy: a concrete index (numpy, a Python int,
an eager jax array) is checked at once and a bad one raises ValueError naming the values; a traced index (under
jit, inside the sampling scan) cannot raise without a host callback, which would sync every step and break the
one-program loop on TPU, so a bad entry gathers NaN coefficients instead: that row's x_t, loss and sample are NaN
(the trainer's non-finite-loss check then stops with the step), never a plausible wrong number. Index dtypes and
shapes are static, so they are checked under jit too.
"""
import dataclasses
import enum
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dyngen.diffusion import likelihoods
from dyngen.diffusion import schedules

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class MeanType(enum.Enum):
  """What the model's first C output channels predict."""
  EPSILON = "epsilon"
  START_X = "start_x"


class VarianceType(enum.Enum):
  """How the reverse-step variance is obtained."""
  LEARNED = "learned"  # the model outputs log-variance directly
  LEARNED_RANGE = "learned_range"  # the model outputs v in [-1, 1]; log σ² interpolates log β̃_t .. log β_t
  FIXED_LARGE = "fixed_large"  # σ² = β_t (β̃_1 at the first step)
  FIXED_SMALL = "fixed_small"  # σ² = β̃_t, the posterior variance


class LossType(enum.Enum):
  MSE = "mse"  # MSE of the prediction, plus the VB term (mean detached) when the variance is learned
  RESCALED_MSE = "rescaled_mse"  # as MSE, VB term scaled by num_timesteps / 1000
  KL = "kl"  # the VB term alone
  RESCALED_KL = "rescaled_kl"  # the VB term times num_timesteps


class Trajectory(NamedTuple):
  """Per-step values of a sampling loop, in the order the steps run (index S-1 first, index 0 last)."""
  sample: jax.Array  # (S, B, H, W, C): the state after each step; sample[-1] is the final sample
  pred_xstart: jax.Array  # (S, B, H, W, C): the model's x_0 estimate at each step (clipped if clip_denoised)


def _concrete(value):
  """`value` as a numpy array, or None when it is a tracer (its values unknown until the program runs)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_same_shape(name, value, reference_name, reference):
  if jnp.shape(value) != jnp.shape(reference):
    raise ValueError(f"{name} has shape {jnp.shape(value)}, expected {reference_name}'s shape {jnp.shape(reference)} "
                     "(one value per element; it is not broadcast)")


def _check_bool(name, value):
  # A string such as "False" is truthy: it would silently switch the option on.
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def _check_eta(eta):
  # DDIM's σ = η·σ_posterior: above 1 the step's sqrt(1 − ᾱ_prev − σ²) goes negative near t = 0 and gives NaN.
  if isinstance(eta, (int, float, np.number)) and not isinstance(eta, bool) and not 0 <= eta <= 1:
    raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like noise), got {eta!r}")


def _mean_flat(x):
  """Mean over every axis but the batch axis: (B, ...) -> (B,)."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


class _Tables(NamedTuple):
  """Float64 numpy coefficient tables, each (S,)."""
  alphas_cumprod: np.ndarray
  alphas_cumprod_prev: np.ndarray
  sqrt_alphas_cumprod: np.ndarray
  sqrt_one_minus_alphas_cumprod: np.ndarray
  sqrt_recip_alphas_cumprod: np.ndarray
  sqrt_recipm1_alphas_cumprod: np.ndarray
  posterior_variance: np.ndarray
  posterior_log_variance_clipped: np.ndarray
  posterior_mean_coef1: np.ndarray
  posterior_mean_coef2: np.ndarray
  log_betas: np.ndarray
  fixed_large_variance: np.ndarray


@dataclasses.dataclass(frozen=True)
class GaussianDiffusion:
  """One Gaussian diffusion process over `len(betas)` steps (build it with `create_diffusion`).

  Attributes:
    betas: (S,) betas of this process, float64 values (respaced ones when the process is respaced).
    timestep_map: (S,) original timestep of each step; the model sees these.
    mean_type, variance_type, loss_type: see the enums.
  """
  betas: tuple[float, ...]
  timestep_map: tuple[int, ...]
  mean_type: MeanType = MeanType.EPSILON
  variance_type: VarianceType = VarianceType.LEARNED_RANGE
  loss_type: LossType = LossType.MSE

  def __post_init__(self):
    betas = np.asarray(self.betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas <= 1)):
      raise ValueError(f"betas must be a non-empty 1-D sequence in (0, 1], got {self.betas!r}")
    steps = np.asarray(self.timestep_map)
    if steps.shape != betas.shape or np.any(steps < 0) or np.any(np.diff(steps) <= 0):
      raise ValueError(f"timestep_map must hold {betas.size} increasing non-negative ints (one per beta), "
                       f"got {self.timestep_map!r}")

  @property
  def num_timesteps(self) -> int:
    """Steps of this process (after respacing)."""
    return len(self.betas)

  @property
  def learns_variance(self) -> bool:
    return self.variance_type in (VarianceType.LEARNED, VarianceType.LEARNED_RANGE)

  @functools.cached_property
  def _tables(self) -> _Tables:
    betas = np.asarray(self.betas, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    if betas.size > 1:
      # β̃_0 = 0: use β̃_1 in its place so the log is finite (the first step adds no noise anyway).
      posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
      fixed_large_variance = np.append(posterior_variance[1], betas[1:])
    else:  # a one-step process only runs step 0, where no noise is added; any finite value will do.
      posterior_log_variance_clipped = np.log(betas)
      fixed_large_variance = betas
    return _Tables(
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1.0),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        log_betas=np.log(betas),
        fixed_large_variance=fixed_large_variance,
    )

  def _valid_steps(self, index, name="index", batch=None):
    """Checks step indices of this process; returns (index as an int32 array, validity mask or None).

    Raises ValueError for a non-integer dtype, for a shape other than () or (batch,), and, when the values are
    concrete, for any value outside [0, num_timesteps). For traced values the mask says which entries are in
    range (the caller turns the others into NaN, see the module docstring); it is None when all were checked.
    """
    if isinstance(index, (list, tuple)):
      index = np.asarray(index)
    dtype = jnp.result_type(index)
    if not jnp.issubdtype(dtype, jnp.integer):
      raise ValueError(f"{name} must hold integer steps of this process, got dtype {dtype}")
    shape = jnp.shape(index)
    if not (shape == () or (len(shape) == 1 and (batch is None or shape[0] == batch))):
      expected = "() or (B,)" if batch is None else f"() or ({batch},), one step per batch row"
      raise ValueError(f"{name} has shape {shape}, expected {expected}")
    values = _concrete(index)
    if values is None:
      index = jnp.asarray(index, jnp.int32)
      return index, (index >= 0) & (index < self.num_timesteps)
    bad = (values < 0) | (values >= self.num_timesteps)
    if np.any(bad):
      shown = ", ".join(str(v) for v in np.unique(values[bad])[:6])
      message = (f"{name} holds {shown}{' ...' if np.unique(values[bad]).size > 6 else ''} outside this diffusion's "
                 f"steps [0, {self.num_timesteps})")
      if self.timestep_map != tuple(range(self.num_timesteps)):
        message += (f"; it is respaced to {self.num_timesteps} steps, so pass its own step indices (the model "
                    f"sees timestep_map[index], original timesteps {self.timestep_map[0]}..{self.timestep_map[-1]}), "
                    "or train on create_diffusion(timestep_respacing='') with t in [0, diffusion_steps)")
      raise ValueError(message)
    return jnp.asarray(index, jnp.int32), None

  def _coef(self, name, index, like):
    """Table `name` at `index` ((), or (B,)) as float32, shaped to broadcast against `like` (B, H, W, C).

    A traced out-of-range index gathers NaN (see the module docstring), a concrete one raises.
    """
    index, valid = self._valid_steps(index, batch=jnp.shape(like)[0] if jnp.ndim(like) else None)
    table = jnp.asarray(getattr(self._tables, name), jnp.float32)
    if valid is None:
      value = table[index]
    else:
      value = jnp.where(valid, table[jnp.where(valid, index, 0)], jnp.nan)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))

  def model_timesteps(self, index):
    """Original timesteps (int32) of this process's steps `index` (() or (B,)); a traced out-of-range entry is -1."""
    index, valid = self._valid_steps(index)
    timesteps = jnp.asarray(self.timestep_map, jnp.int32)
    if valid is None:
      return timesteps[index]
    return jnp.where(valid, timesteps[jnp.where(valid, index, 0)], -1)

  # Forward process.

  def q_sample(self, x_start, index, noise):
    """x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) with the given noise. x_start, noise: (B, H, W, C); index: (B,)."""
    _check_same_shape("noise", noise, "x_start", x_start)
    return (self._coef("sqrt_alphas_cumprod", index, x_start) * x_start
            + self._coef("sqrt_one_minus_alphas_cumprod", index, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, index):
    """Mean, variance and clipped log-variance of q(x_{t−1} | x_t, x_0); mean (B, H, W, C), the others broadcastable."""
    mean = (self._coef("posterior_mean_coef1", index, x_t) * x_start
            + self._coef("posterior_mean_coef2", index, x_t) * x_t)
    return (mean, self._coef("posterior_variance", index, x_t),
            self._coef("posterior_log_variance_clipped", index, x_t))

  # Reverse process.

  def _split_model_output(self, model_output, x):
    """(B, H, W, C_out) -> prediction (B, H, W, C) and variance values (B, H, W, C) or None, in x's dtype."""
    channels = x.shape[-1]
    expected = 2 * channels if self.learns_variance else channels
    if model_output.shape != x.shape[:-1] + (expected,):
      raise ValueError(
          f"model output has shape {model_output.shape}, expected {x.shape[:-1] + (expected,)} for x of shape "
          f"{x.shape} with variance_type {self.variance_type.value} (learned variances need 2×C channels: "
          "[prediction, variance values])")
    model_output = model_output.astype(x.dtype)
    if self.learns_variance:
      return model_output[..., :channels], model_output[..., channels:]
    return model_output, None

  def predict_xstart_from_eps(self, x_t, index, eps):
    return (self._coef("sqrt_recip_alphas_cumprod", index, x_t) * x_t
            - self._coef("sqrt_recipm1_alphas_cumprod", index, x_t) * eps)

  def predict_eps_from_xstart(self, x_t, index, pred_xstart):
    return ((self._coef("sqrt_recip_alphas_cumprod", index, x_t) * x_t - pred_xstart)
            / self._coef("sqrt_recipm1_alphas_cumprod", index, x_t))

  def p_mean_variance(self, model_output, x, index, clip_denoised=False):
    """Parameters of p(x_{t−1} | x_t) from the model's output at x_t.

    Args:
      model_output: (B, H, W, C_out) model_fn(x, model_timesteps(index)).
      x: (B, H, W, C) x_t.
      index: () or (B,) step of this process.
      clip_denoised: clamp the x_0 estimate to [-1, 1] before forming the mean.

    Returns: dict with mean, variance, log_variance (broadcastable to x) and pred_xstart (B, H, W, C).
    """
    prediction, var_values = self._split_model_output(model_output, x)
    if self.variance_type == VarianceType.LEARNED:
      log_variance = var_values
    elif self.variance_type == VarianceType.LEARNED_RANGE:
      min_log = self._coef("posterior_log_variance_clipped", index, x)
      max_log = self._coef("log_betas", index, x)
      frac = (var_values + 1) / 2  # v in [-1, 1] -> [0, 1]
      log_variance = frac * max_log + (1 - frac) * min_log
    elif self.variance_type == VarianceType.FIXED_LARGE:
      log_variance = jnp.log(self._coef("fixed_large_variance", index, x))
    else:
      log_variance = self._coef("posterior_log_variance_clipped", index, x)
    variance = jnp.exp(log_variance)

    if self.mean_type == MeanType.START_X:
      pred_xstart = prediction
    else:
      pred_xstart = self.predict_xstart_from_eps(x, index, prediction)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1, 1)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, index)
    return dict(mean=mean, variance=variance, log_variance=log_variance, pred_xstart=pred_xstart)

  # Training.

  def vb_terms_bpd(self, model_output, x_start, x_t, index, clip_denoised=False):
    """The variational-bound term of each sample, in bits per dimension: (B,).

    KL(q(x_{t−1} | x_t, x_0) || p(x_{t−1} | x_t)) for t > 0 and the decoder NLL −log p(x_0 | x_1) for t = 0.
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, index)
    out = self.p_mean_variance(model_output, x_t, index, clip_denoised=clip_denoised)
    kl = _mean_flat(likelihoods.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -_mean_flat(likelihoods.discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]))
    return jnp.where(index == 0, decoder_nll, kl) / np.log(2.0)

  def loss_terms(self, model_output, x_start, x_t, index, noise):
    """Per-sample training loss of a model output at x_t = q_sample(x_start, index, noise).

    Split from `training_losses` so a trainer that runs the model itself (e.g. DyDiT's two paths on one x_t)
    gets the same loss. Args are (B, H, W, C) arrays (model_output (B, H, W, C_out)) and index: (B,).

    Returns: dict of (B,) arrays: `loss`; `mse` (of the prediction, what the loss uses for MSE types; a
    diagnostic for KL types); `vb` (bits/dim; zeros when an MSE loss has no learned variance). For MSE types the
    VB term sees the prediction through stop_gradient, so it trains only the variance channels.
    """
    _check_same_shape("x_start", x_start, "x_t", x_t)
    _check_same_shape("noise", noise, "x_t", x_t)
    prediction, var_values = self._split_model_output(model_output, x_t)
    target = noise if self.mean_type == MeanType.EPSILON else x_start
    mse = _mean_flat((target - prediction) ** 2)
    if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
      vb = self.vb_terms_bpd(model_output, x_start, x_t, index)
      loss = vb * self.num_timesteps if self.loss_type == LossType.RESCALED_KL else vb
      return dict(loss=loss, mse=mse, vb=vb)
    if var_values is None:
      vb = jnp.zeros_like(mse)
    else:
      frozen = jnp.concatenate([jax.lax.stop_gradient(prediction), var_values], axis=-1)
      vb = self.vb_terms_bpd(frozen, x_start, x_t, index)
      if self.loss_type == LossType.RESCALED_MSE:
        # The VB term is summed over all steps in the true bound; this keeps its weight as at 1000 steps.
        vb = vb * (self.num_timesteps / 1000.0)
    return dict(loss=mse + vb, mse=mse, vb=vb)

  def training_losses(self, model_fn: ModelFn, x_start, t, key=None, noise=None):
    """Per-sample training losses at steps t.

    Args:
      model_fn: (x, t_original) -> (B, H, W, C_out).
      x_start: (B, H, W, C) clean data x_0.
      t: (B,) int steps of this process (the original timesteps when there is no respacing, as in training).
      key: PRNG key for the noise, used when `noise` is None.
      noise: (B, H, W, C) explicit ε.

    Returns: dict of (B,) arrays `loss`, `mse`, `vb` (see `loss_terms`).
    """
    # Checked before anything is drawn or run, with the argument's own name.
    self._valid_steps(t, name="t", batch=jnp.shape(x_start)[0])
    if noise is None:
      if key is None:
        raise ValueError("training_losses needs either `noise` or a PRNG `key` to draw it")
      noise = jax.random.normal(key, x_start.shape, x_start.dtype)
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_timesteps(t))
    return self.loss_terms(model_output, x_start, x_t, t, noise)

  # Sampling.

  def _call_model(self, model_fn, x, index):
    t = jnp.broadcast_to(self.model_timesteps(index), x.shape[:1])
    return model_fn(x, t)

  def p_sample(self, model_fn: ModelFn, x, index, noise, clip_denoised=False):
    """One ancestral (DDPM) step from x_t to x_{t−1}.

    Args:
      x: (B, H, W, C) x_t; index: () int step of this process; noise: (B, H, W, C) standard normal.

    Returns: (sample, pred_xstart), both (B, H, W, C). At index 0 the sample is the mean (no noise).
    """
    _check_same_shape("noise", noise, "x", x)
    out = self.p_mean_variance(self._call_model(model_fn, x, index), x, index, clip_denoised)
    nonzero_mask = (jnp.asarray(index) != 0).astype(jnp.float32)
    sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
    return sample, out["pred_xstart"]

  def ddim_sample(self, model_fn: ModelFn, x, index, noise=None, clip_denoised=False, eta=0.0):
    """One DDIM step (Song et al. 2021) with stochasticity eta (0: deterministic; noise may then be None).

    Returns: (sample, pred_xstart), both (B, H, W, C).
    """
    _check_eta(eta)
    if noise is None and not (isinstance(eta, (int, float)) and eta == 0):
      raise ValueError(f"ddim_sample with eta={eta!r} adds noise: pass `noise` (B, H, W, C)")
    if noise is not None:
      _check_same_shape("noise", noise, "x", x)
    out = self.p_mean_variance(self._call_model(model_fn, x, index), x, index, clip_denoised)
    # The eps implied by the (possibly clipped) x_0 estimate, so that clipping is consistent with the step.
    eps = self.predict_eps_from_xstart(x, index, out["pred_xstart"])
    alpha_bar = self._coef("alphas_cumprod", index, x)
    alpha_bar_prev = self._coef("alphas_cumprod_prev", index, x)
    sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
    sample = out["pred_xstart"] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
    if noise is not None:
      nonzero_mask = (jnp.asarray(index) != 0).astype(jnp.float32)
      sample = sample + nonzero_mask * sigma * noise
    return sample, out["pred_xstart"]

  def _sample_loop(self, step, x_T, key, step_noise, needs_noise, return_trajectory, progress=None):
    """Runs `step(x, index, noise)` for index S-1 .. 0 as one lax.scan (`progress.tick` after each step)."""
    num_steps = self.num_timesteps
    indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
    if step_noise is not None:
      if step_noise.shape != (num_steps,) + x_T.shape:
        raise ValueError(f"step_noise has shape {step_noise.shape}, expected (num_timesteps,) + x_T.shape = "
                         f"{(num_steps,) + x_T.shape}: one noise array per step, in the order the steps run")
      noise_source = step_noise.astype(x_T.dtype)
    elif key is not None:
      noise_source = jax.random.split(key, num_steps)
    elif needs_noise:
      raise ValueError("this sampler adds noise: pass a PRNG `key` or explicit `step_noise` (S, B, H, W, C)")
    else:
      noise_source = None

    def body(x, scanned):
      index, source = scanned
      if source is None:
        noise = None
      elif step_noise is not None:
        noise = source
      else:
        noise = jax.random.normal(source, x.shape, x.dtype)
      sample, pred_xstart = step(x, index, noise)
      sample = sample.astype(x.dtype)
      if progress is not None:
        progress.tick(num_steps - index, num_steps)
      return sample, (Trajectory(sample, pred_xstart.astype(x.dtype)) if return_trajectory else None)

    final, trajectory = jax.lax.scan(body, x_T, (indices, noise_source))
    return (final, trajectory) if return_trajectory else final

  def p_sample_loop(self, model_fn: ModelFn, x_T, key=None, step_noise=None, clip_denoised=False,
                    return_trajectory=False, progress=None):
    """Ancestral (DDPM) sampling over all steps of this process, as one lax.scan (jit the caller).

    Args:
      model_fn: (x, t_original) -> (B, H, W, C_out), e.g. from `guided_model_fn`.
      x_T: (B, H, W, C) starting noise.
      key: PRNG key; step k draws its noise from the k-th of `jax.random.split(key, S)`.
      step_noise: (S, B, H, W, C) explicit noise, step_noise[k] for the k-th step run (index S-1-k); takes
        precedence over `key`. The last step (index 0) adds no noise, so step_noise[-1] is unused.
      clip_denoised: clamp each x_0 estimate to [-1, 1] (DiT's sample.py leaves it off for latents).
      return_trajectory: also return a `Trajectory` of per-step samples and x_0 estimates.
      progress: a `dyngen.progress.LoopProgress`: host-side step reports from inside the loop (the loop stays
        one program and its samples are unchanged); None: silent.

    Returns: x_0 (B, H, W, C), or (x_0, Trajectory) with return_trajectory.
    """
    _check_bool("clip_denoised", clip_denoised)
    step = lambda x, index, noise: self.p_sample(model_fn, x, index, noise, clip_denoised)
    return self._sample_loop(step, x_T, key, step_noise, True, return_trajectory, progress)

  def ddim_sample_loop(self, model_fn: ModelFn, x_T, key=None, step_noise=None, clip_denoised=False, eta=0.0,
                       return_trajectory=False, progress=None):
    """DDIM sampling over all steps of this process, as one lax.scan (jit the caller).

    Same arguments as `p_sample_loop`, plus eta (a Python number, or an array if noise is given). With eta == 0
    the loop is deterministic: key and step_noise are not needed, and ignored (no noise is drawn).
    """
    _check_bool("clip_denoised", clip_denoised)
    _check_eta(eta)
    deterministic = isinstance(eta, (int, float)) and eta == 0
    if deterministic:
      key = step_noise = None
    step = lambda x, index, noise: self.ddim_sample(model_fn, x, index, noise, clip_denoised, eta)
    return self._sample_loop(step, x_T, key, step_noise, not deterministic, return_trajectory, progress)


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "", noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
  """A diffusion process configured like DiT's `create_diffusion` (same arguments and defaults).

  Args:
    timestep_respacing: "" (all steps, for training), "250", "ddim50", "10,15,20" (see
      `schedules.space_timesteps`).
    noise_schedule: "linear" or "squaredcos_cap_v2".
    use_kl: train on the VB term alone (rescaled by the number of steps) instead of MSE + VB.
    sigma_small: with a fixed variance, use the posterior variance β̃_t instead of β_t.
    predict_xstart: the model predicts x_0 instead of ε.
    learn_sigma: the model also outputs variance values in [-1, 1] (DiT's learned-range variance).
    rescale_learned_sigmas: with MSE, scale the VB term by num_timesteps / 1000.
    diffusion_steps: steps of the original process.
  """
  if not (timestep_respacing is None or isinstance(timestep_respacing, str) or (
      isinstance(timestep_respacing, Sequence) and all(
          isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in timestep_respacing))):
    raise ValueError(f"timestep_respacing must be a str such as '250', 'ddim50' or '10,15,20' ('' keeps all steps) "
                     f"or a sequence of int section counts, got {timestep_respacing!r} "
                     f"({type(timestep_respacing).__name__})")
  flags = dict(use_kl=use_kl, sigma_small=sigma_small, predict_xstart=predict_xstart, learn_sigma=learn_sigma,
               rescale_learned_sigmas=rescale_learned_sigmas)
  for name, value in flags.items():
    _check_bool(name, value)
  base_betas = schedules.named_beta_schedule(noise_schedule, diffusion_steps)
  kept = schedules.space_timesteps(diffusion_steps, timestep_respacing)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if learn_sigma:
    variance_type = VarianceType.LEARNED_RANGE
  else:
    variance_type = VarianceType.FIXED_SMALL if sigma_small else VarianceType.FIXED_LARGE
  return GaussianDiffusion(
      betas=tuple(float(b) for b in schedules.respace_betas(base_betas, kept)),
      timestep_map=tuple(kept),
      mean_type=MeanType.START_X if predict_xstart else MeanType.EPSILON,
      variance_type=variance_type,
      loss_type=loss_type,
  )
