"""Sharding as configuration: a device mesh and logical axis rules, both read from the config.

Every parameter of a dyngen model carries logical axis names (flax `nn.with_logical_partitioning`):

  embed       the model width D                    mlp         MLP and timestep-MLP hidden units
  heads, kv   attention heads and per-head dim       modulation  the 6D / 2D adaLN outputs
  classes     label-table rows                     freq        sinusoid timestep features
  patch       patch-pixel axes                     out         final-layer outputs

Activations are constrained with names of their own (`batch`, `length`, `act_embed`, `act_mlp`,
`act_heads`), so that FSDP can shard a parameter's `embed` axis while activations stay batch-sharded.

`config.sharding.logical_axis_rules` maps each logical name to a mesh axis (or a tuple of mesh axes, or
None for replicated); `config.mesh` names the mesh axes and their sizes. The default mesh has axes
(data, fsdp, tensor): `data` replicates parameters, `fsdp` shards them (ZeRO-3 style, gathered per layer by
XLA), `tensor` splits heads and MLP units (Megatron style). The batch is split over data x fsdp.
"""
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

# The logical name of the leading (example) axis of every batch array.
BATCH_AXIS = "batch"


def resolve_mesh_shape(shape: Sequence[int], axes: Sequence[str], num_devices: int) -> tuple[int, ...]:
  """Replaces the (at most one) -1 in `shape` by what the other axes leave of `num_devices`.

  Raises:
    ValueError: naming the shape when it has a different length than `axes`, a size < 1 other than -1,
      more than one -1, or a product that does not equal `num_devices`.
  """
  shape, axes = tuple(shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f"config.mesh.shape {shape} has {len(shape)} entries but config.mesh.axes {axes} "
                     f"names {len(axes)} axes; give one size per axis.")
  if len(set(axes)) != len(axes):
    raise ValueError(f"config.mesh.axes {axes} repeats an axis name; each mesh axis needs its own name.")
  if any(size == 0 or size < -1 for size in shape):
    raise ValueError(f"config.mesh.shape {shape} has a size that is neither positive nor -1 (-1 means "
                     "'all remaining devices').")
  free = [i for i, size in enumerate(shape) if size == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh.shape {shape} has more than one -1; at most one axis can take "
                     "'all remaining devices'.")
  fixed = math.prod(size for size in shape if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh.shape {shape}: the fixed axes use {fixed} devices, which does not "
                       f"divide the {num_devices} available devices.")
    shape = shape[:free[0]] + (num_devices // fixed,) + shape[free[0] + 1:]
  if math.prod(shape) != num_devices:
    raise ValueError(f"config.mesh.shape {shape} (axes {axes}) needs {math.prod(shape)} devices but "
                     f"{num_devices} are available; make the product equal {num_devices} or use -1 for "
                     "one axis.")
  return shape


def create_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The device mesh of `mesh_config` (fields `axes`, `shape`) over `devices` (default: all devices).

  Axes are `Auto`: shardings come from logical axis rules and `with_sharding_constraint`, and XLA's
  partitioner propagates them (the big_vision / MaxText style), rather than from explicit-sharding types.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config.shape, mesh_config.axes, len(devices))
  return jax.make_mesh(shape, tuple(mesh_config.axes), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def rules_as_tuples(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Normalises config rules (lists after a JSON round trip) into flax's ((name, mesh_axes), ...) form."""
  normalised = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"logical axis rule {rule!r} must be a pair (logical_name, mesh_axis or tuple of "
                       "mesh axes or None).")
    name, target = rule
    if name in dict(normalised):
      raise ValueError(f"logical axis {name!r} has more than one rule in config.sharding.logical_axis_rules; "
                       "keep one (flax would silently use the first).")
    if isinstance(target, (list, tuple)):
      target = tuple(target)
    normalised.append((name, target))
  return tuple(normalised)


def mesh_axes_of(logical_name: str, rules) -> tuple[str, ...]:
  """The mesh axes that `logical_name` is sharded over under `rules` (empty when replicated)."""
  for name, target in rules_as_tuples(rules):
    if name == logical_name:
      if target is None:
        return ()
      return target if isinstance(target, tuple) else (target,)
  return ()


def batch_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
  """How many ways the batch is split: the product of the mesh axes that `batch` maps to."""
  return math.prod(mesh.shape[axis] for axis in mesh_axes_of(BATCH_AXIS, rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Sharding of a batch array: leading axis over the `batch` mesh axes, the rest replicated."""
  axes = mesh_axes_of(BATCH_AXIS, rules)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def logical_shardings(abstract_boxed_tree, mesh: jax.sharding.Mesh, rules):
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` boxes (as `init` returns them).

  Boxed leaves are sharded by their logical names under `rules`; plain leaves (step, rng, optimizer
  counters) are replicated. The result has the structure of the *unboxed* tree (`nn.unbox`).
  """
  specs = jax.tree.map(_without_repeats, nn.get_partition_spec(abstract_boxed_tree),
                       is_leaf=lambda x: isinstance(x, PartitionSpec))
  return nn.logical_to_mesh_sharding(specs, mesh, rules_as_tuples(rules))


def _without_repeats(spec: PartitionSpec) -> PartitionSpec:
  """Keeps only the first of repeated logical names (e.g. a conv kernel's (patch, patch, ...)): one mesh
  axis cannot shard two dimensions of an array."""
  seen = set()
  names = []
  for name in spec:
    names.append(None if name in seen else name)
    if isinstance(name, str):
      seen.add(name)
  return PartitionSpec(*names)


def check_divisible(abstract_tree, shardings) -> None:
  """Raises ValueError naming the first array whose dimension is not divisible by its mesh axes.

  XLA would otherwise fail deep inside compilation (or pad silently); we want the message before any
  compute, naming the parameter, its shape and the mesh axes.
  """
  flat_arrays = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, array), sharding in zip(flat_arrays, flat_shardings):
    for dim, axes in zip(array.shape, sharding.spec):
      if axes is None:
        continue
      axes = axes if isinstance(axes, tuple) else (axes,)
      ways = math.prod(sharding.mesh.shape[axis] for axis in axes)
      if dim % ways:
        raise ValueError(
            f"{jax.tree_util.keystr(path)} has shape {array.shape}; its dimension of size {dim} is sharded "
            f"over mesh axes {axes} ({ways} ways), which does not divide it. Change the model size, the "
            "mesh shape (config.mesh.shape) or the rule in config.sharding.logical_axis_rules.")


def make_global_batch(local_batch, sharding: NamedSharding):
  """Host-local numpy batch (this process's rows) -> global jax.Arrays laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
