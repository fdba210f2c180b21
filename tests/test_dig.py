"""DiG model: sizes, FLOPs, the scan-direction schedule and config errors.

Parity with the official code is in test_dig_fixture.py; here the references are the official parameter
counts, the DiG paper's GFLOPs and a literal re-statement of the official block order.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.models import dig
from dyngen.models import flops


def dig_config(variant="S/2", **overrides):
  fields = dict(name="dig", input_size=32, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1,
                num_classes=1000, learn_sigma=True, **models.variant(variant))
  if variant.startswith("XL"):
    fields["num_heads"] = 18  # DiG-XL: 18 heads of key dim 32.
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def tiny_config(**overrides):
  fields = dict(name="dig", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=1,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True,
                gla_implementation="chunked", gla_chunk_size=8)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def inputs(config, batch=2):
  kx, kt, ky = jax.random.split(jax.random.key(0), 3)
  return (jax.random.normal(kx, (batch, config.input_size, config.input_size, config.in_channels)),
          jax.random.randint(kt, (batch,), 0, 1000), jax.random.randint(ky, (batch,), 0, config.num_classes))


def apply(model, params, *args, **kwargs):
  """model.apply under jit: eager Flax dispatches op by op, which dominates tiny-model test time on CPU."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def random_params(model, config):
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(1)}, *inputs(config))["params"])
  # numpy draws: every new shape given to jax.random would compile a program of its own.
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)


# Official parameter counts (sum of numel of DiG's parameters, which includes the frozen pos_embed).
OFFICIAL_PARAMS = {"S/2": 33_081_632, "B/2": 130_748_192, "L/2": 465_022_496, "XL/2": 675_953_952}
PAPER_GFLOPS = {"S/2": 4.30, "B/2": 17.07, "L/2": 61.66, "XL/2": 89.40}  # DiG paper, Table 1.


@pytest.mark.parametrize("variant", sorted(OFFICIAL_PARAMS))
def test_parameter_counts(variant):
  config = dig_config(variant)
  shapes = jax.eval_shape(models.build(config).init, {"params": jax.random.key(0)}, *inputs(config, 1))
  count = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert count + 256 * config.hidden_size == OFFICIAL_PARAMS[variant]


@pytest.mark.parametrize("variant", sorted(PAPER_GFLOPS))
def test_gflops_paper_convention_and_complete_count(variant):
  config = dig_config(variant)
  assert flops.gflops(config, convention="paper") == pytest.approx(PAPER_GFLOPS[variant], rel=0.01)
  complete = flops.count_flops(config)
  # What the paper leaves out, counted by hand for S/2: 12 blocks x 256 tokens x
  # (GLA core 2*192*64 + SwiGLU down 1024*384 + norm-gate 2*384).
  if variant == "S/2":
    left_out = complete["gla_core"] + complete["swiglu_out"] + complete["norm_gate"]
    assert left_out == 12 * 256 * (2 * 192 * 64 + 1024 * 384 + 2 * 384)


def test_swiglu_hidden_sizes():
  assert [dig.swiglu_hidden_size(d) for d in (384, 768, 1024, 1152)] == [1024, 2048, 2816, 3072]


def test_depth_and_heads_errors():
  with pytest.raises(ValueError, match="multiple of 4"):
    models.build(tiny_config(depth=6))
  with pytest.raises(ValueError, match="key dim"):
    models.build(tiny_config(hidden_size=192, num_heads=64))  # 192 % 64 == 0 but the key dim 96 % 64 != 0
  with pytest.raises(ValueError, match="gla_implementation"):
    models.build(tiny_config(gla_implementation="cuda"))


def test_depthwise_conv_is_identity_at_init_and_rotation_is_exact():
  conv = dig.DepthwiseConv(grid_size=4)
  x = jax.random.normal(jax.random.key(0), (2, 16, 8))
  variables = conv.init({"params": jax.random.key(1)}, x)
  np.testing.assert_array_equal(conv.apply(variables, x), x)
  # A rotated kernel on the reversed sequence is the conv of the official (un-reversed) order, reversed.
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), nn.unbox(variables))
  # Against XLA's grouped convolution (what PyTorch's Conv2d(groups=D, padding=1) computes).
  kernel, bias = params["params"]["kernel"], params["params"]["bias"]
  grid = x.reshape(2, 4, 4, 8)
  expected = jax.lax.conv_general_dilated(grid, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          feature_group_count=8) + bias
  np.testing.assert_allclose(conv.apply(params, x), expected.reshape(2, 16, 8), rtol=1e-5, atol=1e-5)
  official = conv.apply(params, x[:, ::-1])[:, ::-1]
  np.testing.assert_allclose(conv.apply(params, x, rotate=True), official, rtol=1e-5, atol=1e-5)


def test_scan_schedule_matches_official_flip_and_transpose():
  """dyngen's reversal bookkeeping against the official order: flip after every block, transpose after odd."""
  config = tiny_config()  # depth 4: each of the four scan orientations once, ending in raster order
  model = models.build(config)
  x, t, y = inputs(config)
  params = random_params(model, config)
  got = apply(model, params, x, t, y)

  class Official(dig.Model):
    """The official forward: every block causal with the stored kernel; flips and transposes done literally."""

    @nn.compact
    def __call__(self, x, t, y, train=False, force_drop=None):
      tokens, cond = self.embed(x, t, y, train)
      for i in range(self.depth):
        tokens, _ = dig.DiGBlock(self.num_heads, self.grid_size, self.mlp_ratio, "reference",
                                 name=f"blocks_{i}")(tokens, cond)
        tokens = tokens[:, ::-1]
        if i % 2 == 1:
          tokens = dig.transpose_grid(tokens, self.grid_size)
      out = models.layers.FinalLayer(self.hidden_size, self.patch_size, self.out_channels,
                                     name="final_layer")(tokens, cond.c)
      return models.layers.unpatchify(out, self.patch_size, self.out_channels, self.grid_size)

  fields = dict(config)
  fields.pop("name")
  expected = apply(Official(**fields), params, x, t, y)
  # Different GLA evaluation (chunked vs token scan) and order: fp32 rounding only.
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(jnp.abs(expected).max()))


def test_initial_model_outputs_zero_and_grads_finite():
  config = tiny_config()
  model = models.build(config)
  variables = jax.jit(model.init)({"params": jax.random.key(0)}, *inputs(config))
  assert float(jnp.abs(apply(model, variables["params"], *inputs(config))).max()) == 0.0
  params = random_params(model, config)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *inputs(config)) ** 2)))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_remat_matches():
  config = tiny_config()
  params = random_params(models.build(config), config)
  a = apply(models.build(config), params, *inputs(config))
  b = apply(models.build(tiny_config(remat=True)), params, *inputs(config))
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
