"""DiT model: sizes, FLOPs, attention implementations, dtype/remat options and config errors.

Numerical parity with the official code is in test_dit_fixture.py; here the references are the DiT
paper's tables, the official parameter counts and one implementation against another.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dyngen import models
from dyngen.models import attention
from dyngen.models import flops
from dyngen.models import layers


def dit_config(variant="S/2", **overrides):
  fields = dict(name="dit", input_size=32, in_channels=4, mlp_ratio=4.0, class_dropout_prob=0.1,
                num_classes=1000, learn_sigma=True, **models.variant(variant))
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def tiny_config(**overrides):
  fields = dict(name="dit", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def inputs(config, batch=2, seed=0):
  kx, kt, ky = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (batch, config.input_size, config.input_size, config.in_channels))
  t = jax.random.randint(kt, (batch,), 0, 1000)
  y = jax.random.randint(ky, (batch,), 0, config.num_classes)
  return x, t, y


def apply(model, params, *args, **kwargs):
  """model.apply under jit: eager Flax dispatches op by op, which dominates tiny-model test time on CPU."""
  return jax.jit(lambda p, *a: model.apply({"params": p}, *a, **kwargs))(params, *args)


def random_params(model, config, seed=1):
  """Init, then perturb every parameter: the official init zeroes adaLN and final layers (output = 0)."""
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(seed)}, *inputs(config))["params"])
  # numpy draws: every new shape given to jax.random would compile a program of its own.
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + np.float32(0.05) * rng.standard_normal(p.shape, np.float32), params)


def count_params(config):
  model = models.build(config)
  shapes = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs(config, batch=1))
  return sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))


# DiT paper, Table 4 (Gflops, fvcore: a multiply-add is one flop).
PAPER_GFLOPS = {"S/2": 6.06, "S/4": 1.41, "S/8": 0.36, "B/2": 23.01, "B/4": 5.56, "B/8": 1.42,
                "L/2": 80.71, "L/4": 19.70, "L/8": 5.01, "XL/2": 118.64, "XL/4": 29.05, "XL/8": 7.39}


@pytest.mark.parametrize("variant", sorted(PAPER_GFLOPS))
def test_gflops_match_paper(variant):
  # The paper rounds to 2 decimals; 1% covers that for the smallest (0.36) entry too.
  assert flops.gflops(dit_config(variant)) == pytest.approx(PAPER_GFLOPS[variant], rel=0.01)


def test_parameter_count_matches_official_xl2():
  # The official DiT-XL/2 has 675,129,632 parameters, counting the fixed (256, 1152) pos_embed that
  # PyTorch stores as a frozen Parameter; dyngen computes that table instead of storing it.
  assert count_params(dit_config("XL/2")) + 256 * 1152 == 675_129_632


def test_variant_parsing_and_errors():
  assert models.variant("B/4") == dict(depth=12, hidden_size=768, num_heads=12, patch_size=4)
  for bad in ("M/2", "S/3", "S", "XL/two"):
    with pytest.raises(ValueError, match="unknown model variant"):
      models.variant(bad)


@pytest.mark.parametrize("field,value,message", [
    ("patch_size", 3, "not divisible by model.patch_size"),
    ("num_heads", 5, "not divisible by model.num_heads"),
    ("depth", 0, "model.depth must be a positive int"),
    ("hidden_size", 64.0, "model.hidden_size must be a positive int"),
    ("dtype", "float16", "model.dtype"),
    ("class_dropout_prob", 1.5, "class_dropout_prob"),
])
def test_bad_config_values_are_named(field, value, message):
  with pytest.raises(ValueError, match=message):
    models.build(tiny_config(**{field: value}))


def test_unknown_field_and_family():
  with pytest.raises(ValueError, match=r"unknown model config field\(s\) \['hiden_size'\]"):
    models.build(tiny_config(hiden_size=64))
  with pytest.raises(ValueError, match="unknown model name 'ditt'"):
    models.build(tiny_config(name="ditt"))


def test_wrong_input_shape_is_named():
  config = tiny_config()
  model = models.build(config)
  with pytest.raises(ValueError, match=r"expected x of shape \(B, 8, 8, 4\)"):
    model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,), jnp.int32),
               jnp.zeros((1,), jnp.int32))


def test_output_shape_and_learn_sigma_off():
  for learn_sigma, channels in ((True, 8), (False, 4)):
    config = tiny_config(learn_sigma=learn_sigma, patch_size=4, num_classes=3)
    model = models.build(config)
    params = random_params(model, config)
    out = apply(model, params, *inputs(config))
    assert out.shape == (2, 8, 8, channels)


def test_initial_model_outputs_zero():
  # adaLN-Zero: the final linear is zero-initialised, so a freshly initialised model predicts exactly 0.
  config = tiny_config()
  model = models.build(config)
  variables = jax.jit(model.init)({"params": jax.random.key(0)}, *inputs(config))
  assert float(jnp.abs(apply(model, variables["params"], *inputs(config))).max()) == 0.0


@pytest.mark.parametrize("implementation", ["dense", "chunked"])
def test_attention_implementations_match_xla_forward_and_grad(implementation):
  # Same function, different evaluation order: fp32 rounding only (~1e-6 relative).
  config = tiny_config(input_size=16)
  x, t, y = inputs(config)
  params = random_params(models.build(config), config)

  def loss(params, implementation):
    model = models.build(tiny_config(input_size=16, attention=implementation, attention_chunk_size=24))
    return jnp.sum(model.apply({"params": params}, x, t, y) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  plain, plain_grad = value_and_grad(params, "xla")
  other, other_grad = value_and_grad(params, implementation)
  np.testing.assert_allclose(other, plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(other_grad), jax.tree.leaves(plain_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def softmax_attention_float64(q, k, v):
  """The textbook formula (B, T, H, Dh) -> (B, T, H, Dh), run in float64; its gradient comes from jax
  autodiff, independent of the hand-written backward passes under test."""
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


@pytest.mark.parametrize("implementation", ["dense", "chunked"])  # chunked: 37 queries in 4 blocks of 10
@pytest.mark.parametrize("dtype,tolerance", [
    (np.float64, 1e-12),  # the same function up to float64 rounding
    (np.float32, 2e-5),   # fp32 rounding of sums over 37 keys and 8 channels (~1e-6 measured)
])
def test_attention_value_and_grad_against_float64_formula(implementation, dtype, tolerance):
  # Both have hand-written backward passes; the reference gradient is autodiff of the textbook formula.
  rng = np.random.default_rng(0)
  # Scores up to ~±20: exp of un-shifted scores would lose precision, so this also checks the max shift.
  q, k, v, cotangent = (3 * rng.standard_normal((2, 37, 3, 8)) for _ in range(4))

  def loss(attention_fn, q, k, v):
    return jnp.sum(attention_fn(q, k, v) * cotangent.astype(q.dtype))

  with jax.enable_x64(True):
    expected_value, expected_grads = jax.value_and_grad(
        lambda *a: loss(softmax_attention_float64, *a), argnums=(0, 1, 2))(q, k, v)
    attention_fn = lambda q, k, v: attention.dot_product_attention(q, k, v, implementation, chunk_size=10)
    value, grads = jax.jit(jax.value_and_grad(lambda *a: loss(attention_fn, *a), argnums=(0, 1, 2)))(
        *(a.astype(dtype) for a in (q, k, v)))
  assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
  np.testing.assert_allclose(value, expected_value, rtol=tolerance)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * float(np.abs(want).max()))


def test_attention_auto_selection():  # CPU's choice: tests/test_cpu_attention.py
  assert attention.resolve_implementation("auto", 256, jnp.float32, "gpu") == "xla"
  assert attention.resolve_implementation("auto", 1024, jnp.float32, "tpu") == "pallas_tpu"
  assert attention.resolve_implementation("auto", 256, jnp.bfloat16, "gpu") == "cudnn"
  with pytest.raises(ValueError, match="attention implementation must be one of"):
    attention.resolve_implementation("flash", 256, jnp.float32)


def test_remat_and_bfloat16():
  config = tiny_config()
  x, t, y = inputs(config)
  params = random_params(models.build(config), config)
  reference = apply(models.build(config), params, x, t, y)
  remat = apply(models.build(tiny_config(remat=True)), params, x, t, y)
  np.testing.assert_allclose(remat, reference, rtol=1e-6, atol=1e-6)
  # bf16 compute keeps ~3 significant digits; fp32 params are left untouched.
  bf16 = apply(models.build(tiny_config(dtype="bfloat16")), params, x, t, y)
  assert bf16.dtype == jnp.float32
  assert float(jnp.abs(bf16 - reference).max()) < 5e-2 * float(jnp.abs(reference).max())


def test_label_dropout_uses_null_class():
  config = tiny_config()
  model = models.build(config)
  x, t, y = inputs(config)
  params = random_params(model, config)
  null = apply(model, params, x, t, jnp.full_like(y, config.num_classes))
  forced = apply(model, params, x, t, y, force_drop=jnp.array([True, True]))
  np.testing.assert_array_equal(forced, null)
  # With probability 0.1 over 4000 labels, the dropped fraction is 0.1 ± 0.015 (3 sigma ≈ 0.014).
  embedder = models.layers.LabelEmbedder(10, 4, 0.1)
  labels = jnp.zeros((4000,), jnp.int32)
  ev = embedder.init({"params": jax.random.key(0)}, labels)
  table = ev["params"]["embedding_table"]["embedding"]
  out = embedder.apply(ev, labels, train=True, rngs={"label_dropout": jax.random.key(3)})
  dropped = np.asarray(jnp.all(out == nn.unbox(table)[10], axis=-1)).mean()
  assert abs(dropped - 0.1) < 0.015


def test_patch_embed_is_the_strided_convolution():
  # The matmul form must keep nn.Conv's parameter names, shapes and initial values (converted checkpoints
  # and fresh runs land on the same tree), and compute the stride-p convolution: fp32 rounding of 16-term sums.
  x = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))

  class ConvPatchEmbed(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
      y = nn.Conv(16, (2, 2), strides=(2, 2), padding="VALID", name="proj",
                  kernel_init=init, bias_init=nn.initializers.normal(1.0))(x)
      return y.reshape(y.shape[0], -1, y.shape[-1])

  embed = layers.PatchEmbed(2, 16)
  params = nn.unbox(embed.init(jax.random.key(1), x)["params"])
  conv_params = ConvPatchEmbed().init(jax.random.key(1), x)["params"]
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv_params)
  np.testing.assert_array_equal(params["proj"]["kernel"], conv_params["proj"]["kernel"])
  params = conv_params  # non-zero bias, so the bias path is checked too

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply({"params": params}, x)))

  value, grads = jax.jit(jax.value_and_grad(lambda p, x: loss(embed, p, x), argnums=(0, 1)))(params, x)
  expected_value, expected_grads = jax.jit(jax.value_and_grad(lambda p, x: loss(ConvPatchEmbed(), p, x),
                                                              argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


ROWS_DOT_GENERAL_CASES = [
    ((2, 5, 6), (6, 7), (((2,), (0,)), ((), ()))),              # Dense on (B, N, D): reshaped to matrices
    ((2, 5, 6), (6, 3, 2, 4), (((2,), (0,)), ((), ()))),        # fused qkv kernel (D, 3, H, Dh)
    ((2, 5, 3, 4), (3, 4, 6), (((2, 3), (0, 1)), ((), ()))),    # heads -> width projection
    ((5, 6), (7, 6), (((1,), (1,)), ((), ()))),                 # not a linear-layer layout: lax.dot_general
    ((2, 5, 6), (2, 6, 7), (((2,), (1,)), ((0,), (0,)))),       # batch axes: lax.dot_general
]


def test_rows_dot_general_is_dot_general():
  # Same products in another order: fp32 rounding of <= 12-term sums, values and both gradients.
  keys = jax.random.split(jax.random.key(0), 2 * len(ROWS_DOT_GENERAL_CASES))
  operands = [(jax.random.normal(keys[2 * i], lhs_shape), jax.random.normal(keys[2 * i + 1], rhs_shape))
              for i, (lhs_shape, rhs_shape, _) in enumerate(ROWS_DOT_GENERAL_CASES)]

  @functools.partial(jax.jit, static_argnums=0)  # every case in one program: one compile per form
  def values_and_grads(dot_general, operands):
    results = []
    for (lhs, rhs), (_, _, dimension_numbers) in zip(operands, ROWS_DOT_GENERAL_CASES):
      loss = lambda a, b: jnp.sum(jnp.sin(dot_general(a, b, dimension_numbers)))
      results.append(jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs))
    return results

  got, want = values_and_grads(layers.rows_dot_general, operands), values_and_grads(jax.lax.dot_general, operands)
  for (lhs, rhs), (_, _, dimension_numbers) in zip(operands, ROWS_DOT_GENERAL_CASES):
    assert layers.rows_dot_general(lhs, rhs, dimension_numbers).shape == jax.lax.dot_general(
        lhs, rhs, dimension_numbers).shape
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
