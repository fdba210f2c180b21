"""Layers shared by every model family: embedders, adaLN modulation, final layer.

Every parameter carries logical axis names (see `dyngen.sharding`) so the trainer can shard it:
  embed: the model width D; mlp: MLP (and timestep-MLP) hidden; heads / kv: attention heads and per-head
  dim; modulation: the 6D / 2D adaLN outputs; classes: label table rows; freq: sinusoid features;
  patch: patch-pixel axes; out: final-layer outputs.
Activations are constrained with their own names (batch, length, act_embed, act_mlp, act_heads) so that
parameter and activation sharding rules can differ (FSDP shards parameters' embed, not activations').
"""
import dataclasses
import math
from typing import Any, NamedTuple

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# DiT initialises every Linear with xavier-uniform and zero bias, then overrides a few layers.
xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros_init()


def partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def rows_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """`lax.dot_general` for a linear layer, run as one 2-D matmul (rows of lhs) x (rows of rhs).

  A drop-in `dot_general` for `nn.Dense` / `nn.DenseGeneral` (their parameters are unchanged): when lhs
  contracts its trailing axes with the leading axes of rhs (no batch axes), both sides are reshaped to
  matrices first. On (B, N, D) activations, or with a (D, 3, H, Dh) kernel, XLA:CPU otherwise copies the
  largest activation gradients into a transposed layout before the weight-gradient matmul (a full extra
  pass over them per layer); on matrices it runs the same products without those copies.
  lhs: (*lead, *contracted), rhs: (*contracted, *features) -> (*lead, *features).
  """
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  num = len(lhs_contract)
  if (lhs_batch or rhs_batch or lhs_contract != tuple(range(lhs.ndim - num, lhs.ndim))
      or rhs_contract != tuple(range(num))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
  lead, features = lhs.shape[:lhs.ndim - num], rhs.shape[num:]
  inner = math.prod(rhs.shape[:num])
  out = jax.lax.dot_general(lhs.reshape(math.prod(lead), inner), rhs.reshape(inner, math.prod(features)),
                            (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type, **kwargs)
  return out.reshape(*lead, *features)


class DenseGeneral(nn.Module):
  """A linear layer over the trailing `num_contract` axes of x, producing `features` axes.

  Computes what nn.DenseGeneral does for trailing contraction axes, but creates the kernel in its full shape
  (*contracted, *features). flax's DenseGeneral initialises a flattened 2-D kernel and then reshapes it;
  under `nn.logical_axis_rules` the flattened value gets constrained by the names of the full shape, which
  fails whenever a kernel has more than two logical axes (the fused qkv (D, 3, H, Dh), the GLA heads).
  x: (*lead, *contracted) -> (*lead, *features).
  """
  features: int | tuple[int, ...]
  num_contract: int = 1
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = xavier_uniform
  bias_init: Any = zeros

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
    contracted = x.shape[x.ndim - self.num_contract:]
    kernel = self.param("kernel", self.kernel_init, contracted + features, self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    contract_x = tuple(range(x.ndim - self.num_contract, x.ndim))
    out = rows_dot_general(x, kernel, ((contract_x, tuple(range(self.num_contract))), ((), ())))
    if self.use_bias:
      out = out + self.param("bias", self.bias_init, features, self.param_dtype).astype(self.dtype)
    return out


def dense(features, names, kernel_init=xavier_uniform, bias_init=zeros, use_bias=True, dtype=None, name=None):
  """A Dense layer with logical axis names `names` = (in_axis, out_axis) on its kernel."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=partitioned(kernel_init, names),
      bias_init=partitioned(bias_init, names[-1:]),
      dot_general=rows_dot_general,
      name=name,
  )


def modulate(x, shift, scale):
  """adaLN modulation. x: (B, N, D); shift, scale: (B, D)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def at_least_float32(dtype):
  """The dtype for reductions and statistics: float32, or float64 when computing in float64."""
  return jnp.promote_types(dtype, jnp.float32)


def layer_norm(dtype=jnp.float32, name=None):
  """LayerNorm without affine parameters, eps 1e-6, computed in at least fp32 (every official block's norm)."""
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=at_least_float32(dtype), name=name)


def timestep_frequencies(t, dim=256, max_period=10000):
  """Sinusoidal timestep features, [cos, sin] order as DiT.  t: (B,) -> (B, dim) float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class TimestepEmbedder(nn.Module):
  """t (B,) -> (B, D): 256-frequency sinusoid -> Linear -> SiLU -> Linear."""
  hidden_size: int
  frequency_embedding_size: int = 256
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    freq = timestep_frequencies(t, self.frequency_embedding_size)
    init = nn.initializers.normal(0.02)
    h = dense(self.hidden_size, ("freq", "mlp"), kernel_init=init, dtype=self.dtype, name="fc1")(freq)
    h = nn.silu(h)
    return dense(self.hidden_size, ("mlp", "embed"), kernel_init=init, dtype=self.dtype, name="fc2")(h)


class LabelEmbedder(nn.Module):
  """y (B,) -> (B, D). Row `num_classes` is the null class used for classifier-free guidance.

  With `train=True` each label is replaced by the null class with probability `dropout_prob`, drawn from
  the "label_dropout" rng stream; `force_drop` (B,) bool drops the marked rows regardless.
  """
  num_classes: int
  hidden_size: int
  dropout_prob: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, train=False, force_drop=None):
    use_cfg_embedding = self.dropout_prob > 0
    table = nn.Embed(
        self.num_classes + int(use_cfg_embedding),
        self.hidden_size,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        embedding_init=partitioned(nn.initializers.normal(0.02), ("classes", "embed")),
        name="embedding_table",
    )
    drop = None
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
    if force_drop is not None:
      drop = force_drop if drop is None else drop | force_drop
    if drop is not None:
      y = jnp.where(drop, self.num_classes, y)
    return table(y)


def sincos_pos_embed_2d(embed_dim, grid_size):
  """Fixed 2-D sin-cos positional table, (grid_size**2, embed_dim) float32, tokens in row-major order.

  As DiT/MAE: the first half of the channels encodes the column index, the second half the row index,
  each as [sin, cos] over embed_dim/4 frequencies 1/10000**(i/(embed_dim/4)). Computed in float64.
  """
  if embed_dim % 4:
    raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {embed_dim}")

  def one_axis(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                           indexing="ij")
  table = np.concatenate([one_axis(embed_dim // 2, cols), one_axis(embed_dim // 2, rows)], axis=1)
  return table.astype(np.float32)


class PatchEmbed(nn.Module):
  """(B, H, W, C) -> (B, (H/p)*(W/p), D): a stride-p, p x p convolution; tokens in row-major order.

  The parameters are the convolution's (proj/kernel (p, p, C, D), proj/bias (D,)), but it runs as what it
  equals, one matmul of the (p, p, C)-flattened patches with the flattened kernel: XLA:CPU's convolution
  backward is several times slower than the matmul's.
  """
  patch_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    grid_h, grid_w = x.shape[1] // p, x.shape[2] // p
    # Xavier over the flattened (D, C*p*p) view of the conv weight, as DiT initialises it.
    init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
    kernel, bias = PatchProjection(p, x.shape[-1], self.hidden_size, init, name="proj")()
    patches = einops.rearrange(x, "b (h p) (w q) c -> (b h w) (p q c)", p=p, q=p)
    tokens = jnp.dot(patches.astype(self.dtype), kernel.reshape(-1, self.hidden_size).astype(self.dtype))
    tokens = tokens + bias.astype(self.dtype)
    return tokens.reshape(x.shape[0], grid_h * grid_w, self.hidden_size)


class PatchProjection(nn.Module):
  """Holds the patch convolution's parameters under the names and shapes `nn.Conv` gives them."""
  patch_size: int
  in_channels: int
  hidden_size: int
  kernel_init: Any

  @nn.compact
  def __call__(self):
    p = self.patch_size
    kernel = self.param("kernel", partitioned(self.kernel_init, ("patch", "patch", "patch", "embed")),
                        (p, p, self.in_channels, self.hidden_size), jnp.float32)
    bias = self.param("bias", partitioned(zeros, ("embed",)), (self.hidden_size,), jnp.float32)
    return kernel, bias


def adaln_modulation(c, hidden_size, chunks, dtype, name="adaLN_modulation"):
  """c (B, D) -> `chunks` tensors (B, D): SiLU -> zero-initialised Linear (adaLN-Zero).

  A function, not a Module, so the Linear's parameters sit directly under the caller as `name`.
  """
  out = dense(chunks * hidden_size, ("embed", "modulation"), kernel_init=zeros, dtype=dtype, name=name)(nn.silu(c))
  return jnp.split(out, chunks, axis=-1)


class FinalLayer(nn.Module):
  """(B, N, D) -> (B, N, p*p*C_out): LN (no affine) -> adaLN shift/scale -> zero-initialised Linear."""
  hidden_size: int
  patch_size: int
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    shift, scale = adaln_modulation(c, self.hidden_size, 2, self.dtype)
    x = modulate(layer_norm(self.dtype)(x), shift, scale).astype(self.dtype)
    return dense(self.patch_size ** 2 * self.out_channels, ("embed", "out"), kernel_init=zeros,
                 dtype=self.dtype, name="linear")(x)


def unpatchify(x, patch_size, channels, grid_size):
  """(B, N, p*p*C) with the (p, q, c) output order of DiT -> (B, H, W, C)."""
  return einops.rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=grid_size, w=grid_size,
                          p=patch_size, q=patch_size, c=channels)


class Conditioning(NamedTuple):
  """What every block is conditioned on: c = t_emb + y_emb (adaLN) and the raw timestep embedding t_emb
  (DyDiT's width routers read it alone). Both (B, D)."""
  c: jax.Array
  t_emb: jax.Array


class DiffusionBackbone(nn.Module):
  """The frame every family shares: embed patches + conditioning, run the blocks, project back.

  A family implements
    `block_class()` and `block_fields(train, **options)`: its block Module and the block's constructor
      arguments (the frame names each block and wraps the class in remat when asked);
    `block_step(block, x, cond, index) -> (x, aux)` (optional; default `block(x, cond)`): one block in its
      place of the stack; `index` is a Python int, or a traced one under `scan_blocks`; `aux` a dict of
      per-block arrays (masks, logits) returned stacked on a leading layer axis;
    `outputs(out, aux)` (optional; default `out`): what `__call__` returns.
  The frame applies remat, scan (`scan_blocks`) or unrolling the same way for every family.
  """
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  class_dropout_prob: float = 0.1
  num_classes: int = 1000
  learn_sigma: bool = True
  dtype: str = "float32"
  remat: bool = False
  scan_blocks: bool = False

  # Positional arguments of the block call that are Python values when unrolled (static for remat), and the
  # rng streams a block draws from (split per block under the scan). Class constants, not fields.
  block_static_argnums = ()
  block_rng_streams = ()
  # Whether `__call__` returns (out, aux) instead of out (see `models.prediction_fn`).
  returns_aux = False

  @property
  def out_channels(self):
    return self.in_channels * 2 if self.learn_sigma else self.in_channels

  @property
  def grid_size(self):
    return self.input_size // self.patch_size

  @property
  def num_tokens(self):
    return self.grid_size ** 2

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def validate(self):
    """Raises ValueError naming the field when the configuration cannot describe a model."""
    positive = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
    for field in positive:
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"model.{field} must be a positive int, got {value!r}")
    if self.input_size % self.patch_size:
      raise ValueError(f"model.input_size={self.input_size} is not divisible by model.patch_size={self.patch_size}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}")
    if self.hidden_size % 4:
      raise ValueError(f"model.hidden_size={self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")
    if not 0 <= self.class_dropout_prob < 1:
      raise ValueError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
    if self.dtype not in ("float32", "bfloat16", "float64"):
      raise ValueError(f"model.dtype must be 'float32' or 'bfloat16' (float64 for tests), got {self.dtype!r}")

  def embed(self, x, t, y, train, force_drop=None):
    """Returns tokens (B, N, D) and the blocks' `Conditioning`."""
    if x.shape[1:] != (self.input_size, self.input_size, self.in_channels):
      raise ValueError(f"expected x of shape (B, {self.input_size}, {self.input_size}, {self.in_channels}) "
                       f"(NHWC), got {x.shape}")
    dtype = self.compute_dtype
    tokens = PatchEmbed(self.patch_size, self.hidden_size, dtype, name="x_embedder")(x.astype(dtype))
    pos = jnp.asarray(sincos_pos_embed_2d(self.hidden_size, self.grid_size))
    tokens = tokens + pos.astype(tokens.dtype)[None]
    t_emb = TimestepEmbedder(self.hidden_size, dtype=dtype, name="t_embedder")(t)
    c = t_emb + LabelEmbedder(self.num_classes, self.hidden_size, self.class_dropout_prob, dtype,
                              name="y_embedder")(y, train, force_drop)
    return tokens, Conditioning(c, t_emb)

  def block_class(self):
    raise NotImplementedError

  def block_fields(self, train, **options):
    """The block's constructor arguments (without name)."""
    raise NotImplementedError

  def block_step(self, block, x, cond, index):
    del index
    return block(x, cond)  # A block returns (x, aux).

  def outputs(self, out, aux):
    del aux
    return out

  def run_blocks(self, x, cond, train, **options):
    """x (B, N, D) after all `depth` blocks, and the blocks' aux stacked on a leading axis of size depth."""
    block_cls = self.block_class()
    if self.remat:
      # Inside a scan, remat needs no CSE barrier (the loop already keeps the recomputation apart); unrolled,
      # Python-valued block arguments (a direction flag) stay static.
      block_cls = nn.remat(block_cls, **(dict(prevent_cse=False) if self.scan_blocks
                                         else dict(static_argnums=self.block_static_argnums)))
    fields = self.block_fields(train, **options)
    return self._stack_blocks(lambda name: block_cls(**fields, name=name), x, cond)

  def _stack_blocks(self, make_block, x, cond):
    if self.scan_blocks:
      return self._scan_blocks(make_block("blocks"), x, cond)
    auxes = []
    for index in range(self.depth):
      x, aux = self.block_step(make_block(f"blocks_{index}"), x, cond, index)
      auxes.append(aux)
    return x, jax.tree.map(lambda *per_block: jnp.stack(per_block), *auxes)

  def _scan_blocks(self, block, x, cond):
    """All blocks under one lax.scan.

    `block` is an unbound block module named "blocks"; its parameters get a leading axis of size depth
    (logical name "layers"), blocks/... holding what blocks_0 ... blocks_{depth-1} hold unscanned (see
    `stack_block_params`). One traced block instead of `depth`: compile time independent of depth, and
    XLA:CPU keeps one block's buffers for the backward instead of a set per unrolled block.
    """
    def body(block, carry, cond):
      x, index = carry
      x, aux = self.block_step(block, x, cond, index)
      return (x, index + 1), aux

    scanned = nn.scan(body, variable_axes={"params": 0},
                      split_rngs={"params": True, **{stream: True for stream in self.block_rng_streams}},
                      in_axes=nn.broadcast, length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
    (x, _), aux = scanned(block, (x, jnp.zeros((), jnp.int32)), cond)
    return x, aux

  def forward(self, x, t, y, train=False, force_drop=None, **block_options):
    """The frame's pass: (B, H, W, C_out) in at least float32, and the blocks' stacked aux."""
    tokens, cond = self.embed(x, t, y, train, force_drop)
    tokens = nn.with_logical_constraint(tokens, ("batch", "length", "act_embed"))
    tokens, aux = self.run_blocks(tokens, cond, train, **block_options)
    out = FinalLayer(self.hidden_size, self.patch_size, self.out_channels, self.compute_dtype,
                     name="final_layer")(tokens, cond.c)
    out = unpatchify(out, self.patch_size, self.out_channels, self.grid_size)
    return out.astype(at_least_float32(self.compute_dtype)), aux

  @nn.compact
  def __call__(self, x, t, y, train=False, force_drop=None):
    """x: (B, H, W, C) NHWC; t: (B,) original timesteps; y: (B,) labels -> (B, H, W, C_out) float32
    (float64 when computing in float64)."""
    return self.outputs(*self.forward(x, t, y, train, force_drop))


def stack_block_params(params, depth):
  """Unscanned params (blocks_0 ... blocks_{depth-1}) -> the layout of `scan_blocks=True`, same values.

  blocks/... holds the blocks' parameters stacked on a new leading axis; other entries are kept.
  """
  names = [f"blocks_{i}" for i in range(depth)]
  missing = [name for name in names if name not in params]
  extra = sorted(name for name in params if name.startswith("blocks_") and name not in names)
  if missing or extra or "blocks" in params:
    raise ValueError(f"expected unscanned params with blocks_0 ... blocks_{depth - 1}: missing {missing}, "
                     f"unexpected {extra}" + (", and an already scanned 'blocks'" if "blocks" in params else ""))
  rest = {name: value for name, value in params.items() if not name.startswith("blocks_")}
  blocks = [params[name] for name in names]

  def stack(*layers):  # numpy stays numpy (converted checkpoints live on the host).
    return np.stack(layers) if all(isinstance(x, np.ndarray) for x in layers) else jnp.stack(layers)

  return {**rest, "blocks": jax.tree.map(stack, *blocks)}


def unstack_block_params(params):
  """The inverse of `stack_block_params`: scanned params -> blocks_0 ... blocks_{depth-1}."""
  depth = jax.tree.leaves(params["blocks"])[0].shape[0]
  unstacked = {name: value for name, value in params.items() if name != "blocks"}
  for i in range(depth):
    unstacked[f"blocks_{i}"] = jax.tree.map(lambda x: x[i], params["blocks"])
  return unstacked


def xavier_uniform_fused(fan_in, fan_out, gain=1.0):
  """Xavier-uniform for a kernel stored with split output (or input) axes, using the fans of the
  equivalent 2-D (fan_in, fan_out) Linear, as the official code initialises its fused qkv/proj layers."""
  limit = gain * (6.0 / (fan_in + fan_out)) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init
