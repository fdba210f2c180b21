"""Warm start (`config.init_from`): a new run's parameters from a pretrained checkpoint.

  params, report = load_init_params(source, model, fresh_params)

`source` is a dyngen workdir or checkpoint (its EMA weights) or an official PyTorch `.pt` / `.pth` (read
by the safe reader, mapped by dyngen.convert). Every parameter of the model that the source holds is
loaded (same shape required); the parameters of the submodules the model's family adds to its source's
(`Model.warm_start_new_modules`, e.g. DyDiT's routers on a DiT) keep their fresh initialisation. Any other
difference — a model parameter the source lacks, a source parameter the model lacks, a shape that differs —
is an error listing all of them. Works for any fine-tuning (DiT -> DiT, DiT -> DyDiT, DyDiT -> DyDiT).
"""
import dataclasses
import os

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from dyngen import checkpoint
from dyngen import models
from dyngen.models import layers

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


class WarmStartError(ValueError):
  """The warm-start source does not fit the model; the message lists every difference."""


@dataclasses.dataclass(frozen=True)
class WarmStartReport:
  source: str
  source_family: str
  loaded: tuple[str, ...]
  initialised: tuple[str, ...]

  def summary(self) -> str:
    fresh = sorted({path.split("/")[1] if path.startswith("blocks") else path for path in self.initialised})
    return (f"warm start from {self.source} ({self.source_family}): loaded {len(self.loaded)} parameter arrays; "
            f"initialised fresh {len(self.initialised)} ({', '.join(fresh) or 'none'})")


def _unrolled(params):
  return layers.unstack_block_params(params) if "blocks" in params else params


def _source_config(model_config, family):
  """`model_config` for family `family`, keeping the fields that family's Model accepts."""
  cls = models.model_class(family)
  accepted = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  fields = {k: v for k, v in dict(model_config).items() if k in accepted}
  return ml_collections.ConfigDict(dict(fields, name=family))


def _read_torch(source, model_config, families):
  """(params, family) from the first family whose converter accepts the file."""
  from dyngen import convert  # Local import: the converter is only needed for .pt sources.
  errors = []
  for family in families:
    try:
      return convert.load_torch_params(source, _source_config(model_config, family)), family
    except convert.param_mapping.ParamMappingError as error:
      errors.append(f"as {family}: {error}")
  raise WarmStartError(f"config.init_from={source!r} fits none of the families {list(families)}:\n"
                       + "\n".join(errors))


def _read_dyngen(source, model_config, families):
  saved_config, ema_params = checkpoint.load_for_inference(source)
  family = saved_config.model.name
  if family not in families:
    raise WarmStartError(f"config.init_from={source!r} holds a {family!r} model; a {model_config.name!r} model "
                         f"warm-starts from {list(families)} checkpoints.")
  return jax.device_get(ema_params), family


def load_init_params(source, model, fresh_params):
  """(params, WarmStartReport): `fresh_params` (the new run's init) with every parameter the source has.

  Args:
    source: the path of config.init_from.
    model: the built Module of the new run (its family and layout decide what fits).
    fresh_params: the new run's initial params (host or device arrays, either block layout).

  Raises:
    WarmStartError listing every mismatch; FileNotFoundError when nothing is at `source`.
  """
  model_config = ml_collections.ConfigDict({f.name: getattr(model, f.name) for f in dataclasses.fields(model)
                                            if f.name not in ("parent", "name")})
  model_config.name = type(model).__module__.rsplit(".", 1)[-1]
  families = (model_config.name,) + tuple(getattr(model, "warm_start_sources", ()))
  if os.fspath(source).endswith(TORCH_SUFFIXES):
    if not os.path.exists(source):
      raise FileNotFoundError(f"config.init_from={source!r}: no such file.")
    source_params, family = _read_torch(source, model_config, families)
  else:
    source_params, family = _read_dyngen(source, model_config, families)
  new_modules = set(getattr(model, "warm_start_new_modules", ())) if family != model_config.name else set()

  target = traverse_util.flatten_dict(_unrolled(jax.device_get(fresh_params)), sep="/")
  loaded = traverse_util.flatten_dict(_unrolled(source_params), sep="/")
  missing, misshaped, fresh = [], [], []
  for path, value in target.items():
    if path not in loaded:
      (fresh if set(path.split("/")) & new_modules else missing).append(path)
    elif np.shape(loaded[path]) != np.shape(value):
      misshaped.append(f"{path}: source {np.shape(loaded[path])}, model {np.shape(value)}")
  unexpected = sorted(set(loaded) - set(target))
  if missing or misshaped or unexpected:
    lines = [f"config.init_from={source!r} ({family}) does not fit the {model_config.name!r} model:"]
    for title, items in (("model parameters the source lacks", missing), ("mis-shaped", misshaped),
                         ("source parameters the model lacks", unexpected)):
      if items:
        lines += [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:20]]
        lines += [f"    ... and {len(items) - 20} more"] if len(items) > 20 else []
    lines.append("  (a checkpoint of another size or family: check config.model against the source's)")
    raise WarmStartError("\n".join(lines))
  merged = {path: np.asarray(loaded[path], np.asarray(value).dtype) if path in loaded else np.asarray(value)
            for path, value in target.items()}
  params = traverse_util.unflatten_dict(merged, sep="/")
  if model.scan_blocks:
    params = layers.stack_block_params(params, model.depth)
  report = WarmStartReport(str(source), family, tuple(sorted(set(target) - set(fresh))), tuple(sorted(fresh)))
  return params, report
