r"""Routed sampling: the fast path, the masked path and the dense model side by side, in one process.

  python -m dyngen.bench.dydit --output=docs/benchmarks/dydit_cpu.md --json=dydit_cpu.json
  python -m dyngen.bench.dydit --families=dydig --variants=S/2,XL/2 --steps=5   # DyDiG against DiG

Per family (`--families`: dydit against DiT, dydig against DiG), model shape (`--variants`, 32x32x4
latents: 256 tokens at patch 2) and target FLOPs ratio (`--ratios`), one `--steps`-step DDPM loop of
`--batch` images with classifier-free guidance (`--cfg_scale`; the model runs on 2 x batch rows) through
  dense    the family's dense model (DiT or DiG, `models.build`) on the same parameters minus the routers;
  masked   the routed masked reference (`dyngen.train.sample.routed_sample_loop`): every unit runs, masks multiply;
  fast     `dyngen.train.routing_plan.FastSampler` on the plan of the schedule (gathered heads and MLP groups,
           calibrated token capacities, at most `--max_programs` programs).
DyDiT and DiT take `models.variant`'s fields; DyDiG and DiG the recipes' (`dyngen.recipes.families`: 18
heads at XL, 16 SwiGLU groups).
Routers are placed, not trained: the width routers get zero kernels and biases +10 / -10 so that every
block keeps the same heads and MLP groups at every step (counts chosen on the bucket capacities, so no
padding); the token routers keep their random weights and each block's fc2 bias is set so that the wanted
fraction of tokens equals the target's over the masked sampling loop of the timed batch (all steps, rows and
tokens; `--placement_passes` loops, each on the biases of the one before: a placed bias changes the
trajectory, so the achieved ratio drifts from the target and is measured, not assumed). The token capacities
are calibrated on the timed batch itself (timed apart), so the capacity never cuts a wanted token here.
Times are medians of `--repeats` runs of each path, interleaved (dense, masked, fast, dense, ...) so that
the load of a shared host hits all three alike; compile time is reported apart (all programs of a path).

The compute knob (`--knob_curve`): from one trained routed checkpoint (`--checkpoint`, a workdir such as the
digits quickstart's), `config.evaluation.num_samples` class-balanced samples at the run's own sampling
settings for each width cap : token capacity pair of `--knobs` on the fast path (`--max_programs`), then
the masked path at 1:1 and the dense warm start (<checkpoint>/pretrain, when there): wall time (compile
and calibration apart), the achieved FLOPs ratio (kept and executed), the wanted tokens the capacity cut,
and the run's sample-quality metric (the digits classifier's accuracy and Fréchet distance):

  python -m dyngen.bench.dydit --knob_curve --checkpoint=WORKDIR --output=docs/benchmarks/dydit_knob_digits.md
"""
import json
import math
import os
import statistics
import time

from etils import epath

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dyngen import checkpoint as checkpoint_lib
from dyngen import diffusion as diffusion_lib
from dyngen import host_memory
from dyngen import models
from dyngen.bench import measure
from dyngen.recipes import families
from dyngen.train import evaluation
from dyngen.train import routing_plan
from dyngen.train import sample as sample_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["dydit", "dydig"], "Routed families: dydit (against DiT), dydig (against DiG).")
flags.DEFINE_list("variants", ["S/2", "XL/2"], "Model sizes/patches.")
flags.DEFINE_list("ratios", ["0.5", "0.7"], "Target FLOPs ratios the routers are placed at.")
flags.DEFINE_integer("steps", 10, "DDPM steps.")
flags.DEFINE_integer("batch", 2, "Images per sampling call (the guided model runs on twice as many rows).")
flags.DEFINE_float("cfg_scale", 1.5, "Classifier-free guidance scale (1 = unguided).")
flags.DEFINE_integer("repeats", 3, "Timed runs of each path (interleaved).")
flags.DEFINE_integer("warmup", 1, "Untimed runs of each path first (every program is compiled before either).")
flags.DEFINE_integer("max_programs", 4, "The fast path's program budget (config.sample.max_programs).")
flags.DEFINE_integer("token_buckets", 32, "Calibrated token counts round up to multiples of N / token_buckets.")
flags.DEFINE_enum("token_pooling", "row", routing_plan.TOKEN_POOLING,
                  "The fast path's token pooling (config.sample.token_pooling).")
flags.DEFINE_float("width_cap", 1.0, "The fast path's width cap (config.sample.width_cap).")
flags.DEFINE_float("token_capacity", 1.0, "The fast path's token capacity cap (config.sample.token_capacity).")
flags.DEFINE_integer("placement_passes", 1, "Sampling passes placing the token-router biases (see above).")
flags.DEFINE_bool("knob_curve", False, "Measure the compute knob on --checkpoint instead (see above).")
flags.DEFINE_string("checkpoint", "", "--knob_curve: a trained routed run's workdir (or checkpoint folder).")
flags.DEFINE_string("dense_checkpoint", "", "--knob_curve: the dense model for the last row (default: "
                    "<checkpoint>/pretrain, the warm start the routed quickstarts train first, when there).")
flags.DEFINE_list("knobs", ["1:1", "0.75:1", "1:0.75", "0.75:0.75", "0.5:0.75", "0.5:0.5"],
                  "--knob_curve: width_cap:token_capacity pairs.")
flags.DEFINE_integer("num_samples", 0, "--knob_curve: samples per setting (0: config.evaluation.num_samples).")
flags.DEFINE_string("output", "", "Also write the markdown table here.")
flags.DEFINE_string("json", "", "Also write the rows as JSON here.")

# Width units kept per target ratio, as fractions of H (on the capacities ceil(j H / 4)); tokens follow.
WIDTH_FRACTIONS = {0.5: (0.5, 0.75), 0.7: (0.75, 0.75)}


# Routed family -> (its dense family, display names).
DENSE_OF = {"dydit": ("dit", "DyDiT", "DiT"), "dydig": ("dig", "DyDiG", "DiG")}


def model_config(variant, name):
  if name in ("dig", "dydig"):
    return families.model_config(name, variant)
  return ml_collections.ConfigDict(dict(name=name, input_size=32, in_channels=4, mlp_ratio=4.0,
                                        class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
                                        **models.variant(variant)))


def width_fractions(target):
  if target in WIDTH_FRACTIONS:
    return WIDTH_FRACTIONS[target]
  return (min(1.0, target), min(1.0, target))


def unit_counts(model, target):
  """(heads, groups) kept per block, on the capacities of 4 buckets, and the token fraction for `target`."""
  total_heads, total_groups = routing_plan.width_units(model)
  head_fraction, group_fraction = width_fractions(target)
  heads = int(routing_plan.round_up(math.ceil(head_fraction * total_heads),
                                    routing_plan.bucket_capacities(total_heads, 4)))
  groups = int(routing_plan.round_up(math.ceil(group_fraction * total_groups),
                                     routing_plan.bucket_capacities(total_groups, 4)))
  unit = model.unit_macs()
  weight_a, weight_m = unit.attention / (unit.attention + unit.mlp), unit.mlp / (unit.attention + unit.mlp)
  token_fraction = (target - heads / total_heads * weight_a) / (groups / total_groups * weight_m)
  if not 0 < token_fraction <= 1:
    raise ValueError(f"target ratio {target} unreachable with {heads} of {total_heads} heads and {groups} of "
                     f"{total_groups} groups: token fraction {token_fraction:.3f}")
  return heads, groups, token_fraction


def token_logit_trajectory(model, params, x_T, y, diffusion, sample_config):
  """The token-router logits (S, B, L, N) of the masked model along its sampling loop from x_T."""
  guided = FLAGS.cfg_scale != 1.0

  @jax.jit
  def run(params):
    def body(x, scanned):
      index, step_key = scanned
      captured = {}

      def apply_fn(x, t, y):
        out, aux = model.apply({"params": params}, x, t, y)
        captured["logits"] = aux["token_logits"]
        return out

      model_fn = (diffusion_lib.guided_model_fn(apply_fn, y, FLAGS.cfg_scale, 3) if guided
                  else lambda x, t: apply_fn(x, t, y))
      noise = jax.random.normal(step_key, x.shape, x.dtype)
      return diffusion.p_sample(model_fn, x, index, noise)[0], captured["logits"]

    steps = diffusion.num_timesteps
    return jax.lax.scan(body, x_T, (jnp.arange(steps - 1, -1, -1), jax.random.split(jax.random.key(3), steps)))[1]

  return np.asarray(run(params))


def placed_params(model, params, target, x, y, diffusion, sample_config):
  """`params` with the routers placed for `target` (see the module docstring)."""
  heads, groups, token_fraction = unit_counts(model, target)
  params = jax.tree.map(lambda a: a, params)  # a new tree sharing the arrays
  for index in range(model.depth):
    block = dict(params[f"blocks_{index}"])
    for name, keep in (("head_router", heads), ("mlp_router", groups)):
      routed = block[name]["bias"].shape[0]  # units 1 .. H-1 (or G-1)
      bias = np.where(np.arange(routed) < keep - 1, 10.0, -10.0).astype(np.float32)
      block[name] = dict(kernel=jnp.zeros_like(block[name]["kernel"]), bias=jnp.asarray(bias))
    params[f"blocks_{index}"] = block
  # Token routers: each block's fc2 bias shifted by the (1 - fraction) quantile of its logits over the masked
  # sampling loop of the timed batch (all steps, rows and tokens): the logits move as x_t does.
  for _ in range(FLAGS.placement_passes):
    logits = token_logit_trajectory(model, params, x, y, diffusion, sample_config)  # (S, B, L, N)
    for index in range(model.depth):
      router = params[f"blocks_{index}"]["token_router"]
      bias = float(router["fc2"]["bias"][0]) - float(np.quantile(logits[:, :, index], 1 - token_fraction))
      fc2 = dict(kernel=router["fc2"]["kernel"], bias=jnp.asarray([bias], jnp.float32))
      params[f"blocks_{index}"] = dict(params[f"blocks_{index}"], token_router=dict(router, fc2=fc2))
  return params


def bench_one(family, variant, target, sample_config, diffusion):
  dense_name, routed_title, _ = DENSE_OF[family]
  model = models.build(model_config(variant, family))
  dense_model = models.build(model_config(variant, dense_name))
  batch = FLAGS.batch
  guided = FLAGS.cfg_scale != 1.0
  rows = 2 * batch if guided else batch
  x_T = jax.random.normal(jax.random.key(1), (batch, 32, 32, 4))
  labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)
  y = jnp.concatenate([labels, jnp.full_like(labels, 1000)]) if guided else labels
  x_T = jnp.concatenate([x_T, x_T]) if guided else x_T
  loop_key = jax.random.key(3)
  t_mid = jnp.full((rows,), diffusion.timestep_map[len(diffusion.timestep_map) // 2], jnp.int32)
  params = measure.random_params(model, x_T, t_mid, y, scale=0.02)  # only the shapes come from x_T, t, y
  params = placed_params(model, params, target, x_T, y, diffusion, sample_config)
  dense_params = {name: ({k: v for k, v in value.items() if "router" not in k} if name.startswith("blocks_") else value)
                  for name, value in params.items()}

  model_fn_of = lambda apply_fn: (diffusion_lib.guided_model_fn(apply_fn, y, FLAGS.cfg_scale, 3) if guided
                                  else lambda x, t: apply_fn(x, t, y))

  def dense(p, x):
    return diffusion.p_sample_loop(model_fn_of(lambda x, t, y: dense_model.apply({"params": p}, x, t, y)), x,
                                   key=loop_key)

  def masked(p, x):
    return sample_lib.routed_sample_loop(diffusion, model, p, model_fn_of, x, loop_key, sample_config)

  start = time.perf_counter()
  dense_c = jax.jit(dense).lower(dense_params, x_T).compile()
  dense_compile = time.perf_counter() - start
  start = time.perf_counter()
  masked_c = jax.jit(masked).lower(params, x_T).compile()
  masked_compile = time.perf_counter() - start

  options = routing_plan.RoutingOptions(width_cap=FLAGS.width_cap, token_capacity=FLAGS.token_capacity,
                                        token_buckets=FLAGS.token_buckets, max_programs=FLAGS.max_programs,
                                        token_pooling=FLAGS.token_pooling)
  start = time.perf_counter()
  schedule = routing_plan.gaussian_schedule(diffusion, sample_config)
  counts = routing_plan.calibrate_token_counts(schedule, model, params, x_T, y, FLAGS.cfg_scale, loop_key,
                                               sample_config, pooled=FLAGS.token_pooling == "batch")
  calibration_s = time.perf_counter() - start
  start = time.perf_counter()
  plan = routing_plan.make_plan(model, params, schedule.model_timesteps, options, token_counts=counts)
  plan_s = time.perf_counter() - start
  fast = routing_plan.FastSampler(model, schedule, sample_config)
  fast_fn = lambda p, x: fast.run(p, plan, x, y, FLAGS.cfg_scale, loop_key)

  fast_compile = fast.compile(params, plan, x_T, y, FLAGS.cfg_scale, loop_key)
  paths = {"dense": lambda: dense_c(dense_params, x_T), "masked": lambda: masked_c(params, x_T),
           "fast": lambda: fast_fn(params, x_T)}
  for _ in range(FLAGS.warmup):  # each blocked before the next starts: no overlap with the next timing
    for run in paths.values():
      jax.block_until_ready(run())
  times = {name: [] for name in paths}
  outputs = {}
  loads = [os.getloadavg()[0]]
  for _ in range(FLAGS.repeats):
    for name, run in paths.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      outputs[name] = jax.block_until_ready(run())
      times[name].append((time.perf_counter() - start, time.process_time() - start_cpu))
    loads.append(os.getloadavg()[0])
  outputs["masked"], masked_stats = outputs["masked"]
  outputs["fast"], fast_stats = outputs["fast"]
  median = {name: statistics.median(wall for wall, _ in values) for name, values in times.items()}
  median_cpu = {name: statistics.median(cpu for _, cpu in values) for name, values in times.items()}
  scale = float(jnp.max(jnp.abs(outputs["masked"])))
  row = dict(
      model=f"{routed_title}-{variant}", family=family, dense_model=f"{DENSE_OF[family][2]}-{variant}",
      target_flops_ratio=target,
      achieved_flops_ratio=float(np.mean(fast_stats["flops_ratio"])),
      masked_flops_ratio=float(np.mean(masked_stats["flops_ratio"])),
      executed_flops_ratio=float(np.mean(fast_stats["flops_ratio_executed"])),
      fast_s=median["fast"], masked_s=median["masked"], dense_s=median["dense"],
      fast_speedup=median["dense"] / median["fast"], masked_speedup=median["dense"] / median["masked"],
      fast_cpu_s=median_cpu["fast"], masked_cpu_s=median_cpu["masked"], dense_cpu_s=median_cpu["dense"],
      fast_cpu_speedup=median_cpu["dense"] / median_cpu["fast"], times=times,
      programs_compiled=fast.programs_compiled, segments=len(plan.segments),
      steps_per_segment=plan.summary()["steps_per_segment"], calls=len(plan.calls),
      fast_compile_s=fast_compile, masked_compile_s=masked_compile, dense_compile_s=dense_compile,
      calibration_s=calibration_s, plan_s=plan_s,
      tokens_cut=float(np.sum(fast_stats["wanted"] - fast_stats["kept"])),
      max_abs_diff_fast_masked=float(jnp.max(jnp.abs(outputs["fast"] - outputs["masked"]))) / scale,
      load_average=loads, steps=FLAGS.steps, batch=batch, rows=rows)
  print(json.dumps(row), flush=True)
  return row


def run_benchmark():
  sample_config = ml_collections.ConfigDict(dict(sampler="ddpm", num_steps=FLAGS.steps, eta=0.0,
                                                 clip_denoised=False, guidance_channels=3))
  diffusion = diffusion_lib.create_diffusion(timestep_respacing=str(FLAGS.steps), learn_sigma=True)
  load_before = os.getloadavg()
  rows = [bench_one(family, variant, float(target), sample_config, diffusion)
          for family in FLAGS.families for variant in FLAGS.variants for target in FLAGS.ratios]
  load_after = os.getloadavg()
  header = ["model (dense)", "target ratio", "achieved ratio (executed)", "dense s", "masked s", "fast s",
            "masked time / dense time", "dense / fast", "dense / fast, process CPU s", "programs (segments: steps)",
            "compile s dense / masked / fast",
            "calibration s", "fast vs masked (max rel.)", "load avg (1 min) during"]
  table = []
  for r in rows:
    table.append([f"{r['model']} ({r['dense_model']})", f"{r['target_flops_ratio']:.2f}",
                  f"{r['achieved_flops_ratio']:.3f} ({r['executed_flops_ratio']:.3f})", f"{r['dense_s']:.2f}",
                  f"{r['masked_s']:.2f}", f"{r['fast_s']:.2f}", f"{r['masked_s'] / r['dense_s']:.2f}x",
                  f"**{r['fast_speedup']:.2f}x**", f"{r['fast_cpu_speedup']:.2f}x",
                  f"{r['programs_compiled']} ({r['segments']}: "
                  f"{'+'.join(map(str, r['steps_per_segment']))})",
                  f"{r['dense_compile_s']:.1f} / {r['masked_compile_s']:.1f} / {r['fast_compile_s']:.1f}",
                  f"{r['calibration_s']:.1f}", f"{r['max_abs_diff_fast_masked']:.1e}",
                  f"{min(r['load_average']):.1f}-{max(r['load_average']):.1f}"])
  device = jax.devices()[0]
  load = "/".join(f"{v:.1f}" for v in load_before), "/".join(f"{v:.1f}" for v in load_after)
  text = (f"{FLAGS.steps}-step DDPM sampling of {FLAGS.batch} images, classifier-free guidance {FLAGS.cfg_scale} "
          f"(the model runs on {rows[0]['rows']} rows), 32x32x4 latents (256 tokens), float32, on "
          f"{device.platform} ({device.device_kind}, {os.cpu_count()} CPU cores), jax {jax.__version__}. Median "
          f"of {FLAGS.repeats} interleaved runs per path after {FLAGS.warmup} warm-up run(s), every program "
          f"compiled first. Load average (1/5/15 min) {load[0]} "
          f"at the start, {load[1]} at the end. Achieved ratio: the official ratio of what the masks kept "
          f"(the masked path's, equal); executed: padding units and every selected token counted as computed. "
          f"fast vs masked: the largest difference of the samples relative to the largest sample value.\n\n"
          + measure.markdown_table(header, table))
  measure.write_report(text, FLAGS.output, rows=rows, json_output=FLAGS.json)


METRIC_TITLES = {"classifier_accuracy_on_samples": "digits accuracy", "frechet_distance": "Fréchet distance"}


def knob_row(name, config, params, evaluator, **sample_fields):
  """One setting of the knob curve: sample, time, score."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.sample.update(sample_fields)
  num_samples = FLAGS.num_samples or config.evaluation.num_samples
  config.sample.batch_size = min(config.sample.batch_size, num_samples)
  sampler = sample_lib.notebook_sampler(config)
  labels = sample_lib.balanced_labels(num_samples, sampler.model.num_classes)
  generate = lambda labels: sampler.generate(params, labels, cfg_scale=config.sample.cfg_scale,
                                             seed=config.sample.seed)
  if not sampler.fast:  # one jitted program: compiled on a first batch, untimed (the fast path times its own)
    generate(labels[:config.sample.batch_size])
    sampler.routing_stats.clear()
  load = os.getloadavg()[0]
  start = time.perf_counter()
  images = generate(labels)
  wall = time.perf_counter() - start
  summary = sampler.routing_summary()
  overhead = summary.get("compile_seconds", 0.0) + summary.get("calibration_seconds", 0.0)
  row = dict(setting=name, wall_s=wall, sampling_s=wall - overhead, load_average=[load, os.getloadavg()[0]])
  for fields in (sample_fields, summary, evaluation.evaluate_samples(evaluator, images, labels)):
    row.update(fields)
  row.update(num_samples=num_samples, batch_size=config.sample.batch_size)
  print(json.dumps(row), flush=True)
  return row


def run_knob_curve():
  """The compute knob from one checkpoint (see the module docstring)."""
  config, params = checkpoint_lib.load_for_inference(FLAGS.checkpoint)
  evaluator = evaluation.build_evaluator(config)
  rows = []
  for knob in FLAGS.knobs:
    width_cap, token_capacity = (float(v) for v in knob.split(":"))
    rows.append(knob_row(f"fast {knob}", config, params, evaluator, routing="fast", width_cap=width_cap,
                         token_capacity=token_capacity, max_programs=FLAGS.max_programs))
  rows.append(knob_row("masked", config, params, evaluator, routing="masked"))
  pretrain = epath.Path(FLAGS.dense_checkpoint or epath.Path(FLAGS.checkpoint) / "pretrain")
  if pretrain.exists():
    dense_config, dense_params = checkpoint_lib.load_for_inference(pretrain)
    rows.append(knob_row(f"dense ({dense_config.model.name})", dense_config, dense_params, evaluator))
  metric_names = [name for name in ("classifier_accuracy_on_samples", "frechet_distance", "fid") if name in rows[0]]
  header = (["setting (width_cap:token_capacity)", "FLOPs ratio kept (executed)", "wanted tokens cut",
             "sampling s", "compile s", "calibration s", "sampling / dense sampling"]
            + [METRIC_TITLES.get(name, name) for name in metric_names] + ["load avg"])
  dense_s = rows[-1]["sampling_s"] if rows[-1]["setting"].startswith("dense") else float("nan")
  table = []
  for r in rows:
    ratio = (f"{r['flops_ratio']:.3f} ({r['flops_ratio_executed']:.3f})" if "flops_ratio_executed" in r
             else f"{r.get('flops_ratio', 1.0):.3f}")
    table.append([r["setting"], ratio, f"{r.get('token_cut_fraction', 0.0):.2%}", f"{r['sampling_s']:.1f}",
                  f"{r.get('compile_seconds', 0.0):.1f}", f"{r.get('calibration_seconds', 0.0):.1f}",
                  f"{r['sampling_s'] / dense_s:.2f}"] + [f"{r[name]:.4g}" for name in metric_names]
                 + [f"{min(r['load_average']):.1f}-{max(r['load_average']):.1f}"])
  sample = config.sample
  text = (f"Compute knob from one checkpoint: {rows[0]['num_samples']} class-balanced samples per setting, "
          f"{sample.num_steps}-step {sample.sampler.upper()}, guidance {sample.cfg_scale}, batch "
          f"{rows[0]['batch_size']}, seed {sample.seed}; fast path with max_programs={FLAGS.max_programs}, token "
          f"capacities calibrated on the first batch and capped at token_capacity. Sampling s: wall time of "
          f"`Sampler.generate` minus the fast path's compile and calibration (the masked and dense programs "
          f"are compiled on an untimed first batch). jax {jax.__version__}, {os.cpu_count()} CPU cores; "
          f"the 1-minute load average before and after each setting in the last column.\n\n"
          + measure.markdown_table(header, table))
  measure.write_report(text, FLAGS.output, rows=rows, json_output=FLAGS.json)


def main(argv):
  del argv
  if FLAGS.knob_curve:
    if not FLAGS.checkpoint:
      raise app.UsageError("--knob_curve needs --checkpoint=WORKDIR (a trained routed run)")
    run_knob_curve()
  else:
    run_benchmark()


if __name__ == "__main__":
  host_memory.reexec_with_tunables()  # As dyngen.main: malloc with huge pages (dyngen/host_memory.py).
  app.run(main)
