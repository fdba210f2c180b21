"""Softmax self-attention with a selectable implementation.

  cpu_fused  dyngen's C++ kernel for XLA:CPU (`dyngen.cpu_kernels.attention`): each (batch, head)'s products
             and softmax on tiles that stay in cache, q, k, v read in place from the qkv projection, the
             backward recomputing probabilities from the saved logsumexp. float32; built for the host on
             first use. On CPU about 1.8x `dense`'s speed forward + backward, 1.4x forward alone
             (docs/cpu_kernels.md).
  dense      the (T, T) scores per head materialised, with a hand-written backward that reuses the
             saved exponentials (autodiff of the plain form re-derives the softmax Jacobian in more passes
             over (T, T) and transposes the scores between layouts). The fastest XLA form on CPU below
             `AUTO_CHUNK_MIN_TOKENS`; exact in float64 too.
  xla        `jax.nn.dot_product_attention` in its XLA form (materialises the (T, T) scores per head;
             softmax in float32, so float64 inputs go to `dense`).
  cudnn      the same call with cuDNN fused (flash) attention on NVIDIA GPUs (fp16/bf16 only).
  chunked    query-chunked attention: a `lax.scan` over query blocks, forward and backward, with a
             hand-written backward that recomputes each block's probabilities from the saved logsumexp,
             so only one (chunk, T) score block per head is alive. Runs on any backend; what to pick for
             long sequences where no fused kernel exists (XLA on CPU).
  pallas_tpu the Pallas flash-attention kernel shipped with JAX (TPU only).
  auto       pallas_tpu on TPU, cudnn on GPU for half precision; on CPU cpu_fused for float32 where the
             kernel builds, otherwise chunked from `AUTO_CHUNK_MIN_TOKENS` tokens and dense below; xla
             otherwise.
"""

import functools

import jax
import jax.numpy as jnp

from dyngen.cpu_kernels import attention as cpu_attention

IMPLEMENTATIONS = ("auto", "cpu_fused", "dense", "xla", "cudnn", "chunked", "pallas_tpu")
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
    if jnp.dtype(dtype) == jnp.float32 and cpu_attention.available():
      return "cpu_fused"
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


def _query_blocks(x, chunk):
  """(B, H, T, Dh) -> (T/chunk, B, H, chunk, Dh): the scan axis first."""
  batch, heads, length, head_dim = x.shape
  return x.reshape(batch, heads, length // chunk, chunk, head_dim).transpose(2, 0, 1, 3, 4)


def _from_query_blocks(x):
  """(T/chunk, B, H, chunk, Dh) -> (B, H, T, Dh)."""
  num_chunks, batch, heads, chunk, head_dim = x.shape
  return x.transpose(1, 2, 0, 3, 4).reshape(batch, heads, num_chunks * chunk, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_attention(q, k, v, chunk):
  """q, k, v: (B, H, T, Dh) with T a multiple of `chunk` -> (B, H, T, Dh), one query block at a time."""
  return _chunked_attention_forward(q, k, v, chunk)[0]


def _chunked_attention_forward(q, k, v, chunk):
  stats_dtype = jnp.promote_types(q.dtype, jnp.float32)
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

  def one_block(carry, q_block):
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k, preferred_element_type=stats_dtype)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    exps = jnp.exp(scores - row_max).astype(v.dtype)
    row_sum = jnp.sum(exps, axis=-1, keepdims=True, dtype=stats_dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", exps, v, preferred_element_type=stats_dtype) / row_sum
    return carry, (out.astype(q.dtype), row_max + jnp.log(row_sum))

  _, (out, log_sum_exp) = jax.lax.scan(one_block, None, _query_blocks(q, chunk))
  out = _from_query_blocks(out)
  return out, (q, k, v, out, log_sum_exp)


def _chunked_attention_backward(chunk, residuals, d_out):
  """The dense backward per query block, its probabilities recomputed as exp(scores − logsumexp) (one
  exp pass, no max or sum); dk and dv accumulate over blocks in the scan carry."""
  q, k, v, out, log_sum_exp = residuals
  stats_dtype = log_sum_exp.dtype
  delta = jnp.sum(d_out.astype(stats_dtype) * out.astype(stats_dtype), axis=-1, keepdims=True)

  def one_block(carry, block):
    dk, dv = carry
    q_block, d_out_block, log_sum_exp_block, delta_block = block
    scores = jnp.einsum("bhqd,bhkd->bhqk", q_block, k, preferred_element_type=stats_dtype)
    probs = jnp.exp(scores - log_sum_exp_block)
    dv = dv + jnp.einsum("bhqk,bhqd->bhkd", probs.astype(v.dtype), d_out_block, preferred_element_type=stats_dtype)
    dp = jnp.einsum("bhqd,bhkd->bhqk", d_out_block, v, preferred_element_type=stats_dtype)
    ds = (probs * (dp - delta_block)).astype(q.dtype)
    dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds, q_block, preferred_element_type=stats_dtype)
    return (dk, dv), jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=stats_dtype)

  zeros = jnp.zeros(k.shape, stats_dtype)
  blocks = (_query_blocks(q, chunk), _query_blocks(d_out.astype(v.dtype), chunk), log_sum_exp,
            _query_blocks(delta, chunk))
  (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros), blocks)
  dq = _from_query_blocks(dq) * (q.shape[-1] ** -0.5)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_chunked_attention.defvjp(_chunked_attention_forward, _chunked_attention_backward)


def chunked_attention(q, k, v, chunk_size):
  """Non-causal multi-head attention over query blocks of `chunk_size`: forward and backward keep one
  (B, H, chunk, T) score block alive. q, k, v: (B, T, H, Dh) -> (B, T, H, Dh).

  The queries are zero-padded to a multiple of the block; padded rows get a zero cotangent, so they add
  nothing to dk and dv.
  """
  length = q.shape[1]
  chunk = min(chunk_size, length)
  q = jnp.pad(q, ((0, 0), (0, -length % chunk), (0, 0), (0, 0)))
  out = _chunked_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), chunk)
  return out.swapaxes(1, 2)[:, :length]


def _pallas_tpu_attention(q, k, v):
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only import.
  head_dim = q.shape[-1]
  out = tpu_flash.flash_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), sm_scale=head_dim ** -0.5)
  return out.swapaxes(1, 2)


def self_attention(qkv, implementation="auto", chunk_size=1024):
  """Non-causal multi-head attention on a fused projection's output. qkv: (B, T, 3, H, Dh) -> (B, T, H, Dh).

  The form the models call: `cpu_fused` reads it in place, the others take its three slices.
  """
  implementation = resolve_implementation(implementation, qkv.shape[1], qkv.dtype)
  if implementation == "cpu_fused":
    return cpu_attention.fused_attention(qkv)
  return dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation, chunk_size)


def dot_product_attention(q, k, v, implementation="auto", chunk_size=1024):
  """Non-causal multi-head attention. q, k, v: (B, T, H, Dh) -> (B, T, H, Dh)."""
  implementation = resolve_implementation(implementation, q.shape[1], q.dtype)
  if implementation == "cpu_fused":
    return cpu_attention.fused_attention(jnp.stack([q, k, v], axis=2))
  if q.dtype == jnp.float64 and implementation == "xla":  # jax.nn takes its softmax in float32.
    implementation = "dense"
  if implementation == "dense":
    return dense_attention(q, k, v)
  if implementation == "chunked":
    return chunked_attention(q, k, v, chunk_size)
  if implementation == "pallas_tpu":
    return _pallas_tpu_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
