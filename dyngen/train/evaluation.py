"""Sample-quality metrics the trainer reports, chosen by `config.evaluation.metric`.

  "digits"  accuracy of a digits classifier (trained on the real training split) on class-conditional
            samples, and the Frechet distance to the real test split in that classifier's feature space
            (`dyngen.evaluation.digits_sample_quality`), plus the classifier's own test accuracy and the
            test-vs-train Frechet floor for scale.
"""
import numpy as np

from dyngen import evaluation as evaluation_lib


def evaluate_samples(config, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """images: uint8 (N, H, W, C) samples conditioned on labels (N,) -> {metric name: value}."""
  metric = config.evaluation.metric
  if metric == "digits":
    results = evaluation_lib.digits_sample_quality(images, labels, config.data, seed=0)
    return {name: float(value) for name, value in results.items()}
  raise ValueError(f"config.evaluation.metric={metric!r} has no implementation; use 'digits' or ''.")
