"""Class-conditional sampling with classifier-free guidance, sharded over the batch, and its outputs.

  sampler = Sampler(model, config.diffusion, config.sample, mesh=mesh, rules=rules)
  images = sampler.generate(ema_params, labels, cfg_scale=1.5, seed=0)   # uint8 (N, H, W, C)
  write_npz(path, images, labels)                                      # ADM evaluation suite format
  write_png(path, image_grid(images))

In a notebook, after `config, ema_params = dyngen.checkpoint.load_for_inference(path)`:

  sampler = notebook_sampler(config)                 # all local devices, batch split over them
  images = sampler.generate(ema_params, [1, 7, 7, 3], cfg_scale=4.0, seed=0)

The starting noise of chunk i is drawn from `fold_in(key(seed), i)` at the chunk's global shape, so
the samples do not depend on the number of devices. As DiT's sample.py: the guided batch is
[z; z] with labels [y; null], and only the conditional half is kept.

A DyDiT samples on the fast path by default (`dyngen.train.routing_plan`: gathered heads and MLP groups,
a token capacity, one compiled program per capacity signature); `config.sample.routing = "masked"` runs the
masked reference (`routed_sample_loop`). Both record the achieved FLOPs ratio (`Sampler.routing_summary`).
"""
import math
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image

from dyngen import diffusion as diffusion_lib
from dyngen.diffusion import transport as transport_lib
from dyngen import models
from dyngen import progress
from dyngen import sharding
from dyngen.train import routing_plan


def sampling_diffusion(diffusion_config, sample_config, learn_sigma: bool):
  """The diffusion process respaced to `sample_config.num_steps` (DDIM uses the paper's even striding)."""
  steps = sample_config.num_steps
  respacing = f"ddim{steps}" if sample_config.sampler == "ddim" else str(steps)
  return diffusion_lib.create_diffusion(timestep_respacing=respacing, learn_sigma=learn_sigma,
                                        **diffusion_config.to_dict())


def sampling_process(diffusion_config, sample_config, learn_sigma: bool, transport_config=None):
  """What the sampler runs: SiT's Transport of `transport_config` (flow matching; its grid is
  `sample_config.num_steps` points), or else the respaced diffusion (`sampling_diffusion`)."""
  if transport_config is not None:
    return diffusion_lib.transport_from_config(transport_config)
  return sampling_diffusion(diffusion_config, sample_config, learn_sigma)


def flow_fast_path_unsupported(sample_config) -> str:
  """Why the routed fast path cannot run this flow-matching sampler ("" when it can: the fixed-step ODE and
  SDE samplers)."""
  if sample_config.sampler == "dopri5":
    return ("the fast path runs fixed-step samplers (euler, heun2, sde_euler, sde_heun), not the adaptive "
            "'dopri5'; set config.sample.sampler to one of them for it")
  if tuple(sample_config.guidance_interval) != (0.0, 1.0):
    return "the fast path guides at every step; a config.sample.guidance_interval runs masked"
  return ""


def flow_schedule(transport, sample_config) -> routing_plan.SamplingSchedule:
  """The flow sampler of `sample_config` (euler / heun2 / sde_euler / sde_heun on num_steps grid points) as the
  fast path's schedule, one entry per model evaluation (`Transport.ode_evaluations` / `sde_evaluations`), with
  the noise of `sample_sde` (step k's from fold_in(key, k)): the samples of the masked loop."""
  sampler = sample_config.sampler
  if sampler in transport_lib.FLOW_SDE_SAMPLERS:
    model_times, steps, init, update, result = transport.sde_evaluations(
        **transport_lib.sde_options(sample_config), num_steps=sample_config.num_steps)
    steps = jnp.asarray(steps)
    return routing_plan.SamplingSchedule(
        model_times, update, init=init, result=result,
        evaluation_keys=lambda key: jax.vmap(lambda step: jax.random.fold_in(key, step))(steps))
  model_times, init, update, result = transport.ode_evaluations(sampler, sample_config.num_steps)
  return routing_plan.SamplingSchedule(model_times, update, init=init, result=result)


def flow_transport_config(config):
  """config.transport when the run's config.objective is "flow", else None (checkpoints older than the
  objective field trained the diffusion)."""
  return config.transport if config.get("objective", "diffusion") == "flow" else None


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 as DiT's sample_ddp.py: clip(127.5 x + 128, 0, 255), truncated."""
  return np.clip(127.5 * np.asarray(images, np.float32) + 128.0, 0, 255).astype(np.uint8)


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one)."""
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def starting_batch(model, labels, key, guided: bool):
  """(x_T, y, loop key) of a sampling batch as it runs: x_T ~ N(0, I) from the key's first half, doubled with
  null labels appended when guided ([z; z], [labels; null], as DiT's sample.py)."""
  noise_key, loop_key = jax.random.split(key)
  shape = (labels.shape[0], model.input_size, model.input_size, model.in_channels)
  x_T = jax.random.normal(noise_key, shape, jnp.float32)
  y = labels
  if guided:
    x_T = jnp.concatenate([x_T, x_T], axis=0)
    y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)], axis=0)
  return x_T, y, loop_key


class Sampler:
  """Jitted sampling of a model under a mesh; one compiled program per (batch, cfg on/off)."""

  def __init__(self, model: nn.Module, diffusion_config, sample_config, *, mesh: jax.sharding.Mesh, rules,
               param_shardings=None, decode=None, transport_config=None):
    self.model = model
    # Model space -> images in [-1, 1] (float (N, H, W, C) in, numpy out), e.g. an SD-VAE's decoder of
    # latents / scale_factor; None: the model samples images.
    self.decode = decode
    self.sample_config = sample_config
    # transport_config (a run's config.transport when config.objective is "flow"): flow matching.
    self.process = sampling_process(diffusion_config, sample_config, model.learn_sigma, transport_config)
    self.interface = diffusion_lib.objective_interface(self.process)
    self.diffusion = None if self.interface.is_flow else self.process  # The Gaussian diffusion, if that.
    self.mesh = mesh
    self.rules = sharding.rules_as_tuples(rules)
    self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
    self.param_shardings = param_shardings
    self._compiled = {}
    # Step reports from inside the compiled loop of a long batch (at most every 10 s; short batches are quiet).
    self.loop_progress = progress.LoopProgress("Sampling batch")
    # Per sampling call, a routed model's per-step statistics ({"flops_ratio": (S,)}); see `routing_summary`.
    self.routing_stats = []
    # DyDiT / DyDiG: the fast path (default) or the masked reference, and the fast path's knobs.
    routing, self.routing_options = routing_plan.options_for(sample_config)
    self.fast = routing_plan.has_fast_path(model) and routing == "fast"
    if self.fast and self.interface.is_flow:
      unsupported = flow_fast_path_unsupported(sample_config)
      if unsupported:
        logging.info("Routed model on flow matching: sampling on the masked path (%s).", unsupported)
        self.fast = False
    self.fast_sampler = None
    if self.fast:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      # The process as the fast path steps it (per model evaluation: the model's t and the update).
      self.schedule = (flow_schedule(self.process, sample_config) if self.interface.is_flow
                       else routing_plan.gaussian_schedule(self.diffusion, sample_config))
      self.fast_sampler = routing_plan.FastSampler(model, self.schedule, sample_config,
                                                   param_shardings=param_shardings,
                                                   batch_sharding=self.batch_sharding, replicated=replicated)
    self.last_plan = None  # The fast path's plan of the latest call.
    self.calibration_seconds = 0.0
    self._token_counts = None  # Calibrated token counts per guidance setting, within one `generate`.

  def routing_summary(self) -> dict:
    """Mean achieved FLOPs ratio over the sampling schedule and the calls so far ({} for dense models).

    On the fast path also (numbers only, for scalar writers): flops_ratio_executed (padding units and every
    selected token counted as computed; flops_ratio counts what the masks kept, as the masked path),
    token_cut_fraction (wanted tokens the capacity cut / wanted), token_unwanted_run_fraction (selected
    tokens the router did not want / selected), programs_compiled, compile_seconds, calibration_seconds,
    segments and min / max steps_per_segment of the latest plan.
    """
    if not self.routing_stats or not self.routing_stats[0]:
      return {}
    per_step = np.mean([stats["flops_ratio"] for stats in self.routing_stats], axis=0)
    summary = {"flops_ratio": float(np.mean(per_step)), "flops_ratio_first_step": float(per_step[0]),
               "flops_ratio_last_step": float(per_step[-1]), "sampling_batches": len(self.routing_stats)}
    if "kept" in self.routing_stats[0]:
      total = {name: float(sum(np.sum(stats[name]) for stats in self.routing_stats))
               for name in ("wanted", "kept", "unwanted_run")}
      executed = np.mean([stats["flops_ratio_executed"] for stats in self.routing_stats], axis=0)
      lengths = [segment.stop - segment.start for segment in self.last_plan.segments]
      summary.update(
          routing_fast=1, flops_ratio_executed=float(np.mean(executed)),
          tokens_cut=total["wanted"] - total["kept"], tokens_unwanted_run=total["unwanted_run"],
          token_cut_fraction=(total["wanted"] - total["kept"]) / max(total["wanted"], 1.0),
          token_unwanted_run_fraction=total["unwanted_run"] / max(total["kept"] + total["unwanted_run"], 1.0),
          programs_compiled=self.fast_sampler.programs_compiled, compile_seconds=self.fast_sampler.compile_seconds,
          calibration_seconds=self.calibration_seconds, segments=len(lengths),
          min_steps_per_segment=min(lengths), max_steps_per_segment=max(lengths))
    return summary

  def sampling_times(self) -> np.ndarray:
    """The model's t at the start of each sampling step, in run order (T-1 first; flow: 0 = noise first)."""
    return self.interface.sampling_times(self.sample_config)

  def _sample_fn(self, guided: bool):
    config = self.sample_config
    model, interface = self.model, self.interface
    channels = config.guidance_channels or None
    loop_progress = self.loop_progress

    def sample(params, labels, key, cfg_scale):
      """labels: (B,) int32 -> (images (B, H, W, C) float32, per-step stats {name: (S,)})."""
      x_T, y, loop_key = starting_batch(model, labels, key, guided)
      x_T = nn.with_logical_constraint(x_T, ("batch", None, None, None))

      def model_fn_of(apply_fn):
        if guided and interface.is_flow:  # SiT's guidance, within config.guidance_interval of flow time
          return diffusion_lib.interval_guided_model_fn(apply_fn, y, cfg_scale, tuple(config.guidance_interval),
                                                        channels, num_classes=model.num_classes)
        if guided:
          return diffusion_lib.guided_model_fn(apply_fn, y, cfg_scale, channels, num_classes=model.num_classes)
        return lambda x, t: apply_fn(x, t, y)

      if model.returns_aux:
        out, stats = routed_sample_loop(interface.process, model, params, model_fn_of, x_T, loop_key, config,
                                        loop_progress=loop_progress)
      else:
        out = interface.sample_loop(model_fn_of(models.prediction_fn(model, params)), x_T, loop_key, config,
                                    progress=loop_progress)
        stats = {}
      return out[:labels.shape[0]], stats

    return sample

  def _compiled_fn(self, guided: bool):
    if guided not in self._compiled:
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._compiled[guided] = jax.jit(
          self._sample_fn(guided),
          in_shardings=(self.param_shardings, self.batch_sharding, replicated, replicated),
          out_shardings=(self.batch_sharding, replicated))
    return self._compiled[guided]

  def _start_fn(self, guided: bool):
    """The fast path's start, as `_sample_fn`'s: (labels, key) -> (x_T, y, loop key) of the batch as run."""
    if ("start", guided) not in self._compiled:
      def start(labels, key):
        return starting_batch(self.model, labels, key, guided)

      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      self._compiled[("start", guided)] = jax.jit(start, out_shardings=(self.batch_sharding, self.batch_sharding,
                                                                       replicated))
    return self._compiled[("start", guided)]

  def plan(self, params, *, token_counts=None) -> routing_plan.SamplingPlan:
    """The fast path's plan of this sampler's schedule for `params` (token_counts: see `make_plan`)."""
    return routing_plan.make_plan(self.model, params, self.schedule.model_timesteps, self.routing_options,
                                  token_counts=token_counts)

  def _calibrate(self, params, global_labels, key, cfg_scale):
    """(E, L): the most tokens any row wanted per model evaluation and block, over `calibration_batches`
    masked runs: this batch, then its labels with the noise and loop keys of fold_in(key, j), j = 1, 2, ..."""
    guided = cfg_scale != 1.0
    counts = None
    for j in range(self.routing_options.calibration_batches):
      x_T, y, loop_key = self._start_fn(guided)(global_labels, key if j == 0 else jax.random.fold_in(key, j))
      batch_counts = routing_plan.calibrate_token_counts(self.schedule, self.model, params, x_T, y, cfg_scale,
                                                         loop_key, self.sample_config,
                                                         cache=self.fast_sampler.calibration_cache,
                                                         pooled=self.routing_options.token_pooling == "batch")
      counts = batch_counts if counts is None else np.maximum(counts, batch_counts)
    return counts

  def _sample_batch_fast(self, params, global_labels, key, cfg_scale):
    guided = cfg_scale != 1.0
    x_T, y, loop_key = self._start_fn(guided)(global_labels, key)
    token_counts = None
    if self.routing_options.calibrate_tokens:
      token_counts = (self._token_counts or {}).get(guided)
      if token_counts is None:
        start = time.perf_counter()
        token_counts = self._calibrate(params, global_labels, key, cfg_scale)
        self.calibration_seconds += time.perf_counter() - start
        if self._token_counts is not None:
          self._token_counts[guided] = token_counts
    self.last_plan = self.plan(params, token_counts=token_counts)
    out, stats = self.fast_sampler.run(params, self.last_plan, x_T, y, cfg_scale, loop_key)
    return out[:global_labels.shape[0]], stats

  def sample_batch(self, params, labels: np.ndarray, key: jax.Array, cfg_scale: float) -> np.ndarray:
    """One call: labels (B,) with B the sampling batch -> float32 images (B, H, W, C) in model space.

    On the fast path with calibrated token capacities, a call outside `generate` calibrates on its own batch.
    """
    labels = np.asarray(labels, np.int32)
    global_labels = jax.make_array_from_callback(labels.shape, self.batch_sharding, lambda index: labels[index])
    guided = cfg_scale != 1.0
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      if self.fast:
        images, stats = self._sample_batch_fast(params, global_labels, key, cfg_scale)
      else:
        images, stats = self._compiled_fn(guided)(params, global_labels, key, jnp.float32(cfg_scale))
    self.routing_stats.append(jax.device_get(stats))
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(images, tiled=True))
    return np.asarray(images)

  def generate(self, params, labels: np.ndarray, *, cfg_scale: float, seed: int,
               batch_size: int | None = None, first_chunk: int = 0, on_chunk=None) -> np.ndarray:
    """uint8 images (N, H, W, C) for `labels` (N,), in chunks of `batch_size` (default sample.batch_size).

    Chunk i draws from `fold_in(key(seed), first_chunk + i)`: a run split into several calls (resumed
    sampling) gets the samples of one call. `on_chunk(done, total)` is called after each chunk (progress).

    The last chunk is padded with class 0 to the full batch (one compiled program) and the padding dropped.
    A DyDiT on the fast path with calibrated token capacities calibrates on the first chunk, for all chunks.
    Labels outside [0, num_classes) are refused (under jit they would give NaN images without a word).
    """
    labels = np.asarray(labels)
    diffusion_lib.check_labels(labels, self.model.num_classes)
    labels = labels.astype(np.int32)
    batch_size = batch_size or self.sample_config.batch_size
    base_key = jax.random.PRNGKey(seed)
    chunks = []
    self._token_counts = {}
    num_chunks = -(-len(labels) // batch_size)
    meter = progress.Meter("Sampling", total=len(labels), unit="images", log_last=num_chunks > 1)
    if num_chunks > 1:
      logging.info("Sampling %d images in %d batches of %d (%d %s steps each).", len(labels), num_chunks,
                   batch_size, len(self.sampling_times()), self.sample_config.sampler.upper())
    try:
      for index, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start:start + batch_size]
        padded = np.pad(chunk, (0, batch_size - len(chunk)))
        key = jax.random.fold_in(base_key, first_chunk + index)
        images = self.sample_batch(params, padded, key, cfg_scale)[:len(chunk)]
        chunks.append(to_uint8(self.decode(images) if self.decode is not None else images))
        meter.update(start + len(chunk))
        if on_chunk is not None:
          on_chunk(start + len(chunk), len(labels))
    finally:
      self._token_counts = None
    if self.fast:
      summary = self.routing_summary()
      logging.info("Routed fast path: FLOPs ratio %.4f kept by the masks, %.4f executed (padding included); "
                   "%d wanted tokens cut by the capacity (%.3g%%), %d unwanted tokens run; %d program(s) compiled "
                   "(%.1f s), %d segment(s) of %s steps.", summary["flops_ratio"], summary["flops_ratio_executed"],
                   summary["tokens_cut"], 100 * summary["token_cut_fraction"], summary["tokens_unwanted_run"],
                   summary["programs_compiled"], summary["compile_seconds"], summary["segments"],
                   self.last_plan.summary()["steps_per_segment"])
    return np.concatenate(chunks, axis=0)


def routed_sample_loop(diffusion, model, params, model_fn_of, x_T, key, sample_config, loop_progress=None):
  """The sampling loop for a model that returns (out, aux), as one lax.scan, with aux kept.

  Diffusion: the same steps, noise and keys as `GaussianDiffusion.p_sample_loop` / `ddim_sample_loop`
  (step k of S draws from the k-th of `split(key, S)`), so the samples equal theirs. Flow (`diffusion` a
  `Transport`): the loop of `ObjectiveInterface.sample_loop`, with its samples. Each model evaluation
  records the batch's mean FLOPs ratio of the rows it ran (conditional and null rows: both cost compute).
  `loop_progress` (a `dyngen.progress.LoopProgress`) reports steps to the host from inside the loop.

  Returns: (x_0 (B, H, W, C), {"flops_ratio": (E,)}): E = S steps for the diffusion; for flow one entry per
  model evaluation (2 per Heun step, + 1 for an SDE's last step).
  """
  if isinstance(diffusion, diffusion_lib.Transport):
    captured = {}

    def apply_flow(x, t, y):
      out, aux = model.apply({"params": params}, x, t, y, train=False)
      captured["flops_ratio"] = jnp.mean(aux["flops_ratio"])
      return out

    guided_fn = model_fn_of(apply_flow)

    def model_fn_with_aux(x, t):  # read back right after the call, within the same trace
      out = guided_fn(x, t)
      return out, {"flops_ratio": captured.pop("flops_ratio")}

    return diffusion_lib.objective_interface(diffusion).sample_loop(model_fn_with_aux, x_T, key, sample_config,
                                                                    with_aux=True, progress=loop_progress)
  num_steps = diffusion.num_timesteps
  indices = jnp.arange(num_steps - 1, -1, -1, dtype=jnp.int32)
  ddim, eta = sample_config.sampler == "ddim", sample_config.eta
  noisy = not ddim or eta != 0

  def body(x, scanned):
    index, step_key = scanned
    captured = {}

    def apply_fn(x, t, y):
      out, aux = model.apply({"params": params}, x, t, y, train=False)
      captured["flops_ratio"] = jnp.mean(aux["flops_ratio"])
      return out

    model_fn = model_fn_of(apply_fn)
    noise = jax.random.normal(step_key, x.shape, x.dtype) if noisy else None
    if ddim:
      sample, _ = diffusion.ddim_sample(model_fn, x, index, noise, sample_config.clip_denoised, eta)
    else:
      sample, _ = diffusion.p_sample(model_fn, x, index, noise, sample_config.clip_denoised)
    if loop_progress is not None:
      loop_progress.tick(num_steps - index, num_steps)
    return sample.astype(x.dtype), {"flops_ratio": captured["flops_ratio"]}

  return jax.lax.scan(body, x_T, (indices, jax.random.split(key, num_steps)))


def notebook_sampler(config, devices=None) -> Sampler:
  """A Sampler for a loaded checkpoint's `config` over `devices` (default: all local devices).

  The weights are replicated and the sampling batch is split over the devices, whatever mesh the run was
  trained with. `config.sample` (steps, sampler, guidance channels, batch size) can be changed first.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return Sampler(models.build(config.model), config.diffusion, config.sample, mesh=mesh,
                 rules=((sharding.BATCH_AXIS, "data"),), param_shardings=replicated,
                 transport_config=flow_transport_config(config))


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
  """uint8 (N, H, W, C) -> one uint8 (rows·(H+p)+p, cols·(W+p)+p, C) picture, rows filled left to right."""
  count, height, width, channels = images.shape
  columns = columns or math.ceil(math.sqrt(count))
  rows = math.ceil(count / columns)
  grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
                  np.uint8)
  for index, image in enumerate(images):
    top = padding + (index // columns) * (height + padding)
    left = padding + (index % columns) * (width + padding)
    grid[top:top + height, left:left + width] = image
  return grid


def write_png(path, picture: np.ndarray, upscale: int = 1) -> None:
  """uint8 (H, W, 1 or 3) -> PNG, optionally enlarged `upscale` times (nearest) for tiny images."""
  picture = np.repeat(np.repeat(picture, upscale, axis=0), upscale, axis=1)
  image = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    image.save(f, format="PNG")


def write_npz(path, images: np.ndarray, labels: np.ndarray) -> None:
  """The ADM evaluation suite's sample format: `arr_0` uint8 (N, H, W, C), plus `arr_1` the labels."""
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    np.savez(f, arr_0=images, arr_1=np.asarray(labels, np.int32))

