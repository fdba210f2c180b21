"""Sample-quality evaluation during training, chosen by `config.evaluation.metric`, through the evaluator
registry of dyngen.evaluation.evaluators (built once per run, called on each new batch of samples):

  "digits"   accuracy of a digits classifier (trained on the real training split) on class-conditional
             samples, and the Frechet distance to the real test split in that classifier's feature space,
             plus the classifier's own test accuracy and the test-vs-train Frechet floor for scale.
  "adm_fid"  ADM's FID, sFID, Inception Score, precision and recall against `config.evaluation.reference`
             (an ADM reference npz, e.g. VIRTUAL_imagenet256_labeled.npz) with the Inception weights at
             `config.evaluation.inception` (pytorch-fid's pt_inception-2015-12-05-*.pth).
"""
import numpy as np

from dyngen import progress
from dyngen.evaluation import evaluators

METRICS = ("", "digits", "adm_fid")


def build_evaluator(config):
  """The evaluator of `config.evaluation.metric` (None for ""); loads its networks and references once."""
  metric = config.evaluation.metric
  if not metric:
    return None
  if metric == "digits":
    return evaluators.build("digits", data_config=config.data)
  if metric == "adm_fid":
    return evaluators.build("adm_fid", reference=config.evaluation.reference, inception=config.evaluation.inception,
                            progress=inception_progress())
  raise ValueError(f"config.evaluation.metric={metric!r} has no evaluator; use one of {METRICS}.")


def inception_progress():
  """progress(done, total) for the evaluator's Inception runs (the reference once, then each evaluation's
  samples; 50K images take hours on a CPU): a line at most every 30 s with images/s and ETA, per run."""
  state = {}

  def report(done, total):
    if "meter" not in state or done <= state["done"]:  # A new run: its rate counts from its first batch's end.
      state["meter"] = progress.Meter("Inception features", total=total, unit="images", min_seconds=30.0)
      state["meter"].start(done)
    state["done"] = done
    state["meter"].update(done)

  return report


def evaluate_samples(evaluator, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """images: uint8 (N, H, W, C) samples conditioned on labels (N,) -> {metric name: value}."""
  return {name: float(value) for name, value in evaluator(images, labels).items()}
