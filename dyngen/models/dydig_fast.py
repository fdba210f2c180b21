"""DyDiG's forward pass on what the routers keep: gathered GLA heads and SwiGLU groups, a token capacity.

The DiG-block side of the fast path (the plan, segments and programs are `dyngen.train.routing_plan`'s, the
frame and the token routing `dyngen.models.dydit_fast`'s). Per block l, on
  heads      `heads[l]` GLA heads: the q / k / v / g projection columns of those heads and the low-rank
             gate's second projection columns and bias (the rank-16 first projection is shared: every head
             reads it), the recurrence and the per-head RMSNorm-swish gate over those heads, and the o_proj
             rows of those heads times the head's 0/1 mask (the masked model multiplies the gated output
             before o_proj: the same products);
  groups     `groups[l]` of the G = `mlp_groups` contiguous groups of the SwiGLU hidden: the gate and value
             columns of those groups, the down_proj rows of those groups times the group mask;
  tokens     the top-k tokens by token-router logit through the SwiGLU (`dydit_fast.token_routed_update`).
The GLA and the depthwise conv see every token (the recurrence and the conv mix tokens); the direction
schedule is DiG's (odd blocks anti-causal with a rotated conv kernel, the grid transposed after them). When
the capacities cover every unit and token the routers want, the output equals the masked DyDiG's up to
float32 summation order.
"""
import itertools

import jax
import jax.numpy as jnp

from dyngen.models import dig
from dyngen.models import dydig
from dyngen.models import dydit_fast
from dyngen.models import layers


def gather_block(model: dydig.Model, p, plan: dydit_fast.BlockPlan):
  """A DyDiG block's parameters (blocks_i) -> the slices its plan runs on (compute dtype; the conv as is).

  The four head projections and the gate's low-rank input projection are fused into one kernel (one
  matmul per step instead of five).
  """
  dtype = model.compute_dtype
  width, groups = model.hidden_size, model.mlp_groups
  attn, mlp = p["attn"], p["mlp"]
  take_heads = lambda a, axis: jnp.take(a, plan.head_index, axis=axis)
  projections = [take_heads(attn[name]["kernel"], 1).reshape(width, -1)
                 for name in ("q_proj", "k_proj", "v_proj", "g_proj")]  # (D, h·Dk) twice, (D, h·Dv) twice
  in_kernel = jnp.concatenate(projections + [attn["gk_proj_0"]["kernel"]], axis=1)
  gate_kernel = take_heads(attn["gk_proj_1"]["kernel"], 1)  # (r, h, Dk)
  gate_bias = take_heads(attn["gk_proj_1"]["bias"], 0)  # (h, Dk)
  o_kernel = take_heads(attn["o_proj"]["kernel"], 0)  # (h, Dv, D)
  o_kernel = o_kernel * plan.head_mask[:, None, None].astype(o_kernel.dtype)
  hidden = mlp["down_proj"]["kernel"].shape[0]
  group_size = hidden // groups
  gate_value = mlp["gate_proj"]["kernel"].reshape(width, 2, groups, group_size)
  gate_value = jnp.take(gate_value, plan.group_index, axis=2)  # (D, 2, g, F/G)
  down = jnp.take(mlp["down_proj"]["kernel"].reshape(groups, group_size, width), plan.group_index, axis=0)
  down = down * plan.group_mask[:, None, None].astype(down.dtype)
  cast = lambda a: a.astype(dtype)
  return dict(
      adaln_kernel=cast(p["adaLN_modulation"]["kernel"]), adaln_bias=cast(p["adaLN_modulation"]["bias"]),
      in_kernel=cast(in_kernel), gate_kernel=cast(gate_kernel.reshape(gate_kernel.shape[0], -1)),
      gate_bias=cast(gate_bias.reshape(-1)), norm_weight=attn["g_norm_swish_gate"],
      o_kernel=cast(o_kernel.reshape(-1, width)), token_router=p["token_router"],
      gate_value_kernel=cast(gate_value.reshape(width, -1)), down_kernel=cast(down.reshape(-1, width)),
      dw_conv=p["dw_conv"],
      head_fraction=jnp.sum(plan.head_mask) / model.num_heads, group_fraction=jnp.sum(plan.group_mask) / groups)


def block(model: dydig.Model, g, x, cond: layers.Conditioning, tokens: int, index: int, pooled: bool = False):
  """DyDiG block `index` of the direction schedule on its gathered slices g (`gather_block`). x: (B, N, D)
  in physical order; tokens, pooled: the token capacity. Returns (x, stats) as
  `dydit_fast.token_routed_update`."""
  dtype = model.compute_dtype
  stats_dtype = layers.at_least_float32(dtype)
  batch, num_tokens, width = x.shape
  reverse = index % 2 == 1
  gla_fields = dig.GatedLinearAttention  # DiG's defaults: expand_k, expand_v, the gate's normaliser
  key_dim = int(width * gla_fields.expand_k) // model.num_heads
  value_dim = int(width * gla_fields.expand_v) // model.num_heads
  heads = g["gate_bias"].shape[0] // key_dim  # gathered heads
  modulation = dydit_fast.linear(jax.nn.silu(cond.c), g["adaln_kernel"], g["adaln_bias"], dtype)
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

  # GLA on the gathered heads; every token.
  h = layers.modulate(layers.layer_norm(dtype).apply({}, x), shift_msa, scale_msa).astype(dtype)
  projected = dydit_fast.linear(h, g["in_kernel"], None, dtype)
  sizes = [heads * key_dim, heads * key_dim, heads * value_dim, heads * value_dim]
  q, k, v, gate_in, low_rank = jnp.split(projected, list(itertools.accumulate(sizes)), axis=-1)
  q, k = (a.reshape(batch, num_tokens, heads, key_dim) for a in (q, k))
  v, gate_in = (a.reshape(batch, num_tokens, heads, value_dim) for a in (v, gate_in))
  gate_logits = dydit_fast.linear(low_rank, g["gate_kernel"], g["gate_bias"], dtype)
  gate_logits = gate_logits.reshape(batch, num_tokens, heads, key_dim).astype(stats_dtype)
  log_alpha = jax.nn.log_sigmoid(gate_logits) / gla_fields.gate_logit_normalizer
  o = dig.gla.gated_linear_attention(q, k, v, log_alpha, chunk_size=model.gla_chunk_size, reverse=reverse,
                                     implementation=model.gla_implementation)
  # The per-head RMSNorm-swish gate, as `dig.GatedLinearAttention`.
  o = o.astype(stats_dtype)
  o = o * jax.lax.rsqrt(jnp.mean(o ** 2, axis=-1, keepdims=True) + 1e-6)
  o = (o * g["norm_weight"] * jax.nn.silu(gate_in.astype(stats_dtype))).astype(dtype)
  out = dydit_fast.linear(o.reshape(batch, num_tokens, -1), g["o_kernel"], None, dtype)
  x = x + gate_msa[:, None] * out

  def mlp_update(x_rows, per_token):  # (B', k, D) -> (B', k, D), the gated SwiGLU update of those tokens
    h = layers.layer_norm(dtype).apply({}, x_rows) * (1 + per_token(scale_mlp)) + per_token(shift_mlp)
    gate_value = dydit_fast.linear(h.astype(dtype), g["gate_value_kernel"], None, dtype)
    gate_value = gate_value.reshape(*h.shape[:-1], 2, -1)
    hidden = jax.nn.silu(gate_value[..., 0, :]) * gate_value[..., 1, :]
    return per_token(gate_mlp) * dydit_fast.linear(hidden, g["down_kernel"], None, dtype)

  x, stats = dydit_fast.token_routed_update(model, g["token_router"], x, mlp_update, tokens, pooled)
  x = dig.DepthwiseConv(model.grid_size, dtype=dtype).apply({"params": g["dw_conv"]}, x, rotate=reverse)
  return (dig.transpose_grid(x, model.grid_size) if reverse else x), stats


DYDIG = dydit_fast.Family(gather_block, block)
