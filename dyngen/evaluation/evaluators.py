"""Sample evaluators by name, for periodic evaluation during training (big_vision's `config.evals` style).

An evaluator is built once (it loads its networks and reference statistics) and then called on each new
batch of samples: `evaluator(images, labels) -> {metric name: float}`. The trainer picks them from config:

  config.evals = {"fid": {"type": "adm_fid", "every_steps": 50_000, "num_samples": 10_000,
                          "reference": "VIRTUAL_imagenet256_labeled.npz", "inception": "pt_inception-....pth"},
                  "digits": {"type": "digits", "every_steps": 1_000, "num_samples": 300}}
  evaluator = evaluators.build(cfg.type, **kwargs)   # kwargs: cfg minus type / every_steps / num_samples

Registered: "adm_fid" (ADM's FID, sFID, IS, precision, recall; dyngen/evaluation/adm_metrics.py) and
"digits" (the quickstart's classifier accuracy and Fréchet distance; dyngen/evaluation/sample_quality.py).
"""
import os
from typing import Callable, Optional

import numpy as np

from dyngen.evaluation import adm_metrics
from dyngen.evaluation import frechet
from dyngen.evaluation import inception_weights
from dyngen.evaluation import sample_quality

REGISTRY: dict[str, type] = {}
REFERENCE_STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")


def register(name: str):
  """Class decorator: makes the evaluator class available to `build(name, ...)`."""
  def add(cls):
    if name in REGISTRY:
      raise ValueError(f"evaluator {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
    REGISTRY[name] = cls
    return cls
  return add


def build(name: str, **kwargs):
  """The evaluator registered as `name`, constructed with kwargs."""
  if name not in REGISTRY:
    raise ValueError(f"unknown evaluator {name!r}; registered: {sorted(REGISTRY)}")
  return REGISTRY[name](**kwargs)


@register("adm_fid")
class ADMFidEvaluator:
  """ADM's FID, sFID, Inception Score, precision and recall of uint8 samples against a reference batch.

  Args:
    reference: path of an ADM reference npz (arr_0 images and/or mu, sigma, mu_s, sigma_s), or such a dict.
      The reference images' Inception features are computed once, here (for precision / recall and for
      statistics the file does not store).
    inception: path of pytorch-fid's pt_inception-2015-12-05-*.pth, or a loaded `InceptionV3`.
    batch_size: images per Inception call.
    precision_recall: False skips precision / recall (and the reference images' features when the
      reference stores its statistics): FID, sFID and IS only.
    distance_dtype: "float16" (ADM) or "float32" distances for precision / recall.
    progress: progress(done, total) callback of the Inception runs, e.g. inception.ProgressPrinter().
  """

  def __init__(self, reference, inception, batch_size: int = 64, precision_recall: bool = True,
               distance_dtype: str = "float16", progress: Optional[Callable[[int, int], None]] = None):
    self.batch_size, self.distance_dtype, self.progress = batch_size, distance_dtype, progress
    self.precision_recall = precision_recall
    if isinstance(reference, (str, os.PathLike)):
      if not os.path.isfile(reference):
        raise FileNotFoundError(f"reference batch {os.fspath(reference)!r} not found (an ADM npz with arr_0 "
                                "images and/or mu, sigma, mu_s, sigma_s; see python -m dyngen.evaluate)")
      with np.load(reference) as arrays:
        reference = {name: arrays[name] for name in arrays.files}
    self.reference = {name: np.asarray(reference[name], np.float64) for name in REFERENCE_STATISTICS
                      if name in reference}
    stored = len(self.reference) == len(REFERENCE_STATISTICS)
    if (precision_recall or not stored) and "arr_0" not in reference:
      raise ValueError(f"the reference has no arr_0 images (keys: {sorted(reference)}); they are needed for "
                       + ("precision / recall (or pass precision_recall=False)" if stored else
                          "its statistics, which it does not store either"))
    # The weights are loaded after the reference is checked: a wrong reference fails at once.
    self.net = inception_weights.load_inception(inception) if isinstance(inception, (str, os.PathLike)) else inception
    if precision_recall or not stored:
      features = self._features(reference["arr_0"])
      self.reference["pool_3"] = features["pool_3"]
      if not stored:
        self.reference.update(zip(REFERENCE_STATISTICS,
                                  frechet.feature_statistics(features["pool_3"])
                                  + frechet.feature_statistics(features["spatial"])))

  def _features(self, images):
    return self.net.features(images, preprocessing="adm", batch_size=self.batch_size, progress=self.progress)

  def __call__(self, images, labels=None) -> dict:
    """images: uint8 (N, H, W, 3) samples (labels unused) -> {"fid", "sfid", "inception_score", "precision",
    "recall"} (the last two absent with precision_recall=False)."""
    del labels
    reference = self.reference if self.precision_recall else {k: v for k, v in self.reference.items()
                                                              if k != "pool_3"}
    metrics = adm_metrics.compute_metrics(self._features(images), reference, distance_dtype=self.distance_dtype)
    names = ("fid", "sfid", "inception_score") + (("precision", "recall") if self.precision_recall else ())
    return {name: float(metrics[name]) for name in names}


@register("digits")
class DigitsEvaluator:
  """The quickstart's figures for class-conditional 8x8 digit samples (`digits_sample_quality`).

  Args:
    data_config: `config.data` with name "digits".
    seed: seed of the digits classifier (trained once and cached) and of the real-vs-real floor.
    classifier: a `DigitsClassifier` to use instead of the cached one.
  """

  def __init__(self, data_config, seed: int = 0, classifier=None):
    from dyngen.evaluation import digits_classifier  # pylint: disable=g-import-not-at-top
    self.data_config, self.seed = data_config, seed
    self.classifier = classifier or digits_classifier.load_or_train_digits_classifier(data_config, seed)

  def __call__(self, images, labels) -> dict:
    results = sample_quality.digits_sample_quality(images, labels, self.data_config, classifier=self.classifier,
                                                   seed=self.seed)
    return {name: float(value) for name, value in results.items()}
