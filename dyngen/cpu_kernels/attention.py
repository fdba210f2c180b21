"""Fused softmax self-attention on XLA:CPU (attention.cc): forward and backward, one (batch, head) at a time.

The forward keeps the output and the per-row logsumexp; the backward recomputes each query block's
probabilities from it, so no (T, T) matrix outlives a call. Inputs and gradients stay in the qkv projection's
(..., T, 3, H, Dh) layout, so XLA adds no layout copies around the call.
"""
import functools

from absl import logging
import jax
import jax.numpy as jnp

from dyngen.cpu_kernels import build

_FORWARD = "dyngen_attention_forward"
_BACKWARD = "dyngen_attention_backward"
_HANDLERS = ((_FORWARD, "DyngenAttentionForward"), (_BACKWARD, "DyngenAttentionBackward"))


def ensure_loaded():
  """Builds and registers the kernel; raises build.BuildError saying why it cannot run here."""
  build.load("attention", _HANDLERS)


@functools.cache
def available():
  """Whether the kernel runs on this host; the reason it does not is logged once."""
  try:
    ensure_loaded()
  except build.BuildError as e:
    logging.warning("dyngen's fused CPU attention is unavailable, so CPU attention falls back to XLA: %s", e)
    return False
  return True


def _check(qkv):
  if qkv.ndim < 4 or qkv.shape[-3] != 3:
    raise ValueError(f"cpu_fused attention takes qkv of shape (..., T, 3, H, Dh), got {qkv.shape}")
  if qkv.dtype != jnp.float32:
    raise ValueError(f"cpu_fused attention computes in float32, got {qkv.dtype}; use 'dense' for other dtypes")


def _forward_call(qkv):
  *batch, length, _, heads, head_dim = qkv.shape
  out = jax.ShapeDtypeStruct((*batch, length, heads, head_dim), jnp.float32)
  log_sum_exp = jax.ShapeDtypeStruct((*batch, heads, length), jnp.float32)
  return jax.ffi.ffi_call(_FORWARD, (out, log_sum_exp), vmap_method="broadcast_all")(qkv)


@jax.custom_vjp
def _attention(qkv):
  return _forward_call(qkv)[0]


def _attention_forward(qkv):
  out, log_sum_exp = _forward_call(qkv)
  return out, (qkv, out, log_sum_exp)


def _attention_backward(residuals, d_out):
  qkv, out, log_sum_exp = residuals
  d_qkv = jax.ffi.ffi_call(_BACKWARD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                           vmap_method="broadcast_all")(qkv, out, log_sum_exp, d_out.astype(jnp.float32))
  return (d_qkv,)


_attention.defvjp(_attention_forward, _attention_backward)


def fused_attention(qkv):
  """Non-causal multi-head attention with scale Dh^-1/2. qkv: (..., T, 3, H, Dh) float32 -> (..., T, H, Dh)."""
  _check(qkv)
  ensure_loaded()
  return _attention(qkv)
