"""DyDiG-XL/{2,4,8}: DyDiT's dynamic width and tokens on DiG-XL blocks (new in dyngen; no paper numbers yet).

  python -m dyngen.main --config=configs/dydig_xl.py:XL/2 --workdir=DIR --config.init_from=DIG_CHECKPOINT
  python -m dyngen.main --config=configs/dydig_xl.py:XL/2,runlocal --workdir=DIR      # smoke run, no weights

DyDiT's recipe unchanged (dyngen/recipes/families.py DYDIT_RECIPES, ratio=0.5 or 0.7, stages as DyDiT's), warm-
started from a DiG checkpoint of the same variant (an official .pth through the converter, or a dyngen
workdir); the routers start fresh with everything on. Heads are DiG-XL's 18 GLA heads; the SwiGLU hidden
(3072) is cut into 16 routed channel groups (model.mlp_groups).
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.dydit_experiment_config(arg, "XL", family="dydig")
