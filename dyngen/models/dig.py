"""DiG: DiT with softmax attention replaced by Gated Linear Attention (Zhu et al. 2024, hustvl/DiG).

Block (the official trained variant: bid_mode "layer", depthwise conv, four scan directions):
  h += gate1 * GLA(modulate(LN(h)));  h += gate2 * SwiGLU(modulate(LN(h)));  h = dwconv3x3(h on the grid)
and between blocks the sequence is reversed after every block and the token grid transposed after odd
blocks, so the blocks scan in raster, reversed raster, column-major and reversed column-major order.

dyngen never materialises the reversals: it keeps the stream in a physical order and remembers whether the
official (logical) order is its reverse. A reversed stream runs the GLA anti-causally (`reverse=True`) and
the depthwise conv with its kernel rotated by 180°, which is the same function. Only the transposes (one
per two blocks) move data. After a multiple of four blocks both flags are back to the identity. Under
`scan_blocks` a block's place in this schedule is traced: lax.cond picks the GLA direction and the transpose.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dyngen.models import layers
from dyngen.pallas_kernels import gla

# GLA linears are initialised xavier-uniform with gain 2**-2.5 (fla's GatedLinearAttention).
GLA_INIT_GAIN = 2 ** -2.5


def swiglu_hidden_size(hidden_size, mlp_ratio=4.0):
  """256 * ceil(floor(2/3 * ratio * D) / 256): 1024, 2048, 2816, 3072 for DiG-S, B, L, XL."""
  return 256 * -(-int(hidden_size * mlp_ratio * 2 / 3) // 256)


class GatedLinearAttention(nn.Module):
  """fla's GatedLinearAttention as DiG configures it. x: (B, N, D) -> (B, N, D).

  q, k: D -> D*expand_k; v, g: D -> D*expand_v; no biases. Gate: log α = logsigmoid(W2 W1 x + b) / 16 with a
  rank-16 W1. Output: per-head RMSNorm(o) * weight * swish(g), then o_proj.
  """
  num_heads: int
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  implementation: str = "auto"
  chunk_size: int = 64
  dtype: layers.Dtype = jnp.float32

  def head_projection(self, x, head_dim, name):
    width = x.shape[-1]
    init = layers.xavier_uniform_fused(width, self.num_heads * head_dim, GLA_INIT_GAIN)
    return layers.DenseGeneral((self.num_heads, head_dim), use_bias=False, dtype=self.dtype,
                               kernel_init=layers.partitioned(init, ("embed", "heads", "kv")), name=name)(x)

  @nn.compact
  def __call__(self, x, reverse=False, head_mask=None):
    """`head_mask` (B, H) multiplies each head's gated output before o_proj (DyDiG's width routing)."""
    width = x.shape[-1]
    key_dim, value_dim = int(width * self.expand_k), int(width * self.expand_v)
    head_k, head_v = key_dim // self.num_heads, value_dim // self.num_heads
    q = self.head_projection(x, head_k, "q_proj")
    k = self.head_projection(x, head_k, "k_proj")
    v = self.head_projection(x, head_v, "v_proj")
    g = self.head_projection(x, head_v, "g_proj")

    low_rank = layers.dense(
        self.gate_low_rank_dim, ("embed", None), use_bias=False, dtype=self.dtype, name="gk_proj_0",
        kernel_init=layers.xavier_uniform_fused(width, self.gate_low_rank_dim, GLA_INIT_GAIN))(x)
    gate_logits = layers.DenseGeneral(
        (self.num_heads, head_k), dtype=self.dtype, param_dtype=jnp.float32, name="gk_proj_1",
        kernel_init=layers.partitioned(
            layers.xavier_uniform_fused(self.gate_low_rank_dim, key_dim, GLA_INIT_GAIN), (None, "heads", "kv")),
        bias_init=layers.partitioned(layers.zeros, ("heads", "kv")))(low_rank)
    gate_logits = gate_logits.astype(layers.at_least_float32(self.dtype))
    log_alpha = jax.nn.log_sigmoid(gate_logits) / self.gate_logit_normalizer

    def attend(direction):
      return gla.gated_linear_attention(q, k, v, log_alpha, chunk_size=self.chunk_size, reverse=direction,
                                        implementation=self.implementation)

    # `reverse` is a Python bool, or a traced one inside a scan over blocks (both directions compiled).
    o = attend(reverse) if isinstance(reverse, bool) else jax.lax.cond(
        reverse, lambda: attend(True), lambda: attend(False))
    o = nn.with_logical_constraint(o, ("batch", "length", "act_heads", None))
    # Fused RMSNorm-swish gate of fla, in at least fp32: o * rsqrt(mean(o²) + eps) * weight * g * sigmoid(g).
    stats_dtype = layers.at_least_float32(self.dtype)
    o = o.astype(stats_dtype)
    o = o * jax.lax.rsqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + 1e-6)
    weight = self.param("g_norm_swish_gate", layers.partitioned(nn.initializers.ones_init(), ("kv",)), (head_v,))
    o = (o * weight * nn.silu(g.astype(stats_dtype))).astype(self.dtype)
    if head_mask is not None:
      o = o * head_mask[:, None, :, None].astype(o.dtype)
    return layers.DenseGeneral(
        width, num_contract=2, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="o_proj",
        kernel_init=layers.partitioned(layers.xavier_uniform_fused(value_dim, width, GLA_INIT_GAIN),
                                       ("heads", "kv", "embed")))(o)


class SwiGLU(nn.Module):
  """fla's GLAMLP: [gate, value] = x W_in; (silu(gate) * value) W_down; no biases. x: (B, N, D)."""
  hidden_features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, group_mask=None):
    """`group_mask` (B, G) multiplies G contiguous groups of the hidden channels (DyDiG's width routing)."""
    width = x.shape[-1]
    gate_value = layers.DenseGeneral(
        (2, self.hidden_features), use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="gate_proj",
        kernel_init=layers.partitioned(layers.xavier_uniform_fused(width, 2 * self.hidden_features),
                                       ("embed", None, "mlp")))(x)
    h = nn.silu(gate_value[..., 0, :]) * gate_value[..., 1, :]
    if group_mask is not None:
      groups = group_mask.shape[-1]
      h = (h.reshape(*h.shape[:-1], groups, -1) * group_mask[:, None, :, None].astype(h.dtype)).reshape(h.shape)
    h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
    return layers.dense(width, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="down_proj")(h)


class DepthwiseConv(nn.Module):
  """3x3 depthwise conv over the token grid, identity-initialised (centre tap 1). x: (B, N, D).

  `rotate=True` applies the kernel rotated by 180°: the official conv on the reversed sequence, computed
  on the stream in its physical order.
  """
  grid_size: int
  kernel_size: int = 3
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, rotate=False):
    batch, tokens, width = x.shape
    size = self.kernel_size

    def identity(key, shape, dtype=jnp.float32):
      return jnp.zeros(shape, dtype).at[size // 2, size // 2].set(1)

    kernel = self.param("kernel", layers.partitioned(identity, (None, None, None, "embed")), (size, size, 1, width))
    bias = self.param("bias", layers.partitioned(layers.zeros, ("embed",)), (width,))
    kernel = jnp.where(rotate, kernel[::-1, ::-1], kernel)  # `rotate` may be traced (scan over blocks).
    # The conv as size² shifted multiply-adds: the same function, but XLA:CPU's grouped-conv backward is
    # ~40x slower than these elementwise ops (1.5 s vs 0.04 s per DiG-S/2 fwd+bwd at 256 tokens), and on
    # accelerators they fuse into one pass over the grid.
    grid = x.reshape(batch, self.grid_size, self.grid_size, width)
    pad = size // 2
    padded = jnp.pad(grid, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = kernel.astype(self.dtype)
    out = sum(padded[:, i:i + self.grid_size, j:j + self.grid_size, :] * kernel[i, j, 0]
              for i in range(size) for j in range(size))
    return (out + bias.astype(self.dtype)).reshape(batch, tokens, width)


class DiGBlock(nn.Module):
  """x: (B, N, D) in physical order; cond: layers.Conditioning; `reverse`: the logical order is the reverse
  of x's. Returns (x, {})."""
  num_heads: int
  grid_size: int
  mlp_ratio: float = 4.0
  gla_implementation: str = "auto"
  gla_chunk_size: int = 64
  dtype: layers.Dtype = jnp.float32

  def modulation(self, cond):
    return layers.adaln_modulation(cond.c, cond.c.shape[-1], 6, self.dtype)

  def attention_update(self, x, shift, scale, gate, reverse, head_mask=None):
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift, scale).astype(self.dtype)
    return gate[:, None] * GatedLinearAttention(
        self.num_heads, implementation=self.gla_implementation, chunk_size=self.gla_chunk_size,
        dtype=self.dtype, name="attn")(h, reverse=reverse, head_mask=head_mask)

  def mlp_update(self, x, shift, scale, gate, group_mask=None):
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift, scale).astype(self.dtype)
    return gate[:, None] * SwiGLU(swiglu_hidden_size(x.shape[-1], self.mlp_ratio), self.dtype, name="mlp")(
        h, group_mask)

  def conv(self, x, reverse):
    x = DepthwiseConv(self.grid_size, dtype=self.dtype, name="dw_conv")(x, rotate=reverse)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

  @nn.compact
  def __call__(self, x, cond, reverse=False):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    x = x + self.attention_update(x, shift_msa, scale_msa, gate_msa, reverse)
    x = x + self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp)
    return self.conv(x, reverse), {}


def transpose_grid(x, grid_size):
  """(B, N, D) raster over an (e, e) grid -> the same tokens in column-major order."""
  batch, tokens, width = x.shape
  return x.reshape(batch, grid_size, grid_size, width).swapaxes(1, 2).reshape(batch, tokens, width)


def scheduled_block(block, x, cond, index, grid_size):
  """Block `index` of the direction schedule: reversed after every block, transposed after odd ones.

  The official code flips the sequence after every block, so odd blocks see it reversed (we run them
  anti-causally instead); it transposes the grid after odd blocks (a reversal commutes with that).
  `index` is a Python int, or a traced one inside a scan over blocks. Returns (x, aux).
  """
  odd = index % 2 == 1
  x, aux = block(x, cond, odd)
  if isinstance(odd, bool):
    return (transpose_grid(x, grid_size) if odd else x), aux
  return jax.lax.cond(odd, lambda x: transpose_grid(x, grid_size), lambda x: x, x), aux


class Model(layers.DiffusionBackbone):
  """DiG-{S,B,L,XL}/{2,4,8}; fields as DiT's plus the GLA implementation choice.

  `mlp_ratio` plays the role of fla's hidden_ratio (4): SwiGLU hidden = 256*ceil(floor(8D/3)/256).
  """
  gla_implementation: str = "auto"
  gla_chunk_size: int = 64

  def validate(self):
    super().validate()
    if self.depth % 4:
      raise ValueError(f"DiG needs model.depth to be a multiple of 4 (its four scan directions repeat every "
                       f"4 blocks and must end in raster order), got {self.depth}")
    if (self.hidden_size // 2) % self.num_heads:
      raise ValueError(f"DiG splits the key dim hidden_size/2={self.hidden_size // 2} into "
                       f"model.num_heads={self.num_heads} heads: not divisible")
    if self.gla_implementation not in gla.IMPLEMENTATIONS:
      raise ValueError(f"model.gla_implementation must be one of {gla.IMPLEMENTATIONS}, "
                       f"got {self.gla_implementation!r}")

  # Unrolled, the direction flag (block argument 3 under remat, counting self) is a Python bool. Scanned,
  # a block's place in the schedule is traced (lax.cond picks the GLA direction and the transpose); a
  # static turn of four blocks per scan step makes XLA:CPU recompute all four before any backward
  # (3.5 vs 1.1 GiB at 12544 tokens).
  block_static_argnums = (3,)

  def block_class(self):
    return DiGBlock

  def block_fields(self, train):
    del train
    return dict(num_heads=self.num_heads, grid_size=self.grid_size, mlp_ratio=self.mlp_ratio,
                gla_implementation=self.gla_implementation, gla_chunk_size=self.gla_chunk_size,
                dtype=self.compute_dtype)

  def block_step(self, block, x, cond, index):
    return scheduled_block(block, x, cond, index, self.grid_size)
