r"""Unrolled against scanned blocks (`model.scan_blocks`), with and without remat, in one process.

  python -m dyngen.bench.scan_blocks --output=docs/benchmarks/scan_blocks_cpu.md

For each family (DiT-S/2, DiG-S/2 by default) and each token count, the gradient of sum(model(x)^2) with
respect to the parameters at `--batch_size`, in the four combinations of remat and scan_blocks: compile time,
median wall time of `--repeats` runs after a warm-up, XLA's compiled peak memory (memory_analysis), and each
as a ratio to the unrolled model without remat. It says what the scan costs or saves where a user chooses:
at 256-token training resolution, and at long sequences.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from dyngen import host_memory
from dyngen import models
from dyngen.bench import measure

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["dit", "dig"], "Model families.")
flags.DEFINE_string("variant", "S/2", "Model size/patch.")
flags.DEFINE_list("tokens", ["256"], "Token counts (squares).")
flags.DEFINE_integer("batch_size", 8, "Images per step.")
flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (after one warm-up run).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")

POLICIES = ((False, False), (False, True), (True, False), (True, True))  # (remat, scan_blocks)


def gradient_and_args(family, tokens, remat, scan_blocks):
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise ValueError(f"--tokens must be perfect squares, got {tokens}")
  variant = models.variant(FLAGS.variant)
  side = grid * variant["patch_size"]
  model = models.build(ml_collections.ConfigDict(dict(
      name=family, input_size=side, in_channels=4, num_classes=1000, remat=remat, scan_blocks=scan_blocks,
      **variant)))
  batch = FLAGS.batch_size
  x = jax.random.normal(jax.random.key(0), (batch, side, side, 4))
  t = jnp.arange(batch, dtype=jnp.int32) * (1000 // batch)
  y = jnp.arange(batch, dtype=jnp.int32)
  return measure.squared_output_gradient(model), (measure.random_params(model, x, t, y), x, t, y)


def main(argv):
  del argv
  budget = measure.default_memory_budget()
  header = ["family", "tokens", "remat", "scan_blocks", "compile s", "fwd+bwd median s", "compiled peak GiB",
            "time / unrolled", "memory / unrolled"]
  rows = []
  for family in FLAGS.families:
    for tokens in map(int, FLAGS.tokens):
      results = {}
      for remat, scan_blocks in POLICIES:
        grad, args = gradient_and_args(family, tokens, remat, scan_blocks)
        result = measure.measure(grad, *args, repeats=FLAGS.repeats, memory_budget_bytes=budget)
        results[remat, scan_blocks] = result
        print(f"{family} {tokens:6d} tokens remat={remat!s:5} scan={scan_blocks!s:5} "
              f"compile {result.compile_s:6.1f} s "
              f"median {result.median_s:7.3f} s peak {measure.gib(result.peak_bytes):6.2f} GiB", flush=True)
      base = results[False, False]
      for (remat, scan_blocks), r in results.items():
        time_ratio = f"{r.median_s / base.median_s:.2f}" if r.fits and base.fits else "–"
        rows.append([family, tokens, remat, scan_blocks, f"{r.compile_s:.1f}",
                     f"{r.median_s:.3f}" if r.fits else "does not fit", f"{measure.gib(r.peak_bytes):.2f}",
                     time_ratio, f"{r.peak_bytes / base.peak_bytes:.2f}"])
  device = jax.devices()[0]
  text = (f"{FLAGS.variant}, batch {FLAGS.batch_size}, forward+backward (grad of sum(out^2)), float32, on "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}; ratios against the unrolled model "
          "without remat.\n\n" + measure.markdown_table(header, rows))
  measure.write_report(text, FLAGS.output)


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
