r"""The official PyTorch DiT beside dyngen on the same CPU: training step, forward and DDPM sampling.

  git clone https://github.com/facebookresearch/DiT && git -C DiT checkout ed81ce2
  python -m venv torch-venv && torch-venv/bin/pip install torch torchvision timm numpy
  python -m dyngen.bench.peer --official_dit=DiT --torch_python=torch-venv/bin/python \
      --output=docs/benchmarks/peer_cpu.md --json=peer_cpu.json
  python -m dyngen.bench.peer --quick --only=train_b8,forward     # dyngen's rows alone (no PyTorch)
  python -m dyngen.bench.peer ... --env=GLIBC_TUNABLES=glibc.malloc.hugetlb=1   # one change, both workers

DiT-S/2 (`--variant`) on 32x32x4 latents, fp32, 1000 classes, learned sigma, random weights (shifted by 0.01
off the zero init of adaLN and the final layer, in both, so that every branch computes). Measurements (`--only`):
  train_b8, train_b32  one training step at B=8 / 32: the diffusion loss with learned sigma (MSE + VB, t uniform),
               backward, AdamW (lr 1e-4, no weight decay) and the EMA (0.9999). dyngen: the trainer's jitted,
               donated step (`Run.compiled_train_step()`), each step fed the state the one before returned;
               PyTorch: the step of the official train.py in one process (no DDP wrapper; the batch stands
               for its VAE's latents): model.train(), training_losses, mean, zero_grad, backward, AdamW, the
               EMA parameter by parameter, loss.item().
  forward      the model at B=8, t=500, in eval mode (dyngen: `models.prediction_fn`, jitted; PyTorch: under
               no_grad, as the official sample.py).
  attention, attention_forward   one layer's attention core at B=32 (DiT-S/2: 6 heads of 64, 256 tokens), from
               the fused qkv projection's output to the output projection's input, with the layouts each model
               uses: forward + backward of sum(core(qkv) * w), and the forward alone. dyngen:
               `attention.self_attention` with the config's implementation (on CPU `cpu_fused`) on the
               (B, T, 3, H, Dh) output of the qkv DenseGeneral; PyTorch: what timm's Attention in the official
               block runs there (reshape, permute, F.scaled_dot_product_attention, transpose back), the forward
               under no_grad.
  sample, sample_cfg   50 DDPM steps (`--sample_steps`) at B=8 without guidance and with cfg 1.5 on 3 channels
               (the model at B=16: [z; z], [y; null]). dyngen: the trainer's Sampler (`Run.sampler()`, the
               program `--mode=sample` runs: one lax.scan); PyTorch: create_diffusion("50").p_sample_loop with
               model.forward / model.forward_with_cfg. Warm-up: PyTorch runs the model a few times at the loop's
               batch (a whole loop would double the run); dyngen's program is compiled ahead, no warm-up.

Each measurement runs in fresh processes: the dyngen worker (this module with `--worker=jax`) and the PyTorch
worker (`peer_torch_worker.py` beside this file, run by `--torch_python`; it imports only torch and the
official models.py and diffusion/ from `--official_dit`), alternating round by round with the order flipped
each round, so that slow drifts of the host hit both. A worker reports every timed repeat (wall, process CPU,
kernel CPU and minor page faults from getrusage); a row gives the median over the rounds of each round's
median, and the per-round ratios. dyngen's compile time is reported apart. Both use every core the process may
run on (`--threads` for PyTorch; XLA:CPU's default). dyngen's worker starts as `python -m dyngen.main` does
(`host_memory.reexec_with_tunables()`: glibc malloc with huge pages, unless GLIBC_TUNABLES names the tunable);
PyTorch's gets the driver's environment. Without `--torch_python` the dyngen rows run alone.

Quiet host: first the 1-minute load average must fall to `--max_load` (60 s steps, `--wait_minutes` at most).
Before each worker, the CPU share other processes use is sampled from /proc/stat for 2 s, and the driver waits
(20 s steps, `--gate_minutes` in all) while it exceeds `--max_foreign`; during each worker, other processes'
share (machine busy time minus the worker's CPU time) is counted, the worker rerun (`--retries` times) when it
exceeds `--max_foreign`, and its maximum reported per row.

% of peak: the analytic FLOPs per measurement (`dyngen.throughput`: 2 FLOPs per multiply-add of
`dyngen.models.flops`, 3x the forward for a training step), the same for both frameworks (same model, same
work), over the median seconds and the fp32 peak `--peak_gflops` (default: cores x "cpu MHz" of /proc/cpuinfo x
fp32 FLOP per cycle of the core's widest FMA, see `cpu_peak`). XLA's cost analysis of dyngen's compiled program
(the sampling loop's body, which XLA counts once, times the number of steps) is given beside it; it does not see
inside custom calls, so with the fused CPU attention it leaves out the attention core's products.

The last stdout line is `speedup_train_b32 X speedup_train_b8 Y speedup_sample_cfg Z speedup_forward W`
(PyTorch seconds / dyngen seconds; nan where not measured).
"""
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from dyngen import configs
from dyngen import host_memory
from dyngen import models
from dyngen import sharding
from dyngen import throughput
from dyngen.bench import measure
from dyngen.bench.peer_timing import timed
from dyngen.models import attention
from dyngen.models import flops as model_flops

FLAGS = flags.FLAGS
# The driver.
flags.DEFINE_string("official_dit", "", "A checkout of facebookresearch/DiT at ed81ce2 (its models.py and "
                    "diffusion/); with --torch_python.")
flags.DEFINE_string("torch_python", "", "A python with torch and timm: runs the PyTorch worker. Empty: the dyngen "
                    "rows alone.")
flags.DEFINE_bool("quick", False, "1 round and fewer repeats.")
flags.DEFINE_integer("rounds", 0, "Rounds (0: 3, or 1 with --quick).")
flags.DEFINE_list("only", [], "Measurements to run (default all): train_b8, train_b32, forward, sample, sample_cfg, "
                  "attention, attention_forward.")
flags.DEFINE_multi_string("env", [], "KEY=VALUE added to both workers' environment (repeatable).")
flags.DEFINE_float("max_load", 1.5, "Wait until the 1-minute load average is at most this before starting.")
flags.DEFINE_float("wait_minutes", 20, "At most this long for --max_load.")
flags.DEFINE_float("max_foreign", 0.15, "Share of the cores other processes may use before and during a worker.")
flags.DEFINE_integer("retries", 2, "Reruns of a worker during which other processes used more than --max_foreign.")
flags.DEFINE_float("gate_minutes", 20, "Total waiting for other processes between workers, over the whole run.")
flags.DEFINE_float("peak_gflops", 0, "The chip's fp32 peak in GFLOP/s (0: from /proc/cpuinfo, see cpu_peak).")
flags.DEFINE_integer("threads", 0, "PyTorch's threads (0: the cores this process may run on).")
flags.DEFINE_integer("timeout", 1800, "Seconds per worker process.")
flags.DEFINE_string("output", "", "Also write the markdown report here.")
flags.DEFINE_string("json", "", "Also write the rows (and every worker's result) as JSON here.")
# Both (the driver passes them to its workers).
flags.DEFINE_string("variant", "S/2", "DiT size/patch.")
flags.DEFINE_integer("depth", 0, "Blocks (0: the variant's); for smoke runs.")
flags.DEFINE_integer("batch", 0, "Images per call for every measurement (0: each measurement's own); smoke runs.")
flags.DEFINE_integer("sample_steps", 50, "DDPM steps of the sampling rows.")
flags.DEFINE_float("cfg_scale", 1.5, "Guidance scale of sample_cfg.")
# A worker.
flags.DEFINE_enum("worker", "", ["", "jax"], "Run one dyngen measurement in this process (the driver starts it).")
flags.DEFINE_enum("what", "train", ["train", "forward", "sample", "sample_cfg", "attention", "attention_forward"],
                  "The worker's measurement.")
flags.DEFINE_integer("warmup", 1, "The worker's untimed runs first.")
flags.DEFINE_integer("repeats", 3, "The worker's timed runs.")

TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torch_worker.py")
OFFICIAL_DIT_CLONE = "git clone https://github.com/facebookresearch/DiT && git -C DiT checkout ed81ce2"
RESULT_PREFIX = "RESULT "


@dataclasses.dataclass(frozen=True)
class Case:
  """One row: the workers' --what at `batch`, with (warm-up, repeats) for full and --quick runs."""
  name: str
  what: str
  batch: int
  full: tuple[int, int]
  quick: tuple[int, int]

  def label(self, batch, sample_steps, cfg_scale):
    if self.what == "train":
      return f"train step B={batch} (loss + backward + AdamW + EMA)"
    if self.what == "forward":
      return f"forward B={batch} (eval, t=500)"
    if self.what.startswith("attention"):
      part = "forward" if self.what == "attention_forward" else "forward + backward"
      return f"attention core B={batch}, one layer: {part}"
    guidance = f", cfg {cfg_scale:g} (model at B={2 * batch})" if self.what == "sample_cfg" else ""
    return f"{sample_steps}-step DDPM sampling B={batch}{guidance}"


CASES = (
    Case("train_b8", "train", 8, full=(2, 5), quick=(1, 2)),
    Case("train_b32", "train", 32, full=(1, 4), quick=(1, 2)),
    Case("forward", "forward", 8, full=(3, 10), quick=(2, 4)),
    Case("sample", "sample", 8, full=(2, 2), quick=(2, 1)),
    Case("sample_cfg", "sample_cfg", 8, full=(2, 2), quick=(2, 1)),
    Case("attention", "attention", 32, full=(5, 20), quick=(3, 5)),
    Case("attention_forward", "attention_forward", 32, full=(5, 20), quick=(3, 5)),
)
LAST_LINE = (("speedup_train_b32", "train_b32"), ("speedup_train_b8", "train_b8"),
             ("speedup_sample_cfg", "sample_cfg"), ("speedup_forward", "forward"))


def experiment_config(variant, depth, batch, sample_steps):
  """configs/dit_<size>.py at `variant` for a synthetic batch of latents (no dataset, no VAE is read)."""
  config = configs.get(f"dit_{variant.partition('/')[0].lower()}", variant)
  if depth:
    config.model.depth = depth
  config.batch_size = config.sample.batch_size = batch
  config.sample.num_steps = sample_steps
  config.sample.sampler = "ddpm"
  # The trainer's checks want the latents' folder and their VAE named; with check_dataset=False and no
  # decoding, neither is read.
  config.data.latent_dir = "unused"
  config.latent.vae = "sd-vae-ft-ema"
  return config


def attention_shape(model_config):
  """(tokens, heads, head_dim) of one layer of `model_config`."""
  tokens = (model_config.input_size // model_config.patch_size) ** 2
  return tokens, model_config.num_heads, model_config.hidden_size // model_config.num_heads


def compile_timed(jitted, args, result):
  """jitted lowered and compiled for `args`; its compile seconds, XLA FLOPs and temporaries go into `result`."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  result["compile_s"] = time.perf_counter() - start
  result["flops"] = measure.xla_flops(compiled)
  result["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
  return compiled


def attention_call(config, batch_size, result):
  """The attention rows' timed call: the model's attention core alone, on its qkv projection's output layout."""
  model = models.build(config.model)
  tokens, heads, head_dim = attention_shape(config.model)
  result["attention_implementation"] = attention.resolve_implementation(model.attention, tokens, jnp.float32)
  rng = np.random.default_rng(1)
  qkv = jnp.asarray(rng.standard_normal((batch_size, tokens, 3, heads, head_dim), dtype=np.float32))
  weights = jnp.asarray(rng.standard_normal((batch_size, tokens, heads, head_dim), dtype=np.float32))

  def core(qkv):
    return attention.self_attention(qkv, model.attention, model.attention_chunk_size)

  fn = jax.jit(jax.grad(lambda qkv: jnp.sum(core(qkv) * weights)) if FLAGS.what == "attention" else core)
  compiled = compile_timed(fn, (qkv,), result)
  return lambda: jax.block_until_ready(compiled(qkv))


def jax_worker():
  """Runs FLAGS.what once in this process; prints `RESULT {json}` (times, compile_s, flops, versions)."""
  batch_size = FLAGS.batch or 8
  config = experiment_config(FLAGS.variant, FLAGS.depth, batch_size, FLAGS.sample_steps)
  result = {"framework": "jax", "version": jax.__version__, "what": FLAGS.what, "batch": batch_size,
            "device": jax.devices()[0].device_kind, "host_memory": host_memory.status()}
  if FLAGS.what.startswith("attention"):
    result.update(timed(attention_call(config, batch_size, result), FLAGS.warmup, FLAGS.repeats))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return
  from dyngen.train import trainer  # Here: it loads TensorFlow (clu's writers), which the driver needs not.

  run = trainer.Run(config, check_dataset=False)
  shift = jax.jit(lambda state: state.replace(params=jax.tree.map(lambda p: p + 0.01, state.params),
                                              ema_params=jax.tree.map(lambda p: p + 0.01, state.ema_params)),
                  out_shardings=run.state_shardings, donate_argnums=0)
  with jax.set_mesh(run.mesh):
    state = shift(run.initial_state())
  rng = np.random.default_rng(1)
  size, channels = config.model.input_size, config.model.in_channels
  host_batch = {"image": rng.standard_normal((batch_size, size, size, channels), dtype=np.float32),
                "label": rng.integers(0, config.model.num_classes, (batch_size,), dtype=np.int32)}
  batch = sharding.make_global_batch(host_batch, run.batch_sharding)
  box = {"state": state}

  with run.context():
    if FLAGS.what == "train":
      step = compile_timed(run.compiled_train_step(), (box["state"], batch), result)

      def call():
        box["state"], metrics = jax.block_until_ready(step(box["state"], batch))
        box["loss"] = float(metrics["loss"])
    elif FLAGS.what == "forward":
      apply = lambda params, x, t, y: models.prediction_fn(run.model, params)(x, t, y)
      t = jnp.full((batch_size,), 500, jnp.int32)
      args = (state.params, batch["image"], t, batch["label"])
      forward = compile_timed(jax.jit(apply), args, result)
      call = lambda: jax.block_until_ready(forward(*args))
    else:
      guided = FLAGS.what == "sample_cfg"
      sampler = run.sampler()
      labels = sharding.make_global_batch(host_batch["label"], sampler.batch_sharding)
      args = (state.ema_params, labels, jax.random.PRNGKey(0), jnp.float32(FLAGS.cfg_scale if guided else 1.0))
      # The jitted program Sampler.sample_batch calls (what --mode=sample runs), lowered here so that its
      # compile is timed apart.
      loop = compile_timed(sampler._compiled_fn(guided), args, result)  # pylint: disable=protected-access
      # XLA counts a loop's body once: its count of the program is one step's (the work around the loop, the
      # starting noise, is tiny), and the measurement's is that times the steps.
      result["flops_per_step"] = result["flops"]
      if result["flops"] is not None:
        result["flops"] *= FLAGS.sample_steps

      def call():
        box["images"] = np.asarray(loop(*args)[0])
    # A sampling loop's warm-up would double the run; its program is compiled ahead (see the docstring).
    warmup = 0 if FLAGS.what.startswith("sample") else FLAGS.warmup
    result.update(timed(call, warmup, FLAGS.repeats))
  if FLAGS.what == "train" and not np.isfinite(box["loss"]):
    raise FloatingPointError(f"non-finite loss {box['loss']}")
  if FLAGS.what.startswith("sample") and not np.isfinite(box["images"]).all():
    raise FloatingPointError("non-finite samples")
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The driver.

def check_official_dit(path):
  """Stops with what to do unless `path` holds the official DiT's models.py and diffusion/ package."""
  missing = [name for name in ("models.py", os.path.join("diffusion", "__init__.py"))
             if not os.path.isfile(os.path.join(path, name))]
  if missing:
    raise app.UsageError(f"--official_dit={path!r} has no {' and no '.join(missing)}: it must be a checkout of "
                         f"facebookresearch/DiT at ed81ce2 ({OFFICIAL_DIT_CLONE}).")


def cpu_peak(cpuinfo=None, cores=None):
  """(fp32 peak GFLOP/s, how it was computed) of `cores` (default: those this process may run on) of the CPU
  that `cpuinfo` (default: /proc/cpuinfo's text) describes.

  FLOP per cycle per core: two FMA units of the widest vector the core has (2 x lanes x 2 FLOPs): 64 for
  Intel AVX-512 (AMD's Zen 4 runs AVX-512 on 256-bit units: 32), 32 for AVX2 + FMA, 8 otherwise. The clock
  is the first core's "cpu MHz" (what the kernel reports; turbo is not counted).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  info = {}
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    info.setdefault(key.strip(), value.strip())  # The first core's (the cores of a VM are alike).
  cores = cores or len(os.sched_getaffinity(0))
  model, cpu_flags = info.get("model name", platform.processor() or "unknown CPU"), info.get("flags", "").split()
  mhz = float(info.get("cpu MHz", "nan"))
  if "avx512f" in cpu_flags and info.get("vendor_id") != "AuthenticAMD":
    per_cycle, why = 64, "AVX-512, 2 FMA units"
  elif "avx2" in cpu_flags and "fma" in cpu_flags:
    per_cycle, why = 32, "AVX2, 2 FMA units of 256 bits"
  else:
    per_cycle, why = 8, "no AVX2/FMA"
  gflops = cores * mhz / 1e3 * per_cycle
  return gflops, f"{model}: {cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({why})"


def analytic_flops(case, batch, variant, depth, sample_steps):
  """FLOPs of one measurement from `dyngen.models.flops` (matmuls only, 2 per multiply-add)."""
  model_config = experiment_config(variant, depth, batch, sample_steps).model
  if case.what == "train":
    return throughput.training_flops_per_image(model_config) * batch
  if case.what.startswith("attention"):  # q kᵀ and p v, 2 FLOPs per multiply-add; the backward's 4 products.
    tokens, heads, head_dim = attention_shape(model_config)
    core = 2 * 2 * batch * heads * tokens * tokens * head_dim
    return core if case.what == "attention_forward" else 3 * core
  forward = 2 * sum(model_flops.count_flops(model_config).values())  # Per image: 2 FLOPs per multiply-add.
  if case.what == "forward":
    return forward * batch
  return forward * batch * (2 if case.what == "sample_cfg" else 1) * sample_steps


def busy_seconds():
  """CPU seconds all cores of the machine have been busy (/proc/stat), or None where it is absent."""
  try:
    with open("/proc/stat") as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except OSError:
    return None
  user, nice, system, _, _, irq, softirq = (fields + [0] * 7)[:7]
  return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def foreign_share(seconds=2.0):
  """Share of the machine's cores busy over the next `seconds`, while this driver sleeps."""
  before = busy_seconds()
  time.sleep(seconds)
  after = busy_seconds()
  return 0.0 if before is None else (after - before) / (seconds * (os.cpu_count() or 1))


def load_average():
  return "/".join(f"{x:.2f}" for x in os.getloadavg())


class QuietHost:
  """The waits of the module docstring; counts the minutes spent."""

  def __init__(self, max_load, wait_minutes, max_foreign, gate_minutes):
    self.max_load, self.wait_minutes = max_load, wait_minutes
    self.max_foreign, self.gate_s = max_foreign, 60 * gate_minutes
    self.load_wait_s = self.gate_wait_s = 0.0

  def wait_for_load(self):
    while os.getloadavg()[0] > self.max_load and self.load_wait_s < 60 * self.wait_minutes:
      print(f"# load average {load_average()} > {self.max_load}: waiting 60 s", flush=True)
      time.sleep(60)
      self.load_wait_s += 60

  def wait_for_others(self):
    share = foreign_share()
    while share > self.max_foreign and self.gate_wait_s < self.gate_s:
      print(f"# other processes use {100 * share:.0f}% of the cores: waiting 20 s", flush=True)
      time.sleep(20)
      self.gate_wait_s += 22
      share = foreign_share()


def worker_command(framework, case, warmup, repeats, settings):
  common = [f"--what={case.what}", f"--batch={settings['batch'] or case.batch}", f"--warmup={warmup}",
            f"--repeats={repeats}", f"--sample_steps={settings['sample_steps']}",
            f"--cfg_scale={settings['cfg_scale']}"]
  if framework == "jax":
    return [sys.executable, "-m", "dyngen.bench.peer", "--worker=jax", f"--variant={settings['variant']}",
            f"--depth={settings['depth']}"] + common
  shape = models.variant(settings["variant"])
  return [settings["torch_python"], TORCH_WORKER, f"--official_dit={os.path.abspath(settings['official_dit'])}",
          f"--threads={settings['threads']}", f"--hidden_size={shape['hidden_size']}",
          f"--num_heads={shape['num_heads']}", f"--patch_size={shape['patch_size']}",
          f"--depth={settings['depth'] or shape['depth']}"] + common


def run_worker(framework, case, warmup, repeats, settings, timeout):
  """One fresh worker process; its RESULT with the foreign CPU share other processes took meanwhile."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # No fake device count from a test shell.
  if framework == "torch":
    env.pop("PYTHONPATH", None)  # The torch python's own packages only.
    env.update(OMP_NUM_THREADS=str(settings["threads"]), MKL_NUM_THREADS=str(settings["threads"]))
  else:
    env["JAX_PLATFORMS"] = "cpu"
  env.update(settings["env"])
  command = worker_command(framework, case, warmup, repeats, settings)
  busy_before, own_before = busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
  wall = time.perf_counter() - start
  busy_after, own_after = busy_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
  lines = [line for line in process.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if process.returncode or not lines:
    tail = "\n".join((process.stdout + process.stderr).splitlines()[-30:])
    raise RuntimeError(f"the {framework} worker failed (exit {process.returncode}): {' '.join(command)}\n{tail}")
  result = json.loads(lines[-1][len(RESULT_PREFIX):])
  own = sum(getattr(own_after, f) - getattr(own_before, f) for f in ("ru_utime", "ru_stime"))
  foreign = 0.0 if busy_before is None else max(0.0, busy_after - busy_before - own)
  result.update(name=case.name, process_wall_s=wall, foreign_share=foreign / (wall * (os.cpu_count() or 1)))
  return result


def median(values):
  return statistics.median(values) if values else float("nan")


def fmt(x, digits=2, scale=1.0, unit=""):
  """x * scale to `digits` decimals and `unit`; "–" for None or nan (a framework not run)."""
  return "–" if x is None or x != x else f"{x * scale:.{digits}f}{unit}"


def summarise(case, label, results, peak_flops, analytic):
  """One row from the workers' results of `case` (both frameworks, all rounds, in run order)."""
  per = {fw: [r for r in results if r["name"] == case.name and r["framework"] == fw] for fw in ("torch", "jax")}
  round_median = lambda fw, key: [median(r[key]) for r in per[fw]]
  seconds = {fw: median(round_median(fw, "wall_s")) for fw in per}
  flops = next((r.get("flops") for r in per["jax"] if r.get("flops")), None)
  row = {"name": case.name, "label": label, "torch_s": seconds["torch"], "jax_s": seconds["jax"],
         "speedup": seconds["torch"] / seconds["jax"],
         "round_ratios": [t / j for t, j in zip(round_median("torch", "wall_s"), round_median("jax", "wall_s"))],
         "flops_xla": flops, "flops_analytic": analytic,
         "jax_compile_s": median([r["compile_s"] for r in per["jax"]]),
         "foreign_share_max": max([r["foreign_share"] for r in per["torch"] + per["jax"]], default=float("nan"))}
  for fw in per:  # The analytic count: XLA's leaves out the work inside custom calls (the fused CPU attention).
    row[f"{fw}_peak_fraction"] = analytic / seconds[fw] / peak_flops
    for key in ("cpu_s", "sys_s", "minor_faults"):
      row[f"{fw}_{key}"] = median(round_median(fw, key))
  return row


def table(rows):
  header = ["measurement", "GFLOP (XLA / analytic)", "PyTorch s", "dyngen s", "speedup", "per-round ratios",
            "% of peak PyTorch / dyngen", "CPU s PyTorch / dyngen", "kernel s, page faults PyTorch / dyngen",
            "dyngen compile s", "foreign CPU % max"]
  lines = []
  for row in rows:
    both = lambda key, **kw: f"{fmt(row['torch_' + key], **kw)} / {fmt(row['jax_' + key], **kw)}"
    kernel = lambda fw: f"{fmt(row[fw + '_sys_s'])}, {fmt(row[fw + '_minor_faults'], 0, 1e-3, 'k')}"
    lines.append([
        row["label"], f"{fmt(row['flops_xla'], 1, 1e-9)} / {fmt(row['flops_analytic'], 1, 1e-9)}",
        fmt(row["torch_s"], 3), fmt(row["jax_s"], 3),
        "–" if row["speedup"] != row["speedup"] else f"**{row['speedup']:.2f}×**",
        ", ".join(f"{x:.2f}" for x in row["round_ratios"]) or "–",
        both("peak_fraction", digits=0, scale=100, unit="%"), both("cpu_s"), f"{kernel('torch')} / {kernel('jax')}",
        fmt(row["jax_compile_s"], 1), fmt(row["foreign_share_max"], 0, 100)])
  return measure.markdown_table(header, lines)


def last_line(rows):
  speedups = {row["name"]: row["speedup"] for row in rows}
  return " ".join(f"{key} {speedups.get(name, float('nan')):.3f}" for key, name in LAST_LINE)


SETUP = f"""The PyTorch side needs the official code and a python with torch and timm (timm imports torchvision,
which must be the build of the same index as torch: `pip install torch torchvision timm` from PyPI, or both
from PyTorch's CPU index):

    {OFFICIAL_DIT_CLONE}
    python -m venv torch-venv && torch-venv/bin/pip install torch torchvision timm numpy
    python -m dyngen.bench.peer --official_dit=DiT --torch_python=torch-venv/bin/python \\
        --output=docs/benchmarks/peer_cpu.md --json=peer_cpu.json

`--env=KEY=VALUE` (repeatable) adds to both workers' environment, to measure one change at a time (e.g.
`--env=GLIBC_TUNABLES=glibc.malloc.hugetlb=1`); `--quick` runs 1 round with fewer repeats; `--only=train_b8,forward`
picks rows. What each row runs: `python -m dyngen.bench.peer --help` and the module's docstring."""


def report(rows, context):
  """The markdown report: what ran where, under which load, the table, how to rerun."""
  versions = context["versions"]
  torch_part = (f"PyTorch {versions.get('torch', '?')} ({context['threads']} threads, the official code at "
                "ed81ce2)" if context["torch"] else "PyTorch not run (no `--torch_python`: dyngen's rows alone)")
  foreign = max((row["foreign_share_max"] for row in rows), default=0.0)
  quiet = foreign <= context["max_foreign"] and float(context["load_start"].split("/")[0]) <= context["max_load"]
  warning = [] if quiet else [
      f"**Not a quiet host** (load average {context['load_start']} at the start; other processes took up to "
      f"{100 * foreign:.0f}% of the cores during a worker): these figures are indicative only. OpenMP (PyTorch) "
      "loses much more than XLA's thread pool when a neighbour takes a core, so a busy host flatters dyngen.", ""]
  return "\n".join([
      "# dyngen beside the official PyTorch DiT on CPU", "",
      f"Produced by `{context['command']}`: {context['model']}, 32x32x4 latents, fp32, random weights; "
      f"{torch_part}; dyngen on jax {versions.get('jax', '?')} (XLA:CPU). {context['rounds']} round(s)"
      f"{' (--quick)' if context['quick'] else ''}, each measurement in fresh processes, the frameworks "
      "alternating with the order flipped each round; seconds are medians of per-round medians, dyngen's compile "
      f"apart. Extra environment of both workers: {' '.join(context['env']) or 'none'}. Host memory (dyngen's "
      "worker starts as `python -m dyngen.main` does, dyngen/host_memory.py): dyngen's worker: "
      f"{context['host_memory'].get('jax', '?')}" + (
          f"; PyTorch's: GLIBC_TUNABLES={context['host_memory'].get('torch') or '(unset)'}" if context["torch"]
          else "") + ".", "",
      f"Machine: {context['peak_text']} = {context['peak_gflops']:.0f} GFLOP/s fp32 peak"
      f"{' (--peak_gflops)' if context['peak_given'] else ''}. Load average (1/5/15 min) {context['load_start']} "
      f"at the start, {context['load_end']} at the end; waited {context['load_wait_min']:.0f} min for the load "
      f"average and {context['gate_wait_min']:.1f} min for other processes between workers. Foreign CPU: the "
      "largest share of the cores other processes took during one of the row's workers (a worker during which "
      f"they took more than {100 * context['max_foreign']:.0f}% is rerun, up to --retries={context['retries']} "
      "times). Run time "
      f"{context['minutes']:.1f} min.", "",
      *warning,
      "GFLOP: one measurement's, from XLA's cost analysis of dyngen's compiled program (the sampling loop: its "
      "body's count times the steps; XLA does not see inside custom calls, so it leaves out the fused CPU "
      "attention's products, and gives none for the attention rows) and from the analytic count "
      "(`dyngen.throughput`: matmuls, 2 FLOPs per multiply-add, a training step 3x the forward; the attention "
      "rows: the core's two products, 3x for forward + backward). % of peak: the analytic count over the median "
      "seconds and the peak, for both columns (same model, same work). Speedup: PyTorch s / dyngen s (> 1: "
      "dyngen is faster).",
      "", table(rows), "", "## Rerun", "", SETUP])


def settings_from_flags():
  if bool(FLAGS.torch_python) != bool(FLAGS.official_dit):
    raise app.UsageError("--torch_python and --official_dit go together: the PyTorch worker runs the official "
                         f"code ({OFFICIAL_DIT_CLONE}) with a python that has torch and timm.")
  if FLAGS.official_dit:
    check_official_dit(FLAGS.official_dit)
  unknown = sorted(set(FLAGS.only) - {case.name for case in CASES})
  if unknown:
    raise app.UsageError(f"--only names unknown measurements {unknown}; known: {[case.name for case in CASES]}")
  env = {}
  for item in FLAGS.env:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--env={item!r} must be KEY=VALUE, e.g. GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
    env[key] = value
  return dict(variant=FLAGS.variant, depth=FLAGS.depth, batch=FLAGS.batch, sample_steps=FLAGS.sample_steps,
              cfg_scale=FLAGS.cfg_scale, torch_python=FLAGS.torch_python, official_dit=FLAGS.official_dit,
              threads=FLAGS.threads or len(os.sched_getaffinity(0)), env=env)


def shown_command(argv):
  """The command line (sys.argv) for the report, without this machine's paths (docs name no local path)."""
  placeholders = {"--official_dit": "DiT", "--torch_python": "torch-venv/bin/python"}
  shown = []
  for arg in argv[1:]:
    name, sep, value = arg.partition("=")
    if sep and name in placeholders:
      value = placeholders[name]
    elif sep and os.path.isabs(value):
      value = os.path.basename(value)
    shown.append(f"{name}{sep}{value}")
  return " ".join(["python -m dyngen.bench.peer"] + shown)


def run_driver():
  settings = settings_from_flags()
  cases = [case for case in CASES if not FLAGS.only or case.name in FLAGS.only]
  rounds = FLAGS.rounds or (1 if FLAGS.quick else 3)
  frameworks = ("torch", "jax") if settings["torch_python"] else ("jax",)
  peak_gflops, peak_text = cpu_peak()
  peak_gflops = FLAGS.peak_gflops or peak_gflops
  host = QuietHost(FLAGS.max_load, FLAGS.wait_minutes, FLAGS.max_foreign, FLAGS.gate_minutes)
  print(f"# start: load average {load_average()}", flush=True)
  host.wait_for_load()
  load_start, start = load_average(), time.time()
  results = []
  for case in cases:
    warmup, repeats = case.quick if FLAGS.quick else case.full
    for round_index in range(rounds):
      for framework in frameworks if round_index % 2 == 0 else frameworks[::-1]:
        for attempt in range(FLAGS.retries + 1):
          host.wait_for_others()
          result = run_worker(framework, case, warmup, repeats, settings, FLAGS.timeout)
          if result["foreign_share"] <= FLAGS.max_foreign or attempt == FLAGS.retries:
            break
          print(f"# {case.name} {framework}: other processes took {100 * result['foreign_share']:.0f}% of the "
                "cores meanwhile; again", flush=True)
        result.update(round=round_index, attempts=attempt + 1, load=load_average())
        results.append(result)
        print(f"# {case.name} round {round_index} {framework}: median {median(result['wall_s']):.3f} s of "
              f"{', '.join(f'{w:.3f}' for w in result['wall_s'])}; CPU {median(result['cpu_s']):.2f} s, kernel "
              f"{median(result['sys_s']):.2f} s, {median(result['minor_faults']) / 1e3:.0f}k faults; compile "
              f"{result.get('compile_s', 0):.1f} s; foreign {100 * result['foreign_share']:.0f}%; load "
              f"{result['load']}", flush=True)
  rows = []
  for case in cases:
    batch = settings["batch"] or case.batch
    label = case.label(batch, settings["sample_steps"], settings["cfg_scale"])
    analytic = analytic_flops(case, batch, settings["variant"], settings["depth"], settings["sample_steps"])
    rows.append(summarise(case, label, results, peak_gflops * 1e9, analytic))
  versions = {r["framework"]: r["version"] for r in results}
  memory = {r["framework"]: r.get("host_memory", r.get("glibc_tunables")) for r in results}
  depth = f", depth {settings['depth']}" if settings["depth"] else ""
  context = dict(
      command=shown_command(sys.argv), model=f"DiT-{settings['variant']}{depth}",
      torch=bool(settings["torch_python"]), versions=versions, threads=settings["threads"],
      env=[f"{k}={v}" for k, v in settings["env"].items()], rounds=rounds, quick=FLAGS.quick,
      peak_text=peak_text, peak_gflops=peak_gflops, peak_given=bool(FLAGS.peak_gflops),
      load_start=load_start, load_end=load_average(), load_wait_min=host.load_wait_s / 60,
      gate_wait_min=host.gate_wait_s / 60, max_foreign=FLAGS.max_foreign, max_load=FLAGS.max_load,
      retries=FLAGS.retries, host_memory=memory, minutes=(time.time() - start) / 60)
  measure.write_report(report(rows, context), FLAGS.output, rows={"rows": rows, "context": context,
                                                                   "results": results}, json_output=FLAGS.json)
  print(last_line(rows))


def main(argv):
  del argv
  if FLAGS.worker == "jax":
    host_memory.reexec_with_tunables()  # As dyngen.main does first: dyngen as its users run it.
    jax_worker()
  else:
    run_driver()


if __name__ == "__main__":
  app.run(main)
