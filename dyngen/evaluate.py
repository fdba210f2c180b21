r"""ADM's sample-quality evaluation (FID, sFID, Inception Score, precision, recall) in JAX.

  python -m dyngen.evaluate --samples=samples.npz --reference=VIRTUAL_imagenet256_labeled.npz \
      --inception=pt_inception-2015-12-05-6726825d.pth --output=metrics.json
  python -m dyngen.evaluate --make_reference=reference.npz --images=DIR_OR_NPZ --inception=PATH \
      [--image_size=256] [--num_images=10000]

The first form is guided-diffusion's `evaluations/evaluator.py REF SAMPLES` (see
dyngen/evaluation/adm_metrics.py for the definitions): `--samples` is an npz whose `arr_0` holds uint8 NHWC
images (what `python -m dyngen.main --mode=sample` writes), `--reference` an npz in ADM's layout: `arr_0`
uint8 images (needed for precision / recall) and optionally their statistics `mu`, `sigma` (pool_3) and
`mu_s`, `sigma_s` (spatial), which are then used as stored. `--inception` is pytorch-fid's port of the
TF graph's weights. Images are read batch by batch from the npz (a 50K x 256 x 256 x 3 batch is 9.8 GB).

The second form writes such a reference batch from a folder of images (searched recursively; class
subfolders also give `arr_1` labels) or an npz `arr_0`, ADM centre-cropped to --image_size.

Progress lines give images/s and the ETA. A missing file, an npz without the expected arrays or a wrong
weight file prints one `error: ...` line and exits with status 2.
"""
import json
import os
import time
import zipfile

from absl import flags
import numpy as np

from dyngen import cli_errors
from dyngen import host_memory
from dyngen import progress as progress_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("samples", None, "npz of samples: arr_0 uint8 (N, H, W, 3).")
flags.DEFINE_string("reference", None, "Reference batch npz in ADM's layout (arr_0 images; mu, sigma, mu_s, sigma_s).")
flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-*.pth.")
flags.DEFINE_string("output", None, "Also write the metrics as JSON here.")
flags.DEFINE_string("make_reference", None, "Write a reference batch npz here (from --images) instead of evaluating.")
flags.DEFINE_string("images", None, "With --make_reference: a folder of images or an npz with arr_0.")
flags.DEFINE_integer("image_size", 256, "With --make_reference from a folder: ADM centre crop to this size.")
flags.DEFINE_integer("num_images", 0, "With --make_reference: keep a random subset of this many (0: all).")
flags.DEFINE_integer("seed", 0, "Seed of the --num_images subset.")
flags.DEFINE_integer("batch_size", 64, "Images per Inception call (ADM: 64).")
flags.DEFINE_enum("distance_dtype", "float16", ["float16", "float32"],
                  "Precision / recall distances: float16 with float32 fallback (ADM) or float32.")
flags.DEFINE_float("progress_every_s", 10.0, "Seconds between progress lines.")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
STATISTICS = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
ADM_NUM_SAMPLES = 50000


class NpzImages:
  """`arr_0` of an npz, read in order batch by batch (no full load): shape, dtype, len and [start:stop]."""

  def __init__(self, path, key="arr_0"):
    self.path, self.key = os.fspath(path), key
    if not os.path.isfile(self.path):
      raise cli_errors.UserError(f"{self.path}: no such file (expected an npz with {key} images)")
    try:
      self._zip = zipfile.ZipFile(self.path)
    except zipfile.BadZipFile:
      raise cli_errors.UserError(f"{self.path} is not an npz file (a zip of .npy arrays)") from None
    names = [name[:-4] for name in self._zip.namelist() if name.endswith(".npy")]
    if f"{key}.npy" not in self._zip.namelist():
      raise cli_errors.UserError(f"{self.path} has no array '{key}' (it holds {sorted(names)}); ADM's format "
                                 f"keeps the images in '{key}'")
    self._file = self._zip.open(f"{key}.npy")
    version = np.lib.format.read_magic(self._file)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in read_header:
      raise cli_errors.UserError(f"{self.path}: '{key}' is stored in .npy format {version}; write it with "
                                 "numpy.savez (format 1.0 or 2.0)")
    shape, fortran, dtype = read_header[version](self._file)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    if len(self.shape) != 4 or self.shape[-1] != 3 or self.dtype != np.uint8 or fortran:
      raise cli_errors.UserError(f"{self.path}: '{key}' must be uint8 images (N, H, W, 3) in C order, got "
                                 f"{self.dtype} {self.shape}{' (Fortran order)' if fortran else ''}")
    self._offset = self._file.tell()
    self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index):
    if not isinstance(index, slice) or index.step not in (None, 1):
      raise TypeError("NpzImages supports contiguous slices only")
    start, stop, _ = index.indices(len(self))
    count = max(stop - start, 0)
    self._file.seek(self._offset + start * self._row_bytes)  # forward seeks of a stored member are cheap
    data = self._file.read(count * self._row_bytes)
    if len(data) != count * self._row_bytes:
      raise cli_errors.UserError(f"{self.path}: '{self.key}' is truncated at image "
                                 f"{start + len(data) // self._row_bytes}")
    return np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])

  def close(self):
    self._file.close()
    self._zip.close()


def load_reference_statistics(path):
  """The stored statistics of a reference npz ({} when it has none); shapes checked."""
  with np.load(path) as arrays:
    present = [name for name in STATISTICS if name in arrays.files]
    if not present:
      return {}
    if len(present) != len(STATISTICS):
      raise cli_errors.UserError(f"{path} has {present} but not {sorted(set(STATISTICS) - set(present))}; a "
                                 "reference batch stores all of mu, sigma, mu_s and sigma_s or none")
    statistics = {name: np.asarray(arrays[name], np.float64) for name in STATISTICS}
  for name, shape in STATISTICS.items():
    if statistics[name].shape != shape:
      raise cli_errors.UserError(f"{path}: '{name}' has shape {statistics[name].shape}, expected {shape} "
                                 "(Inception pool_3 / spatial statistics)")
  return statistics


def _has_images(path):
  with zipfile.ZipFile(path) as archive:
    return "arr_0.npy" in archive.namelist()


def compute_features(net, images, label):
  from dyngen.evaluation import inception  # pylint: disable=g-import-not-at-top
  progress = inception.ProgressPrinter(label, every_s=FLAGS.progress_every_s)
  return net.features(images, preprocessing="adm", batch_size=FLAGS.batch_size, progress=progress)


def metrics_table(metrics):
  rows = [("FID", "fid"), ("sFID", "sfid"), ("Inception Score", "inception_score"), ("Precision", "precision"),
          ("Recall", "recall")]
  lines = ["| metric | value |", "|---|---|"]
  for title, key in rows:
    value = metrics[key]
    lines.append(f"| {title} | {'n/a (reference has no images)' if value is None else f'{value:.4f}'} |")
  return "\n".join(lines)


def evaluate(samples_path, reference_path, inception_path):
  """FID, sFID, IS, precision and recall of `samples_path` against `reference_path` (see module docstring)."""
  for what, path in (("samples", samples_path), ("reference", reference_path)):
    if not os.path.isfile(path):
      raise cli_errors.UserError(f"--{what}={path}: no such file")
    if not zipfile.is_zipfile(path):
      raise cli_errors.UserError(f"--{what}={path} is not an npz file (a zip of .npy arrays)")
  samples = NpzImages(samples_path)
  statistics = load_reference_statistics(reference_path)
  reference_images = NpzImages(reference_path) if (_has_images(reference_path) or not statistics) else None
  if len(samples) < 2:
    raise cli_errors.UserError(f"{samples_path}: {len(samples)} image(s); FID needs at least 2")
  # JAX and the network only now: the checks above answer within a second.
  from dyngen.evaluation import adm_metrics, inception_weights  # pylint: disable=g-import-not-at-top
  net = inception_weights.load_inception(inception_path)
  if len(samples) < ADM_NUM_SAMPLES:
    print(f"note: {len(samples)} samples; ADM's protocol uses {ADM_NUM_SAMPLES} (FID is biased upwards for "
          "fewer, so compare runs of equal N only)", flush=True)
  reference = dict(statistics)
  if reference_images is not None:
    features = compute_features(net, reference_images, "reference")
    reference["pool_3"] = features["pool_3"]
    if not statistics:
      reference["spatial"] = features["spatial"]
  sample_features = compute_features(net, samples, "samples")
  start = time.perf_counter()
  metrics = adm_metrics.compute_metrics(sample_features, reference, distance_dtype=FLAGS.distance_dtype)
  print(f"metrics computed in {time.perf_counter() - start:.1f} s", flush=True)
  metrics.update(samples=samples_path, reference=reference_path, inception=inception_path,
                 reference_statistics="stored" if statistics else "computed from arr_0")
  return metrics


def _folder_images(folder, image_size):
  """All images under `folder` (sorted paths), ADM centre-cropped; labels by class subfolder when present."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dyngen.data import transforms  # pylint: disable=g-import-not-at-top
  paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise cli_errors.UserError(f"--images={folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
  if FLAGS.num_images and FLAGS.num_images < len(paths):
    keep = np.sort(np.random.default_rng(FLAGS.seed).choice(len(paths), FLAGS.num_images, replace=False))
    paths = [paths[i] for i in keep]
  classes = sorted({os.path.relpath(os.path.dirname(p), folder) for p in paths})
  labels = None if classes == ["."] else np.array([classes.index(os.path.relpath(os.path.dirname(p), folder))
                                                   for p in paths], np.int64)
  images = np.empty((len(paths), image_size, image_size, 3), np.uint8)
  meter = progress_lib.Meter(f"Reading {folder}", total=len(paths), unit="images",
                             min_seconds=FLAGS.progress_every_s)
  for i, path in enumerate(paths):
    with Image.open(path) as image:
      images[i] = transforms.center_crop_adm(image.convert("RGB"), image_size)
    meter.update(i + 1)
  return images, labels


def make_reference(output, images_path, inception_path):
  """Writes ADM's reference layout: arr_0 images, mu / sigma (pool_3), mu_s / sigma_s (spatial), arr_1 labels."""
  from dyngen.evaluation import frechet, inception_weights  # pylint: disable=g-import-not-at-top
  if os.path.isdir(images_path):
    images, labels = _folder_images(images_path, FLAGS.image_size)
  elif os.path.isfile(images_path):
    reader = NpzImages(images_path)
    images, labels = reader[0:len(reader)], None
    reader.close()
    if FLAGS.num_images and FLAGS.num_images < len(images):
      images = images[np.sort(np.random.default_rng(FLAGS.seed).choice(len(images), FLAGS.num_images, False))]
  else:
    raise cli_errors.UserError(f"--images={images_path}: no such folder or npz file")
  if len(images) < 2:
    raise cli_errors.UserError(f"--images={images_path}: {len(images)} image(s); statistics need at least 2")
  net = inception_weights.load_inception(inception_path)
  features = compute_features(net, images, "reference")
  mu, sigma = frechet.feature_statistics(features["pool_3"])
  mu_s, sigma_s = frechet.feature_statistics(features["spatial"])
  arrays = dict(arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  if labels is not None:
    arrays["arr_1"] = labels
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.savez(output, **arrays)  # uncompressed, so that the evaluation streams arr_0
  print(f"wrote {output}: {len(images)} images {images.shape[1:]}, mu/sigma, mu_s/sigma_s"
        + (", arr_1 labels" if labels is not None else ""), flush=True)


def main(argv):
  if len(argv) > 1:
    raise cli_errors.UserError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.inception:
    raise cli_errors.UserError("--inception is required: pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
  if FLAGS.make_reference:
    if not FLAGS.images:
      raise cli_errors.UserError("--make_reference needs --images (a folder of images or an npz with arr_0)")
    make_reference(FLAGS.make_reference, FLAGS.images, FLAGS.inception)
    return
  if not FLAGS.samples or not FLAGS.reference:
    raise cli_errors.UserError("--samples and --reference are required (or --make_reference with --images)")
  metrics = evaluate(FLAGS.samples, FLAGS.reference, FLAGS.inception)
  print(metrics_table(metrics), flush=True)
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
      json.dump(metrics, f, indent=1)
    print(f"wrote {FLAGS.output}", flush=True)


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  cli_errors.run(main)
