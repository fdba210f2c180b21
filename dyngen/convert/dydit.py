"""alibaba-damo-academy/DyDiT state dicts -> dyngen.models.dydit params.

Everything DiT has maps as DiT's (dyngen/convert/dit.py); per block the routers are added:
  attn_rate.router (Linear D -> H-1)            -> blocks_i/head_router
  mlp_rate.router (Linear D -> H-1)             -> blocks_i/mlp_router
  token_selection.mlp_head.{0,2} (Linear-ReLU-Linear) -> blocks_i/token_router/fc{1,2}
The official DynaLinear / DynaQKVLinear layers at width_mult 1 hold plain Linear weights (out, in).
"""
from dyngen.convert import dit
from dyngen.convert import param_mapping as pm


def router_rules(index):
  path, source = f"blocks_{index}", f"blocks.{index}"
  return (pm.linear(f"{path}/head_router", f"{source}.attn_rate.router")
          + pm.linear(f"{path}/mlp_router", f"{source}.mlp_rate.router")
          + pm.linear(f"{path}/token_router/fc1", f"{source}.token_selection.mlp_head.0")
          + pm.linear(f"{path}/token_router/fc2", f"{source}.token_selection.mlp_head.2"))


def param_rules(model):
  """(rules, fixed buffers) for a dyngen.models.dydit.Model."""
  rules, buffers = dit.param_rules(model)
  for index in range(model.depth):
    rules += router_rules(index)
  return rules, buffers
