r"""SD-VAE encode and decode speed, and what it costs to extract ImageNet latents and decode 50K samples.

  python -m dyngen.bench.vae --output=docs/benchmarks/vae_cpu.md

The real sd-vae-ft-ema architecture (83.7M parameters) with random weights of realistic magnitude
(`dyngen.latent.weights.seeded_state_dict`, the fixture's rule), at `--image_size` (256: DiT's ImageNet
setting, latents 32x32x4). Each call is measured with `dyngen.bench.measure` (compile time apart, median of
`--repeats` runs after a warm-up, XLA's compiled temp memory). The derived rows multiply the measured
time per image out: decoding the 50K samples of an FID evaluation, and encoding ImageNet's 1,281,167
training images twice (as they are and flipped, as `python -m dyngen.latent.extract` does). On CPU they
are given at the median wall time and at the process CPU time spread over the cores (one extra run each):
on a shared host the load inflates the first, much less the second.
"""
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dyngen import host_memory
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
  results, cpu_seconds = {}, {}
  for name, fn, arg in (("encode", vae.encode_fn, x), ("decode", vae.decode_fn, z)):
    results[name] = measure.measure(fn, vae.params, arg, repeats=FLAGS.repeats,
                                    memory_budget_bytes=measure.default_memory_budget())
    m = results[name]
    if m.fits:  # one more run for the process CPU time, which a shared host's load inflates much less than wall
      compiled = jax.jit(fn).lower(vae.params, arg).compile()
      cpu_start = time.process_time()
      jax.block_until_ready(compiled(vae.params, arg))
      cpu_seconds[name] = time.process_time() - cpu_start
    print(f"{name}: compile {m.compile_s:.1f} s, median {m.median_s:.3f} s, {batch / m.median_s:.2f} images/s",
          flush=True)
  load_end = os.getloadavg()

  header = ["call", "batch", "compile s", "median s", "min s", "images / s", "process CPU s", "GFLOP / image (XLA)",
            "compiled temp GiB"]
  rows = []
  for name, m in results.items():
    if not m.fits:
      rows.append([name, batch, f"{m.compile_s:.1f}", "does not fit", "", "", "", "",
                   f"{measure.gib(m.temp_bytes):.2f}"])
      continue
    rows.append([name, batch, f"{m.compile_s:.1f}", f"{m.median_s:.3f}", f"{min(m.times_s):.3f}",
                 f"{batch / m.median_s:.2f}", f"{cpu_seconds[name]:.2f}",
                 f"{m.flops / batch / 1e9:.0f}" if m.flops else "",
                 f"{measure.gib(m.temp_bytes):.2f}"])
  # Time of the work at the median wall time and, on CPU, at the process CPU time spread over all cores (what a
  # host busy with this work only would take; a shared host's load inflates wall times, not CPU seconds).
  on_cpu = jax.default_backend() == "cpu"
  derived = []
  for name, what, count in (("decode", f"decode {FID_SAMPLES:,} samples (one FID evaluation)", FID_SAMPLES),
                            ("encode", f"encode ImageNet train twice ({IMAGENET_TRAIN_IMAGES:,} images + flips)",
                             2 * IMAGENET_TRAIN_IMAGES)):
    if results[name].fits:
      row = [what, hours(count * results[name].median_s / batch)]
      if on_cpu:
        row.append(hours(count * cpu_seconds[name] / batch / os.cpu_count()))
      derived.append(row)
  derived_header = ["work", "at the median wall time"] + (
      [f"at the process CPU time / {os.cpu_count()} cores"] if on_cpu else [])
  device = jax.devices()[0]
  title = (f"SD-VAE (sd-vae-ft-ema architecture, random weights), {size}x{size} images -> "
           f"{size // f}x{size // f}x{config.latent_channels} latents, {FLAGS.dtype} compute, precision "
           f"{FLAGS.precision or 'default'}, on {jax.default_backend()} ({device.device_kind}, "
           f"{jax.local_device_count()} device(s), {os.cpu_count()} CPU cores), jax {jax.__version__}; median and "
           f"minimum of {FLAGS.repeats} runs after one warm-up. Load average (1/5/15 min) "
           f"{'/'.join(f'{v:.1f}' for v in load)} at the start, {'/'.join(f'{v:.1f}' for v in load_end)} at the end.")
  text = (f"{title}\n\n{measure.markdown_table(header, rows)}\n\nDerived, for one device of this kind:\n\n"
          f"{measure.markdown_table(derived_header, derived)}")
  measure.write_report(text, FLAGS.output)


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
