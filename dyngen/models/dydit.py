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


class DyDiTBlock(dit.DiTBlock):
  """DiT's block with width and token routing. x: (B, N, D), cond: layers.Conditioning -> (x, aux).

  aux (empty when `complete`): head_mask, mlp_mask (B, H) and token_mask (B, N) as 0/1 floats (always-on
  units included), and the pre-threshold head_logits, mlp_logits (B, H-1) and token_logits (B, N).
  """
  train: bool = False
  complete: bool = False
  tau: float = 5.0
  threshold: float = 0.5

  def decide(self, logits):
    return binarize(logits, train=self.train, tau=self.tau, threshold=self.threshold,
                    make_rng=lambda: self.make_rng("gumbel"))

  @nn.compact
  def __call__(self, x, cond):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(cond)
    # The routers are created (and their parameters exist) in both modes; `complete` only ignores them.
    head_logits = width_router(self.num_heads, HEAD_ROUTER_BIAS_INIT, self.dtype, "head_router")(cond.t_emb)
    mlp_logits = width_router(self.num_heads, MLP_ROUTER_BIAS_INIT, self.dtype, "mlp_router")(cond.t_emb)
    if self.complete:
      x = x + self.attention_update(x, shift_msa, scale_msa, gate_msa)
      TokenRouter(self.dtype, name="token_router")(x)
      x = x + self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp)
      return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), {}

    head_mask = with_always_on_unit(self.decide(head_logits))
    x = x + self.attention_update(x, shift_msa, scale_msa, gate_msa, head_mask=head_mask)
    token_logits = TokenRouter(self.dtype, name="token_router")(x)
    token_mask = self.decide(token_logits)
    mlp_mask = with_always_on_unit(self.decide(mlp_logits))
    update = self.mlp_update(x, shift_mlp, scale_mlp, gate_mlp, group_mask=mlp_mask)
    x = x + token_mask[..., None].astype(update.dtype) * update
    stats = layers.at_least_float32(self.dtype)
    aux = dict(head_mask=head_mask, mlp_mask=mlp_mask, token_mask=token_mask, head_logits=head_logits.astype(stats),
               mlp_logits=mlp_logits.astype(stats), token_logits=token_logits.astype(stats))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), aux


class Model(dit.Model):
  """DyDiT-{S,B,L,XL}/{2,4,8}: DiT's fields plus the routing temperature and threshold.

  `__call__(x, t, y, train=False, force_drop=None, complete=False) -> (out, aux)`: out as DiT's; aux holds
  head_mask, mlp_mask (B, L, H), token_mask (B, L, N), the logits of each (B, L, H-1) / (B, L, N), and
  flops_ratio (B,), the official FLOPs ratio of the sample; with `complete=True` aux is {} (dense model).
  Training draws the Gumbel noise from the "gumbel" rng stream.
  """
  router_tau: float = 5.0
  router_threshold: float = 0.5

  block_rng_streams = ("gumbel",)
  returns_aux = True
  # Warm start (config.init_from): a DiT checkpoint fills everything but the routers, which start fresh.
  warm_start_sources = ("dit",)
  warm_start_new_modules = ("head_router", "mlp_router", "token_router")

  def validate(self):
    super().validate()
    if self.num_heads < 2:
      raise ValueError(f"DyDiT routes heads 1..H-1 (head 0 always runs): model.num_heads must be >= 2, "
                       f"got {self.num_heads}")
    hidden = int(self.hidden_size * self.mlp_ratio)
    if hidden % self.num_heads:
      raise ValueError(f"DyDiT cuts the MLP hidden ({hidden} = hidden_size * mlp_ratio) into model.num_heads="
                       f"{self.num_heads} channel groups: not divisible")
    if self.hidden_size < TOKEN_ROUTER_REDUCTION:
      raise ValueError(f"the token router's hidden width is hidden_size / {TOKEN_ROUTER_REDUCTION}: "
                       f"model.hidden_size must be >= {TOKEN_ROUTER_REDUCTION}, got {self.hidden_size}")
    if not self.router_tau > 0:
      raise ValueError(f"model.router_tau must be > 0, got {self.router_tau}")
    if not 0 < self.router_threshold < 1:
      raise ValueError(f"model.router_threshold must be in (0, 1), got {self.router_threshold}")

  def block_class(self):
    return DyDiTBlock

  def block_fields(self, train, complete=False):
    return dict(super().block_fields(train), train=train, complete=complete, tau=self.router_tau,
                threshold=self.router_threshold)

  def outputs(self, out, aux):
    if not aux:
      return out, {}
    aux = {name: jnp.moveaxis(value, 0, 1) for name, value in aux.items()}  # (L, B, ...) -> (B, L, ...)
    unit_macs = flops.dydit_unit_macs(self)
    aux["flops_ratio"] = flops.dydit_flops_ratio(aux["head_mask"], aux["mlp_mask"], aux["token_mask"],
                                                 unit_macs.attention, unit_macs.mlp)
    return out, aux

  @nn.compact
  def __call__(self, x, t, y, train=False, force_drop=None, complete=False):
    return self.outputs(*self.forward(x, t, y, train, force_drop, complete=complete))
