"""`load_torch_params(path, model_config)`: an official PyTorch checkpoint -> dyngen Flax params.

The family's rule table is dyngen/convert/<model_config.name>.py (`param_rules(model) -> (rules, buffers)`);
the expected shapes come from the model itself (`jax.eval_shape` of its init), so a checkpoint of another
architecture or size fails with the full list of differences.
"""
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from dyngen import models
from dyngen.models import layers
from dyngen.convert import param_mapping
from dyngen.convert import torch_checkpoint

# Where the official training scripts keep the weights, in order of preference (EMA weights sample best).
STATE_DICT_KEYS = ("ema", "model", "state_dict")


def _is_state_dict(node):
  return (isinstance(node, dict) and len(node) > 0
          and all(isinstance(k, str) and isinstance(v, torch_checkpoint.TensorRef) for k, v in node.items()))


def select_state_dict(tree, source="checkpoint"):
  """The state dict inside a loaded checkpoint: the object itself, or its 'ema', 'model' or 'state_dict'.

  Returns (state_dict, key) with key None for a raw state dict. A uniform 'module.' prefix (a model
  saved wrapped in DistributedDataParallel) is removed.
  """
  key = None
  if not _is_state_dict(tree):
    candidates = [k for k in STATE_DICT_KEYS if isinstance(tree, dict) and _is_state_dict(tree.get(k))]
    if not candidates:
      found = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
      raise torch_checkpoint.CheckpointFormatError(
          f"{source}: no state dict found; expected a dict of tensors or a dict with one of the keys "
          f"{list(STATE_DICT_KEYS)} holding one, got {found}")
    key = candidates[0]
    tree = tree[key]
  if all(name.startswith("module.") for name in tree):
    tree = {name[len("module."):]: value for name, value in tree.items()}
  return tree, key


def family_rules(name):
  """`param_rules` of dyngen/convert/<name>.py."""
  try:
    module = importlib.import_module(f"dyngen.convert.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"dyngen.convert.{name}":
      raise
    raise ValueError(f"no PyTorch converter for model family {name!r}; converters live in "
                     "dyngen/convert/<name>.py (dit, dig, dydit)") from None
  return module.param_rules


def expected_param_shapes(model):
  """{'a/b/kernel': shape} of `model`'s params, from abstract evaluation of init (nothing allocated)."""
  x = jnp.zeros((1, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, x, t, t)
  return param_mapping.flatten_shapes(nn.unbox(variables["params"]))


def describe(model_config):
  fields = ", ".join(f"{k}={v!r}" for k, v in sorted(dict(model_config).items()) if k != "name")
  return f"model {model_config.name!r} ({fields})"


def load_torch_params(path, model_config):
  """Reads an official PyTorch checkpoint (no torch, no code from the file runs) as Flax params.

  Returns the nested dict of float32 numpy arrays that `build(model_config).apply({'params': ...})` takes
  (unboxed: no partitioning metadata), the blocks stacked when `model_config.scan_blocks` is set. Raises
  torch_checkpoint.UnsafeCheckpointError for a pickle naming anything but tensors and plain containers,
  CheckpointFormatError for files that are no state dict, and param_mapping.ParamMappingError when the
  weights do not fit the configured model.
  """
  model = models.build(model_config)
  scanned = model.scan_blocks
  model = model.clone(scan_blocks=False)  # The rules name the official per-block layout; stacked below.
  param_rules = family_rules(model_config.name)
  with torch_checkpoint.TorchCheckpoint(path) as checkpoint:
    state_dict, key = select_state_dict(checkpoint.tree, checkpoint.path)
    state_dict = checkpoint.materialize(state_dict)
  rules, buffers = param_rules(model)
  where = f"{path}" + (f"['{key}']" if key else "")
  params = param_mapping.apply_rules(state_dict, rules, buffers, expected_param_shapes(model),
                                     f"{describe(model_config)}; checkpoint {where}")
  return layers.stack_block_params(params, model.depth) if scanned else params
