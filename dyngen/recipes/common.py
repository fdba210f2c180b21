"""Recipe pieces shared by every experiment config in configs/ (installed as `dyngen.configs`).

An experiment config (`python -m dyngen.main --config=configs/<name>.py`, from any directory):

  from dyngen.recipes import common

  def get_config(arg=None):
    arg = common.parse_arg(arg, variant="XL/2", runlocal=False)
    config = common.training_config()            # the trainer's fields, DiT paper defaults
    config.model = ...                           # the model family's fields (dyngen.models.build)
    config.data = dyngen.data.default_config("imagenet2012")
    if arg.runlocal:
      common.shrink_for_runlocal(config)         # a smoke run of the same recipe on any laptop
    return config

The field list with types is `dyngen.train.config_checks.TRAINER_FIELDS`; the values below are the
defaults of DiT (Peebles & Xie 2023, Sec. 4 "Training"): AdamW, lr 1e-4 constant, no weight decay,
batch 256, EMA decay 0.9999, 1000-step linear schedule with learned sigma; evaluation with 250 DDPM
steps, guidance 1.5 for FID and 4.0 for pictures.
"""
import ml_collections

from dyngen import data as data_lib

# Logical axis -> mesh axes (see dyngen/sharding.py for the names). Parameters: the width (embed) is
# sharded over fsdp, heads / MLP units / adaLN outputs over tensor. Activations: the batch over
# data x fsdp; inside attention and the MLP the heads and units follow their weights over tensor.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("modulation", "tensor"),
    ("kv", None),
    ("classes", None),
    ("freq", None),
    ("patch", None),
    ("out", None),
    ("layers", None),  # The stacked block axis of `model.scan_blocks`.
)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'XL/2,runlocal' or 'variant=B/4,runlocal=False' -> ConfigDict(variant=..., runlocal=...).

  Items are comma-separated: `key=value` (value parsed with the type of the default), a bare `key` of a
  bool default (sets it True), or a bare value containing '/' (the model variant, e.g. 'XL/2').
  """
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    if not has_value and "/" in key and "variant" in defaults:
      key, value = "variant", key
    elif not has_value:
      if not isinstance(defaults.get(key), bool):
        raise ValueError(f"config argument {item!r} is not a switch; known arguments: {sorted(defaults)}.")
      value = "True"
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known arguments: {sorted(defaults)}.")
    default = defaults[key]
    if isinstance(default, bool):
      if value not in ("True", "False", "true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be True or False.")
      parsed[key] = value in ("True", "true", "1")
    else:
      parsed[key] = type(default)(value)
  return parsed


def training_config() -> ml_collections.ConfigDict:
  """Every trainer field with the DiT recipe's values; `model` and `data` are left to the caller."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Warm start: a dyngen workdir / checkpoint or an official PyTorch .pt whose weights initialise the model
  # (the EMA starts from them); "" = train from scratch. Resuming from the workdir takes precedence.
  config.init_from = ""
  config.batch_size = 256  # Global batch over all devices and hosts.
  config.num_train_steps = 400_000  # DiT reports most ablations at 400K steps.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.sample_every_steps = 25_000  # Sample grids to TensorBoard and PNG; 0 = never.

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      warmup_steps=0,  # Linear warm-up from 0; DiT uses none.
      grad_clip_norm=0.0,  # Clip by global norm when > 0; DiT does not clip.
      # Skip the update (params unchanged, EMA and step go on) when the gradient norm exceeds this; 0 = never.
      # DyDiT's recipe skips instead of clipping (its --clip_max_norm).
      skip_update_grad_norm=0.0,
  ))
  config.ema = ml_collections.ConfigDict(dict(
      decay=0.9999,
      # Warm-up: the decay at update s (from 0) is min(decay, (1 + s) / (warmup + s)), so the EMA of a fresh run
      # forgets its random start at once and averages over roughly the last s / warmup updates; 0 = the constant
      # decay of the papers (DiT's EMA holds 0.9999^s of the initialisation at step s).
      warmup=0.0,
  ))

  # What the model learns: "diffusion" (DiT's Gaussian diffusion, config.diffusion) or "flow" (flow matching with
  # SiT's interpolants, config.transport; docs/flow_matching.md). Every family trains and samples with either.
  config.objective = "diffusion"
  # Arguments of dyngen.diffusion.create_transport (objective "flow"), SiT's defaults: path_type "Linear",
  # "GVP" or "VP"; prediction "velocity", "score" or "noise"; loss_weight None, "velocity" or "likelihood"
  # (score / noise only); train_eps / sample_eps None = SiT's per path (Linear / GVP velocity always use 0).
  # A learn_sigma model keeps SiT's layout: its second half of output channels is unused on flow.
  config.transport = ml_collections.ConfigDict(dict(
      path_type="Linear", prediction="velocity", loss_weight=ml_collections.config_dict.placeholder(str),
      train_eps=ml_collections.config_dict.placeholder(float),
      sample_eps=ml_collections.config_dict.placeholder(float)))
  # Arguments of dyngen.diffusion.create_diffusion for training (learn_sigma follows config.model).
  config.diffusion = ml_collections.ConfigDict(dict(
      noise_schedule="linear", diffusion_steps=1000, predict_xstart=False, use_kl=False, sigma_small=False,
      rescale_learned_sigmas=False))
  # Latent diffusion: `vae` is the SD-VAE weights (a diffusers folder or its .safetensors / .bin file; see
  # dyngen.latent.load_autoencoder), used to encode images on the fly (pixel data) and to decode samples;
  # "" trains in pixel space. Training on extracted latents sets config.data to dyngen.data.latents.
  config.latent = ml_collections.ConfigDict(dict(vae="", scale_factor=0.18215))

  config.sample = ml_collections.ConfigDict(dict(
      # Diffusion: "ddpm" (ancestral) or "ddim". Flow: "euler", "heun2", "dopri5" (probability-flow ODE) or
      # "sde_euler", "sde_heun" (SiT's SDE: Euler-Maruyama or Heun).
      sampler="ddpm",
      num_steps=250,  # Diffusion: respaced steps. Flow: time-grid points, as SiT (num_steps - 1 steps).
      eta=0.0,  # DDIM only.
      atol=1e-6,  # Flow, dopri5: absolute tolerance (SiT's default).
      rtol=1e-3,  # Flow, dopri5: relative tolerance (SiT's default).
      diffusion_form="sigma",  # Flow SDE: w_t ("constant", "SBDM", "sigma", "linear", "decreasing", ...).
      diffusion_norm=1.0,  # Flow SDE: the scale of w_t.
      last_step="Mean",  # Flow SDE: "Mean", "Tweedie", "Euler" or "" (none), SiT's last-step handling.
      last_step_size=0.04,  # Flow SDE: the last step's length; the stochastic grid ends at 1 - last_step_size.
      # Flow: guide only while t (0 = noise, 1 = data) lies in [low, high] (guidance interval); (0, 1) = always.
      guidance_interval=(0.0, 1.0),
      cfg_scale=1.5,  # Guidance for `--mode=sample` (DiT's FID setting).
      guidance_channels=3,  # Guide the first 3 output channels as the official code; 0 = all channels.
      clip_denoised=False,
      num_samples=50_000,  # `--mode=sample`: how many images (ADM's FID-50K).
      batch_size=256,  # Images per sampling call, over all devices.
      seed=0,
      checkpoint="",  # `--mode=sample`: a checkpoint path; "" = the newest in the workdir.
      grid_size=16,  # Images in the periodic training grids.
      grid_cfg_scale=4.0,  # DiT's setting for pictures.
      # Also a grid of the raw (non-EMA) weights at each grid step: early in a run the EMA still holds much
      # of the random initialisation (0.9999^s of it at step s) and its grid looks like noise.
      raw_grid=False,
      # DyDiT sampling (docs/dydit_fast.md): "fast" runs the routed units only, "masked" the masked reference.
      routing="fast",
      width_cap=1.0,  # Fast path: at most this fraction of heads and of MLP groups per block and step, in (0, 1].
      token_capacity=1.0,  # Fast path: at most this fraction of tokens per block through the MLP, in (0, 1].
      calibrate_tokens=True,  # Fast path: token capacities from the router on the first batch (else the cap).
      calibration_batches=1,  # Fast path: calibrate on this many batches (the first, then fresh noise for it).
      token_pooling="row",  # Fast path: "row" (capacity per row) or "batch" (per row on average over the batch).
      capacity_buckets=4,  # Fast path: head / group counts rounded up to multiples of H / capacity_buckets.
      max_programs=8,  # Fast path: at most this many compiled programs (segments) per batch shape.
  ))
  # Sample-quality metrics (dyngen/train/evaluation.py): "" = none, "digits" = digits-classifier accuracy and
  # Frechet distance.
  # "adm_fid" = ADM's FID, sFID, IS, precision, recall against `reference` with the Inception at `inception`.
  config.evaluation = ml_collections.ConfigDict(dict(metric="", num_samples=0, every_steps=0, reference="",
                                                     inception=""))

  config.mesh = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(-1, 1, 1)))
  config.sharding = ml_collections.ConfigDict(dict(logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES))
  # Trace steps [first_step, first_step + num_steps) to workdir for TensorBoard's profiler; 0 steps = off.
  config.profile = ml_collections.ConfigDict(dict(first_step=10, num_steps=5))
  return config


def shrink_for_runlocal(config: ml_collections.ConfigDict, depth: int = 2) -> ml_collections.ConfigDict:
  """Turns a real config into a smoke run of the same code path that finishes in about a minute on a CPU.

  The model keeps its family and implementation fields but becomes `depth` blocks (DiG needs a multiple
  of 4) of width 64 on the embedded 8x8 digits; the schedule of logging, checkpointing and sampling is
  compressed to a few steps.
  """
  config.data = data_lib.default_config("digits")
  config.model.update(dict(input_size=8, patch_size=2, in_channels=1, num_classes=10, hidden_size=64,
                           depth=depth, num_heads=4))
  config.batch_size = 16
  config.num_train_steps = 20
  config.log_every_steps = 5
  config.checkpoint_every_steps = 10
  config.sample_every_steps = 20
  config.sample.update(dict(num_steps=10, num_samples=32, batch_size=16, grid_size=16,
                            guidance_channels=0))  # One channel: guide all (DiT guides 3 of 4 latents).
  config.profile.num_steps = 0
  if config.evaluation.metric:
    config.evaluation.num_samples = 100
  return config
