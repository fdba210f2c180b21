"""Pallas TPU (Mosaic) kernels for gated linear attention.

Layout: head-major (B*H, padded T, D). Grid (head blocks, chunks): the head-block axis is "parallel", the
chunk axis "arbitrary" (sequential), so each core walks its heads' chunks in order and carries the (Dk, Dv)
state per head in VMEM scratch. A block holds `heads_per_block` heads of one chunk, (hb, C, D): Dk = 32 is a
quarter of a lane tile, so several heads share one grid step to amortise its overhead. Block shapes are
(hb, C, D) with C a multiple of 8 and D the whole dimension, as Mosaic requires.

Chunks are visited in processing order (last to first for reverse=True) through the index map, never by
flipping arrays. The per-chunk maths is kernel_body.py; the custom VJP is pallas_vjp.py.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dyngen.pallas_kernels.gla import kernel_body
from dyngen.pallas_kernels.gla import layout
from dyngen.pallas_kernels.gla import pallas_vjp

MAX_HEADS_PER_BLOCK = 8
SUBLANES = 8


def _heads_per_block(num_heads):
  """Most heads per block up to MAX_HEADS_PER_BLOCK that still leave two blocks for the parallel axis
  (a megacore chip splits it between its two TensorCores)."""
  limit = min(MAX_HEADS_PER_BLOCK, max(1, num_heads // 2))
  return max(h for h in range(1, limit + 1) if num_heads % h == 0)


def _sub_chunk(chunk_size):
  # 16 rows keep bf16 slices on whole (16, 128) tiles; 8 is the float32 sublane tile.
  return 16 if chunk_size % 16 == 0 else SUBLANES


def _interpret_mode(interpret):
  """True -> TPU interpret mode (simulates VMEM scratch and the sequential grid on CPU)."""
  return interpret


def _call(kernel, arrays, out_dims, out_dtypes, *, chunk_size, against_order, reverse, interpret,
          scratch_dims):
  """pallas_call over grid (head blocks, chunks) with (hb, C, D) blocks of every array."""
  num_heads, length, key_dim = arrays[0].shape
  hb = _heads_per_block(num_heads)
  n = length // chunk_size
  flip = reverse != against_order  # visit chunks last to first

  def index_map(head_block, chunk):
    return head_block, (n - 1 - chunk) if flip else chunk, 0

  def spec(dim):
    return pl.BlockSpec((hb, chunk_size, dim), index_map)

  return pl.pallas_call(
      functools.partial(kernel, heads=hb),
      grid=(num_heads // hb, n),
      in_specs=[spec(x.shape[-1]) for x in arrays],
      out_specs=[spec(d) for d in out_dims],
      out_shape=[jax.ShapeDtypeStruct((num_heads, length, d), t) for d, t in zip(out_dims, out_dtypes)],
      scratch_shapes=[pltpu.VMEM((hb, *scratch_dims), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=_interpret_mode(interpret),
  )(*arrays)


def _for_each_head(heads, state_ref, update):
  """Resets the carried state at the first chunk, then runs `update(h, state) -> state` per head."""

  @pl.when(pl.program_id(1) == 0)
  def _():
    state_ref[...] = jnp.zeros(state_ref.shape, state_ref.dtype)

  def one_head(h, carry):
    state_ref[h] = update(h, state_ref[h])
    return carry

  jax.lax.fori_loop(0, heads, one_head, 0)


def _forward(q, k, v, g, *, chunk_size, reverse, scale, interpret):
  body = functools.partial(kernel_body.forward_chunk, base=0, chunk=chunk_size, sub=_sub_chunk(chunk_size),
                           scale=scale, reverse=reverse)

  def kernel(q_ref, k_ref, v_ref, g_ref, o_ref, state_ref, *, heads):
    _for_each_head(heads, state_ref, lambda h, state: body(
        q_ref.at[h], k_ref.at[h], v_ref.at[h], g_ref.at[h], o_ref.at[h], state))

  (o,) = _call(kernel, (q, k, v, g), (v.shape[-1],), (q.dtype,), chunk_size=chunk_size, against_order=False,
               reverse=reverse, interpret=interpret, scratch_dims=(k.shape[-1], v.shape[-1]))
  return o


def _dq(k, v, g, do, *, chunk_size, reverse, scale, interpret):
  body = functools.partial(kernel_body.dq_chunk, base=0, chunk=chunk_size, sub=_sub_chunk(chunk_size),
                           scale=scale, reverse=reverse)

  def kernel(k_ref, v_ref, g_ref, do_ref, dq_ref, state_ref, *, heads):
    _for_each_head(heads, state_ref, lambda h, state: body(
        k_ref.at[h], v_ref.at[h], g_ref.at[h], do_ref.at[h], dq_ref.at[h], state))

  (dq,) = _call(kernel, (k, v, g, do), (k.shape[-1],), (jnp.float32,), chunk_size=chunk_size,
                against_order=False, reverse=reverse, interpret=interpret,
                scratch_dims=(k.shape[-1], v.shape[-1]))
  return dq


def _dkv(q, k, v, g, do, *, chunk_size, reverse, scale, interpret):
  body = functools.partial(kernel_body.dkv_chunk, base=0, chunk=chunk_size, sub=_sub_chunk(chunk_size),
                           scale=scale, reverse=reverse)

  def kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dv_ref, d_state_ref, *, heads):
    _for_each_head(heads, d_state_ref, lambda h, d_state: body(
        q_ref.at[h], k_ref.at[h], v_ref.at[h], g_ref.at[h], do_ref.at[h], dk_ref.at[h], dv_ref.at[h],
        d_state))

  dk, dv = _call(kernel, (q, k, v, g, do), (k.shape[-1], v.shape[-1]), (jnp.float32, jnp.float32),
                 chunk_size=chunk_size, against_order=True, reverse=reverse, interpret=interpret,
                 scratch_dims=(k.shape[-1], v.shape[-1]))
  return dk, dv


LAUNCHERS = pallas_vjp.Launchers(_forward, _dq, _dkv)


def gated_linear_attention_pallas_tpu(q, k, v, log_alpha, *, scale=None, chunk_size=64, reverse=False,
                                      interpret=False):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> (B, T, H, Dv) in q.dtype.

  chunk_size must be a multiple of 8 (the sublane tile); interpret=True (or a pltpu.InterpretParams) runs
  the kernels in TPU interpret mode, e.g. on CPU.
  """
  if chunk_size % SUBLANES:
    raise ValueError(f"pallas_tpu needs chunk_size to be a multiple of {SUBLANES}, got {chunk_size}")
  chunk_size = layout.effective_chunk_size(chunk_size, q.shape[1], granule=SUBLANES)
  return pallas_vjp.gated_linear_attention_pallas(
      LAUNCHERS, q, k, v, log_alpha, chunk_size=chunk_size, reverse=reverse,
      scale=layout.resolve_scale(scale, q.shape[-1]), interpret=interpret)
