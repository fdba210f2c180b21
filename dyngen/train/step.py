"""One diffusion training step: a pure function of (state, batch), jitted and donated by the trainer.

  t ~ U{0, ..., T-1}, ε ~ N(0, I), x_t = q_sample(x_0, t, ε)
  loss = mean_b L_simple(+ L_vb when the variance is learned)       (DiT / improved-DDPM objective)
  params <- AdamW(params, ∇loss);  ema <- decay · ema + (1 - decay) · params

The randomness of step s comes from `fold_in(state.rng, s)` only, split into the timestep, noise and
label-dropout keys, so the step is reproducible from the checkpointed state alone.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from dyngen.train.state import TrainState


def ema_update(ema_params, params, decay: float):
  """ema <- decay · ema + (1 - decay) · params, leaf by leaf (DiT's `update_ema`)."""
  return jax.tree.map(lambda ema, p: decay * ema + (1.0 - decay) * p, ema_params, params)


def train_step(state: TrainState, batch, *, model: nn.Module, diffusion, optimizer: optax.GradientTransformation,
               learning_rate_fn: optax.Schedule, ema_decay: float):
  """Applies one update.

  Args:
    state: the current TrainState (unboxed arrays).
    batch: {"image": (B, H, W, C) float32 x_0 in model space (pixels in [-1, 1] or scaled latents),
      "label": (B,) int32 class ids in [0, num_classes)}.
    model: the linen module; called with `train=True`, which drops labels with `class_dropout_prob` using
      the "label_dropout" rng.
    diffusion: a `dyngen.diffusion.GaussianDiffusion` for training (no respacing).
    optimizer, learning_rate_fn: from `dyngen.train.state` (the schedule is only logged).
    ema_decay: EMA decay per step.

  Returns:
    (new state, metrics) with metrics {"loss", "mse", "vb", "grad_norm", "param_norm", "learning_rate"},
    each a () float32 averaged over the batch. A non-finite "loss" means the update is not usable; the
    trainer stops before saving such a state.
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  t_key, noise_key, dropout_key = jax.random.split(step_key, 3)
  x_start = nn.with_logical_constraint(batch["image"], ("batch", None, None, None))
  labels = nn.with_logical_constraint(batch["label"], ("batch",))
  t = jax.random.randint(t_key, labels.shape, 0, diffusion.num_timesteps, dtype=jnp.int32)

  def loss_fn(params):
    def model_fn(x_t, model_t):
      return model.apply({"params": params}, x_t, model_t, labels, train=True,
                         rngs={"label_dropout": dropout_key})
    terms = diffusion.training_losses(model_fn, x_start, t, key=noise_key)
    return jnp.mean(terms["loss"]), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      ema_params=ema_update(state.ema_params, params, ema_decay),
  )
  metrics = {
      "loss": loss,
      "mse": jnp.mean(terms["mse"]),
      "vb": jnp.mean(terms["vb"]),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": jnp.asarray(learning_rate_fn(state.step), jnp.float32),
  }
  return new_state, metrics
