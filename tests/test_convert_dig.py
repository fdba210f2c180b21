"""The converted official tiny DiG (hustvl/DiG, tests/data/dig_tiny) reproduces the official outputs.

The fixture's GLA recurrence ran in float64 (its Triton kernel substituted by the naive recurrence), so the
float32 reference carries almost no kernel error. Tolerance 1e-5 as for DiT: the official float32 timestep
features differ from any other float32 exp/cos by up to ~6e-5, ~1e-6 in the outputs (measured here: 1.1e-6
max abs error on outputs up to 2.4).
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.convert import ParamMappingError
from dyngen.convert import load_torch_params
from dyngen.diffusion import guided_model_fn

CASE = pathlib.Path(__file__).parent / "data" / "dig_tiny"
# The official constructor switches of the trained variant, which dyngen's DiG always implements.
OFFICIAL_ONLY = {"bid_mode": "layer", "if_dw_conv": True, "if_quad_dir": True}


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


def fixture_config(**overrides):
  kwargs = json.loads((CASE / "manifest.json").read_text())["constructor_kwargs"]
  assert {k: kwargs.pop(k) for k in OFFICIAL_ONLY} == OFFICIAL_ONLY
  return ml_collections.ConfigDict(dict(dict(name="dig", **kwargs), **overrides))


@pytest.fixture(scope="module")
def case():
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  params = load_torch_params(CASE / "checkpoint.pt", fixture_config())  # picks "ema" of {model, ema, args}
  # The lax.scan GLA compiles in a quarter of the chunked form's time on CPU; the GLA tests check that the
  # two agree, this file checks the weights.
  model = models.build(fixture_config(gla_implementation="reference"))
  apply = jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))
  return dict(inputs), dict(outputs), apply


def test_forward_float32(case):
  inputs, outputs, apply = case
  out = apply(nhwc(inputs["x"]), inputs["t"].astype(np.int32), inputs["y"].astype(np.int32))
  np.testing.assert_allclose(out, nhwc(outputs["out_f32"]), rtol=1e-5, atol=1e-5)


def test_forward_with_guidance_float32(case):
  inputs, outputs, apply = case
  model_fn = guided_model_fn(apply, jnp.asarray(inputs["y_cfg"], jnp.int32), float(inputs["cfg_scale"]),
                             guidance_channels=3)  # the official quirk
  out = model_fn(nhwc(inputs["x_cfg"]), jnp.asarray(inputs["t_cfg"], jnp.int32))
  np.testing.assert_allclose(out, nhwc(outputs["cfg_out_f32"]), rtol=1e-5, atol=1e-5)


def test_dit_checkpoint_is_not_a_dig():
  with pytest.raises(ParamMappingError) as error:
    load_torch_params(CASE.parent / "dit_tiny" / "checkpoint.pt", fixture_config(hidden_size=64, num_heads=4))
  message = str(error.value)
  assert "blocks.0.attn.q_proj.weight (32, 64) (for blocks_0/attn/q_proj/kernel)" in message  # missing
  assert "blocks.0.attn.qkv.weight (192, 64)" in message  # unexpected
