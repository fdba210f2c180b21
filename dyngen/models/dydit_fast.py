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
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dyngen.models import attention as attention_lib
from dyngen.models import dydit
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


def linear(x, kernel, bias, dtype):
  """x (..., K) @ kernel (K, F) + bias (F,) (None: no bias) as one 2-D matmul (see `layers.rows_dot_general`)."""
  lead = x.shape[:-1]
  out = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype)).reshape(*lead, kernel.shape[-1])
  return out if bias is None else out + bias.astype(dtype)


def _layer_norm(x, dtype):
  return layers.layer_norm(dtype).apply({}, x)


def gather_block(model: dydit.Model, p, plan: BlockPlan):
  """A block's parameters (blocks_i) -> the slices its plan runs on, in the compute dtype.

  Gathered once per run of steps with the same units (not per step): on CPU the gather costs about a copy
  of the slices, a few percent of a step's matmul time at XL/2 if repeated every step.
  """
  dtype = model.compute_dtype
  width, heads = model.hidden_size, model.num_heads
  attn, mlp = p["attn"], p["mlp"]
  qkv_kernel = jnp.take(attn["qkv"]["kernel"], plan.head_index, axis=2).reshape(width, -1)  # (D, 3 h Dh)
  qkv_bias = jnp.take(attn["qkv"]["bias"], plan.head_index, axis=1).reshape(-1)
  # The head mask on the proj rows instead of the activations: the same products, fewer multiplies.
  proj_kernel = jnp.take(attn["proj"]["kernel"], plan.head_index, axis=0)
  proj_kernel = (proj_kernel * plan.head_mask[:, None, None].astype(proj_kernel.dtype)).reshape(-1, width)
  group_size = mlp["fc1"]["kernel"].shape[-1] // heads
  fc1_kernel = jnp.take(mlp["fc1"]["kernel"].reshape(width, heads, group_size), plan.group_index, axis=1)
  fc1_bias = jnp.take(mlp["fc1"]["bias"].reshape(heads, group_size), plan.group_index, axis=0)
  fc2_kernel = jnp.take(mlp["fc2"]["kernel"].reshape(heads, group_size, width), plan.group_index, axis=0)
  fc2_kernel = fc2_kernel * plan.group_mask[:, None, None].astype(fc2_kernel.dtype)
  cast = lambda a: a.astype(dtype)
  return dict(
      adaln_kernel=cast(p["adaLN_modulation"]["kernel"]), adaln_bias=cast(p["adaLN_modulation"]["bias"]),
      qkv_kernel=cast(qkv_kernel), qkv_bias=cast(qkv_bias), proj_kernel=cast(proj_kernel),
      proj_bias=cast(attn["proj"]["bias"]), token_router=p["token_router"],
      fc1_kernel=cast(fc1_kernel.reshape(width, -1)), fc1_bias=cast(fc1_bias.reshape(-1)),
      fc2_kernel=cast(fc2_kernel.reshape(-1, width)), fc2_bias=cast(mlp["fc2"]["bias"]),
      head_fraction=jnp.sum(plan.head_mask) / heads, group_fraction=jnp.sum(plan.group_mask) / heads)


def block(model: dydit.Model, g, x, cond: layers.Conditioning, tokens: int, index: int = 0, pooled: bool = False):
  """One DyDiT block on its gathered slices g (`gather_block`). x: (B, N, D); index: its place (unused);
  tokens, pooled: the token capacity (`token_routed_update`). Returns (x, stats) as `token_routed_update`.
  """
  del index
  dtype = model.compute_dtype
  batch, num_tokens, width = x.shape
  head_dim = width // model.num_heads
  modulation = linear(jax.nn.silu(cond.c), g["adaln_kernel"], g["adaln_bias"], dtype)
  shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

  # Attention on the gathered heads.
  h = layers.modulate(_layer_norm(x, dtype), shift_msa, scale_msa).astype(dtype)
  count = g["qkv_bias"].shape[0] // (3 * head_dim)  # gathered heads
  qkv = linear(h, g["qkv_kernel"], g["qkv_bias"], dtype).reshape(batch, num_tokens, 3, count, head_dim)
  out = attention_lib.self_attention(qkv, model.attention, model.attention_chunk_size)  # (B, N, h, Dh)
  out = linear(out.reshape(batch, num_tokens, -1), g["proj_kernel"], g["proj_bias"], dtype)
  x = x + gate_msa[:, None] * out

  def mlp_update(x_rows, per_token):  # (B', k, D) -> (B', k, D), the gated MLP update of those tokens
    h = _layer_norm(x_rows, dtype) * (1 + per_token(scale_mlp)) + per_token(shift_mlp)  # `layers.modulate`
    h = jax.nn.gelu(linear(h.astype(dtype), g["fc1_kernel"], g["fc1_bias"], dtype), approximate=True)
    return per_token(gate_mlp) * linear(h, g["fc2_kernel"], g["fc2_bias"], dtype)

  return token_routed_update(model, g["token_router"], x, mlp_update, tokens, pooled)


def token_routed_update(model, token_router, x, mlp_update, tokens: int, pooled: bool = False):
  """x + the MLP update of the tokens the router wants, at most `tokens` of them (both routed families).

  token_router: the block's token-router parameters, read on x (the stream after the attention update, as
  the masked block); mlp_update(x_rows (B', k, D), per_token) -> (B', k, D): the gated update of those
  rows, where per_token(a) maps a per-row (B, D) modulation to the tokens of x_rows (broadcastable).
  pooled: `tokens` per row on average, the top B·tokens of the whole batch (a row may run more than
  `tokens`, another fewer); else the top `tokens` of each row.
  Returns (x, stats) with stats of (B,) rows: wanted (tokens the router wanted), kept (wanted and within
  the capacity: those whose MLP update was added), unwanted_run (selected tokens the router did not want).
  """
  batch, num_tokens, width = x.shape
  logits = dydit.TokenRouter(model.compute_dtype).apply({"params": token_router}, x)  # (B, N)
  wanted = dydit.binarize(logits, train=False, tau=model.router_tau, threshold=model.router_threshold)
  per_row = lambda a: a[:, None]
  if tokens >= num_tokens:
    update = mlp_update(x, per_row)
    x = x + wanted[..., None].astype(update.dtype) * update
    kept = jnp.sum(wanted, axis=-1)
    unwanted_run = num_tokens - kept
  elif pooled:
    chosen = jnp.sort(jax.lax.top_k(logits.reshape(-1), batch * tokens)[1])  # (B·k,) flat token indices
    rows = chosen // num_tokens
    chosen_wanted = wanted.reshape(-1)[chosen]
    flat = x.reshape(-1, width)
    update = mlp_update(flat[chosen][None], lambda a: jnp.take(a, rows, axis=0)[None])[0]
    x = flat.at[chosen].add(chosen_wanted[:, None].astype(update.dtype) * update, indices_are_sorted=True,
                            unique_indices=True).reshape(x.shape)
    kept = jnp.zeros((batch,), chosen_wanted.dtype).at[rows].add(chosen_wanted)
    unwanted_run = jnp.zeros((batch,), chosen_wanted.dtype).at[rows].add(1 - chosen_wanted)
  else:
    # Sorted indices: the gather and the scatter walk memory in order.
    chosen = jnp.sort(jax.lax.top_k(logits, tokens)[1], axis=-1)  # (B, k)
    chosen_wanted = jnp.take_along_axis(wanted, chosen, axis=-1)
    update = mlp_update(jnp.take_along_axis(x, chosen[..., None], axis=1), per_row)
    rows = jnp.arange(batch)[:, None]
    x = x.at[rows, chosen].add(chosen_wanted[..., None].astype(update.dtype) * update, indices_are_sorted=True,
                               unique_indices=True)
    kept = jnp.sum(chosen_wanted, axis=-1)
    unwanted_run = tokens - kept
  stats = dict(wanted=jnp.sum(wanted, axis=-1), kept=kept, unwanted_run=unwanted_run.astype(kept.dtype))
  return x, stats


class Family(NamedTuple):
  """What a routed family supplies to the shared fast path (this module's frame, `routing_plan`).

  gather_block(model, block params, BlockPlan) -> the block's slices (a dict of arrays holding
    head_fraction and group_fraction, the fractions of heads / groups with mask 1);
  block(model, slices, x (B, N, D), cond, tokens, index, pooled) -> (x, stats as `token_routed_update`);
    index is the block's place in the stack (a Python int); tokens, pooled as `token_routed_update`'s.
  """
  gather_block: Callable
  block: Callable


def gather(model: dydit.Model, params, plans, family: Family | None = None):
  """The family's gather of every block (default DyDiT's): params unscanned (blocks_0 ...) or scanned
  ("blocks", sliced per block)."""
  family = family or DYDIT
  if len(plans) != model.depth:
    raise ValueError(f"need one plan per block ({model.depth}), got {len(plans)}")
  return [family.gather_block(model, jax.tree.map(lambda a: a[index], params["blocks"]) if "blocks" in params
                              else params[f"blocks_{index}"], plan) for index, plan in enumerate(plans)]


def forward(model: dydit.Model, params, x, t, y, plans, capacities, family: Family | None = None,
            pooled_tokens: bool = False):
  """`forward_gathered` on the slices of `plans` (one `BlockPlan` per block)."""
  return forward_gathered(model, params, gather(model, params, plans, family), x, t, y, capacities, family,
                          pooled_tokens)


def forward_gathered(model: dydit.Model, params, blocks, x, t, y, capacities, family: Family | None = None,
                     pooled_tokens: bool = False):
  """The routed model's forward pass on gathered slices (the family's blocks; default DyDiT's).
  x: (B, H, W, C); t, y: (B,); pooled_tokens: the token capacities pooled over the batch
  (`token_routed_update`'s `pooled`).

  params: the model's parameters (only the embedders and the final layer are read); blocks: `gather(...)`;
  capacities: one (heads, groups, tokens) per block, heads and groups equal to the gathered counts.
  Returns (out (B, H, W, C_out) in at least float32, stats): stats hold, per row (B,), flops_ratio (the
  official ratio of what the masks kept: heads and groups with mask 1, tokens wanted and within capacity;
  padding counted as not computed) and, summed over the blocks, wanted, kept and unwanted_run token counts.
  """
  if len(blocks) != model.depth or len(capacities) != model.depth:
    raise ValueError(f"need gathered slices and a capacity per block ({model.depth}), got {len(blocks)} and "
                     f"{len(capacities)}")
  dtype = model.compute_dtype
  tokens = layers.PatchEmbed(model.patch_size, model.hidden_size, dtype).apply(
      {"params": params["x_embedder"]}, x.astype(dtype))
  tokens = tokens + jnp.asarray(layers.sincos_pos_embed_2d(model.hidden_size, model.grid_size)).astype(tokens.dtype)
  t_emb = layers.TimestepEmbedder(model.hidden_size, dtype=dtype).apply({"params": params["t_embedder"]}, t)
  y_emb = layers.LabelEmbedder(model.num_classes, model.hidden_size, model.class_dropout_prob, dtype).apply(
      {"params": params["y_embedder"]}, y)
  cond = layers.Conditioning(t_emb + y_emb, t_emb)
  family = family or DYDIT
  unit_macs = model.unit_macs()
  weight_a = unit_macs.attention / (unit_macs.attention + unit_macs.mlp)
  weight_m = unit_macs.mlp / (unit_macs.attention + unit_macs.mlp)
  stats = layers.at_least_float32(dtype)
  ratio = jnp.zeros((x.shape[0],), stats)
  totals = {}
  for index, (g, (_, _, capacity)) in enumerate(zip(blocks, capacities)):
    tokens, block_stats = family.block(model, g, tokens, cond, capacity, index, pooled_tokens)
    ratio = ratio + (g["head_fraction"].astype(stats) * weight_a + g["group_fraction"].astype(stats)
                     * block_stats["kept"].astype(stats) / model.num_tokens * weight_m)
    for name, value in block_stats.items():
      totals[name] = totals.get(name, 0) + value.astype(stats)
  out = layers.FinalLayer(model.hidden_size, model.patch_size, model.out_channels, dtype).apply(
      {"params": params["final_layer"]}, tokens, cond.c)
  out = layers.unpatchify(out, model.patch_size, model.out_channels, model.grid_size)
  return out.astype(stats), dict(flops_ratio=ratio / model.depth, **totals)


DYDIT = Family(gather_block, block)
