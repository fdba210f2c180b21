"""Gated linear attention as a token-by-token `lax.scan` with a memory-lean custom VJP: the fast form on CPU.

On a CPU the recurrence does the least work: per token and head one decay of the (Dk, Dv) state, one outer
product and one matvec, and only Dk exps. The chunked form trades that for (C, C) matmuls, which pay off
on accelerators, but its overflow-safe intra-chunk decays need O(c Dk) exps per token (c = sub-chunk), and
exp dominates on a CPU: measured 3-6x slower forward (dyngen/bench/gla.py).

Autodiff of the scan would store every state, O(T Dk Dv). The VJP here saves only the inputs; its backward
is two more token scans that need no stored state:
  in processing order, rebuild S_t and take dq_t = scale * do_t S_t^T;
  against it, carry dS_t = scale * q_t^T do_t + alpha_{t+1} dS_{t+1}, with dk_t = dS_t v_t, dv_t = k_t dS_t,
  and the gate gradient as the running sum of q_t dq_t - k_t dk_t (d loss / d prefix sum of the gates).
Decays are exp of single gates (<= 0), so nothing overflows; -inf gates are clamped like in chunked.py.
"""

import functools

import jax
import jax.numpy as jnp

from dyngen.pallas_kernels.gla import layout


def _time_major(x, dtype):
  """(B, T, H, D) -> (T, B, H, D) in `dtype`: the scan runs over the leading axis."""
  return jnp.moveaxis(x.astype(dtype), 1, 0)


def _from_time_major(x, dtype):
  return jnp.moveaxis(x, 0, 1).astype(dtype)


def _inputs(q, k, v, log_alpha):
  dtype = layout.compute_dtype(q, k, v, log_alpha)
  q_t, k_t, v_t, g_t = (_time_major(x, dtype) for x in (q, k, v, log_alpha))
  return dtype, q_t, k_t, v_t, jnp.maximum(g_t, layout.LOG_DECAY_FLOOR)


def _next_state(state, k, v, g):
  """state: (B, H, Dk, Dv); k, g: (B, H, Dk); v: (B, H, Dv)."""
  return jnp.exp(g)[..., None] * state + k[..., :, None] * v[..., None, :]


def _zero_state(k, v, dtype):
  return jnp.zeros((*k.shape[1:], v.shape[-1]), dtype)


def _forward(q, k, v, log_alpha, scale, reverse):
  dtype, q_t, k_t, v_t, g_t = _inputs(q, k, v, log_alpha)

  def step(state, token):
    q, k, v, g = token
    state = _next_state(state, k, v, g)
    return state, jnp.einsum("bhk,bhkv->bhv", q, state)

  _, o = jax.lax.scan(step, _zero_state(k_t, v_t, dtype), (q_t * scale, k_t, v_t, g_t), reverse=reverse)
  return _from_time_major(o, q.dtype)


def _backward(scale, reverse, residuals, d_o):
  q, k, v, log_alpha = residuals
  dtype, q_t, k_t, v_t, g_t = _inputs(q, k, v, log_alpha)
  do_t = _time_major(d_o, dtype)

  def dq_step(state, token):
    k, v, g, do = token
    state = _next_state(state, k, v, g)
    return state, scale * jnp.einsum("bhv,bhkv->bhk", do, state)

  _, dq_t = jax.lax.scan(dq_step, _zero_state(k_t, v_t, dtype), (k_t, v_t, g_t, do_t), reverse=reverse)

  def grad_step(carry, token):
    d_state_later, dg_later = carry  # alpha_{t+1} dS_{t+1}; gate gradient summed over later tokens
    q, k, v, g, do, dq = token
    d_state = scale * q[..., :, None] * do[..., None, :] + d_state_later
    dk = jnp.einsum("bhkv,bhv->bhk", d_state, v)
    dv = jnp.einsum("bhk,bhkv->bhv", k, d_state)
    dg = q * dq - k * dk + dg_later
    return (jnp.exp(g)[..., None] * d_state, dg), (dk, dv, dg)

  carry = (_zero_state(k_t, v_t, dtype), jnp.zeros(k_t.shape[1:], dtype))
  _, (dk_t, dv_t, dg_t) = jax.lax.scan(grad_step, carry, (q_t, k_t, v_t, g_t, do_t, dq_t),
                                       reverse=not reverse)
  return tuple(_from_time_major(x, like.dtype) for x, like in ((dq_t, q), (dk_t, k), (dv_t, v), (dg_t, log_alpha)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _recurrent_gla(q, k, v, log_alpha, scale, reverse):
  return _forward(q, k, v, log_alpha, scale, reverse)


_recurrent_gla.defvjp(lambda q, k, v, g, scale, reverse: (_forward(q, k, v, g, scale, reverse), (q, k, v, g)),
                      _backward)


def gated_linear_attention_recurrent(q, k, v, log_alpha, *, scale=None, reverse=False):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> (B, T, H, Dv) in q.dtype. See the module docstring."""
  return _recurrent_gla(q, k, v, log_alpha, layout.resolve_scale(scale, q.shape[-1]), reverse)
