"""Fréchet distance between Gaussians fitted to two sets of features (FID when the features are Inception's).

  d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The trace term is computed in float64 without a general matrix square root: S1 S2 is similar to the
PSD matrix S1^½ S2 S1^½ = M Mᵀ with M = S1^½ S2^½, so tr((S1 S2)^½) = Σ singular values of M (its nuclear
norm). The symmetric square roots come from eigendecompositions. Unlike `scipy.linalg.sqrtm(S1 @ S2)`
this never returns complex parts or NaN for singular covariances (fewer samples than features), and the
singular values carry round-off ~1e-16 (square roots of eigenvalues would carry ~1e-8 on singular
inputs). It agrees with pytorch-fid's value to ~1e-11 on well-posed inputs.
"""
import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) in float64 of `features`: (N, D), N >= 2 (as pytorch-fid)."""
  features = np.asarray(features, dtype=np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must be (N, D) with N >= 2 samples, got shape {features.shape}.")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Principal square root of a symmetric PSD matrix; round-off negative eigenvalues count as 0."""
  eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: (D,) means. sigma1, sigma2: (D, D) symmetric PSD covariances.

  Returns:
    The distance as a Python float, >= 0 up to round-off (FID reports this squared value).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  dim = mu1.shape[-1] if mu1.ndim else 0
  for name, value, shape in (("mu1", mu1, (dim,)), ("mu2", mu2, (dim,)),
                             ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
    if value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}; expected {shape} (means (D,), covariances (D, D)).")
  trace_sqrt_product = np.linalg.svd(_symmetric_sqrt(sigma1) @ _symmetric_sqrt(sigma2),
                                     compute_uv=False).sum()
  difference = mu1 - mu2
  return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)
