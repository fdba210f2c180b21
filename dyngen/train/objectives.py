"""Training objectives: what one step minimises, chosen by the config (the step itself is shared).

  objective = create_objective(config, model, process)    # process: training_process(config)
  loss, metrics = objective(params, batch, keys, step)      # keys = step_keys(state.rng, state.step)

The process is a `GaussianDiffusion` (config.objective = "diffusion") or SiT's `Transport` ("flow"); both are
reached through `dyngen.diffusion.objective_interface`, so every objective below works with either.

`DiffusionObjective`: the process's loss, mean_b of DiT's (improved-DDPM) L_simple + L_vb, or of SiT's
    flow-matching loss (velocity, score or noise regression).
`FlopsConstrainedObjective`: DyDiT's fine-tuning under a FLOPs target (config.dynamic), on either process,
    L = L_diffusion(dynamic) + [L_diffusion(complete)] + w · (mean_b ratio_b − λ_t)²,
  λ_t = 1 for the first `hold_steps`, then 1 − (1 − λ)·step / warmup_steps until it reaches λ (the
  official train.py: the ramp is counted from step 0 and the first 100 steps are held at 1), the
  complete-model term as a switch (the official stage 1 adds it, stage 2 not), timesteps stratified by
  quartile within the batch as a switch (t_i = U{0..T/4−1} + T/4 · (i mod 4); for flow matching
  t_i = (u_i + i mod 4) / 4 on the training interval).

Randomness: one key per purpose, `fold_in(fold_in(rng, step), PURPOSE)`, so a purpose added later (the
Gumbel noise) leaves the timestep, noise and label-dropout draws of other runs with the same seed unchanged.
"""
import jax
import jax.numpy as jnp
import ml_collections

from dyngen import diffusion as diffusion_lib

# Stable ids of the step's random streams (never renumber: runs depend on them).
KEY_PURPOSES = {"timestep": 0, "noise": 1, "label_dropout": 2, "gumbel": 3, "latent": 4}
DYNAMIC_FAMILIES = ("dydit", "dydig")


def step_keys(rng, step):
  """{purpose: key} for the step: fold_in(fold_in(rng, step), id)."""
  step_key = jax.random.fold_in(rng, step)
  return {purpose: jax.random.fold_in(step_key, index) for purpose, index in KEY_PURPOSES.items()}


def default_dynamic_config() -> ml_collections.ConfigDict:
  """config.dynamic: DyDiT's FLOPs-constrained fine-tuning, official stage-1 values for λ = 0.5."""
  return ml_collections.ConfigDict(dict(
      target_ratio=0.5,  # λ: the FLOPs ratio to reach, in (0, 1].
      hold_steps=100,  # λ_t = 1 for the first steps (the official code hard-codes 100).
      warmup_steps=1000,  # λ_t reaches λ at this step (official --warmup_step).
      flops_loss_weight=2.0,  # w (official token_loss_ratio).
      complete_model_loss=True,  # Also train the dense model on the same x_t (official stage 1).
      stratified_timesteps=True,  # One quarter of the batch per quartile of t (official --t_sample).
  ))


def check_dynamic_config(config) -> None:
  """Raises ValueError naming the value when config.dynamic cannot describe a schedule."""
  name = config.model.name
  if name not in DYNAMIC_FAMILIES:
    if "dynamic" in config:
      raise ValueError(f"config.dynamic is set but config.model.name={name!r} has no routing; FLOPs-constrained "
                       f"training needs one of {DYNAMIC_FAMILIES} (remove config.dynamic for {name!r}).")
    return
  if "dynamic" not in config:
    raise ValueError(f"config.model.name={name!r} trains under a FLOPs target: the config needs a `dynamic` "
                     "section (dyngen.train.objectives.default_dynamic_config()).")
  dynamic, defaults = config.dynamic, default_dynamic_config()
  unknown = sorted(set(dynamic) - set(defaults))
  if unknown:
    raise ValueError(f"config.dynamic has unknown field(s) {unknown}; its fields are {sorted(defaults)}.")
  missing = sorted(set(defaults) - set(dynamic))
  if missing:
    raise ValueError(f"config.dynamic lacks {missing}; start from objectives.default_dynamic_config().")
  for field, default in defaults.items():
    value = dynamic[field]
    ok = isinstance(value, bool) if isinstance(default, bool) else (
        isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or (isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int)):
      raise ValueError(f"config.dynamic.{field} must be a {type(default).__name__}, got {value!r}.")
  if not 0 < dynamic.target_ratio <= 1:
    raise ValueError(f"config.dynamic.target_ratio={dynamic.target_ratio} must be in (0, 1]: it is the fraction of "
                     "the dense model's FLOPs to keep (the paper uses 0.5 and 0.7).")
  if dynamic.hold_steps < 0:
    raise ValueError(f"config.dynamic.hold_steps must be >= 0, got {dynamic.hold_steps}.")
  if dynamic.warmup_steps < dynamic.hold_steps:
    raise ValueError(f"config.dynamic.warmup_steps={dynamic.warmup_steps} is shorter than config.dynamic.hold_steps="
                     f"{dynamic.hold_steps}: the target would jump after the hold; use warmup_steps >= "
                     f"{dynamic.hold_steps}.")
  if dynamic.flops_loss_weight < 0:
    raise ValueError(f"config.dynamic.flops_loss_weight must be >= 0, got {dynamic.flops_loss_weight}.")


def flops_target(step, *, target_ratio, hold_steps, warmup_steps):
  """λ_t: 1 while step < hold_steps, then max(λ, 1 − (1 − λ)·step / warmup_steps). step: int or () array."""
  step = jnp.asarray(step, jnp.float32)
  ramp = 1.0 - (1.0 - target_ratio) * step / max(warmup_steps, 1)
  return jnp.where(step < hold_steps, 1.0, jnp.maximum(ramp, target_ratio))


def flops_loss(flops_ratio, *, target, weight):
  """w · (mean_b ratio_b − target)²: the official DynamicLoss (token_minimal_weight 0). ratio: (B,)."""
  return weight * (jnp.mean(flops_ratio) - target) ** 2


def draw_timesteps(key, batch_size, num_timesteps, stratified):
  """(B,) int32 training timesteps: uniform, or stratified by quartile (row i in quartile i mod 4)."""
  if not stratified:
    return jax.random.randint(key, (batch_size,), 0, num_timesteps, dtype=jnp.int32)
  quarter = num_timesteps // 4
  return (jax.random.randint(key, (batch_size,), 0, quarter, dtype=jnp.int32)
          + quarter * (jnp.arange(batch_size, dtype=jnp.int32) % 4))


class DiffusionObjective:
  """mean_b of the process's training loss: a GaussianDiffusion's (L_simple, + L_vb when the variance is
  learned) or a Transport's (flow matching; a learn_sigma model's second half of channels is unused)."""

  def __init__(self, model, process, stratified_timesteps=False):
    self.model, self.process, self.stratified_timesteps = model, process, stratified_timesteps
    self.interface = diffusion_lib.objective_interface(process)

  def timesteps(self, keys, labels):
    """(B,) int32 diffusion timesteps or float32 flow times in [0, 1], as the model takes them."""
    return self.interface.draw_training_t(keys["timestep"], labels.shape[0], self.stratified_timesteps)

  def __call__(self, params, batch, keys, step):
    del step
    x_start, labels = batch["image"], batch["label"]
    t = self.timesteps(keys, labels)

    def model_fn(x_t, model_t):
      return self.model.apply({"params": params}, x_t, model_t, labels, train=True,
                              rngs={"label_dropout": keys["label_dropout"]})

    terms = self.interface.training_losses(model_fn, x_start, t, keys["noise"])
    loss = jnp.mean(terms["loss"])
    return loss, {"loss": loss, "mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"])}


class FlopsConstrainedObjective(DiffusionObjective):
  """DyDiT's objective (module docstring). The model returns (out, aux) with aux["flops_ratio"] (B,)."""

  def __init__(self, model, process, dynamic_config):
    super().__init__(model, process, stratified_timesteps=dynamic_config.stratified_timesteps)
    self.dynamic = dynamic_config

  def __call__(self, params, batch, keys, step):
    x_start, labels = batch["image"], batch["label"]
    t = self.timesteps(keys, labels)
    captured = {}

    def model_fn(complete):
      def apply(x_t, model_t):
        out, aux = self.model.apply({"params": params}, x_t, model_t, labels, train=True, complete=complete,
                                    rngs={"label_dropout": keys["label_dropout"], "gumbel": keys["gumbel"]})
        captured.setdefault("complete" if complete else "dynamic", aux)
        return out
      return apply

    # The same noise key gives both passes the same x_t (and the same label dropout), as the official code.
    terms = self.interface.training_losses(model_fn(False), x_start, t, keys["noise"])
    diffusion_loss = jnp.mean(terms["loss"])
    aux = captured["dynamic"]
    target = flops_target(step, target_ratio=self.dynamic.target_ratio, hold_steps=self.dynamic.hold_steps,
                          warmup_steps=self.dynamic.warmup_steps)
    constraint = flops_loss(aux["flops_ratio"], target=target, weight=self.dynamic.flops_loss_weight)
    loss = diffusion_loss + constraint
    metrics = {"mse": jnp.mean(terms["mse"]), "vb": jnp.mean(terms["vb"]), "diffusion_loss": diffusion_loss,
               "flops_loss": constraint, "flops_ratio": jnp.mean(aux["flops_ratio"]), "flops_target": target}
    if self.dynamic.complete_model_loss:
      complete_terms = self.interface.training_losses(model_fn(True), x_start, t, keys["noise"])
      complete_loss = jnp.mean(complete_terms["loss"])
      loss = loss + complete_loss
      metrics["complete_diffusion_loss"] = complete_loss
    metrics["loss"] = loss
    for name, mask in (("head", aux["head_mask"]), ("mlp", aux["mlp_mask"]), ("token", aux["token_mask"])):
      per_layer = jnp.mean(mask, axis=(0, 2))  # (L,)
      metrics[f"{name}_fraction"] = jnp.mean(per_layer)
      for layer in range(per_layer.shape[0]):
        metrics[f"{name}_fraction/layer_{layer:02d}"] = per_layer[layer]
    return loss, metrics


def create_objective(config, model, process):
  """The objective of `config` on `process` (a GaussianDiffusion or a Transport, see `training_process`):
  FLOPs-constrained for the routed families, the process's loss otherwise."""
  check_dynamic_config(config)
  if config.model.name in DYNAMIC_FAMILIES:
    return FlopsConstrainedObjective(model, process, config.dynamic)
  return DiffusionObjective(model, process)


def is_dynamic(model_config) -> bool:
  return model_config.name in DYNAMIC_FAMILIES

