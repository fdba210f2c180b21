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


# SiT's recipe (Ma et al. 2024; willisma/SiT train.py and sample_ddp.py): DiT's backbone, optimiser, batch and
# EMA unchanged, the Linear interpolant with velocity prediction and no loss weight, and for FID-50K the SDE
# (Euler-Maruyama, w_t = sigma_t, last step "Mean" of 0.04) on 250 grid points with guidance 1.5.
SIT_TRANSPORT = dict(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
SIT_SAMPLING = dict(sampler="sde_euler", num_steps=250, diffusion_form="sigma", diffusion_norm=1.0,
                    last_step="Mean", last_step_size=0.04, cfg_scale=1.5, clip_denoised=False)


def on_flow_matching(config):
  """`config` switched to SiT's flow matching (config.objective = "flow") with SiT's sampling; the model keeps
  its fields (a learn_sigma model keeps SiT's layout, the variance half unused), so any family can switch."""
  config.objective = "flow"
  config.transport.update(SIT_TRANSPORT)
  config.sample.update(SIT_SAMPLING)
  return config


def experiment_config(name, arg, size, objective="diffusion"):
  """The DiT ImageNet 256x256 recipe for family `name`; `arg` = 'S/2', 'B/4,runlocal', 'XL/2,objective=flow'.

  Args:
    name: the model family ("dit", "dig", ...).
    arg: the string after ':' in --config=configs/<file>.py:<arg>; a variant such as "XL/2" (its size must
      be the file's size), optionally ",runlocal" for a smoke run on the embedded digits, and
      ",objective=flow" for SiT's flow matching instead of the Gaussian diffusion (`on_flow_matching`).
    size: the file's model size ("S", "B", "L", "XL").
    objective: the default of the `objective` argument.
  """
  arg = common.parse_arg(arg, variant=f"{size}/2", runlocal=False, objective=objective)
  if arg.variant.partition("/")[0] != size:
    raise ValueError(f"configs for {name}-{size} take variants {size}/2, {size}/4 or {size}/8, "
                     f"got {arg.variant!r}")
  if arg.objective not in ("diffusion", "flow"):
    raise ValueError(f"config argument objective={arg.objective!r} must be 'diffusion' or 'flow'.")
  config = common.training_config()
  if arg.objective == "flow":
    on_flow_matching(config)
  config.model = model_config(name, arg.variant)
  # DiT trains on SD-VAE latents of 256x256 ImageNet images, extracted ahead (python -m dyngen.latent.extract):
  # --config.data.latent_dir=LATENTS --config.latent.vae=sd-vae-ft-ema (the weights, to decode samples).
  config.data = data_lib.default_config("latents")
  config.latent.vae = ""
  if arg.runlocal:
    common.shrink_for_runlocal(config, depth=4)
  return config


# SiT trains XL/2 for 7M steps (FID-50K 2.06 with cfg 1.5 and the SDE); the other sizes are compared at 400K.
SIT_TRAIN_STEPS = {"S": 400_000, "B": 400_000, "L": 400_000, "XL": 7_000_000}


def sit_experiment_config(arg, size):
  """SiT on ImageNet 256x256: DiT's backbone (family "dit", DiT's field names) on SiT's flow matching."""
  config = experiment_config("dit", arg, size, objective="flow")
  if config.objective != "flow":
    raise ValueError("the SiT configs train flow matching; for the diffusion use configs/dit_*.py.")
  if config.data.name != "digits":  # not runlocal
    config.num_train_steps = SIT_TRAIN_STEPS[size]
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
# The released SiT-XL/2 256x256 weights (DiT's layout), the warm start of DyDiT on flow matching.
SIT_XL_2_CHECKPOINT = "SiT-XL-2-256x256.pt"


def dydit_experiment_config(arg, size, family="dydit"):
  """DyDiT fine-tuning on ImageNet 256x256; `arg` = 'XL/2', 'XL/2,ratio=0.7', 'XL/2,ratio=0.5,stage=2',
  ',runlocal'. The warm start (`config.init_from`) is the dense checkpoint of the same variant (DiT for
  DyDiT; DiG for family "dydig", which takes DyDiT's recipe unchanged)."""
  arg = common.parse_arg(arg, variant=f"{size}/2", ratio=0.5, stage=1, runlocal=False, objective="diffusion")
  if arg.ratio not in DYDIT_RECIPES:
    raise ValueError(f"DyDiT recipes exist for ratio in {sorted(DYDIT_RECIPES)} (the paper's), got {arg.ratio}; "
                     "for another target take the closest and override --config.dynamic.target_ratio.")
  recipe = DYDIT_RECIPES[arg.ratio]
  if arg.stage not in recipe["steps"]:
    raise ValueError(f"the ratio={arg.ratio} recipe has stage(s) {sorted(recipe['steps'])}, got stage={arg.stage}")
  config = experiment_config(family, f"{arg.variant},objective={arg.objective}", size)
  config.seed = 16  # The official runs' --global-seed.
  dense = {"dydit": "DiT", "dydig": "DiG"}[family]
  if arg.objective == "flow":  # The dense model on flow matching: SiT for DyDiT, a flow-trained DiG for DyDiG.
    config.init_from = (SIT_XL_2_CHECKPOINT if (family, arg.variant) == ("dydit", "XL/2") else
                        f"SiT-{size}-{arg.variant[-1]}.pt" if family == "dydit" else
                        f"DiG-{size}-{arg.variant[-1]}-flow")
  else:
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
