"""The quickstart's quality figures: how well a digits classifier recognises class-conditional samples,
and the Fréchet distance of the samples to the real test images in that classifier's feature space."""
import numpy as np

from dyngen.data import digits as digits_lib
from dyngen.data import pipeline
from dyngen.evaluation import digits_classifier as classifier_lib
from dyngen.evaluation import frechet


def digits_sample_quality(samples, labels, data_config, *, classifier=None, seed: int = 0) -> dict:
  """Judges class-conditional digit samples against the real "test" split.

  The Fréchet distance depends on the number of samples (its estimate is biased upwards for small N);
  compare runs with equal N, e.g. 30 samples per class = 300 like the test split.

  Args:
    samples: (N, S, S, 1), uint8 0..255 or float in [-1, 1] (clipped, rounded to 256 levels), where
      S = data_config.image_size. N >= 2.
    labels: (N,) int, the class each sample was conditioned on, in [0, 10).
    data_config: `config.data` with name "digits".
    classifier: a `DigitsClassifier` for this image size; default: the cached one of `seed`.
    seed: seed of the default classifier and of the train subset of `reference_frechet`.

  Returns:
    {"classifier_accuracy_on_samples": fraction of samples classified as their label,
     "frechet_distance": samples vs test split, in classifier features,
     "classifier_test_accuracy": the classifier's accuracy on the real test split,
     "reference_frechet": min(N, 1497) real train images vs the test split, the floor real data reaches,
     "num_samples": N}
  """
  classifier = classifier or classifier_lib.load_or_train_digits_classifier(data_config, seed)
  labels = np.asarray(labels)
  num_samples = np.shape(samples)[0]
  if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be ints of shape ({num_samples},) (one per sample), got "
                     f"{labels.dtype} {labels.shape}.")
  if labels.size and (labels.min() < 0 or labels.max() >= digits_lib.DIGITS_NUM_CLASSES):
    raise ValueError(f"labels must be digits in [0, {digits_lib.DIGITS_NUM_CLASSES}), got "
                     f"[{labels.min()}, {labels.max()}] (the null class is not a digit).")
  sample_features, sample_logits = classifier._run(samples)  # pylint: disable=protected-access
  test_images, _ = pipeline.load_split_arrays(data_config, "test")
  train_images, _ = pipeline.load_split_arrays(data_config, "train")
  # The floor is measured with as many real images as there are samples (the Fréchet estimate grows
  # as N shrinks), a fixed random subset of the train split.
  subset = np.random.default_rng(seed).choice(len(train_images), min(num_samples, len(train_images)),
                                              replace=False)
  test_statistics = frechet.feature_statistics(classifier.features(test_images))
  train_statistics = frechet.feature_statistics(classifier.features(train_images[subset]))
  return {
      "classifier_accuracy_on_samples": float(np.mean(sample_logits.argmax(axis=-1) == labels)),
      "frechet_distance": frechet.frechet_distance(*frechet.feature_statistics(sample_features),
                                                   *test_statistics),
      "classifier_test_accuracy": classifier.test_accuracy,
      "reference_frechet": frechet.frechet_distance(*test_statistics, *train_statistics),
      "num_samples": int(num_samples),
  }
