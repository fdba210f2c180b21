"""The custom VJP around a backend's Pallas GLA kernels (pallas_tpu.py, pallas_gpu.py).

A backend supplies three launchers working in the head-major layout (B*H, padded T, D):
  forward(q, k, v, g) -> o                 one pass in processing order, carrying the state
  dq(k, v, g, do) -> dq (float32)          one pass in processing order, recomputing the state
  dkv(q, k, v, g, do) -> dk, dv (float32)  one pass against processing order, carrying dS
Only the inputs are saved for the backward. The gate gradient is d(prefix sum) = q*dq - k*dk summed over
all later tokens in processing order: a reverse cumsum for causal, a forward one for reverse=True.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dyngen.pallas_kernels.gla import layout


class Launchers(NamedTuple):
  forward: Callable
  dq: Callable
  dkv: Callable


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6, 7))
def _pallas_gla(launchers, q, k, v, log_alpha, chunk_size, reverse, static):
  return _forward(launchers, q, k, v, log_alpha, chunk_size, reverse, static)[0]


def _forward(launchers, q, k, v, log_alpha, chunk_size, reverse, static):
  arrays = [layout.to_head_major(x, chunk_size) for x in (q, k, v, log_alpha)]
  o = launchers.forward(*arrays, chunk_size=chunk_size, reverse=reverse, **dict(static))
  return layout.from_head_major(o, q.shape[0], q.shape[1], q.dtype), (q, k, v, log_alpha)


def _backward(launchers, chunk_size, reverse, static, residuals, d_o):
  q, k, v, log_alpha = residuals
  batch, length = q.shape[:2]
  q_h, k_h, v_h, g_h, do_h = (layout.to_head_major(x, chunk_size) for x in (q, k, v, log_alpha, d_o))
  kwargs = dict(chunk_size=chunk_size, reverse=reverse, **dict(static))
  dq = launchers.dq(k_h, v_h, g_h, do_h, **kwargs)
  dk, dv = launchers.dkv(q_h, k_h, v_h, g_h, do_h, **kwargs)
  d_prefix = q_h.astype(jnp.float32) * dq - k_h.astype(jnp.float32) * dk
  dg = jax.lax.cumsum(d_prefix, axis=1, reverse=not reverse)
  return tuple(layout.from_head_major(x, batch, length, like.dtype)
               for x, like in ((dq, q), (dk, k), (dv, v), (dg, log_alpha)))


_pallas_gla.defvjp(_forward, _backward)


def gated_linear_attention_pallas(launchers, q, k, v, log_alpha, *, chunk_size, reverse, **static):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> (B, T, H, Dv). `static` (scale, interpret, ...)
  is passed to the launchers as keywords and must be hashable."""
  return _pallas_gla(launchers, q, k, v, log_alpha, chunk_size, reverse, tuple(sorted(static.items())))
