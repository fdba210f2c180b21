"""Input checks and the padding / chunk bookkeeping shared by every GLA implementation.

Each implementation works on whole chunks of `chunk_size` tokens; a sequence whose length is not a
multiple of the chunk is padded at the end with q = k = v = 0 and log_alpha = 0. Padded tokens add
nothing to the state (k = v = 0), so they change no real output in either direction: causally they come
after every real token, anti-causally the state they hand on is still zero.
"""

import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "reference", "recurrent", "chunked", "pallas_tpu", "pallas_gpu")
# Largest sub-chunk whose decays are formed element by element (see chunked.py); 8 measured fastest on CPU.
MAX_SUB_CHUNK = 8
# log_alpha is clamped from below: exp of the clamp is 0 in float32 and float64 alike, and it keeps
# -inf gates (alpha = 0) from turning interval sums into inf - inf.
LOG_DECAY_FLOOR = -1e6


def check_inputs(q, k, v, log_alpha, chunk_size, implementation):
  """Raises ValueError naming the offending value; returns nothing."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  for name, x in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha)):
    if jnp.ndim(x) != 4:
      raise ValueError(f"{name} must have rank 4 (B, T, H, D), got shape {jnp.shape(x)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")
  if k.shape != q.shape:
    raise ValueError(f"k must have the shape of q {q.shape} (B, T, H, Dk), got {k.shape}")
  if log_alpha.shape != q.shape:
    raise ValueError(f"log_alpha must have the shape of q and k {q.shape} (B, T, H, Dk), got {log_alpha.shape}")
  if v.shape[:3] != q.shape[:3]:
    raise ValueError(f"v must be (B, T, H, Dv) with (B, T, H) = {q.shape[:3]} as in q, got {v.shape}")
  if q.shape[1] == 0:
    raise ValueError(f"the sequence must hold at least one token, got q of shape {q.shape}")


def resolve_scale(scale, key_dim):
  return key_dim ** -0.5 if scale is None else float(scale)


def num_chunks(length, chunk_size):
  return -(-length // chunk_size)


def pad_time(x, chunk_size):
  """x: (B, T, H, D) -> (B, num_chunks * chunk_size, H, D), zero padded at the end of time."""
  pad = num_chunks(x.shape[1], chunk_size) * chunk_size - x.shape[1]
  return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def to_chunks(x, chunk_size, dtype):
  """x: (B, T, H, D) -> (N, B, H, C, D) in `dtype`, padded; N chunks of C = chunk_size tokens."""
  batch, _, heads, dim = x.shape
  x = pad_time(x.astype(dtype), chunk_size)
  x = x.reshape(batch, -1, chunk_size, heads, dim)
  return x.transpose(1, 0, 3, 2, 4)


def from_chunks(x, length, dtype):
  """x: (N, B, H, C, D) -> (B, length, H, D) in `dtype`, padding dropped."""
  n, batch, heads, chunk, dim = x.shape
  x = x.transpose(1, 0, 3, 2, 4).reshape(batch, n * chunk, heads, dim)
  return x[:, :length].astype(dtype)


def to_head_major(x, chunk_size):
  """x: (B, T, H, D) -> (B * H, padded T, D), the layout of the Pallas kernels (one head's tokens contiguous)."""
  batch, _, heads, dim = x.shape
  x = pad_time(x, chunk_size)
  return x.transpose(0, 2, 1, 3).reshape(batch * heads, -1, dim)


def from_head_major(x, batch, length, dtype):
  """x: (B * H, padded T, D) -> (B, length, H, D) in `dtype`, padding dropped."""
  x = x[:, :length].reshape(batch, -1, length, x.shape[-1])
  return x.transpose(0, 2, 1, 3).astype(dtype)


def sub_chunk_size(chunk_size):
  """Largest divisor of `chunk_size` not above MAX_SUB_CHUNK."""
  return max(d for d in range(1, min(chunk_size, MAX_SUB_CHUNK) + 1) if chunk_size % d == 0)


def compute_dtype(*arrays):
  """float32, or float64 when an input is float64 (the reference checks the algebra in float64)."""
  return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def effective_chunk_size(chunk_size, length, granule=MAX_SUB_CHUNK, power_of_two=False):
  """A chunk longer than the sequence only adds padding: shrink it to the sequence length rounded up to a
  multiple of `granule` (or to a power of two >= granule)."""
  if power_of_two:
    fit = max(granule, 1 << (length - 1).bit_length())
  else:
    fit = num_chunks(length, granule) * granule
  return min(chunk_size, fit)
