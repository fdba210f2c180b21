"""SiT parity: the converted tiny SiT and dyngen's transport reproduce the official code (tests/data/sit_tiny).

The checkpoint is a raw state_dict of DiT's layout (as the released SiT-XL-2-256x256.pt) and loads through the
DiT converter; SiT's model is DiT's returning the first in_channels channels (`first_channels`). Every stored
run is repeated with the stored noise, uniform draws and start states, NCHW transposed to NHWC.

Tolerances are relative, max|err| / max|ref| per array (the noise and score samplers reach a few thousand):
- float32: 1e-5. The official float32 run differs from the same code in float64 by up to 4e-7 (manifest
  max_diff_f64_vs_f32) and the official DiT class reproduces its own float32 outputs on another CPU only to
  ~4e-7 (fixture notes), so a few 1e-7 is the floor; 1e-5 leaves room for a 9-step sampler to amplify it.
- float64: the official float64 run keeps some parts in float32 (manifest dtypes.stays_float32_in_the_f64_run),
  which dyngen keeps in float32 too. What is left: the model's float32 timestep features (pred ≤ 6.5e-10, so
  1e-8); x_t and u_t involve neither (1e-12); the ODEs 1.1e-10 (1e-9); the SDEs 7e-8 (2e-7), because torch's
  float32 linspace rounds some grid points one ulp away from XLA's (fixture notes), and those times enter the
  float64 coefficients of the stochastic steps.
- dopri5: another Dormand–Prince implementation (diffrax, which stops at t = 1; torchdiffeq steps past it and
  interpolates back) agrees to about its tolerance, 1e-6: measured 2.7e-6 (f32 run), compared at 2e-5.
"""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import checkpoint
from dyngen import models
from dyngen.convert import load_torch_params
from dyngen.diffusion import create_transport
from dyngen.diffusion import first_channels
from dyngen.diffusion import guided_model_fn

CASE = pathlib.Path(__file__).parent / "data" / "sit_tiny"
MANIFEST = json.loads((CASE / "manifest.json").read_text())
RUNS = MANIFEST["transport"]["runs"]
TRAINING = MANIFEST["transport"]["training"]["configs"]
F32_RTOL = 1e-5
DOPRI5_RTOL = 2e-5
C = MANIFEST["constructor_kwargs"]["in_channels"]


def rel_err(actual, reference):
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return np.abs(actual - reference).max() / np.abs(reference).max()


def nhwc(a):
  """(..., C, H, W) -> (..., H, W, C)."""
  return np.moveaxis(np.asarray(a), -3, -1)


def model_config(**overrides):
  return ml_collections.ConfigDict(dict(name="dit", **MANIFEST["constructor_kwargs"], **overrides))


@pytest.fixture(scope="module")
def case():
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  params = load_torch_params(CASE / "checkpoint.pt", model_config())
  return {k: inputs[k] for k in inputs.files}, {k: outputs[k] for k in outputs.files}, params


def make_apply(params, dtype):
  model = models.build(model_config(dtype=np.dtype(dtype).name))
  params = jax.tree.map(lambda p: np.asarray(p, dtype), params)  # exact: the file is float32
  return lambda x, t, y: model.apply({"params": params}, x, t, y)


def model_fns(inputs, params, dtype):
  """SiT's forward (labels train_y) and forward_with_cfg (sample_y, cfg 1.5, channels 0-2 guided)."""
  apply = make_apply(params, dtype)
  plain = first_channels(lambda x, t: apply(x, t, jnp.asarray(inputs["train_y"], jnp.int32)), C)
  guided = first_channels(guided_model_fn(apply, jnp.asarray(inputs["sample_y"], jnp.int32),
                                          float(inputs["cfg_scale"]), guidance_channels=3), C)
  return plain, guided


def test_model_outputs_float32(case):
  inputs, outputs, params = case
  apply = jax.jit(first_channels(make_apply(params, np.float32), C))
  out = apply(nhwc(inputs["x"]), inputs["t"], inputs["y"].astype(np.int32))
  assert rel_err(out, nhwc(outputs["out_f32"])) < F32_RTOL
  guided = first_channels(guided_model_fn(make_apply(params, np.float32), jnp.asarray(inputs["y_cfg"], jnp.int32),
                                          float(inputs["cfg_scale"]), guidance_channels=3), C)
  out = jax.jit(guided)(nhwc(inputs["x_cfg"]), inputs["t_cfg"])
  assert rel_err(out, nhwc(outputs["cfg_out_f32"])) < F32_RTOL


@pytest.mark.parametrize("dtype,suffix", [(np.float32, "f32"), (np.float64, "f64")])
def test_training_losses(case, dtype, suffix):
  inputs, outputs, params = case
  with jax.enable_x64(dtype == np.float64):
    apply = jax.jit(make_apply(params, dtype))  # one compiled model for the seven settings; the rest runs eagerly
    model_fn = first_channels(lambda x, t: apply(x, t, jnp.asarray(inputs["train_y"], jnp.int32)), C)
    x1, x0 = nhwc(inputs["train_x1"]).astype(dtype), nhwc(inputs["train_x0"]).astype(dtype)
    errors = {}
    for name, setting in TRAINING.items():
      transport = create_transport(**setting["create_transport_args"])
      assert (transport.train_eps, transport.sample_eps) == (setting["train_eps"], setting["sample_eps"]), name
      assert transport.interval() == tuple(setting["train_t_interval"]), name
      t = transport.training_t_from_uniform(inputs["train_u"])
      np.testing.assert_array_equal(t, outputs[f"train_{name}_t_f32"])  # float32 arithmetic, bitwise
      terms = transport.training_losses(model_fn, x1, t=t, x0=x0)
      assert terms["loss"].dtype == dtype and terms["loss"].shape == (4,)
      for ours, theirs in (("loss", "loss"), ("pred", "pred"), ("x_t", "xt"), ("u_t", "ut")):
        reference = outputs[f"train_{name}_{theirs}_{suffix}"]
        errors[f"{name} {ours}"] = rel_err(terms[ours], reference if reference.ndim == 1 else nhwc(reference))
      errors[f"{name} loss_mean"] = rel_err(jnp.mean(terms["loss"]), outputs[f"train_{name}_loss_mean_{suffix}"])
  # Measured: float32 ≤ 6.3e-7; float64 pred ≤ 6.5e-10 and loss ≤ 5e-11 (float32 timestep features), x_t and
  # u_t ≤ 1e-16 (no model, and t is the same float32 value in both).
  for key, error in errors.items():
    exact = suffix == "f64" and key.endswith(("x_t", "u_t"))
    assert error < (1e-12 if exact else F32_RTOL if suffix == "f32" else 1e-8), (key, error)


def ode_case(run, inputs, plain, guided):
  spec = RUNS[run]
  if spec["model_fn"].startswith("model.forward_with_cfg"):
    return spec, guided, nhwc(inputs["sample_x_T"])
  return spec, plain, nhwc(inputs["train_x1"])


ODE_RUNS = [name for name, spec in RUNS.items() if spec["kind"] == "ODE"]
SDE_RUNS = [name for name, spec in RUNS.items() if spec["kind"] == "SDE"]


@pytest.mark.parametrize("run", ODE_RUNS)
def test_ode_float32(case, run):
  inputs, outputs, params = case
  plain, guided = model_fns(inputs, params, np.float32)
  spec, model_fn, x_T = ode_case(run, inputs, plain, guided)
  transport = create_transport(**spec["create_transport_args"])
  args = spec["sample_ode_args"]
  assert transport.interval(eval=True, reverse=args["reverse"]) == (spec["t0"], spec["t1"])
  ours_grid = transport._grid(spec["t0"], spec["t1"], args["num_steps"])  # pylint: disable=protected-access
  np.testing.assert_allclose(ours_grid, outputs[f"grid_{run}_f32"], rtol=0, atol=1.2e-7)  # torch: one ulp apart
  final, steps = jax.jit(lambda x: transport.sample_ode(model_fn, x, return_trajectory=True, **args))(x_T)
  tolerance = DOPRI5_RTOL if args["sampling_method"] == "dopri5" else F32_RTOL
  assert rel_err(steps, nhwc(outputs[f"{run}_steps_f32"])) < tolerance
  assert rel_err(final, nhwc(outputs[f"{run}_final_f32"])) < tolerance


@pytest.mark.parametrize("run", SDE_RUNS)
def test_sde_float32(case, run):
  inputs, outputs, params = case
  _, guided = model_fns(inputs, params, np.float32)
  spec = RUNS[run]
  transport = create_transport(**spec["create_transport_args"])
  args = dict(spec["sample_sde_args"])
  # The manifest's t1 is the nominal one; without a last step the grid runs to 1 − sample_eps (here 1).
  last_step_size = 0.0 if args["last_step"] is None else args["last_step_size"]
  t0, t1 = transport.interval(sde=True, eval=True, diffusion_form=args["diffusion_form"],
                              last_step_size=last_step_size)
  ours_grid = transport._grid(t0, t1, args["num_steps"])  # pylint: disable=protected-access
  np.testing.assert_allclose(ours_grid, outputs[f"grid_{run}_f32"], rtol=0, atol=1.2e-7)  # torch: one ulp apart
  noise = nhwc(inputs["sde_noise"])
  final, steps = jax.jit(lambda x, w: transport.sample_sde(guided, x, step_noise=w, return_trajectory=True,
                                                           **args))(nhwc(inputs["sample_x_T"]), noise)
  assert rel_err(final, nhwc(outputs[f"{run}_final_f32"])) < F32_RTOL
  if f"{run}_steps_f32" in outputs:
    assert rel_err(steps, nhwc(outputs[f"{run}_steps_f32"])) < F32_RTOL


@pytest.mark.parametrize("run", ["ode_heun", "sde_linear_noise_sbdm_euler"])  # one ODE and one SDE: each ~1.5 s
def test_samplers_float64(case, run):
  """The float64 runs, where the official code keeps grids, dt and some coefficients in float32 (see module doc)."""
  inputs, outputs, params = case
  with jax.enable_x64(True):
    plain, guided = model_fns(inputs, params, np.float64)
    spec = RUNS[run]
    transport = create_transport(**spec["create_transport_args"])
    x_T = nhwc(inputs["sample_x_T"]).astype(np.float64)
    if spec["kind"] == "ODE":
      fn = lambda x: transport.sample_ode(guided, x, return_trajectory=True, **spec["sample_ode_args"])
      final, steps = jax.jit(fn)(x_T)
    else:
      noise = nhwc(inputs["sde_noise"]).astype(np.float64)
      fn = lambda x, w: transport.sample_sde(guided, x, step_noise=w, return_trajectory=True, **spec["sample_sde_args"])
      final, steps = jax.jit(fn)(x_T, noise)
    assert final.dtype == np.float64
    tolerance = 1e-9 if spec["kind"] == "ODE" else 2e-7  # see the module docstring
    assert rel_err(final, nhwc(outputs[f"{run}_final_f64"])) < tolerance
    if f"{run}_steps_f64" in outputs:
      assert rel_err(steps, nhwc(outputs[f"{run}_steps_f64"])) < tolerance


QUANTITIES = ("alpha", "d_alpha", "sigma", "d_sigma", "d_alpha_alpha_ratio", "drift_mean", "drift_var",
              "score_from_velocity", "noise_from_velocity", "velocity_from_score")
FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "inccreasing_decreasing")


def path_quantities(path, t, x, v, s):
  alpha, d_alpha = path.compute_alpha_t(t)
  sigma, d_sigma = path.compute_sigma_t(t)
  drift_mean, drift_var = path.compute_drift(x, t)
  values = dict(alpha=alpha, d_alpha=d_alpha, sigma=sigma, d_sigma=d_sigma,
                d_alpha_alpha_ratio=path.compute_d_alpha_alpha_ratio_t(t), drift_mean=drift_mean,
                drift_var=drift_var, score_from_velocity=path.get_score_from_velocity(v, x, t),
                noise_from_velocity=path.get_noise_from_velocity(v, x, t),
                velocity_from_score=path.get_velocity_from_score(s, x, t))
  for form in FORMS:
    values[f"diffusion_{form}"] = path.compute_diffusion(x, t, form.replace("_", "-"), 1.0)
  return values


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
def test_path_coefficients(case, path_type):
  inputs, outputs, _ = case
  path = create_transport(path_type).path
  for dtype, suffix, tolerance in ((np.float32, "f32", 1e-6), (np.float64, "f64", 1e-12)):
    with jax.enable_x64(dtype == np.float64):
      t = inputs["sched_t"].astype(dtype)
      x, v, s = (inputs[k].astype(dtype) for k in ("sched_x", "sched_v", "sched_s"))
      values = jax.jit(lambda *args: path_quantities(path, *args))(t, x, v, s)  # one program, not ~60 ops
      for name, value in values.items():
        reference = outputs[f"sched_{path_type.lower()}_{name}_{suffix}"]
        value = np.asarray(value)
        if reference.ndim == 1:  # per-time coefficients come back as (7, 1) to broadcast against x: (7, 4)
          value = value.reshape(len(reference), -1)[:, 0]
        # float32 rounding of ratios near t = 0 or 1 (e.g. GVP's α/α' at t = 1) dominates some entries: 1e-6
        # relative to each array's largest value, which is float32's precision times the formulas' few ops.
        assert rel_err(value, reference) < tolerance, (path_type, name, suffix, rel_err(value, reference))


def test_converter_cli_reads_the_raw_state_dict(tmp_path, case):
  """`python -m dyngen.convert` takes the raw SiT state_dict (the layout of SiT-XL-2-256x256.pt)."""
  _, _, params = case
  config_file = tmp_path / "sit_tiny.py"
  config_file.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                         f"  return ml_collections.ConfigDict(dict(model={model_config().to_dict()!r}))\n")
  result = subprocess.run(
      [sys.executable, "-m", "dyngen.convert", f"--config={config_file}",
       f"--torch_checkpoint={CASE / 'checkpoint.pt'}", f"--output={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent)
  assert result.returncode == 0, result.stderr[-3000:]
  _, converted = checkpoint.load_for_inference(tmp_path / "out")
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                       for path, v in jax.tree_util.tree_leaves_with_path(tree)}
  got, want = flat(converted), flat(params)
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
