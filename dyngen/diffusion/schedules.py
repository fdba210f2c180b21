"""Noise schedules and timestep respacing, as float64 numpy constants.

Everything here runs once, when a diffusion object is built, so it is plain numpy in float64 (the precision the
official code builds its schedules in); the jax code gathers from these arrays.

Respacing follows DiT / improved-diffusion: a sampler with fewer steps keeps a subset of the original timesteps
and recomputes betas so that the kept steps have the same alphas_cumprod as in the original process.
"""
import math
from collections.abc import Sequence

import numpy as np

NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")


def linear_betas(num_steps: int) -> np.ndarray:
  """Betas of DDPM's linear schedule, stretched so any step count spans the same total noise as 1000 steps.

  Returns: (num_steps,) float64, from 1e-4 to 0.02 at 1000 steps.
  """
  scale = 1000 / num_steps
  return np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)


def squaredcos_cap_v2_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the cosine schedule (Nichol & Dhariwal 2021), each capped at `max_beta`.

  alpha_bar(s) = cos²((s + 0.008) / 1.008 · π/2) for s in [0, 1]; beta_i = 1 − alpha_bar((i+1)/T) / alpha_bar(i/T).
  The cap keeps the last betas below 1 (alpha_bar(1) = 0 would make beta exactly 1).

  Returns: (num_steps,) float64.
  """
  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
  return np.array(betas, dtype=np.float64)


def named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
  """Betas of the schedule called `name` ("linear" or "squaredcos_cap_v2"); (num_steps,) float64."""
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"diffusion_steps must be a positive int, got {num_steps!r}")
  if name == "linear":
    return linear_betas(num_steps)
  if name == "squaredcos_cap_v2":
    return squaredcos_cap_v2_betas(num_steps)
  raise ValueError(f"unknown noise_schedule {name!r}; expected one of {NOISE_SCHEDULES}")


def _parse_section_counts(num_steps: int, respacing: str | Sequence[int]) -> list[int]:
  if isinstance(respacing, str):
    try:
      counts = [int(part) for part in respacing.split(",")]
    except ValueError:
      raise ValueError(
          f"timestep_respacing {respacing!r} is not understood; expected '' (all {num_steps} steps), a step count "
          "such as '250', comma-separated section counts such as '10,15,20', or 'ddimN' such as 'ddim50'") from None
  else:
    counts = [int(c) for c in respacing]
  if not counts or any(c < 1 for c in counts):
    raise ValueError(f"timestep_respacing {respacing!r} must ask for at least one step in every section")
  return counts


def space_timesteps(num_steps: int, respacing: str | Sequence[int]) -> list[int]:
  """The original timesteps a respaced sampler keeps, in increasing order (DiT's `space_timesteps`).

  Args:
    num_steps: steps of the original process (1000 for DiT).
    respacing: one of
      - "" or None: keep every step;
      - "N" or "N1,N2,...": cut [0, num_steps) into equal sections (the first num_steps % len sections one step
        longer) and keep N_i evenly strided steps in section i, both ends included, rounded to the nearest
        integer (ties to even, as Python's round);
      - "ddimN": the DDIM paper's striding range(0, num_steps, k) for the integer k that gives exactly N steps;
      - a sequence of ints: the section counts.

  Returns: the kept original timesteps, sorted.
  """
  if respacing is None or respacing == "":
    return list(range(num_steps))
  if isinstance(respacing, str) and respacing.startswith("ddim"):
    try:
      wanted = int(respacing[len("ddim"):])
    except ValueError:
      raise ValueError(f"timestep_respacing {respacing!r}: expected 'ddim' followed by a step count, e.g. 'ddim50'")
    for stride in range(1, num_steps):
      if len(range(0, num_steps, stride)) == wanted:
        return list(range(0, num_steps, stride))
    raise ValueError(
        f"timestep_respacing {respacing!r}: no integer stride gives exactly {wanted} of {num_steps} steps; "
        f"use a plain count such as '{wanted}' instead")

  counts = _parse_section_counts(num_steps, respacing)
  section_size, longer_sections = divmod(num_steps, len(counts))
  kept = []
  section_start = 0
  for section, count in enumerate(counts):
    size = section_size + (1 if section < longer_sections else 0)
    if count > size:
      raise ValueError(
          f"timestep_respacing {respacing!r}: section {section} has {size} of the {num_steps} steps and cannot "
          f"keep {count} of them")
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    # Accumulate the fractional position the way the official code does, so ties round identically.
    position = 0.0
    for _ in range(count):
      kept.append(section_start + round(position))
      position += stride
    section_start += size
  return sorted(set(kept))


def respace_betas(betas: np.ndarray, kept_timesteps: Sequence[int]) -> np.ndarray:
  """Betas of the process that visits only `kept_timesteps`, with the original alphas_cumprod at those steps.

  Args:
    betas: (T,) float64 original betas.
    kept_timesteps: (S,) sorted original timesteps.

  Returns: (S,) float64, beta_i = 1 − ᾱ[kept_i] / ᾱ[kept_{i−1}] (ᾱ before the first step is 1).
  """
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
  new_betas = []
  previous = 1.0
  for step in kept_timesteps:
    new_betas.append(1.0 - alphas_cumprod[step] / previous)
    previous = alphas_cumprod[step]
  return np.array(new_betas, dtype=np.float64)
