"""Gated linear attention as the plain token-by-token recurrence (the specification the others are tested against).

S_t = diag(exp(log_alpha_t)) S_{t-1} + k_t^T v_t,   o_t = (scale * q_t) S_t,   S_{-1} = 0.

One `lax.scan` step per token; differentiable by autodiff (which stores every state, O(T Dk Dv)), and
exact in float64 when 64-bit mode is on. Slow: use it for tests, not for models.
"""

import jax
import jax.numpy as jnp

from dyngen.pallas_kernels.gla import layout


def gated_linear_attention_reference(q, k, v, log_alpha, *, scale=None, reverse=False):
  """q, k, log_alpha: (B, T, H, Dk); v: (B, T, H, Dv) -> o: (B, T, H, Dv) in q.dtype.

  reverse=True runs the recurrence from the last token to the first (o_t sees tokens t..T-1).
  """
  dtype = layout.compute_dtype(q, k, v, log_alpha)
  scale = layout.resolve_scale(scale, q.shape[-1])
  batch, _, heads, key_dim = q.shape
  q_t, k_t, v_t, g_t = (jnp.moveaxis(x.astype(dtype), 1, 0) for x in (q, k, v, log_alpha))
  q_t = q_t * scale

  def step(state, inputs):
    q_i, k_i, v_i, g_i = inputs  # (B, H, Dk), (B, H, Dk), (B, H, Dv), (B, H, Dk)
    state = jnp.exp(g_i)[..., None] * state + k_i[..., :, None] * v_i[..., None, :]
    return state, jnp.einsum("bhk,bhkv->bhv", q_i, state)

  state0 = jnp.zeros((batch, heads, key_dim, v.shape[-1]), dtype)
  _, o = jax.lax.scan(step, state0, (q_t, k_t, v_t, g_t), reverse=reverse)
  return jnp.moveaxis(o, 0, 1).astype(q.dtype)
