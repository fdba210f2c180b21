"""Model families, chosen by `model_config.name` (one module per family: dyngen/models/<name>.py).

  build(model_config) -> flax.linen.Module
  variant("XL/2")     -> dict(depth, hidden_size, num_heads, patch_size) of the papers' sizes
  prediction_fn(model, params) -> (x, t, y) -> the model's output array (a routed model's aux dropped)
"""
import dataclasses
import importlib

# Sizes shared by DiT, DiG and DyDiT (DiG-XL overrides num_heads in its own config).
SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)


def variant(name):
  """'S/2' -> dict(depth=12, hidden_size=384, num_heads=6, patch_size=2)."""
  size, _, patch = name.partition("/")
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f"unknown model variant {name!r}: expected <size>/<patch> with size in {sorted(SIZES)} "
                     f"and patch in {PATCH_SIZES}, e.g. 'XL/2'")
  return dict(SIZES[size], patch_size=int(patch))


def model_class(name):
  try:
    module = importlib.import_module(f"dyngen.models.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"dyngen.models.{name}":
      raise
    raise ValueError(f"unknown model name {name!r}; families live in dyngen/models/<name>.py "
                     "(dit, dig, ...)") from None
  return module.Model


def build(model_config):
  """Builds the linen Module named by `model_config.name` from the remaining fields; validates them first."""
  fields = dict(model_config)
  if "name" not in fields:
    raise ValueError("model config needs a `name` field selecting the family, e.g. 'dit'")
  cls = model_class(fields.pop("name"))
  accepted = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(fields) - accepted)
  if unknown:
    raise ValueError(f"unknown model config field(s) {unknown} for {cls.__module__}; accepted: {sorted(accepted)}")
  model = cls(**fields)
  model.validate()
  return model


def prediction_fn(model, params, **apply_kwargs):
  """(x, t, y) -> (B, H, W, C_out): `model.apply` in eval mode, without a routed family's aux outputs."""
  def apply(x, t, y):
    out = model.apply({"params": params}, x, t, y, train=False, **apply_kwargs)
    return out[0] if model.returns_aux else out
  return apply
