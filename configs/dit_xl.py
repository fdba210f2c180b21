"""DiT-XL/{2,4,8} on ImageNet 256x256 with the DiT paper's recipe (Peebles & Xie 2023).

  python -m dyngen.main --config=configs/dit_xl.py:XL/2 --workdir=DIR
  python -m dyngen.main --config=configs/dit_xl.py:XL/2,runlocal --workdir=DIR   # smoke run on a laptop

Reproduces DiT paper Table 4 (FID-50K at 400K steps, 250 DDPM steps, no guidance)
for DiT-XL/2: 19.5 (XL/4: 43.0, XL/8: 106.4); trained on to 7M steps with cfg 1.5 it reaches FID 2.27
(Table 2). The model is 675M parameters, 118.64 GFLOPs at XL/2.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.experiment_config("dit", arg, "XL")
