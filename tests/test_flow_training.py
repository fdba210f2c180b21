"""Flow matching chosen by config: training (every family, DyDiT's FLOPs loss on top), sampling (dense, masked
routed, the routed fast path), `--mode=sample`'s checkpoint settings and the config errors.

References: losses written out here from SiT's definitions (x_t = t·x1 + (1 − t)·x0, u = x1 − x0, t = 0 noise)
with the noise and t the step drew; a Python loop of jitted model calls through Euler / Heun steps with
classifier-free guidance written out; `Transport.sample_ode` / `sample_sde` called directly; the masked
routed loop for the fast path. Samples of random weights reach tens: fp32 comparisons are relative to the
largest value (1e-5: the same products summed in another order).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import data as data_lib
from dyngen import diffusion as diffusion_lib
from dyngen import models
from dyngen.bench import measure
from dyngen.recipes import families
from dyngen.train import config_checks
from dyngen.train import objectives
from dyngen.train import sample as sample_lib
from dyngen.train import trainer

LABELS = np.array([1, 7])
KEY = jax.random.key(3)

# Tiny members of every family, in SiT's flow setting (no learned variance: 1 output channel on the digits).
FAMILY_MODELS = {
    "dit": dict(attention="xla"),
    # DiG's four blocks scanned: one block to compile.
    "dig": dict(gla_implementation="recurrent", gla_chunk_size=16, scan_blocks=True),
    "dydit": dict(attention="xla"),
    "dydig": dict(gla_implementation="recurrent", gla_chunk_size=16, mlp_groups=4, scan_blocks=True),
}


def flow_config(tiny_config, family="dit", **overrides):
  config = tiny_config(**dict(dict(objective="flow", sample__sampler="heun2", sample__num_steps=5), **overrides))
  depth = 4 if family in ("dig", "dydig") else 1
  config.model.update(dict(name=family, depth=depth, learn_sigma=False, **FAMILY_MODELS[family]))
  for field in ("attention", "attention_chunk_size"):
    if "attention" not in FAMILY_MODELS[family]:
      del config.model[field]
  if family in objectives.DYNAMIC_FAMILIES:
    config.dynamic = objectives.default_dynamic_config()
    config.dynamic.update(dict(hold_steps=0, warmup_steps=0))
  return config


def held_out_flow_loss(model, params, images, labels):
  """SiT's velocity loss over the test digits at fixed t (spread over [0, 1)) and noise, written out."""
  t = jnp.linspace(0.0, 1.0, len(labels), endpoint=False)
  x0 = jax.random.normal(jax.random.key(123), images.shape)
  x_t = t[:, None, None, None] * images + (1 - t[:, None, None, None]) * x0

  @jax.jit
  def loss(params):
    out = model.apply({"params": params}, x_t, t, labels)
    out = out[0] if isinstance(out, tuple) else out  # a routed model's (out, aux)
    return jnp.mean((out - (images - x0)) ** 2)

  return float(loss(params))


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_flow_training_lowers_the_held_out_loss(tiny_config, family):
  """20 train steps of the trainer's own step on flow matching lower the held-out velocity loss."""
  config = flow_config(tiny_config, family, batch_size=16, optimizer__learning_rate=3e-3)
  if family in objectives.DYNAMIC_FAMILIES:
    config.dynamic.complete_model_loss = False  # half the compile; the written-out-sum test below has it
  run = trainer.Run(config)
  train_images, train_labels = data_lib.load_split_arrays(config.data, "train")
  images, labels = (jnp.asarray(a[:100]) for a in data_lib.load_split_arrays(config.data, "test"))
  state = run.initial_state()
  initial = held_out_flow_loss(run.model, state.params, images, labels)
  step = run.compiled_train_step()
  rng = np.random.default_rng(0)
  with run.context():
    for _ in range(20):
      rows = rng.choice(len(train_labels), config.batch_size, replace=False)
      state, metrics = step(state, {"image": jnp.asarray(train_images[rows]), "label": jnp.asarray(train_labels[rows])})
  final = held_out_flow_loss(run.model, state.params, images, labels)
  # adaLN-Zero starts at v = 0, the loss E|x1 − x0|² (1.72 on these digits); 20 steps at lr 3e-3 learn the
  # mean velocity field: measured 0.59 (DiG, DyDiG) to 0.68 (DiT, DyDiT) of the start, bound 0.85.
  assert final < 0.85 * initial, (initial, final)
  assert float(metrics["vb"]) == 0.0  # flow matching has no variational-bound term
  if family in objectives.DYNAMIC_FAMILIES:
    assert {"flops_loss", "flops_ratio", "flops_target"} <= set(metrics)


def test_dydit_flops_objective_on_flow_is_the_written_out_sum(tiny_config):
  """DyDiT's objective on a transport: L_flow(dynamic) + L_flow(complete) + w·(mean ratio − λ_t)², each flow
  loss written out with the t and noise the step's keys draw; t stratified by quarter of [0, 1]."""
  config = flow_config(tiny_config, "dydit", batch_size=8)
  config.dynamic.update(dict(target_ratio=0.5, hold_steps=0, warmup_steps=10))
  model = models.build(config.model)
  images, labels = (jnp.asarray(a[:8]) for a in data_lib.load_split_arrays(config.data, "test"))
  params = measure.random_params(model, images, jnp.zeros((8,)), labels, scale=0.1)
  objective = objectives.create_objective(config, model, trainer.training_process(config))
  keys = objectives.step_keys(jax.random.key(0), 4)
  loss, metrics = jax.jit(lambda p: objective(p, {"image": images, "label": labels}, keys, 4))(params)

  t = objective.timesteps(keys, labels)
  quarter = np.arange(8) % 4
  assert np.all((np.asarray(t) >= quarter / 4) & (np.asarray(t) < (quarter + 1) / 4))
  x0 = jax.random.normal(jax.random.split(keys["noise"])[1], images.shape)
  tb = t[:, None, None, None]
  x_t, target = tb * images + (1 - tb) * x0, images - x0
  rngs = {"label_dropout": keys["label_dropout"], "gumbel": keys["gumbel"]}
  dynamic_out, aux = model.apply({"params": params}, x_t, t, labels, train=True, rngs=rngs)
  complete_out, _ = model.apply({"params": params}, x_t, t, labels, train=True, complete=True, rngs=rngs)
  target_ratio = 1 - 0.5 * 4 / 10  # the ramp at step 4 of 10
  expected = (jnp.mean((dynamic_out - target) ** 2) + jnp.mean((complete_out - target) ** 2)
              + 2.0 * (jnp.mean(aux["flops_ratio"]) - target_ratio) ** 2)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["flops_target"]), target_ratio, rtol=1e-6)
  assert 0 < float(metrics["flops_ratio"]) < 1  # the routers of these weights drop units


# Sampling.


def flow_sampler(model, sampler, routing="masked", **fields):
  defaults = dict(sampler=sampler, num_steps=5, eta=0.0, clip_denoised=False, guidance_channels=0,
                  batch_size=2, routing=routing, max_programs=2, guidance_interval=(0.0, 1.0))
  sample_config = ml_collections.ConfigDict(dict(defaults, **fields))
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  transport_config = ml_collections.ConfigDict(dict(path_type="Linear", prediction="velocity", loss_weight=None,
                                                    train_eps=None, sample_eps=None))
  return sample_lib.Sampler(model, ml_collections.ConfigDict(dict(noise_schedule="linear")), sample_config,
                            mesh=mesh, rules=(("batch", "data"),), transport_config=transport_config)


@pytest.fixture(scope="module")
def dense_model_and_params():
  model = models.build(ml_collections.ConfigDict(dict(
      name="dit", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
      num_classes=10, learn_sigma=True, attention="xla")))
  x = jnp.zeros((2, 8, 8, 4))
  return model, measure.random_params(model, x, jnp.zeros((2,)), jnp.asarray(LABELS), scale=0.1)


def assert_samples_close(actual, expected):
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(expected))))


def test_guided_euler_with_an_interval_is_the_written_out_loop(dense_model_and_params):
  """The Sampler's guided flow Euler (guidance only for t in [0.3, 0.7]) = a Python loop of the model:
  v = v_null + s·(v_cond − v_null) inside the interval, v_cond outside, first C of the 2C (learn_sigma) channels."""
  model, params = dense_model_and_params
  sampler = flow_sampler(model, "euler", num_steps=6, guidance_interval=(0.3, 0.7))
  images = sampler.sample_batch(params, LABELS, KEY, 3.0)

  x_T, _, _ = sample_lib.starting_batch(model, jnp.asarray(LABELS), KEY, guided=True)
  x = x_T[:2]
  apply = jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y)[..., :4])
  null = jnp.full((2,), model.num_classes)
  grid = np.linspace(0, 1, 6, dtype=np.float32)
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    t = jnp.full((2,), t_cur)
    cond, uncond = apply(x, t, jnp.asarray(LABELS)), apply(x, t, null)
    scale = 3.0 if 0.3 <= t_cur <= 0.7 else 1.0
    x = x + np.float32(t_next - t_cur) * (uncond + scale * (cond - uncond))
  assert_samples_close(images, x)


@pytest.mark.parametrize("sampler", ["heun2", "sde_euler"])
def test_sampler_on_flow_is_the_transport_called_directly(dense_model_and_params, sampler):
  """Sampler (guided, SiT's 3 guided channels) = `transport.sample_ode` / `sample_sde` on the same start."""
  model, params = dense_model_and_params
  images = flow_sampler(model, sampler, guidance_channels=3).sample_batch(params, LABELS, KEY, 2.0)

  x_T, y, loop_key = sample_lib.starting_batch(model, jnp.asarray(LABELS), KEY, guided=True)
  apply_fn = lambda x, t, y_: model.apply({"params": params}, x, t, y_)
  model_fn = diffusion_lib.first_channels(
      diffusion_lib.guided_model_fn(apply_fn, y, 2.0, 3, num_classes=model.num_classes), 4)
  transport = diffusion_lib.create_transport()
  if sampler == "heun2":
    expected = jax.jit(lambda z: transport.sample_ode(model_fn, z, sampling_method="heun2", num_steps=5))(x_T)
  else:
    expected = jax.jit(lambda z, k: transport.sample_sde(model_fn, z, num_steps=5, key=k))(x_T, loop_key)
  assert_samples_close(images, expected[:2])


@pytest.fixture(scope="module")
def routed_model_and_params():
  import test_dydit  # pylint: disable=g-import-not-at-top  # the DyDiT tests' tiny model and router weights
  model = models.build(test_dydit.tiny_config())
  x, _, y = test_dydit.inputs()
  return model, test_dydit.routed_params(model, x, jnp.asarray([0.1, 0.9]), y)


def fast_equals_masked(model, params, sampler, cfg_scale, evaluations):
  """Samples of the fast and the masked path (fp32 close), both with a FLOPs ratio (< 1) per model evaluation;
  returns the masked samples."""
  masked = flow_sampler(model, sampler, "masked")
  masked_images = masked.sample_batch(params, LABELS, KEY, cfg_scale)
  fast = flow_sampler(model, sampler, "fast")
  assert fast.fast
  fast_images = fast.sample_batch(params, LABELS, KEY, cfg_scale)
  assert masked.routing_stats[0]["flops_ratio"].shape == (evaluations,)
  assert fast.last_plan.num_steps == evaluations
  assert_samples_close(fast_images, masked_images)
  np.testing.assert_allclose(fast.routing_summary()["flops_ratio"], masked.routing_summary()["flops_ratio"],
                             rtol=1e-6)
  assert masked.routing_summary()["flops_ratio"] < 1
  return masked_images


@pytest.mark.parametrize("sampler,cfg_scale,evaluations", [("sde_euler", 3.0, 5), ("sde_heun", 1.0, 9)])
def test_dydit_on_flow_sde_fast_equals_masked(routed_model_and_params, sampler, cfg_scale, evaluations):
  """The SDE samplers on the fast path (`Transport.sde_evaluations`: one entry per model evaluation, step k's
  noise from fold_in(key, k)) = the masked loop (`sample_sde`): 4 stochastic steps of 1 or 2 evaluations, then
  SiT's Mean last step; with guidance and without."""
  model, params = routed_model_and_params
  fast_equals_masked(model, params, sampler, cfg_scale, evaluations)


@pytest.mark.parametrize("sampler,cfg_scale", [("euler", 3.0), ("heun2", 1.0)])
def test_dydit_on_flow_fast_equals_masked_and_the_python_loop(routed_model_and_params, sampler, cfg_scale):
  """DyDiT sampled on flow matching: the fast path (the flow grid's width plan, one entry per model
  evaluation) = the masked routed loop = a Python loop of the masked model; FLOPs ratio per evaluation."""
  model, params = routed_model_and_params
  evaluations = 4 if sampler == "euler" else 8  # 5 grid points: 4 steps of 1 or 2 evaluations
  masked_images = fast_equals_masked(model, params, sampler, cfg_scale, evaluations)

  guided = cfg_scale != 1.0
  x_T, y, _ = sample_lib.starting_batch(model, jnp.asarray(LABELS), KEY, guided)
  apply = jax.jit(lambda x, t: model.apply({"params": params}, x, t, y)[0][..., :4])

  def velocity(x, t):
    out = apply(x, jnp.full(x.shape[:1], t, jnp.float32))
    if not guided:
      return out
    cond, uncond = out[:2], out[2:]
    guided_out = uncond + cfg_scale * (cond - uncond)
    return jnp.concatenate([guided_out, guided_out])

  x = x_T
  grid = np.linspace(0, 1, 5, dtype=np.float32)
  for t_cur, t_next in zip(grid[:-1], grid[1:]):
    dt = np.float32(t_next - t_cur)
    k1 = velocity(x, t_cur)
    x = x + dt * k1 if sampler == "euler" else x + dt * (0.5 * k1 + 0.5 * velocity(x + dt * k1, t_next))
  assert_samples_close(masked_images, x[:2])


def test_dydit_on_flow_dopri5_is_refused(tiny_config):
  """The adaptive ODE has no fixed evaluations to plan or to record a FLOPs ratio per: refused before a run."""
  import test_dydit  # pylint: disable=g-import-not-at-top
  config = tiny_config(objective="flow", sample__sampler="dopri5")
  config.model = test_dydit.tiny_config()
  config.model.update(input_size=config.data.image_size, in_channels=1, num_classes=10)
  with pytest.raises(ValueError, match="sampler='dopri5' chooses its model evaluations as it runs; a routed model"):
    config_checks.check_config(config, num_devices=1)


# Configs.


def test_objective_errors_name_the_value(tiny_config):
  cases = [
      (dict(objective="flux"), "config.objective must be one of"),
      (dict(objective="flow"), "config.sample.sampler must be one of ('euler', 'heun2', 'dopri5', 'sde_euler', "
                               "'sde_heun') with config.objective='flow', got 'ddpm'"),
      (dict(sample__sampler="heun2"), "'heun2' is a flow-matching sampler: set config.objective='flow'"),
      (dict(objective="flow", sample__sampler="euler", transport__path_type="Cosine"), "unknown path_type 'Cosine'"),
      (dict(objective="flow", sample__sampler="euler", transport__prediction="score", transport__loss_weight="snr"),
       "unknown loss_weight 'snr'"),
      (dict(objective="flow", sample__sampler="euler", sample__num_steps=1), "needs >= 2"),
      (dict(objective="flow", sample__sampler="euler", sample__clip_denoised=True), "clip_denoised=True"),
      (dict(objective="flow", sample__sampler="sde_euler", sample__last_step="Median"), "last_step='Median'"),
      (dict(objective="flow", sample__sampler="euler", sample__guidance_interval=(0.8, 0.2)), "0 <= low <= high"),
      (dict(sample__guidance_interval=(0.2, 0.8)), "is a flow-matching option"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      config_checks.check_config(tiny_config(**overrides), num_devices=1)


def test_sampling_takes_the_checkpoints_objective(tiny_config):
  """--mode=sample on a flow checkpoint with a diffusion --config: the checkpoint's objective, transport and
  (the --config's being a diffusion sampler) its sampling fields; and the reverse."""
  saved = flow_config(tiny_config, sample__num_steps=7, transport__path_type="GVP")
  config = trainer._with_checkpoint_settings(tiny_config(), saved)  # pylint: disable=protected-access
  assert (config.objective, config.transport.path_type, config.sample.sampler, config.sample.num_steps) == (
      "flow", "GVP", "heun2", 7)
  assert not config.model.learn_sigma
  config_checks.check_config(config, num_devices=1)
  # A checkpoint from before the objective field trained the diffusion.
  old = tiny_config()
  del old["objective"]
  back = trainer._with_checkpoint_settings(saved, old)  # pylint: disable=protected-access
  assert (back.objective, back.sample.sampler) == ("diffusion", "ddpm")


def test_sample_mode_on_a_flow_checkpoint_with_a_diffusion_config(tmp_path, tiny_config):
  """`--mode=sample` with the default (diffusion) --config on a flow checkpoint samples with the checkpoint's
  flow settings: the images are the notebook sampler's of the loaded flow config, the file names the sampler."""
  from dyngen import checkpoint  # pylint: disable=g-import-not-at-top
  saved = flow_config(tiny_config)
  params = jax.device_get(trainer.Run(saved).initial_state().params)
  rng = np.random.default_rng(0)  # off adaLN-Zero's trivial start
  params = jax.tree.map(lambda p: p + 0.02 * rng.standard_normal(p.shape).astype(np.float32), params)
  config = tiny_config(sample__num_samples=8, sample__cfg_scale=1.5)
  config.sample.checkpoint = checkpoint.save_inference_checkpoint(tmp_path / "flow", saved, params)
  npz_path = trainer.sample(config, tmp_path / "workdir")
  assert npz_path.endswith("dit_heun2-5_cfg1.5_seed0_n8.npz"), npz_path
  with np.load(npz_path) as arrays:
    images, labels = arrays["arr_0"], arrays["arr_1"]
  loaded_config, ema_params = checkpoint.load_for_inference(config.sample.checkpoint)
  assert loaded_config.objective == "flow"
  expected = sample_lib.notebook_sampler(loaded_config).generate(ema_params, labels, cfg_scale=1.5, seed=0)
  np.testing.assert_array_equal(images, expected)


def test_sit_and_objective_switch_configs():
  from dyngen import configs  # pylint: disable=g-import-not-at-top
  sit = configs.get("sit_xl", "XL/2")
  assert (sit.objective, sit.model.name, sit.model.hidden_size, sit.model.depth, sit.model.patch_size) == (
      "flow", "dit", 1152, 28, 2)
  assert dict(sit.transport) == families.SIT_TRANSPORT
  assert (sit.optimizer.learning_rate, sit.batch_size, sit.ema.decay, sit.num_train_steps) == (1e-4, 256, 0.9999,
                                                                                                7_000_000)
  assert (sit.sample.sampler, sit.sample.num_steps, sit.sample.cfg_scale, sit.sample.last_step) == (
      "sde_euler", 250, 1.5, "Mean")
  assert configs.get("sit_b", "B/4").num_train_steps == 400_000
  for name, variant in (("dig_xl", "XL/2"), ("dydit_xl", "XL/2"), ("dydig_xl", "XL/2")):
    config = configs.get(name, f"{variant},objective=flow")
    assert config.objective == "flow" and config.sample.sampler == "sde_euler"
  assert configs.get("dydit_xl", "XL/2,objective=flow").init_from == families.SIT_XL_2_CHECKPOINT
  for name in ("flow_quickstart", "flow_dydit_quickstart"):
    config = configs.get(name)
    config_checks.check_config(config, num_devices=1)
    assert (config.objective, config.model.learn_sigma, config.sample.sampler) == ("flow", False, "heun2")
  with pytest.raises(ValueError, match="objective='flux' must be"):
    configs.get("dig_xl", "XL/2,objective=flux")
