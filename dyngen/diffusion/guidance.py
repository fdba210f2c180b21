"""Classifier-free guidance as a model_fn for the samplers (DiT's forward_with_cfg)."""
from collections.abc import Callable

import jax
import jax.numpy as jnp

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def guided_model_fn(apply_fn: ApplyFn, y, cfg_scale, guidance_channels: int | None = 3):
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
    guidance_channels: how many leading output channels are guided. 3 reproduces the official DiT code
      (which guides only 3 of the 4 latent channels); None guides every prediction channel (C, the input's).

  Returns: model_fn(x, t) -> (2n, H, W, C_out).
  """
  if guidance_channels is not None and (not isinstance(guidance_channels, int) or guidance_channels < 1):
    raise ValueError(f"guidance_channels must be a positive int or None (all prediction channels), "
                     f"got {guidance_channels!r}")

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
    cond, uncond = jnp.split(out[..., :channels], 2, axis=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), out[..., channels:]], axis=-1)

  return model_fn
