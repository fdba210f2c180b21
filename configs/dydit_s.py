"""DyDiT-S/{2,4,8}: DiT-S fine-tuned under a FLOPs target with dynamic width and tokens (Zhao et al., ICLR 2025).

  python -m dyngen.main --config=configs/dydit_s.py:S/2 --workdir=DIR --config.init_from=DiT-S-2.pt
  python -m dyngen.main --config=configs/dydit_s.py:S/2,ratio=0.7 --workdir=DIR ...
  python -m dyngen.main --config=configs/dydit_s.py:S/2,runlocal --workdir=DIR      # smoke run, no weights

The official recipes (dyngen/recipes/families.py DYDIT_RECIPES): λ=0.5 in two stages in one workdir (stage 1 with
the complete model's loss for 30K steps, then rerun with ':S/2,ratio=0.5,stage=2' to 200K without it),
λ=0.7 in one stage of 150K steps; AdamW at batch 256, timesteps stratified by quartile, updates skipped
above a gradient norm. The warm start is the DiT checkpoint of the same variant (an official .pt or a
dyngen workdir); its routers start fresh with everything on.
"""
from dyngen.recipes import families


def get_config(arg=None):
  return families.dydit_experiment_config(arg, "S")
