"""Softmax self-attention with a selectable implementation.

  dense      the (T, T) scores per head materialised, with a hand-written backward that reuses the
             saved exponentials (autodiff of the plain form re-derives the softmax Jacobian in more passes
             over (T, T) and transposes the scores between layouts). The fastest form on XLA:CPU below
             `AUTO_CHUNK_MIN_TOKENS`; exact in float64 too.
  xla        `jax.nn.dot_product_attention` in its XLA form (materialises the (T, T) scores per head;
             softmax in float32, so float64 inputs go to `dense`).
  cudnn      the same call with cuDNN fused (flash) attention on NVIDIA GPUs (fp16/bf16 only).
  chunked    query-chunked attention: a `lax.scan` over query blocks whose body is rematerialised, so
             forward and backward keep one (chunk, T) score block per head alive. Runs on any backend;
             what to pick for long sequences where no fused kernel exists (XLA on CPU).
  pallas_tpu the Pallas flash-attention kernel shipped with JAX (TPU only).
  auto       pallas_tpu on TPU, cudnn on GPU for half precision; on CPU chunked from
             `AUTO_CHUNK_MIN_TOKENS` tokens, dense below; xla otherwise.
"""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "dense", "xla", "cudnn", "chunked", "pallas_tpu")
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
  if backend == "cpu":
    return "chunked" if num_tokens >= AUTO_CHUNK_MIN_TOKENS else "dense"
  return "xla"


@jax.custom_vjp
def _dense_attention(q, k, v):
  """q, k, v: (B, H, T, Dh) -> (B, H, T, Dh); softmax statistics in at least fp32."""
  return _dense_attention_forward(q, k, v)[0]


def _dense_attention_forward(q, k, v):
  stats_dtype = jnp.promote_types(q.dtype, jnp.float32)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)  # Scaling q, not the scores: T/Dh times fewer products.
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=stats_dtype)
  # Unnormalised exponentials; the 1/sum is applied to the (T, Dh) output instead of the (T, T) probabilities.
  exps = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).astype(v.dtype)
  inv_sum = 1 / jnp.sum(exps, axis=-1, keepdims=True, dtype=stats_dtype)
  out = (jnp.einsum("bhqk,bhkd->bhqd", exps, v, preferred_element_type=stats_dtype) * inv_sum).astype(q.dtype)
  return out, (q, k, v, exps, inv_sum, out)


def _dense_attention_backward(residuals, d_out):
  """With p = exps * inv_sum: dv = pᵀ do, ds = p ⊙ (do vᵀ − rowsum(do ⊙ out)), dq = ds k, dk = dsᵀ q.

  Folding inv_sum into do (a (T, Dh) product) gives the same p-weighted terms from the saved exps, and
  rowsum(do ⊙ out) replaces rowsum(p ⊙ dp): a pass over (T, Dh) instead of (T, T).
  """
  q, k, v, exps, inv_sum, out = residuals
  stats_dtype = inv_sum.dtype
  d_out = d_out.astype(stats_dtype) * inv_sum
  dv = jnp.einsum("bhqk,bhqd->bhkd", exps, d_out.astype(v.dtype), preferred_element_type=stats_dtype)
  dp = jnp.einsum("bhqd,bhkd->bhqk", d_out.astype(v.dtype), v, preferred_element_type=stats_dtype)
  delta = jnp.sum(d_out * out.astype(stats_dtype), axis=-1, keepdims=True)
  ds = (exps.astype(stats_dtype) * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=stats_dtype) * (q.shape[-1] ** -0.5)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=stats_dtype)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_dense_attention.defvjp(_dense_attention_forward, _dense_attention_backward)


def dense_attention(q, k, v):
  """Non-causal multi-head attention with all scores materialised. q, k, v: (B, T, H, Dh) -> (B, T, H, Dh)."""
  out = _dense_attention(*(a.swapaxes(1, 2) for a in (q, k, v)))
  return out.swapaxes(1, 2)


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
  if q.dtype == jnp.float64 and implementation == "xla":  # jax.nn takes its softmax in float32.
    implementation = "dense"
  if implementation == "dense":
    return dense_attention(q, k, v)
  if implementation == "chunked":
    return _chunked_attention(q, k, v, chunk_size)
  if implementation == "pallas_tpu":
    return _pallas_tpu_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
