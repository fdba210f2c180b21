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
    out = attention.self_attention(qkv, self.implementation, self.chunk_size)
    if head_mask is not None:  # (B, H): DyDiT's per-head width routing multiplies before the projection.
      out = out * head_mask[:, None, :, None].astype(out.dtype)
    return layers.DenseGeneral(
        width, num_contract=2, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers.partitioned(layers.xavier_uniform_fused(width, width), ("heads", "kv", "embed")),
        bias_init=layers.partitioned(layers.zeros, ("embed",)), name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> GELU(tanh) -> fc2. x: (B, N, D) -> (B, N, D).

  `group_mask` (B, G) multiplies G contiguous groups of the hidden channels before the GELU (DyDiT's
  channel-group routing).
  """
  hidden_features: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, group_mask=None):
    h = layers.dense(self.hidden_features, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    if group_mask is not None:
      groups = group_mask.shape[-1]
      h = (h.reshape(*h.shape[:-1], groups, -1) * group_mask[:, None, :, None].astype(h.dtype)).reshape(h.shape)
    h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "act_mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += g1 * attn(mod(LN(x))); x += g2 * mlp(mod(LN(x))). x: (B, N, D) -> (x, {}).

  The two residual updates are methods so that DyDiT's block adds its routing around the same body.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  attention: str = "auto"
  attention_chunk_size: int = 1024
  dtype: layers.Dtype = jnp.float32

  def modulation(self, cond):
    """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), each (B, D)."""
    return layers.adaln_modulation(cond.c, cond.c.shape[-1], 6, self.dtype)

  def attention_update(self, x, shift, scale, gate, head_mask=None):
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift, scale).astype(self.dtype)
    return gate[:, None] * Attention(self.num_heads, self.attention, self.attention_chunk_size, self.dtype,
                                     name="attn")(h, head_mask)

  def mlp_update(self, x, shift, scale, gate, group_mask=None):
    h = layers.modulate(layers.layer_norm(self.dtype)(x), shift, scale).astype(self.dtype)
    return gate[:, None] * Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name="mlp")(h, group_mask)

  @nn.compact
  def __call__(self, x, cond):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    x = x + self.attention_update(x, shift_msa, scale_msa, gate_msa)
    x = x + self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), {}


class Model(layers.DiffusionBackbone):
  """DiT-{S,B,L,XL}/{2,4,8}; fields are the official constructor's arguments plus implementation choices."""
  attention: str = "auto"
  attention_chunk_size: int = 1024

  def block_class(self):
    return DiTBlock

  def block_fields(self, train):
    del train
    return dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, attention=self.attention,
                attention_chunk_size=self.attention_chunk_size, dtype=self.compute_dtype)
