r"""The embedded quickstart on flow matching: the quickstart's small DiT on the 8x8 digits, trained with SiT's
linear interpolant and velocity prediction (Ma et al. 2024) instead of the Gaussian diffusion (CPU).

  python -m dyngen.main --config=configs/flow_quickstart.py --workdir=/tmp/flow_quickstart

The recipe is configs/quickstart.py's (data, model size, optimiser, EMA, schedule, guidance scale 2 on the
one channel, 1,000 samples scored by the digits classifier) with these changes: `objective="flow"` on
SiT's default transport (Linear path, velocity prediction, no loss weight, epsilons 0); no learned variance
(flow matching has none: the model outputs 1 channel); and sampling with Heun's second-order ODE solver on
51 time-grid points (50 steps, 100 model evaluations, as many as the quickstart's 100 DDPM steps).
docs/benchmarks/flow_digits_cpu.md compares the samplers and step counts on this checkpoint.

`:runlocal` shrinks it to a one-minute smoke run.
"""
from dyngen.configs import quickstart
from dyngen.recipes import common


def get_config(arg=None):
  arg = common.parse_arg(arg, runlocal=False)
  config = quickstart.get_config("runlocal" if arg.runlocal else None)
  return on_flow_matching(config, arg.runlocal)


def on_flow_matching(config, runlocal=False):
  """A digits config moved onto SiT's default flow matching, sampled with Heun at 100 evaluations."""
  config.objective = "flow"
  config.transport.update(dict(path_type="Linear", prediction="velocity"))
  config.model.learn_sigma = False  # Flow matching learns no variance.
  config.sample.sampler = "heun2"
  config.sample.num_steps = 6 if runlocal else 51
  config.sample.clip_denoised = False  # The ODE has no x_0 estimate to clamp.
  # The EMA warm-up the figures of docs/benchmarks/flow_digits_cpu.md were measured with (the DDPM quickstart
  # has none since: there it raised the Frechet distance; this run was not repeated without it).
  config.ema.warmup = 3.0
  return config
