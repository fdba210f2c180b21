"""The embedded quickstart dataset: scikit-learn's handwritten digits as a tfds builder (array_record).

scikit-learn ships the 1797 labelled 8x8 digits (UCI "optdigits" test set) inside its package, so this
dataset needs no download: it is written to `data_dir/dyngen_digits/1.0.0/` the first time it is used.

Split (fixed, stratified): for every class, the class's examples are permuted with
`numpy.random.default_rng(DIGITS_SPLIT_SEED)` (one generator, classes 0..9 in order) and the first
`DIGITS_TEST_PER_CLASS` = 30 go to "test" (300 images), the rest to "train" (1497 images). Within a split
the examples keep scikit-learn's order. Pixels are scikit-learn's 0..16 ink levels scaled to 0..255
(`round(v * 255 / 16)`), stored as 8x8x1 PNG.
"""
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_PER_CLASS = 30
DIGITS_NUM_CLASSES = 10
DIGITS_NUM_EXAMPLES = {"train": 1497, "test": 300}


def digits_split_indices() -> dict[str, np.ndarray]:
  """Indices into `sklearn.datasets.load_digits()` of each split, ascending: {"train": (1497,), "test": (300,)}."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  targets = load_digits().target
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  test = []
  for label in range(DIGITS_NUM_CLASSES):
    members = np.flatnonzero(targets == label)
    test.append(rng.permutation(members)[:DIGITS_TEST_PER_CLASS])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(targets)), test)
  return {"train": train, "test": test}


class DyngenDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, 10 classes, splits train (1497) / test (300)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 1497/300 split of sklearn.datasets.load_digits, seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(DIGITS_NUM_CLASSES)]),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # Stored in generation order, so a split's index i is a known example.
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships inside scikit-learn.
    return {split: self._generate_examples(indices) for split, indices in digits_split_indices().items()}

  def _generate_examples(self, indices):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    for index in indices:
      ink = digits.images[index]  # (8, 8) float, 0..16
      pixels = np.round(ink * (255.0 / 16.0)).astype(np.uint8)
      # Encoded here with PIL: handing tfds the array would make it import tensorflow (seconds) to encode.
      png = io.BytesIO()
      Image.fromarray(pixels, mode="L").save(png, format="PNG")
      yield int(index), {"image": png.getvalue(), "label": int(digits.target[index])}
