"""DyDiT beyond the official fixture: FLOPs ratio, routing maths, objective, warm start, configs, bad input.

References: the official loss.py constants and hand-computed ratios; the analytic straight-through slope;
the masked model run unrolled (the scan must equal it in float64, 1e-10); the diffusion's own DDPM / DDIM
loops (the routed sampler must equal them: same noise, same steps, fp32 1e-6); the source checkpoints
themselves (warm-started values bit for bit).
"""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import checkpoint
from dyngen import diffusion as diffusion_lib
from dyngen import models
from dyngen.bench import measure
from dyngen.convert import load_torch_params
from dyngen.models import dydit
from dyngen.models import flops
from dyngen.models import layers
from dyngen.train import objectives
from dyngen.train import sample as sample_lib
from dyngen.train import warm_start

DATA = pathlib.Path(__file__).parent / "data"


def tiny_config(**overrides):
  fields = dict(name="dydit", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, learn_sigma=True, attention="xla")
  return ml_collections.ConfigDict(dict(fields, **overrides))


def inputs(dtype=jnp.float32, batch=2):
  x = jax.random.normal(jax.random.key(0), (batch, 8, 8, 4), dtype)
  return x, jnp.array([3, 700, 250, 999][:batch]), jnp.array([1, 9, 0, 4][:batch])


def routed_params(model, x, t, y, scale=0.1):
  """Random parameters whose routers put part of the units on: N(0, scale²) everywhere, the token routers
  with unit-scale weights (with small ones their logit is ~0 for every token)."""
  params = measure.random_params(model, x, t, y, scale=scale)
  rng = np.random.default_rng(1)

  def token_router(path, p):
    return jnp.asarray(rng.standard_normal(p.shape), p.dtype) if "token_router" in jax.tree_util.keystr(path) else p

  return jax.tree_util.tree_map_with_path(token_router, params)


# FLOPs ratio.

@pytest.mark.parametrize("variant,attention,mlp", [("S/2", 0.201326592, 0.301989888),
                                                   ("B/2", 0.704643072, 1.207959552),
                                                   ("XL/2", 1.50994944, 2.717908992)])
def test_unit_macs_equal_the_official_constants(variant, attention, mlp):
  config = ml_collections.ConfigDict(dict(name="dydit", input_size=32, in_channels=4, mlp_ratio=4.0,
                                          learn_sigma=True, **models.variant(variant)))
  unit = flops.dydit_unit_macs(config)
  assert unit.attention / 1e9 == pytest.approx(attention, rel=1e-12)
  assert unit.mlp / 1e9 == pytest.approx(mlp, rel=1e-12)


def test_unit_macs_follow_the_token_count():
  """512x512 images (64x64 latents): 1024 tokens at patch 2, where the official 256-token constants are wrong."""
  config = ml_collections.ConfigDict(dict(name="dydit", input_size=64, in_channels=4, mlp_ratio=4.0,
                                          learn_sigma=True, **models.variant("XL/2")))
  unit = flops.dydit_unit_macs(config)
  n, d = 1024, 1152
  assert unit.attention == 4 * n * d ** 2 + 2 * n ** 2 * d
  assert unit.mlp == 8 * n * d ** 2


def test_flops_ratio_by_hand():
  """Two layers, four heads, four tokens; A = 2, M = 3 (ratio weights 0.4 / 0.6)."""
  head = np.array([[[1, 1, 0, 0], [1, 0, 0, 0]]], np.float32)  # fractions 0.5, 0.25
  group = np.array([[[1, 1, 1, 1], [1, 1, 0, 0]]], np.float32)  # 1.0, 0.5
  tokens = np.array([[[1, 0, 0, 0], [1, 1, 1, 1]]], np.float32)  # 0.25, 1.0
  expected = ((0.5 * 2 + 1.0 * 0.25 * 3) + (0.25 * 2 + 0.5 * 1.0 * 3)) / (2 * (2 + 3))
  np.testing.assert_allclose(flops.dydit_flops_ratio(head, group, tokens, 2, 3), [expected], rtol=1e-7)
  full = np.ones_like(head), np.ones_like(group), np.ones_like(tokens)
  np.testing.assert_allclose(flops.dydit_flops_ratio(*full, 2, 3), [1.0], rtol=1e-7)


def test_dense_gflops_of_dydit_are_dits():
  config = ml_collections.ConfigDict(dict(name="dydit", input_size=32, in_channels=4, mlp_ratio=4.0,
                                          learn_sigma=True, **models.variant("XL/2")))
  assert flops.gflops(config) == pytest.approx(flops.gflops(ml_collections.ConfigDict(dict(config, name="dit"))))


# Routing maths.

def test_straight_through_forward_is_hard_and_backward_is_the_sigmoid_slope():
  logits = jnp.linspace(-3.0, 3.0, 13)
  key = jax.random.key(4)
  tau = 5.0

  def decide(logits):
    return dydit.binarize(logits, train=True, tau=tau, threshold=0.5, make_rng=lambda: key)

  hard = decide(logits)
  noise = jax.random.logistic(key, logits.shape)
  soft = jax.nn.sigmoid((logits + noise) / tau)
  np.testing.assert_array_equal(hard, (soft > 0.5).astype(np.float32))  # exactly 0 / 1
  assert set(np.unique(np.asarray(hard))) <= {0.0, 1.0}
  grads = jax.grad(lambda l: jnp.sum(decide(l)))(logits)
  np.testing.assert_allclose(grads, soft * (1 - soft) / tau, rtol=1e-6)


def test_eval_masks_are_deterministic_and_need_no_rng():
  model = models.build(tiny_config())
  x, t, y = inputs()
  params = routed_params(model, x, t, y)
  apply = jax.jit(lambda x: model.apply({"params": params}, x, t, y))
  _, first = apply(x)
  _, second = apply(x)
  for name in ("head_mask", "mlp_mask", "token_mask"):
    np.testing.assert_array_equal(first[name], second[name])
  np.testing.assert_array_equal(first["head_mask"], (jax.nn.sigmoid(jnp.concatenate(
      [jnp.full(first["head_logits"].shape[:-1] + (1,), 1.0), first["head_logits"]], -1)) > 0.5))
  assert 0 < float(jnp.mean(first["token_mask"])) < 1  # the routers of these parameters really route
  # The width masks depend on t alone: the routers' own computation gives the model's masks.
  masks = dydit.width_masks(model, params, t)
  np.testing.assert_array_equal(masks["head_mask"], first["head_mask"])
  np.testing.assert_array_equal(masks["mlp_mask"], first["mlp_mask"])


def unboxed_init(model, x, t, y, seed=0):
  variables = model.init(jax.random.key(seed), x, t, y)  # eager: XLA:CPU compiles a jitted init for seconds
  return jax.device_get(nn.unbox(variables["params"]))


def test_fresh_init_routes_everything_and_equals_the_complete_model():
  """The official biases (15 / 15 / 35) start fine-tuning from the full model."""
  model = models.build(tiny_config())
  x, t, y = inputs()
  params = unboxed_init(model, x, t, y)
  blocks = params["blocks_0"]
  np.testing.assert_array_equal(blocks["head_router"]["bias"], 15.0)
  np.testing.assert_array_equal(blocks["mlp_router"]["bias"], 15.0)
  np.testing.assert_array_equal(blocks["token_router"]["fc2"]["bias"], 35.0)
  # Shift the zero-initialised adaLN and final layers so that both paths compute something non-trivial.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p if "router" in jax.tree_util.keystr(path) else p + 0.02, params)
  out, aux = model.apply({"params": params}, x, t, y)
  complete, _ = model.apply({"params": params}, x, t, y, complete=True)
  for name in ("head_mask", "mlp_mask", "token_mask"):
    np.testing.assert_array_equal(aux[name], 1.0)
  np.testing.assert_allclose(aux["flops_ratio"], 1.0)
  np.testing.assert_allclose(out, complete, rtol=1e-6, atol=1e-6)


def assert_scan_equals_unroll(config, x, t, y):
  """The scanned model equals the unrolled one (output and every aux array) in float64; returns the scanned
  model and its stacked params. Call under jax.enable_x64 with config.dtype float64."""
  unrolled = models.build(config)
  scanned = models.build(ml_collections.ConfigDict(dict(config, scan_blocks=True)))
  params = routed_params(unrolled, x, t, y)
  out, aux = unrolled.apply({"params": params}, x, t, y)
  stacked = layers.stack_block_params(params, config.depth)
  out_s, aux_s = scanned.apply({"params": stacked}, x, t, y)
  np.testing.assert_allclose(out_s, out, rtol=1e-10, atol=1e-10)
  for name in aux:
    np.testing.assert_allclose(aux_s[name], aux[name], rtol=1e-10, atol=1e-12, err_msg=name)
  return scanned, stacked


def test_scanned_equals_unrolled_float64_with_aux_and_gumbel_noise():
  with jax.enable_x64(True):
    config = tiny_config(dtype="float64")
    x, t, y = inputs(jnp.float64)
    scanned, stacked = assert_scan_equals_unroll(config, x, t, y)
    # At train time the scan draws the Gumbel noise from the "gumbel" stream (split per block) and returns
    # the per-block masks.
    _, train_aux = scanned.apply({"params": stacked}, x, t, y, train=True,
                                 rngs={"gumbel": jax.random.key(0), "label_dropout": jax.random.key(1)})
    assert train_aux["token_mask"].shape == (2, config.depth, 16)


# Objective.

def test_flops_target_schedule():
  """The official train.py: 1 for 100 steps, then 1 − (1 − λ)·step / warmup until λ."""
  schedule = lambda step: float(objectives.flops_target(step, target_ratio=0.5, hold_steps=100, warmup_steps=1000))
  assert schedule(0) == schedule(99) == 1.0
  assert schedule(100) == pytest.approx(0.95)
  assert schedule(500) == pytest.approx(0.75)
  assert schedule(1000) == pytest.approx(0.5)
  assert schedule(5000) == pytest.approx(0.5)


def test_stratified_timesteps_fill_each_quartile():
  t = np.asarray(objectives.draw_timesteps(jax.random.key(0), 64, 1000, stratified=True))
  quartile = t // 250
  np.testing.assert_array_equal(quartile, np.arange(64) % 4)
  assert len(np.unique(t)) > 50  # random within the quartile
  uniform = np.asarray(objectives.draw_timesteps(jax.random.key(0), 64, 1000, stratified=False))
  assert not np.array_equal(uniform // 250, np.arange(64) % 4)


def test_step_keys_are_one_per_purpose():
  keys = objectives.step_keys(jax.random.key(0), 7)
  base = jax.random.fold_in(jax.random.key(0), 7)
  for purpose, index in objectives.KEY_PURPOSES.items():
    np.testing.assert_array_equal(jax.random.key_data(keys[purpose]),
                                  jax.random.key_data(jax.random.fold_in(base, index)))


def test_objective_loss_terms_and_gradients_reach_the_routers():
  config = tiny_config(depth=1)
  model = models.build(config)
  x, t, y = inputs(batch=4)
  params = routed_params(model, x, t, y)
  dynamic = objectives.default_dynamic_config()
  objective = objectives.FlopsConstrainedObjective(model, diffusion_lib.create_diffusion(""), dynamic)
  batch = {"image": x, "label": y}
  keys = objectives.step_keys(jax.random.key(0), 0)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(
      lambda p: objective(p, batch, keys, jnp.int32(2000)), has_aux=True))(params)
  np.testing.assert_allclose(loss, metrics["diffusion_loss"] + metrics["flops_loss"]
                             + metrics["complete_diffusion_loss"], rtol=1e-6)
  np.testing.assert_allclose(metrics["flops_loss"], 2.0 * (metrics["flops_ratio"] - 0.5) ** 2, rtol=1e-5)
  assert float(metrics["flops_target"]) == 0.5
  for router in ("head_router", "mlp_router", "token_router"):
    norm = sum(float(jnp.sum(g ** 2)) for g in jax.tree.leaves(grads["blocks_0"][router]))
    assert norm > 0, router
  # Without the complete-model term the loss is the two other terms.
  objective2 = objectives.FlopsConstrainedObjective(model, diffusion_lib.create_diffusion(""),
                                                    ml_collections.ConfigDict(dict(dynamic, complete_model_loss=False)))
  loss2, metrics2 = jax.jit(lambda p: objective2(p, batch, keys, jnp.int32(2000)))(params)
  assert "complete_diffusion_loss" not in metrics2
  np.testing.assert_allclose(loss2, metrics["diffusion_loss"] + metrics["flops_loss"], rtol=1e-5)


# Sampling.

@pytest.mark.parametrize("sampler,cfg_scale", [("ddpm", 3.0), ("ddim", 1.0)])
def test_routed_sampler_equals_the_diffusion_loops(sampler, cfg_scale):
  model = models.build(tiny_config())
  x, t, y = inputs()
  params = routed_params(model, x, t, y)
  sample_config = ml_collections.ConfigDict(dict(sampler=sampler, num_steps=5, eta=0.0, clip_denoised=False,
                                                 guidance_channels=0, batch_size=2))
  diffusion_config = ml_collections.ConfigDict(dict(noise_schedule="linear"))
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sampler_ = sample_lib.Sampler(model, diffusion_config, sample_config, mesh=mesh, rules=(("batch", "data"),))
  key = jax.random.key(3)
  images = sampler_.sample_batch(params, np.array([1, 7]), key, cfg_scale)

  # The same through the diffusion's loop on the model's output alone.
  diffusion = sample_lib.sampling_diffusion(diffusion_config, sample_config, True)
  noise_key, loop_key = jax.random.split(key)
  x_T = jax.random.normal(noise_key, (2, 8, 8, 4))
  apply_fn = models.prediction_fn(model, params)
  labels = jnp.array([1, 7])
  if cfg_scale != 1.0:
    x_T, labels = jnp.concatenate([x_T, x_T]), jnp.concatenate([labels, jnp.full_like(labels, 10)])
    model_fn = diffusion_lib.guided_model_fn(apply_fn, labels, cfg_scale, None)
  else:
    model_fn = lambda x, t: apply_fn(x, t, labels)
  loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
  expected = jax.jit(lambda x: loop(model_fn, x, key=loop_key))(x_T)[:2]
  # Random weights make samples of a few hundred: fp32 rounding relative to the largest value.
  np.testing.assert_allclose(images, expected, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(expected))))
  summary = sampler_.routing_summary()
  assert 0 < summary["flops_ratio"] < 1


# Warm start.

@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
  """A dyngen checkpoint of a DiT of the tiny DyDiT's size, with random weights."""
  config = ml_collections.ConfigDict({"model": dict(tiny_config(), name="dit")})
  dit_model = models.build(config.model)
  x, t, y = inputs()
  params = jax.device_get(measure.random_params(dit_model, x, t, y, seed=5))
  directory = tmp_path_factory.mktemp("dense")
  checkpoint.save_inference_checkpoint(directory, config, params)
  return directory, params


def test_warm_start_from_a_dyngen_dit_checkpoint_loads_bit_for_bit(dense_checkpoint):
  directory, source = dense_checkpoint
  model = models.build(tiny_config())
  x, t, y = inputs()
  fresh = unboxed_init(model, x, t, y)
  params, report = warm_start.load_init_params(str(directory), model, fresh)
  flat_source = dict(jax.tree_util.tree_leaves_with_path(source))
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    if "router" in jax.tree_util.keystr(path):
      continue
    np.testing.assert_array_equal(value, flat_source[path], err_msg=jax.tree_util.keystr(path))
  np.testing.assert_array_equal(params["blocks_0"]["head_router"]["bias"], 15.0)  # routers fresh
  assert report.source_family == "dit" and len(report.initialised) == 2 * 2 * 4  # 2 blocks x (2+2+4) arrays
  assert "head_router" in report.summary()
  # The scanned layout takes the same values, stacked.
  scanned = models.build(tiny_config(scan_blocks=True))
  stacked, _ = warm_start.load_init_params(str(directory), scanned, layers.stack_block_params(fresh, 2))
  np.testing.assert_array_equal(stacked["blocks"]["attn"]["qkv"]["kernel"][1],
                                source["blocks_1"]["attn"]["qkv"]["kernel"])


def test_warm_start_from_the_official_dit_fixture():
  manifest = json.loads((DATA / "dit_tiny" / "manifest.json").read_text())
  config = ml_collections.ConfigDict(dict(name="dydit", attention="xla", **manifest["constructor_kwargs"]))
  model = models.build(config)
  fresh = measure.random_params(model, *inputs(), scale=0.0)
  fresh = jax.device_get(fresh)
  params, report = warm_start.load_init_params(str(DATA / "dit_tiny" / "checkpoint.pt"), model, fresh)
  official = load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", ml_collections.ConfigDict(dict(config, name="dit")))
  np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"], official["blocks_1"]["mlp"]["fc2"]["kernel"])
  assert report.source_family == "dit"


def test_warm_start_of_another_size_lists_the_mismatches(dense_checkpoint):
  directory, _ = dense_checkpoint
  model = models.build(tiny_config(hidden_size=64))
  fresh = jax.device_get(measure.random_params(model, *inputs()))
  with pytest.raises(warm_start.WarmStartError, match=r"(?s)mis-shaped \(30\).*blocks_0/attn/proj/kernel: source \(4, 8, 32\), model \(4, 16, 64\)"):
    warm_start.load_init_params(str(directory), model, fresh)


def test_a_dydit_checkpoint_does_not_fit_a_dit_and_the_reverse():
  manifest = json.loads((DATA / "dydit_tiny" / "manifest.json").read_text())
  config = ml_collections.ConfigDict(dict(name="dit", attention="xla", **manifest["constructor_kwargs"]))
  with pytest.raises(ValueError, match="attn_rate.router.weight"):
    load_torch_params(DATA / "dydit_tiny" / "checkpoint.pt", config)
  with pytest.raises(ValueError, match="attn_rate.router.weight"):
    load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", ml_collections.ConfigDict(dict(config, name="dydit")))
  # A DiT run cannot warm-start from a DyDiT checkpoint: the routers have no place in it.
  dit_model = models.build(config)
  fresh = jax.device_get(measure.random_params(dit_model, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                               jnp.zeros((1,), jnp.int32)))
  with pytest.raises(warm_start.WarmStartError, match="fits none of the families"):
    warm_start.load_init_params(str(DATA / "dydit_tiny" / "checkpoint.pt"), dit_model, fresh)


# Configs and bad input.

def _run_config(**dynamic):
  from dyngen.configs import dydit_s  # pylint: disable=g-import-not-at-top
  config = dydit_s.get_config("S/2,runlocal")
  config.dynamic.update(dynamic)
  return config


@pytest.mark.parametrize("field,value,message", [
    ("target_ratio", 0.0, r"target_ratio=0.0 must be in \(0, 1\]"),
    ("target_ratio", 1.5, r"target_ratio=1.5 must be in \(0, 1\]"),
    ("warmup_steps", 1, "warmup_steps=1 is shorter than config.dynamic.hold_steps=2"),
])
def test_bad_dynamic_values_are_refused(field, value, message):
  with pytest.raises(ValueError, match=message):
    objectives.check_dynamic_config(_run_config(**{field: value}))


def test_dynamic_section_required_and_refused_where_it_does_not_belong():
  config = _run_config()
  del config.dynamic
  with pytest.raises(ValueError, match="needs a `dynamic` section"):
    objectives.check_dynamic_config(config)
  config = _run_config()
  config.model.name = "dit"
  with pytest.raises(ValueError, match="config.dynamic is set but config.model.name='dit' has no routing"):
    objectives.check_dynamic_config(config)


def test_recipes():
  from dyngen.configs import dydit_xl  # pylint: disable=g-import-not-at-top
  half = dydit_xl.get_config("XL/2")
  assert (half.optimizer.learning_rate, half.optimizer.skip_update_grad_norm, half.dynamic.warmup_steps,
          half.dynamic.complete_model_loss, half.num_train_steps) == (1e-4, 200.0, 1000, True, 30_000)
  stage2 = dydit_xl.get_config("XL/2,stage=2")
  assert (stage2.dynamic.complete_model_loss, stage2.num_train_steps) == (False, 200_000)
  seven = dydit_xl.get_config("XL/2,ratio=0.7")
  assert (seven.optimizer.learning_rate, seven.optimizer.skip_update_grad_norm, seven.dynamic.warmup_steps,
          seven.dynamic.target_ratio) == (2.5e-5, 50.0, 5000, 0.7)
  assert half.init_from == "DiT-XL-2-256x256.pt"
  with pytest.raises(ValueError, match="ratio in"):
    dydit_xl.get_config("XL/2,ratio=0.6")


def test_converter_is_general_for_other_depths_and_patches(tmp_path):
  """A DyDiT checkpoint of depth 3, patch 4 (not the fixture's 2 / 2), in the official container: every tensor
  lands where its rule says (router kernels transposed), and the converted model runs."""
  from dyngen.convert import dydit as dydit_rules  # pylint: disable=g-import-not-at-top
  from dyngen.convert import load as convert_load  # pylint: disable=g-import-not-at-top
  from tests import test_convert  # pylint: disable=g-import-not-at-top
  config = tiny_config(depth=3, patch_size=4, input_size=16, hidden_size=64)
  model = models.build(config)
  rules, _ = dydit_rules.param_rules(model)
  shapes = convert_load.expected_param_shapes(model)
  rng = np.random.default_rng(0)
  state_dict, tensors = {}, {}
  for index, rule in enumerate(rules):
    data = rng.standard_normal(rule.layout.torch_shape(shapes[rule.path])).astype(np.float32)
    state_dict[rule.source] = data
    storage = test_convert.Storage(str(index), data.reshape(-1), "FloatStorage")
    tensors[rule.source] = test_convert.Tensor(storage, 0, data.shape, tuple(
        int(np.prod(data.shape[i + 1:])) for i in range(data.ndim)))
  path = tmp_path / "dydit_d3_p4.pt"
  test_convert.write_zip_checkpoint(path, {"model": tensors, "ema": tensors})
  params = load_torch_params(path, config)
  router = params["blocks_2"]["head_router"]
  np.testing.assert_array_equal(router["kernel"], state_dict["blocks.2.attn_rate.router.weight"].T)
  np.testing.assert_array_equal(router["bias"], state_dict["blocks.2.attn_rate.router.bias"])
  np.testing.assert_array_equal(params["blocks_1"]["token_router"]["fc2"]["kernel"],
                                state_dict["blocks.1.token_selection.mlp_head.2.weight"].T)
  np.testing.assert_array_equal(params["blocks_0"]["mlp_router"]["kernel"],
                                state_dict["blocks.0.mlp_rate.router.weight"].T)
  out, aux = jax.jit(lambda p: model.apply({"params": p}, jnp.zeros((1, 16, 16, 4)), jnp.array([5]),
                                           jnp.array([2])))(params)
  assert out.shape == (1, 16, 16, 8) and aux["token_mask"].shape == (1, 3, 16)
