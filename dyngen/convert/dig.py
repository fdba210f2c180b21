"""hustvl/DiG state dicts -> dyngen.models.dig params.

Embedders, adaLN, final layer and pos_embed are DiT's (dyngen/convert/dit.py). Per block, torch layouts
(fla's GatedLinearAttention and GLAMLP as DiG uses them): q/k/v/g/o projections without bias, heads split
as (h d) with h outer; gk_proj = Sequential(Linear(D, 16, no bias), Linear(16, key_dim)); the per-head
RMSNorm-swish gate weight `g_norm_swish_gate.weight` (head_v,); mlp.gate_proj (2I, D) whose first I rows
are the gate and last I the value; mlp.down_proj (D, I); dw_conv a depthwise Conv2d (D, 1, 3, 3) with bias.
"""
from dyngen.convert import dit
from dyngen.convert import param_mapping as pm


def attention_rules(path, source):
  """fla GatedLinearAttention -> (D, H, Dh) head projections, (16, H, dk) gate up-projection, (H, Dv, D) o_proj."""
  rules = []
  for name in ("q_proj", "k_proj", "v_proj", "g_proj"):
    rules += pm.linear(f"{path}/{name}", f"{source}.{name}", in_axes=1, bias=False)
  return (rules
          + pm.linear(f"{path}/gk_proj_0", f"{source}.gk_proj.0", bias=False)
          + pm.linear(f"{path}/gk_proj_1", f"{source}.gk_proj.1", in_axes=1)
          + [pm.Rule(f"{path}/g_norm_swish_gate", f"{source}.g_norm_swish_gate.weight", pm.Flat())]
          + pm.linear(f"{path}/o_proj", f"{source}.o_proj", in_axes=2, bias=False))


def swiglu_rules(path, source):
  """GLAMLP: gate_proj rows [gate; value] -> (D, 2, I) kernel; down_proj (I, D)."""
  return (pm.linear(f"{path}/gate_proj", f"{source}.gate_proj", in_axes=1, bias=False)
          + pm.linear(f"{path}/down_proj", f"{source}.down_proj", bias=False))


def block_rules(index):
  path, source = f"blocks_{index}", f"blocks.{index}"
  return (attention_rules(f"{path}/attn", f"{source}.attn") + swiglu_rules(f"{path}/mlp", f"{source}.mlp")
          + dit.adaln_rules(path, source) + pm.conv(f"{path}/dw_conv", f"{source}.dw_conv"))


def param_rules(model):
  """(rules, fixed buffers) for a dyngen.models.dig.Model."""
  rules = dit.embedder_rules() + dit.final_layer_rules()
  for index in range(model.depth):
    rules += block_rules(index)
  return rules, [dit.pos_embed_buffer(model)]
