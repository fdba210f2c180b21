"""DyDiG: DyDiT's routing on DiG blocks (new in dyngen).

Per block, on top of DiG's body (its parameters under its names, so a DiG checkpoint warm-starts it):
  head_router   Linear(D -> H-1) on t_emb: which GLA heads run (head 0 always). The mask multiplies each
                head's gated output (after the RMSNorm-swish gate) before o_proj, so a skipped head's q, k,
                v, g slices, its recurrence and its o_proj rows do no work that reaches the output.
  mlp_router    Linear(D -> G-1) on t_emb: which of the G contiguous groups of the SwiGLU hidden run
                (silu(gate)·value masked per group before down_proj); G = `mlp_groups` (DiG's SwiGLU hidden,
                1024 ... 3072, is not a multiple of its head count, so G is a field of its own).
  token_router  DyDiT's, on the stream after the GLA update: a skipped token skips the SwiGLU update.
                The GLA and the depthwise conv see every token (the recurrence and the conv mix tokens).
Binarisation, initialisation (biases 15 / 15 / 35: the full model at the start) and `complete=True` are
DyDiT's (dyngen/models/dydit.py). The FLOPs ratio is counted the complete way: A covers the whole GLA
sublayer (q/k/v/g projections, low-rank gate, GLA core, norm-gate, o_proj), M the SwiGLU (in and down
projections); adaLN and the depthwise conv are not routed and, as in DyDiT's ratio, not counted.
"""
import flax.linen as nn

from dyngen.models import dig
from dyngen.models import dydit
from dyngen.models import flops


class DyDiGBlock(dig.DiGBlock):
  """DiG's block with width and token routing; returns (x, aux) as DyDiTBlock (mlp_mask (B, G))."""
  mlp_groups: int = 16
  train: bool = False
  complete: bool = False
  tau: float = 5.0
  threshold: float = 0.5

  @nn.compact
  def __call__(self, x, cond, reverse=False):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    x, aux = dydit.routed_updates(
        self, x, cond,
        lambda x, head_mask: self.attention_update(x, shift_msa, scale_msa, gate_msa, reverse, head_mask=head_mask),
        lambda x, group_mask: self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp, group_mask=group_mask),
        mlp_groups=self.mlp_groups)
    return self.conv(x, reverse), aux


class Model(dydit.RoutedModel, dig.Model):
  """DyDiG-{S,B,L,XL}/{2,4,8}: DiG's fields plus `mlp_groups` and the routing temperature and threshold.

  `__call__(x, t, y, train=False, force_drop=None, complete=False) -> (out, aux)` as DyDiT's.
  """
  mlp_groups: int = 16
  router_tau: float = 5.0
  router_threshold: float = 0.5

  warm_start_sources = ("dig",)

  def validate(self):
    super().validate()
    self.validate_routing(dig.swiglu_hidden_size(self.hidden_size, self.mlp_ratio), self.mlp_groups)

  def unit_macs(self):
    counts = flops.dig_macs(self, convention="complete")
    attention = sum(counts[name] for name in ("gla_projections", "gla_gate", "gla_core", "norm_gate"))
    return flops.UnitMacs(attention // self.depth, (counts["swiglu_in"] + counts["swiglu_out"]) // self.depth)

  def block_class(self):
    return DyDiGBlock

  def block_fields(self, train, complete=False):
    return dict(super().block_fields(train), mlp_groups=self.mlp_groups, train=train, complete=complete,
                tau=self.router_tau, threshold=self.router_threshold)

  @nn.compact
  def __call__(self, x, t, y, train=False, force_drop=None, complete=False):
    return self.outputs(*self.forward(x, t, y, train, force_drop, complete=complete))
