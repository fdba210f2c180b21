"""SD-VAE weights in the diffusers layout -> the Flax AutoencoderKL params, without torch.

Files: `diffusion_pytorch_model.safetensors` (read with safetensors' numpy API) or
`diffusion_pytorch_model.bin` (a torch pickle, read by dyngen's safe reader: no code from the file runs).
A folder may be given instead of a file: its weights file is used, and its `config.json` (the diffusers
config) gives the architecture; without one the sd-vae-ft-ema / ft-mse architecture is assumed.

Names: the diffusers AutoencoderKL state dict. The two mid-block attentions are accepted under the current
names (`to_q`, `to_k`, `to_v`, `to_out.0`) and the older ones the 2022 files (sd-vae-ft-ema / ft-mse) use
(`query`, `key`, `value`, `proj_attn`); their weights may be Linear (out, in) or, in the oldest files,
1x1 convs (out, in, 1, 1). Torch convs (out, in, kh, kw) become Flax (kh, kw, in, out).

A file that does not describe the configured model fails with one `ParamMappingError` listing every
missing, unexpected and mis-shaped tensor (dyngen/convert/param_mapping.py).
"""
import json
import math
import os
import re

import numpy as np

from dyngen.convert import param_mapping as pm
from dyngen.convert import torch_checkpoint
from dyngen.latent import autoencoder as autoencoder_lib

WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_FILE_NAME = "config.json"

# Older diffusers attention names -> current ones (diffusers renames them the same way when loading).
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION = re.compile(r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+)\.(query|key|value|proj_attn)"
                               r"\.(weight|bias)$")
_ATTENTION_LINEAR = re.compile(r"^(?:encoder|decoder)\.mid_block\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0)"
                               r"\.weight$")


def group_norm_rules(path, source):
  return [pm.Rule(f"{path}/scale", f"{source}.weight", pm.Flat()), pm.Rule(f"{path}/bias", f"{source}.bias", pm.Flat())]


def resnet_rules(path, source, has_shortcut):
  """ResnetBlock2D: norm1, conv1, norm2, conv2 (+ conv_shortcut), in diffusers' registration order."""
  rules = (group_norm_rules(f"{path}/norm1", f"{source}.norm1") + pm.conv(f"{path}/conv1", f"{source}.conv1")
           + group_norm_rules(f"{path}/norm2", f"{source}.norm2") + pm.conv(f"{path}/conv2", f"{source}.conv2"))
  if has_shortcut:
    rules += pm.conv(f"{path}/conv_shortcut", f"{source}.conv_shortcut")
  return rules


def attention_rules(path, source):
  return (group_norm_rules(f"{path}/group_norm", f"{source}.group_norm")
          + pm.linear(f"{path}/to_q", f"{source}.to_q") + pm.linear(f"{path}/to_k", f"{source}.to_k")
          + pm.linear(f"{path}/to_v", f"{source}.to_v") + pm.linear(f"{path}/to_out", f"{source}.to_out.0"))


def mid_block_rules(path, source, config):
  # diffusers registers the attentions before the resnets, so a state dict lists them first.
  rules = attention_rules(f"{path}/attentions_0", f"{source}.attentions.0") if config.mid_block_add_attention else []
  return rules + resnet_rules(f"{path}/resnets_0", f"{source}.resnets.0", False) + resnet_rules(
      f"{path}/resnets_1", f"{source}.resnets.1", False)


def param_rules(config: autoencoder_lib.AutoencoderKLConfig) -> list[pm.Rule]:
  """One rule per Flax param of AutoencoderKL(config), in the order of diffusers' state dict."""
  channels = config.block_out_channels
  last = len(channels) - 1
  rules = pm.conv("encoder/conv_in", "encoder.conv_in")
  previous = channels[0]
  for i, out in enumerate(channels):
    for j in range(config.layers_per_block):
      rules += resnet_rules(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}",
                            (previous if j == 0 else out) != out)
    if i < last:
      rules += pm.conv(f"encoder/down_blocks_{i}/downsamplers_0/conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    previous = out
  rules += mid_block_rules("encoder/mid_block", "encoder.mid_block", config)
  rules += group_norm_rules("encoder/conv_norm_out", "encoder.conv_norm_out")
  rules += pm.conv("encoder/conv_out", "encoder.conv_out")

  reversed_channels = tuple(reversed(channels))
  rules += pm.conv("decoder/conv_in", "decoder.conv_in")
  # diffusers' Decoder registers up_blocks before mid_block (the list is created first, filled later).
  previous = reversed_channels[0]
  for i, out in enumerate(reversed_channels):
    for j in range(config.layers_per_block + 1):
      rules += resnet_rules(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}",
                            (previous if j == 0 else out) != out)
    if i < last:
      rules += pm.conv(f"decoder/up_blocks_{i}/upsamplers_0/conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
    previous = out
  rules += mid_block_rules("decoder/mid_block", "decoder.mid_block", config)
  rules += group_norm_rules("decoder/conv_norm_out", "decoder.conv_norm_out")
  rules += pm.conv("decoder/conv_out", "decoder.conv_out")
  if config.use_quant_conv:
    rules += pm.conv("quant_conv", "quant_conv")
  if config.use_post_quant_conv:
    rules += pm.conv("post_quant_conv", "post_quant_conv")
  return rules


def state_dict_shapes(config: autoencoder_lib.AutoencoderKLConfig) -> dict[str, tuple[int, ...]]:
  """{diffusers name: torch shape} of AutoencoderKL(config), in the order of its state dict."""
  shapes = pm.flatten_shapes(autoencoder_lib.param_shapes(config))
  return {rule.source: rule.layout.torch_shape(shapes[rule.path]) for rule in param_rules(config)}


def seeded_state_dict(config: autoencoder_lib.AutoencoderKLConfig, seed: int, gain: float = 1.0) -> dict:
  """Random weights of the real architecture in the diffusers layout: {name: float32 array}.

  The rule of the shared sd_vae fixture (one numpy PCG64 generator walking the state dict in order): conv /
  linear weights N(0, 1) * sqrt(gain / fan_in), norm scales U(0.8, 1.2), biases N(0, 0.02), each drawn in
  float64 and cast to float32. GroupNorm before every conv keeps activations O(1) at gain 1, so benchmarks
  and end-to-end tests run on realistic magnitudes. Write it with `safetensors.numpy.save_file`.
  """
  rng = np.random.default_rng(seed)
  state_dict = {}
  for name, shape in state_dict_shapes(config).items():
    if len(shape) >= 2:
      values = rng.standard_normal(size=shape) * math.sqrt(gain / math.prod(shape[1:]))
    elif name.endswith("weight"):
      values = rng.uniform(0.8, 1.2, size=shape)
    else:
      values = rng.normal(0.0, 0.02, size=shape)
    state_dict[name] = values.astype(np.float32)
  return state_dict


def canonical_state_dict(state_dict: dict, source: str = "checkpoint") -> dict:
  """Renames the older attention names to the current ones and squeezes 1x1-conv attention weights.

  Raises ValueError when a file holds a tensor under both spellings (it would be ambiguous which is meant).
  """
  renamed, both = {}, []
  for name, array in state_dict.items():
    match = _LEGACY_ATTENTION.match(name)
    new_name = f"{match[1]}.{LEGACY_ATTENTION_NAMES[match[2]]}.{match[3]}" if match else name
    if new_name in renamed or (match and new_name in state_dict):
      both.append(f"{name} / {new_name}")
    renamed[new_name] = array
  if both:
    raise ValueError(f"{source} holds mid-block attention tensors under both the old and the current diffusers "
                     f"names: {both}; keep one spelling")
  for name, array in renamed.items():
    if _ATTENTION_LINEAR.match(name) and np.ndim(array) == 4 and tuple(np.shape(array)[2:]) == (1, 1):
      renamed[name] = np.asarray(array).reshape(np.shape(array)[:2])  # a 1x1 conv is the same (out, in) matrix
  return renamed


def _layout_hint(state_dict):
  names = list(state_dict)
  if any(n.startswith("first_stage_model.") or n.startswith("encoder.down.") for n in names):
    return ("; the names look like the original CompVis/ldm layout ('encoder.down.0.block.0...'), not "
            "diffusers': use the diffusers file (e.g. stabilityai/sd-vae-ft-ema's "
            "diffusion_pytorch_model.safetensors)")
  return ""


def resolve_weights_path(path) -> str:
  """The weights file `path` names: the file itself, or the diffusers weights file inside a folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for folder in (path, os.path.join(path, "vae")):  # a VAE folder, or a whole pipeline folder
      for name in WEIGHT_FILE_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
          return os.path.join(folder, name)
    raise FileNotFoundError(f"{path} is a folder without {' or '.join(WEIGHT_FILE_NAMES)} (nor a vae/ subfolder "
                            "holding one); download them from the diffusers VAE repository, e.g. "
                            "stabilityai/sd-vae-ft-ema")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VAE weights {path!r} do not exist; give the path of a diffusers AutoencoderKL "
                            f"file ({' or '.join(WEIGHT_FILE_NAMES)}) or of the folder holding it")
  return path


def read_state_dict(path) -> dict:
  """{name: numpy array} of a .safetensors file or a torch .bin/.pt file (safe reader, no torch)."""
  path = os.fspath(path)
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    try:
      return safetensors_numpy.load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError on a bad header
      raise torch_checkpoint.CheckpointFormatError(f"{path}: not a readable safetensors file ({error})") from error
  from dyngen.convert import load  # pylint: disable=g-import-not-at-top
  with torch_checkpoint.TorchCheckpoint(path) as checkpoint:
    state_dict, _ = load.select_state_dict(checkpoint.tree, checkpoint.path)
    return checkpoint.materialize(state_dict)


def read_config(weights_path) -> autoencoder_lib.AutoencoderKLConfig:
  """The config.json beside the weights file, or the sd-vae-ft-ema / ft-mse architecture when there is none."""
  config_path = os.path.join(os.path.dirname(os.path.abspath(weights_path)), CONFIG_FILE_NAME)
  if not os.path.isfile(config_path):
    return autoencoder_lib.AutoencoderKLConfig()
  with open(config_path) as f:
    fields = json.load(f)
  class_name = fields.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise ValueError(f"{config_path}: _class_name={class_name!r}, expected 'AutoencoderKL'")
  try:
    return autoencoder_lib.AutoencoderKLConfig.from_diffusers(fields)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{config_path}: {error}") from error


def load_autoencoder_params(path, config: autoencoder_lib.AutoencoderKLConfig | None = None):
  """(params, config): the Flax params (nested dict of float32 numpy arrays) of the file `path` names.

  config: the architecture; None reads config.json beside the weights (or assumes the SD-VAE).
  Raises FileNotFoundError, CheckpointFormatError / UnsafeCheckpointError (not a weights file), ValueError
  (a bad config.json) and ParamMappingError (the weights do not fit the architecture).
  """
  weights_path = resolve_weights_path(path)
  config = read_config(weights_path) if config is None else config
  return params_from_state_dict(read_state_dict(weights_path), config, f"weights {weights_path}"), config


def params_from_state_dict(state_dict: dict, config: autoencoder_lib.AutoencoderKLConfig, source: str = "weights"):
  """The Flax params (nested dict of float32 numpy arrays) of a diffusers state dict {name: array}."""
  canonical = canonical_state_dict(state_dict, source)
  expected = pm.flatten_shapes(autoencoder_lib.param_shapes(config))
  description = (f"AutoencoderKL(block_out_channels={list(config.block_out_channels)}, "
                 f"layers_per_block={config.layers_per_block}, latent_channels={config.latent_channels}); "
                 f"{source} (mid-block attention accepted as to_q/to_k/to_v/to_out.0 or "
                 f"query/key/value/proj_attn){_layout_hint(state_dict)}")
  return pm.apply_rules(canonical, param_rules(config), [], expected, description)


def load_autoencoder(path, *, config: autoencoder_lib.AutoencoderKLConfig | None = None, dtype=np.float32,
                     precision=None, batch_size: int | None = None) -> autoencoder_lib.Autoencoder:
  """The VAE of a diffusers-layout weights file or folder, ready to call (see `Autoencoder`).

  dtype: computation dtype (float32; bfloat16 to halve memory on accelerators; float64 with jax x64 on).
  precision: matmul/conv precision passed to XLA (None = backend default; "highest" for float32-exact
    convolutions on TPU/GPU, whose default rounds inputs to bfloat16 / tf32).
  batch_size: run encode/decode in chunks of this many images (None: the whole batch at once).
  """
  params, config = load_autoencoder_params(path, config)
  return autoencoder_lib.Autoencoder(config, params, dtype=dtype, precision=precision, batch_size=batch_size)
