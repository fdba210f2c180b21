"""DyDiG's fast sampling path (dyngen.models.dydig_fast on routing_plan's shared machinery).

References: DyDiG's own masked path (the Sampler with `routing="masked"`: every unit runs and masks multiply),
DiG itself (the fast path with every unit and token on must compute DiG's function) and the masked model's
forward pass on one batch. fp32 comparisons are relative to the largest value (1e-5 / 1e-6: the fast path
sums the same products in another order).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngen import models
from dyngen.models import dydig_fast
from dyngen.models import dydit_fast
from dyngen.models import layers
from dyngen.train import routing_plan
from tests.test_dydig import dig_config
from tests.test_dydig import inputs
from tests.test_dydig import tiny_config
from tests.test_dydig import without_routers
from tests.test_dydit import routed_params
from tests.test_dydit_fast import assert_samples_close
from tests.test_dydit_fast import make_sampler

NUM_STEPS = 8
LABELS = np.array([1, 7])
KEY = jax.random.key(4)


@pytest.fixture(scope="module")
def model_and_params():
  model = models.build(tiny_config())
  return model, routed_params(model, *inputs())


def full_plans(model):
  """Every head and group gathered with mask 1, every block at full capacity."""
  heads, groups = routing_plan.width_units(model)
  plan = dydit_fast.BlockPlan(jnp.arange(heads), jnp.ones(heads), jnp.arange(groups), jnp.ones(groups))
  return [plan] * model.depth, [(heads, groups, model.num_tokens)] * model.depth


def test_all_units_on_equal_dig(model_and_params):
  """Routers open (the official initial biases): the fast forward pass is DiG's, through the whole direction
  schedule (reversed odd blocks, transposes), whether the params are unrolled or stacked (scan_blocks)."""
  model, params = model_and_params
  x, t, y = inputs()

  def open_router(path, p):
    name = jax.tree_util.keystr(path)
    if "router" in name and name.endswith("['bias']"):
      return jnp.full_like(p, 35.0 if "token_router" in name else 15.0)
    return 0.01 * p if "router" in name else p

  all_on = jax.tree_util.tree_map_with_path(open_router, params)
  dig_out = models.build(dig_config()).apply({"params": without_routers(params)}, x, t, y)
  plans, capacities = full_plans(model)
  forward = jax.jit(lambda p: dydit_fast.forward(model, p, x, t, y, plans, capacities, dydig_fast.DYDIG))
  out, stats = forward(all_on)
  scale = float(jnp.max(jnp.abs(dig_out)))
  np.testing.assert_allclose(out, dig_out, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(stats["flops_ratio"], 1.0, rtol=1e-6)
  stacked = layers.stack_block_params(all_on, model.depth)
  np.testing.assert_array_equal(forward(stacked)[0], out)


@pytest.mark.parametrize("pooled", [False, True], ids=["row", "batch-pooled"])
def test_gathered_block_equals_the_masked_one_with_padding(model_and_params, pooled):
  """One forward pass at partial capacities with padding units (mask 0) and a token top-k (per row, or
  pooled over the batch at the mean wanted count), against the masked model's output and FLOPs ratio;
  four rows (two of them scaled, so that rows want different numbers of tokens), t shared."""
  model, params = model_and_params
  x, _, y = inputs()
  x, y = jnp.concatenate([x, 3 * x[::-1]]), jnp.concatenate([y, y[::-1]])
  t = jnp.full((4,), 700)
  _, aux = model.apply({"params": params}, x, t, y)
  heads, groups = routing_plan.width_units(model)
  plans, capacities, tighter = [], [], []
  for index in range(model.depth):
    head_on, group_on = np.asarray(aux["head_mask"][0, index]), np.asarray(aux["mlp_mask"][0, index])
    # Gather every unit (the inactive ones as padding) in one block, only the active ones elsewhere.
    head_index = np.arange(heads) if index == 1 else np.flatnonzero(head_on)
    group_index = np.arange(groups) if index in (1, 2) else np.flatnonzero(group_on)
    plans.append(dydit_fast.BlockPlan(jnp.asarray(head_index), jnp.asarray(head_on[head_index]),
                                      jnp.asarray(group_index), jnp.asarray(group_on[group_index])))
    per_row = np.asarray(aux["token_mask"][:, index]).sum(-1)
    wanted = max(1, int(np.ceil(per_row.mean()) if pooled else per_row.max()))
    tighter.append(wanted < per_row.max())  # a row runs more tokens than the capacity k: pooled only
    capacities.append((len(head_index), len(group_index), wanted))
  assert any(c[2] < model.num_tokens for c in capacities)  # the top-k gather runs
  assert any(tighter) == pooled
  assert any(c[1] > int(aux["mlp_mask"][0, i].sum()) for i, c in enumerate(capacities))  # padding groups
  out, stats = jax.jit(lambda p: dydit_fast.forward(model, p, x, t, y, plans, capacities, dydig_fast.DYDIG,
                                                    pooled_tokens=pooled))(params)
  expected, aux = model.apply({"params": params}, x, t, y)
  assert_samples_close(out, expected)
  np.testing.assert_allclose(stats["flops_ratio"], aux["flops_ratio"], rtol=1e-6)
  np.testing.assert_array_equal(stats["wanted"], stats["kept"])


@pytest.fixture(scope="module", params=[("ddpm", 3.0), ("ddim", 1.0)], ids=["ddpm-guided", "ddim"])
def fast_and_masked(request, model_and_params):
  sampler, cfg_scale = request.param
  model, params = model_and_params
  fields = dict(num_steps=NUM_STEPS, capacity_buckets=2, max_programs=3)
  masked = make_sampler(model, "masked", sampler, **fields).sample_batch(params, LABELS, KEY, cfg_scale)
  fast = make_sampler(model, "fast", sampler, **fields)
  return fast, fast.sample_batch(params, LABELS, KEY, cfg_scale), masked


def test_fast_equals_masked_across_segments_and_buckets(fast_and_masked):
  fast, fast_images, masked_images = fast_and_masked
  plan = fast.last_plan
  assert fast.fast_sampler.family is dydig_fast.DYDIG
  assert len(plan.segments) >= 2 and len(plan.signatures) >= 2
  assert np.any(plan.capacities[..., 2] < plan.num_tokens)
  assert np.any(plan.capacities[..., 1] > plan.group_active.sum(-1))  # padding groups
  assert plan.group_active.shape[-1] == 4 and plan.head_active.shape[-1] == 2  # G != H
  assert_samples_close(fast_images, masked_images)
  summary = fast.routing_summary()
  assert summary["tokens_cut"] == 0
  assert summary["flops_ratio"] <= summary["flops_ratio_executed"] < 1
  # Step loops <= signatures <= max_programs; one gather per (heads, groups) capacity pair.
  assert len(plan.signatures) <= 3
  assert summary["programs_compiled"] == len(plan.signatures) + len(plan.width_capacities)
  assert len(plan.width_capacities) <= 2 * 2


@pytest.mark.parametrize("fast_and_masked", [("ddim", 1.0)], indirect=True, ids=["ddim"])
def test_samples_do_not_depend_on_the_segmentation(fast_and_masked):
  fast, fast_images, _ = fast_and_masked
  plan = fast.last_plan
  params = routed_params(fast.model, *inputs())
  x_T, y, loop_key = fast._start_fn(False)(jnp.asarray(LABELS), KEY)  # pylint: disable=protected-access
  stepwise, _ = fast.fast_sampler.run(params, plan.split_every_step(), x_T, y, 1.0, loop_key)
  np.testing.assert_array_equal(stepwise, fast_images)
