r"""FID InceptionV3 speed and the derived cost of ADM's 50K-sample evaluation.

  python -m dyngen.bench.inception --output=docs/benchmarks/inception_cpu.md

Measures, with `dyngen.bench.measure` (compile time apart, median of `--repeats` runs after a warm-up):
  inception    one jitted `InceptionV3.apply` of `--image_size` uint8 images through the "adm" preprocessing
               (TF1 resize to 299, (x - 128) / 128) at each `--batch_sizes`; random weights of the real
               architecture (He-scaled normals, BatchNorm statistics near 1), no file needed;
  distances    one `--distance_block` x `--distance_block` block of precision / recall's float16 squared
               distances of 2048-d features with the k-nearest merge (ADM's blocks are 10000 x 10000);
  Fréchet      the float64 Fréchet distances of FID (2048-d) and sFID (2023-d) on full-rank covariances.
The 50K evaluation is then: Inception over 50000 samples + 10000 reference images (VIRTUAL_imagenet256's),
the 10K^2 + 50K^2 + 10K x 50K distance pairs of the radii and the cross test, and the two Fréchet distances.
"""
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dyngen import host_memory
from dyngen.bench import measure
from dyngen.evaluation import adm_metrics
from dyngen.evaluation import frechet
from dyngen.evaluation import inception

FLAGS = flags.FLAGS
flags.DEFINE_list("batch_sizes", ["8", "32"], "Images per Inception call.")
flags.DEFINE_integer("image_size", 256, "Side of the uint8 input images (ImageNet 256 samples).")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (after one warm-up run).")
flags.DEFINE_integer("distance_block", 2000, "Rows = columns of the timed distance block.")
flags.DEFINE_enum("precision", "highest", ["highest", "default"],
                  "Conv / matmul precision of the float32 network (default: TF32 / bf16 passes on accelerators).")
flags.DEFINE_integer("num_samples", 50000, "Samples of the derived evaluation (ADM: 50000).")
flags.DEFINE_integer("num_reference", 10000, "Reference images of the derived evaluation (ADM: 10000).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")


def random_variables(seed=0):
  """FIDInceptionV3 variables of the real shapes drawn on the host (as the fixture's rule, no init compile)."""
  shapes = inception.variable_shapes(inception.FIDInceptionV3())
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return rng.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    return {"scale": lambda: rng.uniform(0.8, 1.2, leaf.shape), "bias": lambda: rng.normal(0, 0.02, leaf.shape),
            "mean": lambda: rng.normal(0, 0.1, leaf.shape), "var": lambda: rng.uniform(0.5, 1.5, leaf.shape)}[name]()

  return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(draw(p, leaf), jnp.float32), shapes)


def time_once(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_benchmark():
  load_before = os.getloadavg()
  precision = None if FLAGS.precision == "default" else FLAGS.precision
  module = inception.FIDInceptionV3(precision=precision)
  variables = random_variables()

  def apply(variables, images):
    return module.apply(variables, inception.preprocess(images, "adm"))

  rows, images_per_s = [], {}
  for batch in map(int, FLAGS.batch_sizes):
    shape = (batch, FLAGS.image_size, FLAGS.image_size, 3)
    images = jnp.asarray(np.random.default_rng(batch).integers(0, 256, shape, dtype=np.uint8))
    result = measure.measure(apply, variables, images, repeats=FLAGS.repeats)
    images_per_s[batch] = batch / result.median_s
    rows.append([f"inception, adm preprocessing, {FLAGS.image_size}x{FLAGS.image_size} uint8", batch,
                 f"{result.compile_s:.1f}", f"{result.median_s:.3f}", f"{min(result.times_s):.3f}",
                 f"{result.median_s / batch * 1e3:.1f}", f"{images_per_s[batch]:.1f}",
                 f"{(result.flops or 0) / batch / 1e9:.2f}", f"{measure.gib(result.temp_bytes):.2f}"])
    print(rows[-1], flush=True)

  block = FLAGS.distance_block
  features = jnp.asarray(np.abs(np.random.default_rng(1).normal(0.4, 0.6, (block, 2048))), jnp.float32)
  smallest = jnp.full((block, adm_metrics.NEIGHBOURHOOD + 1), jnp.inf, jnp.float32)

  def merge(u, v, smallest):
    return adm_metrics.merge_smallest_distances(u, v, smallest, adm_metrics.NEIGHBOURHOOD, "float16")

  result = measure.measure(merge, features, features, smallest, repeats=FLAGS.repeats)
  seconds_per_pair = result.median_s / block ** 2
  rows.append([f"precision/recall distances, float16, 2048-d, {block}x{block} block", block,
               f"{result.compile_s:.1f}", f"{result.median_s:.3f}", f"{min(result.times_s):.3f}", "", "", "",
               f"{measure.gib(result.temp_bytes):.2f}"])
  print(rows[-1], flush=True)

  rng = np.random.default_rng(2)
  fid_inputs = []
  for dim in (2048, 2023):  # full-rank covariances of 3 * dim Gaussian features, as 50K samples give
    a, b = (np.cov(rng.normal(size=(3 * dim, dim)) @ (np.eye(dim) + 0.02 * rng.normal(size=(dim, dim))),
                   rowvar=False) for _ in range(2))
    fid_inputs.append((np.zeros(dim), a, np.full(dim, 0.1), b))
  frechet_s = [time_once(lambda args=args: frechet.frechet_distance(*args)) for args in fid_inputs]
  rows.append(["Fréchet distance, float64, FID 2048-d + sFID 2023-d", "", "", f"{sum(frechet_s):.2f}", "", "", "",
               "", ""])
  print(rows[-1], flush=True)

  best_batch = max(images_per_s, key=images_per_s.get)
  num_images = FLAGS.num_samples + FLAGS.num_reference
  inception_s = num_images / images_per_s[best_batch]
  pairs = FLAGS.num_reference ** 2 + FLAGS.num_samples ** 2 + FLAGS.num_reference * FLAGS.num_samples
  distance_s = pairs * seconds_per_pair
  total_s = inception_s + distance_s + sum(frechet_s)

  device = jax.devices()[0]
  header = ["what", "batch", "compile s", "median s", "min s", "ms / image", "images / s", "GFLOP / image",
            "compiled temp GiB"]
  load = "/".join(f"{x:.1f}" for x in load_before), "/".join(f"{x:.1f}" for x in os.getloadavg())
  derived = (f"Derived cost of ADM's evaluation of {FLAGS.num_samples} samples against {FLAGS.num_reference} "
             f"reference images: Inception over {num_images} images at {images_per_s[best_batch]:.1f} images/s "
             f"(batch {best_batch}) = {inception_s / 3600:.2f} h; precision / recall distances "
             f"{pairs / 1e9:.2f}e9 pairs = {distance_s / 60:.1f} min; Fréchet distances {sum(frechet_s):.0f} s; "
             f"total {total_s / 3600:.2f} h.")
  text = (f"FID InceptionV3 (random weights of the real shapes), precision {FLAGS.precision}, on {device.platform} "
          f"({device.device_kind}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores), jax "
          f"{jax.__version__}; median and minimum of {FLAGS.repeats} runs after one warm-up. Load average "
          f"(1/5/15 min) {load[0]} at the start, {load[1]} at the end.\n\n"
          + measure.markdown_table(header, rows) + "\n\n" + derived)
  measure.write_report(text, FLAGS.output)


def main(argv):
  del argv
  run_benchmark()


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
