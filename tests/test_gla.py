"""dyngen.pallas_kernels.gla against the float64 token-by-token recurrence.

Error norm throughout: max|actual - expected| / max|expected| over the whole array (absolute error when the
reference is exactly zero, e.g. the gate gradient of a one-token sequence). float32 results must agree to
1e-5 (float32 rounding grown over a few thousand accumulated terms stays near 1e-6); bfloat16 inputs to
2e-2 (inputs and output rounded to 8 mantissa bits, about 4e-3 each).

One base class holds the numerical checks; each implementation is a subclass with its own cases (the Pallas
kernels run in interpret mode on CPU, which is slow, so their cases are few and small).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from dyngen.pallas_kernels import gla
from dyngen.pallas_kernels.gla import chunked

# Optimising the test programs costs more than running them (interpret-mode kernels especially).
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _compiled(fn, *args):
  return jax.jit(fn).trace(*args).lower().compile(compiler_options=_FAST_COMPILE)


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  scale = np.max(np.abs(expected))
  return np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0)


def _inputs(seed, length, *, batch=1, heads=2, key_dim=16, value_dim=16):
  """float64 numpy q, k, v, log_alpha, and an output cotangent. Gates mix every regime: exactly 0 (no
  decay), DiG-like small, moderate, strong (-20), and saturated (-1e4: exp is 0 in float32 and float64)."""
  rng = np.random.default_rng(seed)
  q, k = rng.normal(size=(2, batch, length, heads, key_dim))
  v, cotangent = rng.normal(size=(2, batch, length, heads, value_dim))
  regime = rng.choice(5, size=q.shape, p=[0.15, 0.45, 0.25, 0.1, 0.05])
  log_alpha = np.select(
      [regime == 0, regime == 1, regime == 2, regime == 3, regime == 4],
      [np.zeros(q.shape), -rng.uniform(0, 0.1, q.shape), -rng.uniform(0, 3, q.shape),
       -rng.uniform(15, 25, q.shape), np.full(q.shape, -1e4)])
  return (q, k, v, log_alpha), cotangent


def _output_and_grads(attention, inputs, cotangent):
  """(o, (dq, dk, dv, dlog_alpha)) of `attention` at `inputs` for the output cotangent."""
  o, vjp = jax.vjp(attention, *inputs)
  return o, vjp(cotangent.astype(o.dtype))


@functools.lru_cache(maxsize=None)
def _reference(seed, length, reverse, shape_kwargs):
  """float64 output and gradients of the recurrence (cached: several tests share a case)."""
  inputs, cotangent = _inputs(seed, length, **dict(shape_kwargs))
  with jax.enable_x64(True):
    attention = functools.partial(gla.gated_linear_attention, reverse=reverse, implementation="reference")
    args = [jnp.asarray(x, jnp.float64) for x in (*inputs, cotangent)]
    o, grads = _compiled(lambda *a: _output_and_grads(attention, a[:4], a[4]), *args)(*args)
    return np.asarray(o), tuple(np.asarray(g) for g in grads)


class _GatedLinearAttentionTests:
  """Numerical checks shared by every implementation; subclasses set the class attributes."""

  IMPLEMENTATION = None
  INTERPRET = False
  SHAPE = dict(batch=1, heads=2, key_dim=16, value_dim=16)
  # (length, chunk_size, reverse) run in float32 against the float64 recurrence.
  CASES = ()
  BF16_CASE = (17, 16, False)

  def _attention(self, chunk_size, reverse):
    return functools.partial(gla.gated_linear_attention, chunk_size=chunk_size, reverse=reverse,
                             implementation=self.IMPLEMENTATION, interpret=self.INTERPRET)

  def _run(self, length, chunk_size, reverse, dtype, seed=0):
    inputs, cotangent = _inputs(seed, length, **self.SHAPE)
    attention = self._attention(chunk_size, reverse)
    args = [jnp.asarray(x, dtype) for x in (*inputs, cotangent)]
    o, grads = _compiled(lambda *a: _output_and_grads(attention, a[:4], a[4]), *args)(*args)
    expected = _reference(seed, length, reverse, tuple(sorted(self.SHAPE.items())))
    return (o, grads), expected

  def _check(self, actual, expected, tolerance, dtype):
    (o, grads), (o_ref, grads_ref) = actual, expected
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    for name, x, x_ref in zip(("o", "dq", "dk", "dv", "dlog_alpha"), (o, *grads), (o_ref, *grads_ref)):
      assert np.all(np.isfinite(np.asarray(x, np.float32))), f"{name} has NaN/Inf"
      error = _relative_error(x, x_ref)
      assert error < tolerance, f"{name}: relative error {error:.2e} >= {tolerance:.0e}"

  def test_float32_matches_float64_recurrence(self, case):
    length, chunk_size, reverse = case
    self._check(*self._run(length, chunk_size, reverse, jnp.float32), tolerance=1e-5, dtype=jnp.float32)

  def test_bfloat16_inputs(self):
    length, chunk_size, reverse = self.BF16_CASE
    self._check(*self._run(length, chunk_size, reverse, jnp.bfloat16), tolerance=2e-2, dtype=jnp.bfloat16)


def pytest_generate_tests(metafunc):
  if "case" in metafunc.fixturenames:
    cases = metafunc.cls.CASES
    metafunc.parametrize("case", cases, ids=[f"T{t}-C{c}-{'rev' if r else 'fwd'}" for t, c, r in cases])


class TestChunked(_GatedLinearAttentionTests):
  IMPLEMENTATION = "chunked"
  CASES = ((1, 64, False), (15, 16, True), (16, 16, False), (17, 16, False), (17, 64, True),
           (256, 64, False), (256, 24, True), (1000, 64, True))

  def test_4096_tokens(self):  # about 5 s on 2 cores, most of it the float64 reference
    self._check(*self._run(4096, 64, False, jnp.float32), tolerance=1e-5, dtype=jnp.float32)

  def test_float64_is_exact(self):
    """In float64 the chunked algebra must reproduce the recurrence to rounding (1e-12): a wrong decay
    factor or mask shows here as an O(1) error, not hidden by float32 tolerance."""
    with jax.enable_x64(True):
      self._check(*self._run(100, 16, True, jnp.float64), tolerance=1e-12, dtype=jnp.float64)

  def test_zero_decay_gates_give_plain_causal_linear_attention(self):
    """log_alpha = 0 everywhere: o = tril(q k^T * scale) v, an independent closed form."""
    inputs, _ = _inputs(1, 40, **self.SHAPE)
    q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in inputs)
    o = gla.gated_linear_attention(q, k, v, jnp.zeros_like(q), chunk_size=16, implementation="chunked")
    scores = np.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5 * np.tri(40)
    expected = np.einsum("bhts,bshd->bthd", scores, v)
    assert _relative_error(o, expected) < 1e-5

  def test_minus_infinity_gates_are_finite(self):
    """log_alpha = -inf (alpha = 0) resets the state: o_t = (q_t . k_t) v_t * scale where every gate is -inf."""
    inputs, _ = _inputs(2, 20, **self.SHAPE)
    q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in inputs)
    log_alpha, cotangent = jnp.full(q.shape, -jnp.inf), jnp.ones(v.shape)
    o, grads = _compiled(lambda *a: _output_and_grads(self._attention(16, False), a[:4], a[4]),
                         q, k, v, log_alpha, cotangent)(q, k, v, log_alpha, cotangent)
    expected = np.einsum("bthd,bthd->bth", q, k)[..., None] * v * q.shape[-1] ** -0.5
    assert _relative_error(o, expected) < 1e-5
    assert all(np.all(np.isfinite(g)) for g in grads)


class TestRecurrent(_GatedLinearAttentionTests):
  IMPLEMENTATION = "recurrent"
  CASES = ((1, 64, False), (15, 64, True), (17, 64, False), (256, 64, True), (1000, 64, False))

  def test_float64_is_exact(self):
    """The hand-written backward must equal autodiff of the recurrence to rounding in float64."""
    with jax.enable_x64(True):
      self._check(*self._run(100, 64, True, jnp.float64), tolerance=1e-12, dtype=jnp.float64)


class TestPallasTpuInterpret(_GatedLinearAttentionTests):
  IMPLEMENTATION = "pallas_tpu"
  INTERPRET = True
  CASES = ((17, 16, False), (40, 16, True))
  BF16_CASE = (17, 16, True)

  def test_no_races_in_tpu_interpret_mode(self):
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # As jax's own tests.
    inputs, cotangent = _inputs(3, 16, **self.SHAPE)
    attention = functools.partial(gla.gated_linear_attention, chunk_size=8, implementation="pallas_tpu",
                                  interpret=pltpu.InterpretParams(detect_races=True))
    o, grads = _output_and_grads(attention, [jnp.asarray(x, jnp.float32) for x in inputs], cotangent)
    jax.block_until_ready((o, grads))
    assert not tpu_interpret.races.races_found
    o_ref, grads_ref = _reference(3, 16, False, tuple(sorted(self.SHAPE.items())))
    assert max(_relative_error(a, b) for a, b in zip((o, *grads), (o_ref, *grads_ref))) < 1e-5


class TestPallasGpuInterpret(_GatedLinearAttentionTests):
  IMPLEMENTATION = "pallas_gpu"
  INTERPRET = True
  CASES = ((17, 16, True), (40, 32, False))


def _dig_like(length, dtype=jnp.float32):
  """Abstract inputs with DiG-S head sizes: 6 heads, Dk = 32, Dv = 64."""
  return [jax.ShapeDtypeStruct((1, length, 6, d), dtype) for d in (32, 32, 64, 32)]


@pytest.mark.parametrize("implementation, platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_kernels_lower_for_their_hardware(implementation, platform):
  """Forward and backward lower to Mosaic / Triton IR for the real device (no device needed to lower);
  interpret mode never exercises those lowering rules."""
  # The public function refuses a kernel for another backend; lowering for it needs no device.
  kernel = {"pallas_tpu": gla.gated_linear_attention_pallas_tpu,
            "pallas_gpu": gla.gated_linear_attention_pallas_gpu}[implementation]
  grad = jax.grad(lambda *a: jnp.sum(kernel(*a, chunk_size=64, reverse=True).astype(jnp.float32)),
                  argnums=(0, 1, 2, 3))
  exported = export.export(jax.jit(grad), platforms=[platform], disabled_checks=[
      export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*_dig_like(200, jnp.bfloat16))
  kernel_call = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}[platform]
  assert exported.mlir_module().count(kernel_call) >= 2  # the dq and the dk/dv kernels


@pytest.mark.parametrize("implementation", ["chunked", "recurrent"])
def test_backward_memory_grows_linearly_in_length(implementation):
  """Compiled temp memory of jit(grad): 4x the tokens must cost about 4x the memory (the VJPs save only the
  inputs and recompute) and stay far below the (T, T) score matrices of softmax attention. Autodiff of the
  recurrence (the reference) would also be linear, but at T * Dk * Dv per head: 100 KiB per token here."""

  def temp_bytes(length):
    attention = functools.partial(gla.gated_linear_attention, implementation=implementation)
    grad = jax.grad(lambda *a: jnp.sum(attention(*a)), argnums=(0, 1, 2, 3))
    return jax.jit(grad).trace(*_dig_like(length)).lower().compile(
        compiler_options=_FAST_COMPILE).memory_analysis().temp_size_in_bytes

  short, long = temp_bytes(2048), temp_bytes(8192)
  assert 3.0 < long / short < 4.5, (short, long)
  assert long < 0.05 * 6 * 8192 ** 2 * 4, long  # 6 heads of (T, T) float32 scores: 1.6 GB
  assert long < 10 * 1024 * 8192, long  # 10 KiB per token: inputs and a few copies, no stored states


def test_auto_picks_the_kernel_of_the_backend():
  assert [gla.resolve_implementation("auto", b) for b in ("tpu", "gpu", "cpu")] == [
      "pallas_tpu", "pallas_gpu", "recurrent"]
  assert gla.resolve_implementation("chunked", "tpu") == "chunked"


def test_sub_chunk_decays_are_exact_after_a_saturated_gate():
  """A -1e4 gate followed by small ones: b_t - b_s as a difference of prefix sums would lose the small gates
  to rounding (1e4 has float32 spacing 1e-3); the interval sums keep them exactly."""
  g = jnp.asarray([[-1e4, -1e-3, -2e-3, -3e-3]], jnp.float32)[..., None]  # (1, C=4, Dk=1)
  decays = chunked.sub_chunk_decays(g, 4)
  np.testing.assert_allclose(decays.segment[0, 0, 3, 1, 0], -5e-3, rtol=1e-6)
  np.testing.assert_allclose(decays.after[0, 0, 0, 0], -6e-3, rtol=1e-6)


class TestBadInput:
  def _ok(self):
    x = jnp.zeros((1, 8, 2, 4))
    return dict(q=x, k=x, v=jnp.zeros((1, 8, 2, 3)), log_alpha=x)

  @pytest.mark.parametrize("change, message", [
      (dict(k=jnp.zeros((1, 8, 2, 5))), "k must have the shape of q"),
      (dict(v=jnp.zeros((1, 9, 2, 3))), "v must be"),
      (dict(log_alpha=jnp.zeros((1, 8, 2))), "log_alpha must have rank 4"),
      (dict(q=jnp.zeros((8, 2, 4))), "q must have rank 4"),
      (dict(q=jnp.zeros((1, 8, 2, 4), jnp.int32)), "q must be a floating array"),
  ])
  def test_bad_arrays(self, change, message):
    with pytest.raises(ValueError, match=message):
      gla.gated_linear_attention(**{**self._ok(), **change})

  @pytest.mark.parametrize("options, message", [
      (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
      (dict(chunk_size=16.0), "chunk_size must be a positive int"),
      (dict(implementation="flash"), "implementation must be one of"),
      (dict(implementation="pallas_tpu"), "pass interpret=True"),
      (dict(implementation="pallas_tpu", interpret=True, chunk_size=12), "multiple of 8, got 12"),
      (dict(implementation="pallas_gpu", interpret=True, chunk_size=48), "power of two >= 16, got 48"),
  ])
  def test_bad_options(self, options, message):
    with pytest.raises(ValueError, match=message):
      gla.gated_linear_attention(**self._ok(), **options)
