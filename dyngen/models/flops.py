"""Analytic FLOPs of one forward pass, per sample.

Counted as the papers count them: one multiply-add is one flop (what fvcore reports), matmuls, linears and
convolutions only (norms, activations and softmax are free). `count_flops(model_config)` returns a dict of
components in flops; `gflops(model_config)` their sum / 1e9.
"""
import dataclasses

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


FAMILY_COUNTERS = {"dit": dit_macs}


def count_flops(model_config):
  """Per-sample forward flops (multiply-adds) by component."""
  try:
    counter = FAMILY_COUNTERS[model_config.name]
  except KeyError:
    raise ValueError(f"no FLOPs counter for model family {model_config.name!r}; "
                     f"known: {sorted(FAMILY_COUNTERS)}") from None
  return counter(model_config)


def gflops(model_config):
  return sum(count_flops(model_config).values()) / 1e9
