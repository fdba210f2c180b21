"""DyDiT's fast sampling path (dyngen.models.dydit_fast, dyngen.train.routing_plan) against the masked reference.

References: the Sampler's masked routed loop (`routing="masked"`, every unit run and masked), the routers'
own masks (`dydit.width_masks`), brute-force enumeration of segment partitions, hand-counted token cuts.
Samples of random weights reach a few hundred: fp32 comparisons are relative to the largest value (1e-6; the
fast path sums the same products in another order).
"""
import itertools
import sys
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.models import dydit
from dyngen.models import dydit_fast
from dyngen.models import flops
from dyngen.models import layers
from dyngen.train import config_checks
from dyngen.train import routing_plan
from dyngen.train import sample as sample_lib

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from test_dydit import inputs, routed_params, tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_STEPS = 10
LABELS = np.array([1, 7])
KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def model_and_params():
  model = models.build(tiny_config())
  return model, routed_params(model, *inputs())


def make_sampler(model, routing, sampler="ddpm", **fields):
  defaults = dict(sampler=sampler, num_steps=NUM_STEPS, eta=0.0, clip_denoised=False, guidance_channels=0,
                  batch_size=2, routing=routing, max_programs=2)
  sample_config = ml_collections.ConfigDict(dict(defaults, **fields))
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  return sample_lib.Sampler(model, ml_collections.ConfigDict(dict(noise_schedule="linear")), sample_config,
                            mesh=mesh, rules=(("batch", "data"),))


def assert_samples_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(expected))))


@pytest.fixture(scope="module", params=[("ddpm", 3.0), ("ddim", 1.0)], ids=["ddpm-guided", "ddim"])
def fast_and_masked(request, model_and_params):
  """The fast and the masked Sampler on one batch: (fast sampler, fast images, masked sampler, masked images)."""
  sampler, cfg_scale = request.param
  model, params = model_and_params
  masked = make_sampler(model, "masked", sampler)
  masked_images = masked.sample_batch(params, LABELS, KEY, cfg_scale)
  fast = make_sampler(model, "fast", sampler)
  fast_images = fast.sample_batch(params, LABELS, KEY, cfg_scale)
  return dict(fast=fast, fast_images=fast_images, masked=masked, masked_images=masked_images, cfg_scale=cfg_scale,
              params=params)


def test_fast_equals_masked_across_segments_and_buckets(fast_and_masked):
  run = fast_and_masked
  plan = run["fast"].last_plan
  # The router parameters make a plan worth testing: several segments and signatures, gathered tokens.
  assert len(plan.segments) >= 2 and len(plan.signatures) >= 2
  assert np.any(plan.capacities[..., 2] < plan.num_tokens)  # the top-k gather, not all tokens
  assert np.any(plan.capacities[..., :2] < plan.head_active.shape[-1])  # fewer heads / groups than H
  assert np.any(plan.capacities[..., 0] > plan.head_active.sum(-1))  # padding heads (mask 0) in some block
  assert_samples_close(run["fast_images"], run["masked_images"])
  fast, masked = run["fast"].routing_summary(), run["masked"].routing_summary()
  np.testing.assert_allclose(fast["flops_ratio"], masked["flops_ratio"], rtol=1e-6)
  assert fast["tokens_cut"] == 0  # calibrated on this batch: the capacity covers every wanted token
  assert fast["flops_ratio"] <= fast["flops_ratio_executed"] < 1
  # One step loop per signature (<= max_programs = 2) and one block gather per (heads, groups) pair.
  assert len(plan.signatures) <= 2
  assert fast["programs_compiled"] == len(plan.signatures) + len(plan.width_capacities)
  assert all(isinstance(value, (int, float)) for value in fast.values())  # scalar writers take it as is


def test_samples_do_not_depend_on_the_segmentation(fast_and_masked):
  run = fast_and_masked
  fast, plan = run["fast"], run["fast"].last_plan
  x_T, y, loop_key = fast._start_fn(run["cfg_scale"] != 1.0)(jnp.asarray(LABELS), KEY)
  natural, _ = fast.fast_sampler.run(run["params"], plan, x_T, y, run["cfg_scale"], loop_key)
  every_step = plan.split_every_step()
  assert len(every_step.calls) == NUM_STEPS
  stepwise, _ = fast.fast_sampler.run(run["params"], every_step, x_T, y, run["cfg_scale"], loop_key)
  np.testing.assert_array_equal(stepwise, natural)  # same programs, same step keys: bit for bit
  assert fast.fast_sampler.compile(run["params"], every_step, x_T, y, run["cfg_scale"], loop_key) == 0.0
  # No program for the new segmentation.
  assert fast.fast_sampler.programs_compiled == len(plan.signatures) + len(plan.width_capacities)
  np.testing.assert_array_equal(natural[:2], run["fast_images"])


DDIM = pytest.mark.parametrize("fast_and_masked", [("ddim", 1.0)], indirect=True, ids=["ddim"])


@DDIM
def test_one_program_budget_merges_to_the_largest_capacities(model_and_params, fast_and_masked):
  """max_programs=1: one segment at the elementwise max of the steps' capacities; still the masked samples."""
  model, params = model_and_params
  masked = fast_and_masked["masked_images"]
  fast = make_sampler(model, "fast", "ddim", max_programs=1, calibrate_tokens=False)  # every token, no calibration
  images = fast.sample_batch(params, LABELS, KEY, 1.0)
  plan = fast.last_plan
  assert len(plan.segments) == 1
  assert fast.fast_sampler.programs_compiled == 1 + len(plan.width_capacities)  # a step loop and block gathers
  natural = make_sampler(model, "fast", "ddim").plan(params, token_counts=np.ones((NUM_STEPS, 2), int))
  assert np.all(plan.capacities[..., :2] >= natural.capacities[..., :2].max(axis=0))
  assert_samples_close(images, masked)


def test_plan_masks_are_the_routers_masks(model_and_params):
  model, params = model_and_params
  sampler = make_sampler(model, "fast", calibrate_tokens=False)
  plan = sampler.plan(params)
  masks = dydit.width_masks(model, params, jnp.asarray(plan.timesteps))
  np.testing.assert_array_equal(plan.head_active, np.asarray(masks["head_mask"]) > 0)
  np.testing.assert_array_equal(plan.group_active, np.asarray(masks["mlp_mask"]) > 0)
  # Run order: the first step is the noisiest timestep.
  np.testing.assert_array_equal(plan.timesteps, np.asarray(sampler.diffusion.timestep_map)[::-1])
  # Every step's units fit its capacities, which are bucket values; the gathered masks are the active units.
  capacities = routing_plan.bucket_capacities(model.num_heads, 4)
  for call in plan.calls:
    for k in range(call.start, call.stop):  # a call's units hold for each of its steps
      units = plan.units(k, call.signature)
      for index, (heads, groups, tokens) in enumerate(call.signature):
        assert heads in capacities and groups in capacities and tokens == model.num_tokens
        head_index, head_mask, group_index, group_mask = units[index]
        np.testing.assert_array_equal(head_index, plan.block_plans(call)[index].head_index)
        assert len(set(head_index)) == heads and len(set(group_index)) == groups
        np.testing.assert_array_equal(head_mask, plan.head_active[k, index, head_index])
        np.testing.assert_array_equal(group_mask, plan.group_active[k, index, group_index])
        assert head_mask.sum() == plan.head_active[k, index].sum()
        assert group_mask.sum() == plan.group_active[k, index].sum()


def test_bucket_capacities_by_hand():
  np.testing.assert_array_equal(routing_plan.bucket_capacities(16, 4), [4, 8, 12, 16])
  np.testing.assert_array_equal(routing_plan.bucket_capacities(6, 4), [2, 3, 5, 6])  # DiT-S: 6 heads
  np.testing.assert_array_equal(routing_plan.bucket_capacities(4, 8), [1, 2, 3, 4])
  np.testing.assert_array_equal(routing_plan.round_up(np.array([1, 4, 5, 13, 16]), np.array([4, 8, 12, 16])),
                                [4, 4, 8, 16, 16])


def test_segment_merge_is_the_cheapest_partition():
  """Against brute force over every partition of 6 runs into at most K contiguous groups."""
  rng = np.random.default_rng(0)
  lengths = [3, 1, 4, 1, 5, 2]
  starts = np.cumsum([0] + lengths)
  runs = list(zip(starts[:-1], starts[1:]))
  per_run = rng.integers(1, 5, size=(6, 2, 3))
  capacities = np.concatenate([np.repeat(per_run[i][None], n, axis=0) for i, n in enumerate(lengths)])
  unit = flops.UnitMacs(attention=2, mlp=3)

  def cost(groups):
    total = 0.0
    for group in groups:
      caps = per_run[list(group)].max(axis=0)
      steps = sum(lengths[i] for i in group)
      total += steps * routing_plan._segment_cost(caps, (4, 4), 4, unit)  # pylint: disable=protected-access
    return total

  for budget in (1, 2, 3):
    merged = routing_plan.merge_segments(runs, capacities, budget, (4, 4), 4, unit)
    assert len(merged) <= budget
    assert merged[0][0] == 0 and merged[-1][1] == starts[-1]
    got = sum((stop - start) * routing_plan._segment_cost(caps, (4, 4), 4, unit)  # pylint: disable=protected-access
              for start, stop, caps in merged)
    best = min(cost([range(a, b) for a, b in zip((0,) + cuts, cuts + (6,))])
               for m in range(budget) for cuts in itertools.combinations(range(1, 6), m))
    assert got == pytest.approx(best, rel=1e-12)


def test_token_capacity_cuts_counted_by_hand(model_and_params):
  """One block whose token logit is relu(x_0) - 4.5 of each token's first channel (x_0 = token index):
  tokens 5..15 (11) are wanted. Capacity 8 runs tokens 8..15 (3 wanted cut); capacity 14 runs 2..15
  (3 unwanted run). Attention adds nothing (gate 0), the MLP update has gate 1."""
  model, params = model_and_params
  width, heads, n = model.hidden_size, model.num_heads, model.num_tokens
  p = jax.tree.map(np.array, params["blocks_0"])
  p["adaLN_modulation"]["kernel"][:] = 0
  p["adaLN_modulation"]["bias"][:] = 0
  p["adaLN_modulation"]["bias"][5 * width:] = 1.0  # gate_mlp = 1, everything else 0
  router = p["token_router"]
  router["fc1"]["kernel"][:] = 0
  router["fc1"]["kernel"][0, 0] = 1.0
  router["fc1"]["bias"][:] = 0
  router["fc2"]["kernel"][:] = 0
  router["fc2"]["kernel"][0, 0] = 1.0
  router["fc2"]["bias"][:] = -4.5
  x = np.array(jax.random.normal(jax.random.key(0), (2, n, width)), np.float32)
  x[..., 0] = np.arange(n)
  c = jnp.zeros((2, width))
  plan = dydit_fast.BlockPlan(jnp.arange(heads), jnp.ones(heads), jnp.arange(heads), jnp.ones(heads))
  wanted = np.arange(n) >= 5
  for capacity, cut, unwanted in ((8, 3, 0), (14, 0, 3), (n, 0, n - 11)):
    block = jax.jit(lambda p, x, capacity=capacity: dydit_fast.block(
        model, dydit_fast.gather_block(model, p, plan), x, layers.Conditioning(c, c), capacity))
    out, stats = block(p, jnp.asarray(x))
    out = np.asarray(out)
    np.testing.assert_array_equal(stats["wanted"], [11, 11])
    np.testing.assert_array_equal(stats["kept"], [11 - cut] * 2)
    np.testing.assert_array_equal(stats["unwanted_run"], [unwanted] * 2)
    ran = wanted & (np.arange(n) >= n - capacity)
    np.testing.assert_array_equal(out[:, ~ran], x[:, ~ran])  # skipped or cut: untouched, bit for bit
    assert np.all(np.abs(out[:, ran] - x[:, ran]).max(axis=-1) > 0)


@pytest.mark.parametrize("field,value", [("width_cap", 0.0), ("width_cap", 1.5), ("token_capacity", -0.1),
                                         ("token_capacity", 2), ("token_capacity", True),
                                         ("width_cap", float("nan"))])
def test_caps_outside_the_unit_interval_are_refused(field, value):
  with pytest.raises(ValueError, match=rf"config\.sample\.{field}={value!r} must be in \(0, 1\]"):
    routing_plan.options_for(ml_collections.ConfigDict({field: value}))
  with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
    routing_plan.RoutingOptions(**{field: value})


def test_bad_routing_mode_and_budget_are_refused():
  with pytest.raises(ValueError, match=r"config\.sample\.routing='dense' must be one of \('fast', 'masked'\)"):
    routing_plan.options_for(ml_collections.ConfigDict(dict(routing="dense")))
  with pytest.raises(ValueError, match=r"config\.sample\.max_programs=0 must be a positive int"):
    routing_plan.options_for(ml_collections.ConfigDict(dict(max_programs=0)))


@DDIM
def test_the_knob_lowers_the_achieved_ratio(model_and_params, fast_and_masked):
  """width_cap and token_capacity 0.5: at most 2 of 4 heads / groups and 8 of 16 tokens per block."""
  model, params = model_and_params
  run = fast_and_masked
  capped = make_sampler(model, "fast", "ddim", width_cap=0.5, token_capacity=0.5, calibrate_tokens=False,
                        max_programs=1)
  capped.sample_batch(params, LABELS, KEY, run["cfg_scale"])
  plan = capped.last_plan
  assert plan.head_active.sum(-1).max() <= 2 and plan.group_active.sum(-1).max() <= 2
  np.testing.assert_array_equal(plan.capacities[..., 2], 8)
  # The capped units are the top by router logit among those the router wanted.
  full = run["fast"].last_plan
  assert np.all(plan.head_active <= full.head_active)
  summary, uncapped = capped.routing_summary(), run["fast"].routing_summary()
  assert summary["flops_ratio"] < uncapped["flops_ratio"] - 0.05
  assert summary["flops_ratio_executed"] < uncapped["flops_ratio_executed"]
  assert summary["tokens_cut"] > 0 and summary["token_cut_fraction"] > 0  # the router wanted more than 8


def test_scanned_params_give_the_same_plan_and_slices(model_and_params):
  """`scan_blocks=True` stores the blocks stacked under "blocks": the plan and the gathered slices are the same."""
  model, params = model_and_params
  scanned = models.build(tiny_config(scan_blocks=True))
  stacked = layers.stack_block_params(params, model.depth)
  options = routing_plan.RoutingOptions(calibrate_tokens=False, max_programs=2)
  timesteps = make_sampler(model, "fast").schedule.model_timesteps
  plan = routing_plan.make_plan(model, params, timesteps, options)
  plan_scanned = routing_plan.make_plan(scanned, stacked, timesteps, options)
  np.testing.assert_array_equal(plan_scanned.head_active, plan.head_active)
  np.testing.assert_array_equal(plan_scanned.capacities, plan.capacities)
  assert plan_scanned.calls == plan.calls
  block_plans = plan.block_plans(plan.calls[-1])
  gathered = dydit_fast.gather(model, params, block_plans)
  for mine, theirs in zip(gathered, dydit_fast.gather(scanned, stacked, block_plans)):
    for (path, value), (_, expected) in zip(jax.tree_util.tree_leaves_with_path(theirs),
                                            jax.tree_util.tree_leaves_with_path(mine)):
      np.testing.assert_array_equal(value, expected, err_msg=jax.tree_util.keystr(path))
  # The sampler's block gather of the stacked layout (a traced block index) gives the same slices.
  fast = routing_plan.FastSampler(scanned, None, None)
  index = model.depth - 1
  heads, groups, _ = plan.calls[-1].signature[index]
  args = (stacked["blocks"], jnp.int32(index), block_plans[index])
  sliced = fast._gather_program(heads, groups, True, args)(*args)  # pylint: disable=protected-access
  for (path, value), (_, expected) in zip(jax.tree_util.tree_leaves_with_path(sliced),
                                          jax.tree_util.tree_leaves_with_path(gathered[index])):
    np.testing.assert_array_equal(value, expected, err_msg=jax.tree_util.keystr(path))


def heun_flow_schedule(grid):
  """A two-evaluation (Heun) ODE schedule on the float grid: the model's first C channels as the drift.

  Evaluations 2j and 2j+1 see t = grid[j] and grid[j+1]; the state (x, k1) carries the first drift."""
  grid = np.asarray(grid, np.float32)
  model_timesteps = np.stack([grid[:-1], grid[1:]], axis=1).reshape(-1)

  def update(model_fn, state, e, key):
    del key  # deterministic
    x, k1 = state
    j, second = e // 2, e % 2 == 1
    t_cur, t_next = jnp.asarray(grid)[j], jnp.asarray(grid)[j + 1]
    dt = t_next - t_cur
    probe = jnp.where(second, x + dt * k1, x)
    drift = model_fn(probe, jnp.full(x.shape[:1], jnp.where(second, t_next, t_cur)))[..., :x.shape[-1]]
    x = jnp.where(second, x + dt * 0.5 * (k1 + drift), x)
    return x.astype(state[0].dtype), jnp.where(second, 0.0, drift).astype(k1.dtype)

  return routing_plan.SamplingSchedule(model_timesteps, update, init=lambda x_T: (x_T, jnp.zeros_like(x_T)),
                                       result=lambda state: state[0])


def test_a_flow_schedule_plugs_in(model_and_params):
  """The fast path on a non-Gaussian schedule (float t, two evaluations per step, a pytree state) equals a
  plain Python loop of the masked model through the same Heun steps, written out here."""
  model, params = model_and_params
  grid = np.linspace(990.5, 10.25, 5)  # non-integer model times, wide enough for the width plan to change
  schedule = heun_flow_schedule(grid)
  sample_config = ml_collections.ConfigDict(dict(guidance_channels=0))
  x_T, y = jax.random.normal(jax.random.key(5), (2, 8, 8, 4)), jnp.asarray(LABELS)
  counts = routing_plan.calibrate_token_counts(schedule, model, params, x_T, y, 1.0, KEY, sample_config)
  options = routing_plan.RoutingOptions(max_programs=3)
  plan = routing_plan.make_plan(model, params, schedule.model_timesteps, options, token_counts=counts)
  assert plan.num_steps == 8 and len(plan.signatures) >= 2
  fast, stats = routing_plan.FastSampler(model, schedule, sample_config).run(params, plan, x_T, y, 1.0, KEY)

  velocity = jax.jit(lambda x, t: model.apply({"params": params}, x, t, y)[0][..., :4])
  x = x_T
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    dt = np.float32(t_next - t_cur)
    k1 = velocity(x, jnp.full((2,), t_cur, jnp.float32))
    k2 = velocity(x + dt * k1, jnp.full((2,), t_next, jnp.float32))
    x = x + dt * 0.5 * (k1 + k2)
  assert_samples_close(fast, x)
  assert stats["flops_ratio"].shape == (8,) and np.all(stats["wanted"] == stats["kept"])


@DDIM
def test_calibration_over_several_batches_takes_the_most_wanted(model_and_params, fast_and_masked):
  """calibration_batches=3: the capacities come from the elementwise max of three masked runs (this batch,
  then its labels with the starts of fold_in(key, 1) and fold_in(key, 2)), each recomputed here."""
  model, params = model_and_params
  sampler = make_sampler(model, "fast", "ddim", calibration_batches=3)
  labels = jnp.asarray(LABELS)
  counts = sampler._calibrate(params, labels, KEY, 1.0)  # pylint: disable=protected-access
  single = fast_and_masked["fast"]
  expected = []
  for key in (KEY, jax.random.fold_in(KEY, 1), jax.random.fold_in(KEY, 2)):
    x_T, y, loop_key = single._start_fn(False)(labels, key)  # pylint: disable=protected-access
    expected.append(routing_plan.calibrate_token_counts(single.schedule, model, params, x_T, y, 1.0, loop_key,
                                                        single.sample_config))
  np.testing.assert_array_equal(counts, np.max(expected, axis=0))
  assert np.any(counts > expected[0])  # the other draws wanted more somewhere: a test that can fail


def test_bad_calibration_batches_are_refused():
  with pytest.raises(ValueError, match=r"config\.sample\.calibration_batches=0 must be a positive int"):
    routing_plan.options_for(ml_collections.ConfigDict(dict(calibration_batches=0)))


@pytest.mark.parametrize("fast_and_masked", [("ddpm", 3.0)], indirect=True, ids=["ddpm-guided"])
def test_batch_pooled_tokens_equal_masked(model_and_params, fast_and_masked):
  """token_pooling="batch": the top B·k tokens of the batch, k calibrated on the batch's mean wanted count
  (below the largest row's somewhere): still the masked samples, nothing cut, less executed."""
  model, params = model_and_params
  run = fast_and_masked
  pooled = make_sampler(model, "fast", "ddpm", token_pooling="batch")
  images = pooled.sample_batch(params, LABELS, KEY, run["cfg_scale"])
  plan, per_row = pooled.last_plan, run["fast"].last_plan
  assert plan.pooled_tokens and not per_row.pooled_tokens
  assert np.all(plan.capacities[..., 2] <= per_row.capacities[..., 2])
  assert np.any(plan.capacities[..., 2] < per_row.capacities[..., 2])
  assert_samples_close(images, run["masked_images"])
  summary = pooled.routing_summary()
  assert summary["tokens_cut"] == 0
  assert summary["flops_ratio_executed"] < run["fast"].routing_summary()["flops_ratio_executed"]
  np.testing.assert_allclose(summary["flops_ratio"], run["masked"].routing_summary()["flops_ratio"], rtol=1e-6)


def test_bad_token_pooling_is_refused():
  with pytest.raises(ValueError, match=r"config\.sample\.token_pooling='rows' must be one of \('row', 'batch'\)"):
    routing_plan.options_for(ml_collections.ConfigDict(dict(token_pooling="rows")))


@pytest.mark.parametrize("field,value,message", [
    ("width_cap", 1.5, r"config\.sample\.width_cap=1\.5 must be in \(0, 1\]"),
    ("token_capacity", 0.0, r"config\.sample\.token_capacity=0\.0 must be in \(0, 1\]"),
    ("calibration_batches", 0, r"config\.sample\.calibration_batches=0 must be a positive int"),
    ("token_pooling", "rows", r"config\.sample\.token_pooling='rows' must be one of")])
def test_the_config_checks_refuse_bad_knobs_before_any_run(tiny_config, field, value, message):
  with pytest.raises(ValueError, match=message):
    config_checks.check_config(tiny_config(**{f"sample__{field}": value}), num_devices=1)
