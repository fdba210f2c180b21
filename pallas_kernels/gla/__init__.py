"""Gated linear attention (GLA): one public function, several implementations.

  reference   token-by-token `lax.scan` recurrence; exact in float64; for tests.
  chunked     pure-JAX chunked form with a recompute-in-backward custom VJP; any backend.
  auto        chunked on every backend for now.
"""

import jax

from pallas_kernels.gla import layout
from pallas_kernels.gla.chunked import gated_linear_attention_chunked
from pallas_kernels.gla.reference import gated_linear_attention_reference

IMPLEMENTATIONS = layout.IMPLEMENTATIONS


def resolve_implementation(implementation, backend=None):
  """Maps "auto" to the implementation for `backend` (default: jax.default_backend())."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  return "chunked"


def gated_linear_attention(q, k, v, log_alpha, *, scale=None, chunk_size=64, reverse=False,
                           implementation="auto", interpret=False):
  """Causal (or, with reverse=True, anti-causal) gated linear attention.

  S_t = diag(exp(log_alpha_t)) S_{t-1} + k_t^T v_t,  o_t = (scale * q_t) S_t,  S is (Dk, Dv) per head.

  Args:
    q, k: (B, T, H, Dk). v: (B, T, H, Dv). log_alpha: (B, T, H, Dk), log of the per-key-dim decay (<= 0).
    scale: query scale, default Dk ** -0.5.
    chunk_size: tokens per chunk of the chunked and Pallas forms (any T is padded internally).
    reverse: run the recurrence from t = T-1 down to 0.
    implementation: one of IMPLEMENTATIONS.
    interpret: run Pallas kernels in interpret mode (True, or a `pltpu.InterpretParams`), e.g. on CPU.
  Returns:
    o: (B, T, H, Dv) in q.dtype.
  """
  layout.check_inputs(q, k, v, log_alpha, chunk_size, implementation)
  implementation = resolve_implementation(implementation)
  if implementation == "reference":
    return gated_linear_attention_reference(q, k, v, log_alpha, scale=scale, reverse=reverse)
  return gated_linear_attention_chunked(q, k, v, log_alpha, scale=scale, chunk_size=chunk_size,
                                        reverse=reverse)
