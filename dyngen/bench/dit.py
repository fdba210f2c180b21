r"""DiT training-step and sampling speed, compile time reported apart from steady state.

  python -m dyngen.bench.dit --output=docs/benchmarks/dit_cpu.md

Measures, for DiT-S/2 on 32x32x4 latents (the DiT ImageNet-256 shape):
  train step   one jitted, donated update of the trainer (`dyngen.train.step.train_step`: diffusion loss
               with learned sigma, AdamW, EMA) at each `--train_batch_sizes`, each run fed the state the
               previous one returned, as the trainer does (timing only the loss would let XLA drop the
               backward pass and the update: they feed nothing the loss depends on);
  forward      one model call at the first batch size;
  sampling     a `--sample_steps`-step DDPM loop (one `lax.scan`, the model traced once) at
               `--sample_batch_size`, without and with classifier-free guidance (which doubles the batch).
"""
import functools
import os
import resource
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dyngen import diffusion as diffusion_lib
from dyngen import host_memory
from dyngen import models
from dyngen.bench import measure
from dyngen.train import objectives
from dyngen.train import state as state_lib
from dyngen.train import step as step_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("family", "dit", "Model family.")
flags.DEFINE_string("variant", "S/2", "Model size/patch.")
flags.DEFINE_integer("input_size", 32, "Latent side (32 = 256px images through the SD VAE).")
flags.DEFINE_list("train_batch_sizes", ["8", "32"], "Batch sizes of the timed train steps.")
flags.DEFINE_integer("sample_batch_size", 8, "Images per sampling call.")
flags.DEFINE_integer("sample_steps", 250, "DDPM steps (DiT's FID setting).")
flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (after one warm-up run).")
flags.DEFINE_string("attention", "auto", "DiT attention implementation.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_string("output", "", "Also write the markdown table here.")


def model_config():
  fields = dict(name=FLAGS.family, input_size=FLAGS.input_size, in_channels=4, mlp_ratio=4.0,
                class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, dtype=FLAGS.dtype,
                **models.variant(FLAGS.variant))
  if FLAGS.family == "dit":
    fields["attention"] = FLAGS.attention
  return ml_collections.ConfigDict(fields)


def optimizer_config():
  return ml_collections.ConfigDict(dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                        warmup_steps=0, grad_clip_norm=0.0))


def process_cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure_train_steps(train_step, state, batch, repeats, warmup=1):
  """Compiles `train_step` donating the state, then runs it warmup + repeats times, each on the state the
  previous run returned. Returns (measure.Measurement, per-run process CPU seconds, final state)."""
  start = time.perf_counter()
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  result = measure.Measurement(compile_s=compile_s, temp_bytes=int(memory.temp_size_in_bytes),
                               argument_bytes=int(memory.argument_size_in_bytes),
                               output_bytes=int(memory.output_size_in_bytes), flops=None, times_s=[], fits=True)
  cpu_s = []
  for i in range(warmup + repeats):
    start_wall, start_cpu = time.perf_counter(), process_cpu_seconds()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      result.times_s.append(time.perf_counter() - start_wall)
      cpu_s.append(process_cpu_seconds() - start_cpu)
  return result, cpu_s, state


def inputs(config, batch):
  x = jax.random.normal(jax.random.key(1), (batch, config.input_size, config.input_size, config.in_channels))
  return x, jax.random.randint(jax.random.key(2), (batch,), 0, config.num_classes)


def run_benchmark():
  config = model_config()
  model = models.build(config)
  optimizer = state_lib.create_optimizer(optimizer_config())
  state = jax.jit(lambda key: nn.unbox(state_lib.initial_state(key, model, optimizer)))(jax.random.key(0))
  # Shift parameters off the zero init of adaLN / final layers so every branch does real work.
  state = state.replace(params=jax.tree.map(lambda p: p + 0.01, state.params))
  train_diffusion = diffusion_lib.create_diffusion(timestep_respacing="", learn_sigma=True)
  train_step = functools.partial(step_lib.train_step, objective=objectives.DiffusionObjective(model, train_diffusion),
                                 optimizer=optimizer,
                                 learning_rate_fn=state_lib.learning_rate_schedule(optimizer_config()),
                                 ema_decay=0.9999)
  rows = []
  load_before = os.getloadavg()

  def add(name, batch, result, per_image_divisor, cpu_s=None):
    cpu = "" if cpu_s is None else f"{sorted(cpu_s)[len(cpu_s) // 2]:.3f}"
    rows.append([name, batch, f"{result.compile_s:.1f}", f"{result.median_s:.3f}", f"{min(result.times_s):.3f}",
                 cpu, f"{result.median_s / per_image_divisor * 1e3:.1f}", f"{measure.gib(result.temp_bytes):.2f}"])
    print(rows[-1], flush=True)

  for batch in map(int, FLAGS.train_batch_sizes):
    x, y = inputs(config, batch)
    result, cpu_s, state = measure_train_steps(train_step, state, {"image": x, "label": y}, FLAGS.repeats)
    add("train step (fwd+bwd+AdamW+EMA)", batch, result, batch, cpu_s)

  batch = int(FLAGS.train_batch_sizes[0])
  x, y = inputs(config, batch)
  t = jnp.full((batch,), 500, jnp.int32)
  result = measure.measure(lambda p, x, t, y: model.apply({"params": p}, x, t, y), state.params, x, t, y,
                           repeats=FLAGS.repeats)
  add("forward", batch, result, batch)

  sample_diffusion = diffusion_lib.create_diffusion(timestep_respacing=str(FLAGS.sample_steps), learn_sigma=True)
  x_T, y = inputs(config, FLAGS.sample_batch_size)

  def sample(params, x_T, y):
    return sample_diffusion.p_sample_loop(lambda x, t: model.apply({"params": params}, x, t, y), x_T,
                                          key=jax.random.key(3))

  def sample_guided(params, x_T, y):
    labels = jnp.concatenate([y, jnp.full_like(y, config.num_classes)])
    apply_fn = lambda x, t, labels: model.apply({"params": params}, x, t, labels)
    model_fn = diffusion_lib.guided_model_fn(apply_fn, labels, 1.5, guidance_channels=3)
    return sample_diffusion.p_sample_loop(model_fn, jnp.concatenate([x_T, x_T]), key=jax.random.key(3))

  repeats = max(1, FLAGS.repeats // 2)
  add(f"{FLAGS.sample_steps}-step DDPM sampling", FLAGS.sample_batch_size,
      measure.measure(sample, state.ema_params, x_T, y, repeats=repeats), FLAGS.sample_batch_size)
  add(f"{FLAGS.sample_steps}-step DDPM sampling, cfg 1.5", FLAGS.sample_batch_size,
      measure.measure(sample_guided, state.ema_params, x_T, y, repeats=repeats), FLAGS.sample_batch_size)

  device = jax.devices()[0]
  header = ["what", "batch", "compile s", "median s", "min s", "process CPU s", "ms / image", "compiled temp GiB"]
  load = "/".join(f"{x:.1f}" for x in load_before), "/".join(f"{x:.1f}" for x in os.getloadavg())
  text = (f"{FLAGS.family.upper()}-{FLAGS.variant}, {FLAGS.input_size}x{FLAGS.input_size}x4 latents, "
          f"{FLAGS.dtype} compute, attention {FLAGS.attention}, on {device.platform} ({device.device_kind}, "
          f"{jax.device_count()} device(s), {os.cpu_count()} CPU cores), jax {jax.__version__}; median and "
          f"minimum of {FLAGS.repeats} runs ({repeats} for sampling) after one warm-up. Load average "
          f"(1/5/15 min) {load[0]} at the start, {load[1]} at the end: on a shared host the wall times grow "
          f"with the load, the process CPU seconds (train steps: both cores' work) much less.\n\n"
          + measure.markdown_table(header, rows))
  measure.write_report(text, FLAGS.output)


def main(argv):
  del argv
  run_benchmark()


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
