"""InceptionV3 of the FID evaluators (the 2015-12-05 TF graph that ADM's evaluator and pytorch-fid run).

The network is torchvision's Inception3 with the FID graph's quirks, as pytorch-fid ports it: the
average-pool branches exclude the padding from the count (TF's SAME pooling), and the last block
(Mixed_7c) pools its branch with a 3x3 max pool instead of an average pool. Module names are pytorch-fid's
(`Mixed_6d/branch1x1/conv`), so the weight file maps one to one (dyngen/evaluation/inception_weights.py).

Outputs, as ADM's evaluator (guided-diffusion evaluations/evaluator.py) reads them from the TF graph:
- `pool_3` (N, 2048): the global average pool after Mixed_7c (FID, precision / recall);
- `logits` (N, 1008): pool_3 @ W with W the 1008-way softmax layer's weight and no bias (Inception Score);
- `spatial` (N, 2023): `mixed_6/conv`, the ReLU output of Mixed_6d's 1x1 branch (TF's mixed, mixed_1, ...
  count Mixed_5b, 5c, ...; mixed_6 is Mixed_6d), first 7 of its 192 channels, 17x17x7 flattened in NHWC
  order (row, column, channel) as ADM reshapes the TF tensor (sFID).

Two input conventions (`preprocessing`):
- "adm": NHWC uint8 or float in [0, 255], the TF graph's own preprocessing: TF1 `ResizeBilinear` to 299x299
  with align_corners=False and *no* half-pixel centres (source = dst * in/out), then (x - 128) / 128.
- "pytorch-fid": NHWC float in [0, 1], pytorch-fid's: `F.interpolate(bilinear, align_corners=False)`, i.e.
  half-pixel centres (source = (dst + 0.5) * in/out - 0.5, clamped at 0), no antialiasing, then 2x - 1.
Both resize inside the model for every input size (upsampling 256 -> 299, or downsampling), without
antialiasing, with the sampling coordinates in float32 as TF and torch compute them.
"""
import math
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
NUM_POOL_FEATURES = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]: 7 x 17 x 17 = 2023 sFID features
NUM_SPATIAL_FEATURES = SPATIAL_CHANNELS * 17 * 17
PREPROCESSINGS = ("adm", "pytorch-fid")


# ---------------------------------------------------------------------------------------------------------
# Resizes (host-side index tables, device-side gathers; exact TF / torch coordinate arithmetic in float32).

def tf1_bilinear_table(in_size: int, out_size: int = INPUT_SIZE):
  """(lower, upper, lerp) of TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) along one axis.

  TF's legacy scaler: source = float32(dst) * float32(in / out); lower = floor, upper = min(ceil, in - 1).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.arange(out_size, dtype=np.float32) * scale
  floor = np.floor(source)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(source).astype(np.int64), in_size - 1)
  return lower, upper, (source - floor).astype(np.float32)


def half_pixel_bilinear_table(in_size: int, out_size: int = INPUT_SIZE):
  """(lower, upper, lerp) of torch's bilinear interpolate(align_corners=False, antialias=False), one axis.

  torch: source = max(scale * (dst + 0.5) - 0.5, 0) in float32 with scale = float32(in) / out;
  lower = min(floor(source), in - 1), upper = lower + 1 unless at the edge, lerp clipped to [0, 1].
  """
  scale = np.float32(np.float32(in_size) / np.float32(out_size))
  source = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                      np.float32(0))
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.where(lower < in_size - 1, lower + 1, lower)
  lerp = np.clip(source - lower.astype(np.float32), 0, 1).astype(np.float32)
  return lower, upper, lerp


def resize_tf1_bilinear(images, size: int = INPUT_SIZE):
  """TF1 ResizeBilinear (legacy coordinates) of float32 `images` (N, H, W, C) -> (N, size, size, C).

  In TF's arithmetic order: top = tl + (tr - tl) * x_lerp, bottom likewise, out = top + (bottom - top) * y_lerp.
  """
  y_lo, y_hi, y_lerp = tf1_bilinear_table(images.shape[1], size)
  x_lo, x_hi, x_lerp = tf1_bilinear_table(images.shape[2], size)
  x_lerp = jnp.asarray(x_lerp)[:, None]
  top, bottom = images[:, y_lo], images[:, y_hi]
  top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * x_lerp
  bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * x_lerp
  return top + (bottom - top) * jnp.asarray(y_lerp)[:, None, None]


def resize_half_pixel_bilinear(images, size: int = INPUT_SIZE):
  """torch bilinear interpolate (align_corners=False, no antialias) of `images` (N, H, W, C) -> (N, size, size, C).

  In torch's weight form: w0 * a + w1 * b along the width, then along the height.
  """
  y_lo, y_hi, y_lerp = half_pixel_bilinear_table(images.shape[1], size)
  x_lo, x_hi, x_lerp = half_pixel_bilinear_table(images.shape[2], size)
  x1 = jnp.asarray(x_lerp)[:, None]
  y1 = jnp.asarray(y_lerp)[:, None, None]

  def along_width(rows):
    return rows[:, :, x_lo] * (1 - x1) + rows[:, :, x_hi] * x1

  return along_width(images[:, y_lo]) * (1 - y1) + along_width(images[:, y_hi]) * y1


def preprocess(images, preprocessing: str = "adm"):
  """images (N, H, W, 3) -> the network input (N, 299, 299, 3) float32 in about [-1, 1]."""
  images = jnp.asarray(images).astype(jnp.float32)
  if preprocessing == "adm":
    return (resize_tf1_bilinear(images) - 128.0) / 128.0
  if preprocessing == "pytorch-fid":
    return 2.0 * resize_half_pixel_bilinear(images) - 1.0
  raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")


# ---------------------------------------------------------------------------------------------------------
# The network.

class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU; x: (N, H, W, C)."""
  features: int
  kernel_size: tuple = (1, 1)
  strides: int = 1
  padding: tuple = (0, 0)
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                padding=[(self.padding[0],) * 2, (self.padding[1],) * 2], use_bias=False,
                precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's SAME average pooling divides by the number of real pixels in the window (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, strides=2, padding=((0, 0), (0, 0))):
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=padding)


class InceptionA(nn.Module):
  """Mixed_5b/5c/5d (35x35): 1x1, 5x5, double 3x3 and pool branches."""
  pool_features: int
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # pylint: disable=unnecessary-lambda-assignment
    branch1x1 = conv(64, name="branch1x1")(x)
    branch5x5 = conv(48, name="branch5x5_1")(x)
    branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17 reduction."""
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # pylint: disable=unnecessary-lambda-assignment
    branch3x3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17): factorised 7x7 branches. Returns (output, the 1x1 branch = TF's mixed_k/conv)."""
  channels_7x7: int
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # pylint: disable=unnecessary-lambda-assignment
    c7 = self.channels_7x7
    branch1x1 = conv(192, name="branch1x1")(x)
    branch7x7 = conv(c7, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    dbl = conv(c7, name="branch7x7dbl_1")(x)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
    dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
    dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
    dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
    branch_pool = conv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1), branch1x1


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8 reduction."""
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # pylint: disable=unnecessary-lambda-assignment
    branch3x3 = conv(192, name="branch3x3_1")(x)
    branch3x3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b / 7c (8x8). The FID graph's Mixed_7c pools its pool branch with a 3x3 max pool (max_pool=True)."""
  max_pool: bool = False
  precision: Optional[str] = "highest"

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)  # pylint: disable=unnecessary-lambda-assignment
    branch1x1 = conv(320, name="branch1x1")(x)
    branch3x3 = conv(384, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                                 conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    dbl = conv(448, name="branch3x3dbl_1")(x)
    dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
    dbl = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                           conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl)], axis=-1)
    pooled = _max_pool_3x3(x, strides=1, padding=((1, 1), (1, 1))) if self.max_pool else _avg_pool_3x3(x)
    branch_pool = conv(192, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID InceptionV3 on preprocessed input x: (N, 299, 299, 3) in [-1, 1] (see `preprocess`).

  Returns {"pool_3": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)}; with_blocks=True adds
  pytorch-fid's block outputs "block0" (N, 73, 73, 64), "block1" (N, 35, 35, 192), "block2" (N, 17, 17, 768).
  """
  precision: Optional[str] = "highest"  # float32 matmuls and convs in full precision (no TF32 / bf16 passes)

  @nn.compact
  def __call__(self, x, with_blocks: bool = False):
    p = self.precision
    x = BasicConv(32, (3, 3), strides=2, precision=p, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
    block0 = x = _max_pool_3x3(x)
    x = BasicConv(80, precision=p, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
    block1 = x = _max_pool_3x3(x)
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x, _ = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, precision=p, name="Mixed_6d")(x)
    block2 = x = InceptionC(192, precision=p, name="Mixed_6e")(x)[0]
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    pool_3 = jnp.mean(x, axis=(1, 2))
    # ADM's Inception Score takes softmax(pool_3 @ W) with the graph's softmax/logits/MatMul weight, no bias.
    logits = nn.Dense(NUM_LOGITS, use_bias=False, precision=p, name="fc")(pool_3)
    outputs = {"pool_3": pool_3, "logits": logits,
               "spatial": mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)}
    if with_blocks:
      outputs.update(block0=block0, block1=block1, block2=block2)
    return outputs


def variable_shapes(module: FIDInceptionV3):
  """{'params': ..., 'batch_stats': ...} of ShapeDtypeStructs (abstract init, nothing allocated)."""
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))


def check_images(images, preprocessing: str):
  """Raises ValueError unless `images` is (N, H, W, 3) of the dtype and range `preprocessing` takes."""
  if preprocessing not in PREPROCESSINGS:
    raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
  shape = np.shape(images)
  dtype = np.dtype(images.dtype) if hasattr(images, "dtype") else np.asarray(images).dtype
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"images must be NHWC (N, H, W, 3), got shape {tuple(shape)}")
  if preprocessing == "pytorch-fid" and not np.issubdtype(dtype, np.floating):
    raise ValueError(f"preprocessing='pytorch-fid' takes float images in [0, 1], got {dtype}; "
                     "use preprocessing='adm' for uint8 images in [0, 255]")
  if preprocessing == "adm" and not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"preprocessing='adm' takes uint8 or float images in [0, 255], got {dtype}")


def _check_range(batch, preprocessing):
  if np.issubdtype(batch.dtype, np.floating) and batch.size:
    low, high = float(np.min(batch)), float(np.max(batch))
    top = 1.0 if preprocessing == "pytorch-fid" else 255.0
    if low < 0.0 or high > top or not math.isfinite(low + high):
      raise ValueError(f"preprocessing={preprocessing!r} takes images in [0, {top:g}], got values in "
                       f"[{low:g}, {high:g}]")


class InceptionV3:
  """The FID InceptionV3 with loaded weights: `features(images)` in batches, jitted, optionally sharded.

  variables: {'params': ..., 'batch_stats': ...} of `FIDInceptionV3` (see inception_weights.py).
  """

  def __init__(self, variables, precision: Optional[str] = "highest"):
    self.module = FIDInceptionV3(precision=precision)
    self.variables = jax.device_put(jax.tree.map(jnp.asarray, variables))
    self._compiled = {}

  def apply(self, images, preprocessing: str = "adm", with_blocks: bool = False):
    """One jitted batch: images (B, H, W, 3) -> dict of device arrays (see FIDInceptionV3)."""
    key = (preprocessing, with_blocks)
    if key not in self._compiled:
      self._compiled[key] = jax.jit(
          lambda variables, x: self.module.apply(variables, preprocess(x, preprocessing), with_blocks))
    return self._compiled[key](self.variables, images)

  def features(self, images, preprocessing: str = "adm", batch_size: int = 64,
               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Inception features of all `images`, batch by batch.

    Args:
      images: (N, H, W, 3) NHWC, anything with a shape and slices in order (numpy array, memmap, the
        streaming npz reader of dyngen.evaluate). "adm": uint8 or float in [0, 255]; "pytorch-fid":
        float in [0, 1].
      preprocessing: "adm" (the TF graph's resize and (x - 128) / 128) or "pytorch-fid".
      batch_size: images per jitted call; the last batch is padded so that one program serves all. With
        several local devices the batch is rounded up to a multiple of their count and split over them.
      progress: called as progress(done, total) after every batch.

    Returns:
      {"pool_3": (N, 2048), "logits": (N, 1008), "spatial": (N, 2023)} float32 numpy arrays.
    """
    check_images(images, preprocessing)
    total = int(np.shape(images)[0])
    devices = jax.local_devices()
    batch_size = max(1, min(int(batch_size), total))
    batch_size = -(-batch_size // len(devices)) * len(devices)
    sharding = None
    if len(devices) > 1:
      mesh = jax.sharding.Mesh(np.array(devices), ("data",))
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    outputs = {"pool_3": [], "logits": [], "spatial": []}
    for start in range(0, total, batch_size):
      batch = np.asarray(images[start:start + batch_size])
      _check_range(batch, preprocessing)
      count = batch.shape[0]
      if count < batch_size:  # pad to the compiled shape; the padded rows are dropped below
        batch = np.concatenate([batch, np.zeros((batch_size - count, *batch.shape[1:]), batch.dtype)])
      batch = jax.device_put(batch, sharding) if sharding is not None else batch
      result = self.apply(batch, preprocessing)
      for name in outputs:
        outputs[name].append(np.asarray(result[name])[:count])
      if progress is not None:
        progress(min(start + batch_size, total), total)
    return {name: (np.concatenate(parts) if parts else np.zeros((0, width), np.float32))
            for (name, parts), width in zip(outputs.items(), (NUM_POOL_FEATURES, NUM_LOGITS, NUM_SPATIAL_FEATURES))}


class ProgressPrinter:
  """progress(done, total) callback printing images/s and ETA at most every `every_s` seconds."""

  def __init__(self, label: str = "inception", every_s: float = 10.0, printer=print):
    self.label, self.every_s, self.printer = label, every_s, printer
    self.start = self.last = None

  def __call__(self, done: int, total: int):
    now = time.perf_counter()
    if self.start is None:  # the first batch includes compilation; rates count from its end
      self.start = self.last = now
      self.first_done = done
      self.printer(f"{self.label}: {done}/{total} images (first batch, includes compilation)", flush=True)
      return
    if now - self.last < self.every_s and done < total:
      return
    self.last = now
    rate = (done - self.first_done) / max(now - self.start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    self.printer(f"{self.label}: {done}/{total} images, {rate:.1f} images/s, ETA {eta:.0f} s", flush=True)
