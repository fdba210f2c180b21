"""Softmax self-attention with a selectable implementation.

  xla        `jax.nn.dot_product_attention` in its XLA form (materialises the (T, T) scores per head).
  cudnn      the same call with cuDNN fused (flash) attention on NVIDIA GPUs (fp16/bf16 only).
  chunked    query-chunked attention: a `lax.scan` over query blocks whose body is rematerialised, so
             forward and backward keep one (chunk, T) score block per head alive. Runs on any backend;
             what to pick for long sequences where no fused kernel exists (XLA on CPU).
  pallas_tpu the Pallas flash-attention kernel shipped with JAX (TPU only).
  auto       pallas_tpu on TPU, cudnn on GPU for half precision, chunked on CPU beyond
             `AUTO_CHUNK_MIN_TOKENS` tokens, xla otherwise.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "pallas_tpu")
# Above this many tokens the (T, T) score matrices dominate memory on CPU (several are live per layer).
AUTO_CHUNK_MIN_TOKENS = 2048


def resolve_implementation(implementation, num_tokens, dtype, backend=None):
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if backend == "tpu" and num_tokens % 128 == 0:
    return "pallas_tpu"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  if backend == "cpu" and num_tokens >= AUTO_CHUNK_MIN_TOKENS:
    return "chunked"
  return "xla"


def _chunked_attention(q, k, v, chunk_size):
  """q, k, v: (B, T, H, Dh) -> (B, T, H, Dh); softmax in at least fp32, one query block at a time."""
  batch, length, heads, head_dim = q.shape
  chunk = min(chunk_size, length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) * (head_dim ** -0.5)
  q_blocks = q.reshape(batch, num_chunks, chunk, heads, head_dim).swapaxes(0, 1)

  stats_dtype = jnp.promote_types(q.dtype, jnp.float32)

  @jax.checkpoint
  def one_block(q_block):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_block, k, preferred_element_type=stats_dtype)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, preferred_element_type=stats_dtype).astype(q.dtype)

  _, out = jax.lax.scan(lambda carry, qb: (carry, one_block(qb)), None, q_blocks)
  out = out.swapaxes(0, 1).reshape(batch, num_chunks * chunk, heads, head_dim)
  return out[:, :length]


def _pallas_tpu_attention(q, k, v):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only import.
  head_dim = q.shape[-1]
  out = tpu_flash.flash_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), sm_scale=head_dim ** -0.5)
  return out.swapaxes(1, 2)


def dot_product_attention(q, k, v, implementation="auto", chunk_size=1024):
  """Non-causal multi-head attention. q, k, v: (B, T, H, Dh) -> (B, T, H, Dh)."""
  implementation = resolve_implementation(implementation, q.shape[1], q.dtype)
  if q.dtype == jnp.float64:  # jax.nn.dot_product_attention takes its softmax in float32.
    implementation = "chunked"
  if implementation == "chunked":
    return _chunked_attention(q, k, v, chunk_size)
  if implementation == "pallas_tpu":
    return _pallas_tpu_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
