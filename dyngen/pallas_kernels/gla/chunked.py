"""Chunked gated linear attention in pure JAX: the portable fast path, with a memory-lean custom VJP.

The sequence is cut into chunks of C tokens. A `lax.scan` carries the (Dk, Dv) state across chunks; inside a
chunk the output is the state seen through the decay plus a (C, C) intra-chunk attention:

  o_t = (q_t * exp(b_t)) S_in + sum_{s <= t} [sum_d q_td k_sd exp(b_td - b_sd)] v_s,
  S_out = exp(b_C) * S_in + sum_s (k_s * exp(b_C - b_s))^T v_s,   b = gate cumsum from the chunk start.

Numerics (DESIGN.md, "Chunked GLA numerics"). Gate sums are taken in float32 (float64 for float64 inputs)
and only over the exact token interval a decay spans, never as a difference of two prefix sums: a
difference b_t - b_s cancels any huge gate before s and keeps only its rounding error, which exp turns into
a relative error of the whole term. Every exponent is a sum of gates <= 0, so every factor is in [0, 1] and
nothing overflows; masked entries get -inf as the exponent (exp gives exactly 0), never `where(mask, exp, 0)`.

The intra-chunk attention is split into sub-chunks of c <= 8 tokens (fla's secondary chunking). Between
sub-chunks the decay factorises through the start of the query sub-chunk,
exp(b_t - b_s) = exp(within_t) * exp(after_s + gap), with both factors <= 1, so those blocks are matmuls;
only the c x c diagonal blocks form their decays element by element, (c, c, Dk) per sub-chunk.

Memory: the VJP saves only the inputs. The backward recomputes chunk by chunk: one scan in processing order
rebuilds the states for the inter-chunk part of dq, one scan against it carries dS for dk, dv (and the rest
of dq). Nothing of size (T, T), or (C, C, Dk) for all chunks at once, is ever live, so memory grows
linearly in T. The gate gradient uses d(cumsum) = q * dq - k * dk, reverse-cumsummed along time.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dyngen.pallas_kernels.gla import layout

# Gate sums must not be rounded to bf16/TF32 by a backend's default matmul precision.
_EXACT = jax.lax.Precision.HIGHEST


class ChunkDecays(NamedTuple):
  """Gate sums of one chunk, all (..., C, Dk) but total (..., Dk); entries <= 0."""
  prefix: jax.Array  # sum over [chunk start, t]
  suffix: jax.Array  # sum over (t, chunk end]
  total: jax.Array  # sum over the chunk


class SubChunkDecays(NamedTuple):
  """Gate sums between sub-chunks of c tokens, n = C / c of them."""
  within: jax.Array  # (..., n, c, Dk): sum over [sub-chunk start, t]
  after: jax.Array  # (..., n, c, Dk): sum over (s, sub-chunk end]
  gap: jax.Array  # (..., n, n, Dk): gap[i, j] = sum over the sub-chunks strictly between j and i
  segment: jax.Array  # (..., n, c, c, Dk): segment[i, t, s] = sum over (s, t] inside sub-chunk i


def _exclusive_reverse_cumsum(x, axis):
  """sum over (t, end] along `axis`, as a shift of the inclusive sum (no subtraction)."""
  inclusive = jax.lax.cumsum(x, axis=axis % x.ndim, reverse=True)
  shifted = jax.lax.slice_in_dim(inclusive, 1, x.shape[axis], axis=axis % x.ndim)
  return jnp.concatenate([shifted, jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis % x.ndim))],
                         axis=axis)


def chunk_decays(g):
  """g: (..., C, Dk) gates of one chunk in processing order."""
  prefix = jax.lax.cumsum(g, axis=g.ndim - 2)
  return ChunkDecays(prefix, _exclusive_reverse_cumsum(g, -2), prefix[..., -1, :])


def sub_chunk_decays(g, sub):
  """g: (..., C, Dk) -> SubChunkDecays for sub-chunks of `sub` tokens."""
  *lead, chunk, key_dim = g.shape
  n = chunk // sub
  blocks = g.reshape(*lead, n, sub, key_dim)
  within = jax.lax.cumsum(blocks, axis=blocks.ndim - 2)
  block_total = within[..., -1, :]  # (..., n, Dk)
  i, j, m = np.ogrid[:n, :n, :n]
  strictly_between = ((j < m) & (m < i)).astype(g.dtype)  # (i, j, m)
  gap = jnp.einsum("ijm,...md->...ijd", strictly_between, block_total, precision=_EXACT)
  # segment[t, s] = cumsum over u <= t of g_u [u > s]: gates at or before s never enter the sum.
  after_s = (np.arange(sub)[:, None] > np.arange(sub)[None, :])[:, :, None]  # (u, s, 1)
  masked = jnp.where(after_s, blocks[..., :, None, :], 0.0)  # (..., n, u, s, Dk)
  segment = jax.lax.cumsum(masked, axis=masked.ndim - 3)
  return SubChunkDecays(within, _exclusive_reverse_cumsum(blocks, -2), gap, segment)


class IntraChunkDecays(NamedTuple):
  """The exp factors of a chunk's intra-chunk attention, each in [0, 1]."""
  query: jax.Array  # (..., n, c, Dk): from the start of the query's sub-chunk to t
  key: jax.Array  # (..., n_i, n_j, c, Dk): from key s in sub-chunk j to the start of sub-chunk i; 0 if j >= i
  diag: jax.Array  # (..., n, c, c, Dk): over (s, t] inside one sub-chunk; 0 for s > t


def intra_chunk_decays(decays):
  """SubChunkDecays -> IntraChunkDecays."""
  n, sub = decays.within.shape[-3:-1]
  earlier = (np.arange(n)[None, :] < np.arange(n)[:, None])[:, :, None, None]  # (i, j, 1, 1)
  key_to_query_block = decays.after[..., None, :, :, :] + decays.gap[..., :, :, None, :]  # (..., i, j, c, Dk)
  causal = (np.arange(sub)[None, :] <= np.arange(sub)[:, None])[:, :, None]  # (t, s, 1)
  # Masked exponents are -inf, so exp gives exactly 0 and never overflows.
  return IntraChunkDecays(jnp.exp(decays.within),
                          jnp.exp(jnp.where(earlier, key_to_query_block, -jnp.inf)),
                          jnp.exp(jnp.where(causal, decays.segment, -jnp.inf)))


def _split(x, n):
  """(..., C, D) -> (..., n, C / n, D)."""
  return x.reshape(*x.shape[:-2], n, x.shape[-2] // n, x.shape[-1])


def intra_chunk_scores(q, k, decays):
  """q, k: (..., C, Dk), decays: IntraChunkDecays -> scores (..., C, C).

  scores[t, s] = sum_d q_td k_sd exp(sum of g_d over (s, t]) for s <= t, and 0 above the diagonal.
  """
  *lead, chunk, _ = q.shape
  n = decays.query.shape[-3]
  q_blocks, k_blocks = _split(q, n), _split(k, n)
  # Key sub-chunk j before query sub-chunk i: both factors meet at the start of i, so a matmul.
  k_off = k_blocks[..., None, :, :, :] * decays.key  # (..., i, j, c, Dk)
  scores = jnp.einsum("...itd,...ijsd->...itjs", q_blocks * decays.query, k_off)  # (..., n, c, n, c)
  diag = jnp.sum(q_blocks[..., :, None, :] * k_blocks[..., None, :, :] * decays.diag, axis=-1)
  scores = scores + diag[..., :, :, None, :] * np.eye(n, dtype=q.dtype)[:, None, :, None]
  return scores.reshape(*lead, chunk, chunk)


def intra_chunk_scores_vjp(d_scores, q, k, decays):
  """The transpose of intra_chunk_scores in (q, k): d_scores (..., C, C) -> (dq, dk), each (..., C, Dk)."""
  n = decays.query.shape[-3]
  q_blocks, k_blocks = _split(q, n), _split(k, n)
  d_blocks = d_scores.reshape(*d_scores.shape[:-2], n, q_blocks.shape[-2], n, q_blocks.shape[-2])
  k_off = k_blocks[..., None, :, :, :] * decays.key
  dq = decays.query * jnp.einsum("...itjs,...ijsd->...itd", d_blocks, k_off)
  dk = jnp.sum(decays.key * jnp.einsum("...itjs,...itd->...ijsd", d_blocks, q_blocks * decays.query), axis=-4)
  d_diag = jnp.moveaxis(jnp.diagonal(d_blocks, axis1=-4, axis2=-2), -1, -3)  # (..., n, t, s)
  weighted = d_diag[..., None] * decays.diag  # (..., n, t, s, Dk)
  dq = dq + jnp.sum(weighted * k_blocks[..., None, :, :], axis=-2)
  dk = dk + jnp.sum(weighted * q_blocks[..., :, None, :], axis=-3)
  return dq.reshape(q.shape), dk.reshape(k.shape)


def _in_processing_order(x, reverse):
  """Anti-causal chunks are processed back to front: flip one chunk's time axis (-2), not the sequence."""
  return x[..., ::-1, :] if reverse else x


def _forward(q, k, v, log_alpha, scale, chunk_size, reverse):
  dtype = layout.compute_dtype(q, k, v, log_alpha)
  sub = layout.sub_chunk_size(chunk_size)
  q_c, k_c, v_c, g_c = (layout.to_chunks(x, chunk_size, dtype) for x in (q, k, v, log_alpha))
  q_c = q_c * scale
  g_c = jnp.maximum(g_c, layout.LOG_DECAY_FLOOR)

  def step(state, chunk):
    q, k, v, g = (_in_processing_order(x, reverse) for x in chunk)
    decays = chunk_decays(g)
    scores = intra_chunk_scores(q, k, intra_chunk_decays(sub_chunk_decays(g, sub)))
    o = (jnp.einsum("...tk,...kv->...tv", q * jnp.exp(decays.prefix), state)
         + jnp.einsum("...ts,...sv->...tv", scores, v))
    return _next_state(state, k, v, decays), _in_processing_order(o, reverse)

  batch, _, heads, key_dim = q.shape
  state = jnp.zeros((batch, heads, key_dim, v.shape[-1]), dtype)
  _, o = jax.lax.scan(step, state, (q_c, k_c, v_c, g_c), reverse=reverse)
  return layout.from_chunks(o, q.shape[1], q.dtype)


def _next_state(state, k, v, decays):
  """state: (..., Dk, Dv) entering the chunk -> the state leaving it."""
  return (jnp.exp(decays.total)[..., :, None] * state
          + jnp.einsum("...sk,...sv->...kv", k * jnp.exp(decays.suffix), v))


def _backward(scale, chunk_size, reverse, residuals, d_o):
  q, k, v, log_alpha = residuals
  dtype = layout.compute_dtype(q, k, v, log_alpha)
  sub = layout.sub_chunk_size(chunk_size)
  q_c, k_c, v_c, g_c, do_c = (layout.to_chunks(x, chunk_size, dtype) for x in (q, k, v, log_alpha, d_o))
  q_c = q_c * scale
  g_c = jnp.maximum(g_c, layout.LOG_DECAY_FLOOR)
  batch, _, heads, key_dim = q.shape
  state_shape = (batch, heads, key_dim, v.shape[-1])

  # Pass 1, in processing order: rebuild the state entering each chunk for dq's inter-chunk term.
  def state_step(state, chunk):
    k, v, g, do = (_in_processing_order(x, reverse) for x in chunk)
    decays = chunk_decays(g)
    dq_inter = jnp.exp(decays.prefix) * jnp.einsum("...tv,...kv->...tk", do, state)
    return _next_state(state, k, v, decays), _in_processing_order(dq_inter, reverse)

  _, dq_inter_c = jax.lax.scan(state_step, jnp.zeros(state_shape, dtype), (k_c, v_c, g_c, do_c),
                               reverse=reverse)

  # Pass 2, against processing order: carry dS (gradient of the state leaving a chunk) and the gate
  # gradient summed over all later tokens.
  def grad_step(carry, chunk):
    d_state, dg_later = carry
    q, k, v, g, do, dq_inter = (_in_processing_order(x, reverse) for x in chunk)
    decays = chunk_decays(g)
    intra_decays = intra_chunk_decays(sub_chunk_decays(g, sub))
    scores = intra_chunk_scores(q, k, intra_decays)
    dq, dk = intra_chunk_scores_vjp(jnp.einsum("...tv,...sv->...ts", do, v), q, k, intra_decays)
    dq = dq + dq_inter
    key_decay = jnp.exp(decays.suffix)
    dk = dk + key_decay * jnp.einsum("...sv,...kv->...sk", v, d_state)
    dv = (jnp.einsum("...ts,...tv->...sv", scores, do)
          + jnp.einsum("...sk,...kv->...sv", k * key_decay, d_state))
    d_state_in = (jnp.einsum("...tk,...tv->...kv", q * jnp.exp(decays.prefix), do)
                  + jnp.exp(decays.total)[..., :, None] * d_state)
    # d loss / d prefix_t = q_t dq_t - k_t dk_t; g_t enters every prefix from t on.
    dg = jax.lax.cumsum(q * dq - k * dk, axis=q.ndim - 2, reverse=True) + dg_later[..., None, :]
    grads = tuple(_in_processing_order(x, reverse) for x in (dq, dk, dv, dg))
    return (d_state_in, dg[..., 0, :]), grads

  carry = (jnp.zeros(state_shape, dtype), jnp.zeros((batch, heads, key_dim), dtype))
  _, (dq_c, dk_c, dv_c, dg_c) = jax.lax.scan(
      grad_step, carry, (q_c, k_c, v_c, g_c, do_c, dq_inter_c), reverse=not reverse)
  length = q.shape[1]
  return (layout.from_chunks(dq_c * scale, length, q.dtype), layout.from_chunks(dk_c, length, k.dtype),
          layout.from_chunks(dv_c, length, v.dtype), layout.from_chunks(dg_c, length, log_alpha.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_gla(q, k, v, log_alpha, scale, chunk_size, reverse):
  return _forward(q, k, v, log_alpha, scale, chunk_size, reverse)


def _chunked_gla_fwd(q, k, v, log_alpha, scale, chunk_size, reverse):
  return _forward(q, k, v, log_alpha, scale, chunk_size, reverse), (q, k, v, log_alpha)


_chunked_gla.defvjp(_chunked_gla_fwd, _backward)


def gated_linear_attention_chunked(q, k, v, log_alpha, *, scale=None, chunk_size=64, reverse=False):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> (B, T, H, Dv) in q.dtype. See the module docstring."""
  chunk_size = layout.effective_chunk_size(chunk_size, q.shape[1])
  return _chunked_gla(q, k, v, log_alpha, layout.resolve_scale(scale, q.shape[-1]), chunk_size, reverse)
