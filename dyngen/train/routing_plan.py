"""Routed models' fast sampling: a plan of what every step runs, known before sampling, and the programs that
run it. The machinery is shared by the routed families (DyDiT, DyDiG); a family supplies its gathered block
(`dydit_fast.Family`: `dydit_fast.DYDIT`, `dydig_fast.DYDIG`; `fast_family`).

Width. The head and MLP-group routers read the timestep embedding alone, and every row of a sampling
step (conditional and null halves) shares t, so the active units of every block at every step follow from
the schedule and the routers. A "step" here is one model evaluation; the process is a `SamplingSchedule`
(the model's t per evaluation and an update function; `gaussian_schedule` gives the respaced DDPM / DDIM
loop, and any other sampler, e.g. a flow ODE on a fixed grid, plugs in the same way). `make_plan`:
  1. computes, per step and block, the router logits and eval decisions (`dydit.binarize`, unit 0 always
     on) and applies the width cap (at most ceil(width_cap * H) heads and ceil(width_cap * G) MLP groups,
     the top by logit; H heads and G groups per block, `width_units`);
  2. rounds each active count up to a capacity, one of ceil(j * H / capacity_buckets), j = 1..buckets (G
     for groups; the extra units are real units with mask 0: they run and add nothing);
  3. per block a token capacity: ceil(token_capacity * N), or, calibrated (`calibrate_token_counts`), the
     most tokens the router wanted at that step and block on a calibration batch, rounded up to a multiple
     of ceil(N / token_buckets) and at most ceil(token_capacity * N);
  4. a step's signature is its (heads, groups, tokens) per block; consecutive steps of one signature form a
     segment. More than `max_programs` segments are merged, adjacent ones, into at most `max_programs`,
     the partition that adds the fewest executed FLOPs (dynamic programming; a merged segment runs at the
     elementwise largest capacities of its steps).
`FastSampler` compiles one step loop per distinct signature (and batch shape, guidance on/off): a
`fori_loop` over a call's steps [lo, hi) on gathered weight slices, which are its inputs, so it depends on
its capacities alone; and one gather of a block's slices per (heads, groups) capacity pair (the block and
its units' indices and masks are inputs). A call is a segment cut where some block's units change (their
count within a segment does not); only the blocks whose units changed are gathered again. Evaluation k
gets the k-th of `split(key, S)` (for the Gaussian schedule: the noise of `GaussianDiffusion.p_sample_loop`
and of the masked `routed_sample_loop`), whatever the segmentation. Step loops compiled <= distinct
signatures <= segments <= max_programs per batch shape and guidance setting; block gathers <=
capacity_buckets² in all.
"""
import dataclasses
import math
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dyngen import diffusion as diffusion_lib
from dyngen.models import dydig
from dyngen.models import dydig_fast
from dyngen.models import dydit
from dyngen.models import dydit_fast
from dyngen.models import flops
from dyngen.models import layers

ROUTING_MODES = ("fast", "masked")
TOKEN_POOLING = ("row", "batch")


def check_fraction(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"{name}={value!r} must be in (0, 1]: the fraction of the trained units / tokens to keep "
                     "at most (1 = all the router wants)")


def check_positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r} must be a positive int")


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
  """The fast path's knobs (config.sample fields of the same names).

  width_cap: at most ceil(width_cap * H) heads and ceil(width_cap * G) MLP groups per block and step (the
    top by router logit); token_capacity: at most ceil(token_capacity * N) tokens per block through the MLP
    (the top by token-router logit); calibrate_tokens: the capacity per step and block from the router's
    wanted counts on calibration batches (at most the above), else exactly ceil(token_capacity * N);
    calibration_batches: how many (the first batch, then fresh noise draws for its labels; the most tokens
    any of them wanted); capacity_buckets: head / group counts are rounded up to ceil(j * H /
    capacity_buckets); token_buckets: calibrated token counts to multiples of ceil(N / token_buckets);
    max_programs: the most segments (hence compiled programs) per batch shape and guidance setting;
    token_pooling: "row" (each row runs at most its capacity k, the top k of its tokens) or "batch" (the
    top B·k tokens of the whole batch of B rows: a row may run more, another fewer; calibrated on the
    batch's mean wanted count instead of its largest row's).
  """
  width_cap: float = 1.0
  token_capacity: float = 1.0
  calibrate_tokens: bool = True
  calibration_batches: int = 1
  capacity_buckets: int = 4
  token_buckets: int = 16
  max_programs: int = 8
  token_pooling: str = "row"

  def __post_init__(self):
    if self.token_pooling not in TOKEN_POOLING:
      raise ValueError(f"token_pooling={self.token_pooling!r} must be one of {TOKEN_POOLING}")
    check_fraction("width_cap", self.width_cap)
    check_fraction("token_capacity", self.token_capacity)
    for name in ("calibration_batches", "capacity_buckets", "token_buckets", "max_programs"):
      check_positive_int(name, getattr(self, name))

  @classmethod
  def from_sample_config(cls, sample_config):
    defaults = cls()
    fields = {f.name: sample_config.get(f.name, getattr(defaults, f.name)) for f in dataclasses.fields(cls)}
    try:
      return cls(**fields)
    except ValueError as e:
      raise ValueError(f"config.sample.{e}") from None


def bucket_capacities(total, buckets):
  """The capacities ceil(j * total / buckets), j = 1..buckets (distinct, increasing; the last is total)."""
  return np.unique([math.ceil(j * total / min(buckets, total)) for j in range(1, min(buckets, total) + 1)])


def round_up(counts, capacities):
  """Each count -> the smallest capacity >= it (counts <= capacities[-1])."""
  return capacities[np.searchsorted(capacities, counts, side="left")]


def width_logits(model: dydit.Model, params, t):
  """Head and MLP-group router logits (S, L, H), (S, L, G) for timesteps t (S,), unit 0 as +inf (always on).

  The routers' own computation (as `dydit.width_masks`), logits kept for ranking under a width cap.
  """
  dtype = model.compute_dtype
  t_emb = layers.TimestepEmbedder(model.hidden_size, dtype=dtype).apply({"params": params["t_embedder"]},
                                                                         jnp.asarray(t))
  out = {}
  for name in ("head_router", "mlp_router"):
    per_block = []
    for index in range(model.depth):
      router = (jax.tree.map(lambda p: p[index], params["blocks"][name]) if "blocks" in params
                else params[f"blocks_{index}"][name])
      per_block.append(t_emb @ router["kernel"].astype(dtype) + router["bias"].astype(dtype))
    logits = jnp.stack(per_block, axis=1)
    out[name] = jnp.concatenate([jnp.full(logits.shape[:-1] + (1,), jnp.inf, logits.dtype), logits], axis=-1)
  return out["head_router"], out["mlp_router"]


def _capped_active(logits, model, cap_count):
  """(S, L, H) logits -> (S, L, H) bool: the router's eval decisions, at most cap_count per block (top by logit)."""
  active = np.asarray(dydit.binarize(jnp.asarray(logits), train=False, tau=model.router_tau,
                                     threshold=model.router_threshold)) > 0
  active[..., 0] = True
  rank = np.argsort(np.argsort(-np.where(active, logits, -np.inf), axis=-1, kind="stable"), axis=-1, kind="stable")
  return active & (rank < cap_count)


@dataclasses.dataclass(frozen=True)
class Segment:
  """Steps (model evaluations) [start, stop) in run order on one signature."""
  start: int
  stop: int
  signature: tuple[dydit_fast.BlockCapacity, ...]


@dataclasses.dataclass
class SamplingPlan:
  """What every step of a schedule runs. S steps in run order, L blocks, H heads, G MLP groups, N tokens.

  timesteps (S,): the model's t per step; head_active (S, L, H), group_active (S, L, G) bool (after the
  width cap); head_logits, group_logits of the same shapes (unit 0 +inf); capacities (S, L, 3) int: the (heads, groups, tokens)
  each step runs at (after merging); segments: runs of steps of one signature (<= max_programs); calls: the
  segments cut where a block's gathered units change (one program call each, its slices gathered once).
  """
  timesteps: np.ndarray
  head_active: np.ndarray
  group_active: np.ndarray
  head_logits: np.ndarray
  group_logits: np.ndarray
  capacities: np.ndarray
  segments: list[Segment]
  calls: list[Segment]
  num_tokens: int
  unit_macs: flops.UnitMacs
  pooled_tokens: bool = False  # token capacities per row on average over the batch (token_pooling="batch")

  @property
  def num_steps(self):
    return len(self.timesteps)

  @property
  def signatures(self):
    """The distinct signatures, in order of first use: one compiled program each."""
    return list(dict.fromkeys(segment.signature for segment in self.segments))

  @property
  def width_capacities(self):
    """The distinct (heads, groups) capacity pairs of the blocks: one compiled block gather each."""
    return list(dict.fromkeys(block[:2] for signature in self.signatures for block in signature))

  def split_every_step(self) -> "SamplingPlan":
    """The same plan with every step its own call (same signatures: the samples must not change)."""
    calls = [Segment(k, k + 1, c.signature) for c in self.calls for k in range(c.start, c.stop)]
    return dataclasses.replace(self, calls=calls)

  def units(self, step, signature):
    """Per block (head_index, head_mask, group_index, group_mask) numpy arrays of `step` at `signature`'s
    capacities: the active units, then inactive ones (mask 0) by logit, the first `capacity`, sorted."""
    out = []
    for index, (heads, groups, _) in enumerate(signature):
      fields = []
      for active, logits, count in ((self.head_active, self.head_logits, heads),
                                    (self.group_active, self.group_logits, groups)):
        on, score = active[step, index], logits[step, index]
        order = np.lexsort((-np.nan_to_num(score, posinf=1e30), ~on))[:count]
        chosen = np.sort(order).astype(np.int32)
        fields += [chosen, on[chosen].astype(np.float32)]
      out.append(tuple(fields))
    return out

  def block_plans(self, call: Segment):
    """Per block a `dydit_fast.BlockPlan` (arrays of the capacities) of the call's steps."""
    return [dydit_fast.BlockPlan(*map(jnp.asarray, fields)) for fields in self.units(call.start, call.signature)]

  def executed_flops_ratio(self):
    """(S,) the FLOPs ratio of what each step computes: every gathered unit (padding included) and every
    selected token (those the router did not want included) counted as computed."""
    units = (self.head_active.shape[-1], self.group_active.shape[-1])
    total = _segment_cost(self.capacities, units, self.num_tokens, self.unit_macs)  # (S,) summed over blocks
    return total / self.capacities.shape[1] / (self.unit_macs.attention + self.unit_macs.mlp)

  def summary(self) -> dict:
    return dict(segments=len(self.segments), programs=len(self.signatures), calls=len(self.calls),
                steps_per_segment=[s.stop - s.start for s in self.segments])


def _same_units(a, b):
  return all(all(np.array_equal(x, y) for x, y in zip(block_a, block_b)) for block_a, block_b in zip(a, b))


def _signature(capacities_of_step):
  return tuple(tuple(int(c) for c in block) for block in capacities_of_step)


def _segment_cost(capacities, units, tokens, unit_macs):
  """Executed MACs per row of steps at capacities (..., L, 3), summed over the blocks; units: (H, G)."""
  heads, groups = units
  cap = capacities.astype(np.float64)
  return np.sum(cap[..., 0] / heads * unit_macs.attention
                + cap[..., 1] / groups * cap[..., 2] / tokens * unit_macs.mlp, axis=-1)


def merge_segments(runs, capacities, max_segments, units, tokens, unit_macs):
  """Partition the runs [(start, stop)] of equal per-step capacities (S, L, 3) into <= max_segments
  contiguous groups of least executed MACs; each group runs at the elementwise max of its steps'.
  units: (H, G), the heads and MLP groups per block. Returns [(start, stop, group capacities (L, 3))]."""
  n = len(runs)
  run_caps = np.stack([capacities[start] for start, _ in runs])
  lengths = np.array([stop - start for start, stop in runs])
  if n <= max_segments:
    return [(start, stop, run_caps[i]) for i, (start, stop) in enumerate(runs)]
  # cost[i, j]: runs i..j as one segment.
  cost = np.full((n, n), np.inf)
  for i in range(n):
    running = np.maximum.accumulate(run_caps[i:], axis=0)
    cost[i, i:] = _segment_cost(running, units, tokens, unit_macs) * np.cumsum(lengths[i:])
  best = np.full((max_segments + 1, n + 1), np.inf)
  best[0, 0] = 0.0
  choice = np.zeros((max_segments + 1, n + 1), int)
  for m in range(1, max_segments + 1):
    for j in range(1, n + 1):
      candidates = best[m - 1, :j] + cost[np.arange(j), j - 1]
      choice[m, j] = int(np.argmin(candidates))
      best[m, j] = candidates[choice[m, j]]
  m = int(np.argmin(best[:, n]))
  bounds, j = [], n
  while j > 0:
    i = choice[m, j]
    bounds.append((i, j))
    j, m = i, m - 1
  merged = []
  for i, j in reversed(bounds):
    merged.append((runs[i][0], runs[j - 1][1], run_caps[i:j].max(axis=0)))
  return merged


def make_plan(model: dydit.Model, params, model_timesteps, options: RoutingOptions, token_counts=None):
  """The plan of a schedule. model_timesteps: (S,) the t the model sees at each model evaluation, in run
  order (`SamplingSchedule.model_timesteps`; any floats); token_counts: (S, L) in run order, the calibrated
  wanted tokens per evaluation and block (`calibrate_token_counts`), used when options.calibrate_tokens
  (required then)."""
  heads, groups = width_units(model)
  tokens = model.num_tokens
  timesteps = np.asarray(model_timesteps)
  if timesteps.ndim != 1 or not timesteps.size or not np.all(np.isfinite(timesteps)):
    raise ValueError(f"model_timesteps must be a non-empty 1-D array of finite values (one per model evaluation), "
                     f"got shape {timesteps.shape}")
  head_logits, group_logits = (np.asarray(jax.device_get(logits), np.float64)
                               for logits in width_logits(model, params, timesteps))
  head_active = _capped_active(head_logits, model, math.ceil(options.width_cap * heads - 1e-9))
  group_active = _capped_active(group_logits, model, math.ceil(options.width_cap * groups - 1e-9))
  token_limit = math.ceil(options.token_capacity * tokens - 1e-9)
  shape = head_active.shape[:2]
  if options.calibrate_tokens:
    if token_counts is None:
      raise ValueError("options.calibrate_tokens needs the calibrated token_counts (S, L): see "
                       "calibrate_token_counts, or set calibrate_tokens=False for a fixed capacity")
    token_counts = np.asarray(token_counts)
    if token_counts.shape != shape:
      raise ValueError(f"token_counts has shape {token_counts.shape}, expected (steps, blocks) = {shape}")
    step = math.ceil(tokens / options.token_buckets)
    token_cap = np.minimum(np.maximum(step, -(-token_counts // step) * step), token_limit)
    token_cap = np.minimum(np.maximum(token_cap, 1), tokens)
  else:
    token_cap = np.full(shape, token_limit)
  capacities = np.stack([round_up(head_active.sum(-1), bucket_capacities(heads, options.capacity_buckets)),
                         round_up(group_active.sum(-1), bucket_capacities(groups, options.capacity_buckets)),
                         token_cap], axis=-1).astype(np.int64)
  # Runs of equal signature, then merged down to the program budget.
  runs, start = [], 0
  for k in range(1, len(timesteps) + 1):
    if k == len(timesteps) or not np.array_equal(capacities[k], capacities[start]):
      runs.append((start, k))
      start = k
  unit_macs = model.unit_macs()
  merged = merge_segments(runs, capacities, options.max_programs, (heads, groups), tokens, unit_macs)
  segments = []
  for start, stop, caps in merged:
    capacities[start:stop] = caps
    segments.append(Segment(start, stop, _signature(caps)))
  plan = SamplingPlan(timesteps, head_active, group_active, head_logits, group_logits, capacities, segments, [],
                      tokens, unit_macs, pooled_tokens=options.token_pooling == "batch")
  for segment in segments:
    start, previous = segment.start, plan.units(segment.start, segment.signature)
    for k in range(segment.start + 1, segment.stop + 1):
      current = plan.units(k, segment.signature) if k < segment.stop else None
      if current is None or not _same_units(current, previous):
        plan.calls.append(Segment(start, k, segment.signature))
        start, previous = k, current
  return plan


@dataclasses.dataclass(frozen=True)
class SamplingSchedule:
  """A sampling process as the fast path runs it: one entry per model evaluation, in run order.

  model_timesteps: (E,) numpy, the t the model sees at evaluation e (ints or floats: a respaced diffusion's
    original timesteps, a flow ODE's time grid in [0, 1], ...). The width plan reads the routers at these.
  update(model_fn, state, e, key) -> state: evaluation e (a traced int32 in [0, E)). It calls
    model_fn(x, t) exactly once, with t = (B,) copies of model_timesteps[e] (the plan's widths are those
    of that t), and returns the next state. key: the e-th of `keys(loop key)` (unused if deterministic).
  init(x_T) -> state and result(state) -> x_0: the loop state, a pytree of batch-leading arrays (default:
    the sample itself; a two-evaluation step keeps more, e.g. Heun's (x, first drift)).

  A new process plugs in by building one (as `gaussian_schedule`): for a flow ODE with grid t_0 .. t_n and
  Euler steps, model_timesteps = t_0 .. t_{n-1} and update = x + (t_{e+1} - t_e) * drift(model_fn(x, t_e));
  for Heun, model_timesteps = t_0, t_1, t_1, t_2, ... (two evaluations per step) and a state (x, k1) whose
  even evaluations store k1 and odd ones finish the step. Plans, segments and programs need nothing more.
  """
  model_timesteps: np.ndarray
  update: Callable
  init: Callable = lambda x_T: x_T
  result: Callable = lambda state: state
  # (loop key) -> (E,) keys, the one `update` gets at each evaluation; None: split(loop key, E). A process
  # whose reference loop derives its noise otherwise passes its own (the flow SDE: fold_in(key, step)).
  evaluation_keys: Callable | None = None

  @property
  def num_evaluations(self):
    return len(self.model_timesteps)

  def keys(self, key):
    if self.evaluation_keys is None:
      return jax.random.split(key, self.num_evaluations)
    return self.evaluation_keys(key)


def gaussian_schedule(diffusion, sample_config) -> SamplingSchedule:
  """The respaced GaussianDiffusion's DDPM (sample_config.sampler "ddpm") or DDIM (eta) loop: evaluation e
  is step index S-1-e at original timestep timestep_map[S-1-e], with the noise and key of
  `GaussianDiffusion.p_sample_loop` / `ddim_sample_loop` (the e-th of split(key, S))."""
  ddim, eta = sample_config.sampler == "ddim", sample_config.eta
  noisy = not ddim or eta != 0
  num_steps = diffusion.num_timesteps

  def update(model_fn, x, e, key):
    index = num_steps - 1 - e
    noise = jax.random.normal(key, x.shape, x.dtype) if noisy else None
    if ddim:
      sample, _ = diffusion.ddim_sample(model_fn, x, index, noise, sample_config.clip_denoised, eta)
    else:
      sample, _ = diffusion.p_sample(model_fn, x, index, noise, sample_config.clip_denoised)
    return sample.astype(x.dtype)

  return SamplingSchedule(np.asarray(diffusion.timestep_map)[::-1].copy(), update)


def _model_fn_of(model, apply_fn, y, cfg_scale, guided, sample_config):
  if guided:
    return diffusion_lib.guided_model_fn(apply_fn, y, cfg_scale, sample_config.guidance_channels or None,
                                         num_classes=model.num_classes)
  return lambda x, t: apply_fn(x, t, y)


def calibrate_token_counts(schedule: SamplingSchedule, model: dydit.Model, params, x_T, y, cfg_scale, key,
                           sample_config, cache=None, pooled=False):
  """The masked model's sampling loop over `schedule` (x_T, y: the batch as run, guided halves included)
  -> (E, L) int: per evaluation (run order) and block, the most tokens any row's router wanted (pooled:
  the batch's wanted tokens per row, rounded up).

  sample_config: its guidance_channels; cache: a dict keeping the jitted loop between calls (keyed by
  guidance on/off), or None.
  """
  guided = cfg_scale != 1.0
  rows = x_T.shape[0]

  def counts_of(run):
    wanted = np.asarray(jax.device_get(run(params, x_T, y, jnp.float32(cfg_scale), key)), np.float64)  # (E, L, B)
    return (np.ceil(wanted.sum(-1) / rows - 1e-6) if pooled else wanted.max(-1)).round().astype(np.int64)

  if cache is not None and guided in cache:
    return counts_of(cache[guided])
  num_evaluations = schedule.num_evaluations

  @jax.jit
  def run(params, x_T, y, cfg_scale, key):
    def body(state, scanned):
      e, step_key = scanned
      captured = {}

      def apply_fn(x, t, y):
        out, aux = model.apply({"params": params}, x, t, y, train=False)
        captured["counts"] = jnp.sum(aux["token_mask"], axis=-1).T  # (L, B) wanted tokens per block and row
        return out

      state = schedule.update(_model_fn_of(model, apply_fn, y, cfg_scale, guided, sample_config), state, e,
                              step_key)
      return state, captured["counts"]

    evaluations = jnp.arange(num_evaluations, dtype=jnp.int32)
    return jax.lax.scan(body, schedule.init(x_T), (evaluations, schedule.keys(key)))[1]

  if cache is not None:
    cache[guided] = run
  return counts_of(run)


STAT_NAMES = ("flops_ratio", "wanted", "kept", "unwanted_run")


class FastSampler:
  """Runs a `SamplingPlan` for a DyDiT or a DyDiG. mesh / shardings as `dyngen.train.sample.Sampler` (None: unannotated).

  Two kinds of compiled programs: a step loop per (signature, batch shape, guidance), and a gather of one
  block's weight slices per (heads, groups) capacity pair. A block's slices are gathered again only when its
  units differ from those of the call before (another block's change, or a new token capacity, reuses them).
  """

  def __init__(self, model: dydit.Model, schedule: SamplingSchedule, sample_config, *, param_shardings=None,
               batch_sharding=None, replicated=None):
    """schedule: the process's `SamplingSchedule`; sample_config: its guidance_channels (guided runs)."""
    self.model, self.schedule, self.sample_config = model, schedule, sample_config
    self.family = fast_family(model)
    if self.family is None:
      raise ValueError(f"{type(model).__module__}.{type(model).__name__} has no fast path (DyDiT and DyDiG do)")
    self.param_shardings, self.batch_sharding, self.replicated = param_shardings, batch_sharding, replicated
    self._programs = {}
    self.compile_seconds = 0.0
    self.gathers = 0  # Gather runs so far (one per change of units).
    self.calibration_cache = {}  # The jitted masked calibration loops, by guidance on/off.

  @property
  def programs_compiled(self):
    """Step loops (<= max_programs per batch shape and guidance) and block gathers (<= capacity_buckets²)."""
    return len(self._programs)

  def _compiled(self, key, fn, args, in_shardings, out_shardings):
    if key not in self._programs:
      shardings = {}
      if self.batch_sharding is not None:
        shardings = dict(in_shardings=in_shardings, out_shardings=out_shardings)
      start = time.perf_counter()
      self._programs[key] = jax.jit(fn, **shardings).lower(*args).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._programs[key]

  def _gather_fn(self, scanned):
    """(block params, or the stacked blocks with `scanned`; block index; BlockPlan) -> the block's slices."""
    model, family = self.model, self.family

    def gather(block_params, index, plan):
      if scanned:  # the stacked blocks: this block's slice, at a traced index (one program for every block)
        block_params = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), block_params)
      return family.gather_block(model, block_params, plan)

    return gather

  def _gather_program(self, heads, groups, scanned, args):
    r = self.replicated
    return self._compiled(("gather", heads, groups, scanned), self._gather_fn(scanned), args, (r, r, r), r)

  def _loop_program(self, signature, guided, pooled, args):
    model, sample_config, schedule, family = self.model, self.sample_config, self.schedule, self.family

    def run(params, blocks, state, y, cfg_scale, lo, hi, keys, stats):
      """state: the loop state before evaluation lo; blocks: the gathered slices of the evaluations [lo, hi)."""
      def body(k, carry):
        state, stats = carry
        captured = {}

        def apply_fn(x, t, y):
          out, step_stats = dydit_fast.forward_gathered(model, params, blocks, x, t, y, signature, family,
                                                        pooled)
          captured.update({name: jnp.mean(value) if name == "flops_ratio" else jnp.sum(value)
                           for name, value in step_stats.items()})
          return out

        state = schedule.update(_model_fn_of(model, apply_fn, y, cfg_scale, guided, sample_config), state, k,
                                keys[k])
        stats = {name: stats[name].at[k].set(captured[name].astype(stats[name].dtype)) for name in stats}
        return state, stats

      return jax.lax.fori_loop(lo, hi, body, (state, stats))

    r, b = self.replicated, self.batch_sharding
    shapes = tuple(leaf.shape for leaf in jax.tree.leaves(args[2]))
    return self._compiled(("loop", signature, guided, pooled, shapes), run, args,
                          (self.param_shardings, r, b, b, r, r, r, r, r), (b, r))

  def _calls(self, params, plan, x_T, y, cfg_scale, key, execute):
    """Runs (execute) or only compiles the plan's calls; returns (x, stats) of the last call when run."""
    num_steps = self.schedule.num_evaluations
    if plan.num_steps != num_steps:
      raise ValueError(f"the plan has {plan.num_steps} steps, the sampling schedule {num_steps} model evaluations")
    guided = cfg_scale != 1.0
    keys = self.schedule.keys(key)
    stats_dtype = layers.at_least_float32(self.model.compute_dtype)
    stats = {name: jnp.zeros((num_steps,), stats_dtype) for name in STAT_NAMES}
    cfg = jnp.float32(cfg_scale)
    scanned = "blocks" in params
    x, blocks, units = self.schedule.init(x_T), [None] * self.model.depth, [None] * self.model.depth
    for call in plan.calls:
      call_units = plan.units(call.start, call.signature)
      block_plans = None
      for index, (heads, groups, _) in enumerate(call.signature):
        if units[index] is not None and _same_units([call_units[index]], [units[index]]):
          continue  # this block's slices hold: no gather
        block_plans = block_plans or plan.block_plans(call)
        gather_args = (params["blocks"] if scanned else params[f"blocks_{index}"], jnp.int32(index),
                       block_plans[index])
        gather = self._gather_program(heads, groups, scanned, gather_args)
        if execute:
          blocks[index] = gather(*gather_args)
          self.gathers += 1
        else:
          blocks[index] = jax.eval_shape(self._gather_fn(scanned), *gather_args)
        units[index] = call_units[index]
      args = (params, blocks, x, y, cfg, jnp.int32(call.start), jnp.int32(call.stop), keys, stats)
      loop = self._loop_program(call.signature, guided, plan.pooled_tokens, args)
      if execute:
        x, stats = loop(*args)
    return x, stats

  def compile(self, params, plan: SamplingPlan, x_T, y, cfg_scale, key):
    """Compiles the programs `run` will call (without running them); returns the compile seconds spent."""
    before = self.compile_seconds
    self._calls(params, plan, x_T, y, cfg_scale, key, execute=False)
    return self.compile_seconds - before

  def run(self, params, plan: SamplingPlan, x_T, y, cfg_scale, key):
    """x_T (B', H, W, C), y (B',): the batch as run (guided: [z; z] and [labels; null]); key: the loop key.

    Returns (x_0 (B', H, W, C), per-step stats {name: (S,) numpy}: flops_ratio (mean over rows of what the
    masks kept), wanted, kept, unwanted_run (token counts summed over rows and blocks), flops_ratio_executed).
    """
    state, stats = self._calls(params, plan, x_T, y, cfg_scale, key, execute=True)
    stats = {name: np.asarray(jax.device_get(value)) for name, value in stats.items()}
    stats["flops_ratio_executed"] = plan.executed_flops_ratio()
    return self.schedule.result(state), stats


def options_for(sample_config):
  """`RoutingOptions` of `config.sample`, and its routing mode ("fast" or "masked")."""
  mode = sample_config.get("routing", "fast")
  if mode not in ROUTING_MODES:
    raise ValueError(f"config.sample.routing={mode!r} must be one of {ROUTING_MODES}")
  return mode, RoutingOptions.from_sample_config(sample_config)


def fast_family(model: nn.Module) -> dydit_fast.Family | None:
  """The fast path's block family of a routed model (DyDiT's or DyDiG's), None for a model without one."""
  if isinstance(model, dydig.Model):
    return dydig_fast.DYDIG
  if isinstance(model, dydit.Model):
    return dydit_fast.DYDIT
  return None


def has_fast_path(model: nn.Module) -> bool:
  return fast_family(model) is not None


def width_units(model) -> tuple[int, int]:
  """(H, G): the routed heads and MLP groups per block (DyDiT cuts its MLP into H groups, DyDiG into
  `mlp_groups`)."""
  return model.num_heads, getattr(model, "mlp_groups", model.num_heads)
