"""facebookresearch/DiT state dicts -> dyngen.models.dit params.

The rule builders for the parts every family inherits from DiT (embedders, adaLN, attention, MLP, final
layer, pos_embed) live here and are imported by the DiG and DyDiT tables.

torch layouts (official code): Linear weight (out, in); qkv rows [q; k; v], each head-major; adaLN chunks
in the order the model splits them (kept); final linear outputs ordered (p, q, c) (kept); the patch
embedder is a stride-p Conv2d (D, C, p, p).
"""
from dyngen.convert import param_mapping as pm
from dyngen.models import layers


def embedder_rules():
  """x_embedder (patch conv), t_embedder (Linear-SiLU-Linear), y_embedder (label table with null row)."""
  return (pm.conv("x_embedder/proj", "x_embedder.proj")
          + pm.linear("t_embedder/fc1", "t_embedder.mlp.0")
          + pm.linear("t_embedder/fc2", "t_embedder.mlp.2")
          + pm.embedding("y_embedder/embedding_table", "y_embedder.embedding_table"))


def adaln_rules(path, source):
  """torch `adaLN_modulation = Sequential(SiLU, Linear)`: the Linear is index 1."""
  return pm.linear(f"{path}/adaLN_modulation", f"{source}.adaLN_modulation.1")


def attention_rules(path, source):
  """timm Attention: fused qkv -> (D, 3, H, Dh) kernel, proj -> (H, Dh, D) kernel."""
  return pm.linear(f"{path}/qkv", f"{source}.qkv", in_axes=1) + pm.linear(f"{path}/proj", f"{source}.proj",
                                                                          in_axes=2)


def mlp_rules(path, source):
  return pm.linear(f"{path}/fc1", f"{source}.fc1") + pm.linear(f"{path}/fc2", f"{source}.fc2")


def final_layer_rules():
  return adaln_rules("final_layer", "final_layer") + pm.linear("final_layer/linear", "final_layer.linear")


def pos_embed_buffer(model):
  """The fixed sin-cos table (1, T, D): equal to the model's unless the checkpoint has another grid."""
  table = layers.sincos_pos_embed_2d(model.hidden_size, model.grid_size)[None]
  # Both sides evaluate the same float64 formula and round to float32; 1e-6 allows for libm differences.
  return pm.FixedBuffer("pos_embed", table, atol=1e-6,
                        hint=f"the model has a {model.grid_size}x{model.grid_size} token grid "
                             f"(input_size={model.input_size}, patch_size={model.patch_size}); "
                             "the checkpoint was trained with another input_size or patch_size")


def block_rules(index):
  path, source = f"blocks_{index}", f"blocks.{index}"
  return (attention_rules(f"{path}/attn", f"{source}.attn") + mlp_rules(f"{path}/mlp", f"{source}.mlp")
          + adaln_rules(path, source))


def param_rules(model):
  """(rules, fixed buffers) for a dyngen.models.dit.Model."""
  rules = embedder_rules() + final_layer_rules()
  for index in range(model.depth):
    rules += block_rules(index)
  return rules, [pos_embed_buffer(model)]
