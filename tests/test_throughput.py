"""dyngen.throughput: training FLOPs per image against the papers' counts, MFU arithmetic, and the figures of
docs/throughput.md recomputed (so the page cannot drift from the code)."""
import pathlib
import re

import pytest

from dyngen import configs
from dyngen import throughput

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def dit_xl_2():
  return configs.get("dit_xl", "XL/2").model


def test_training_flops_per_image_is_six_times_the_papers_forward_count():
  # DiT paper Table 4: DiT-XL/2 118.64 Gflops per forward (multiply-adds). By hand: 28 blocks of attention
  # 4ND^2 + 2N^2D, MLP 8ND^2, adaLN 6D^2 (N = 256 tokens, D = 1152), plus embeddings and the final layer.
  n, d = 256, 1152
  blocks = 28 * (4 * n * d * d + 2 * n * n * d + 8 * n * d * d + 6 * d * d)
  assert throughput.training_flops_per_image(dit_xl_2()) == pytest.approx(6 * 118.64e9, rel=5e-4)
  assert throughput.training_flops_per_image(dit_xl_2()) == pytest.approx(6 * blocks, rel=2e-3)


def test_peaks_by_device_kind():
  assert throughput.peak_flops("TPU v4") == 275e12
  assert throughput.peak_flops("TPU v5 lite") == 197e12
  assert throughput.peak_flops("TPU v5p") == 459e12
  assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert throughput.peak_flops("cpu") is None


def test_the_progress_line_suffix():
  flops_per_image = throughput.training_flops_per_image(dit_xl_2())
  on_v4 = throughput.utilisation(0.25 * 275e12 * 8 / flops_per_image, dit_xl_2(), num_devices=8,
                                 device_kind="TPU v4")
  assert throughput.progress_suffix(on_v4) == "; 68.8 model TFLOP/s per device, MFU 25.0%"
  on_cpu = throughput.utilisation(2e9 / flops_per_image, dit_xl_2(), num_devices=1, device_kind="cpu")
  assert throughput.progress_suffix(on_cpu) == "; 0.002 model TFLOP/s per device"  # no peak listed: no MFU


def test_mfu_arithmetic():
  flops_per_image = throughput.training_flops_per_image(dit_xl_2())
  images_per_second = 0.25 * 275e12 * 8 / flops_per_image  # 8 v4 chips at a quarter of their peak
  u = throughput.utilisation(images_per_second, dit_xl_2(), num_devices=8, device_kind="TPU v4")
  assert u["mfu"] == pytest.approx(0.25, rel=1e-12)
  assert u["model_tflops_per_second_per_device"] == pytest.approx(0.25 * 275, rel=1e-12)
  assert throughput.utilisation(10.0, dit_xl_2(), num_devices=1, device_kind="cpu")["mfu"] is None
  assert "MFU unknown (no peak listed for 'cpu')" in throughput.describe(10.0, dit_xl_2(), num_devices=1,
                                                                           device_kind="cpu")
  with pytest.raises(ValueError, match="num_devices=0 must be >= 1"):
    throughput.utilisation(1.0, dit_xl_2(), num_devices=0, device_kind="TPU v4")
  with pytest.raises(ValueError, match=r"mfu=1.5 must be in \(0, 1\]"):
    throughput.expected_images_per_second(dit_xl_2(), "TPU v4", 1.5)


def test_the_docs_figures_are_the_functions():
  text = (REPO_ROOT / "docs" / "throughput.md").read_text()
  mfu = float(re.search(r"The utilisation assumed is \*\*(\d+)%\*\*", text).group(1)) / 100
  kinds = ["TPU v4", "TPU v5p", "H100"]
  for name, row_name in [("dit_xl", "DiT-XL/2"), ("dig_xl", "DiG-XL/2")]:
    model = configs.get(name, "XL/2").model
    row = re.search(rf"^\| {re.escape(row_name)} \| ([\d.]+) \| (\d+) images/s/chip \| (\d+) images/s/chip \| "
                    r"(\d+) images/s/chip \|$", text, re.MULTILINE)
    assert row, row_name
    assert float(row.group(1)) == round(throughput.training_flops_per_image(model) / 1e9, 1)
    assert [int(x) for x in row.groups()[1:]] == [
        round(throughput.expected_images_per_second(model, kind, mfu)) for kind in kinds]
  example = throughput.describe(386 * 64, dit_xl_2(), num_devices=64, device_kind="NVIDIA H100 80GB HBM3")
  assert f"`{example}`" in text.replace("\n", " ")
