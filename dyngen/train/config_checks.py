"""Checks of a run's ConfigDict, done before any array is allocated.

Every field the trainer reads is listed in `TRAINER_FIELDS` with its type; `config.model` is checked by
`dyngen.models.build` and `config.data` against `dyngen.data.default_config`. A config with a field the
trainer does not know (usually a typo), a value of the wrong type, or sizes that cannot work together
(an image size the patch does not divide, a batch the devices do not divide, a mesh for another device
count) stops with a message that names the field, the value and what would be right.
"""
import difflib
import math

import ml_collections

from dyngen import data as data_lib
from dyngen import diffusion as diffusion_lib
from dyngen import models
from dyngen import sharding
from dyngen.train import objectives
from dyngen.train import routing_plan

_INT, _FLOAT, _STR, _BOOL, _INTS, _STRS, _RULES = "int", "float", "str", "bool", "ints", "strs", "rules"
_FLOAT_PAIR, _OPTIONAL_FLOAT, _OPTIONAL_STR = "float pair", "optional float", "optional str"

# Every trainer field: dotted path -> kind. The defaults live in dyngen/recipes/common.py.
TRAINER_FIELDS = {
    "seed": _INT,
    "init_from": _STR,
    "batch_size": _INT,
    "num_train_steps": _INT,
    "log_every_steps": _INT,
    "checkpoint_every_steps": _INT,
    "keep_checkpoints": _INT,
    "sample_every_steps": _INT,
    "optimizer.learning_rate": _FLOAT,
    "optimizer.b1": _FLOAT,
    "optimizer.b2": _FLOAT,
    "optimizer.eps": _FLOAT,
    "optimizer.weight_decay": _FLOAT,
    "optimizer.warmup_steps": _INT,
    "optimizer.grad_clip_norm": _FLOAT,
    "optimizer.skip_update_grad_norm": _FLOAT,
    "ema.decay": _FLOAT,
    "ema.warmup": _FLOAT,
    "objective": _STR,
    "transport.path_type": _STR,
    "transport.prediction": _STR,
    "transport.loss_weight": _OPTIONAL_STR,
    "transport.train_eps": _OPTIONAL_FLOAT,
    "transport.sample_eps": _OPTIONAL_FLOAT,
    "diffusion.noise_schedule": _STR,
    "diffusion.diffusion_steps": _INT,
    "diffusion.predict_xstart": _BOOL,
    "diffusion.use_kl": _BOOL,
    "diffusion.sigma_small": _BOOL,
    "diffusion.rescale_learned_sigmas": _BOOL,
    "latent.vae": _STR,
    "latent.scale_factor": _FLOAT,
    "sample.sampler": _STR,
    "sample.num_steps": _INT,
    "sample.eta": _FLOAT,
    "sample.atol": _FLOAT,
    "sample.rtol": _FLOAT,
    "sample.diffusion_form": _STR,
    "sample.diffusion_norm": _FLOAT,
    "sample.last_step": _STR,
    "sample.last_step_size": _FLOAT,
    "sample.guidance_interval": _FLOAT_PAIR,
    "sample.cfg_scale": _FLOAT,
    "sample.guidance_channels": _INT,
    "sample.clip_denoised": _BOOL,
    "sample.num_samples": _INT,
    "sample.batch_size": _INT,
    "sample.seed": _INT,
    "sample.checkpoint": _STR,
    "sample.grid_size": _INT,
    "sample.grid_cfg_scale": _FLOAT,
    "sample.raw_grid": _BOOL,
    "sample.routing": _STR,
    "sample.width_cap": _FLOAT,
    "sample.token_capacity": _FLOAT,
    "sample.calibrate_tokens": _BOOL,
    "sample.calibration_batches": _INT,
    "sample.token_pooling": _STR,
    "sample.capacity_buckets": _INT,
    "sample.max_programs": _INT,
    "evaluation.metric": _STR,
    "evaluation.num_samples": _INT,
    "evaluation.every_steps": _INT,
    "evaluation.reference": _STR,
    "evaluation.inception": _STR,
    "mesh.axes": _STRS,
    "mesh.shape": _INTS,
    "sharding.logical_axis_rules": _RULES,
    "profile.first_step": _INT,
    "profile.num_steps": _INT,
}
# Sections checked by their owners rather than by TRAINER_FIELDS.
OWNED_SECTIONS = ("model", "data")
# The SD-VAE's encoder halves the image side three times.
LATENT_DOWNSAMPLING = 8
# Sections that only some runs have, checked by their owners (dyngen.train.objectives for config.dynamic).
# config.pretrain (a whole run config, the warm start to train first) is checked as a run of its own.
OPTIONAL_SECTIONS = ("dynamic", "pretrain")
SAMPLERS = ("ddpm", "ddim")
EVALUATION_METRICS = ("", "digits", "adm_fid")


def _leaf_paths(config, prefix=""):
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from _leaf_paths(value, path + ".")
    else:
      yield path, value


def _get(config, path):
  for key in path.split("."):
    config = config[key]
  return config


def _kind_ok(value, kind) -> bool:
  is_int = isinstance(value, int) and not isinstance(value, bool)
  if kind == _INT:
    return is_int
  if kind == _FLOAT:
    return is_int or isinstance(value, float)
  if kind == _STR:
    return isinstance(value, str)
  if kind == _BOOL:
    return isinstance(value, bool)
  if kind == _INTS:
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
  if kind == _STRS:
    return isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value)
  if kind == _FLOAT_PAIR:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(_kind_ok(v, _FLOAT) for v in value)
  if kind == _OPTIONAL_FLOAT:
    return value is None or _kind_ok(value, _FLOAT)
  if kind == _OPTIONAL_STR:
    return value is None or isinstance(value, str)
  if kind == _RULES:
    return isinstance(value, (tuple, list)) and all(isinstance(r, (tuple, list)) and len(r) == 2 for r in value)
  raise AssertionError(kind)


_KIND_WORDS = {_INT: "an int", _FLOAT: "a number", _STR: "a string", _BOOL: "a bool",
               _INTS: "a tuple of ints", _STRS: "a tuple of strings",
               _RULES: "a tuple of (logical_name, mesh_axes) pairs", _FLOAT_PAIR: "a (low, high) pair of numbers",
               _OPTIONAL_FLOAT: "a number or None", _OPTIONAL_STR: "a string or None"}


def check_fields(config) -> None:
  """Unknown fields, missing fields and wrong types of the trainer's part of `config`."""
  for section in OWNED_SECTIONS:
    if section not in config:
      raise ValueError(f"config.{section} is missing; every run config needs a {section} section.")
  known = set(TRAINER_FIELDS)
  for path, _ in _leaf_paths(config):
    if path.split(".")[0] in OWNED_SECTIONS + OPTIONAL_SECTIONS or path in known:
      continue
    close = difflib.get_close_matches(path, known, n=1)
    hint = f" Did you mean config.{close[0]}?" if close else ""
    raise ValueError(f"config.{path} is not a field the trainer reads.{hint} Known fields are listed in "
                     "dyngen/train/config_checks.py (TRAINER_FIELDS) with defaults in dyngen/recipes/common.py.")
  for path, kind in TRAINER_FIELDS.items():
    try:
      value = _get(config, path)
    except (KeyError, AttributeError):
      raise ValueError(f"config.{path} is missing; start from dyngen/recipes/common.py's training_config(), which "
                       "sets every trainer field.") from None
    if not _kind_ok(value, kind):
      raise ValueError(f"config.{path} must be {_KIND_WORDS[kind]}, got {value!r} ({type(value).__name__}).")
  data_fields = set(data_lib.default_config(config.data.name))
  unknown_data = sorted(set(config.data) - data_fields)
  if unknown_data:
    raise ValueError(f"config.data has unknown field(s) {unknown_data}; the fields of a "
                     f"{config.data.name!r} data config are {sorted(data_fields)}.")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def check_values(config) -> None:
  """Ranges of single values and the agreement between sections that needs no devices or data."""
  positive = ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "sample.num_steps", "sample.batch_size", "diffusion.diffusion_steps")
  for path in positive:
    _require(_get(config, path) > 0, f"config.{path} must be > 0, got {_get(config, path)}.")
  for path in ("sample_every_steps", "optimizer.warmup_steps", "optimizer.weight_decay",
               "optimizer.grad_clip_norm", "optimizer.skip_update_grad_norm", "sample.num_samples", "sample.grid_size", "sample.guidance_channels",
               "evaluation.num_samples", "evaluation.every_steps", "profile.num_steps", "sample.cfg_scale",
               "sample.grid_cfg_scale", "sample.eta"):
    _require(_get(config, path) >= 0, f"config.{path} must be >= 0, got {_get(config, path)}.")
  _require(0 <= config.seed < 2**32, f"config.seed={config.seed} must be in [0, 2**32).")
  _require(config.optimizer.learning_rate > 0,
           f"config.optimizer.learning_rate must be > 0, got {config.optimizer.learning_rate}.")
  for beta in ("b1", "b2"):
    value = config.optimizer[beta]
    _require(0 <= value < 1, f"config.optimizer.{beta} must be in [0, 1), got {value}.")
  _require(0 <= config.ema.decay <= 1, f"config.ema.decay must be in [0, 1], got {config.ema.decay}.")
  _require(config.ema.warmup == 0 or config.ema.warmup > 1,
           f"config.ema.warmup must be 0 (no warm-up) or > 1 (the decay min(decay, (1 + s) / (warmup + s)) "
           f"grows towards 1), got {config.ema.warmup}.")
  check_objective(config)
  _require(config.evaluation.metric in EVALUATION_METRICS,
           f"config.evaluation.metric must be one of {EVALUATION_METRICS}, got {config.evaluation.metric!r}.")
  if config.evaluation.metric == "digits":
    _require(config.data.name == "digits",
             f"config.evaluation.metric='digits' scores digit samples, but config.data.name={config.data.name!r}.")
  if config.evaluation.metric == "adm_fid":
    for field in ("reference", "inception"):
      _require(bool(config.evaluation[field]),
               f"config.evaluation.metric='adm_fid' needs config.evaluation.{field}: "
               + ("an ADM reference batch npz (e.g. VIRTUAL_imagenet256_labeled.npz, or one made with "
                  "`python -m dyngen.evaluate --make_reference`)." if field == "reference" else
                  "the path of pytorch-fid's Inception weights pt_inception-2015-12-05-6726825d.pth."))
  if config.evaluation.metric:
    _require(config.evaluation.num_samples >= 2,
             f"config.evaluation.num_samples={config.evaluation.num_samples}: a Frechet distance needs >= 2 samples.")
  latent_data = config.data.name == data_lib.LATENTS
  if latent_data and not config.latent.vae:  # Needed to decode samples (grids, evaluation, --mode=sample).
    raise ValueError(imagenet_latents_message(config))
  if config.latent.vae:
    _require(not config.sample.clip_denoised,
             "config.sample.clip_denoised=True clamps each x_0 estimate to [-1, 1], which distorts latents "
             f"(config.latent.vae={config.latent.vae!r}); set it to False, as DiT samples latents.")
  model = models.build(config.model)  # Checks the model's own fields and shapes.
  objectives.check_dynamic_config(config)
  routing_plan.options_for(config.sample)  # The fast path's knobs (width_cap, token_capacity, ...), by name.
  _require(config.sample.guidance_channels <= model.in_channels,
           f"config.sample.guidance_channels={config.sample.guidance_channels} but the model predicts "
           f"{model.in_channels} channel(s); use 0 (guide all channels) or at most {model.in_channels}.")
  if not latent_data:
    downsample = LATENT_DOWNSAMPLING if config.latent.vae else 1
    _require(model.input_size * downsample == config.data.image_size,
             f"config.model.input_size={model.input_size} but config.data.image_size={config.data.image_size}; "
             + (f"the VAE ({config.latent.vae!r}) encodes to 1/{downsample} of the image side, so they must be "
                f"image_size / {downsample}." if config.latent.vae else "in pixel space they must be equal."))


def check_objective(config) -> None:
  """config.objective with its sampler, config.transport and the flow sampling fields."""
  objective = config.objective
  _require(objective in diffusion_lib.transport.OBJECTIVES,
           f"config.objective must be one of {diffusion_lib.transport.OBJECTIVES}, got {objective!r}.")
  sample = config.sample
  if objective == "diffusion":
    _require(sample.sampler in SAMPLERS,
             f"config.sample.sampler must be one of {SAMPLERS} with config.objective='diffusion', got "
             f"{sample.sampler!r}"
             + (f"; {sample.sampler!r} is a flow-matching sampler: set config.objective='flow' for it." if
                sample.sampler in diffusion_lib.transport.FLOW_SAMPLERS else "."))
    _require(sample.num_steps <= config.diffusion.diffusion_steps,
             f"config.sample.num_steps={sample.num_steps} exceeds the "
             f"{config.diffusion.diffusion_steps} steps of the diffusion (config.diffusion.diffusion_steps).")
    _require(tuple(sample.guidance_interval) == (0.0, 1.0),
             f"config.sample.guidance_interval={tuple(sample.guidance_interval)} is a flow-matching option (t in "
             "[0, 1]); with config.objective='diffusion' leave it at (0.0, 1.0).")
    return
  flow_samplers = diffusion_lib.transport.FLOW_SAMPLERS
  _require(sample.sampler in flow_samplers,
           f"config.sample.sampler must be one of {flow_samplers} with config.objective='flow', got "
           f"{sample.sampler!r}.")
  try:
    transport = diffusion_lib.transport_from_config(config.transport)
  except ValueError as error:
    raise ValueError(f"config.transport: {error}") from None
  _require(sample.num_steps >= 2,
           f"config.sample.num_steps={sample.num_steps}: flow sampling counts time-grid points (SiT's convention) "
           "and needs >= 2.")
  low, high = sample.guidance_interval
  _require(0 <= low <= high <= 1,
           f"config.sample.guidance_interval={tuple(sample.guidance_interval)} must be (low, high) with "
           "0 <= low <= high <= 1 (flow times, 0 = noise).")
  _require(not sample.clip_denoised,
           "config.sample.clip_denoised=True clamps the diffusion's x_0 estimates; flow-matching samplers have "
           "none: set it to False with config.objective='flow'.")
  if sample.sampler == "dopri5":
    _require(sample.atol > 0 and sample.rtol > 0,
             f"config.sample.atol={sample.atol} and rtol={sample.rtol} must be > 0 for dopri5.")
    _require(config.model.name not in objectives.DYNAMIC_FAMILIES,
             f"config.sample.sampler='dopri5' chooses its model evaluations as it runs; a routed model "
             f"(config.model.name={config.model.name!r}) samples on a fixed grid, its FLOPs ratio recorded per "
             "evaluation: use 'euler', 'heun2', 'sde_euler' or 'sde_heun'.")
  if sample.sampler in diffusion_lib.transport.FLOW_SDE_SAMPLERS:
    _require(sample.diffusion_form in diffusion_lib.paths.DIFFUSION_FORMS,
             f"config.sample.diffusion_form={sample.diffusion_form!r} must be one of "
             f"{diffusion_lib.paths.DIFFUSION_FORMS}.")
    last_steps = tuple(step or "" for step in diffusion_lib.transport.LAST_STEPS)
    _require(sample.last_step in last_steps,
             f"config.sample.last_step={sample.last_step!r} must be one of {last_steps} (\"\" = none).")
    if sample.last_step:
      _require(0 < sample.last_step_size < 1,
               f"config.sample.last_step_size={sample.last_step_size} must be in (0, 1).")
    try:  # The SDE's interval (and whether it needs sample_eps) is known now.
      transport.interval(sde=True, eval=True, diffusion_form=sample.diffusion_form,
                         last_step_size=sample.last_step_size if sample.last_step else 0.0)
    except ValueError as error:
      raise ValueError(f"config.transport: {error}") from None
  else:
    try:
      transport.interval(eval=True)
    except ValueError as error:
      raise ValueError(f"config.transport: {error}") from None


def imagenet_latents_message(config) -> str:
  """What to prepare, and how, before a latent-space run (the ImageNet configs) can start."""
  return (
      "this run trains on SD-VAE latents and needs "
      + " and ".join(name for name, value in (("config.data.latent_dir", config.data.latent_dir),
                                               ("config.latent.vae", config.latent.vae)) if not value)
      + ". To prepare them (docs/imagenet.md):\n"
      "  1. ImageNet as tfds imagenet2012 in array_record format (or any folder of class subfolders);\n"
      "  2. the VAE weights: huggingface-cli download stabilityai/sd-vae-ft-ema config.json "
      "diffusion_pytorch_model.safetensors --local-dir sd-vae-ft-ema;\n"
      "  3. python -m dyngen.latent.extract --data=imagenet2012 --vae=sd-vae-ft-ema --output=LATENTS "
      "--image_size=256;\n"
      "then rerun with --config.data.latent_dir=LATENTS --config.latent.vae=sd-vae-ft-ema "
      "(or ':runlocal' for a smoke run on the embedded digits).")


def check_devices(config, num_devices: int, process_count: int = 1) -> None:
  """The mesh against the device count and the batch against the mesh (no arrays are made)."""
  shape = sharding.resolve_mesh_shape(config.mesh.shape, config.mesh.axes, num_devices)
  axis_size = dict(zip(config.mesh.axes, shape))
  rules = sharding.rules_as_tuples(config.sharding.logical_axis_rules)
  for name, target in rules:
    for axis in (target if isinstance(target, tuple) else (target,)):
      _require(axis is None or axis in axis_size,
               f"config.sharding.logical_axis_rules maps {name!r} to mesh axis {axis!r}, but config.mesh.axes "
               f"is {tuple(config.mesh.axes)}.")
  batch_ways = math.prod(axis_size[axis] for axis in sharding.mesh_axes_of(sharding.BATCH_AXIS, rules))
  for path in ("batch_size", "sample.batch_size"):
    value = _get(config, path)
    _require(value % batch_ways == 0,
             f"config.{path}={value} is not divisible by the {batch_ways} data-parallel shards (mesh "
             f"{dict(axis_size)}, batch over {sharding.mesh_axes_of(sharding.BATCH_AXIS, rules)}); use a "
             f"multiple of {batch_ways}.")
    _require(value % process_count == 0,
             f"config.{path}={value} is not divisible by the {process_count} hosts.")


def check_dataset(config, info) -> None:
  """The model against the dataset it will be trained on (`info`: a `dyngen.data.DatasetInfo`)."""
  height, _, channels = info.image_shape
  if config.latent.vae and config.data.name != data_lib.LATENTS:  # Images encoded on the fly.
    height, channels = height // LATENT_DOWNSAMPLING, 4
  _require(config.model.in_channels == channels,
           f"config.model.in_channels={config.model.in_channels} but {info.name} images have {channels} "
           "channel(s).")
  _require(config.model.num_classes == info.num_classes,
           f"config.model.num_classes={config.model.num_classes} but {info.name} has {info.num_classes} classes.")
  _require(config.model.input_size == height,
           f"config.model.input_size={config.model.input_size} but {info.name} yields {height}x{height} images.")


def check_config(config, *, num_devices: int, process_count: int = 1) -> None:
  """Every check that needs neither the dataset nor an array; raises ValueError naming the bad field."""
  check_fields(config)
  check_values(config)
  check_devices(config, num_devices, process_count)
