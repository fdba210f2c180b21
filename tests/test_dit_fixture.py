"""The converted official tiny DiT reproduces the official PyTorch outputs (tests/data/dit_tiny).

The checkpoint goes through the whole import path (safe .pt reader, DiT mapping, shape checks); the model
then runs on the fixture's NCHW inputs transposed to NHWC. Tolerances:
- float32 with the model's own timestep features: 1e-5. The official float32 sinusoid features differ from
  any other float32 exp/cos by up to ~6e-5 at t near 1000 (fixture README), which moves outputs by ~1e-6.
- float64 with the fixture's saved float32 features fed to the timestep MLP (what the official float64
  run did): 1e-12, i.e. the same function up to float64 rounding.
"""
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.convert import load_torch_params
from dyngen.diffusion import guided_model_fn

CASE = pathlib.Path(__file__).parent / "data" / "dit_tiny"


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def fixture_config(**overrides):
  manifest = json.loads((CASE / "manifest.json").read_text())
  return ml_collections.ConfigDict(dict(dict(name="dit", **manifest["constructor_kwargs"]), **overrides))


@pytest.fixture(scope="module")
def case():
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  params = load_torch_params(CASE / "checkpoint.pt", fixture_config())
  return {k: inputs[k] for k in inputs.files}, {k: outputs[k] for k in outputs.files}, params


def feed_timestep_features(features):
  """Interceptor replacing the input of t_embedder/fc1 (the sinusoid features) by `features` (B, 256)."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path == ("t_embedder", "fc1"):
      (freq,) = args
      assert freq.shape == features.shape, "saved features are for another batch"
      args = (jnp.asarray(features, freq.dtype),)
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def jitted_apply(model, params):
  return jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))


def test_forward_float32(case):
  inputs, outputs, params = case
  apply = jitted_apply(models.build(fixture_config()), params)
  out = apply(nhwc(inputs["x"]), inputs["t"].astype(np.int32), inputs["y"].astype(np.int32))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, nhwc(outputs["out_f32"]), rtol=1e-5, atol=1e-5)  # measured: 4.8e-7 max abs


def test_forward_with_guidance_float32(case):
  inputs, outputs, params = case
  apply = jitted_apply(models.build(fixture_config()), params)
  y = jnp.asarray(inputs["y_cfg"], jnp.int32)
  model_fn = guided_model_fn(apply, y, float(inputs["cfg_scale"]), guidance_channels=3)  # the official quirk
  out = model_fn(nhwc(inputs["x_cfg"]), jnp.asarray(inputs["t_cfg"], jnp.int32))
  np.testing.assert_allclose(out, nhwc(outputs["cfg_out_f32"]), rtol=1e-5, atol=1e-5)


def test_forward_float64(case):
  inputs, outputs, params = case
  with jax.enable_x64(True):
    model = models.build(fixture_config(dtype="float64"))
    params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)  # exact: the file is float32
    apply = jitted_apply(model, params64)
    with feed_timestep_features(outputs["t_freq_f32"]):
      out = apply(nhwc(inputs["x"]).astype(np.float64), inputs["t"], inputs["y"])
    np.testing.assert_allclose(out, nhwc(outputs["out_f64"]), rtol=1e-12, atol=1e-12)
