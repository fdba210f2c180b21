r"""Training throughput and model FLOPs utilisation (MFU), from the analytic FLOPs of `dyngen.models.flops`.

  training FLOPs per image = 3 x 2 x forward multiply-adds
      (the backward pass costs twice the forward; a multiply-add is 2 floating-point operations on hardware,
      while the papers' "GFLOPs", which `flops.count_flops` reproduces, count one per multiply-add)
  MFU = images/s x training FLOPs per image / (devices x peak FLOP/s per device)

Peaks are the vendors' dense bfloat16 matmul figures per chip (per GPU); a device whose kind is not listed
(a CPU, say) has no MFU. `python -m dyngen.throughput --config=configs/dit_xl.py:XL/2 --mfu=0.5` prints the
images/s per chip to expect at that utilisation (docs/throughput.md).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from dyngen.models import flops

# (substring of jax's `device.device_kind`, peak dense bf16 FLOP/s per chip); the first match counts.
PEAK_BF16_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("H100 PCIe", 756e12), ("H100", 989e12),
    ("A100", 312e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind` (e.g. "TPU v4"), or None when unknown."""
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def training_flops_per_image(model_config) -> float:
  """Hardware FLOPs of one training step's forward and backward pass per image (see the module docstring)."""
  return 6.0 * sum(flops.count_flops(model_config).values())


def utilisation(images_per_second: float, model_config, *, num_devices: int, device_kind: str) -> dict:
  """Throughput in total and per device, model TFLOP/s per device, and MFU (None for an unknown device)."""
  if num_devices < 1 or images_per_second < 0:
    raise ValueError(f"num_devices={num_devices} must be >= 1 and images_per_second={images_per_second} >= 0.")
  per_device = images_per_second / num_devices
  achieved = per_device * training_flops_per_image(model_config)
  peak = peak_flops(device_kind)
  return {"images_per_second": images_per_second, "images_per_second_per_device": per_device,
          "model_tflops_per_second_per_device": achieved / 1e12, "mfu": achieved / peak if peak else None}


def describe(images_per_second: float, model_config, *, num_devices: int, device_kind: str) -> str:
  """'774 images/s (96.8 per device), 68.9 model TFLOP/s per device, MFU 25.1% of TPU v4's 275 TFLOP/s'."""
  u = utilisation(images_per_second, model_config, num_devices=num_devices, device_kind=device_kind)
  text = (f"{u['images_per_second']:.4g} images/s ({u['images_per_second_per_device']:.3g} per device), "
          f"{u['model_tflops_per_second_per_device']:.3g} model TFLOP/s per device")
  if u["mfu"] is None:
    return text + f", MFU unknown (no peak listed for {device_kind!r})"
  return text + f", MFU {100 * u['mfu']:.1f}% of {device_kind}'s {peak_flops(device_kind) / 1e12:.0f} TFLOP/s"


def progress_suffix(u: dict) -> str:
  """What the trainer's progress line adds for a `utilisation` dict: '; 68.9 model TFLOP/s per device, MFU
  25.1%' (no MFU on a device without a listed peak, e.g. a CPU). Routed models count their dense FLOPs."""
  text = f"; {u['model_tflops_per_second_per_device']:.3g} model TFLOP/s per device"
  return text if u["mfu"] is None else text + f", MFU {100 * u['mfu']:.1f}%"


def expected_images_per_second(model_config, device_kind: str, mfu: float) -> float:
  """Training images/s per chip at utilisation `mfu` (0 < mfu <= 1)."""
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu} must be in (0, 1].")
  peak = peak_flops(device_kind)
  if peak is None:
    raise ValueError(f"no peak FLOP/s known for {device_kind!r}; known: {[name for name, _ in PEAK_BF16_FLOPS]}.")
  return mfu * peak / training_flops_per_image(model_config)


def main(argv, config_flag, mfu_flag, devices_flag):
  del argv
  model = config_flag.value.model
  print(f"{model.name} {model.hidden_size}x{model.depth}, patch {model.patch_size}: "
        f"{training_flops_per_image(model) / 1e9:.1f} GFLOP per training image; at MFU {mfu_flag.value:.0%}:")
  for kind in devices_flag.value:
    print(f"  {kind:10s} {peak_flops(kind) / 1e12:5.0f} TFLOP/s  "
          f"{expected_images_per_second(model, kind, mfu_flag.value):7.1f} images/s per chip")


if __name__ == "__main__":
  # Defined here, not at import: the trainer imports this module under dyngen.main's own --config flag.
  _flags = (config_flags.DEFINE_config_file("config", None, "Experiment config: configs/<name>.py[:arg]."),
            flags.DEFINE_float("mfu", 0.5, "The model FLOPs utilisation to assume."),
            flags.DEFINE_list("devices", ["TPU v4", "TPU v5p", "H100"], "Device kinds to tabulate."))
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: main(argv, *_flags))
