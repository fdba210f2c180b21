"""Model fields of each family at the papers' sizes, and the experiment config every family file shares.

`configs/dit_xl.py` and its siblings are one line each on top of `experiment_config`, so the recipe lives
in one place (dyngen/recipes/common.py) and the model sizes in another (dyngen.models.SIZES).
"""
import ml_collections

from dyngen import data as data_lib
from dyngen import models
from dyngen.recipes import common
from dyngen.train import objectives

# Fields every family takes (the official constructors' argument names) with the papers' values.
BASE_MODEL_FIELDS = dict(
    input_size=32,  # 256x256 images as 32x32x4 SD-VAE latents.
    in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True,
    dtype="float32", remat=False,
    # At 256 tokens unrolled without remat is the fastest step; for long sequences (high resolution) set
    # remat=True, scan_blocks=True, which keeps one block's activations alive in the backward (DiG-S/2 at
    # 12544 tokens: 1.30 GiB against 10.5 unrolled). docs/benchmarks/scan_blocks_cpu.md, dig_vs_dit_cpu.md.
    scan_blocks=False)

# Implementation choices per family; "auto" picks by backend (dyngen/models/attention.py, dyngen/pallas_kernels/gla).
FAMILY_FIELDS = {
    "dit": dict(attention="auto", attention_chunk_size=1024),
    "dig": dict(gla_implementation="auto", gla_chunk_size=64),
    "dydit": dict(attention="auto", attention_chunk_size=1024, router_tau=5.0, router_threshold=0.5),
    # 16 SwiGLU channel groups divide DiG's hidden at every size (1024, 2048, 2816, 3072).
    "dydig": dict(gla_implementation="auto", gla_chunk_size=64, mlp_groups=16, router_tau=5.0,
                  router_threshold=0.5),
}
# DiG-XL uses 18 heads so that every head keeps key dim 32 and value dim 64.
FAMILY_HEADS = {("dig", "XL"): 18, ("dydig", "XL"): 18}


def model_config(name, variant):
  """ConfigDict for `dyngen.models.build`, e.g. model_config("dig", "XL/2")."""
  fields = dict(name=name, **BASE_MODEL_FIELDS, **models.variant(variant), **FAMILY_FIELDS[name])
  size = variant.partition("/")[0]
  fields["num_heads"] = FAMILY_HEADS.get((name, size), fields["num_heads"])
  return ml_collections.ConfigDict(fields)


def experiment_config(name, arg, size):
  """The DiT ImageNet 256x256 recipe for family `name`; `arg` = 'S/2', 'B/4,runlocal', 'patch=4', ...

  Args:
    name: the model family ("dit", "dig").
    arg: the string after ':' in --config=configs/<file>.py:<arg>; a variant such as "XL/2" (its size must
      be the file's size), optionally ",runlocal" for a smoke run on the embedded digits.
    size: the file's model size ("S", "B", "L", "XL").
  """
  arg = common.parse_arg(arg, variant=f"{size}/2", runlocal=False)
  if arg.variant.partition("/")[0] != size:
    raise ValueError(f"configs for {name}-{size} take variants {size}/2, {size}/4 or {size}/8, "
                     f"got {arg.variant!r}")
  config = common.training_config()
  config.model = model_config(name, arg.variant)
  # DiT trains on SD-VAE latents of 256x256 ImageNet images, extracted ahead (python -m dyngen.latent.extract):
  # --config.data.latent_dir=LATENTS --config.latent.vae=sd-vae-ft-ema (the weights, to decode samples).
  config.data = data_lib.default_config("latents")
  config.latent.vae = ""
  if arg.runlocal:
    common.shrink_for_runlocal(config, depth=4)
  return config


# DyDiT's official recipes (train0.5.sh, train0.7.sh): fine-tuning DiT-XL/2 at batch 256 from the released
# DiT checkpoint. λ=0.5 runs in two stages in one workdir: stage 1 (30K steps) adds the complete model's
# loss, stage 2 continues to 200K without it. λ=0.7 is one stage of 150K steps with it.
DYDIT_RECIPES = {
    0.5: dict(learning_rate=1e-4, skip_update_grad_norm=200.0, warmup_steps=1000, steps={1: 30_000, 2: 200_000}),
    0.7: dict(learning_rate=2.5e-5, skip_update_grad_norm=50.0, warmup_steps=5000, steps={1: 150_000}),
}
# The file name of the released DiT-XL/2 256x256 weights, the default warm start (pass its path).
DIT_XL_2_CHECKPOINT = "DiT-XL-2-256x256.pt"


def dydit_experiment_config(arg, size, family="dydit"):
  """DyDiT fine-tuning on ImageNet 256x256; `arg` = 'XL/2', 'XL/2,ratio=0.7', 'XL/2,ratio=0.5,stage=2',
  ',runlocal'. The warm start (`config.init_from`) is the dense checkpoint of the same variant (DiT for
  DyDiT; DiG for family "dydig", which takes DyDiT's recipe unchanged)."""
  arg = common.parse_arg(arg, variant=f"{size}/2", ratio=0.5, stage=1, runlocal=False)
  if arg.ratio not in DYDIT_RECIPES:
    raise ValueError(f"DyDiT recipes exist for ratio in {sorted(DYDIT_RECIPES)} (the paper's), got {arg.ratio}; "
                     "for another target take the closest and override --config.dynamic.target_ratio.")
  recipe = DYDIT_RECIPES[arg.ratio]
  if arg.stage not in recipe["steps"]:
    raise ValueError(f"the ratio={arg.ratio} recipe has stage(s) {sorted(recipe['steps'])}, got stage={arg.stage}")
  config = experiment_config(family, f"{arg.variant}", size)
  config.seed = 16  # The official runs' --global-seed.
  dense = {"dydit": "DiT", "dydig": "DiG"}[family]
  config.init_from = (DIT_XL_2_CHECKPOINT if (family, arg.variant) == ("dydit", "XL/2")
                      else f"{dense}-{size}-{arg.variant[-1]}.pt")
  config.optimizer.learning_rate = recipe["learning_rate"]
  config.optimizer.skip_update_grad_norm = recipe["skip_update_grad_norm"]
  config.num_train_steps = recipe["steps"][arg.stage]
  config.checkpoint_every_steps = 3000 if arg.stage == 1 else 5000
  config.dynamic = objectives.default_dynamic_config()
  config.dynamic.update(dict(target_ratio=arg.ratio, warmup_steps=recipe["warmup_steps"],
                             complete_model_loss=arg.stage == 1))
  if arg.runlocal:
    common.shrink_for_runlocal(config, depth=4 if family == "dydig" else 2)
    config.latent.vae = ""
    config.init_from = ""  # A smoke run trains the routed model from scratch.
    if family == "dydig":
      config.model.mlp_groups = 4  # Of the smoke model's 256-wide SwiGLU hidden.
    config.dynamic.update(dict(hold_steps=2, warmup_steps=10))
  return config
