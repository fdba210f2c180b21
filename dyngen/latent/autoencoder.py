"""The SD-VAE (diffusers `AutoencoderKL`) in Flax, NHWC, and the loaded-model object DiT-style code uses.

Architecture (diffusers' AutoencoderKL with DownEncoderBlock2D / UpDecoderBlock2D blocks; every size comes
from `AutoencoderKLConfig`, whose fields are those of diffusers' config.json):

  encode: conv_in -> down_blocks_i (layers_per_block resnets, then a stride-2 downsampler except in the
          last block) -> mid_block (resnet, 1-head self-attention, resnet) -> GroupNorm, SiLU -> conv_out
          (2 * latent_channels) -> quant_conv (1x1) = moments; mean, logvar = moments split in two,
          logvar clipped to [-30, 20].
  decode: post_quant_conv (1x1) -> conv_in -> mid_block -> up_blocks_i in reversed channel order
          (layers_per_block + 1 resnets, then nearest x2 and a conv except in the last block)
          -> GroupNorm, SiLU -> conv_out.

Flax module names follow the diffusers state-dict names ('down_blocks.0.resnets.1' -> 'down_blocks_0/
resnets_1') so the weight table (dyngen/latent/weights.py) reads as a plain renaming.

The latents are UNSCALED here, as in diffusers: DiT trains on `scale_factor * sample` (0.18215 for
sd-vae-ft-ema / ft-mse) and decodes `z / scale_factor`; `Autoencoder.encode_scaled` / `decode_scaled`
do that.
"""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range.


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """The architecture, as the fields of a diffusers AutoencoderKL config.json (defaults: sd-vae-ft-ema/-mse).

  norm_eps is fixed to 1e-6 in diffusers' encoder and decoder (not a config.json field there).
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,) * 4
  up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  sample_size: int = 256
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    # Lists from JSON become tuples so that the config stays hashable (a static jit argument).
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    problems = []
    blocks = len(self.block_out_channels)
    if blocks < 1:
      problems.append("block_out_channels must name at least one block")
    if self.down_block_types != (DOWN_BLOCK_TYPE,) * blocks:
      problems.append(f"down_block_types={list(self.down_block_types)}: only {blocks} x {DOWN_BLOCK_TYPE!r} "
                      "(one per block_out_channels entry) is implemented")
    if self.up_block_types != (UP_BLOCK_TYPE,) * blocks:
      problems.append(f"up_block_types={list(self.up_block_types)}: only {blocks} x {UP_BLOCK_TYPE!r} "
                      "is implemented")
    if self.act_fn != "silu":
      problems.append(f"act_fn={self.act_fn!r}: only 'silu' is implemented")
    for channels in self.block_out_channels:
      if channels % self.norm_num_groups:
        problems.append(f"block_out_channels entry {channels} does not divide into "
                        f"norm_num_groups={self.norm_num_groups} groups")
    if self.layers_per_block < 1 or self.latent_channels < 1:
      problems.append(f"layers_per_block={self.layers_per_block} and latent_channels={self.latent_channels} "
                      "must be >= 1")
    if problems:
      raise ValueError("AutoencoderKLConfig: " + "; ".join(problems))

  @property
  def downsample_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for the SD-VAE)."""
    return 2 ** (len(self.block_out_channels) - 1)

  # config.json fields that describe nothing the encoder/decoder computes (diffusers bookkeeping, latent
  # statistics other VAEs use, memory options).
  IGNORED_DIFFUSERS_FIELDS = ("_class_name", "_diffusers_version", "_name_or_path", "force_upcast",
                              "shift_factor", "latents_mean", "latents_std", "use_slicing", "use_tiling")

  @classmethod
  def from_diffusers(cls, fields: dict) -> "AutoencoderKLConfig":
    """The config of a diffusers config.json dict; fields not listed there keep the sd-vae defaults.

    A shift_factor / latents_mean / latents_std other than null belongs to VAEs (SD3, FLUX) whose latents
    are normalised differently; it is refused rather than silently ignored.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known - set(cls.IGNORED_DIFFUSERS_FIELDS))
    if unknown:
      raise ValueError(f"config.json fields {unknown} are not fields of an AutoencoderKL this code implements "
                       f"(known: {sorted(known)})")
    for name in ("shift_factor", "latents_mean", "latents_std"):
      if fields.get(name) is not None:
        raise ValueError(f"config.json {name}={fields[name]!r}: latent shift/normalisation is not implemented "
                         "(the SD-VAE of DiT has null here)")
    return cls(**{name: value for name, value in fields.items() if name in known})


def group_norm(config: AutoencoderKLConfig, dtype: Dtype, name: str) -> nn.GroupNorm:
  # Two-pass variance: the one-pass E[x²] - E[x]² loses digits on the decoder's large-mean activations.
  return nn.GroupNorm(num_groups=config.norm_num_groups, epsilon=config.norm_eps, use_fast_variance=False,
                      dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, precision, name: str, strides: int = 1,
         padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
                 precision=precision, name=name)


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: x (B, H, W, Cin) -> (B, H, W, out_channels)."""
  config: AutoencoderKLConfig
  out_channels: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    h = nn.silu(group_norm(self.config, self.dtype, "norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, self.precision, "conv1")(h)
    h = nn.silu(group_norm(self.config, self.dtype, "norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, self.precision, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, self.precision, "conv_shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual: (B, H, W, C) -> (B, H, W, C)."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = group_norm(self.config, self.dtype, "group_norm")(x).reshape(batch, height * width, channels)
    dense = functools.partial(nn.Dense, channels, dtype=self.dtype, precision=self.precision)
    q, k, v = (dense(name=name)(h) for name in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, precision=self.precision) / math.sqrt(channels)
    # diffusers upcasts the softmax to float32 (upcast_softmax); it matters under bfloat16.
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    out = jnp.einsum("bqk,bkc->bqc", weights.astype(v.dtype), v, precision=self.precision)
    out = dense(name="to_out")(out)
    return x + out.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D: resnet, attention (if mid_block_add_attention), resnet."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    x = ResnetBlock(self.config, channels, self.dtype, self.precision, name="resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = AttentionBlock(self.config, self.dtype, self.precision, name="attentions_0")(x)
    return ResnetBlock(self.config, channels, self.dtype, self.precision, name="resnets_1")(x)


class Downsample(nn.Module):
  """diffusers Downsample2D of the encoder: one zero row/column at the bottom/right, conv 3x3 stride 2."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, self.dtype, self.precision, "conv", strides=2, padding="VALID")(x)


# Nearest-neighbour x2 then a 3x3 conv, computed on the low-resolution input: output row 2i reads input rows
# (i-1, i, i) through kernel rows (0, 1, 2), row 2i+1 reads (i, i, i+1). PHASE_ROWS[a] sums the kernel rows
# that read the same input row, giving a 2x2 kernel per output phase (a, b): 4 taps per output pixel, not 9.
PHASE_ROWS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)
PHASE_PADDING = ((1, 0), (0, 1))  # phase 0 reads rows (i-1, i), phase 1 rows (i, i+1)


class UpsampleConv(nn.Module):
  """conv3x3(nearest_x2(x)) with nn.Conv's parameters (kernel (3, 3, C, out), bias), as 4 2x2 convs at low
  resolution: x (B, H, W, C) -> (B, 2H, 2W, out). Same function as the direct form (the kernel taps are
  summed before the products: float32 rounding differs by ~1e-7 relative), 2.25x fewer FLOPs."""
  features: int
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, channels, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    phases = jnp.einsum("ary,bsx,yxio->abrsio", PHASE_ROWS.astype(kernel.dtype), PHASE_ROWS.astype(kernel.dtype),
                        kernel).astype(self.dtype)
    x = x.astype(self.dtype)
    rows = []
    for a in range(2):
      row = [jax.lax.conv_general_dilated(x, phases[a, b], (1, 1), (PHASE_PADDING[a], PHASE_PADDING[b]),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
             for b in range(2)]
      rows.append(jnp.stack(row, axis=3))  # (B, H, W, 2 column phases, out)
    out = jnp.stack(rows, axis=2).reshape(batch, 2 * height, 2 * width, self.features)  # interleave the phases
    return out + bias.astype(self.dtype)


class Upsample(nn.Module):
  """diffusers Upsample2D of the decoder: nearest-neighbour x2, then conv 3x3."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    return UpsampleConv(x.shape[-1], self.dtype, self.precision, name="conv")(x)


class ResnetStack(nn.Module):
  """diffusers DownEncoderBlock2D / UpDecoderBlock2D: `num_layers` resnets, then an optional resampler."""
  config: AutoencoderKLConfig
  out_channels: int
  num_layers: int
  resample: str | None  # "down", "up" or None (the last block of each side)
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.config, self.out_channels, self.dtype, self.precision, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.config, self.dtype, self.precision, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.config, self.dtype, self.precision, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """x (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels), f = config.downsample_factor."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    config = self.config
    last = len(config.block_out_channels) - 1
    h = conv(config.block_out_channels[0], 3, self.dtype, self.precision, "conv_in")(x)
    for i, channels in enumerate(config.block_out_channels):
      h = ResnetStack(config, channels, config.layers_per_block, "down" if i < last else None, self.dtype,
                      self.precision, name=f"down_blocks_{i}")(h)
    h = MidBlock(config, self.dtype, self.precision, name="mid_block")(h)
    h = nn.silu(group_norm(config, self.dtype, "conv_norm_out")(h))
    return conv(2 * config.latent_channels, 3, self.dtype, self.precision, "conv_out")(h)


class Decoder(nn.Module):
  """z (B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z):
    config = self.config
    channels = tuple(reversed(config.block_out_channels))
    last = len(channels) - 1
    h = conv(channels[0], 3, self.dtype, self.precision, "conv_in")(z)
    h = MidBlock(config, self.dtype, self.precision, name="mid_block")(h)
    for i, block_channels in enumerate(channels):
      # One resnet more per block than the encoder has, as in diffusers' decoder.
      h = ResnetStack(config, block_channels, config.layers_per_block + 1, "up" if i < last else None,
                      self.dtype, self.precision, name=f"up_blocks_{i}")(h)
    h = nn.silu(group_norm(config, self.dtype, "conv_norm_out")(h))
    return conv(config.out_channels, 3, self.dtype, self.precision, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """The Flax module. `apply(..., method="encode")` -> (mean, logvar); `method="decode"` -> images."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    config = self.config
    self.encoder = Encoder(config, self.dtype, self.precision)
    self.decoder = Decoder(config, self.dtype, self.precision)
    if config.use_quant_conv:
      self.quant_conv = conv(2 * config.latent_channels, 1, self.dtype, self.precision, "quant_conv")
    if config.use_post_quant_conv:
      self.post_quant_conv = conv(config.latent_channels, 1, self.dtype, self.precision, "post_quant_conv")

  def encode(self, x):
    """x: (B, H, W, in_channels) in [-1, 1] -> mean, logvar: (B, H/f, W/f, latent_channels), unscaled."""
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """z: (B, h, w, latent_channels) unscaled -> images (B, h*f, w*f, out_channels), about [-1, 1]."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    """Reconstruction from the posterior mean (creates every parameter in `init`)."""
    return self.decode(self.encode(x)[0])


def sample_posterior(mean, logvar, key):
  """A draw of the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, I), same shape as mean."""
  noise = jax.random.normal(key, mean.shape, jnp.promote_types(mean.dtype, jnp.float32))
  return (mean + jnp.exp(0.5 * logvar) * noise).astype(mean.dtype)


def param_shapes(config: AutoencoderKLConfig) -> dict:
  """The nested Flax param tree of `config` as ShapeDtypeStructs (abstract init; nothing allocated)."""
  module = AutoencoderKL(config)
  size = 2 * config.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


class Autoencoder:
  """A loaded VAE: Flax module, its params and jitted, batch-friendly calls (the object load_autoencoder gives).

  encode(x) -> (mean, logvar) and decode(z) take any batch size; with `batch_size` set they run in chunks of
  that size (the last chunk padded), so one compiled program serves every batch and memory stays bounded.
  The pure forms `encode_fn(params, x)` / `decode_fn(params, z)` compose into other jitted code (a
  data-parallel extraction step, a train step that encodes on the fly).
  """

  def __init__(self, config: AutoencoderKLConfig, params, dtype: Dtype = jnp.float32, precision=None,
               batch_size: int | None = None):
    self.config = config
    self.module = AutoencoderKL(config, dtype=dtype, precision=precision)
    self.dtype = jnp.dtype(dtype)
    # Parameters are kept in float32 (float64 when computing in float64); the module casts to `dtype`.
    param_dtype = jnp.float64 if self.dtype == jnp.float64 else jnp.float32
    self.params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
    if batch_size is not None and batch_size <= 0:
      raise ValueError(f"batch_size={batch_size} must be a positive number of images (or None: whole batches)")
    self.batch_size = batch_size
    self._encode = jax.jit(self.encode_fn)
    self._decode = jax.jit(self.decode_fn)
    self._sample = jax.jit(sample_posterior)
    self._encode_scaled = jax.jit(self.encode_scaled_fn)

  @property
  def scale_factor(self) -> float:
    """The latent scale DiT applies outside the model (config.scaling_factor, 0.18215 for the SD-VAE)."""
    return self.config.scaling_factor

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def encode_fn(self, params, x):
    """Pure: x (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""
    return self.module.apply({"params": params}, jnp.asarray(x, self.dtype), method="encode")

  def decode_fn(self, params, z):
    """Pure: unscaled z (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
    return self.module.apply({"params": params}, jnp.asarray(z, self.dtype), method="decode")

  def encode_scaled_fn(self, params, x, key):
    """Pure: DiT's training latents scale_factor * (a posterior sample of x), (B, H/f, W/f, latent_channels)."""
    mean, logvar = self.encode_fn(params, x)
    return self.scale_factor * sample_posterior(mean, logvar, key)

  def _check_images(self, x):
    f, c = self.downsample_factor, self.config.in_channels
    if x.ndim != 4 or x.shape[-1] != c or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"images must be NHWC (B, H, W, {c}) with H and W multiples of {f}, got shape {x.shape}")

  def _check_latents(self, z):
    if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
      raise ValueError(f"latents must be NHWC (B, h, w, {self.config.latent_channels}), got shape {z.shape}")

  def _chunked(self, fn, x, *args):
    if self.batch_size is None or x.shape[0] == self.batch_size:
      return fn(self.params, x, *args)
    size = self.batch_size
    outputs = []
    for start in range(0, x.shape[0], size):
      chunk = x[start:start + size]
      count = chunk.shape[0]
      if count < size:  # pad the last chunk so every call hits the same compiled program
        chunk = jnp.concatenate([chunk, jnp.zeros((size - count, *chunk.shape[1:]), chunk.dtype)])
      out = fn(self.params, chunk, *args)
      outputs.append(jax.tree.map(lambda a, n=count: a[:n], out))
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)

  def encode(self, x):
    """x: (B, H, W, 3) NHWC in [-1, 1] -> (mean, logvar), each (B, H/8, W/8, 4), unscaled."""
    x = jnp.asarray(x)
    self._check_images(x)
    return self._chunked(self._encode, x)

  def decode(self, z):
    """z: unscaled latents (B, h, w, 4) -> images (B, 8h, 8w, 3), about [-1, 1] (not clipped)."""
    z = jnp.asarray(z)
    self._check_latents(z)
    return self._chunked(self._decode, z)

  def sample(self, mean, logvar, key):
    """A posterior draw mean + exp(logvar / 2) * N(0, I) (unscaled)."""
    return self._sample(mean, logvar, key)

  def encode_scaled(self, x, key):
    """DiT's training latents: scale_factor * (a posterior sample of x), (B, H/8, W/8, 4).

    With batch_size set, every chunk draws its noise from `key` itself (chunks are independent images)."""
    x = jnp.asarray(x)
    self._check_images(x)
    return self._chunked(self._encode_scaled, x, key)

  def decode_scaled(self, z_scaled):
    """DiT's sampling decode: images of z_scaled / scale_factor."""
    return self.decode(jnp.asarray(z_scaled) / self.scale_factor)

  def __repr__(self):
    count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))
    return f"Autoencoder({self.config}, dtype={self.dtype.name}, {count / 1e6:.1f}M params)"
