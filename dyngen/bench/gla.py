r"""Gated linear attention kernels: forward and forward+backward time and compiled memory per implementation.

  python -m dyngen.bench.gla --output=docs/benchmarks/gla_cpu.md

Shapes are those of one DiG-S GLA layer at batch 1: 6 heads, key dim 32, value dim 64, float32, for each
`--lengths` token count. Every implementation that runs natively on this backend is measured with
`dyngen.bench.measure` (compile time apart, median of `--repeats` runs, XLA's compiled temp memory);
forward+backward is jit(grad) of sum(o) with respect to q, k, v and log_alpha; "time / fastest" compares each
implementation with the fastest one at the same length and pass. Pallas kernels for another
backend only run in interpret mode, far too slowly to time, and are listed as such.
"""
import functools

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from dyngen import host_memory
from dyngen.bench import measure
from dyngen.pallas_kernels import gla

FLAGS = flags.FLAGS
flags.DEFINE_list("lengths", ["256", "1024", "4096", "16384"], "Token counts.")
flags.DEFINE_list("implementations", ["reference", "recurrent", "chunked", "pallas_tpu", "pallas_gpu"],
                  "GLA implementations to list.")
flags.DEFINE_integer("chunk_size", 64, "GLA chunk size of the chunked and Pallas forms.")
flags.DEFINE_integer("heads", 6, "Heads (DiG-S: 6).")
flags.DEFINE_integer("key_dim", 32, "Per-head key dim (DiG: 32).")
flags.DEFINE_integer("value_dim", 64, "Per-head value dim (DiG: 64).")
flags.DEFINE_integer("repeats", 5, "Timed runs per configuration (after one warm-up run).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")

_NATIVE_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def inputs(length):
  """q, k, v, log_alpha of one GLA layer at batch 1 with DiG's gate form logsigmoid(x) / 16."""
  keys = jax.random.split(jax.random.key(0), 4)
  shape_k = (1, length, FLAGS.heads, FLAGS.key_dim)
  q, k, x = (jax.random.normal(key, shape_k) for key in keys[:3])
  v = jax.random.normal(keys[3], (1, length, FLAGS.heads, FLAGS.value_dim))
  return q, k, v, jax.nn.log_sigmoid(x) / 16


def measurements_for(implementation, length):
  """{"fwd": Measurement, "fwd+bwd": Measurement} of one implementation at one length."""
  attention = functools.partial(gla.gated_linear_attention, chunk_size=FLAGS.chunk_size,
                                implementation=implementation)
  forward_backward = jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2, 3))
  return {name: measure.measure(fn, *inputs(length), repeats=FLAGS.repeats,
                                memory_budget_bytes=measure.default_memory_budget())
          for name, fn in (("fwd", attention), ("fwd+bwd", forward_backward))}


def main(argv):
  del argv
  native = [name for name in FLAGS.implementations
            if _NATIVE_BACKEND.get(name, jax.default_backend()) == jax.default_backend()]
  results = {}
  for length in map(int, FLAGS.lengths):
    for implementation in native:
      results[implementation, length] = measurements_for(implementation, length)
      print(f"{implementation:10s} {length:6d} tokens: " + ", ".join(
          f"{name} {m.median_s:.4f} s" for name, m in results[implementation, length].items()), flush=True)
  # Ratios against the fastest implementation of the same length and pass.
  header = ["implementation", "tokens", "pass", "compile s", "median s", "time / fastest", "temp MiB",
            "temp KiB/token"]
  rows = []
  for implementation in FLAGS.implementations:
    if implementation not in native:
      backend = _NATIVE_BACKEND[implementation]
      rows.append([implementation, "all", "fwd, fwd+bwd", f"interpret only (runs on {backend})", "", "", "", ""])
      continue
    for length in map(int, FLAGS.lengths):
      for name, m in results[implementation, length].items():
        fastest = min(results[other, length][name].median_s for other in native
                      if results[other, length][name].fits)
        rows.append([implementation, length, name, f"{m.compile_s:.2f}",
                     f"{m.median_s:.4f}" if m.fits else "does not fit",
                     f"{m.median_s / fastest:.2f}" if m.fits else "–",
                     f"{m.temp_bytes / 2 ** 20:.1f}", f"{m.temp_bytes / length / 1024:.1f}"])
  title = (f"GLA, B=1, H={FLAGS.heads}, Dk={FLAGS.key_dim}, Dv={FLAGS.value_dim}, float32, "
           f"chunk {FLAGS.chunk_size}, backend {jax.default_backend()} ({jax.devices()[0].device_kind})")
  measure.write_report(f"{title}\n\n{measure.markdown_table(header, rows)}", FLAGS.output)


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
