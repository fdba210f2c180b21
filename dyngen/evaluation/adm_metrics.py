"""FID, sFID, Inception Score and precision / recall as ADM's evaluator defines them.

The definitions follow guided-diffusion's evaluations/evaluator.py (the numbers DiT, DiG and DyDiT report):
- FID: Fréchet distance of Gaussians fitted (float64 mean, unbiased covariance) to pool_3 features;
  sFID: the same on the 2023 `spatial` features (mixed_6/conv[..., :7]). The reference batch supplies its
  own mu / sigma (mu_s / sigma_s) when it has them.
- Inception Score: softmax of the 1008 logits, the samples cut into consecutive splits of 5000 (10 splits
  for 50K samples; a shorter last split counts as one), exp(mean KL(p(y|x) || p(y))) per split, the mean
  over splits.
- Precision / recall (Kynkäänniemi et al. 2019, k = 3): each set's manifold is the union of balls around
  its points with radius the squared distance to the 3rd nearest neighbour (the 4th smallest distance,
  the point itself being the first); precision = the fraction of samples inside the reference manifold,
  recall = the fraction of reference points inside the sample manifold. Squared distances are computed
  in blocks of 10000 x 10000 in float16, and a block is recomputed in float32 when any of its float16
  distances is not finite, as ADM's TF graph does.

Differences from ADM's code, all round-off only: the Fréchet distance's trace term is a nuclear norm
(dyngen/evaluation/frechet.py) instead of scipy's sqrtm, so ADM's guards around sqrtm (1e-6 added to the
diagonals when the product is singular, an error for an imaginary part > 1e-3) have nothing to guard; the
softmax and the KL terms run in float64 (ADM: float32), with 0 log 0 = 0 where a probability underflows.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dyngen.evaluation import frechet

IS_SPLIT_SIZE = 5000
NEIGHBOURHOOD = 3
DISTANCE_BATCH = 10000


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score of logits (N, C): mean over consecutive splits of `split_size` of exp(E KL(p || p̄))."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < 1:
    raise ValueError(f"logits must be (N, classes) with N >= 1, got shape {logits.shape}")
  shifted = logits - logits.max(axis=1, keepdims=True)
  probabilities = np.exp(shifted)
  probabilities /= probabilities.sum(axis=1, keepdims=True)
  scores = []
  for start in range(0, len(probabilities), split_size):
    part = probabilities[start:start + split_size]
    marginal = part.mean(axis=0, keepdims=True)
    positive = part > 0  # 0 log 0 = 0; a zero p never meets a zero marginal with p > 0
    kl = np.where(positive, part * (np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))),
                  0.0)
    scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
  return float(np.mean(scores))


def _squared_distances(u, v):
  """max(|u|² - 2 u·v + |v|², 0): (R, D), (C, D) -> (R, C) in their dtype, products accumulated in float32."""
  norm_u = jnp.sum(jnp.square(u).astype(jnp.float32), axis=1).astype(u.dtype)[:, None]
  norm_v = jnp.sum(jnp.square(v).astype(jnp.float32), axis=1).astype(v.dtype)[None, :]
  products = jnp.matmul(u, v.T, preferred_element_type=jnp.float32, precision="highest").astype(u.dtype)
  return jnp.maximum(norm_u - 2 * products + norm_v, 0)


@functools.partial(jax.jit, static_argnames="dtype")
def pairwise_squared_distances(u, v, dtype="float16"):
  """ADM's DistanceBlock: (R, D) x (C, D) -> (R, C) float32 squared distances.

  dtype "float16": computed from float16 inputs (float32 accumulation, float16 results, as TF on a GPU) and
  recomputed in float32 when any is not finite (|x|² > 65504); "float32": float32 throughout.
  """
  u, v = u.astype(jnp.float32), v.astype(jnp.float32)
  if dtype == "float32":
    return _squared_distances(u, v)
  if dtype != "float16":
    raise ValueError(f"distance dtype must be 'float16' (ADM) or 'float32', got {dtype!r}")
  low = _squared_distances(u.astype(jnp.float16), v.astype(jnp.float16))
  return jax.lax.cond(jnp.all(jnp.isfinite(low)), lambda: low.astype(jnp.float32),
                      lambda: _squared_distances(u, v))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def merge_smallest_distances(rows, cols, smallest, k, dtype):
  """Merges the k+1 smallest squared distances of `rows` to `cols` into `smallest` (R, k+1), ascending."""
  block = pairwise_squared_distances(rows, cols, dtype)
  candidates = jnp.concatenate([smallest, block], axis=1)
  return -jax.lax.top_k(-candidates, k + 1)[0]


def manifold_radii(features, k: int = NEIGHBOURHOOD, batch_size: int = DISTANCE_BATCH,
                   dtype: str = "float16") -> np.ndarray:
  """(N, D) -> (N,) float32: squared distance of each point to its k-th nearest neighbour (itself excluded).

  As ADM's ManifoldEstimator.manifold_radii with nhood_sizes=(k,): the (k+1)-th smallest distance in the
  point's row, the point itself (distance ~0) being the smallest. Rows and columns go in blocks of
  `batch_size` (ADM: 10000), which also scopes the float16 -> float32 fallback.
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] < k + 1:
    raise ValueError(f"features must be (N, D) with N > k = {k} points, got shape {features.shape}")
  radii = np.empty(features.shape[0], np.float32)
  for begin in range(0, len(features), batch_size):
    rows = features[begin:begin + batch_size]
    smallest = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
    for col_begin in range(0, len(features), batch_size):
      smallest = merge_smallest_distances(rows, features[col_begin:col_begin + batch_size], smallest, k, dtype)
    radii[begin:begin + len(rows)] = np.asarray(smallest[:, k])
  return radii


@functools.partial(jax.jit, static_argnames="dtype")
def _inside_each_other(batch_1, radii_1, batch_2, radii_2, dtype):
  """(rows of batch_1 inside some ball of batch_2, rows of batch_2 inside some ball of batch_1)."""
  distances = pairwise_squared_distances(batch_1, batch_2, dtype)
  return (jnp.any(distances <= radii_2[None, :], axis=1), jnp.any(distances <= radii_1[:, None], axis=0))


def precision_recall(reference_features, sample_features, k: int = NEIGHBOURHOOD,
                     batch_size: int = DISTANCE_BATCH, dtype: str = "float16") -> tuple[float, float]:
  """ADM's (precision, recall) of samples (N2, D) against a reference set (N1, D); see module docstring."""
  reference = np.asarray(reference_features, np.float32)
  samples = np.asarray(sample_features, np.float32)
  if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
    raise ValueError(f"reference and sample features must be (N, D) with the same D, got {reference.shape} "
                     f"and {samples.shape}")
  radii_reference = manifold_radii(reference, k, batch_size, dtype)
  radii_samples = manifold_radii(samples, k, batch_size, dtype)
  reference_inside = np.zeros(len(reference), bool)  # inside the sample manifold: recall
  samples_inside = np.zeros(len(samples), bool)  # inside the reference manifold: precision
  for begin_1 in range(0, len(reference), batch_size):
    end_1 = begin_1 + batch_size
    for begin_2 in range(0, len(samples), batch_size):
      end_2 = begin_2 + batch_size
      inside_1, inside_2 = _inside_each_other(reference[begin_1:end_1], radii_reference[begin_1:end_1],
                                              samples[begin_2:end_2], radii_samples[begin_2:end_2], dtype)
      reference_inside[begin_1:end_1] |= np.asarray(inside_1)
      samples_inside[begin_2:end_2] |= np.asarray(inside_2)
  return float(np.mean(samples_inside)), float(np.mean(reference_inside))


def reference_statistics(reference: dict) -> dict:
  """mu, sigma, mu_s, sigma_s of a reference batch: its stored ones, else fitted to its pool_3 / spatial."""
  out = {}
  for mean, covariance, features in (("mu", "sigma", "pool_3"), ("mu_s", "sigma_s", "spatial")):
    if mean in reference and covariance in reference:
      out[mean], out[covariance] = np.asarray(reference[mean], np.float64), np.asarray(reference[covariance],
                                                                                         np.float64)
    elif features in reference:
      out[mean], out[covariance] = frechet.feature_statistics(reference[features])
    else:
      raise ValueError(f"the reference has neither {mean}/{covariance} nor {features} features "
                       f"(keys: {sorted(reference)})")
  return out


def compute_metrics(samples: dict, reference: dict, *, distance_dtype: str = "float16",
                split_size: int = IS_SPLIT_SIZE) -> dict:
  """FID, sFID, IS, precision and recall of sample features against a reference batch.

  Args:
    samples: Inception outputs of the samples, {"pool_3": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}
      (`InceptionV3.features`).
    reference: {"mu", "sigma", "mu_s", "sigma_s"} (ADM's VIRTUAL_imagenet256_labeled.npz) and/or the
      reference images' "pool_3" (and "spatial") features; precision / recall need its "pool_3".

  Returns:
    {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference"}; precision
    and recall are None when the reference has no pool_3 features.
  """
  statistics = reference_statistics(reference)
  sample_mu, sample_sigma = frechet.feature_statistics(samples["pool_3"])
  sample_mu_s, sample_sigma_s = frechet.feature_statistics(samples["spatial"])
  precision = recall = None
  if "pool_3" in reference:
    precision, recall = precision_recall(reference["pool_3"], samples["pool_3"], dtype=distance_dtype)
  return {
      "fid": frechet.frechet_distance(sample_mu, sample_sigma, statistics["mu"], statistics["sigma"]),
      "sfid": frechet.frechet_distance(sample_mu_s, sample_sigma_s, statistics["mu_s"], statistics["sigma_s"]),
      "inception_score": inception_score(samples["logits"], split_size),
      "precision": precision,
      "recall": recall,
      "num_samples": int(np.shape(samples["pool_3"])[0]),
      "num_reference": int(np.shape(reference["pool_3"])[0]) if "pool_3" in reference else None,
  }
