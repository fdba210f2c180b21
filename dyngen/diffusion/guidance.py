"""Classifier-free guidance as a model_fn for the samplers (DiT's forward_with_cfg), and label checks."""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _concrete(value):
  """`value` as a numpy array, or None when it is a tracer (its values unknown until the program runs)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _listed(values, limit=6):
  unique = np.unique(values)
  return ", ".join(str(v) for v in unique[:limit]) + (" ..." if unique.size > limit else "")


def check_labels(labels, num_classes: int, *, allow_null: bool = False, name: str = "labels"):
  """Checks class labels against a model of `num_classes` classes (the null class is `num_classes`).

  Args:
    labels: (N,) ints; concrete (numpy, eager jax) or traced.
    num_classes: the model's class count K; labels must lie in [0, K), or [0, K] with allow_null.
    allow_null: accept K, the null (unconditional) label, e.g. for unconditional rows of guidance.
    name: what the labels are called in the message.

  Returns: None when the labels are concrete (a bad one raises ValueError naming the values); when traced, a
  (N,) bool mask of valid rows, since values under jit are unknown until the program runs (callers turn the
  invalid rows into NaN rather than let an out-of-range embedding gather give a plausible-looking sample).
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int (the model's class count), got {num_classes!r}")
  dtype = jnp.result_type(labels)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name} must be integer class indices, got dtype {dtype}")
  high = num_classes + 1 if allow_null else num_classes
  values = _concrete(labels)
  if values is None:
    return (labels >= 0) & (labels < high)
  bad = (values < 0) | (values >= high)
  if np.any(bad):
    allowed = f"[0, {num_classes}] ({num_classes} = the null class)" if allow_null else f"[0, {num_classes})"
    hint = ("" if allow_null or not np.all(values[bad] == num_classes) else
            f"; {num_classes} is the null class, which belongs only in the null half of a guided batch")
    raise ValueError(f"{name} {_listed(values[bad])} outside the model's {num_classes} classes: expected "
                     f"{allowed}{hint}")
  return None


def guided_model_fn(apply_fn: ApplyFn, y, cfg_scale, guidance_channels: int | None = 3, *,
                    num_classes: int | None = None):
  """A model_fn(x, t) that applies classifier-free guidance on a doubled batch.

  The batch is [n conditional rows; n null rows] as DiT's sample.py builds it: x = concat([z, z]) and
  y = concat([labels, num_classes * ones]). The model runs on [x[:n]; x[:n]] with labels y, and the guided
  prediction uncond + cfg_scale · (cond − uncond) replaces the first `guidance_channels` output channels of
  both halves; every later channel (the rest of the prediction, the variance values) is each row's own output.

  Args:
    apply_fn: (x (2n, H, W, C), t (2n,), y (2n,)) -> (2n, H, W, C_out), e.g.
      `lambda x, t, y: model.apply({"params": params}, x, t, y)`.
    y: (2n,) int labels, conditional rows first, then null labels.
    cfg_scale: guidance scale s (1 = the conditional model); a float or a traced scalar.
    guidance_channels: how many leading output channels are guided, at most C (the input's channels: the
      later output channels are variance values). 3 reproduces the official DiT code (which guides only 3 of
      the 4 latent channels); None or 0 (the configs' `sample.guidance_channels = 0`) guides every prediction
      channel.
    num_classes: the model's class count K. Given, the conditional labels must lie in [0, K) and the null half
      must be K: a concrete y is checked here (ValueError naming the labels); a traced y makes the rows
      of bad labels NaN (an out-of-range label would otherwise read past the embedding table).

  Returns: model_fn(x, t) -> (2n, H, W, C_out).
  """
  if guidance_channels is not None and (isinstance(guidance_channels, bool) or
                                        not isinstance(guidance_channels, int) or guidance_channels < 0):
    raise ValueError(f"guidance_channels must be a positive int, or 0 or None (all prediction channels), "
                     f"got {guidance_channels!r}")
  guidance_channels = guidance_channels or None  # 0, as the configs spell "all", is None here.
  if jnp.ndim(cfg_scale) != 0:
    # A per-row or per-channel scale would broadcast against the channel axis without a word.
    raise ValueError(f"cfg_scale must be a scalar (a float or a 0-d array), got shape {jnp.shape(cfg_scale)}")
  if jnp.ndim(y) != 1 or jnp.shape(y)[0] % 2:
    raise ValueError(f"classifier-free guidance needs an even batch: y must be (2n,) labels, n conditional then n "
                     f"null rows; got shape {jnp.shape(y)}")
  valid_rows = None
  if num_classes is not None:
    half = jnp.shape(y)[0] // 2
    cond_valid = check_labels(y[:half], num_classes, name="conditional labels (first half of y)")
    null_values = _concrete(y[half:])
    if null_values is not None:
      if np.any(null_values != num_classes):
        raise ValueError(f"the null half of y must be the null class {num_classes} (num_classes) in every row, got "
                         f"{_listed(null_values[null_values != num_classes])}: guidance compares each conditional "
                         "row with the unconditional prediction")
      null_valid = None
    else:
      null_valid = y[half:] == num_classes
    if cond_valid is not None or null_valid is not None:
      # A pair is valid only if both of its rows are: the guided prediction mixes them.
      pair = jnp.ones((half,), bool)
      pair = pair if cond_valid is None else pair & cond_valid
      pair = pair if null_valid is None else pair & null_valid
      valid_rows = jnp.concatenate([pair, pair])

  def model_fn(x, t):
    batch = x.shape[0]
    if batch % 2 or y.shape != (batch,):
      raise ValueError(f"classifier-free guidance needs an even batch of [conditional; null] rows and one label per "
                       f"row; got x of shape {x.shape} and y of shape {y.shape}")
    half = x[: batch // 2]
    out = apply_fn(jnp.concatenate([half, half], axis=0), t, y)
    channels = x.shape[-1] if guidance_channels is None else guidance_channels
    if channels > out.shape[-1]:
      raise ValueError(f"guidance_channels={guidance_channels} but the model outputs only {out.shape[-1]} channels")
    if channels > x.shape[-1]:
      raise ValueError(f"guidance_channels={guidance_channels} but x has only {x.shape[-1]} channels: output "
                       f"channels from {x.shape[-1]} on are variance values, which guidance must not mix "
                       "(None guides all prediction channels)")
    cond, uncond = jnp.split(out[..., :channels], 2, axis=0)
    guided = uncond + cfg_scale * (cond - uncond)
    out = jnp.concatenate([jnp.concatenate([guided, guided], axis=0), out[..., channels:]], axis=-1)
    if valid_rows is not None:
      out = jnp.where(valid_rows.reshape((batch,) + (1,) * (out.ndim - 1)), out, jnp.nan)
    return out

  return model_fn
