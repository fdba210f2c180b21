"""DyDiT's forward pass on what the routers keep: gathered heads and MLP groups, a fixed token capacity.

The masked model (`dyngen.models.dydit`) runs every unit and multiplies by 0/1 masks, so it costs what the
dense DiT costs. Here one step of sampling runs, per block l, on
  heads      `heads[l]` units: the qkv kernel / bias sliced to those heads, attention over them, the proj
             kernel rows of those heads (each row scaled by the head's 0/1 mask, so a padding head, a real
             head whose mask is 0, adds exactly nothing);
  MLP groups `groups[l]` of the H contiguous groups of the hidden: fc1 columns + bias of those groups, fc2
             rows of those groups (scaled by the group mask, as the heads');
  tokens     `tokens[l]` of the N tokens per row, the top-k by token-router logit: gathered, through the MLP
             above, scatter-added back times their 0/1 router decision (a selected token the router did not
             want adds nothing; an unselected one skips the MLP, as a skipped token of the masked model).
             With tokens[l] == N no gather: every token runs, times its decision (the masked model's sum).
Attention always sees every token. The capacities are Python ints (the program's static shapes); which
heads / groups are the rows of `BlockPlan` (traced: one program serves every step of those capacities).
When the capacities cover every unit and token the routers want, the output equals the masked model's up
to float32 summation order.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dyngen.models import attention as attention_lib
from dyngen.models import dydit
from dyngen.models import flops
from dyngen.models import layers

# Per block: (heads, groups, tokens) capacities; a model's signature is one per block.
BlockCapacity = tuple[int, int, int]


class BlockPlan(NamedTuple):
  """One block's units at one step: indices (int32) and 0/1 masks (float) of the gathered heads and groups.

  head_index, head_mask: (heads,); group_index, group_mask: (groups,). Indices are distinct units of [0, H).
  """
  head_index: jax.Array
  head_mask: jax.Array
  group_index: jax.Array
  group_mask: jax.Array


def _linear(x, kernel, bias, dtype):
  """x (..., K) @ kernel (K, F) + bias (F,) as one 2-D matmul (see `layers.rows_dot_general`)."""
  lead = x.shape[:-1]
  out = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
  return out.reshape(*lead, kernel.shape[-1]) + bias.astype(dtype)


def _layer_norm(x, dtype):
  return layers.layer_norm(dtype).apply({}, x)


def block(model: dydit.Model, p, x, cond: layers.Conditioning, plan: BlockPlan, tokens: int):
  """One DyDiT block on its gathered units. x: (B, N, D); p: the block's parameters (blocks_i).

  Returns (x, stats) with stats of (B,) rows: wanted (tokens the router wanted), kept (wanted and within
  the capacity: those whose MLP update was added), unwanted_run (selected tokens the router did not want).
  """
  dtype = model.compute_dtype
  batch, num_tokens, width = x.shape
  heads, head_dim = model.num_heads, width // model.num_heads
  modulation = _linear(jax.nn.silu(cond.c), p["adaLN_modulation"]["kernel"], p["adaLN_modulation"]["bias"], dtype)
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

  # Attention on the gathered heads.
  attn = p["attn"]
  h = layers.modulate(_layer_norm(x, dtype), shift_msa, scale_msa).astype(dtype)
  qkv_kernel = jnp.take(attn["qkv"]["kernel"], plan.head_index, axis=2)  # (D, 3, h, Dh)
  qkv_bias = jnp.take(attn["qkv"]["bias"], plan.head_index, axis=1)  # (3, h, Dh)
  count = plan.head_index.shape[0]
  qkv = _linear(h, qkv_kernel.reshape(width, -1), qkv_bias.reshape(-1), dtype)
  qkv = qkv.reshape(batch, num_tokens, 3, count, head_dim)
  out = attention_lib.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], model.attention,
                                            model.attention_chunk_size)  # (B, N, h, Dh)
  # The head mask on the proj rows instead of the activations: the same products, fewer multiplies.
  proj_kernel = jnp.take(attn["proj"]["kernel"], plan.head_index, axis=0)
  proj_kernel = proj_kernel * plan.head_mask[:, None, None].astype(proj_kernel.dtype)
  out = _linear(out.reshape(batch, num_tokens, count * head_dim), proj_kernel.reshape(-1, width),
                attn["proj"]["bias"], dtype)
  x = x + gate_msa[:, None] * out

  # Token routing on the residual stream after the attention update, as the masked block.
  logits = dydit.TokenRouter(dtype).apply({"params": p["token_router"]}, x)  # (B, N)
  wanted = dydit.binarize(logits, train=False, tau=model.router_tau, threshold=model.router_threshold)

  mlp = p["mlp"]
  hidden = mlp["fc1"]["kernel"].shape[-1]
  group_size = hidden // heads
  fc1_kernel = jnp.take(mlp["fc1"]["kernel"].reshape(width, heads, group_size), plan.group_index, axis=1)
  fc1_bias = jnp.take(mlp["fc1"]["bias"].reshape(heads, group_size), plan.group_index, axis=0)
  fc2_kernel = jnp.take(mlp["fc2"]["kernel"].reshape(heads, group_size, width), plan.group_index, axis=0)
  fc2_kernel = fc2_kernel * plan.group_mask[:, None, None].astype(fc2_kernel.dtype)
  fc1_kernel, fc1_bias = fc1_kernel.reshape(width, -1), fc1_bias.reshape(-1)
  fc2_kernel = fc2_kernel.reshape(-1, width)

  def mlp_update(x_rows):  # (B, k, D) -> (B, k, D), the gated MLP update of those tokens
    h = layers.modulate(_layer_norm(x_rows, dtype), shift_mlp, scale_mlp).astype(dtype)
    h = jax.nn.gelu(_linear(h, fc1_kernel, fc1_bias, dtype), approximate=True)
    return gate_mlp[:, None] * _linear(h, fc2_kernel, mlp["fc2"]["bias"], dtype)

  if tokens >= num_tokens:
    update = mlp_update(x)
    x = x + wanted[..., None].astype(update.dtype) * update
    kept = jnp.sum(wanted, axis=-1)
    unwanted_run = num_tokens - kept
  else:
    # Sorted indices: the gather and the scatter walk memory in order.
    chosen = jnp.sort(jax.lax.top_k(logits, tokens)[1], axis=-1)  # (B, k)
    chosen_wanted = jnp.take_along_axis(wanted, chosen, axis=-1)
    update = mlp_update(jnp.take_along_axis(x, chosen[..., None], axis=1))
    rows = jnp.arange(batch)[:, None]
    x = x.at[rows, chosen].add(chosen_wanted[..., None].astype(update.dtype) * update, indices_are_sorted=True,
                               unique_indices=True)
    kept = jnp.sum(chosen_wanted, axis=-1)
    unwanted_run = tokens - kept
  stats = dict(wanted=jnp.sum(wanted, axis=-1), kept=kept, unwanted_run=unwanted_run.astype(kept.dtype))
  return x, stats


def forward(model: dydit.Model, params, x, t, y, plans, capacities):
  """The DyDiT forward pass on gathered units. x: (B, H, W, C); t, y: (B,).

  params: the model's parameters, unscanned (blocks_0 ...) or scanned ("blocks", sliced here per block);
  plans: one `BlockPlan` per block; capacities: one (heads, groups, tokens) per block, equal to the plans'
  lengths for heads and groups.
  Returns (out (B, H, W, C_out) in at least float32, stats): stats hold, per row (B,), flops_ratio (the
  official ratio of what the masks kept: heads and groups with mask 1, tokens wanted and within capacity;
  padding counted as not computed) and, summed over the blocks, wanted, kept and unwanted_run token counts.
  """
  if len(plans) != model.depth or len(capacities) != model.depth:
    raise ValueError(f"need one plan and capacity per block ({model.depth}), got {len(plans)} and {len(capacities)}")
  dtype = model.compute_dtype
  tokens = layers.PatchEmbed(model.patch_size, model.hidden_size, dtype).apply(
      {"params": params["x_embedder"]}, x.astype(dtype))
  tokens = tokens + jnp.asarray(layers.sincos_pos_embed_2d(model.hidden_size, model.grid_size)).astype(tokens.dtype)
  t_emb = layers.TimestepEmbedder(model.hidden_size, dtype=dtype).apply({"params": params["t_embedder"]}, t)
  y_emb = layers.LabelEmbedder(model.num_classes, model.hidden_size, model.class_dropout_prob, dtype).apply(
      {"params": params["y_embedder"]}, y)
  cond = layers.Conditioning(t_emb + y_emb, t_emb)
  unit_macs = flops.dydit_unit_macs(model)
  weight_a = unit_macs.attention / (unit_macs.attention + unit_macs.mlp)
  weight_m = unit_macs.mlp / (unit_macs.attention + unit_macs.mlp)
  stats = layers.at_least_float32(dtype)
  ratio = jnp.zeros((x.shape[0],), stats)
  totals = {}
  for index, (plan, (_, _, capacity)) in enumerate(zip(plans, capacities)):
    p = (jax.tree.map(lambda a: a[index], params["blocks"]) if "blocks" in params else params[f"blocks_{index}"])
    tokens, block_stats = block(model, p, tokens, cond, plan, capacity)
    head_fraction = jnp.sum(plan.head_mask).astype(stats) / model.num_heads
    group_fraction = jnp.sum(plan.group_mask).astype(stats) / model.num_heads
    ratio = ratio + head_fraction * weight_a + group_fraction * block_stats["kept"].astype(stats) / model.num_tokens * weight_m
    for name, value in block_stats.items():
      totals[name] = totals.get(name, 0) + value.astype(stats)
  out = layers.FinalLayer(model.hidden_size, model.patch_size, model.out_channels, dtype).apply(
      {"params": params["final_layer"]}, tokens, cond.c)
  out = layers.unpatchify(out, model.patch_size, model.out_channels, model.grid_size)
  return out.astype(stats), dict(flops_ratio=ratio / model.depth, **totals)
