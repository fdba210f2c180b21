"""DiT-B/{2,4,8} on ImageNet 256x256 with the DiT paper's recipe (Peebles & Xie 2023).

  python -m dyngen.main --config=configs/dit_b.py:B/2 --workdir=DIR
  python -m dyngen.main --config=configs/dit_b.py:B/2,runlocal --workdir=DIR   # smoke run on a laptop

Reproduces DiT paper Table 4 (FID-50K at 400K steps, 250 DDPM steps, no guidance)
for DiT-B/2: 43.5 (B/4: 68.4, B/8: 122.7). The model is 130M parameters, 23.01 GFLOPs at B/2.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.experiment_config("dit", arg, "B")
