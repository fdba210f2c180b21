"""SiT-B/{2,4,8} on ImageNet 256x256 with SiT's recipe (Ma et al. 2024, "SiT: Exploring Flow and Diffusion-based
Generative Models with Scalable Interpolant Transformers"; official code willisma/SiT).

  python -m dyngen.main --config=configs/sit_b.py:B/2 --workdir=DIR --config.data.latent_dir=LATENTS \
      --config.latent.vae=sd-vae-ft-ema
  python -m dyngen.main --config=configs/sit_b.py:B/2,runlocal --workdir=DIR   # smoke run on a laptop

DiT's backbone (model fields named as for DiT), optimiser (AdamW, lr 1e-4, no weight decay), batch 256 and EMA
0.9999, trained with flow matching on the Linear interpolant with velocity prediction; samples for FID-50K with
the SDE (Euler-Maruyama, 250 grid points, w_t = sigma_t, last step "Mean" of 0.04) at guidance 1.5
(dyngen.recipes.families: SIT_TRANSPORT, SIT_SAMPLING). Reproduces the SiT paper's size
comparison at 400K steps (FID-50K without guidance, against DiT of the same size). The official weights
(SiT-XL-2-256x256.pt, a DiT-layout state_dict) load with `--config.init_from=SiT-XL-2-256x256.pt` or
`python -m dyngen.convert`.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.sit_experiment_config(arg, "B")
