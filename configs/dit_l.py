"""DiT-L/{2,4,8} on ImageNet 256x256 with the DiT paper's recipe (Peebles & Xie 2023).

  python -m dyngen.main --config=configs/dit_l.py:L/2 --workdir=DIR
  python -m dyngen.main --config=configs/dit_l.py:L/2,runlocal --workdir=DIR   # smoke run on a laptop

Reproduces DiT paper Table 4 (FID-50K at 400K steps, 250 DDPM steps, no guidance)
for DiT-L/2: 23.3 (L/4: 45.6, L/8: 118.9). The model is 458M parameters, 80.71 GFLOPs at L/2.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.experiment_config("dit", arg, "L")
