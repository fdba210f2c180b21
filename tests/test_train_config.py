"""Config checks: typos, wrong types and impossible sizes stop before any compute, naming the field."""
import pathlib
import re

import ml_collections
import pytest

from dyngen.recipes import common
from dyngen.train import config_checks
from dyngen.train import trainer

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_trainer_fields_and_common_defaults_are_the_same_set():
  leaves = {path for path, _ in config_checks._leaf_paths(common.training_config())}  # pylint: disable=protected-access
  assert leaves == set(config_checks.TRAINER_FIELDS)


def test_dit_recipe_defaults():
  config = common.training_config()
  # DiT (Peebles & Xie 2023, Sec. 4): AdamW lr 1e-4, no weight decay, batch 256, EMA 0.9999.
  assert (config.optimizer.learning_rate, config.optimizer.weight_decay, config.batch_size, config.ema.decay) == (
      1e-4, 0.0, 256, 0.9999)
  assert (config.optimizer.b1, config.optimizer.b2) == (0.9, 0.999)


def test_parse_arg():
  parsed = common.parse_arg("XL/2,runlocal", variant="S/2", runlocal=False, steps=10)
  assert (parsed.variant, parsed.runlocal, parsed.steps) == ("XL/2", True, 10)
  parsed = common.parse_arg("variant=B/4,runlocal=False,steps=7", variant="S/2", runlocal=True, steps=10)
  assert (parsed.variant, parsed.runlocal, parsed.steps) == ("B/4", False, 7)
  assert common.parse_arg(None, runlocal=False).runlocal is False
  with pytest.raises(ValueError, match="unknown config argument 'fast'"):
    common.parse_arg("fast=1", runlocal=False)
  with pytest.raises(ValueError, match="'steps' is not a switch"):
    common.parse_arg("steps", steps=10)


# Files defining get_config at top level (common.py only shows one in its docstring).
EXPERIMENT_CONFIGS = [path for path in sorted(CONFIG_DIR.glob("*.py"))
                      if re.search(r"^def get_config\(", path.read_text(), re.MULTILINE)]


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_config_file_runlocal_passes_the_checks(path):
  namespace = {}
  exec(compile(path.read_text(), str(path), "exec"), namespace)  # pylint: disable=exec-used
  config = namespace["get_config"]("runlocal")
  config_checks.check_config(config, num_devices=1)


def _set(path, value):
  """A change of the config's plain-dict form: a config file can write any value, ConfigDict types follow it."""
  def change(tree):
    *parents, leaf = path.split(".")
    for parent in parents:
      tree = tree[parent]
    tree[leaf] = value
  return change


@pytest.mark.parametrize("change, message", [
    (_set("optimizer.lr", 1e-3), r"config\.optimizer\.lr is not a field the trainer reads"),
    (_set("num_train_step", 5), r"config\.num_train_step is not a field.*Did you mean config\.num_train_steps\?"),
    (_set("data.imagesize", 8), r"config\.data has unknown field\(s\) \['imagesize'\]"),
    (_set("batch_size", "256"), r"config\.batch_size must be an int, got '256'"),
    (_set("seed", True), r"config\.seed must be an int, got True"),
    (_set("ema.decay", "0.9999"), r"config\.ema\.decay must be a number"),
    (_set("mesh.shape", (-1, "1", 1)), r"config\.mesh\.shape must be a tuple of ints"),
    (_set("model.input_size", 9), r"model\.input_size=9 is not divisible by model\.patch_size=2"),
    (lambda tree: tree["model"].update(hidden_size=36, num_heads=8),
     r"model\.hidden_size=36 is not divisible by model\.num_heads=8"),
    (_set("model.input_size", 16), r"config\.model\.input_size=16 but config\.data\.image_size=8"),
    (_set("model.hidden_sise", 32), r"unknown model config field\(s\) \['hidden_sise'\]"),
    (_set("sample.sampler", "euler"), r"config\.sample\.sampler must be one of \('ddpm', 'ddim'\)"),
    (_set("sample.num_steps", 2000), r"config\.sample\.num_steps=2000 exceeds the 1000 steps"),
    (_set("ema.decay", 1.5), r"config\.ema\.decay must be in \[0, 1\], got 1\.5"),
    (_set("batch_size", 0), r"config\.batch_size must be > 0, got 0"),
    (_set("sample.guidance_channels", 3), r"config\.sample\.guidance_channels=3 but the model predicts 1 "
     r"channel\(s\); use 0 \(guide all channels\) or at most 1"),
    (_set("evaluation.metric", "fid"), r"config\.evaluation\.metric must be one of \('', 'digits', 'adm_fid'\)"),
    (_set("evaluation.metric", "adm_fid"), r"config\.evaluation\.metric='adm_fid' needs config\.evaluation\.reference"),
])
def test_bad_fields_are_named(tiny_config, change, message):
  tree = tiny_config().to_dict()
  change(tree)
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(ml_collections.ConfigDict(tree), num_devices=1)


@pytest.mark.parametrize("mesh_shape, batch_size, num_devices, message", [
    ((-1, 1, 1), 12, 8, r"config\.batch_size=12 is not divisible by the 8 data-parallel shards"),
    ((2, 4, 1), 12, 8, r"config\.batch_size=12 is not divisible by the 8 data-parallel shards"),
    ((2, 2, 1), 8, 8, r"config\.mesh\.shape \(2, 2, 1\) .* needs 4 devices but 8 are available"),
    ((-1, -1, 1), 8, 8, r"more than one -1"),
    ((-1, 3, 1), 9, 8, r"the fixed axes use 3 devices, which does not divide the 8 available"),
    ((-1, 1), 8, 8, r"config\.mesh\.shape \(-1, 1\) has 2 entries but config\.mesh\.axes"),
])
def test_mesh_and_batch_against_the_devices(tiny_config, mesh_shape, batch_size, num_devices, message):
  config = tiny_config(batch_size=batch_size, sample__batch_size=8)
  config.mesh.shape = mesh_shape
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(config, num_devices=num_devices)


def test_tensor_axis_does_not_split_the_batch(tiny_config):
  # (data 2, fsdp 2, tensor 2): the batch is split 4 ways, so 12 is fine and 10 is not.
  config = tiny_config(batch_size=12, sample__batch_size=8)
  config.mesh.shape = (2, 2, 2)
  config_checks.check_config(config, num_devices=8)
  config.batch_size = 10
  with pytest.raises(ValueError, match=r"batch_size=10 is not divisible by the 4 data-parallel shards"):
    config_checks.check_config(config, num_devices=8)


def test_rule_naming_a_missing_mesh_axis(tiny_config):
  config = tiny_config()
  config.sharding.logical_axis_rules = (("batch", ("data", "pipeline")),)
  with pytest.raises(ValueError, match=r"maps 'batch' to mesh axis 'pipeline'"):
    config_checks.check_config(config, num_devices=1)


def test_trainer_refuses_before_touching_the_workdir(tmp_path, tiny_config):
  config = tiny_config()
  config.optimizer.lr = 1e-3
  with pytest.raises(ValueError, match=r"config\.optimizer\.lr is not a field"):
    trainer.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
