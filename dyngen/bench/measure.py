"""What every benchmark measures: compile time, steady-state wall time, XLA's memory and cost analyses.

`measure(fn, *args)` jits `fn`, compiles it once (timed apart), reads `memory_analysis()` (needs no run) and
then runs it `repeats` times, unless the compiled temp memory exceeds `memory_budget_bytes`: then the row
says it does not fit rather than swapping the machine to death.
"""
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn


@dataclasses.dataclass
class Measurement:
  compile_s: float
  temp_bytes: int
  argument_bytes: int
  output_bytes: int
  flops: float | None  # XLA's cost analysis; counts a loop body once, not per iteration.
  times_s: list[float]
  fits: bool

  @property
  def median_s(self):
    return statistics.median(self.times_s) if self.times_s else float("nan")

  @property
  def peak_bytes(self):
    """Live bytes while the program runs: temporaries plus its inputs and outputs."""
    return self.temp_bytes + self.argument_bytes + self.output_bytes


def available_memory_bytes():
  """MemAvailable of this host (Linux), or None where /proc/meminfo is absent."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    return None
  return None


def default_memory_budget():
  available = available_memory_bytes()
  return None if available is None else int(0.8 * available)


def xla_flops(compiled):
  """FLOPs of a compiled program from XLA's cost analysis (None where it gives none); a loop body counts once.

  A custom call adds -1 ("unknown") to XLA's count: a program that is mostly one (the fused CPU attention
  alone) comes out negative, which is None here too.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return flops if flops is None or flops >= 0 else None


def measure(fn, *args, repeats=3, warmup=1, memory_budget_bytes=None, static_argnums=(), run=True):
  """Compiles and times `fn(*args)` (only compiles with run=False); see module docstring."""
  start = time.perf_counter()
  compiled = jax.jit(fn, static_argnums=static_argnums).lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  measurement = Measurement(
      compile_s=compile_s,
      temp_bytes=int(memory.temp_size_in_bytes),
      argument_bytes=int(memory.argument_size_in_bytes),
      output_bytes=int(memory.output_size_in_bytes),
      flops=xla_flops(compiled),
      times_s=[],
      fits=True,
  )
  if memory_budget_bytes is not None and measurement.peak_bytes > memory_budget_bytes:
    measurement.fits = False
    return measurement
  if not run:
    return measurement
  dynamic_args = [a for i, a in enumerate(args) if i not in static_argnums]
  for i in range(warmup + repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*dynamic_args))
    if i >= warmup:
      measurement.times_s.append(time.perf_counter() - start)
  return measurement


def random_params(model, *example_args, scale=0.02, seed=0):
  """Parameters of `model`'s shapes for `model.init(key, *example_args)`, drawn N(0, scale²) on the host.

  No init to compile (XLA:CPU takes seconds for a model's), and no zero-initialised branch (adaLN gates)
  that would make part of the model trivially zero.
  """
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *example_args)["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def squared_output_gradient(model):
  """(params, x, t, y) -> d/dparams sum(model(x, t, y)²): a forward+backward of the whole model."""
  return jax.grad(lambda params, x, t, y: jnp.sum(model.apply({"params": params}, x, t, y) ** 2))


def gib(num_bytes):
  return num_bytes / 2 ** 30


def markdown_table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(text, output, *, rows=None, json_output=""):
  """Prints `text` and, when `output` is set, writes it there too; `rows` go to `json_output` when it is set
  (the benchmarks' `--json=FILE`, for scripts)."""
  print(text)
  for path, content in ((output, text + "\n"), (json_output, json.dumps(rows, indent=2))):
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with open(path, "w") as f:
        f.write(content)
