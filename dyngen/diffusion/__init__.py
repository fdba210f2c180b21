"""Gaussian diffusion (DiT semantics): schedules and respacing, training losses, DDPM / DDIM loops, guidance.

  diffusion = create_diffusion("250")                      # or "" for training, "ddim50", "10,15,20"
  model_fn = guided_model_fn(apply_fn, y, cfg_scale=4.0)   # classifier-free guidance on a doubled batch
  x0 = jax.jit(lambda x: diffusion.p_sample_loop(model_fn, x, key=key))(x_T)

Flow matching with SiT's interpolants (t = 0 noise, t = 1 data; see transport.py):

  transport = create_transport("Linear", "velocity")
  x1 = jax.jit(lambda x: transport.sample_ode(first_channels(model_fn, 4), x, "heun2", num_steps=125))(x_T)
"""
from dyngen.diffusion.gaussian_diffusion import GaussianDiffusion
from dyngen.diffusion.gaussian_diffusion import LossType
from dyngen.diffusion.gaussian_diffusion import MeanType
from dyngen.diffusion.gaussian_diffusion import Trajectory
from dyngen.diffusion.gaussian_diffusion import VarianceType
from dyngen.diffusion.gaussian_diffusion import create_diffusion
from dyngen.diffusion.guidance import check_labels
from dyngen.diffusion.guidance import guided_model_fn
from dyngen.diffusion.paths import GVPPath
from dyngen.diffusion.paths import LinearPath
from dyngen.diffusion.paths import VPPath
from dyngen.diffusion.schedules import space_timesteps
from dyngen.diffusion.transport import LossWeight
from dyngen.diffusion.transport import ObjectiveInterface
from dyngen.diffusion.transport import Prediction
from dyngen.diffusion.transport import Transport
from dyngen.diffusion.transport import create_transport
from dyngen.diffusion.transport import first_channels
from dyngen.diffusion.transport import interval_guided_model_fn
from dyngen.diffusion.transport import objective_interface
from dyngen.diffusion.transport import transport_from_config
