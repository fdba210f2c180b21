"""Analytic FLOPs of one forward pass, per sample, and DyDiT's FLOPs ratio.

Counted as the papers count them: one multiply-add is one flop (what fvcore reports), matmuls, linears and
convolutions only (norms, activations and softmax are free). `count_flops(model_config)` returns a dict of
components in flops; `gflops(model_config)` their sum / 1e9.
"""
import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

FREQUENCY_EMBEDDING_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Shape:
  tokens: int
  width: int
  depth: int
  patch_size: int
  in_channels: int
  out_channels: int

  @classmethod
  def of(cls, model_config):
    grid = model_config.input_size // model_config.patch_size
    out_channels = model_config.in_channels * (2 if model_config.learn_sigma else 1)
    return cls(grid * grid, model_config.hidden_size, model_config.depth, model_config.patch_size,
               model_config.in_channels, out_channels)


def attention_macs(tokens, width):
  """qkv + proj projections (4ND²) and the two (N, N) products (2N²D) of softmax attention."""
  return 4 * tokens * width ** 2 + 2 * tokens ** 2 * width


def mlp_macs(tokens, width, hidden):
  return 2 * tokens * width * hidden


def frame_macs(s: Shape):
  """Everything outside the blocks: patch embedding, timestep MLP, final adaLN and linear."""
  return dict(
      patch_embed=s.tokens * s.width * s.patch_size ** 2 * s.in_channels,
      timestep_embed=FREQUENCY_EMBEDDING_SIZE * s.width + s.width ** 2,
      final_layer=2 * s.width ** 2 + s.tokens * s.width * s.patch_size ** 2 * s.out_channels,
  )


def dit_macs(model_config):
  s = Shape.of(model_config)
  hidden = int(s.width * model_config.mlp_ratio)
  counts = frame_macs(s)
  counts["adaln"] = s.depth * 6 * s.width ** 2
  counts["attention"] = s.depth * attention_macs(s.tokens, s.width)
  counts["mlp"] = s.depth * mlp_macs(s.tokens, s.width, hidden)
  return counts


def dig_macs(model_config, convention="complete"):
  """DiG blocks: GLA projections, low-rank gate, SwiGLU, depthwise conv; per-head key dim D/2/H.

  convention "paper" leaves out what the DiG paper's fvcore count cannot see (the Triton GLA core, the
  jiterator SwiGLU down-projection, the fused norm-gate); "complete" counts them, the GLA core in its
  recurrent form (2 * key_dim * head_v_dim per token: state update and readout).
  """
  from dyngen.models import dig  # Local import: dig imports the Pallas kernels package.
  s = Shape.of(model_config)
  key_dim, value_dim = s.width // 2, s.width
  head_v = value_dim // model_config.num_heads
  hidden = dig.swiglu_hidden_size(s.width, model_config.mlp_ratio)
  low_rank = 16
  counts = frame_macs(s)
  counts["adaln"] = s.depth * 6 * s.width ** 2
  counts["gla_projections"] = s.depth * s.tokens * s.width * (2 * key_dim + 2 * value_dim + value_dim)
  counts["gla_gate"] = s.depth * s.tokens * low_rank * (s.width + key_dim)
  counts["swiglu_in"] = s.depth * s.tokens * s.width * 2 * hidden
  counts["depthwise_conv"] = s.depth * s.tokens * s.width * 9
  if convention == "complete":
    counts["gla_core"] = s.depth * s.tokens * 2 * key_dim * head_v
    counts["swiglu_out"] = s.depth * s.tokens * hidden * s.width
    counts["norm_gate"] = s.depth * s.tokens * 2 * value_dim
  elif convention != "paper":
    raise ValueError(f"convention must be 'complete' or 'paper', got {convention!r}")
  return counts


# A dense DyDiT (DyDiG) is a DiT (DiG): its routers (< 0.1% of a block) are not counted, as DyDiT's paper.
FAMILY_COUNTERS = {"dit": dit_macs, "dig": dig_macs, "dydit": dit_macs, "dydig": dig_macs}


def count_flops(model_config, **kwargs):
  """Per-sample forward flops (multiply-adds) by component; kwargs go to the family's counter."""
  try:
    counter = FAMILY_COUNTERS[model_config.name]
  except KeyError:
    raise ValueError(f"no FLOPs counter for model family {model_config.name!r}; "
                     f"known: {sorted(FAMILY_COUNTERS)}") from None
  return counter(model_config, **kwargs)


def gflops(model_config, **kwargs):
  return sum(count_flops(model_config, **kwargs).values()) / 1e9


class UnitMacs(NamedTuple):
  """Multiply-adds of one block's routed parts at full width: attention A and MLP M (per sample)."""
  attention: int
  mlp: int


def dydit_unit_macs(model_config):
  """DyDiT's A = 4ND² + 2N²D and M = 2N·D·hidden (8ND² at mlp_ratio 4) for the model's own N and D.

  The official loss.py hard-codes them for 256 tokens (S/2: A 0.2013, M 0.3020 GMACs); they are computed
  here from the config, so another resolution or patch size gets its own.
  """
  s = Shape.of(model_config)
  return UnitMacs(attention_macs(s.tokens, s.width), mlp_macs(s.tokens, s.width, int(s.width * model_config.mlp_ratio)))


def dydit_flops_ratio(head_mask, mlp_mask, token_mask, attention, mlp):
  """The official per-sample FLOPs ratio Σ_l [f_head·A + f_group·f_token·M] / (L·(A + M)).

  head_mask, mlp_mask: (B, L, H) 0/1 with the always-on unit included; token_mask: (B, L, N);
  attention, mlp: A and M (`dydit_unit_macs`). Returns (B,) in the masks' float dtype; differentiable
  (the straight-through gradients of the masks flow through it).
  """
  head_fraction = jnp.mean(head_mask, axis=-1)
  group_fraction = jnp.mean(mlp_mask, axis=-1)
  token_fraction = jnp.mean(token_mask, axis=-1)
  # Normalised weights as Python floats: M alone exceeds int32 at XL/2.
  attention_weight, mlp_weight = attention / (attention + mlp), mlp / (attention + mlp)
  routed = head_fraction * attention_weight + group_fraction * token_fraction * mlp_weight
  return jnp.mean(routed, axis=-1)
