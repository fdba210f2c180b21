"""DiG-L/{2,4,8}: DiT-L with Gated Linear Attention (Zhu et al. 2024), ImageNet 256x256, DiT's recipe.

  python -m dyngen.main --config=configs/dig_l.py:L/2 --workdir=DIR
  python -m dyngen.main --config=configs/dig_l.py:L/2,runlocal --workdir=DIR   # smoke run on a laptop

Reproduces the DiG paper's ImageNet 256x256 FID-50K of DiG-L/2 at 400K steps (250 DDPM steps, no
guidance), set beside DiT-L/2 at the same recipe. The model is 465.0 M parameters and 61.66 GFLOPs at L/2 counted
the paper's way (`dyngen.models.flops.gflops(config.model, convention="paper")`); the complete count,
with the GLA core and SwiGLU down-projection, is higher.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.experiment_config("dig", arg, "L")
