"""dyngen.cpu_kernels: the fused CPU attention kernel against a float64 numpy reference, and its build.

Error norm: max|actual - expected| / max|expected| over the whole array. float32 results must agree to 1e-5:
the kernel's sums over T keys and Dh channels round at about 1e-7 per term and its exp is accurate to about
2 ulp (measured: 4e-7 to 1.4e-6 over these cases, up to 1,100 tokens and scores of ±400).
"""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngen.cpu_kernels import attention as cpu_attention
from dyngen.cpu_kernels import build
from dyngen.models import attention

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def _relative_error(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def reference(qkv, d_out):
  """float64 (out, d_qkv) of softmax(q kᵀ / √Dh) v, the gradient derived by hand. qkv: (B, T, 3, H, Dh)."""
  q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # (B, H, T, Dh)
  scale = q.shape[-1] ** -0.5
  scores = np.einsum("bhqd,bhkd->bhqk", q, k) * scale
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bhkd->bhqd", probs, v)
  g = np.moveaxis(d_out, 2, 1)
  dv = np.einsum("bhqk,bhqd->bhkd", probs, g)
  dp = np.einsum("bhqd,bhkd->bhqk", g, v)
  ds = probs * (dp - np.sum(dp * probs, -1, keepdims=True)) * scale
  dq = np.einsum("bhqk,bhkd->bhqd", ds, k)
  dk = np.einsum("bhqk,bhqd->bhkd", ds, q)
  d_qkv = np.stack([np.moveaxis(x, 1, 2) for x in (dq, dk, dv)], axis=2)
  return np.moveaxis(out, 1, 2), d_qkv


def _case(seed, shape, spread=1.0):
  rng = np.random.default_rng(seed)
  qkv = spread * rng.standard_normal(shape)
  d_out = rng.standard_normal((*shape[:2], *shape[3:]))
  return qkv, d_out


def _kernel(qkv, d_out):
  out, vjp = jax.vjp(jax.jit(cpu_attention.fused_attention), jnp.asarray(qkv, jnp.float32))
  return out, vjp(jnp.asarray(d_out, jnp.float32))[0]


class TestFusedAttention:

  @pytest.mark.parametrize("shape", [
      (2, 256, 3, 6, 64),   # DiT-S/2 and DiT-B/2 heads at 256 tokens
      (1, 256, 3, 2, 72),   # DiT-XL/2's head size: not a multiple of the 16- or 32-column tiles
      (3, 37, 3, 3, 16),    # rows and columns that fill no tile
      (2, 1, 3, 2, 8),      # one token: the softmax is exactly 1
  ])
  def test_value_and_gradient_against_float64(self, shape):
    qkv, d_out = _case(0, shape)
    out, d_qkv = _kernel(qkv, d_out)
    want_out, want_d_qkv = reference(qkv, d_out)
    assert out.dtype == d_qkv.dtype == jnp.float32 and d_qkv.shape == shape
    assert _relative_error(out, want_out) < TOLERANCE
    assert _relative_error(d_qkv, want_d_qkv) < TOLERANCE

  def test_several_query_blocks(self):
    # 1100 tokens: the block holds 262144 / 1100 = 238 query rows, so dk and dv sum over 5 blocks, the last
    # one partial.
    qkv, d_out = _case(1, (1, 1100, 3, 1, 16))
    out, d_qkv = _kernel(qkv, d_out)
    want_out, want_d_qkv = reference(qkv, d_out)
    assert _relative_error(out, want_out) < TOLERANCE
    assert _relative_error(d_qkv, want_d_qkv) < TOLERANCE

  def test_large_scores(self):
    # Scores up to ~±400: exp of unshifted scores overflows float32, and most probabilities underflow to 0.
    qkv, d_out = _case(2, (2, 40, 3, 2, 16), spread=5.0)
    out, d_qkv = _kernel(qkv, d_out)
    want_out, want_d_qkv = reference(qkv, d_out)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(d_qkv))
    assert _relative_error(out, want_out) < TOLERANCE
    assert _relative_error(d_qkv, want_d_qkv) < TOLERANCE

  def test_nan_stays_in_its_head(self):
    qkv, d_out = _case(3, (2, 16, 3, 2, 8))
    qkv[1, 5, 1, 0, 3] = np.nan  # one key entry of batch 1, head 0
    out, d_qkv = _kernel(qkv, d_out)
    assert np.all(np.isnan(out[1, :, 0])) and np.all(np.isfinite(out[1, :, 1])) and np.all(np.isfinite(out[0]))
    assert np.all(np.isfinite(d_qkv[0]))

  def test_repeated_calls_are_bit_identical(self):
    # Each (batch, head) is one thread's from start to end and writes only its own outputs, so which thread
    # runs it cannot change a bit; a race between threads would.
    qkv, d_out = _case(4, (4, 64, 3, 4, 32))
    first = _kernel(qkv, d_out)
    for _ in range(3):
      again = _kernel(qkv, d_out)
      for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)

  def test_vmap_and_leading_batch_dimensions(self):
    qkv, d_out = _case(5, (6, 20, 3, 2, 16))
    want_out, want_d_qkv = reference(qkv, d_out)
    stacked = jnp.asarray(qkv.reshape(2, 3, 20, 3, 2, 16), jnp.float32)
    mapped = jax.vmap(cpu_attention.fused_attention)(stacked)
    assert _relative_error(mapped.reshape(6, 20, 2, 16), want_out) < TOLERANCE
    grad = jax.grad(lambda x: jnp.sum(cpu_attention.fused_attention(x) * d_out.reshape(2, 3, 20, 2, 16)))(stacked)
    assert _relative_error(grad.reshape(qkv.shape), want_d_qkv) < TOLERANCE

  def test_the_model_entry_point_matches_dense(self):
    qkv, d_out = _case(6, (2, 24, 3, 3, 16))
    qkv = jnp.asarray(qkv, jnp.float32)

    def loss(implementation, qkv):
      return jnp.sum(attention.self_attention(qkv, implementation) * d_out)

    for implementation in ("cpu_fused", "dense"):
      value, grad = jax.value_and_grad(lambda x: loss(implementation, x))(qkv)
      assert abs(value - loss("dense", qkv)) < 1e-4
      want = jax.grad(lambda x: loss("dense", x))(qkv)
      assert _relative_error(grad, want) < TOLERANCE

  def test_bad_inputs_are_refused(self):
    with pytest.raises(ValueError, match=r"qkv of shape \(\.\.\., T, 3, H, Dh\)"):
      cpu_attention.fused_attention(jnp.zeros((2, 8, 2, 4, 8)))
    with pytest.raises(ValueError, match="computes in float32, got bfloat16"):
      cpu_attention.fused_attention(jnp.zeros((2, 8, 3, 4, 8), jnp.bfloat16))


def test_auto_picks_the_kernel_for_float32_on_cpu_and_falls_back(monkeypatch):
  assert attention.resolve_implementation("auto", 256, jnp.float32, "cpu") == "cpu_fused"
  assert attention.resolve_implementation("auto", 256, jnp.float64, "cpu") == "dense"
  monkeypatch.setattr(cpu_attention, "available", lambda: False)
  assert attention.resolve_implementation("auto", 256, jnp.float32, "cpu") == "dense"
  assert attention.resolve_implementation("auto", 4096, jnp.float32, "cpu") == "chunked"


def test_the_build_is_cached_per_host(tmp_path, monkeypatch):
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
  path = build.library_path("attention")
  assert path.parent == tmp_path / "cpu_kernels" and path.name.startswith("attention-")
  built = path.stat().st_mtime_ns
  assert build.library_path("attention") == path and path.stat().st_mtime_ns == built
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_a_host_that_cannot_build_gets_the_reason_and_xla(tmp_path):
  # A fresh process with an empty cache and no compiler: building fails with the reason, `auto` falls back to
  # the XLA forms and says so once, and the model still runs.
  script = (
      "import jax.numpy as jnp\n"
      "from dyngen.cpu_kernels import attention as cpu_attention, build\n"
      "from dyngen.models import attention\n"
      "try:\n"
      "  cpu_attention.ensure_loaded()\n"
      "except build.BuildError as e:\n"
      "  print('REASON', e)\n"
      "print('AUTO', attention.resolve_implementation('auto', 256, jnp.float32, 'cpu'))\n"
      "print('OUT', attention.self_attention(jnp.ones((1, 4, 3, 2, 8))).shape)\n")
  env = os.environ | {build.CACHE_ENV: str(tmp_path), "CXX": "no-such-compiler", "PATH": "/nonexistent",
                      "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "REASON no C++ compiler: neither $CXX (no-such-compiler) nor c++ is on PATH" in result.stdout
  assert "AUTO dense" in result.stdout and "OUT (1, 4, 2, 8)" in result.stdout
  assert "fused CPU attention is unavailable, so CPU attention falls back to XLA" in result.stderr


def test_a_failing_compiler_is_reported_with_its_output(tmp_path, monkeypatch):
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'internal compiler error: sorry' >&2\nexit 1\n")
  compiler.chmod(0o755)
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(compiler))
  with pytest.raises(build.BuildError, match=r"(?s)compiling attention\.cc failed.*internal compiler error: sorry"):
    build.library_path("attention")
  assert list((tmp_path / "cache" / "cpu_kernels").iterdir()) == []  # nothing half-written stays
