"""DyDiT: DiT with timestep-wise dynamic width and spatial-wise dynamic tokens (Zhao et al., ICLR 2025).

Per block, on top of DiT's body (the same parameters under the same names, so a DiT checkpoint warm-starts it):
  head_router   Linear(D -> H-1) on the raw timestep embedding t_emb: which attention heads run (head 0 always);
                the head mask multiplies each head's attention output before `proj`.
  mlp_router    Linear(D -> H-1) on t_emb: which of the H contiguous groups of MLP hidden channels run
                (group 0 always), masked before the GELU.
  token_router  Linear(D -> D/16) -> ReLU -> Linear(D/16 -> 1) on the residual stream after the attention
                update: which tokens run the MLP; a skipped token skips the whole MLP update, gate included.
                Attention always sees every token.
Masks are binarised with a Gumbel-sigmoid at train time (logistic noise = the difference of two Gumbels,
τ = 5, threshold 0.5, straight-through: hard forward, sigmoid-slope backward; noise from the "gumbel" rng
stream) and as sigmoid(logit) > 0.5 without noise at eval. Router biases start at 15 / 15 / 35, so a fresh
model routes everything: the full DiT. `complete=True` bypasses the routers (the dense model).

This module computes the masked reference: every unit runs and masks multiply, as the official code does.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dyngen.models import dit
from dyngen.models import flops
from dyngen.models import layers

# The official initialisation of the router biases: every unit on at the start of fine-tuning.
HEAD_ROUTER_BIAS_INIT = 15.0
MLP_ROUTER_BIAS_INIT = 15.0
TOKEN_ROUTER_BIAS_INIT = 35.0
# The token router's hidden width is D / TOKEN_ROUTER_REDUCTION.
TOKEN_ROUTER_REDUCTION = 16


def binarize(logits, *, train, tau, threshold, make_rng=None):
  """0/1 decisions of the same shape as `logits`, in at least float32.

  train: Gumbel-sigmoid with straight-through gradients, y = hard + (soft - stop_gradient(soft)), whose
  value is exactly `hard` and whose gradient is the slope of soft = sigmoid((logits + L) / tau),
  L ~ Logistic(0, 1) drawn from `make_rng()`. eval: sigmoid(logits) > threshold, no noise, no gradient.
  """
  logits = logits.astype(layers.at_least_float32(logits.dtype))
  if not train:
    return (jax.nn.sigmoid(logits) > threshold).astype(logits.dtype)
  noise = jax.random.logistic(make_rng(), logits.shape, logits.dtype)
  soft = jax.nn.sigmoid((logits + noise) / tau)
  hard = (soft > threshold).astype(logits.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))


def with_always_on_unit(decisions):
  """(B, H-1) router decisions -> (B, H) mask with unit 0 always on."""
  return jnp.concatenate([jnp.ones_like(decisions[:, :1]), decisions], axis=1)


def width_router(num_units, bias_init, dtype, name):
  """Linear(D -> num_units - 1): t_emb (B, D) -> logits of the router-controlled heads or channel groups."""
  return layers.dense(num_units - 1, ("embed", None), bias_init=nn.initializers.constant(bias_init), dtype=dtype,
                      name=name)


class TokenRouter(nn.Module):
  """x (B, N, D) -> logits (B, N): Linear(D -> D/16) -> ReLU -> Linear(D/16 -> 1)."""
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = x.shape[-1] // TOKEN_ROUTER_REDUCTION
    h = nn.relu(layers.dense(hidden, ("embed", None), dtype=self.dtype, name="fc1")(x))
    logits = layers.dense(1, (None, None), bias_init=nn.initializers.constant(TOKEN_ROUTER_BIAS_INIT),
                          dtype=self.dtype, name="fc2")(h)
    return logits[..., 0]


def routed_updates(block, x, cond, attention_update, mlp_update, mlp_groups):
  """The two residual updates of a routed block (DyDiT's on a DiT block, DyDiG's on a DiG block).

  Called from `block`'s compact `__call__` (its fields train, complete, tau, threshold, num_heads, dtype);
  the routers are created in its scope. attention_update(x, head_mask) and mlp_update(x, group_mask) return
  the gated updates (masks None = all units). Returns (x, aux) with aux {} when `block.complete`.
  """
  def decide(logits):
    return binarize(logits, train=block.train, tau=block.tau, threshold=block.threshold,
                    make_rng=lambda: block.make_rng("gumbel"))

  # The routers are created (and their parameters exist) in both modes; `complete` only ignores them.
  head_logits = width_router(block.num_heads, HEAD_ROUTER_BIAS_INIT, block.dtype, "head_router")(cond.t_emb)
  mlp_logits = width_router(mlp_groups, MLP_ROUTER_BIAS_INIT, block.dtype, "mlp_router")(cond.t_emb)
  if block.complete:
    x = x + attention_update(x, None)
    TokenRouter(block.dtype, name="token_router")(x)
    return x + mlp_update(x, None), {}

  head_mask = with_always_on_unit(decide(head_logits))
  x = x + attention_update(x, head_mask)
  token_logits = TokenRouter(block.dtype, name="token_router")(x)
  token_mask = decide(token_logits)
  mlp_mask = with_always_on_unit(decide(mlp_logits))
  update = mlp_update(x, mlp_mask)
  x = x + token_mask[..., None].astype(update.dtype) * update
  stats = layers.at_least_float32(block.dtype)
  aux = dict(head_mask=head_mask, mlp_mask=mlp_mask, token_mask=token_mask, head_logits=head_logits.astype(stats),
             mlp_logits=mlp_logits.astype(stats), token_logits=token_logits.astype(stats))
  return x, aux


class DyDiTBlock(dit.DiTBlock):
  """DiT's block with width and token routing. x: (B, N, D), cond: layers.Conditioning -> (x, aux).

  aux (empty when `complete`): head_mask, mlp_mask (B, H) and token_mask (B, N) as 0/1 floats (always-on
  units included), and the pre-threshold head_logits, mlp_logits (B, H-1) and token_logits (B, N).
  """
  train: bool = False
  complete: bool = False
  tau: float = 5.0
  threshold: float = 0.5

  @nn.compact
  def __call__(self, x, cond):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    x, aux = routed_updates(
        self, x, cond,
        lambda x, head_mask: self.attention_update(x, shift_msa, scale_msa, gate_msa, head_mask=head_mask),
        lambda x, group_mask: self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp, group_mask=group_mask),
        mlp_groups=self.num_heads)
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), aux


class RoutedModel:
  """What DyDiT and DyDiG share on top of their dense family's Model (a mixin: methods, no fields).

  Subclasses set `unit_macs()` -> flops.UnitMacs (A, M per block at full width).
  """
  block_rng_streams = ("gumbel",)
  returns_aux = True
  warm_start_new_modules = ("head_router", "mlp_router", "token_router")

  def validate_routing(self, mlp_hidden, mlp_groups):
    if self.num_heads < 2:
      raise ValueError(f"routing keeps head 0 and routes heads 1..H-1: model.num_heads must be >= 2, "
                       f"got {self.num_heads}")
    if mlp_groups < 2 or mlp_hidden % mlp_groups:
      raise ValueError(f"the MLP hidden ({mlp_hidden}) is cut into {mlp_groups} routed channel groups: it must be "
                       ">= 2 groups that divide it")
    if self.hidden_size < TOKEN_ROUTER_REDUCTION:
      raise ValueError(f"the token router's hidden width is hidden_size / {TOKEN_ROUTER_REDUCTION}: "
                       f"model.hidden_size must be >= {TOKEN_ROUTER_REDUCTION}, got {self.hidden_size}")
    if not self.router_tau > 0:
      raise ValueError(f"model.router_tau must be > 0, got {self.router_tau}")
    if not 0 < self.router_threshold < 1:
      raise ValueError(f"model.router_threshold must be in (0, 1), got {self.router_threshold}")

  def outputs(self, out, aux):
    if not aux:
      return out, {}
    aux = {name: jnp.moveaxis(value, 0, 1) for name, value in aux.items()}  # (L, B, ...) -> (B, L, ...)
    unit_macs = self.unit_macs()
    aux["flops_ratio"] = flops.dydit_flops_ratio(aux["head_mask"], aux["mlp_mask"], aux["token_mask"],
                                                 unit_macs.attention, unit_macs.mlp)
    return out, aux


class Model(RoutedModel, dit.Model):
  """DyDiT-{S,B,L,XL}/{2,4,8}: DiT's fields plus the routing temperature and threshold.

  `__call__(x, t, y, train=False, force_drop=None, complete=False) -> (out, aux)`: out as DiT's; aux holds
  head_mask, mlp_mask (B, L, H), token_mask (B, L, N), the logits of each (B, L, H-1) / (B, L, N), and
  flops_ratio (B,), the official FLOPs ratio of the sample; with `complete=True` aux is {} (dense model).
  Training draws the Gumbel noise from the "gumbel" rng stream.
  """
  router_tau: float = 5.0
  router_threshold: float = 0.5

  # Warm start (config.init_from): a DiT checkpoint fills everything but the routers, which start fresh.
  warm_start_sources = ("dit",)

  def validate(self):
    super().validate()
    self.validate_routing(int(self.hidden_size * self.mlp_ratio), self.num_heads)

  def unit_macs(self):
    return flops.dydit_unit_macs(self)

  def block_class(self):
    return DyDiTBlock

  def block_fields(self, train, complete=False):
    return dict(super().block_fields(train), train=train, complete=complete, tau=self.router_tau,
                threshold=self.router_threshold)

  @nn.compact
  def __call__(self, x, t, y, train=False, force_drop=None, complete=False):
    return self.outputs(*self.forward(x, t, y, train, force_drop, complete=complete))


def width_masks(model: Model, params, t):
  """Eval-mode head and MLP-group masks for timesteps t (S,), from the routers alone (no image needed).

  The width routers read only the timestep embedding, so the masks of every sample at a step are these.
  Returns {"head_mask", "mlp_mask"}: (S, L, H) 0/1, unit 0 always on.
  """
  dtype = model.compute_dtype
  t_emb = layers.TimestepEmbedder(model.hidden_size, dtype=dtype).apply({"params": params["t_embedder"]}, t)
  blocks = params["blocks"] if "blocks" in params else None

  def router(index, name):
    layer = (jax.tree.map(lambda p: p[index], blocks) if blocks is not None else params[f"blocks_{index}"])[name]
    logits = t_emb @ layer["kernel"].astype(dtype) + layer["bias"].astype(dtype)
    decisions = binarize(logits, train=False, tau=model.router_tau, threshold=model.router_threshold)
    return with_always_on_unit(decisions)

  return {name: jnp.stack([router(i, router_name) for i in range(model.depth)], axis=1)
          for name, router_name in (("head_mask", "head_router"), ("mlp_mask", "mlp_router"))}
