"""Gaussian KL and the discretised Gaussian log-likelihood of 8-bit data, the two pieces of the diffusion VB term.

Elementwise and in nats; the diffusion code averages them and converts to bits.
"""
import math

import jax.numpy as jnp


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, broadcasting all four arguments."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """Standard normal CDF through the tanh approximation of GELU (the form the DDPM likelihood is defined with)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-probability of data quantised to 256 levels in [-1, 1] under N(means, exp(log_scales)²).

  Each level owns the bin x ± 1/255; the two end levels own everything beyond them, so the probabilities of the
  256 levels sum to one. Probabilities are floored at 1e-12 before the log.

  Args:
    x: (...) data on the grid -1 + 2k/255.
    means, log_scales: broadcastable to x.

  Returns: (...) log-probabilities in nats.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
