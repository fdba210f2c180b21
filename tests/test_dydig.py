"""DyDiG (DyDiT's routing on DiG blocks): against DiG with routing off, its own scan, its FLOPs ratio.

No official code exists; the references are DiG itself (with the routers bypassed, or all on, DyDiG must
compute DiG's function: fp32 1e-5 relative to the output scale), the unrolled masked model (the scan, with
DiG's traced direction schedule, must equal it in float64 to 1e-10) and the complete FLOPs count of DiG.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.models import flops
from tests.test_dydit import assert_scan_equals_unroll
from tests.test_dydit import routed_params


def tiny_config(**overrides):
  fields = dict(name="dydig", input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                num_classes=10, learn_sigma=True, mlp_groups=4, gla_implementation="recurrent")
  return ml_collections.ConfigDict(dict(fields, **overrides))


def dig_config():
  fields = {k: v for k, v in tiny_config().items() if k != "mlp_groups"}
  return ml_collections.ConfigDict(dict(fields, name="dig"))


def inputs(dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4), dtype)
  return x, jnp.array([3, 700]), jnp.array([1, 9])


def without_routers(params):
  return {name: (without_routers(value) if isinstance(value, dict) else value) for name, value in params.items()
          if name not in ("head_router", "mlp_router", "token_router")}


@pytest.fixture(scope="module")
def case():
  model = models.build(tiny_config())
  x, t, y = inputs()
  params = routed_params(model, x, t, y)
  dig_out = jax.jit(lambda p: models.build(dig_config()).apply({"params": p}, x, t, y))(without_routers(params))
  return model, params, dig_out


def test_complete_and_all_on_equal_dig(case):
  model, params, dig_out = case
  x, t, y = inputs()
  complete, aux = model.apply({"params": params}, x, t, y, complete=True)
  assert aux == {}
  scale = float(jnp.max(jnp.abs(dig_out)))
  np.testing.assert_allclose(complete, dig_out, rtol=1e-5, atol=1e-5 * scale)
  # The official initial biases (15 / 15 / 35) route everything: the dynamic path is DiG too.
  def open_routers(path, p):  # the official biases, and router weights too small to outweigh them
    name = jax.tree_util.keystr(path)
    if "router" in name and name.endswith("['bias']"):
      return jnp.full_like(p, 35.0 if "token_router" in name else 15.0)
    return 0.01 * p if "router" in name else p
  all_on = jax.tree_util.tree_map_with_path(open_routers, params)
  out, aux = model.apply({"params": all_on}, x, t, y)
  np.testing.assert_array_equal(aux["token_mask"], 1.0)
  np.testing.assert_allclose(aux["flops_ratio"], 1.0)
  np.testing.assert_allclose(out, dig_out, rtol=1e-5, atol=1e-5 * scale)


def test_routing_changes_the_output_and_the_ratio(case):
  model, params, dig_out = case
  out, aux = model.apply({"params": params}, *inputs())
  assert aux["mlp_mask"].shape == (2, 4, 4) and aux["head_mask"].shape == (2, 4, 2)
  assert aux["token_mask"].shape == (2, 4, 16)
  assert 0.05 < float(jnp.mean(aux["flops_ratio"])) < 0.95
  assert float(jnp.max(jnp.abs(out - dig_out))) > 1e-3


def test_scanned_equals_unrolled_float64():
  with jax.enable_x64(True):
    assert_scan_equals_unroll(tiny_config(dtype="float64"), *inputs(jnp.float64))


def test_unit_macs_count_the_complete_gla_and_swiglu():
  config = ml_collections.ConfigDict(dict(tiny_config(), **models.variant("S/2"), input_size=32, mlp_ratio=4.0))
  model = models.build(config)
  unit = model.unit_macs()
  n, d, heads, hidden = 256, 384, 6, 1024
  gla = n * d * (2 * d // 2 + 2 * d + d) + n * 16 * (d + d // 2) + n * 2 * (d // 2) * (d // heads) + n * 2 * d
  assert unit.attention == gla
  assert unit.mlp == n * d * 2 * hidden + n * hidden * d
  # With everything on the ratio is 1 and the dense count is DiG's.
  assert flops.gflops(config) == pytest.approx(flops.gflops(ml_collections.ConfigDict(dict(config, name="dig"))))


def test_groups_must_divide_the_swiglu_hidden():
  with pytest.raises(ValueError, match=r"MLP hidden \(256\) is cut into 6 routed channel groups"):
    models.build(tiny_config(mlp_groups=6))
