"""The training loop, top to bottom: config -> mesh -> abstract state -> shardings -> init or resume -> steps.

  checks      every config field, the mesh against the devices, the batch against the mesh
  mesh        `config.mesh`, with `config.sharding.logical_axis_rules` for parameters and activations
  state       shapes from `jax.eval_shape(initial_state)`, shardings from the params' logical names,
              arrays from `jax.jit(init, out_shardings=...)` or from the newest readable checkpoint
  step        one jitted `train_step` with the state donated
  loop        clu periodic actions (progress with steps/s and ETA, profiling), metrics every
              `log_every_steps`, async Orbax checkpoints (state + data position + config), sample grids,
              sample-quality evaluation

A non-finite loss stops the run with `NonFiniteLossError`; metrics are checked before every checkpoint,
so only states that passed the check are saved and the last good checkpoint is left as it was.
"""
import contextlib
import functools
import json
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
from etils import epath
from flax import traverse_util

from dyngen import checkpoint
from dyngen import data as data_lib
from dyngen import diffusion as diffusion_lib
from dyngen import models
from dyngen import progress as progress_lib
from dyngen import sharding
from dyngen import throughput
from dyngen.train import config_checks
from dyngen.train import evaluation
from dyngen.train import objectives
from dyngen.train import sample as sample_lib
from dyngen.train import state as state_lib
from dyngen.train import step as step_lib
from dyngen.train import warm_start

SAMPLES_SUBDIR = "samples"


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN or Inf; the run stopped without saving the bad state."""


def training_diffusion(config):
  """The diffusion process of `config.diffusion` with all steps (no respacing), as DiT trains."""
  return diffusion_lib.create_diffusion(timestep_respacing="", learn_sigma=config.model.learn_sigma,
                                        **config.diffusion.to_dict())


def training_process(config):
  """What `config.objective` trains: the diffusion (`training_diffusion`) or SiT's transport of
  config.transport ("flow")."""
  if config.objective == "flow":
    return diffusion_lib.transport_from_config(config.transport)
  return training_diffusion(config)


class Run:
  """What `train_and_evaluate` and `sample` set up from a config: model, mesh, shardings, abstract state."""

  def __init__(self, config: ml_collections.ConfigDict, *, check_dataset: bool = True,
               devices: Sequence[jax.Device] | None = None):
    devices = list(jax.devices() if devices is None else devices)
    config_checks.check_config(config, num_devices=len(devices), process_count=jax.process_count())
    self.config = config
    if check_dataset:  # Sampling needs no data (and ImageNet need not be on the sampling machine).
      if config.data.name == data_lib.LATENTS and not config.data.latent_dir:
        raise ValueError(config_checks.imagenet_latents_message(config))
      config_checks.check_dataset(config, data_lib.dataset_info(config.data))
    self.model = models.build(config.model)
    self.mesh = sharding.create_mesh(config.mesh, devices)
    self.rules = sharding.rules_as_tuples(config.sharding.logical_axis_rules)
    self.optimizer = state_lib.create_optimizer(config.optimizer)
    self.learning_rate_fn = state_lib.learning_rate_schedule(config.optimizer)
    self.seed_key = jax.random.PRNGKey(config.seed)
    self._init_fn = functools.partial(state_lib.initial_state, model=self.model, optimizer=self.optimizer)
    # Init is traced without the logical rules in scope: its outputs are placed by `out_shardings`, and
    # flax would otherwise also constrain each freshly initialised parameter by its names.
    abstract_boxed = jax.eval_shape(self._init_fn, self.seed_key)
    self.state_shardings = sharding.logical_shardings(abstract_boxed, self.mesh, self.rules)
    self.abstract_state = nn.unbox(abstract_boxed)
    # Impossible shapes (a width the fsdp axis does not divide, ...) stop here, before any compute.
    sharding.check_divisible(self.abstract_state, self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.evaluator = None  # Built on the first evaluation (it loads networks and reference statistics).

  @contextlib.contextmanager
  def context(self):
    """Mesh and logical rules in scope, for tracing the model's activation constraints."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def abstract_state_with_shardings(self):
    return jax.tree.map(lambda array, sharding_: jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=sharding_),
                        self.abstract_state, self.state_shardings)

  def initial_state(self) -> state_lib.TrainState:
    with jax.set_mesh(self.mesh):
      init = jax.jit(lambda key: nn.unbox(self._init_fn(key)), out_shardings=self.state_shardings)
      return init(self.seed_key)

  def warm_started(self, state: state_lib.TrainState) -> state_lib.TrainState:
    """`state` with params and EMA from `config.init_from` (fresh where the model adds modules)."""
    params, report = warm_start.load_init_params(self.config.init_from, self.model, state.params)
    logging.info("%s.", report.summary())
    if report.initialised:
      logging.info("Initialised fresh: %s", ", ".join(report.initialised))
    params = jax.device_put(params, self.state_shardings.params)
    # The EMA starts at the loaded weights, in buffers of its own (the step donates both trees).
    ema_params = jax.tree.map(lambda x: x.copy(), jax.device_put(params, self.state_shardings.ema_params))
    return state.replace(params=params, ema_params=ema_params)

  def compiled_train_step(self):
    objective = objectives.create_objective(self.config, self.model, training_process(self.config))
    step_fn = functools.partial(step_lib.train_step, objective=objective,
                                optimizer=self.optimizer, learning_rate_fn=self.learning_rate_fn,
                                ema_decay=self.config.ema.decay, ema_warmup=self.config.ema.warmup)
    return jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, None), donate_argnums=0)

  def sampler(self) -> sample_lib.Sampler:
    return sample_lib.Sampler(self.model, self.config.diffusion, self.config.sample, mesh=self.mesh,
                              transport_config=sample_lib.flow_transport_config(self.config),
                              rules=self.rules, param_shardings=self.state_shardings.ema_params,
                              decode=self.decode_latents if self.config.latent.vae else None)

  @functools.cached_property
  def vae(self):
    """The SD-VAE of `config.latent.vae` (loaded on first use)."""
    from dyngen import latent  # Local import: pixel-space runs never load the VAE code.
    logging.info("Loading the VAE from %s.", self.config.latent.vae)
    return latent.load_autoencoder(self.config.latent.vae)

  def decode_latents(self, z) -> np.ndarray:
    """Sampled latents (N, h, w, 4) in model space -> images (N, H, W, 3) in [-1, 1]."""
    return np.asarray(self.vae.decode(np.asarray(z) / self.config.latent.scale_factor))

  @functools.cached_property
  def prepare_batch(self):
    """(rng, step, host batch) -> the train step's global {"image", "label"} in model space.

    Pixel space: the batch as it is. Extracted latents ({"mean", "std", "label"}): the posterior sample
    scale · (mean + std · ε), drawn with the step's "latent" key (DiT draws a new one each time an image
    is seen). Images with `config.latent.vae`: encoded on the fly, the posterior sampled with that key.
    """
    scale = self.config.latent.scale_factor
    if self.config.data.name == data_lib.LATENTS:
      def prepare(rng, step, batch, vae_params=None):
        return data_lib.latents.training_batch(batch, objectives.step_keys(rng, step)["latent"], scale)
    elif self.config.latent.vae:
      def prepare(rng, step, batch, vae_params=None):
        key = objectives.step_keys(rng, step)["latent"]
        return {"image": self.vae.encode_scaled_fn(vae_params, batch["image"], key), "label": batch["label"]}
    else:
      return lambda rng, step, batch: sharding.make_global_batch(batch, self.batch_sharding)
    prepare = jax.jit(prepare, out_shardings=self.batch_sharding)
    vae_params = self.vae.params if self.config.latent.vae and self.config.data.name != data_lib.LATENTS else None

    def prepare_global(rng, step, batch):
      return prepare(rng, step, sharding.make_global_batch(batch, self.batch_sharding), vae_params)

    return prepare_global


def check_finite(metrics_per_step: Sequence[dict], first_step: int, workdir, last_saved_step) -> None:
  """Raises NonFiniteLossError naming the first step whose loss or gradient norm is NaN/Inf.

  Args:
    metrics_per_step: host metrics of consecutive steps; entry i belongs to step `first_step + i`
      (the step count after the update).
  """
  for offset, metrics in enumerate(metrics_per_step):
    bad = {name: float(metrics[name]) for name in ("loss", "grad_norm") if not np.isfinite(metrics[name])}
    if bad:
      step = first_step + offset
      kept = (f"The last good checkpoint (step {last_saved_step}) in {workdir}/{checkpoint.CHECKPOINT_SUBDIR} "
              "is intact; rerunning resumes from it." if last_saved_step is not None else
              "No checkpoint had been saved yet.")
      raise NonFiniteLossError(
          f"non-finite training values at step {step}: {bad}. Nothing from step {step} on was saved. {kept} "
          "Usual remedies: a lower config.optimizer.learning_rate, a warm-up (config.optimizer.warmup_steps), "
          "gradient clipping (config.optimizer.grad_clip_norm), or float32 compute (config.model.dtype).")


def _mean_metrics(metrics_per_step: Sequence[dict]) -> dict[str, float]:
  return {name: float(np.mean([m[name] for m in metrics_per_step])) for name in metrics_per_step[0]}


def write_sample_grid(run: Run, sampler: sample_lib.Sampler, params, step: int, writer, workdir,
                      name: str = "grid") -> str:
  """Samples `sample.grid_size` images (classes in turn) at `sample.grid_cfg_scale`; TensorBoard + PNG
  (`samples/<name>_step_<step>.png`)."""
  config = run.config.sample
  labels = sample_lib.balanced_labels(config.grid_size, run.model.num_classes)
  # The grid batch is the smallest multiple of the data-parallel size that holds the grid.
  ways = sharding.batch_parallel_size(run.mesh, run.rules)
  batch_size = -(-config.grid_size // ways) * ways
  images = sampler.generate(params, labels, cfg_scale=config.grid_cfg_scale, seed=config.seed,
                            batch_size=batch_size)
  grid = sample_lib.image_grid(images, columns=min(run.model.num_classes, config.grid_size))
  writer.write_images(step, {"samples" if name == "grid" else f"samples_{name}": grid[None]})
  path = epath.Path(workdir) / SAMPLES_SUBDIR / f"{name}_step_{step}.png"
  if jax.process_index() == 0:
    sample_lib.write_png(path, grid, upscale=max(1, 128 // run.model.input_size))
  return str(path)


def width_picture(model, params, timesteps) -> np.ndarray:
  """uint8 picture of a routed model's widths: bands of rows are layers (head fractions on top, MLP-group
  fractions below, a white separator), columns the sampling steps in run order (`timesteps`, the model's t
  at each step: from T-1 to 0 for the diffusion, from 0 = noise up for flow matching); white = full."""
  from dyngen.models import dydit  # Local import: only routed families have widths.
  timesteps = np.asarray(timesteps)
  masks = jax.device_get(dydit.width_masks(model, params, jnp.asarray(timesteps)))
  head, mlp = (masks[name].mean(-1).T for name in ("head_mask", "mlp_mask"))  # (L, S) fractions
  gray = np.concatenate([head, np.ones((1, head.shape[1])), mlp], axis=0)
  # Each layer a band of 8 rows, each step at least 4 columns wide, so that a small model is visible.
  gray = np.repeat(np.repeat(gray, 8, axis=0), max(1, 512 // gray.shape[1]), axis=1)
  return np.repeat((255 * gray).astype(np.uint8)[..., None], 3, axis=-1)


def write_width_picture(run: Run, sampler: sample_lib.Sampler, params, step: int, writer, workdir) -> str:
  picture = width_picture(run.model, params, sampler.sampling_times())
  writer.write_images(step, {"widths": picture[None]})
  path = epath.Path(workdir) / SAMPLES_SUBDIR / f"widths_step_{step}.png"
  if jax.process_index() == 0:
    sample_lib.write_png(path, picture)
  return str(path)


PRETRAIN_SUBDIR = "pretrain"
SUMMARY_FILE = "summary.json"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir):
  """Trains `config` in `workdir`, resuming from its newest checkpoint, and evaluates at the end.

  On a preemption notice (Cloud TPU maintenance, SIGTERM to a multi-host job with the JAX preemption
  service) it saves a checkpoint at the current step and returns; rerunning the command resumes.

  Args:
    config: a run config (see configs/common.py).
    workdir: where checkpoints, TensorBoard summaries, sample grids and evaluation results go.

  Returns:
    The final TrainState.

  Raises:
    ValueError: a bad config (before any compute).
    NonFiniteLossError: the loss became NaN/Inf.
  """
  workdir = epath.Path(workdir)
  if "pretrain" in config and not config.init_from:
    # Train the warm start first (config.pretrain, a whole run config) in its own subdirectory.
    Run(config.pretrain)  # Both configs are checked before any compute.
    Run(config)
    pretrain_dir = workdir / PRETRAIN_SUBDIR
    logging.info("config.init_from is empty: training the warm start (config.pretrain) in %s first.", pretrain_dir)
    train_and_evaluate(config.pretrain, pretrain_dir)
    config = ml_collections.ConfigDict(config.to_dict())
    config.init_from = str(pretrain_dir)
    state = train_and_evaluate(config, workdir)
    write_summary(workdir, pretrain_dir)
    return state
  run = Run(config)
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  # Metrics go to TensorBoard only (the chief's); the console gets the progress line and the final report.
  writer = metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(workdir))] if is_chief else [])
  train_iter = data_lib.create_input_pipeline(config.data, global_batch_size=config.batch_size, seed=config.seed)
  manager = checkpoint.create_manager(workdir / checkpoint.CHECKPOINT_SUBDIR, max_to_keep=config.keep_checkpoints)
  try:
    state = _train_loop(run, workdir, writer, train_iter, manager)
  finally:
    # An async save of the last good step may still be running: let it finish before leaving.
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    writer.close()
  logging.info("%s", final_report(workdir))
  return state


CONFIG_FILE = "config.json"
PARAMETERS_FILE = "parameters.txt"


def final_report(workdir) -> str:
  """The run's last evaluation figures and the files it wrote, as a short table for the console."""
  workdir = epath.Path(workdir)
  samples = workdir / SAMPLES_SUBDIR
  step_of = lambda path: int(path.stem.rsplit("_", 1)[-1])
  lines = [f"Run finished in {workdir}."]
  evaluations = sorted(samples.glob("eval_step_*.json"), key=step_of)
  if evaluations:
    results = json.loads(evaluations[-1].read_text())
    lines.append(f"Evaluation at step {step_of(evaluations[-1])}:")
    lines += [f"  {name:34s} {value:.4g}" for name, value in sorted(results.items())]
  files = []
  last_step = checkpoint.latest_step(workdir / checkpoint.CHECKPOINT_SUBDIR)
  if last_step is not None:
    files.append((f"{checkpoint.CHECKPOINT_SUBDIR}/{last_step}/", "the last checkpoint (the same command resumes)"))
  files += [(CONFIG_FILE, "the config of this run"), (PARAMETERS_FILE, "every parameter's shape and size")]
  grids = sorted(samples.glob("grid_step_*.png"), key=step_of)
  if grids:
    files.append((f"{SAMPLES_SUBDIR}/{grids[-1].name}", f"the last sample grid ({len(grids)} in {SAMPLES_SUBDIR}/)"))
  if evaluations:
    stem = evaluations[-1].stem
    files += [(f"{SAMPLES_SUBDIR}/{stem}.json", "the figures above"),
              (f"{SAMPLES_SUBDIR}/{stem}.npz", "the evaluated samples (arr_0 uint8 NHWC images, arr_1 labels)"),
              (f"{SAMPLES_SUBDIR}/{stem}.png", "the first 100 of them")]
  files = [(name, what) for name, what in files if (workdir / name).exists()]
  width = max([len(name) for name, _ in files], default=0)
  lines.append("Files:")
  lines += [f"  {name:{width}s}  {what}" for name, what in files]
  lines.append(f"  TensorBoard: tensorboard --logdir={workdir}")
  return "\n".join(lines)


def _last_evaluation(workdir) -> dict:
  results = sorted((epath.Path(workdir) / SAMPLES_SUBDIR).glob("eval_step_*.json"),
                   key=lambda path: int(path.stem.rsplit("_", 1)[-1]))
  return json.loads(results[-1].read_text()) if results else {}


def write_summary(workdir, pretrain_dir) -> dict:
  """workdir/summary.json: the last evaluation of the warm start beside the fine-tuned model's; logged too."""
  summary = {"pretrained": _last_evaluation(pretrain_dir), "fine_tuned": _last_evaluation(workdir)}
  if jax.process_index() == 0:
    (epath.Path(workdir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
  names = sorted(set(summary["pretrained"]) | set(summary["fine_tuned"]))
  lines = [f"  {name:32s} {summary['pretrained'].get(name, float('nan')):10.4g} "
           f"{summary['fine_tuned'].get(name, float('nan')):10.4g}" for name in names]
  logging.info("Warm start vs fine-tuned (%s):\n  %-32s %10s %10s\n%s", epath.Path(workdir) / SUMMARY_FILE,
               "", "pretrained", "fine-tuned", "\n".join(lines))
  return summary


def _train_loop(run: Run, workdir, writer, train_iter, manager):
  config = run.config
  restored = checkpoint.restore_latest(manager, run.abstract_state_with_shardings(), data_iterator=train_iter)
  if restored is None:
    state, start_step = run.initial_state(), 0
    logging.info("Starting a new run in %s.", workdir)
    if config.init_from:
      state = run.warm_started(state)
    flat_config = traverse_util.flatten_dict(checkpoint.config_to_json_dict(config), sep=".")
    # TensorBoard's hparams take scalars and strings only (lists such as mesh.shape become their repr).
    writer.write_hparams({name: value if isinstance(value, (int, float, str, bool)) else str(value)
                          for name, value in flat_config.items()})
  else:
    state, start_step = restored
    logging.info("Resumed from step %d of %s.", start_step, manager.directory)
  last_saved_step = start_step if restored is not None else None
  num_params = parameter_overview.count_parameters(state.params)
  if jax.process_index() == 0:
    # The whole config and the parameter table go to files (and TensorBoard), not to the console.
    (workdir / CONFIG_FILE).write_text(json.dumps(checkpoint.config_to_json_dict(config), indent=2, sort_keys=True))
    (workdir / PARAMETERS_FILE).write_text(parameter_overview.get_parameter_overview(state.params) + "\n")
  logging.info("Model %s: %s parameters (table in %s); config in %s.", config.model.name, f"{num_params:,}",
               workdir / PARAMETERS_FILE, workdir / CONFIG_FILE)
  writer.write_scalars(start_step, {"num_params": num_params})

  train_step = run.compiled_train_step()
  sampler = run.sampler()
  progress = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_steps=config.log_every_steps, every_secs=None)
  actions = [progress]
  if config.profile.num_steps > 0 and jax.process_index() == 0:
    actions.append(periodic_actions.Profile(logdir=str(workdir), first_profile=config.profile.first_step,
                                            num_profile_steps=config.profile.num_steps, every_secs=None))

  pending_metrics = []  # Device metrics of steps since the last host sync, for step `pending_from` on.
  pending_from = start_step + 1
  meter = progress_lib.StepMeter(config.num_train_steps, config.batch_size)
  if start_step < config.num_train_steps:
    logging.info("Training steps %d to %d, batch %d; compiling the train step.", start_step + 1,
                 config.num_train_steps, config.batch_size)
  with run.context():
    for step in range(start_step + 1, config.num_train_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = run.prepare_batch(state.rng, state.step, next(train_iter))
        state, metrics = train_step(state, batch)
      pending_metrics.append(metrics)
      if step == start_step + 1:
        # The first step includes the compile; the rate is measured from its end.
        jax.block_until_ready(metrics)
        logging.info("Step %d done (compiled) in %s.", step,
                     progress_lib.format_seconds(time.perf_counter() - meter.last_time))
        meter.start(step)
      for action in actions:
        action(step)

      is_last = step == config.num_train_steps
      preempted = manager.reached_preemption(step)  # The same answer on every host.
      save_now = step % config.checkpoint_every_steps == 0 or is_last or preempted
      if step % config.log_every_steps == 0 or save_now:
        host_metrics = jax.device_get(pending_metrics)
        check_finite(host_metrics, pending_from, workdir, last_saved_step)
        mean_metrics = _mean_metrics(host_metrics)
        writer.write_scalars(step, {f"train/{k}": v for k, v in mean_metrics.items()})
        ratio = f", FLOPs ratio {mean_metrics['flops_ratio']:.3f}" if "flops_ratio" in mean_metrics else ""
        line = meter.line(step, mean_metrics["loss"], ratio)
        utilisation = throughput.utilisation(meter.images_per_second, config.model, num_devices=jax.device_count(),
                                             device_kind=jax.devices()[0].device_kind)
        logging.info("%s%s", line, throughput.progress_suffix(utilisation))
        writer.write_scalars(step, {f"throughput/{name}": value for name, value in utilisation.items()
                                    if value is not None})
        pending_metrics, pending_from = [], step + 1
      if save_now:
        with progress.timed("checkpoint"):
          checkpoint.save(manager, step, state, config=config, data_iterator=train_iter)
        last_saved_step = step
      if preempted:
        logging.warning("Preemption notice at step %d: checkpoint saved, stopping. Rerun to resume.", step)
        break
      if config.sample_every_steps and (step % config.sample_every_steps == 0 or is_last):
        with progress.timed("sample"), meter.paused():
          path = write_sample_grid(run, sampler, state.ema_params, step, writer, workdir)
          if config.sample.raw_grid:  # The raw weights beside the EMA's: how training goes, early on.
            raw = write_sample_grid(run, sampler, state.params, step, writer, workdir, name="grid_raw")
            logging.info("Step %d: the raw (non-EMA) weights' grid written to %s.", step, raw)
          if objectives.is_dynamic(config.model):
            widths = write_width_picture(run, sampler, state.ema_params, step, writer, workdir)
            logging.info("Step %d: per-layer, per-step widths written to %s.", step, widths)
        logging.info("Step %d: sample grid written to %s.", step, path)
      evaluate_every = config.evaluation.every_steps
      if config.evaluation.metric and (is_last or (evaluate_every and step % evaluate_every == 0)):
        with progress.timed("evaluation"), meter.paused():
          run_evaluation(run, sampler, state.ema_params, step, writer, workdir)

    if start_step >= config.num_train_steps:
      logging.info("Nothing to train: the checkpoint is at step %d of %d.", start_step, config.num_train_steps)
  return state


def run_evaluation(run: Run, sampler: sample_lib.Sampler, params, step: int, writer, workdir) -> dict[str, float]:
  """Samples `evaluation.num_samples` images at `sample.cfg_scale` and scores them (`evaluation.metric`)."""
  config = run.config
  labels = sample_lib.balanced_labels(config.evaluation.num_samples, run.model.num_classes)
  start = time.perf_counter()
  sampler.routing_stats.clear()
  images = sampler.generate(params, labels, cfg_scale=config.sample.cfg_scale, seed=config.sample.seed)
  sampling_seconds = time.perf_counter() - start
  if run.evaluator is None:
    run.evaluator = evaluation.build_evaluator(config)
  results = evaluation.evaluate_samples(run.evaluator, images, labels)
  results["sampling_seconds"] = sampling_seconds
  # A routed model: the FLOPs ratio it achieved over the sampling schedule (1 for dense models).
  results.update(sampler.routing_summary())
  writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
  if jax.process_index() == 0:
    out = epath.Path(workdir) / SAMPLES_SUBDIR
    sample_lib.write_npz(out / f"eval_step_{step}.npz", images, labels)
    sample_lib.write_png(out / f"eval_step_{step}.png",
                         sample_lib.image_grid(images[:100], columns=run.model.num_classes),
                         upscale=max(1, 64 // run.model.input_size))
    (out / f"eval_step_{step}.json").write_text(json.dumps(results, indent=2, sort_keys=True))
  logging.info("Step %d evaluation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(results.items())))
  return results


def _with_checkpoint_settings(config, saved_config):
  """`config` with the model, objective, diffusion / transport and latent settings the checkpoint was trained
  with (they decide what the weights mean); a difference from --config is logged, never silently used. When
  the checkpoint's objective is not --config's and --config's sampler is not one of that objective's, the
  checkpoint's sampling fields are taken too (also logged)."""
  config = ml_collections.ConfigDict(config.to_dict())
  saved_objective = saved_config.get("objective", "diffusion")  # Checkpoints from before flow matching.
  if config.objective != saved_objective:
    logging.warning("config.objective=%r differs from the checkpoint's; sampling with the checkpoint's: %r",
                    config.objective, saved_objective)
    config.objective = saved_objective
    samplers = (diffusion_lib.transport.FLOW_SAMPLERS if saved_objective == "flow"
                else diffusion_lib.transport.DIFFUSION_SAMPLERS)
    if config.sample.sampler not in samplers and "sample" in saved_config:
      logging.warning("config.sample.sampler=%r is not a %s sampler; sampling with the checkpoint's sampler %r "
                      "and %d steps.", config.sample.sampler, saved_objective, saved_config.sample.sampler,
                      saved_config.sample.num_steps)
      for field in ("sampler", "num_steps", "atol", "rtol", "diffusion_form", "diffusion_norm", "last_step",
                    "last_step_size", "clip_denoised", "eta"):
        if field in saved_config.sample:
          config.sample[field] = saved_config.sample[field]
  for section in ("model", "diffusion", "latent") + (("transport",) if saved_objective == "flow" else ()):
    if section not in saved_config:
      continue
    ours, theirs = (checkpoint.config_to_json_dict(c[section]) for c in (config, saved_config))
    if section == "latent" and config.latent.vae and ours != theirs:
      continue  # The VAE's path on this machine may differ from the training machine's: --config's wins.
    if ours != theirs:
      logging.warning("config.%s differs from the checkpoint's; sampling with the checkpoint's: %s", section,
                      saved_config[section])
      config[section] = saved_config[section]
  return config


def sample(config: ml_collections.ConfigDict, workdir) -> str:
  """`--mode=sample`: `sample.num_samples` images of the EMA weights -> workdir/samples/*.npz and a PNG grid.

  The weights come from `config.sample.checkpoint` (any path `checkpoint.load_for_inference` accepts) or,
  when empty, from the newest checkpoint in `workdir`; the model, diffusion and latent settings are the
  checkpoint's. Labels are balanced over the classes. Latent models are decoded with `config.latent.vae`.

  Resumable: each batch of `sample.batch_size` images is written to <name>/batch_<i>.npz as it finishes
  (atomically, by process 0); a rerun of the same command samples only the missing batches (batch i always
  draws from fold_in(key(seed), i), so the result equals an uninterrupted run), then writes <name>.npz.

  Returns:
    The path of the .npz file.
  """
  source = config.sample.checkpoint or str(workdir)
  saved_config, ema_params = checkpoint.load_for_inference(source)
  config = _with_checkpoint_settings(config, saved_config)
  run = Run(config, check_dataset=False)
  # From host memory: the loaded arrays sit on this host's first device, and jax moves no array between hosts
  # (a multi-process run would stop here); every host holds the same numpy values.
  ema_params = jax.device_put(jax.device_get(ema_params), run.state_shardings.ema_params)
  sampler = run.sampler()
  sample_config = config.sample
  labels = sample_lib.balanced_labels(sample_config.num_samples, run.model.num_classes)
  # "ddpm250", "heun2-51" (a sampler name ending in a digit gets a dash before the step count).
  steps = f"{'-' if sample_config.sampler[-1].isdigit() else ''}{sample_config.num_steps}"
  name = (f"{config.model.name}_{sample_config.sampler}{steps}_cfg{sample_config.cfg_scale}_"
          f"seed{sample_config.seed}_n{sample_config.num_samples}")
  out = epath.Path(workdir) / SAMPLES_SUBDIR
  npz_path = out / f"{name}.npz"
  batches_dir = out / name
  batch_size = sample_config.batch_size
  num_batches = -(-len(labels) // batch_size)
  batch_path = lambda index: batches_dir / f"batch_{index:06d}.npz"
  # Decided once, before this run writes anything, so every host skips the same batches.
  todo = [] if npz_path.exists() else [i for i in range(num_batches) if not batch_path(i).exists()]
  if npz_path.exists():
    logging.info("%s exists: nothing to sample.", npz_path)
  elif len(todo) < num_batches:
    logging.info("Resuming: %d of %d sample batches already in %s.", num_batches - len(todo), num_batches,
                 batches_dir)
  start = time.perf_counter()
  for done, index in enumerate(todo, start=1):
    images = sampler.generate(ema_params, labels[index * batch_size:(index + 1) * batch_size],
                              cfg_scale=sample_config.cfg_scale, seed=sample_config.seed, first_chunk=index)
    if jax.process_index() == 0:
      batches_dir.mkdir(parents=True, exist_ok=True)
      partial = batches_dir / f".batch_{index:06d}.npz.partial"
      sample_lib.write_npz(partial, images, labels[index * batch_size:(index + 1) * batch_size])
      partial.rename(batch_path(index))
    elapsed = time.perf_counter() - start
    rate = done * batch_size / elapsed
    logging.info("Sampled batch %d/%d (%d images): %.2f images/s, ETA %.0f s.", num_batches - len(todo) + done,
                 num_batches, len(images), rate, (len(todo) - done) * batch_size / rate)
  seconds = time.perf_counter() - start
  routing = sampler.routing_summary()
  if jax.process_index() == 0 and not npz_path.exists():
    arrays = [np.load(batch_path(i).as_posix()) for i in range(num_batches)]
    images = np.concatenate([a["arr_0"] for a in arrays])
    sample_lib.write_npz(npz_path, images, np.concatenate([a["arr_1"] for a in arrays]))
    sample_lib.write_png(out / f"{name}.png", sample_lib.image_grid(images[:100]),
                         upscale=max(1, 64 // images.shape[1]))
    if routing:
      (out / f"{name}_routing.json").write_text(json.dumps(routing, indent=2, sort_keys=True))
    for i in range(num_batches):
      batch_path(i).unlink()
    batches_dir.rmdir()
  if routing:
    logging.info("Achieved FLOPs ratio over the sampling schedule: %.4f (of the dense model's).",
                 routing["flops_ratio"])
  if todo:
    logging.info("Wrote %d samples (%.1f s for %d new, %.2f images/s) to %s.", len(labels), seconds,
                 min(len(todo) * batch_size, len(labels)), min(len(todo) * batch_size, len(labels)) / seconds,
                 npz_path)
  return str(npz_path)
