r"""DiG-S/2 against DiT-S/2, batch 1, forward+backward, over growing token counts, in one process.

  python -m dyngen.bench.dig_vs_dit --output=docs/benchmarks/dig_vs_dit_cpu.md

For each token count (image side = 2 * sqrt(tokens) latent pixels at patch 2) it compiles the gradient of
sum(model(x)^2) with respect to the parameters for
  DiT, plain XLA attention        (what `attention="xla"` gives: the (T, T) scores per head in memory),
  DiT, query-chunked attention    (what a user would pick instead for long sequences under XLA),
  DiT, fused CPU attention        (on CPU where it builds: dyngen's C++ kernel, `auto`'s choice there; its
                                   per-thread scratch, about 2 MiB, is outside XLA's memory_analysis),
  DiG, the configured GLA implementation,
all with the same remat and block-scan policy (by default each block rematerialised, the blocks under one
lax.scan: `model.scan_blocks`), reads XLA's compiled memory (`memory_analysis`, no run needed) and times
the median of `--repeats` runs. A configuration whose compiled peak exceeds 80% of this host's available
memory is reported as not fitting instead of being run.
"""
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections

from dyngen import host_memory
from dyngen import models
from dyngen.bench import measure
from dyngen.cpu_kernels import attention as cpu_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("tokens", ["256", "1024", "4096", "12544", "16384"], "Token counts (squares of even grids).")
flags.DEFINE_string("variant", "S/2", "Model size/patch of both families.")
flags.DEFINE_integer("repeats", 3, "Timed runs per configuration (after one warm-up run).")
flags.DEFINE_integer("max_repeats_tokens", 4096, "Above this many tokens, time a single run (no warm-up).")
flags.DEFINE_integer("max_timed_tokens", 1 << 30, "Above this many tokens, only compile (memory, no timing).")
flags.DEFINE_bool("remat", True, "Rematerialise each block in both families (the same policy on both sides).")
flags.DEFINE_bool("scan_blocks", True, "Run the blocks under one lax.scan in both families (model.scan_blocks).")
flags.DEFINE_integer("attention_chunk_size", 1024, "Query block of DiT's chunked attention.")
flags.DEFINE_string("gla_implementation", "auto", "GLA implementation of DiG.")
flags.DEFINE_integer("gla_chunk_size", 64, "GLA chunk size of DiG.")
flags.DEFINE_bool("compile_only", False, "Only compile and read memory_analysis (no timed runs).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")

PLAIN = ("DiT, plain attention", "dit", dict(attention="xla"))
CHUNKED = ("DiT, chunked attention", "dit", dict(attention="chunked"))
FUSED = ("DiT, fused CPU attention", "dit", dict(attention="cpu_fused"))
DIG = ("DiG", "dig", dict())


def candidates():
  """The rows per token count; the first rows are the DiT baselines that the ratio columns divide by."""
  fused = jax.default_backend() == "cpu" and cpu_attention.available()
  return (PLAIN, CHUNKED, FUSED, DIG) if fused else (PLAIN, CHUNKED, DIG)


def model_config(family, tokens, overrides):
  grid = int(round(tokens ** 0.5))
  if grid * grid != tokens:
    raise ValueError(f"--tokens must be perfect squares, got {tokens}")
  variant = models.variant(FLAGS.variant)
  fields = dict(name=family, input_size=grid * variant["patch_size"], in_channels=4, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, remat=FLAGS.remat,
                scan_blocks=FLAGS.scan_blocks, **variant)
  if family == "dit":
    fields.update(attention_chunk_size=FLAGS.attention_chunk_size)
  else:
    fields.update(gla_implementation=FLAGS.gla_implementation, gla_chunk_size=FLAGS.gla_chunk_size)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def timed(tokens):
  return not FLAGS.compile_only and tokens <= FLAGS.max_timed_tokens


def run_benchmark():
  budget = measure.default_memory_budget()
  rows, results = [], {}
  rows_per_tokens = candidates()
  baselines = [label for label, family, _ in rows_per_tokens if family == "dit"]
  for tokens in map(int, FLAGS.tokens):
    for label, family, overrides in rows_per_tokens:
      config = model_config(family, tokens, overrides)
      model = models.build(config)
      x = jax.random.normal(jax.random.key(1), (1, config.input_size, config.input_size, config.in_channels))
      t = jnp.array([500], jnp.int32)
      y = jnp.array([1], jnp.int32)
      params = measure.random_params(model, x, t, y)
      # Compilation is ahead of time, so above max_repeats_tokens one run without a warm-up suffices.
      few = tokens > FLAGS.max_repeats_tokens
      result = measure.measure(measure.squared_output_gradient(model), params, x, t, y, repeats=1 if few else FLAGS.repeats,
                               warmup=0 if few else 1, memory_budget_bytes=budget, run=timed(tokens))
      results[tokens, label] = result
      print(f"{tokens:6d} tokens  {label:24s} compile {result.compile_s:7.1f} s  "
            f"median {result.median_s:8.3f} s  temp {measure.gib(result.temp_bytes):7.2f} GiB"
            + ("" if result.fits else "  (does not fit: not run)"), flush=True)
  for tokens in map(int, FLAGS.tokens):
    for label, _, _ in rows_per_tokens:
      r = results[tokens, label]
      time_cell = "not timed" if not timed(tokens) else f"{r.median_s:.3f}" if r.fits else "does not fit"

      def ratio(a, b, attr):
        if attr == "median_s" and (not timed(tokens) or not (a.fits and b.fits)):
          return "–"
        return f"{getattr(a, attr) / getattr(b, attr):.2f}"

      rows.append([tokens, label, f"{r.compile_s:.1f}", time_cell, f"{measure.gib(r.peak_bytes):.2f}",
                   *(ratio(r, results[tokens, b], "median_s") for b in baselines),
                   *(ratio(r, results[tokens, b], "peak_bytes") for b in baselines)])
  short = lambda label: label.replace(" attention", "").replace(",", "")
  header = ["tokens", "model", "compile s", "fwd+bwd median s", "compiled peak GiB",
            *(f"time / {short(b)}" for b in baselines), *(f"memory / {short(b)}" for b in baselines)]
  device = jax.devices()[0]
  text = (f"DiG-{FLAGS.variant} vs DiT-{FLAGS.variant}, batch 1, forward+backward (grad of sum(out^2)), "
          f"remat={FLAGS.remat}, scan_blocks={FLAGS.scan_blocks}, DiT chunk {FLAGS.attention_chunk_size}, "
          f"GLA {FLAGS.gla_implementation} chunk {FLAGS.gla_chunk_size}, on {device.platform} ({device.device_kind}), jax {jax.__version__}.\n"
          "Peak = XLA compiled temp + argument + output bytes (memory_analysis).\n\n"
          + measure.markdown_table(header, rows))
  measure.write_report(text, FLAGS.output)


def main(argv):
  del argv
  run_benchmark()


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
