"""DiT-S/{2,4,8} on ImageNet 256x256 with the DiT paper's recipe (Peebles & Xie 2023).

  python -m dyngen.main --config=configs/dit_s.py:S/2 --workdir=DIR
  python -m dyngen.main --config=configs/dit_s.py:S/2,runlocal --workdir=DIR   # smoke run on a laptop

Reproduces DiT paper Table 4 (FID-50K at 400K steps, 250 DDPM steps, no guidance)
for DiT-S/2: 68.4 (S/4: 100.4, S/8: 153.6). The model is 33M parameters, 6.06 GFLOPs at S/2.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.experiment_config("dit", arg, "S")
