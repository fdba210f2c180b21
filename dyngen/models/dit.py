"""DiT: the baseline diffusion transformer (Peebles & Xie 2023), adaLN-Zero blocks with softmax attention."""
import flax.linen as nn
import jax.numpy as jnp

from dyngen.models import attention
from dyngen.models import layers


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection. x: (B, N, D) -> (B, N, D)."""
  num_heads: int
  implementation: str = "auto"
  chunk_size: int = 1024
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, head_mask=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    qkv = layers.DenseGeneral(
        (3, self.num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.xavier_uniform_fused(width, 3 * width),
                                       ("embed", None, "heads", "kv")),
        bias_init=layers.partitioned(layers.zeros, (None, "heads", "kv")), name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = attention.dot_product_attention(q, k, v, self.implementation, self.chunk_size)
    if head_mask is not None:  # (B, H): DyDiT's per-head width routing multiplies before the projection.
      out = out * head_mask[:, None, :, None].astype(out.dtype)
    return layers.DenseGeneral(
        width, num_contract=2, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.xavier_uniform_fused(width, width), ("heads", "kv", "embed")),
        bias_init=layers.partitioned(layers.zeros, ("embed",)), name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> GELU(tanh) -> fc2. x: (B, N, D) -> (B, N, D)."""
  hidden_features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = layers.dense(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "act_mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x))). x: (B, N, D), c: (B, D)."""
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  attention_chunk_size: int = 1024
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    width = x.shape[-1]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = layers.adaln_modulation(
        c, width, 6, self.dtype)
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift_msa, scale_msa).astype(self.dtype)
    x = x + gate_msa[:, None] * Attention(self.num_heads, self.attention, self.attention_chunk_size, self.dtype,
                                          name="attn")(h)
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift_mlp, scale_mlp).astype(self.dtype)
    x = x + gate_mlp[:, None] * Mlp(int(width * self.mlp_ratio), self.dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))


class Model(layers.DiffusionBackbone):
  """DiT-{S,B,L,XL}/{2,4,8}; fields are the official constructor's arguments plus implementation choices."""
  attention: str = "auto"
  attention_chunk_size: int = 1024

  def blocks(self, x, c, train):
    # Inside a scan, remat needs no CSE barrier (the loop already keeps the recomputation apart).
    block_cls = nn.remat(DiTBlock, prevent_cse=not self.scan_blocks) if self.remat else DiTBlock

    def block(name):
      return block_cls(self.num_heads, self.mlp_ratio, self.attention, self.attention_chunk_size,
                       self.compute_dtype, name=name)

    if self.scan_blocks:
      return self.scan_over_blocks(lambda block, x, c: block(x, c), block("blocks"), x, c)
    for i in range(self.depth):
      x = block(f"blocks_{i}")(x, c)
    return x
