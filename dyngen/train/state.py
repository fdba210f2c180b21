"""The training state and the optimizer: everything a run needs to continue bit-exactly after a restart.

`TrainState` holds params, optimizer state, EMA params, the step and the base PRNG key. The per-step keys
are `fold_in(rng, step)`, so the randomness of step s does not depend on how the run got to s (a resumed
run draws the same timesteps, noise and label dropout as an uninterrupted one).
"""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """step: () int32 updates applied; params / ema_params: model parameter trees (fp32);
  opt_state: the optax state; rng: (2,) uint32 base key of the per-step keys."""
  step: jax.Array
  params: Any
  opt_state: optax.OptState
  ema_params: Any
  rng: jax.Array


def learning_rate_schedule(optimizer_config) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then constant `learning_rate` (DiT trains at a constant 1e-4)."""
  peak = optimizer_config.learning_rate
  if optimizer_config.warmup_steps <= 0:
    return optax.constant_schedule(peak)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, optimizer_config.warmup_steps), optax.constant_schedule(peak)],
      boundaries=[optimizer_config.warmup_steps])


def create_optimizer(optimizer_config) -> optax.GradientTransformation:
  """AdamW on the schedule above, after clipping by global norm when `grad_clip_norm` > 0, the whole update
  skipped when the gradient norm exceeds `skip_update_grad_norm` > 0.

  DiT: AdamW, lr 1e-4, betas (0.9, 0.999), no weight decay, no clipping. DyDiT skips above its clip norm
  (its train.py also steps once more before the check in stage 1; dyngen makes one update per step).
  """
  adamw = optax.adamw(
      learning_rate_schedule(optimizer_config),
      b1=optimizer_config.b1,
      b2=optimizer_config.b2,
      eps=optimizer_config.eps,
      weight_decay=optimizer_config.weight_decay,
  )
  if optimizer_config.grad_clip_norm > 0:
    adamw = optax.chain(optax.clip_by_global_norm(optimizer_config.grad_clip_norm), adamw)
  if optimizer_config.get("skip_update_grad_norm", 0.0) > 0:
    # optax's skip: a step whose squared gradient norm exceeds the bound leaves params and moments unchanged.
    adamw = optax.MultiSteps(adamw, every_k_schedule=1, should_skip_update_fn=functools.partial(
        optax.skip_large_updates, max_squared_norm=optimizer_config.skip_update_grad_norm ** 2)
    ).gradient_transformation()
  return adamw


def dummy_model_inputs(model, batch_size: int = 1):
  """Zero inputs of the shapes `model` takes: x (B, H, W, C) float32, t (B,) int32, y (B,) int32."""
  x = jnp.zeros((batch_size, model.input_size, model.input_size, model.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  y = jnp.zeros((batch_size,), jnp.int32)
  return x, t, y


def initial_state(seed_key: jax.Array, model: nn.Module, optimizer: optax.GradientTransformation) -> TrainState:
  """A fresh TrainState whose params still carry their logical-partitioning boxes (`nn.Partitioned`).

  Meant to run under `jax.eval_shape` (for shapes and shardings) and under `jax.jit` followed by
  `nn.unbox` (for the arrays). EMA starts as a copy of the initial params, as in DiT.
  """
  init_key, step_key = jax.random.split(seed_key)
  params = model.init({"params": init_key}, *dummy_model_inputs(model), train=False)["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=step_key,
  )
