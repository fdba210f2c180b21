"""The converted official tiny DyDiT reproduces the official PyTorch outputs (tests/data/dydit_tiny).

The checkpoint ({"model", "ema", "args"}) goes through the whole import path (safe .pt reader, DyDiT mapping,
shape checks). Compared: the dynamic output, the complete-model output, the guided output, every per-layer
head / group / token mask (identical: the fixture's logits keep |logit| >= 1.3e-3, far above float32
noise), the router and token logits, the per-sample FLOPs ratio and the dynamic loss. Tolerances as for
DiT (tests/test_dit_fixture.py): float32 1e-5 (the official float32 sinusoid features differ from any other
float32 exp/cos by up to ~6e-5, ~1e-6 in outputs); float64 with the fixture's float32 timestep features
fed to the timestep MLP 1e-12.
"""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.convert import load_torch_params
from dyngen.diffusion import guided_model_fn
from dyngen.train import objectives
from tests.test_dit_fixture import feed_timestep_features
from tests.test_dit_fixture import nhwc

CASE = pathlib.Path(__file__).parent / "data" / "dydit_tiny"
MANIFEST = json.loads((CASE / "manifest.json").read_text())


def fixture_config(**overrides):
  return ml_collections.ConfigDict(dict(dict(name="dydit", attention="xla", **MANIFEST["constructor_kwargs"]),
                                        **overrides))


@pytest.fixture(scope="module")
def case():
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  params = load_torch_params(CASE / "checkpoint.pt", fixture_config())
  return {k: inputs[k] for k in inputs.files}, {k: outputs[k] for k in outputs.files}, params


def jitted_apply(model, params, complete=False):
  return jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y, complete=complete))


def official_masks(outputs, prefix=""):
  """The fixture's masks in dyngen's layout: head/mlp (B, L, H), tokens (B, L, N)."""
  return dict(head_mask=outputs[f"{prefix}attn_mask_f32"], mlp_mask=outputs[f"{prefix}mlp_mask_f32"],
              token_mask=outputs[f"{prefix}token_select_f32"][..., 0])


def fixture_inputs(inputs, cfg=False):
  suffix = "_cfg" if cfg else ""
  return (nhwc(inputs["x" + suffix]), jnp.asarray(inputs["t" + suffix], jnp.int32),
          jnp.asarray(inputs["y" + suffix], jnp.int32))


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "guidance_batch"])
def test_masks_identical_float32(case, cfg):
  inputs, outputs, params = case
  _, aux = jitted_apply(models.build(fixture_config()), params)(*fixture_inputs(inputs, cfg))
  for name, expected in official_masks(outputs, "cfg_" if cfg else "").items():
    np.testing.assert_array_equal(aux[name], expected, err_msg=name)


def test_dynamic_and_complete_outputs_float32(case):
  inputs, outputs, params = case
  model = models.build(fixture_config())
  out, aux = jitted_apply(model, params)(*fixture_inputs(inputs))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, nhwc(outputs["out_f32"]), rtol=1e-5, atol=1e-5)
  complete, complete_aux = jitted_apply(model, params, complete=True)(*fixture_inputs(inputs))
  assert complete_aux == {}
  np.testing.assert_allclose(complete, nhwc(outputs["out_complete_f32"]), rtol=1e-5, atol=1e-5)
  # The routing matters in this fixture: the dynamic and dense outputs differ far beyond the tolerance.
  assert np.max(np.abs(out - complete)) > 1e-3


def test_flops_ratio_and_dynamic_loss_float32(case):
  inputs, outputs, params = case
  _, aux = jitted_apply(models.build(fixture_config()), params)(*fixture_inputs(inputs))
  np.testing.assert_allclose(aux["flops_ratio"], outputs["flops_ratio_per_sample_f32"], rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(aux["flops_ratio"]), outputs["flops_ratio_f32"], rtol=1e-6)
  loss = objectives.flops_loss(aux["flops_ratio"], target=MANIFEST["flops"]["DynamicLoss_kwargs"]["token_target_ratio"],
                               weight=MANIFEST["flops"]["DynamicLoss_kwargs"]["token_loss_ratio"])
  np.testing.assert_allclose(loss, outputs["dynamic_loss_f32"], rtol=1e-5)


def test_guided_output_float32(case):
  inputs, outputs, params = case
  apply = jitted_apply(models.build(fixture_config()), params)
  x, t, y = fixture_inputs(inputs, cfg=True)
  model_fn = guided_model_fn(lambda x, t, y: apply(x, t, y)[0], y, float(inputs["cfg_scale"]), guidance_channels=3)
  np.testing.assert_allclose(model_fn(x, t), nhwc(outputs["cfg_out_f32"]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "guidance_batch"])
def test_logits_and_outputs_float64(case, cfg):
  inputs, outputs, params = case
  prefix = "cfg_" if cfg else ""
  with jax.enable_x64(True):
    model = models.build(fixture_config(dtype="float64"))
    params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)  # exact: the file is float32
    x, t, y = fixture_inputs(inputs, cfg)
    with feed_timestep_features(outputs[f"{prefix}t_freq_f32"]):
      out, aux = model.apply({"params": params64}, x.astype(np.float64), t, y)
      complete, _ = model.apply({"params": params64}, x.astype(np.float64), t, y, complete=True)
    for ours, theirs in (("head_logits", "attn_router_logits"), ("mlp_logits", "mlp_router_logits")):
      np.testing.assert_allclose(aux[ours], outputs[f"{prefix}{theirs}_f64"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(aux["token_logits"], outputs[f"{prefix}token_logits_f64"][..., 0], rtol=1e-12,
                               atol=1e-12)
    if not cfg:
      np.testing.assert_allclose(out, nhwc(outputs["out_f64"]), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(complete, nhwc(outputs["out_complete_f64"]), rtol=1e-12, atol=1e-12)
      np.testing.assert_allclose(aux["flops_ratio"], outputs["flops_ratio_per_sample_f64"], rtol=1e-12)
