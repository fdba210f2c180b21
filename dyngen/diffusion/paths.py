"""SiT's interpolation paths x_t = α_t·x1 + σ_t·x0 (t = 0 noise, t = 1 data) and their coefficients.

Each path gives α_t, σ_t and their time derivatives, the drift of the probability-flow / reverse SDE in SiT's
score parametrisation, the diffusion coefficient of every form, and the conversions between velocity, score
and noise predictions. Method names are the official ones (willisma/SiT `transport/path.py`) so that SiT users
find their way; the formulas are those of the SiT paper (Ma et al. 2024, Sec. 3 and App. A).

Shapes: `t` is (B,) (or any shape that broadcasts after `expand_t_like_x`), x and the predictions (B, ...).
Every coefficient is computed in the dtype of `t`; the transport chooses that dtype where the official code
keeps float32 times (grids, the SDE's last step) so that float64 runs round as upstream does.
"""
import dataclasses
import math

import jax.numpy as jnp

# SiT's compute_diffusion forms. The official dictionary spells the last one "inccreasing-decreasing"; both
# spellings are accepted.
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing",
                   "inccreasing-decreasing")


def expand_t_like_x(t, x):
  """t: (B,) -> (B, 1, ..., 1) with x's rank, so that it broadcasts against x: (B, ...)."""
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (jnp.ndim(x) - t.ndim))


@dataclasses.dataclass(frozen=True)
class LinearPath:
  """Linear interpolant (SiT's ICPlan): α_t = t, σ_t = 1 − t."""
  name = "Linear"

  def compute_alpha_t(self, t):
    """(α_t, dα_t/dt), each shaped like t."""
    return t, jnp.ones_like(t)

  def compute_sigma_t(self, t):
    """(σ_t, dσ_t/dt), each shaped like t."""
    return 1 - t, -jnp.ones_like(t)

  def compute_d_alpha_alpha_ratio_t(self, t):
    """α'_t / α_t, in the form that stays finite where both are small."""
    return 1 / t

  def compute_drift(self, x, t):
    """(drift_mean, drift_var) of the reverse SDE in score form: dx = [−drift_mean + drift_var·score] dt + ….

    drift_mean = −(α'/α)·x: (B, ...); drift_var = (α'/α)·σ² − σ·σ': t expanded to x's rank.
    """
    t = expand_t_like_x(t, x)
    ratio = self.compute_d_alpha_alpha_ratio_t(t)
    sigma_t, d_sigma_t = self.compute_sigma_t(t)
    return -(ratio * x), ratio * sigma_t ** 2 - sigma_t * d_sigma_t

  def compute_diffusion(self, x, t, form="constant", norm=1.0):
    """The diffusion coefficient w_t of the SDE sampler (its noise is sqrt(2·w_t)), t expanded to x's rank."""
    t = expand_t_like_x(t, x)
    if form == "constant":
      return jnp.full_like(t, norm)
    if form == "SBDM":
      return norm * self.compute_drift(x, t)[1]
    if form == "sigma":
      return norm * self.compute_sigma_t(t)[0]
    if form == "linear":
      return norm * (1 - t)
    if form == "decreasing":
      return 0.25 * (norm * jnp.cos(math.pi * t) + 1) ** 2
    if form in ("increasing-decreasing", "inccreasing-decreasing"):
      return norm * jnp.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion_form {form!r}; expected one of {DIFFUSION_FORMS}")

  def get_score_from_velocity(self, velocity, x, t):
    """∇log p_t(x) from a velocity prediction: ((α/α')·v − x) / (σ² − (α/α')·σ'·σ)."""
    t = expand_t_like_x(t, x)
    alpha_t, d_alpha_t = self.compute_alpha_t(t)
    sigma_t, d_sigma_t = self.compute_sigma_t(t)
    reverse_ratio = alpha_t / d_alpha_t
    return (reverse_ratio * velocity - x) / (sigma_t ** 2 - reverse_ratio * d_sigma_t * sigma_t)

  def get_noise_from_velocity(self, velocity, x, t):
    """The noise x0 implied by a velocity prediction: ((α/α')·v − x) / ((α/α')·σ' − σ)."""
    t = expand_t_like_x(t, x)
    alpha_t, d_alpha_t = self.compute_alpha_t(t)
    sigma_t, d_sigma_t = self.compute_sigma_t(t)
    reverse_ratio = alpha_t / d_alpha_t
    return (reverse_ratio * velocity - x) / (reverse_ratio * d_sigma_t - sigma_t)

  def get_velocity_from_score(self, score, x, t):
    """Velocity from a score prediction: drift_var·s − drift_mean."""
    drift_mean, drift_var = self.compute_drift(x, t)
    return drift_var * score - drift_mean

  def plan(self, t, x0, x1):
    """(x_t, u_t) = (α_t·x1 + σ_t·x0, α'_t·x1 + σ'_t·x0) for x0 (noise), x1 (data): (B, ...), t: (B,)."""
    t = expand_t_like_x(t, x1)
    alpha_t, d_alpha_t = self.compute_alpha_t(t)
    sigma_t, d_sigma_t = self.compute_sigma_t(t)
    return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


@dataclasses.dataclass(frozen=True)
class GVPPath(LinearPath):
  """Generalised variance-preserving interpolant (SiT's GVPCPlan): α_t = sin(πt/2), σ_t = cos(πt/2)."""
  name = "GVP"

  def compute_alpha_t(self, t):
    return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)

  def compute_sigma_t(self, t):
    return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)

  def compute_d_alpha_alpha_ratio_t(self, t):
    return math.pi / (2 * jnp.tan(t * math.pi / 2))


@dataclasses.dataclass(frozen=True)
class VPPath(LinearPath):
  """Variance-preserving path of score-based diffusion (SiT's VPCPlan), β linear from sigma_min to sigma_max.

  α_t = exp(m(t)), σ_t = sqrt(1 − exp(2 m(t))), m(t) = −¼(1 − t)²(β_max − β_min) − ½(1 − t)β_min.
  """
  sigma_min: float = 0.1
  sigma_max: float = 20.0
  name = "VP"

  def log_mean_coeff(self, t):
    return -0.25 * (1 - t) ** 2 * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

  def d_log_mean_coeff(self, t):
    return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

  def compute_alpha_t(self, t):
    alpha_t = jnp.exp(self.log_mean_coeff(t))
    return alpha_t, alpha_t * self.d_log_mean_coeff(t)

  def compute_sigma_t(self, t):
    two_m = 2 * self.log_mean_coeff(t)
    sigma_t = jnp.sqrt(1 - jnp.exp(two_m))
    return sigma_t, jnp.exp(two_m) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)

  def compute_d_alpha_alpha_ratio_t(self, t):
    return self.d_log_mean_coeff(t)

  def compute_drift(self, x, t):
    """β_t = β_min + (1 − t)(β_max − β_min): drift_mean = −½β_t·x, drift_var = β_t / 2."""
    t = expand_t_like_x(t, x)
    beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
    return -0.5 * beta_t * x, beta_t / 2


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}


def get_path(path_type: str) -> LinearPath:
  """The path named `path_type` ("Linear", "GVP" or "VP", SiT's names)."""
  if path_type not in PATHS:
    raise ValueError(f"unknown path_type {path_type!r}; expected one of {sorted(PATHS)}")
  return PATHS[path_type]()
