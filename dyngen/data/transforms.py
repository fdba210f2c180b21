"""Per-image transforms of the input pipelines: decode, ADM centre crop, flip, scale to [-1, 1].

Every dataset goes through the same path: the stored (encoded) image is decoded with PIL, brought to
`image_size` x `image_size` with the centre crop of ADM (Dhariwal & Nichol 2021), which DiT uses for
ImageNet, optionally flipped, and finally scaled to float32 in [-1, 1] after batching.

The transforms are grain transform classes (not closures) so that grain's worker processes can pickle them.
"""
import io

import grain
import numpy as np
from PIL import Image

# PIL image modes by number of channels; everything is converted to one of these before cropping.
_PIL_MODES = {1: "L", 3: "RGB"}


def center_crop_adm(image: Image.Image, image_size: int) -> np.ndarray:
  """The ADM centre crop: halve with a box filter, resize with bicubic, cut out the centre square.

  While the short side is at least twice `image_size`, the image is halved (BOX filter, sizes rounded
  down): cheap and alias-free. Then one BICUBIC resize brings the short side to `image_size` (this also
  upsamples small images, e.g. the 8x8 digits to 16x16), and the centre `image_size` square is kept (the
  odd pixel goes to the right/bottom).

  Args:
    image: a PIL image of any size, mode "L" or "RGB".
    image_size: side of the square output, > 0.

  Returns:
    uint8 array (image_size, image_size) for mode "L", (image_size, image_size, 3) for "RGB".
  """
  if image_size <= 0:
    raise ValueError(f"image_size must be a positive number of pixels, got {image_size}.")
  while min(image.size) >= 2 * image_size:
    image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
  scale = image_size / min(image.size)
  # max(., image_size) guards the short side against rounding below image_size on extreme aspect ratios.
  new_size = tuple(max(round(side * scale), image_size) for side in image.size)
  image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
  pixels = np.asarray(image)
  top = (pixels.shape[0] - image_size) // 2
  left = (pixels.shape[1] - image_size) // 2
  return pixels[top:top + image_size, left:left + image_size]


def decode_image(encoded: bytes, channels: int) -> Image.Image:
  """Decodes PNG/JPEG/... bytes into a PIL image with `channels` (1 or 3) channels."""
  if channels not in _PIL_MODES:
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
  with Image.open(io.BytesIO(encoded)) as image:
    # convert() forces the lazy decode and also turns CMYK, palette and RGBA images into plain RGB.
    return image.convert(_PIL_MODES[channels])


class DecodeAndCenterCrop(grain.transforms.Map):
  """{"image": encoded bytes, "label": int} -> {"image": uint8 (S, S, C), "label": int32 ()}."""

  def __init__(self, image_size: int, channels: int):
    self.image_size = image_size
    self.channels = channels

  def map(self, element):
    image = decode_image(element["image"], self.channels)
    pixels = center_crop_adm(image, self.image_size).reshape(self.image_size, self.image_size,
                                                             self.channels)
    return {"image": pixels, "label": np.int32(element["label"])}


class RandomFlipLeftRight(grain.transforms.RandomMap):
  """Flips the image horizontally with probability 1/2.

  grain seeds `rng` from the pipeline seed and the element's index in the global (shuffled, repeated)
  stream, so the flip of every example of every epoch is reproducible and independent of worker counts.
  """

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, image=element["image"][:, ::-1])
    return element


class ScaleToSymmetricRange(grain.transforms.Map):
  """Batch {"image": uint8 (B, H, W, C), "label": (B,)} -> float32 images in [-1, 1], int32 labels."""

  def map(self, batch):
    images = batch["image"].astype(np.float32) / 127.5 - 1.0
    return {"image": images, "label": batch["label"].astype(np.int32)}
