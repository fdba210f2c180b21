"""Flow matching with SiT's stochastic interpolants: training losses and ODE / SDE samplers.

  transport = create_transport("Linear", "velocity")              # SiT's defaults
  terms = transport.training_losses(model_fn, x1, key=key)         # terms["loss"]: (B,)
  model_fn = first_channels(guided_model_fn(apply_fn, y, 1.5), 4)  # drop learn_sigma's channels, as SiT
  x = jax.jit(lambda z: transport.sample_ode(model_fn, z, sampling_method="heun2", num_steps=125))(x_T)
  x = jax.jit(lambda z: transport.sample_sde(model_fn, z, num_steps=250, key=key))(x_T)

Conventions (SiT's, willisma/SiT): t ∈ [0, 1] with t = 0 noise and t = 1 data, x_t = α_t·x1 + σ_t·x0 with
x0 ~ N(0, I) (see `paths`). `model_fn(x, t)` (or `model_fn(x, t, y)` when `y` is passed) takes x: (B, H, W, C)
and t: (B,) as is (no ×1000) and returns the prediction (B, H, W, C) named by `prediction`; a DiT-layout model
with learn_sigma computes 2C channels, of which SiT uses the first C: wrap it with `first_channels`.
`num_steps` counts time-grid points, as SiT's does (10 → 9 steps). Fixed-step loops are one `lax.scan` each;
dopri5 is diffrax's Dormand–Prince 5(4) with a PID step-size controller (torchdiffeq's in SiT).

Precision follows the official code where it keeps float32 in a float64 run (fixture sit_tiny's notes): the
time grids, dt and √dt, the t the model gets in the ODE and the coefficients of the ODE drift and of the SDE's
last step are float32; the SDE's stochastic steps use the float32 grid value in the state's dtype.

`ObjectiveInterface` (also `transport.interface`) gives the trainer and the sampler one set of calls for a
`GaussianDiffusion` and a `Transport`: draw training t, training losses, sampling loop, learns_variance.
"""
import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dyngen.diffusion import gaussian_diffusion
from dyngen.diffusion import guidance
from dyngen.diffusion import paths

ModelFn = Callable[..., jax.Array]

ODE_METHODS = ("euler", "heun2", "dopri5")
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = ("Mean", "Tweedie", "Euler", None)


class Prediction(enum.Enum):
  """What the model predicts (SiT's ModelType)."""
  VELOCITY = "velocity"  # u_t = α'_t·x1 + σ'_t·x0
  SCORE = "score"  # ∇log p_t(x_t) = −x0 / σ_t
  NOISE = "noise"  # x0


class LossWeight(enum.Enum):
  """Weighting of score and noise losses (SiT's WeightType); velocity losses are never weighted."""
  NONE = None
  VELOCITY = "velocity"  # (drift_var / σ_t)²
  LIKELIHOOD = "likelihood"  # drift_var / σ_t²


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _is_concrete(x):
  return not isinstance(x, jax.core.Tracer)


def _stack_aux(aux_log):
  """[{name: ()}, ...] of one step's model evaluations -> {name: (E,)}; None when aux is not recorded."""
  if aux_log is None:
    return None
  return jax.tree.map(lambda *values: jnp.stack(values), *aux_log)


def _flat_aux(per_step, tail=None):
  """{name: (S, E)} of the scanned steps (+ {name: (E',)} of a last step) -> {name: (S·E + E',)} in
  evaluation order."""
  flat = jax.tree.map(lambda a: a.reshape(-1), per_step)
  return flat if tail is None else jax.tree.map(lambda a, b: jnp.concatenate([a, b]), flat, tail)


def first_channels(model_fn: ModelFn, channels: int) -> ModelFn:
  """model_fn whose output keeps only its first `channels` channels (SiT's forward drops learn_sigma's half)."""
  if not isinstance(channels, int) or channels < 1:
    raise ValueError(f"channels must be a positive int, got {channels!r}")

  def wrapped(*args):
    return model_fn(*args)[..., :channels]

  return wrapped


def interval_guided_model_fn(apply_fn, y, cfg_scale, guidance_interval=(0.0, 1.0), guidance_channels: int | None = 3,
                             *, num_classes: int | None = None):
  """`guided_model_fn` whose guidance applies only while t lies in `guidance_interval` (closed).

  Outside it every guided channel is the conditional prediction (scale 1), as in guidance-interval sampling
  (Kynkäänniemi et al. 2024), which keeps the guidance away from the noisiest times. t is what the model
  receives (for a transport, t in [0, 1] with 0 = noise); (0, 1) guides everywhere as `guided_model_fn`.
  Every sampler gives all rows the same t, so the scale is decided by t[0] and stays a scalar.

  Args: as `guided_model_fn`, plus guidance_interval: (low, high) with low <= high.
  Returns: model_fn(x, t) -> (2n, H, W, C_out) on the doubled batch [conditional; null].
  """
  low, high = guidance_interval
  if not low <= high:
    raise ValueError(f"guidance_interval must be (low, high) with low <= high, got {guidance_interval!r}")

  def model_fn(x, t):
    scale = jnp.where((t[0] >= low) & (t[0] <= high), cfg_scale, 1.0)
    return guidance.guided_model_fn(apply_fn, y, scale, guidance_channels, num_classes=num_classes)(x, t)

  return model_fn


@dataclasses.dataclass(frozen=True)
class Transport:
  """One flow-matching setup (build it with `create_transport`, which applies SiT's epsilon rules).

  Attributes:
    path_type: "Linear", "GVP" or "VP".
    prediction: a `Prediction`.
    loss_weight: a `LossWeight`.
    train_eps: training t is drawn from [0, 1] shrunk by it (see `interval`).
    sample_eps: the samplers' end-point margin; None (SiT's value when train_eps alone is given) makes every
      sampler that needs it raise.
  """
  path_type: str = "Linear"
  prediction: Prediction = Prediction.VELOCITY
  loss_weight: LossWeight = LossWeight.NONE
  train_eps: float = 0.0
  sample_eps: float | None = 0.0

  def __post_init__(self):
    paths.get_path(self.path_type)  # raises on an unknown name
    if not isinstance(self.prediction, Prediction):
      raise ValueError(f"prediction must be a Prediction, got {self.prediction!r}")
    if not isinstance(self.loss_weight, LossWeight):
      raise ValueError(f"loss_weight must be a LossWeight, got {self.loss_weight!r}")

  @property
  def path(self) -> paths.LinearPath:
    return paths.get_path(self.path_type)

  @property
  def learns_variance(self) -> bool:
    """False: flow matching uses no variance channels (a learn_sigma model's extra half is dropped)."""
    return False

  @property
  def interface(self) -> "ObjectiveInterface":
    return ObjectiveInterface(self)

  # Time intervals.

  # pylint: disable-next=redefined-builtin
  def interval(self, *, sde=False, eval=False, reverse=False, diffusion_form="SBDM", last_step_size=0.0):
    """(t0, t1) of training (eval=False) or of a sampler (eval=True), SiT's `check_interval` as Python floats.

    VP: [0, 1 − eps] (or [0, 1 − last_step_size] for an SDE with a last step). Linear / GVP with velocity:
    [0, 1], except an SDE, which ends at 1 − last_step_size (1 − eps without a last step) and starts at eps
    with SBDM diffusion. Linear / GVP with score or noise: [eps, 1 − eps] (SDE: end as above). eps is
    train_eps for training, sample_eps for sampling; reverse=True maps (t0, t1) to (1 − t0, 1 − t1).
    """
    eps = self.sample_eps if eval else self.train_eps
    t0, t1 = 0.0, 1.0
    end_at_eps = not sde or last_step_size == 0
    needs_eps = False
    if self.path_type == "VP":
      needs_eps = end_at_eps
      t1 = None if end_at_eps else 1 - last_step_size
    elif self.prediction != Prediction.VELOCITY or sde:
      starts_at_eps = (diffusion_form == "SBDM" and sde) or self.prediction != Prediction.VELOCITY
      needs_eps = starts_at_eps or end_at_eps
      t0 = None if starts_at_eps else 0.0
      t1 = None if end_at_eps else 1 - last_step_size
    if needs_eps and eps is None:
      raise ValueError(f"this {self.path_type} {self.prediction.value} transport has sample_eps=None (SiT leaves it "
                       "unset when only train_eps is given): pass sample_eps to create_transport")
    t0 = eps if t0 is None else t0
    t1 = 1 - eps if t1 is None else t1
    if reverse:
      t0, t1 = 1 - t0, 1 - t1
    return float(t0), float(t1)

  def training_t_from_uniform(self, u):
    """Training t from uniform draws u: (B,) in [0, 1): u·(t1 − t0) + t0 in float32, as SiT's Transport.sample."""
    t0, t1 = self.interval()
    return jnp.asarray(u, jnp.float32) * np.float32(t1 - t0) + np.float32(t0)

  def draw_training_t(self, key, batch_size: int):
    """(B,) float32 training times, uniform on this transport's training interval."""
    return self.training_t_from_uniform(jax.random.uniform(key, (batch_size,), jnp.float32))

  # Model outputs and what follows from them.

  def _call_model(self, model_fn, x, t, y, aux_log=None):
    out = model_fn(x, t) if y is None else model_fn(x, t, y)
    if aux_log is not None:  # with_aux: model_fn returned (out, {name: ()}), kept in evaluation order
      out, aux = out
      aux_log.append(aux)
    if out.shape != x.shape:
      hint = ""
      if out.shape == x.shape[:-1] + (2 * x.shape[-1],):
        hint = (f" (a learn_sigma model's 2×C channels: wrap it with first_channels(model_fn, {x.shape[-1]}), "
                "as SiT keeps the first C)")
      raise ValueError(f"model output has shape {out.shape}, expected x's shape {x.shape}{hint}")
    return out.astype(x.dtype)

  def ode_drift(self, out, x, t):
    """Probability-flow ODE drift dx/dt from the model output `out` at (x, t): (B, ...)."""
    if self.prediction == Prediction.VELOCITY:
      return out
    drift_mean, drift_var = self.path.compute_drift(x, t)
    return -drift_mean + drift_var * self.score(out, x, t)

  def score(self, out, x, t):
    """∇log p_t(x) from the model output `out` at (x, t): (B, ...)."""
    if self.prediction == Prediction.SCORE:
      return out
    if self.prediction == Prediction.NOISE:
      return out / -self.path.compute_sigma_t(paths.expand_t_like_x(t, x))[0]
    return self.path.get_score_from_velocity(out, x, t)

  # Training.

  def loss_terms(self, pred, x0, x1, t):
    """Per-sample loss of a prediction `pred` at x_t = plan(t, x0, x1), split from `training_losses` for trainers
    that run the model themselves. pred, x0, x1: (B, H, W, C); t: (B,).

    Returns: dict with `loss` (B,) (the weighted loss SiT optimises), `mse` (B,) (unweighted, of the regression
    target), `target` (B, H, W, C) (u_t, x0 or −x0/σ_t by prediction), `x_t`, `u_t` (the velocity target).
    """
    x_t, u_t = self.path.plan(t, x0, x1)
    if self.prediction == Prediction.VELOCITY:
      target, weight = u_t, 1.0
    else:
      _, drift_var = self.path.compute_drift(x_t, t)
      sigma_t, _ = self.path.compute_sigma_t(paths.expand_t_like_x(t, x_t))
      if self.loss_weight == LossWeight.VELOCITY:
        weight = (drift_var / sigma_t) ** 2
      elif self.loss_weight == LossWeight.LIKELIHOOD:
        weight = drift_var / sigma_t ** 2
      else:
        weight = 1.0
      target = x0 if self.prediction == Prediction.NOISE else -x0 / sigma_t
    if self.prediction == Prediction.SCORE:
      # SiT's form w·(s·σ + x0)², not w·σ²·(s − target)²: the same up to rounding, kept for parity.
      loss = _mean_flat(weight * (pred * sigma_t + x0) ** 2)
    else:
      loss = _mean_flat(weight * (pred - target) ** 2)
    return dict(loss=loss, mse=_mean_flat((pred - target) ** 2), target=target, x_t=x_t, u_t=u_t)

  def training_losses(self, model_fn: ModelFn, x1, key=None, t=None, x0=None, y=None):
    """Per-sample training losses (SiT's Transport.training_losses).

    Args:
      model_fn: (x_t, t) -> (B, H, W, C) prediction; (x_t, t, y) when `y` is given.
      x1: (B, H, W, C) data.
      key: PRNG key for whatever of t and x0 is not given (split into a t key and a noise key).
      t: (B,) times in [0, 1]; default uniform on the training interval (`draw_training_t`).
      x0: (B, H, W, C) noise; default N(0, I).
      y: (B,) labels passed to model_fn as its third argument.

    Returns: dict with `loss` (B,), `mse` (B,), `pred`, `target`, `x_t`, `u_t`, `x0` (B, H, W, C) and `t` (B,).
    """
    if (t is None or x0 is None) and key is None:
      raise ValueError("training_losses needs a PRNG `key` unless both `t` and `x0` are given")
    t_key, noise_key = jax.random.split(key) if key is not None else (None, None)
    batch = x1.shape[0]
    if t is None:
      t = self.draw_training_t(t_key, batch)
    else:
      t = jnp.asarray(t)
      if t.shape != (batch,):
        raise ValueError(f"t has shape {t.shape}, expected ({batch},): one time per sample")
      if _is_concrete(t):  # values are checked where they are known (not inside a trace)
        values = np.asarray(t)
        if not np.all((values >= 0) & (values <= 1)):
          raise ValueError(f"t must lie in [0, 1] (0 = noise, 1 = data), got values in "
                           f"[{values.min()}, {values.max()}]")
    t = t.astype(x1.dtype)
    if x0 is None:
      x0 = jax.random.normal(noise_key, x1.shape, x1.dtype)
    elif x0.shape != x1.shape:
      raise ValueError(f"x0 has shape {x0.shape}, expected x1's shape {x1.shape}")
    x_t, _ = self.path.plan(t, x0, x1)
    pred = self._call_model(model_fn, x_t, t, y)
    return dict(self.loss_terms(pred, x0, x1, t), pred=pred, x0=x0, t=t)

  # Sampling.

  def _grid(self, t0, t1, num_steps):
    if not isinstance(num_steps, int) or num_steps < 2:
      raise ValueError(f"num_steps counts time-grid points (SiT's convention) and must be an int >= 2, "
                       f"got {num_steps!r}")
    return jnp.linspace(t0, t1, num_steps, dtype=jnp.float32)

  def sample_ode(self, model_fn: ModelFn, x_T, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3,
                 reverse=False, return_trajectory=False, y=None, max_steps=4096, with_aux=False, progress=None):
    """Solves the probability-flow ODE from x_T (SiT's Sampler.sample_ode; jit the caller).

    Args:
      model_fn: (x, t) -> (B, H, W, C); (x, t, y) with `y`. It gets float32 t (B,).
      x_T: (B, H, W, C) noise at t0 (data at t = 1 when reverse).
      sampling_method: "euler", "heun2" (fixed steps on the grid, one lax.scan) or "dopri5" (adaptive).
      num_steps: time-grid points from t0 to t1 (num_steps − 1 steps for euler / heun2; the save points of
        dopri5).
      atol, rtol: dopri5's tolerances (unused by the fixed-step methods).
      reverse: integrate from data (t = 1) to noise (t = 0).
      return_trajectory: also return the state at every grid time, (num_steps, B, H, W, C), [0] = x_T.
      y: labels passed to model_fn as its third argument.
      max_steps: dopri5's cap on steps (accepted + rejected); a solve that needs more returns non-finite values.
      with_aux: model_fn returns (out, {name: () array}) (a routed model's FLOPs ratio, ...), and the result
        gains a last element {name: (E,)}, one value per model evaluation in evaluation order
        (euler: E = num_steps − 1, heun2: 2 per step). Fixed-step methods only.
      progress: a `dyngen.progress.LoopProgress`, ticked after each fixed step (host-side reports from inside
        the loop; the samples are unchanged). dopri5 does not report.

    Returns: samples (B, H, W, C), or (samples, trajectory); + (aux,) with `with_aux`.
    """
    if sampling_method not in ODE_METHODS:
      raise ValueError(f"unknown ODE sampling_method {sampling_method!r}; expected one of {ODE_METHODS}")
    if with_aux and sampling_method == "dopri5":
      raise ValueError("with_aux records one value per model evaluation of a fixed grid; dopri5 chooses its "
                       "evaluations adaptively: use sampling_method 'euler' or 'heun2'")
    t0, t1 = self.interval(eval=True, reverse=reverse)
    grid = self._grid(t0, t1, num_steps)

    def drift(x, t, aux_log=None):  # t: () float32 grid value
      t = jnp.full(x.shape[:1], t, jnp.float32)
      return self.ode_drift(self._call_model(model_fn, x, t, y, aux_log), x, t).astype(x.dtype)

    if sampling_method == "dopri5":
      import diffrax  # pylint: disable=g-import-not-at-top  # ~1 s to import; only dopri5 needs it
      solution = diffrax.diffeqsolve(
          diffrax.ODETerm(lambda t, x, args: drift(x, t.astype(jnp.float32))), diffrax.Dopri5(),
          t0=grid[0], t1=grid[-1], dt0=None, y0=x_T, saveat=diffrax.SaveAt(ts=grid),
          stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps,
          throw=False)
      trajectory = solution.ys.astype(x_T.dtype)
      return (trajectory[-1], trajectory) if return_trajectory else trajectory[-1]

    def step(x, scanned):
      (t_cur, t_next), done = scanned
      aux_log = [] if with_aux else None
      dt = t_next - t_cur  # float32, as torchdiffeq's fixed grid
      k1 = drift(x, t_cur, aux_log)
      if sampling_method == "euler":
        x = x + dt * k1
      else:  # heun2: the second evaluation at t_cur + dt, which is the next grid time
        k2 = drift(x + dt * k1, t_next, aux_log)
        x = x + dt * (k1 * 0.5 + k2 * 0.5)
      x = x.astype(x_T.dtype)
      if progress is not None:
        progress.tick(done, num_steps - 1)
      return x, (x if return_trajectory else None, _stack_aux(aux_log))

    final, (states, aux) = jax.lax.scan(step, x_T, ((grid[:-1], grid[1:]), jnp.arange(1, num_steps)))
    result = (final,)
    if return_trajectory:
      result += (jnp.concatenate([x_T[None], states], axis=0),)
    if with_aux:
      result += (_flat_aux(aux),)
    return result if len(result) > 1 else final

  def ode_evaluations(self, sampling_method, num_steps, y=None):
    """`sample_ode`'s fixed-step loop one model evaluation at a time, for loops that run each evaluation
    themselves (the routed models' fast path, `dyngen.train.routing_plan.SamplingSchedule`).

    Returns: (model_times, init, update, result): model_times (E,) float32 numpy, the t of evaluation e (euler:
    the grid's first num_steps − 1 points; heun2: t_0, t_1, t_1, t_2, ..., two per step); init(x_T) -> state;
    update(model_fn, state, e, key) -> state, which calls model_fn(x, t) once with t = (B,) copies of
    model_times[e] (e traced; key unused: the ODE is deterministic); result(state) -> samples. Run in order
    for e = 0 .. E−1, they give `sample_ode(model_fn, x_T, sampling_method, num_steps)` with the same arithmetic.
    """
    if sampling_method not in ("euler", "heun2"):
      raise ValueError(f"evaluation-by-evaluation ODE loops exist for 'euler' and 'heun2', got {sampling_method!r}")
    t0, t1 = self.interval(eval=True)
    grid = self._grid(t0, t1, num_steps)
    grid_values = np.asarray(grid)

    def drift(model_fn, x, t):  # t: () float32; a learn_sigma model's extra channels are dropped, as SiT
      t = jnp.full(x.shape[:1], t, jnp.float32)
      out = self._call_model(first_channels(model_fn, x.shape[-1]), x, t, y)
      return self.ode_drift(out, x, t).astype(x.dtype)

    if sampling_method == "euler":
      def euler_update(model_fn, x, e, key):
        del key
        return (x + (grid[e + 1] - grid[e]) * drift(model_fn, x, grid[e])).astype(x.dtype)

      return grid_values[:-1].copy(), lambda x_T: x_T, euler_update, lambda x: x

    def heun_update(model_fn, state, e, key):  # state (x, k1): even e computes k1, odd e finishes the step
      del key
      x, k1 = state
      j, second = e // 2, e % 2 == 1
      t_cur, t_next = grid[j], grid[j + 1]
      dt = t_next - t_cur
      k = drift(model_fn, jnp.where(second, x + dt * k1, x).astype(x.dtype), jnp.where(second, t_next, t_cur))
      x = jnp.where(second, x + dt * (k1 * 0.5 + k * 0.5), x).astype(x.dtype)
      return x, jnp.where(second, jnp.zeros_like(k), k)

    model_times = np.stack([grid_values[:-1], grid_values[1:]], axis=1).reshape(-1)
    return model_times, lambda x_T: (x_T, jnp.zeros_like(x_T)), heun_update, lambda state: state[0]

  def sde_evaluations(self, sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0, last_step="Mean",
                      last_step_size=0.04, num_steps=250, y=None):
    """`sample_sde`'s loop one model evaluation at a time, as `ode_evaluations` (for the routed fast path).

    Returns: (model_times, evaluation_steps, init, update, result): model_times (E,) float32 numpy, the t of
    evaluation e (Euler: the grid's first num_steps − 1 points; Heun: t_k, t_k + dt for each step k; then t1
    for the last step unless last_step is None); evaluation_steps (E,) int32 numpy, the stochastic step whose
    noise evaluation e draws (`sample_sde` draws step k's from `fold_in(key, k)`: the caller passes update that
    key); init, update(model_fn, state, e, key) -> state (one model call) and result as `ode_evaluations`'.
    Run in order they give `sample_sde(model_fn, x_T, ..., key=key)` with the same arithmetic.
    """
    if sampling_method not in SDE_METHODS:
      raise ValueError(f"unknown SDE sampling_method {sampling_method!r}; expected one of {SDE_METHODS}")
    if last_step not in LAST_STEPS:
      raise ValueError(f"unknown last_step {last_step!r}; expected one of {LAST_STEPS}")
    if last_step is None:
      last_step_size = 0.0
    t0, t1 = self.interval(sde=True, eval=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    grid = self._grid(t0, t1, num_steps)
    dt = grid[1] - grid[0]
    sqrt_dt = jnp.sqrt(dt)
    num_noisy = num_steps - 1
    heun = sampling_method == "Heun"
    path = self.path
    grid_values, dt_value = np.asarray(grid), np.asarray(dt)
    if heun:
      step_times = np.stack([grid_values[:-1], (grid_values[:-1] + dt_value).astype(np.float32)], axis=1).reshape(-1)
      steps = np.repeat(np.arange(num_noisy), 2)
    else:
      step_times, steps = grid_values[:-1], np.arange(num_noisy)
    num_stochastic = len(steps)  # evaluations before the last step
    if last_step is not None:
      step_times, steps = np.append(step_times, np.float32(t1)), np.append(steps, num_noisy - 1)
    times = jnp.asarray(step_times, jnp.float32)

    def update(model_fn, state, e, key):
      x, k1 = state  # Heun: (x_hat, first drift) between its two evaluations; else k1 is unused zeros
      stochastic = e < num_stochastic
      second = heun & (e % 2 == 1) & stochastic
      t_step = jnp.full(x.shape[:1], grid[jnp.minimum(e // (2 if heun else 1), num_noisy - 1)], x.dtype)
      dw = jax.random.normal(key, x.shape, x.dtype) * sqrt_dt
      noised = x + jnp.sqrt(2 * path.compute_diffusion(x, t_step, diffusion_form, diffusion_norm)) * dw
      if heun:  # the first evaluation at x_hat = x + noise, the second at x_hat + dt·k1 and t + dt
        x_in = jnp.where(second, x + dt * k1, jnp.where(stochastic, noised, x))
        t = jnp.where(second, t_step + dt, t_step)
      else:
        x_in, t = x, t_step
      t = jnp.where(stochastic, t, jnp.full(x.shape[:1], t1, jnp.float32).astype(x.dtype))
      out = self._call_model(first_channels(model_fn, x.shape[-1]), x_in, t, y)  # learn_sigma: first C, as SiT
      drift = self.ode_drift(out, x_in, t) + path.compute_diffusion(x_in, t, diffusion_form,
                                                                    diffusion_norm) * self.score(out, x_in, t)
      if heun:
        next_x = jnp.where(second, x + 0.5 * dt * (k1 + drift), noised)
        next_k1 = jnp.where(second, jnp.zeros_like(drift), drift)
      else:
        next_x, next_k1 = x + drift * dt + jnp.sqrt(2 * path.compute_diffusion(x, t, diffusion_form,
                                                                              diffusion_norm)) * dw, k1
      if last_step == "Mean":
        last = x + drift * last_step_size
      elif last_step == "Tweedie":
        alpha_t = path.compute_alpha_t(paths.expand_t_like_x(t, x))[0]
        sigma_t = path.compute_sigma_t(paths.expand_t_like_x(t, x))[0]
        last = x / alpha_t + sigma_t ** 2 / alpha_t * self.score(out, x, t)
      elif last_step == "Euler":
        last = x + self.ode_drift(out, x, t) * last_step_size
      else:
        last = next_x
      next_x = jnp.where(stochastic, next_x, last)
      return next_x.astype(x.dtype), next_k1.astype(x.dtype)

    return (step_times.astype(np.float32), steps.astype(np.int32), lambda x_T: (x_T, jnp.zeros_like(x_T)), update,
            lambda state: state[0])

  def sample_sde(self, model_fn: ModelFn, x_T, sampling_method="Euler", diffusion_form="sigma", diffusion_norm=1.0,
                 last_step="Mean", last_step_size=0.04, num_steps=250, key=None, step_noise=None,
                 return_trajectory=False, y=None, with_aux=False, progress=None):
    """Samples the reverse SDE dx = [v + w_t·s] dt + sqrt(2 w_t) dW from x_T (SiT's Sampler.sample_sde).

    num_steps − 1 stochastic steps on the grid linspace(t0, 1 − last_step_size, num_steps) at its first
    num_steps − 1 points, one lax.scan, then the last step at t1 = 1 − last_step_size.

    Args:
      model_fn: (x, t) -> (B, H, W, C); (x, t, y) with `y`. Called once per drift evaluation (SiT calls it
        twice with the same inputs, once for the drift and once for the score).
      x_T: (B, H, W, C) noise at t0.
      sampling_method: "Euler" (Euler–Maruyama) or "Heun" (noise first, then a Heun step of the drift).
      diffusion_form, diffusion_norm: w_t, see `paths.LinearPath.compute_diffusion` ("sigma": norm·σ_t).
      last_step: "Mean" (x + sde_drift·h), "Tweedie" (x/α + σ²/α·score), "Euler" (x + ode_drift·h) or None
        (x unchanged; the grid then ends at 1 − sample_eps), with h = last_step_size.
      num_steps: time-grid points (SiT's convention).
      key: PRNG key; stochastic step k draws N(0, I) from `fold_in(key, k)`.
      step_noise: (num_steps − 1, B, H, W, C) explicit noise, step_noise[k] for step k; takes precedence.
      return_trajectory: also return (num_steps, B, H, W, C): the state after each stochastic step, then the
        last step's result (x_T not included, as SiT).
      y: labels passed to model_fn as its third argument.
      with_aux: model_fn returns (out, {name: () array}); the result gains a last element {name: (E,)}, one
        value per model evaluation in evaluation order (1 per Euler step, 2 per Heun step, 1 for the last
        step unless last_step is None).
      progress: a `dyngen.progress.LoopProgress`, ticked after each stochastic step.

    Returns: samples (B, H, W, C), or (samples, trajectory); + (aux,) with `with_aux`.
    """
    if sampling_method not in SDE_METHODS:
      raise ValueError(f"unknown SDE sampling_method {sampling_method!r}; expected one of {SDE_METHODS}")
    if last_step not in LAST_STEPS:
      raise ValueError(f"unknown last_step {last_step!r}; expected one of {LAST_STEPS}")
    if diffusion_form not in paths.DIFFUSION_FORMS:
      raise ValueError(f"unknown diffusion_form {diffusion_form!r}; expected one of {paths.DIFFUSION_FORMS}")
    if last_step is None:
      last_step_size = 0.0
    elif not 0 < last_step_size < 1:
      raise ValueError(f"last_step_size must lie in (0, 1) with last_step={last_step!r}, got {last_step_size!r}")
    t0, t1 = self.interval(sde=True, eval=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    if not t0 < t1:
      raise ValueError(f"the SDE runs forward in time but its interval is [{t0}, {t1}]")
    grid = self._grid(t0, t1, num_steps)
    dt = grid[1] - grid[0]
    sqrt_dt = jnp.sqrt(dt)
    num_noisy = num_steps - 1
    if step_noise is not None:
      if step_noise.shape != (num_noisy,) + x_T.shape:
        raise ValueError(f"step_noise has shape {step_noise.shape}, expected (num_steps - 1,) + x_T.shape = "
                         f"{(num_noisy,) + x_T.shape}: one noise array per stochastic step")
      noise_source = step_noise.astype(x_T.dtype)
    elif key is not None:
      noise_source = jnp.arange(num_noisy)
    else:
      raise ValueError("sample_sde adds noise: pass a PRNG `key` or explicit `step_noise` "
                       "(num_steps - 1, B, H, W, C)")
    path = self.path

    def model_out(x, t, aux_log=None):
      return self._call_model(model_fn, x, t, y, aux_log)

    def sde_drift(x, t, aux_log=None):
      out = model_out(x, t, aux_log)
      return self.ode_drift(out, x, t) + path.compute_diffusion(x, t, diffusion_form, diffusion_norm) * self.score(
          out, x, t)

    def step(x, scanned):
      (t_value, source), done = scanned
      aux_log = [] if with_aux else None
      noise = source if step_noise is not None else jax.random.normal(jax.random.fold_in(key, source), x.shape,
                                                                      x.dtype)
      t = jnp.full(x.shape[:1], t_value, x.dtype)
      dw = noise * sqrt_dt
      diffusion = path.compute_diffusion(x, t, diffusion_form, diffusion_norm)
      if sampling_method == "Euler":
        x = x + sde_drift(x, t, aux_log) * dt + jnp.sqrt(2 * diffusion) * dw
      else:
        x_hat = x + jnp.sqrt(2 * diffusion) * dw
        k1 = sde_drift(x_hat, t, aux_log)
        k2 = sde_drift(x_hat + dt * k1, t + dt, aux_log)
        x = x_hat + 0.5 * dt * (k1 + k2)
      x = x.astype(x_T.dtype)
      if progress is not None:
        progress.tick(done, num_noisy)
      return x, (x if return_trajectory else None, _stack_aux(aux_log))

    x, (states, aux) = jax.lax.scan(step, x_T, ((grid[:-1], noise_source), jnp.arange(1, num_steps)))
    ts = jnp.full(x.shape[:1], t1, jnp.float32)  # float32 also in a float64 run, as SiT
    last_aux = [] if with_aux else None
    if last_step == "Mean":
      x = x + sde_drift(x, ts, last_aux) * last_step_size
    elif last_step == "Tweedie":
      alpha_t = path.compute_alpha_t(paths.expand_t_like_x(ts, x))[0]
      sigma_t = path.compute_sigma_t(paths.expand_t_like_x(ts, x))[0]
      x = x / alpha_t + sigma_t ** 2 / alpha_t * self.score(model_out(x, ts, last_aux), x, ts)
    elif last_step == "Euler":
      x = x + self.ode_drift(model_out(x, ts, last_aux), x, ts) * last_step_size
    x = x.astype(x_T.dtype)
    result = (x,)
    if return_trajectory:
      result += (jnp.concatenate([states, x[None]], axis=0),)
    if with_aux:
      result += (_flat_aux(aux, _stack_aux(last_aux) if last_aux else None),)
    return result if len(result) > 1 else x


def create_transport(path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                     sample_eps=None) -> Transport:
  """A Transport configured as SiT's `create_transport` (same arguments, defaults and epsilon rules).

  Args:
    path_type: "Linear" (α = t, σ = 1 − t), "GVP" (α = sin(πt/2), σ = cos(πt/2)) or "VP".
    prediction: "velocity", "score" or "noise".
    loss_weight: None, "velocity" or "likelihood" (score and noise predictions only).
    train_eps, sample_eps: VP defaults to 1e-5 / 1e-3, Linear and GVP with score or noise to 1e-3 / 1e-3;
      Linear and GVP with velocity always use 0 / 0 (stable on all of [0, 1]), whatever is passed. As SiT,
      sample_eps takes its default only when train_eps is None too.
  """
  if path_type not in paths.PATHS:
    raise ValueError(f"unknown path_type {path_type!r}; expected one of {sorted(paths.PATHS)}")
  predictions = [p.value for p in Prediction]
  if prediction not in predictions:
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {predictions}")
  weights = [w.value for w in LossWeight]
  if loss_weight not in weights:
    raise ValueError(f"unknown loss_weight {loss_weight!r}; expected one of {weights}")
  prediction = Prediction(prediction)
  for name, eps in (("train_eps", train_eps), ("sample_eps", sample_eps)):
    if eps is not None and not 0 <= eps < 0.5:
      raise ValueError(f"{name} must lie in [0, 0.5) or be None (SiT's default), got {eps!r}")
  if path_type == "VP":
    default_train, default_sample = 1e-5, 1e-3
  elif prediction != Prediction.VELOCITY:
    default_train, default_sample = 1e-3, 1e-3
  else:
    train_eps, sample_eps = 0.0, 0.0
    default_train = default_sample = None
  if default_train is not None:
    if train_eps is None:
      train_eps, sample_eps = default_train, default_sample
  return Transport(path_type=path_type, prediction=prediction, loss_weight=LossWeight(loss_weight),
                   train_eps=float(train_eps), sample_eps=None if sample_eps is None else float(sample_eps))


# One interface for the trainer and the sampler, whichever objective a config chooses.

DIFFUSION_SAMPLERS = ("ddpm", "ddim")
FLOW_ODE_SAMPLERS = ODE_METHODS
FLOW_SDE_SAMPLERS = {"sde_euler": "Euler", "sde_heun": "Heun"}


def sde_options(sample_config) -> dict:
  """`sample_sde`'s keyword arguments of an SDE sampler named by `sample_config` (a config's sample section;
  fields it lacks take SiT's defaults, a last_step of "" is None)."""
  get = lambda name, default: getattr(sample_config, name, default)
  return dict(sampling_method=FLOW_SDE_SAMPLERS[sample_config.sampler],
              diffusion_form=get("diffusion_form", "sigma"), diffusion_norm=get("diffusion_norm", 1.0),
              last_step=get("last_step", "Mean") or None, last_step_size=get("last_step_size", 0.04))
FLOW_SAMPLERS = FLOW_ODE_SAMPLERS + tuple(FLOW_SDE_SAMPLERS)
OBJECTIVES = ("diffusion", "flow")


def transport_from_config(transport_config) -> Transport:
  """`create_transport` of a run's `config.transport` (path_type, prediction, loss_weight, train_eps,
  sample_eps; None or "" for loss_weight means no weight, None for an epsilon SiT's default)."""
  return create_transport(path_type=transport_config.path_type, prediction=transport_config.prediction,
                          loss_weight=transport_config.loss_weight or None, train_eps=transport_config.train_eps,
                          sample_eps=transport_config.sample_eps)


@dataclasses.dataclass(frozen=True)
class ObjectiveInterface:
  """The calls a trainer and a sampler make, the same for a `GaussianDiffusion` and a `Transport`.

  model_fn is (x, t) -> (B, H, W, C_out) in both cases, with t whatever `draw_training_t` returns (int32 original
  timesteps for the diffusion, float32 in [0, 1] for the transport), which the models take as is.
  """
  process: gaussian_diffusion.GaussianDiffusion | Transport

  def __post_init__(self):
    if not isinstance(self.process, (gaussian_diffusion.GaussianDiffusion, Transport)):
      raise ValueError(f"expected a GaussianDiffusion or a Transport, got {type(self.process).__name__}")

  @property
  def is_flow(self) -> bool:
    return isinstance(self.process, Transport)

  @property
  def learns_variance(self) -> bool:
    """Whether the loss trains variance channels (the model must then output 2C channels)."""
    return self.process.learns_variance

  def draw_training_t(self, key, batch_size: int, stratified: bool = False):
    """(B,) training times: int32 uniform on {0, ..., T−1}, or float32 on the transport's training interval.

    stratified: row i is drawn from quarter (i mod 4) of the range (DyDiT's --t_sample): for the diffusion
    U{0..T/4−1} + T/4·(i mod 4), as dyngen.train.objectives.draw_timesteps; for a transport u ↦ (u + i mod 4)/4.
    """
    quarter = jnp.arange(batch_size, dtype=jnp.int32) % 4
    if self.is_flow:
      u = jax.random.uniform(key, (batch_size,), jnp.float32)
      if stratified:
        u = (u + quarter.astype(jnp.float32)) / 4
      return self.process.training_t_from_uniform(u)
    if not stratified:
      return jax.random.randint(key, (batch_size,), 0, self.process.num_timesteps, dtype=jnp.int32)
    size = self.process.num_timesteps // 4
    return jax.random.randint(key, (batch_size,), 0, size, dtype=jnp.int32) + size * quarter

  def training_losses(self, model_fn: ModelFn, x_start, t, key):
    """dict of (B,) `loss`, `mse`, `vb` for data x_start: (B, H, W, C) at times t from `draw_training_t`.

    For a transport, `vb` is zeros and a 2C-channel output (a learn_sigma model) keeps its first C channels.
    """
    if not self.is_flow:
      return self.process.training_losses(model_fn, x_start, t, key=key)
    channels = x_start.shape[-1]
    terms = self.process.training_losses(lambda x, s: model_fn(x, s)[..., :channels], x_start, key=key, t=t)
    return dict(loss=terms["loss"], mse=terms["mse"], vb=jnp.zeros_like(terms["loss"]))

  def sample_loop(self, model_fn: ModelFn, x_T, key, sample_config, with_aux=False, progress=None):
    """Samples (B, H, W, C) from noise x_T: (B, H, W, C) with the loop `sample_config.sampler` names.

    Diffusion: "ddpm" or "ddim" (with sample_config.eta, clip_denoised) over the process's own (respaced) steps.
    Transport: "euler", "heun2", "dopri5" (ODE; atol / rtol if present) or "sde_euler", "sde_heun" (SDE;
    diffusion_form, diffusion_norm, last_step ("" = None), last_step_size if present), over
    sample_config.num_steps grid points. with_aux (transport only): model_fn returns (out, {name: ()}) and the
    result is (samples, {name: (E,)}), one value per model evaluation. progress: a
    `dyngen.progress.LoopProgress` ticked after each step.
    """
    sampler = sample_config.sampler
    if not self.is_flow:
      if with_aux:
        raise ValueError("with_aux is for a transport; the diffusion's routed loop is "
                         "dyngen.train.sample.routed_sample_loop")
      if sampler not in DIFFUSION_SAMPLERS:
        raise ValueError(f"unknown diffusion sampler {sampler!r}; expected one of {DIFFUSION_SAMPLERS}")
      if sampler == "ddim":
        return self.process.ddim_sample_loop(model_fn, x_T, key=key, clip_denoised=sample_config.clip_denoised,
                                             eta=sample_config.eta, progress=progress)
      return self.process.p_sample_loop(model_fn, x_T, key=key, clip_denoised=sample_config.clip_denoised,
                                        progress=progress)
    get = lambda name, default: getattr(sample_config, name, default)
    channels = x_T.shape[-1]
    if with_aux:
      def flow_fn(*args):
        out, aux = model_fn(*args)
        return out[..., :channels], aux
    else:
      flow_fn = first_channels(model_fn, channels)
    if sampler in FLOW_ODE_SAMPLERS:
      return self.process.sample_ode(flow_fn, x_T, sampling_method=sampler, num_steps=sample_config.num_steps,
                                     atol=get("atol", 1e-6), rtol=get("rtol", 1e-3), with_aux=with_aux,
                                     progress=progress)
    if sampler in FLOW_SDE_SAMPLERS:
      return self.process.sample_sde(flow_fn, x_T, **sde_options(sample_config), num_steps=sample_config.num_steps,
                                     key=key, with_aux=with_aux, progress=progress)
    raise ValueError(f"unknown flow-matching sampler {sampler!r}; expected one of {FLOW_SAMPLERS}")

  def sampling_times(self, sample_config) -> np.ndarray:
    """The times the sampling loop starts its steps at, in run order, as the model receives them.

    Diffusion: the respaced process's original timesteps, T−1 first. Transport: the grid's first
    num_steps − 1 points (a Heun step also evaluates at the next one; an SDE's last step at the grid's end).
    """
    if not self.is_flow:
      return np.asarray(self.process.timestep_map)[::-1].copy()
    sde = sample_config.sampler in FLOW_SDE_SAMPLERS
    last_step = getattr(sample_config, "last_step", "Mean") or None
    kwargs = dict(sde=True, diffusion_form=getattr(sample_config, "diffusion_form", "sigma"),
                  last_step_size=getattr(sample_config, "last_step_size", 0.04) if last_step else 0.0) if sde else {}
    t0, t1 = self.process.interval(eval=True, **kwargs)
    return np.asarray(self.process._grid(t0, t1, sample_config.num_steps))[:-1]  # pylint: disable=protected-access


def objective_interface(process) -> ObjectiveInterface:
  """The uniform trainer / sampler calls for a GaussianDiffusion or a Transport."""
  return ObjectiveInterface(process)
