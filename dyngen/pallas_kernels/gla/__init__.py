"""Gated linear attention (GLA): one public function, several implementations.

  reference   token-by-token `lax.scan` recurrence differentiated by autodiff (reference.py): the
              specification; exact in float64; stores every state in the backward. For tests.
  recurrent   the same scan with a custom VJP that saves only the inputs (recurrent.py): the fastest form
              on CPU (fewest exps), 2.5-7x faster than chunked forward+backward there.
  chunked     pure-JAX chunked form with a recompute-in-backward custom VJP (chunked.py): matmul-shaped,
              any backend; the portable form for accelerators.
  pallas_tpu  Mosaic TPU kernels (pallas_tpu.py); on CPU with interpret=True.
  pallas_gpu  Triton GPU kernels (pallas_gpu.py); on CPU with interpret=True.
  auto        pallas_tpu on TPU, pallas_gpu on GPU, recurrent on CPU.
"""

import jax

from dyngen.pallas_kernels.gla import layout
from dyngen.pallas_kernels.gla.chunked import gated_linear_attention_chunked
from dyngen.pallas_kernels.gla.pallas_gpu import gated_linear_attention_pallas_gpu
from dyngen.pallas_kernels.gla.pallas_tpu import gated_linear_attention_pallas_tpu
from dyngen.pallas_kernels.gla.recurrent import gated_linear_attention_recurrent
from dyngen.pallas_kernels.gla.reference import gated_linear_attention_reference

IMPLEMENTATIONS = layout.IMPLEMENTATIONS
_AUTO = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cpu": "recurrent"}
_KERNEL_BACKEND = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def resolve_implementation(implementation, backend=None):
  """Maps "auto" to the implementation for `backend` (default: jax.default_backend())."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  return _AUTO.get(backend or jax.default_backend(), "chunked")


def gated_linear_attention(q, k, v, log_alpha, *, scale=None, chunk_size=64, reverse=False,
                           implementation="auto", interpret=False):
  """Causal (or, with reverse=True, anti-causal) gated linear attention.

  S_t = diag(exp(log_alpha_t)) S_{t-1} + k_t^T v_t,  o_t = (scale * q_t) S_t,  S is (Dk, Dv) per head.

  Args:
    q, k: (B, T, H, Dk). v: (B, T, H, Dv). log_alpha: (B, T, H, Dk), log of the per-key-dim decay (<= 0).
    scale: query scale, default Dk ** -0.5.
    chunk_size: tokens per chunk of the chunked and Pallas forms (unused by reference and recurrent);
      any T is padded internally.
      pallas_tpu needs a multiple of 8, pallas_gpu a power of two >= 16.
    reverse: run the recurrence from t = T-1 down to 0 (o_t sees tokens t..T-1).
    implementation: one of IMPLEMENTATIONS.
    interpret: run the Pallas kernels in interpret mode: True, or a `pltpu.InterpretParams()` for
      pallas_tpu (simulates TPU memory and can detect races). Needed on a backend the kernel is not for.
  Returns:
    o: (B, T, H, Dv) in q.dtype. Gate sums are float32 whatever the input dtype (float64 in the
    reference, recurrent and chunked forms for float64 inputs).
  """
  layout.check_inputs(q, k, v, log_alpha, chunk_size, implementation)
  implementation = resolve_implementation(implementation)
  kernel_backend = _KERNEL_BACKEND.get(implementation)
  if kernel_backend and not interpret and jax.default_backend() != kernel_backend:
    raise ValueError(f"implementation={implementation!r} compiles for {kernel_backend.upper()} but the "
                     f"backend is {jax.default_backend()!r}: pass interpret=True, or use 'chunked'")
  if implementation == "reference":
    return gated_linear_attention_reference(q, k, v, log_alpha, scale=scale, reverse=reverse)
  if implementation == "recurrent":
    return gated_linear_attention_recurrent(q, k, v, log_alpha, scale=scale, reverse=reverse)
  if implementation == "chunked":
    return gated_linear_attention_chunked(q, k, v, log_alpha, scale=scale, chunk_size=chunk_size,
                                          reverse=reverse)
  kernel = gated_linear_attention_pallas_tpu if implementation == "pallas_tpu" else gated_linear_attention_pallas_gpu
  return kernel(q, k, v, log_alpha, scale=scale, chunk_size=chunk_size, reverse=reverse, interpret=interpret)
