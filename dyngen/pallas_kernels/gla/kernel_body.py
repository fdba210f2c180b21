"""The per-head, per-chunk maths of the Pallas GLA kernels, shared by the TPU (Mosaic) and GPU (Triton) kernels.

Each function handles one head and one chunk of C tokens: it reads rows [base, base + C) of 2-D refs
(q, k, log_alpha: (rows, Dk); v, o: (rows, Dv)), writes its outputs there, and maps the carried (Dk, Dv)
state (or state gradient) of the chunk's input side to its output side. The TPU kernel passes one head's
block (`ref.at[h]`, base 0) and keeps the state in VMEM scratch across grid steps; the GPU kernel passes a
whole sequence and loops over chunks itself.

Only ops both backends lower are used: 2-D dots (NN, NT, TN), iota masks, exp, where, row/column sums,
static or `pl.ds` ref slices, `fori_loop`. There is no cumsum on Mosaic, so every gate sum is a dot with a
0/1 interval mask at HIGHEST precision: it sums exactly the gates of its interval (see chunked.py for why
that matters), and every exponent is masked to -inf before exp where its factor must vanish.

Positions are in processing order: t for causal, C-1-t for reverse=True (anti-causal), so one code path
serves both directions; sub-chunk i of c tokens covers processing positions [i c, (i+1) c).
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dyngen.pallas_kernels.gla import layout

_F32 = jnp.float32


def _dot(a, b, exact=False):
  """a @ b; exact=True for gate sums (HIGHEST: no bf16 / TF32 rounding)."""
  precision = jax.lax.Precision.HIGHEST if exact else None
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=_F32)


def _dot_nt(a, b):
  """a @ b.T"""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)


def _dot_tn(a, b):
  """a.T @ b"""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _mask(condition):
  return jnp.where(condition, 1.0, 0.0).astype(_F32)


def _positions(size, axis, reverse):
  """Processing positions of the rows (axis 0: (size, 1)) or columns (axis 1: (1, size)) of a block."""
  shape = (size, 1) if axis == 0 else (1, size)
  index = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
  return size - 1 - index if reverse else index


def _clamped(g):
  return jnp.maximum(g, layout.LOG_DECAY_FLOOR)


def _decay_matrix(total):
  """total: (1, Dk) -> diag(exp(total)) (Dk, Dk), to scale the rows of a state by a matmul (no transpose)."""
  key_dim = total.shape[1]
  eye = (jax.lax.broadcasted_iota(jnp.int32, (key_dim, key_dim), 0)
         == jax.lax.broadcasted_iota(jnp.int32, (key_dim, key_dim), 1))
  return jnp.where(eye, jnp.exp(total), 0.0)


class _Chunk:
  """Loads of one head's chunk and its gate sums, shared by the three kernel bodies."""

  def __init__(self, g_ref, base, chunk, sub, reverse):
    self.base, self.chunk, self.sub, self.reverse = base, chunk, sub, reverse
    self.g = _clamped(self.load(g_ref))
    self.t = _positions(chunk, 0, reverse)  # (C, 1)
    self.u = _positions(chunk, 1, reverse)  # (1, C)
    self.suffix = _dot(_mask(self.u > self.t), self.g, exact=True)  # sum over (t, chunk end]
    self.total = jnp.sum(self.g, axis=0, keepdims=True)  # (1, Dk)

  def load(self, ref, block=None):
    """Rows of the whole chunk, or of sub-chunk `block` (in processing order), as float32."""
    rows = pl.ds(self.base, self.chunk) if block is None else self.block_rows(block)
    return ref[rows, :].astype(_F32)

  def block_rows(self, block):
    """The rows of sub-chunk `block` (a traced index) in the refs."""
    row = block * self.sub if not self.reverse else self.chunk - (block + 1) * self.sub
    return pl.ds(pl.multiple_of(self.base + row, self.sub), self.sub)

  def block_decays(self, block):
    """exp factors of sub-chunk `block`: (from chunk start to t, from sub-chunk start to t) as (c, Dk),
    and the key factor (C, Dk) from each key before the sub-chunk to its start (0 for later keys)."""
    start = block * self.sub
    t_block = start + _positions(self.sub, 0, self.reverse)  # (c, 1)
    up_to_t = self.u <= t_block
    prefix = jnp.exp(_dot(_mask(up_to_t), self.g, exact=True))
    within = jnp.exp(_dot(_mask(up_to_t & (self.u >= start)), self.g, exact=True))
    key_to_start = _dot(_mask((self.u > self.t) & (self.u < start)), self.g, exact=True)
    key = jnp.exp(jnp.where(self.t < start, key_to_start, -jnp.inf))  # all 0 for block 0
    return prefix, within, key


def _sub_chunk_decay(g_block, s, t_local, u_local):
  """exp(sum of g over (s, t]) for the rows t of one sub-chunk: (c, Dk); 0 for t < s."""
  segment = _dot(_mask((u_local > s) & (u_local <= t_local)), g_block, exact=True)
  return jnp.exp(jnp.where(t_local >= s, segment, -jnp.inf))


def forward_chunk(q_ref, k_ref, v_ref, g_ref, o_ref, state, *, base, chunk, sub, scale, reverse):
  """Writes o for one chunk of one head; state: (Dk, Dv) entering the chunk -> leaving it."""
  c = _Chunk(g_ref, base, chunk, sub, reverse)
  k, v = c.load(k_ref), c.load(v_ref)
  t_local, u_local = _positions(sub, 0, reverse), _positions(sub, 1, reverse)

  def sub_chunk(block, carry):
    q_b = c.load(q_ref, block) * scale
    k_b, v_b, g_b = c.load(k_ref, block), c.load(v_ref, block), _clamped(c.load(g_ref, block))
    prefix, within, key = c.block_decays(block)
    # The state, then the keys of earlier sub-chunks (key factor 0 for the others), then the diagonal block.
    o_b = _dot(q_b * prefix, state) + _dot(_dot_nt(q_b * within, k * key), v)

    def column(s, scores):
      k_s = jnp.sum(jnp.where(t_local == s, k_b, 0.0), axis=0, keepdims=True)  # (1, Dk)
      score_s = jnp.sum(q_b * k_s * _sub_chunk_decay(g_b, s, t_local, u_local), axis=1, keepdims=True)
      return scores + jnp.where(u_local == s, score_s, 0.0)

    diag_scores = jax.lax.fori_loop(0, sub, column, jnp.zeros((sub, sub), _F32))
    o_ref[c.block_rows(block), :] = (o_b + _dot(diag_scores, v_b)).astype(o_ref.dtype)
    return carry

  jax.lax.fori_loop(0, chunk // sub, sub_chunk, 0)
  return _dot(_decay_matrix(c.total), state, exact=True) + _dot_tn(k * jnp.exp(c.suffix), v)


def dq_chunk(k_ref, v_ref, g_ref, do_ref, dq_ref, state, *, base, chunk, sub, scale, reverse):
  """Writes dq (float32 ref) for one chunk of one head, in processing order; state as in forward_chunk."""
  c = _Chunk(g_ref, base, chunk, sub, reverse)
  k, v = c.load(k_ref), c.load(v_ref)
  t_local, u_local = _positions(sub, 0, reverse), _positions(sub, 1, reverse)

  def sub_chunk(block, carry):
    do_b = c.load(do_ref, block)
    k_b, v_b, g_b = c.load(k_ref, block), c.load(v_ref, block), _clamped(c.load(g_ref, block))
    prefix, within, key = c.block_decays(block)
    dq_b = prefix * _dot_nt(do_b, state) + within * _dot(_dot_nt(do_b, v), k * key)
    d_scores = _dot_nt(do_b, v_b)  # (c, c)

    def column(s, dq_b):
      k_s = jnp.sum(jnp.where(t_local == s, k_b, 0.0), axis=0, keepdims=True)
      d_score_s = jnp.sum(jnp.where(u_local == s, d_scores, 0.0), axis=1, keepdims=True)  # (c, 1)
      return dq_b + d_score_s * k_s * _sub_chunk_decay(g_b, s, t_local, u_local)

    dq_ref[c.block_rows(block), :] = jax.lax.fori_loop(0, sub, column, dq_b) * scale
    return carry

  jax.lax.fori_loop(0, chunk // sub, sub_chunk, 0)
  return _dot(_decay_matrix(c.total), state, exact=True) + _dot_tn(k * jnp.exp(c.suffix), v)


def dkv_chunk(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dv_ref, d_state, *, base, chunk, sub, scale,
              reverse):
  """Writes dk, dv (float32 refs) for one chunk of one head; d_state: gradient of the state leaving the
  chunk (Dk, Dv) -> gradient of the state entering it. Chunks are visited against processing order."""
  c = _Chunk(g_ref, base, chunk, sub, reverse)
  k, v = c.load(k_ref), c.load(v_ref)
  key_out = jnp.exp(c.suffix)
  # Through the state leaving the chunk; the sub-chunks below add the intra-chunk terms in place.
  dk_ref[pl.ds(base, chunk), :] = key_out * _dot_nt(v, d_state)
  dv_ref[pl.ds(base, chunk), :] = _dot(k * key_out, d_state)
  t_local, u_local = _positions(sub, 0, reverse), _positions(sub, 1, reverse)

  def sub_chunk(block, d_state_in):
    q_b = c.load(q_ref, block) * scale
    do_b = c.load(do_ref, block)
    k_b, v_b, g_b = c.load(k_ref, block), c.load(v_ref, block), _clamped(c.load(g_ref, block))
    prefix, within, key = c.block_decays(block)
    q_within = q_b * within
    scores = _dot_nt(q_within, k * key)  # (c, C): keys of earlier sub-chunks
    dk_ref[pl.ds(base, chunk), :] += key * _dot_tn(_dot_nt(do_b, v), q_within)
    dv_ref[pl.ds(base, chunk), :] += _dot_tn(scores, do_b)
    d_scores = _dot_nt(do_b, v_b)  # (c, c)

    def column(s, grads):
      dk_b, dv_b = grads
      decay = _sub_chunk_decay(g_b, s, t_local, u_local)  # (c, Dk), rows t
      k_s = jnp.sum(jnp.where(t_local == s, k_b, 0.0), axis=0, keepdims=True)
      score_s = jnp.sum(q_b * k_s * decay, axis=1, keepdims=True)  # (c, 1): scores[t, s]
      d_score_s = jnp.sum(jnp.where(u_local == s, d_scores, 0.0), axis=1, keepdims=True)
      dk_s = jnp.sum(d_score_s * q_b * decay, axis=0, keepdims=True)  # (1, Dk)
      dv_s = jnp.sum(score_s * do_b, axis=0, keepdims=True)  # (1, Dv)
      return dk_b + jnp.where(t_local == s, dk_s, 0.0), dv_b + jnp.where(t_local == s, dv_s, 0.0)

    dk_b, dv_b = jax.lax.fori_loop(0, sub, column, (jnp.zeros_like(k_b), jnp.zeros_like(v_b)))
    rows = c.block_rows(block)
    dk_ref[rows, :] += dk_b
    dv_ref[rows, :] += dv_b
    return d_state_in + _dot_tn(q_b * prefix, do_b)

  d_state_in = _dot(_decay_matrix(c.total), d_state, exact=True)
  return jax.lax.fori_loop(0, chunk // sub, sub_chunk, d_state_in)
