"""Turns a PyTorch state dict into a Flax param tree by a table of rules, checking every shape.

A family's table (dyngen/convert/<family>.py) lists one `Rule` per Flax param: which torch tensor it comes
from and in which `Layout`; fixed buffers the model recomputes (e.g. DiT's pos_embed) are `FixedBuffer`s,
compared rather than dropped. `apply_rules` reports every problem at once in a `ParamMappingError`:
torch tensors the model lacks (unexpected), tensors the model needs but the file lacks (missing), tensors
of the wrong shape (mis-shaped, both shapes given) and model params no rule fills.
"""
import dataclasses
import math

import numpy as np
from flax import traverse_util

MAX_LISTED = 25  # per category in error messages; an XL-vs-S mismatch would otherwise print hundreds


class ParamMappingError(ValueError):
  """The checkpoint does not describe the configured model (different architecture or size)."""


class Layout:
  """How a Flax param of shape `flax_shape` is laid out in torch."""

  def torch_shape(self, flax_shape):
    raise NotImplementedError

  def to_flax(self, array, flax_shape):
    raise NotImplementedError


class Flat(Layout):
  """Same elements in the same order, torch keeps them flat (or in the same shape): biases, tables."""

  def __init__(self, keep_shape=False):
    self.keep_shape = keep_shape

  def torch_shape(self, flax_shape):
    return tuple(flax_shape) if self.keep_shape else (math.prod(flax_shape),)

  def to_flax(self, array, flax_shape):
    return array.reshape(flax_shape)


class LinearKernel(Layout):
  """torch Linear weight (out, in) -> Flax kernel whose first `in_axes` axes split `in`, the rest `out`.

  in_axes=1 is nn.Dense (in, out); a fused qkv (D, 3, H, Dh) is in_axes=1 too (the rows [q; k; v], head-major,
  unflatten in that order), an output projection (H, Dh, D) is in_axes=2.
  """

  def __init__(self, in_axes=1):
    self.in_axes = in_axes

  def torch_shape(self, flax_shape):
    return (math.prod(flax_shape[self.in_axes:]), math.prod(flax_shape[:self.in_axes]))

  def to_flax(self, array, flax_shape):
    return array.T.reshape(flax_shape)


class ConvKernel(Layout):
  """torch Conv2d weight (out, in/groups, kh, kw) -> Flax (kh, kw, in/groups, out)."""

  def torch_shape(self, flax_shape):
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)

  def to_flax(self, array, flax_shape):
    return array.transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Flax param `path` ('a/b/kernel') is torch tensor `source` ('a.b.weight') in `layout`."""
  path: str
  source: str
  layout: Layout


@dataclasses.dataclass(frozen=True)
class FixedBuffer:
  """A torch buffer the Flax model recomputes instead of storing: must equal `expected` within `atol`."""
  source: str
  expected: np.ndarray
  atol: float
  hint: str


def linear(path, source, in_axes=1, bias=True):
  """Rules for a torch nn.Linear `source` -> Flax Dense/DenseGeneral `path`."""
  rules = [Rule(f"{path}/kernel", f"{source}.weight", LinearKernel(in_axes))]
  if bias:
    rules.append(Rule(f"{path}/bias", f"{source}.bias", Flat()))
  return rules


def conv(path, source, bias=True):
  """Rules for a torch nn.Conv2d `source` -> Flax nn.Conv `path`."""
  rules = [Rule(f"{path}/kernel", f"{source}.weight", ConvKernel())]
  if bias:
    rules.append(Rule(f"{path}/bias", f"{source}.bias", Flat()))
  return rules


def embedding(path, source):
  """Rules for a torch nn.Embedding `source` -> Flax nn.Embed `path` (same (num, dim) table)."""
  return [Rule(f"{path}/embedding", f"{source}.weight", Flat(keep_shape=True))]


def flatten_shapes(tree):
  """Nested dict of arrays / ShapeDtypeStructs -> {'a/b/kernel': shape}."""
  return {path: tuple(value.shape) for path, value in traverse_util.flatten_dict(tree, sep="/").items()}


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _listing(title, lines):
  if not lines:
    return []
  shown = lines[:MAX_LISTED]
  more = [f"    ... and {len(lines) - MAX_LISTED} more"] if len(lines) > MAX_LISTED else []
  return [f"  {title} ({len(lines)}):"] + [f"    {line}" for line in shown] + more


def apply_rules(state_dict, rules, buffers, expected_shapes, description):
  """Maps `state_dict` ({torch name: array}) to a nested Flax param dict of float32 numpy arrays.

  expected_shapes: {'a/b/kernel': shape} of the model's params. Raises ParamMappingError naming every
  missing, unexpected and mis-shaped tensor and every model param no rule fills.
  """
  missing, misshaped, not_in_model, mismatched_buffers = [], [], [], []
  used = set()
  params = {}
  for rule in rules:
    used.add(rule.source)
    if rule.path not in expected_shapes:
      not_in_model.append(f"{rule.path} (from {rule.source})")
      continue
    flax_shape = expected_shapes[rule.path]
    want = rule.layout.torch_shape(flax_shape)
    if rule.source not in state_dict:
      missing.append(f"{rule.source} {want} (for {rule.path})")
      continue
    array = state_dict[rule.source]
    if tuple(array.shape) != want:
      misshaped.append(f"{rule.source}: checkpoint {tuple(array.shape)}, model expects {want} "
                       f"(for {rule.path} {flax_shape})")
      continue
    params[rule.path] = rule.layout.to_flax(np.asarray(array, dtype=np.float32), flax_shape)
  for buffer in buffers:
    used.add(buffer.source)
    if buffer.source not in state_dict:
      continue  # a buffer is a cross-check; files without it still describe the model
    array = np.asarray(state_dict[buffer.source], dtype=np.float64)
    if array.shape != buffer.expected.shape:
      misshaped.append(f"{buffer.source}: checkpoint {array.shape}, model expects {buffer.expected.shape} "
                       f"({buffer.hint})")
    elif not np.allclose(array, buffer.expected, rtol=0, atol=buffer.atol):
      worst = np.max(np.abs(array - buffer.expected))
      mismatched_buffers.append(f"{buffer.source}: differs from the model's by up to {worst:.3g} ({buffer.hint})")
  unexpected = [f"{name} {tuple(np.shape(state_dict[name]))}" for name in state_dict if name not in used]
  unfilled = [f"{path} {shape}" for path, shape in expected_shapes.items()
              if path not in {rule.path for rule in rules}]
  problems = (_listing("missing in the checkpoint", missing)
              + _listing("unexpected in the checkpoint (the model has no such parameter)", unexpected)
              + _listing("mis-shaped", misshaped)
              + _listing("fixed buffers that differ", mismatched_buffers)
              + _listing("mapped to parameters the model lacks", not_in_model)
              + _listing("model parameters no checkpoint tensor maps to", unfilled))
  if problems:
    raise ParamMappingError("\n".join([f"the checkpoint does not fit {description}:"] + problems))
  return _unflatten(params)
