"""Pallas GPU kernels for gated linear attention, on the Triton backend.

jax 0.10.2 serves two Pallas GPU backends: Mosaic GPU (the default for `pallas_call` on CUDA, warpgroup
semantics, Hopper/Blackwell-oriented) and Triton, still selected by passing `pltriton.CompilerParams`.
These kernels use Triton: its lowering takes the plain 2-D dots, masks and loops of kernel_body.py (Mosaic
GPU's `pallas_call` lowering does not lower a plain `dot_general`).

Triton has no sequential grid axis, so the grid is one program per (batch, head) and each program walks
its chunks in a `fori_loop`, carrying the (Dk, Dv) state in registers; the blocks are whole sequences of
one head, (padded T, D), read a chunk / sub-chunk at a time. Triton's dot needs every dimension >= 16 and
power-of-two shapes: sub-chunks are 16 tokens, chunk_size a power of two >= 16, Dk and Dv powers of two
>= 16 (checked unless interpreting).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from dyngen.pallas_kernels.gla import kernel_body
from dyngen.pallas_kernels.gla import layout
from dyngen.pallas_kernels.gla import pallas_vjp

SUB_CHUNK = 16
NUM_WARPS = 4


def _is_power_of_two(n):
  return n >= 1 and n & (n - 1) == 0


def _call(kernel, arrays, out_dims, out_dtypes, *, interpret):
  """pallas_call with one program per head and whole-sequence blocks."""
  num_heads, length, _ = arrays[0].shape

  def spec(dim):
    return pl.BlockSpec((None, length, dim), lambda head: (head, 0, 0))

  return pl.pallas_call(
      kernel,
      grid=(num_heads,),
      in_specs=[spec(x.shape[-1]) for x in arrays],
      out_specs=[spec(d) for d in out_dims],
      out_shape=[jax.ShapeDtypeStruct((num_heads, length, d), t) for d, t in zip(out_dims, out_dtypes)],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      interpret=interpret,
  )(*arrays)


def _walk_chunks(num_chunks, chunk_size, backwards, body, carry):
  """Runs body(base_row, carry) -> carry over the chunks, last to first when `backwards`."""

  def step(i, carry):
    index = num_chunks - 1 - i if backwards else i
    return body(pl.multiple_of(index * chunk_size, chunk_size), carry)

  return jax.lax.fori_loop(0, num_chunks, step, carry)


def _forward(q, k, v, g, *, chunk_size, reverse, scale, interpret):
  n = q.shape[1] // chunk_size
  body = functools.partial(kernel_body.forward_chunk, chunk=chunk_size, sub=SUB_CHUNK, scale=scale,
                           reverse=reverse)

  def kernel(q_ref, k_ref, v_ref, g_ref, o_ref):
    state = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    _walk_chunks(n, chunk_size, reverse, lambda base, state: body(
        q_ref, k_ref, v_ref, g_ref, o_ref, state, base=base), state)

  (o,) = _call(kernel, (q, k, v, g), (v.shape[-1],), (q.dtype,), interpret=interpret)
  return o


def _dq(k, v, g, do, *, chunk_size, reverse, scale, interpret):
  n = k.shape[1] // chunk_size
  body = functools.partial(kernel_body.dq_chunk, chunk=chunk_size, sub=SUB_CHUNK, scale=scale,
                           reverse=reverse)

  def kernel(k_ref, v_ref, g_ref, do_ref, dq_ref):
    state = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    _walk_chunks(n, chunk_size, reverse, lambda base, state: body(
        k_ref, v_ref, g_ref, do_ref, dq_ref, state, base=base), state)

  (dq,) = _call(kernel, (k, v, g, do), (k.shape[-1],), (jnp.float32,), interpret=interpret)
  return dq


def _dkv(q, k, v, g, do, *, chunk_size, reverse, scale, interpret):
  n = k.shape[1] // chunk_size
  body = functools.partial(kernel_body.dkv_chunk, chunk=chunk_size, sub=SUB_CHUNK, scale=scale,
                           reverse=reverse)

  def kernel(q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dv_ref):
    d_state = jnp.zeros((k_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    _walk_chunks(n, chunk_size, not reverse, lambda base, d_state: body(
        q_ref, k_ref, v_ref, g_ref, do_ref, dk_ref, dv_ref, d_state, base=base), d_state)

  dk, dv = _call(kernel, (q, k, v, g, do), (k.shape[-1], v.shape[-1]), (jnp.float32, jnp.float32),
                 interpret=interpret)
  return dk, dv


LAUNCHERS = pallas_vjp.Launchers(_forward, _dq, _dkv)


def gated_linear_attention_pallas_gpu(q, k, v, log_alpha, *, scale=None, chunk_size=64, reverse=False,
                                      interpret=False):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> (B, T, H, Dv) in q.dtype.

  chunk_size must be a power of two >= 16; interpret=True runs the kernels in interpret mode (e.g. on CPU).
  """
  if not _is_power_of_two(chunk_size) or chunk_size < SUB_CHUNK:
    raise ValueError(f"pallas_gpu needs chunk_size to be a power of two >= {SUB_CHUNK}, got {chunk_size}")
  if not interpret:
    for name, dim in (("Dk", q.shape[-1]), ("Dv", v.shape[-1])):
      if not _is_power_of_two(dim) or dim < 16:
        raise ValueError(f"pallas_gpu (Triton) needs {name} to be a power of two >= 16, got {dim}")
  chunk_size = layout.effective_chunk_size(chunk_size, q.shape[1], granule=SUB_CHUNK, power_of_two=True)
  return pallas_vjp.gated_linear_attention_pallas(
      LAUNCHERS, q, k, v, log_alpha, chunk_size=chunk_size, reverse=reverse,
      scale=layout.resolve_scale(scale, q.shape[-1]), interpret=interpret)
