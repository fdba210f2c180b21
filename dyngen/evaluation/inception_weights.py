"""pytorch-fid's `pt_inception-2015-12-05-*.pth` (the TF FID graph's weights ported to torch) -> FIDInceptionV3.

The file is a raw state dict in torchvision's naming (`Mixed_6d.branch1x1.conv.weight`, `...bn.running_var`,
`fc.weight` (1008, 2048)); it is read by the safe reader (no torch, no code from the file runs) and mapped by
the rule table below, derived from the Flax module's own names, so that a wrong file is reported with every
missing, unexpected and mis-shaped tensor at once (dyngen.convert.param_mapping).

Not used, and accepted whether present or not: `*.num_batches_tracked` (BatchNorm's training counter) and
`fc.bias` (ADM's Inception Score multiplies pool_3 by the softmax weight alone).
"""
import os

from dyngen.convert import load as convert_load
from dyngen.convert import param_mapping
from dyngen.convert import torch_checkpoint
from dyngen.evaluation import inception

IGNORED_SUFFIXES = (".num_batches_tracked",)
IGNORED_NAMES = ("fc.bias",)
DESCRIPTION = "the FID InceptionV3 (pytorch-fid pt_inception-2015-12-05: 1008-way fc, FID blocks)"

# Flax variable leaf -> (torch tensor suffix, layout), per leaf name.
_LEAVES = {
    "kernel": ("weight", param_mapping.ConvKernel()),
    "scale": ("weight", param_mapping.Flat()),
    "bias": ("bias", param_mapping.Flat()),
    "mean": ("running_mean", param_mapping.Flat()),
    "var": ("running_var", param_mapping.Flat()),
}


def expected_variable_shapes(module=None):
  """{'params/Mixed_5b/branch1x1/conv/kernel': shape, 'batch_stats/.../bn/mean': shape, ...}."""
  module = module or inception.FIDInceptionV3()
  return param_mapping.flatten_shapes(inception.variable_shapes(module))


def param_rules(expected_shapes):
  """One Rule per Flax variable: 'params/A/B/conv/kernel' <- 'A.B.conv.weight' and so on; fc -> fc.weight."""
  rules = []
  for path in expected_shapes:
    _collection, *names, leaf = path.split("/")
    if names == ["fc"]:
      rules.append(param_mapping.Rule(path, "fc.weight", param_mapping.LinearKernel()))
      continue
    suffix, layout = _LEAVES[leaf]
    rules.append(param_mapping.Rule(path, ".".join(names + [suffix]), layout))
  return rules


def convert_state_dict(state_dict, source="state dict"):
  """{torch name: array} -> {'params': ..., 'batch_stats': ...} of float32 numpy arrays for FIDInceptionV3.

  Raises param_mapping.ParamMappingError listing every missing, unexpected and mis-shaped tensor.
  """
  used = {name: value for name, value in state_dict.items()
          if not name.endswith(IGNORED_SUFFIXES) and name not in IGNORED_NAMES}
  expected = expected_variable_shapes()
  return param_mapping.apply_rules(used, param_rules(expected), [], expected, f"{DESCRIPTION}; {source}")


def load_inception_variables(path):
  """Reads pt_inception-2015-12-05-*.pth (zip or legacy torch format) -> Flax variables (numpy float32)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights {path!r} not found; pass pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth (from its GitHub release 'fid_weights')")
  try:
    with torch_checkpoint.TorchCheckpoint(path) as checkpoint:
      state_dict, key = convert_load.select_state_dict(checkpoint.tree, checkpoint.path)
      state_dict = checkpoint.materialize(state_dict)
  except torch_checkpoint.CheckpointFormatError as error:
    raise torch_checkpoint.CheckpointFormatError(
        f"{error}; the Inception weights are pytorch-fid's pt_inception-2015-12-05-6726825d.pth") from None
  where = f"checkpoint {path}" + (f"['{key}']" if key else "")
  return convert_state_dict(state_dict, where)


def load_inception(path, precision="highest") -> inception.InceptionV3:
  """`net = load_inception(path)`; `net.features(images, preprocessing="adm")` -> pool_3, logits, spatial.

  precision: of the float32 convs and matmuls on accelerators ("highest": no TF32 / bf16 passes, so GPU and
  TPU features match CPU ones to ~1e-6; None: the backend's default, faster, ~1e-3 relative on GPUs).
  """
  return inception.InceptionV3(load_inception_variables(path), precision=precision)
