"""PyTorch checkpoint import: the safe .pt reader, state-dict selection and the DiT mapping's errors.

torch is not installed, so files other than the official fixtures are written here by `TorchLikePickler`,
which emits the same opcodes torch.save does (GLOBAL torch._utils _rebuild_tensor_v2, persistent storage ids,
collections.OrderedDict, argparse.Namespace via NEWOBJ/BUILD) with the real pickle machinery. Expected tensor
values come from explicit element indexing `flat[offset + sum(i_k * stride_k)]`, not from numpy's strides.
Parity of the converted models with the official outputs: test_dit_fixture.py, test_convert_dig.py.
"""
import collections
import io
import json
import math
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zipfile

import ml_collections
import ml_dtypes
import numpy as np
import pytest

from dyngen import checkpoint
from dyngen import models
from dyngen.convert import dit as dit_rules
from dyngen.convert import load
from dyngen.convert import param_mapping
from dyngen.convert import torch_checkpoint
from dyngen.convert import CheckpointFormatError, ParamMappingError, UnsafeCheckpointError
from dyngen.convert import load_torch_params, read_torch_checkpoint, select_state_dict

DATA = pathlib.Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------------------
# Writing torch-format files without torch.

class Global:
  """Pickled as `GLOBAL module name`, like a reference to a torch function or class."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a reduce function is callable; it is never called
    raise AssertionError("a Global stands for a name in the file and is never called")


class Storage:
  """A torch storage: `data` (1-D numpy) saved under `key` with torch storage class `type_name`."""

  def __init__(self, key, data, type_name):
    self.key, self.data, self.type_name = key, data, type_name


class Tensor:
  """A strided view of a Storage, pickled as torch does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage, offset, shape, stride, rebuild=("torch._utils", "_rebuild_tensor_v2")):
    self.storage, self.offset, self.shape, self.stride, self.rebuild = storage, offset, shape, stride, rebuild

  def expected(self):
    """The tensor's values by explicit indexing of the flat storage."""
    out = np.empty(self.shape, self.storage.data.dtype)
    for index in np.ndindex(*self.shape):
      out[index] = self.storage.data[self.offset + sum(i * s for i, s in zip(index, self.stride))]
    return out


class Call:
  """An arbitrary `module.name(*args)` reduce, e.g. a malicious one or a torch rebuild wrapper."""

  def __init__(self, module, name, args):
    self.module, self.name, self.args = module, name, args


class TorchLikePickler(pickle._Pickler):  # the pure-Python pickler lets us add a dispatch entry
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file, legacy=False):
    super().__init__(file, protocol=2)  # torch.save's DEFAULT_PROTOCOL
    self.legacy = legacy
    self.storages = {}

  def save_global_ref(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
    self.memoize(obj)

  dispatch[Global] = save_global_ref

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    pid = ("storage", Global("torch", obj.type_name), obj.key, "cpu", obj.data.size)
    return pid + (None,) if self.legacy else pid  # legacy ids carry view metadata

  def reducer_override(self, obj):
    if isinstance(obj, Tensor):
      return Global(*obj.rebuild), (obj.storage, obj.offset, obj.shape, obj.stride, False,
                                    collections.OrderedDict())
    if isinstance(obj, Call):
      return Global(obj.module, obj.name), obj.args
    return NotImplemented


def write_zip_checkpoint(path, obj, byteorder="little", root="archive", data_pkl=None):
  buffer = io.BytesIO()
  pickler = TorchLikePickler(buffer)
  pickler.dump(obj)
  order = "<" if byteorder == "little" else ">"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr(f"{root}/data.pkl", buffer.getvalue() if data_pkl is None else data_pkl)
    zf.writestr(f"{root}/byteorder", byteorder)
    for key, storage in pickler.storages.items():
      zf.writestr(f"{root}/data/{key}", storage.data.astype(storage.data.dtype.newbyteorder(order)).tobytes())
    zf.writestr(f"{root}/version", "3\n")


def write_legacy_checkpoint(path, obj):
  """torch.save(..., _use_new_zipfile_serialization=False): header pickles, main pickle, keys, storages."""
  with open(path, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, dict(protocol_version=1001, little_endian=True,
                                                      type_sizes=dict(short=2, int=4, long=8))):
      pickle.dump(header, f, protocol=2)
    pickler = TorchLikePickler(f, legacy=True)
    pickler.dump(obj)
    keys = sorted(pickler.storages)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      data = pickler.storages[key].data
      f.write(struct.pack("<q", data.size) + data.astype(data.dtype.newbyteorder("<")).tobytes())


def strided_state_dict(dtype, type_name, seed=0):
  """Tensors covering offsets, transposed strides, a shared storage, a 0-d and an empty tensor."""
  rng = np.random.default_rng(seed)
  values = rng.normal(size=40) * 100 if dtype != np.bool_ else rng.normal(size=40) > 0
  shared = Storage("0", values.astype(dtype), type_name)
  other = Storage("1", np.arange(7).astype(dtype), type_name)
  return collections.OrderedDict([
      ("contiguous", Tensor(shared, 0, (2, 3, 4), (12, 4, 1))),
      ("transposed_with_offset", Tensor(shared, 5, (4, 3), (1, 8))),  # a .T view into the same storage
      ("broadcast", Tensor(shared, 39, (2, 2), (0, 0))),  # stride 0 (expand)
      ("scalar", Tensor(other, 6, (), ())),
      ("empty", Tensor(other, 0, (0, 3), (3, 1))),
  ])


# ---------------------------------------------------------------------------------------------------------
# The official fixture checkpoints.

def test_reads_official_dit_state_dict():
  state_dict = read_torch_checkpoint(DATA / "dit_tiny" / "checkpoint.pt")
  manifest = json.loads((DATA / "dit_tiny" / "manifest.json").read_text())
  assert isinstance(state_dict, collections.OrderedDict)
  # torch's named_parameters count (pos_embed included) is in the manifest.
  assert sum(v.size for v in state_dict.values()) == manifest["num_parameters"]
  assert all(v.dtype == np.float32 for v in state_dict.values())
  assert state_dict["x_embedder.proj.weight"].shape == (64, 4, 2, 2)
  assert state_dict["blocks.1.attn.qkv.weight"].shape == (3 * 64, 64)
  assert state_dict["y_embedder.embedding_table.weight"].shape == (11, 64)
  # pos_embed is DiT's fixed float64 sin-cos table cast to float32 (independent formula here): [sin, cos] over
  # 16 frequencies of the column index in the first 32 channels, then of the row index.
  omega = 1.0 / 10000 ** (np.arange(16) / 16.0)
  rows, cols = np.divmod(np.arange(16), 4)
  table = np.concatenate([np.sin(np.outer(cols, omega)), np.cos(np.outer(cols, omega)),
                          np.sin(np.outer(rows, omega)), np.cos(np.outer(rows, omega))], axis=1)
  np.testing.assert_allclose(state_dict["pos_embed"][0], table, rtol=0, atol=1e-7)  # float32 rounding
  # The manifest's init rule: weights ~ N(0, 0.05), biases ~ N(0, 0.02) (8192+ samples: std within 5%).
  weights = np.concatenate([v.ravel() for k, v in state_dict.items() if k.endswith("weight")])
  biases = np.concatenate([v.ravel() for k, v in state_dict.items() if k.endswith("bias")])
  assert abs(weights.std() - 0.05) < 0.0025 and abs(biases.std() - 0.02) < 0.001


def test_reads_official_container_with_argparse_namespace():
  checkpoint = read_torch_checkpoint(DATA / "dydit_tiny" / "checkpoint.pt")
  manifest = json.loads((DATA / "dydit_tiny" / "manifest.json").read_text())
  assert sorted(checkpoint) == ["args", "ema", "model"]
  args = checkpoint["args"]
  assert isinstance(args, torch_checkpoint.TrainingArgs)
  assert (args.image_size, args.num_classes, args.model_depth, args.token_ratio) == (64, 10, 2, 0.5)
  assert args.ckpt is None and args.wandb is False
  assert sum(v.size for v in checkpoint["ema"].values()) == manifest["num_parameters"]
  # The fixture stores "ema" with the very same tensors as "model".
  for name, value in checkpoint["model"].items():
    np.testing.assert_array_equal(checkpoint["ema"][name], value)


def test_selects_ema_without_reading_other_tensors():
  with torch_checkpoint.TorchCheckpoint(DATA / "dydit_tiny" / "checkpoint.pt") as checkpoint:
    state_dict, key = select_state_dict(checkpoint.tree)
    assert key == "ema" and state_dict is checkpoint.tree["ema"]
    ref = state_dict["blocks.0.attn.qkv.weight"]
    assert isinstance(ref, torch_checkpoint.TensorRef) and ref.shape == (192, 64) and ref.dtype == np.float32


def test_state_dict_selection_order_and_errors():
  tensor = torch_checkpoint.TensorRef(torch_checkpoint.StorageRef("0", np.dtype(np.float32), 1), 0, (), ())
  assert select_state_dict({"w": tensor}) == ({"w": tensor}, None)
  assert select_state_dict({"model": {"a": tensor}, "state_dict": {"b": tensor}})[1] == "model"
  assert select_state_dict({"state_dict": {"module.w": tensor}, "epoch": 3}) == ({"w": tensor}, "state_dict")
  with pytest.raises(CheckpointFormatError, match=r"no state dict found.*\['epoch', 'optimizer'\]"):
    select_state_dict({"optimizer": {"a": tensor}, "epoch": 3})


# ---------------------------------------------------------------------------------------------------------
# Tensor layouts, dtypes and byte orders (files written by TorchLikePickler).

DTYPES = [
    (np.float32, "FloatStorage"), (np.float64, "DoubleStorage"), (np.float16, "HalfStorage"),
    (ml_dtypes.bfloat16, "BFloat16Storage"), (np.int64, "LongStorage"), (np.int32, "IntStorage"),
    (np.int8, "CharStorage"), (np.uint8, "ByteStorage"), (np.bool_, "BoolStorage"),
]


@pytest.mark.parametrize("byteorder", ["little", "big"])
@pytest.mark.parametrize("dtype,type_name", DTYPES, ids=[name for _, name in DTYPES])
def test_zip_strides_offsets_dtypes_byteorder(tmp_path, dtype, type_name, byteorder):
  tensors = strided_state_dict(dtype, type_name)
  write_zip_checkpoint(tmp_path / "x.pt", tensors, byteorder=byteorder)
  loaded = read_torch_checkpoint(tmp_path / "x.pt")
  assert list(loaded) == list(tensors)
  for name, tensor in tensors.items():
    assert loaded[name].dtype == np.dtype(dtype) and loaded[name].dtype.isnative
    np.testing.assert_array_equal(loaded[name], tensor.expected(), err_msg=name)


def test_legacy_format(tmp_path):
  tensors = strided_state_dict(np.float32, "FloatStorage")
  write_legacy_checkpoint(tmp_path / "legacy.pt", {"model": tensors, "epoch": 7})
  loaded = read_torch_checkpoint(tmp_path / "legacy.pt")
  assert loaded["epoch"] == 7
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(loaded["model"][name], tensor.expected(), err_msg=name)


def test_parameter_and_tensor_subclass_wrappers(tmp_path):
  """nn.Parameter, _rebuild_from_type_v2(torch.Tensor) and _rebuild_tensor_v3 on an untyped storage."""
  storage = Storage("0", np.arange(6, dtype=np.float32), "FloatStorage")
  untyped = Storage("1", np.arange(6, dtype=np.float32).view(np.uint8), "UntypedStorage")
  plain = Tensor(storage, 0, (2, 3), (3, 1))
  write_zip_checkpoint(tmp_path / "x.pt", {
      "parameter": Call("torch._utils", "_rebuild_parameter", (plain, True, collections.OrderedDict())),
      "from_type": Call("torch._tensor", "_rebuild_from_type_v2",
                        (Global("torch._utils", "_rebuild_tensor_v2"), Global("torch", "Tensor"),
                         (storage, 0, (2, 3), (3, 1), False, collections.OrderedDict()), {})),
      "v3": Call("torch._utils", "_rebuild_tensor_v3",  # offset and size in float32 elements
                 (untyped, 1, (5,), (1,), False, collections.OrderedDict(), Global("torch", "float32"))),
  })
  loaded = read_torch_checkpoint(tmp_path / "x.pt")
  np.testing.assert_array_equal(loaded["parameter"], np.arange(6, dtype=np.float32).reshape(2, 3))
  np.testing.assert_array_equal(loaded["from_type"], np.arange(6, dtype=np.float32).reshape(2, 3))
  np.testing.assert_array_equal(loaded["v3"], np.arange(1, 6, dtype=np.float32))


def test_view_outside_storage_is_refused(tmp_path):
  storage = Storage("0", np.arange(6, dtype=np.float32), "FloatStorage")
  write_zip_checkpoint(tmp_path / "x.pt", {"w": Tensor(storage, 2, (2, 3), (3, 1))})  # needs 8 elements
  with pytest.raises(CheckpointFormatError, match=r"reads past the end of its storage of 6 elements"):
    read_torch_checkpoint(tmp_path / "x.pt")


def test_not_a_checkpoint(tmp_path):
  (tmp_path / "x.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
  with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
    read_torch_checkpoint(tmp_path / "x.pt")
  official = (DATA / "dit_tiny" / "checkpoint.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(official[:len(official) // 2])  # the zip directory is at the end
  with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
    read_torch_checkpoint(tmp_path / "cut.pt")


def test_truncated_pickle(tmp_path):
  buffer = io.BytesIO()
  TorchLikePickler(buffer).dump(strided_state_dict(np.float32, "FloatStorage"))
  write_zip_checkpoint(tmp_path / "x.pt", {}, data_pkl=buffer.getvalue()[:200])
  with pytest.raises(CheckpointFormatError, match="corrupt or truncated checkpoint"):
    read_torch_checkpoint(tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------------------
# Malicious pickles: refused before anything runs.

class ShellCommand:
  """The classic payload: unpickling calls os.system(command)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


def payloads(marker):
  touch = f"touch {marker}"
  code = f"open({str(marker)!r}, 'w').close()"
  return {
      "os.system": ("posix", "system", ShellCommand(touch)),
      "builtins.exec": ("builtins", "exec", Call("builtins", "exec", (code,))),
      "subprocess.call": ("subprocess", "call", Call("subprocess", "call", (["touch", str(marker)],))),
      "builtins.eval via torch name": ("torch._utils", "eval", Call("torch._utils", "eval", (code,))),
  }


def test_payload_runs_under_plain_pickle(tmp_path):
  """Control: the payload really executes with an ordinary unpickler, so the refusal tests can fail."""
  marker = tmp_path / "pwned"
  pickle.loads(pickle.dumps(ShellCommand(f"touch {marker}"), protocol=2))
  assert marker.exists()


@pytest.mark.parametrize("container", ["zip", "legacy", "bare pickle"])
@pytest.mark.parametrize("payload", list(payloads("m")))
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, container, payload):
  marker = tmp_path / "pwned"
  module, name, evil = payloads(marker)[payload]
  storage = Storage("0", np.ones(4, np.float32), "FloatStorage")
  # Hidden inside a plausible checkpoint, after a real tensor.
  obj = {"model": collections.OrderedDict(w=Tensor(storage, 0, (4,), (1,))), "args": {"lr": evil}}
  path = tmp_path / "evil.pt"
  if container == "zip":
    write_zip_checkpoint(path, obj)
  elif container == "legacy":
    write_legacy_checkpoint(path, obj)
  else:
    buffer = io.BytesIO()
    TorchLikePickler(buffer).dump(obj)
    path.write_bytes(buffer.getvalue())
  with pytest.raises(UnsafeCheckpointError, match=rf"refusing to load global '{module}\.{name}'"):
    read_torch_checkpoint(path)
  assert not marker.exists()


def test_malicious_protocol_5_pickle_is_refused(tmp_path):
  """Protocol >= 4 names globals with STACK_GLOBAL instead of GLOBAL; the same gate applies."""
  marker = tmp_path / "pwned"
  (tmp_path / "evil.pt").write_bytes(pickle.dumps(ShellCommand(f"touch {marker}"), protocol=5))
  with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global 'posix\.system'"):
    read_torch_checkpoint(tmp_path / "evil.pt")
  assert not marker.exists()


def test_refused_even_under_an_allowed_rebuild(tmp_path):
  """A tensor subclass rebuild whose type is not allow-listed is refused by name."""
  storage = Storage("0", np.ones(4, np.float32), "FloatStorage")
  args = (storage, 0, (4,), (1,), False, collections.OrderedDict())
  write_zip_checkpoint(tmp_path / "x.pt", {"w": Call(
      "torch._tensor", "_rebuild_from_type_v2",
      (Global("torch._utils", "_rebuild_tensor_v2"), Global("my_package", "EvilTensor"), args, {}))})
  with pytest.raises(UnsafeCheckpointError, match=r"'my_package\.EvilTensor'"):
    read_torch_checkpoint(tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------------------
# DiT mapping: layouts and errors.

def tiny_config(**overrides):
  manifest = json.loads((DATA / "dit_tiny" / "manifest.json").read_text())
  return ml_collections.ConfigDict(dict(dict(name="dit", **manifest["constructor_kwargs"]), **overrides))


@pytest.fixture(scope="module")
def dit_tiny():
  state_dict = read_torch_checkpoint(DATA / "dit_tiny" / "checkpoint.pt")
  return state_dict, load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", tiny_config())


def test_dit_layouts(dit_tiny):
  """Each Flax kernel entry equals the torch weight entry it must come from (indexing, not reshapes)."""
  state_dict, params = dit_tiny
  heads, head_dim, width = 4, 16, 64
  qkv, w_qkv = params["blocks_1"]["attn"]["qkv"], state_dict["blocks.1.attn.qkv.weight"]
  proj, w_proj = params["blocks_1"]["attn"]["proj"]["kernel"], state_dict["blocks.1.attn.proj.weight"]
  for which, h, d, i in [(0, 0, 0, 5), (1, 2, 7, 63), (2, 3, 15, 0), (1, 0, 3, 17)]:
    row = which * width + h * head_dim + d  # rows [q; k; v], each head-major
    assert qkv["kernel"][i, which, h, d] == w_qkv[row, i]
    assert qkv["bias"][which, h, d] == state_dict["blocks.1.attn.qkv.bias"][row]
    assert proj[h, d, i] == w_proj[i, h * head_dim + d]
  conv, w_conv = params["x_embedder"]["proj"]["kernel"], state_dict["x_embedder.proj.weight"]
  assert conv[1, 0, 3, 40] == w_conv[40, 3, 1, 0]  # (kh, kw, in, out) <- (out, in, kh, kw)
  ada, w_ada = params["blocks_0"]["adaLN_modulation"]["kernel"], state_dict["blocks.0.adaLN_modulation.1.weight"]
  assert ada[9, 5 * width + 2] == w_ada[5 * width + 2, 9]  # chunk 5 (gate_mlp) stays chunk 5
  np.testing.assert_array_equal(params["y_embedder"]["embedding_table"]["embedding"],
                                state_dict["y_embedder.embedding_table.weight"])
  flat = param_mapping.flatten_shapes(params)
  assert len(flat) == 31 and all(math.prod(s) for s in flat.values())  # 32 torch tensors minus pos_embed


def test_wrong_size_lists_missing_unexpected_and_misshaped():
  with pytest.raises(ParamMappingError) as error:
    load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", tiny_config(depth=3, hidden_size=32))
  message = str(error.value)
  # Block 2 has 10 tensors; all 30 weights of the checkpoint plus pos_embed are mis-shaped.
  assert "missing in the checkpoint (10):" in message and "blocks.2.attn.qkv.weight (96, 32)" in message
  assert "mis-shaped (31):" in message and f"... and {31 - param_mapping.MAX_LISTED} more" in message
  assert ("x_embedder.proj.weight: checkpoint (64, 4, 2, 2), model expects (32, 4, 2, 2) "
          "(for x_embedder/proj/kernel (2, 2, 4, 32))") in message
  assert "depth=3" in message and "hidden_size=32" in message


def test_extra_and_missing_blocks_are_listed():
  with pytest.raises(ParamMappingError) as error:
    load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", tiny_config(depth=1))
  message = str(error.value)
  assert "unexpected in the checkpoint (the model has no such parameter) (10):" in message
  assert "blocks.1.mlp.fc2.weight (64, 256)" in message and "missing" not in message


def test_other_grid_size_is_caught_by_pos_embed():
  # input_size 16 with patch 4 keeps every weight shape of input 8 / patch 2 except the patch conv;
  # input 16 / patch 2 keeps all weights and only pos_embed tells the grids apart.
  with pytest.raises(ParamMappingError, match=r"pos_embed: checkpoint \(1, 16, 64\), model expects \(1, 64, 64\)"):
    load_torch_params(DATA / "dit_tiny" / "checkpoint.pt", tiny_config(input_size=16))


def test_pos_embed_values_are_checked(dit_tiny):
  state_dict, _ = dit_tiny
  model = models.build(tiny_config())
  rules, buffers = dit_rules.param_rules(model)
  tampered = dict(state_dict, pos_embed=state_dict["pos_embed"] + 1e-3)
  with pytest.raises(ParamMappingError, match=r"fixed buffers that differ \(1\):\n    pos_embed: differs from "
                                               r"the model's by up to 0\.001"):
    param_mapping.apply_rules(tampered, rules, buffers, load.expected_param_shapes(model), "tiny DiT")


def test_unknown_family():
  with pytest.raises(ValueError, match=r"no PyTorch converter for model family 'nosuch'"):
    load.family_rules("nosuch")


# ---------------------------------------------------------------------------------------------------------
# The command line: python -m dyngen.convert (a subprocess: absl flags are process-global).

def run_cli(tmp_path, *flags):
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(
      "import ml_collections\n\n\ndef get_config(arg=None):\n"
      f"  return ml_collections.ConfigDict(dict(model={dict(tiny_config())!r}))\n")
  return subprocess.run(
      [sys.executable, "-m", "dyngen.convert", f"--config={config_file}",
       f"--torch_checkpoint={DATA / 'dit_tiny' / 'checkpoint.pt'}", *flags],
      capture_output=True, text=True, timeout=300, cwd=pathlib.Path(__file__).parent.parent)


def test_cli_writes_an_inference_checkpoint(tmp_path, dit_tiny):
  result = run_cli(tmp_path, f"--output={tmp_path / 'out'}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "182,176 parameters" in result.stdout  # 183,200 in torch minus the 16x64 fixed pos_embed
  config, params = checkpoint.load_for_inference(tmp_path / "out")
  assert config.model.to_dict() == tiny_config().to_dict()
  got, want = dict(_flat_items(params)), dict(_flat_items(dit_tiny[1]))
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)


def _flat_items(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_items(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def test_cli_reports_a_mismatch_and_writes_nothing(tmp_path):
  result = run_cli(tmp_path, "--config.model.depth=3", f"--output={tmp_path / 'out'}")
  assert result.returncode == 2  # a user error: one message, no traceback (dyngen.cli_errors)
  assert "cannot convert" in result.stderr and "missing in the checkpoint (10):" in result.stderr
  assert not (tmp_path / "out").exists()
