"""The FID InceptionV3 against pytorch-fid's outputs (tests/data/inception_fid) and ADM's TF1 resize.

The fixture stores no weights: `regenerate_state_dict` redraws them with numpy from the seed and rule of
manifest.json (each tensor checked against the manifest's sha256), and `write_state_dict` saves them as a
torch zip checkpoint (the writer of test_convert.py, torch's own opcodes), which the real loader reads.

Tolerances: our float32 network differs from pytorch-fid's float32 one only in summation order, which
moves outputs by ~1e-6 of their largest value (the manifest's float32-vs-float64 gap is the same size,
1.2e-5 on block outputs of magnitude 13); 1e-5 of the largest value is the bound, a 10x margin.
"""
import collections
import hashlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyngen import evaluation
from dyngen.convert import ParamMappingError
from dyngen.evaluation import inception
from dyngen.evaluation import inception_weights
from tests.test_convert import Storage, Tensor, write_zip_checkpoint

CASE = pathlib.Path(__file__).parent / "data" / "inception_fid"


def regenerate_state_dict(manifest, seed=None):
  """The fixture's state dict, drawn as manifest["param_init"] says: one PCG64 generator in param_list order.

  seed=None: the fixture's param_seed, each tensor checked against the manifest's sha256. Another seed gives
  weights of the real file's names, shapes and scales for tests that only need a working network (CLIs).
  """
  rng = np.random.default_rng(manifest["seeds"]["param_seed"] if seed is None else seed)
  gain = manifest["param_init"]["GAIN"]
  draws = {
      "fan_in_normal": lambda shape: rng.standard_normal(size=shape) * math.sqrt(gain / math.prod(shape[1:])),
      "norm_weight": lambda shape: rng.uniform(0.8, 1.2, size=shape),
      "bias": lambda shape: rng.normal(0.0, 0.02, size=shape),
      "bn_running_mean": lambda shape: rng.normal(0.0, 0.1, size=shape),
      "bn_running_var": lambda shape: rng.uniform(0.5, 1.5, size=shape),
  }
  state_dict = collections.OrderedDict()
  for entry in manifest["param_list"]:
    if entry["rule"] == "not_drawn":
      state_dict[entry["name"]] = np.array(entry["value"], np.int64)
      continue
    array = draws[entry["rule"]](tuple(entry["shape"])).astype(np.float32)
    if seed is None:
      assert hashlib.sha256(array.astype("<f4").tobytes()).hexdigest() == entry["sha256_float32_le"], entry["name"]
    state_dict[entry["name"]] = array
  return state_dict


def random_inception_file(path, seed=0):
  """A pt_inception-format file of random weights (the real names and shapes), for CLI and evaluator tests."""
  manifest = json.loads((CASE / "manifest.json").read_text())
  return write_state_dict(path, regenerate_state_dict(manifest, seed=seed))


def write_state_dict(path, state_dict):
  """Saves {name: array} as torch.save would (zip format, one storage per tensor, contiguous strides)."""
  type_names = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}
  tensors = collections.OrderedDict()
  for index, (name, array) in enumerate(state_dict.items()):
    array = np.ascontiguousarray(array)
    stride = tuple(s // array.itemsize for s in array.strides)
    tensors[name] = Tensor(Storage(str(index), array.reshape(-1), type_names[array.dtype]), 0, array.shape, stride)
  write_zip_checkpoint(path, tensors)
  return path


@pytest.fixture(scope="module")
def manifest():
  return json.loads((CASE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def state_dict(manifest):
  return regenerate_state_dict(manifest)


@pytest.fixture(scope="module")
def net(state_dict, tmp_path_factory):
  return evaluation.load_inception(write_state_dict(tmp_path_factory.mktemp("inception") / "pt_inception.pth",
                                                    state_dict))


@pytest.fixture(scope="module")
def case():
  inputs, outputs = np.load(CASE / "inputs.npz"), np.load(CASE / "outputs.npz")
  return {**{k: inputs[k] for k in inputs.files}, **{k: outputs[k] for k in outputs.files}}


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def nchw_grid(x, index):
  """(N, H, W, C) -> the fixture's stored grid (N, C, len(index), len(index))."""
  return np.asarray(x).transpose(0, 3, 1, 2)[:, :, index][:, :, :, index]


def assert_close_to_largest(actual, expected, fraction=1e-5):
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=fraction * np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def fixture_run(net, case):
  """One jitted run on the fixture's x: outputs, block outputs, and Mixed_6d's 1x1 branch captured by Flax."""
  def run(variables, x):
    return net.module.apply(variables, inception.preprocess(x, "pytorch-fid"), with_blocks=True,
                            capture_intermediates=lambda module, _: module.name == "branch1x1")
  outputs, state = jax.jit(run)(net.variables, nhwc(case["x"]))
  return outputs, state["intermediates"]


def test_resize_matches_pytorch_fid(case):
  index = case["resized_idx"]
  # torch computes the sampling coordinates in float32 and so do we: against its float32 output the gap is
  # the lerp's rounding (~1e-6); the float64 reference differs by up to 1.7e-5 for the downsampled image.
  for name in ("", "_down"):
    resized = nchw_grid(inception.preprocess(nhwc(case[f"x{name}"]), "pytorch-fid"), index)
    np.testing.assert_allclose(resized, case[f"resized{name}_sub_f32"], rtol=0, atol=2e-6)
    np.testing.assert_allclose(resized, case[f"resized{name}_sub_f64"], rtol=0, atol=3e-5)


def test_blocks_and_pool3_match_pytorch_fid(fixture_run, case):
  outputs, _ = fixture_run
  for block in range(3):
    full = np.asarray(outputs[f"block{block}"])
    assert_close_to_largest(nchw_grid(full, case[f"block{block}_idx"]), case[f"block{block}_sub_f32"])
    assert_close_to_largest(nchw_grid(full, case[f"block{block}_idx"]), case[f"block{block}_sub_f64"])
    assert_close_to_largest(full.mean(axis=(1, 2)), case[f"block{block}_chmean_f32"])
  assert_close_to_largest(outputs["pool_3"], case["pool3_f32"])
  assert_close_to_largest(outputs["pool_3"], case["pool3_f64"])


def test_logits_and_spatial_are_adm_tensors(fixture_run, state_dict):
  outputs, intermediates = fixture_run
  # IS logits: pool_3 @ W with W the (1008, 2048) fc weight of the file, no bias (ADM's softmax/logits/MatMul).
  expected = np.asarray(outputs["pool_3"], np.float64) @ state_dict["fc.weight"].astype(np.float64).T
  assert outputs["logits"].shape == (2, 1008)
  assert_close_to_largest(outputs["logits"], expected)
  # sFID: TF's mixed_6/conv = Mixed_6d's 1x1 branch after its ReLU, channels :7, flattened (row, col, channel).
  (branch,) = intermediates["Mixed_6d"]["branch1x1"]["__call__"]
  assert branch.shape == (2, 17, 17, 192)
  spatial = np.asarray(outputs["spatial"])
  assert spatial.shape == (2, 2023)
  np.testing.assert_array_equal(spatial.reshape(2, 17, 17, 7), np.asarray(branch)[..., :7])
  assert spatial[0, 1] == branch[0, 0, 0, 1] and spatial[0, 7] == branch[0, 0, 1, 0]
  assert np.all(spatial >= 0) and np.mean(spatial > 0) > 0.2  # ReLU output, not the pre-activation


def test_features_downsample_batch_pad_and_report_progress(net, case):
  # x_down (320x352) is downsampled to 299 without antialiasing; 3 copies in batches of 2, the last padded.
  images = np.repeat(nhwc(case["x_down"]), 3, axis=0)
  calls = []
  features = net.features(images, preprocessing="pytorch-fid", batch_size=2, progress=lambda *a: calls.append(a))
  assert calls == [(2, 3), (3, 3)]
  assert {k: v.shape for k, v in features.items()} == {"pool_3": (3, 2048), "logits": (3, 1008),
                                                        "spatial": (3, 2023)}
  for row in range(3):
    assert_close_to_largest(features["pool_3"][row:row + 1], case["pool3_down_f32"])
    assert_close_to_largest(features["pool_3"][row:row + 1], case["pool3_down_f64"])


def tf1_resize_reference(image, size):
  """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) in float64 numpy, pixel by pixel.

  Source coordinates as TF's legacy scaler: float32(dst) * float32(in / out) (TF uses float32 here too).
  """
  height, width, _ = image.shape
  image = image.astype(np.float64)
  out = np.empty((size, size, image.shape[2]))
  scale_y, scale_x = np.float32(height) / np.float32(size), np.float32(width) / np.float32(size)
  for i in range(size):
    y = float(np.float32(i) * scale_y)
    y0, y1 = int(math.floor(y)), min(int(math.ceil(y)), height - 1)
    for j in range(size):
      x = float(np.float32(j) * scale_x)
      x0, x1 = int(math.floor(x)), min(int(math.ceil(x)), width - 1)
      top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * (x - x0)
      bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * (x - x0)
      out[i, j] = top + (bottom - top) * (y - y0)
  return out


def test_adm_resize_is_tf1_legacy_bilinear():
  # Analytic: 2 -> 4 pixels samples at 0, 0.5, 1, 1.5 (clamped), i.e. a, (a+b)/2, b, b; half-pixel centres
  # would sample at -0.25 (clamped 0), 0.25, 0.75, 1.25 instead.
  row = np.array([10.0, 30.0], np.float32).reshape(1, 1, 2, 1).repeat(2, axis=1)
  np.testing.assert_allclose(np.asarray(inception.resize_tf1_bilinear(row, 4))[0, 0, :, 0], [10, 20, 30, 30])
  np.testing.assert_allclose(np.asarray(inception.resize_half_pixel_bilinear(row, 4))[0, 0, :, 0],
                             [10, 15, 25, 30])
  rng = np.random.default_rng(0)
  for shape in ((11, 7, 3), (40, 33, 3)):  # upsampled and downsampled to 17
    image = rng.integers(0, 256, size=shape).astype(np.uint8)
    resized = np.asarray(inception.resize_tf1_bilinear(jnp.asarray(image, jnp.float32)[None], 17))[0]
    # float32 lerps of values up to 255: a few ulp of 255 (1.5e-5 each).
    np.testing.assert_allclose(resized, tf1_resize_reference(image, 17), rtol=0, atol=1e-4)


def test_adm_resize_is_bit_identical_to_tensorflow():
  # The TF graph's own op (ResizeBilinear without half_pixel_centers, the 2015 graph predates the attribute):
  # same float32 coordinates and lerp order, so the outputs are bit-identical, for 256 -> 299 as ADM's
  # ImageNet 256 samples and for a downsampled 320x352 image.
  tf = pytest.importorskip("tensorflow")
  rng = np.random.default_rng(1)
  for shape in ((1, 256, 256, 3), (1, 320, 352, 3)):
    images = rng.integers(0, 256, size=shape).astype(np.float32)
    expected = tf.raw_ops.ResizeBilinear(images=tf.constant(images), size=[299, 299], align_corners=False,
                                         half_pixel_centers=False).numpy()
    np.testing.assert_array_equal(np.asarray(inception.resize_tf1_bilinear(images)), expected)


def test_adm_preprocessing_scales_like_the_tf_graph(net):
  # (x - 128) / 128 after the resize: 0 -> -1, 128 -> 0, 255 -> 127/128; uint8 and float inputs agree.
  constant = np.stack([np.full((5, 6, 3), v, np.uint8) for v in (0, 128, 255)])
  scaled = np.asarray(inception.preprocess(constant, "adm"))
  assert scaled.shape == (3, 299, 299, 3)
  np.testing.assert_array_equal(scaled[:, 0, 0, 0], [-1.0, 0.0, 127 / 128])
  np.testing.assert_array_equal(np.asarray(inception.preprocess(constant.astype(np.float32), "adm")), scaled)


def test_bad_inputs_are_refused(net):
  images = np.zeros((2, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match="NHWC"):
    net.features(np.zeros((2, 3, 8, 8), np.float32))
  with pytest.raises(ValueError, match="takes float images in \\[0, 1\\], got uint8"):
    net.features(images.astype(np.uint8), preprocessing="pytorch-fid")
  with pytest.raises(ValueError, match="got values in \\[0, 2\\]"):
    net.features(images + 2 * (np.arange(2) == 1)[:, None, None, None], preprocessing="pytorch-fid")
  with pytest.raises(ValueError, match="preprocessing must be one of"):
    net.features(images, preprocessing="tf")


def test_wrong_weights_list_every_problem(state_dict, tmp_path):
  broken = collections.OrderedDict(state_dict)
  del broken["Mixed_6d.branch1x1.conv.weight"]
  broken["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  broken["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's ImageNet head, not the FID graph's
  del broken["fc.bias"], broken["Conv2d_1a_3x3.bn.num_batches_tracked"]  # unused: absence is fine
  with pytest.raises(ParamMappingError) as error:
    inception_weights.convert_state_dict(broken)
  message = str(error.value)
  assert "missing in the checkpoint (1)" in message and "Mixed_6d.branch1x1.conv.weight (192, 768, 1, 1)" in message
  assert "unexpected in the checkpoint (the model has no such parameter) (1)" in message
  assert "AuxLogits.fc.weight (1000, 768)" in message
  assert "fc.weight: checkpoint (1000, 2048), model expects (1008, 2048)" in message
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
    evaluation.load_inception(tmp_path / "absent.pth")
  (tmp_path / "not_torch.pth").write_bytes(b"hello")
  with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
    evaluation.load_inception(tmp_path / "not_torch.pth")
