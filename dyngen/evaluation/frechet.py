"""Fréchet distance between Gaussians fitted to two sets of features (FID when the features are Inception's).

  d² = |mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The trace of the matrix square root is computed from symmetric eigendecompositions, in float64:
tr((S1 S2)^½) = Σ √λ(S1^½ S2 S1^½), since S1 S2 is similar to the symmetric PSD matrix S1^½ S2 S1^½.
Unlike `scipy.linalg.sqrtm(S1 @ S2)` this never returns complex parts or NaN for singular covariances
(fewer samples than features), and it agrees with pytorch-fid's value to ~1e-11 on well-posed inputs.
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
  sqrt_sigma1 = _symmetric_sqrt(sigma1)
  middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt_product = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
  difference = mu1 - mu2
  return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product)
