"""One training step: a pure function of (state, batch), jitted and donated by the trainer.

  loss, metrics = objective(params, batch, keys, step)      (dyngen.train.objectives, chosen by config)
  params <- AdamW(params, ∇loss);  ema <- d · ema + (1 - d) · params
  d = decay, or min(decay, (1 + s) / (warmup + s)) at update s with an EMA warm-up

The randomness of step s comes from `objectives.step_keys(state.rng, s)` only (one key per purpose), so
the step is reproducible from the checkpointed state alone.
"""
import jax
import jax.numpy as jnp
import optax

from dyngen.train import objectives
from dyngen.train.state import TrainState


def ema_decay_at(step, decay: float, warmup: float = 0.0):
  """The EMA decay of update `step` (0 for the first): `decay`, or min(decay, (1 + step) / (warmup + step))
  with a warm-up (the form of TensorFlow's ExponentialMovingAverage num_updates, whose warmup is 10)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (warmup + step))


def ema_update(ema_params, params, decay: float):
  """ema <- decay · ema + (1 - decay) · params, leaf by leaf (DiT's `update_ema`)."""
  return jax.tree.map(lambda ema, p: decay * ema + (1.0 - decay) * p, ema_params, params)


def train_step(state: TrainState, batch, *, objective, optimizer: optax.GradientTransformation,
               learning_rate_fn: optax.Schedule, ema_decay: float, ema_warmup: float = 0.0):
  """Applies one update.

  Args:
    state: the current TrainState (unboxed arrays).
    batch: {"image": (B, H, W, C) float32 x_0 in model space (pixels in [-1, 1] or scaled latents),
      "label": (B,) int32 class ids in [0, num_classes)}.
    objective: `objective(params, batch, keys, step) -> (loss, metrics)` (dyngen.train.objectives).
    optimizer, learning_rate_fn: from `dyngen.train.state` (the schedule is only logged).
    ema_decay: EMA decay per step.
    ema_warmup: 0, or the warm-up of `ema_decay_at` (config.ema.warmup).

  Returns:
    (new state, metrics): the objective's metrics plus "grad_norm", "param_norm", "learning_rate",
    "ema_decay", each a () float32. A non-finite "loss" means the update is not usable; the trainer stops before saving such a
    state.
  """
  keys = objectives.step_keys(state.rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(lambda p: objective(p, batch, keys, state.step), has_aux=True)(
      state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay, ema_warmup)),
  )
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 learning_rate=jnp.asarray(learning_rate_fn(state.step), jnp.float32),
                 ema_decay=ema_decay_at(state.step, ema_decay, ema_warmup))
  return new_state, metrics
