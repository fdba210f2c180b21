r"""SD-VAE encode and decode speed, and what it costs to extract ImageNet latents and decode 50K samples.

  python -m dyngen.bench.vae --output=docs/benchmarks/vae_cpu.md

The real sd-vae-ft-ema architecture (83.7M parameters) with random weights of realistic magnitude
(`dyngen.latent.weights.seeded_state_dict`, the fixture's rule), at `--image_size` (256: DiT's ImageNet
setting, latents 32x32x4). Each call is measured with `dyngen.bench.measure` (compile time apart, median of
`--repeats` runs after a warm-up, XLA's compiled temp memory). The derived rows multiply the measured
images/s out: decoding the 50K samples of an FID evaluation, and encoding ImageNet's 1,281,167 training
images twice (as they are and flipped, as `python -m dyngen.latent.extract` does).
"""
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dyngen import latent
from dyngen.bench import measure
from dyngen.latent import weights as weights_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 256, "Image side in pixels (latents are image_size / 8).")
flags.DEFINE_integer("batch_size", 2, "Images per encode / decode call.")
flags.DEFINE_integer("repeats", 3, "Timed runs per call (after one warm-up run).")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32 or bfloat16).")
flags.DEFINE_string("precision", "", "XLA precision of convs and matmuls ('' = backend default, 'highest').")
flags.DEFINE_string("output", "", "Also write the markdown table here.")

IMAGENET_TRAIN_IMAGES = 1_281_167
FID_SAMPLES = 50_000


def hours(seconds):
  return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(argv):
  del argv
  config = latent.AutoencoderKLConfig()
  start = time.perf_counter()
  params = weights_lib.params_from_state_dict(weights_lib.seeded_state_dict(config, seed=0), config, "random weights")
  vae = latent.Autoencoder(config, params, dtype=jnp.dtype(FLAGS.dtype), precision=FLAGS.precision or None)
  print(f"random weights in {time.perf_counter() - start:.1f} s: {vae}", flush=True)
  rng = np.random.default_rng(0)
  size, batch = FLAGS.image_size, FLAGS.batch_size
  x = jnp.asarray(rng.uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  f = config.downsample_factor
  z = jnp.asarray(rng.standard_normal((batch, size // f, size // f, config.latent_channels)), jnp.float32)
  load = os.getloadavg()
  results = {}
  for name, fn, arg in (("encode", vae.encode_fn, x), ("decode", vae.decode_fn, z)):
    results[name] = measure.measure(fn, vae.params, arg, repeats=FLAGS.repeats,
                                    memory_budget_bytes=measure.default_memory_budget())
    m = results[name]
    print(f"{name}: compile {m.compile_s:.1f} s, median {m.median_s:.3f} s, {batch / m.median_s:.2f} images/s",
          flush=True)
  load_end = os.getloadavg()

  header = ["call", "batch", "compile s", "median s", "min s", "images / s", "GFLOP / image (XLA)",
            "compiled temp GiB"]
  rows = []
  for name, m in results.items():
    if not m.fits:
      rows.append([name, batch, f"{m.compile_s:.1f}", "does not fit", "", "", "", f"{measure.gib(m.temp_bytes):.2f}"])
      continue
    rows.append([name, batch, f"{m.compile_s:.1f}", f"{m.median_s:.3f}", f"{min(m.times_s):.3f}",
                 f"{batch / m.median_s:.2f}", f"{m.flops / batch / 1e9:.0f}" if m.flops else "",
                 f"{measure.gib(m.temp_bytes):.2f}"])
  derived = []
  if results["decode"].fits:
    per_image = results["decode"].median_s / batch
    derived.append([f"decode {FID_SAMPLES:,} samples (one FID evaluation)", hours(FID_SAMPLES * per_image)])
  if results["encode"].fits:
    per_image = results["encode"].median_s / batch
    derived.append([f"encode ImageNet train twice ({IMAGENET_TRAIN_IMAGES:,} images + flips)",
                    hours(2 * IMAGENET_TRAIN_IMAGES * per_image)])
  device = jax.devices()[0]
  title = (f"SD-VAE (sd-vae-ft-ema architecture, random weights), {size}x{size} images -> "
           f"{size // f}x{size // f}x{config.latent_channels} latents, {FLAGS.dtype} compute, precision "
           f"{FLAGS.precision or 'default'}, on {jax.default_backend()} ({device.device_kind}, "
           f"{jax.local_device_count()} device(s), {os.cpu_count()} CPU cores), jax {jax.__version__}; median and "
           f"minimum of {FLAGS.repeats} runs after one warm-up. Load average (1/5/15 min) "
           f"{'/'.join(f'{v:.1f}' for v in load)} at the start, {'/'.join(f'{v:.1f}' for v in load_end)} at the end.")
  text = (f"{title}\n\n{measure.markdown_table(header, rows)}\n\nOn one device of this kind, at the median "
          f"speed:\n\n{measure.markdown_table(['work', 'time'], derived)}")
  measure.write_report(text, FLAGS.output)


if __name__ == "__main__":
  app.run(main)
