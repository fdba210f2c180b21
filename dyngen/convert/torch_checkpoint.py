"""Reads PyTorch `.pt` checkpoints without torch and without running any code stored in them.

A `.pt` file is a pickle whose tensors point at raw storages kept outside the pickle:

- zip format (torch >= 1.6): `<root>/data.pkl` plus one record `<root>/data/<key>` per storage, and a
  `<root>/byteorder` record;
- legacy format: a magic-number pickle, a protocol pickle, a sys-info pickle, the main pickle, a pickle of
  the storage keys, then each storage as a little-endian int64 element count followed by its bytes.

Unpickling is the dangerous part: a pickle may name any importable callable and call it. `SafeUnpickler`
resolves only the globals in `ALLOWED_GLOBALS` (tensor rebuild functions mapped to numpy versions below,
storage types, OrderedDict, argparse.Namespace mapped to `TrainingArgs`, ...) and refuses every other
global with `UnsafeCheckpointError` before anything is called.

Tensors come out as `TensorRef` leaves (shape and dtype known, bytes not read) so that a caller can pick the
part of a large checkpoint it needs (e.g. `ema` out of {model, ema, opt, args}) and `materialize` only that.
"""
import collections
import dataclasses
import io
import os
import pickle
import struct
import types
import zipfile

import ml_dtypes
import numpy as np


class CheckpointFormatError(ValueError):
  """The file is not a PyTorch checkpoint this reader understands, or is inconsistent."""


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle names a global outside the allow-list; nothing it names was called."""


class TrainingArgs(types.SimpleNamespace):
  """The argparse.Namespace of the official training scripts, as plain attributes (no argparse code runs)."""

  def __setstate__(self, state):
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
      raise CheckpointFormatError(f"argparse.Namespace state must be a dict with str keys, got {type(state)}")
    self.__dict__.update(state)


# torch's pickled storage classes -> element dtype (byte order applied later).
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}

# torch dtype objects (pickled as globals `torch.<name>`, used by _rebuild_tensor_v3).
TORCH_DTYPES = {
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}


@dataclasses.dataclass(frozen=True)
class StorageType:
  """Stands for a torch storage class such as `torch.FloatStorage` (not callable)."""
  name: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class StorageRef:
  """One storage of the file: `numel` elements of `dtype` under `key`."""
  key: str
  dtype: np.dtype
  numel: int
  element_offset: int = 0  # legacy-format storage views start inside their root storage


@dataclasses.dataclass(frozen=True)
class TensorRef:
  """A tensor whose bytes have not been read: a strided view of `storage`."""
  storage: StorageRef
  offset: int
  shape: tuple
  stride: tuple

  @property
  def dtype(self):
    return self.storage.dtype


class _TensorType:
  """Stands for `torch.Tensor` / `torch.nn.Parameter` as the `new_type` of _rebuild_from_type_v2."""

  def __init__(self, name):
    self.name = name

  def __repr__(self):
    return self.name


def _int_tuple(value, what):
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise CheckpointFormatError(f"tensor {what} must be a tuple of ints, got {value!r}")
  return tuple(value)


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                   metadata=None):
  """numpy stand-in for torch._utils._rebuild_tensor_v2: records the strided view, reads nothing."""
  del requires_grad, backward_hooks, metadata  # autograd state has no meaning for converted weights
  if not isinstance(storage, StorageRef):
    raise CheckpointFormatError(f"a tensor must be rebuilt from a storage, got {type(storage).__name__}")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise CheckpointFormatError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
  shape, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
  if len(shape) != len(stride) or any(s < 0 for s in shape) or any(s < 0 for s in stride):
    raise CheckpointFormatError(f"tensor size {shape} and stride {stride} are inconsistent")
  if all(shape):  # a view must stay inside its storage (else numpy would read foreign memory)
    last = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= storage.numel:
      raise CheckpointFormatError(f"tensor of size {shape}, stride {stride}, offset {storage_offset} reads past "
                                  f"the end of its storage of {storage.numel} elements")
  return TensorRef(storage, storage_offset, shape, stride)


def rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
  """torch._utils._rebuild_tensor_v3: like v2 with the dtype given explicitly (untyped storages)."""
  if not isinstance(dtype, np.dtype) or not isinstance(storage, StorageRef):
    raise CheckpointFormatError(f"_rebuild_tensor_v3 needs a storage and a torch dtype, got {storage!r}, {dtype!r}")
  if storage.dtype != dtype:
    if storage.dtype != np.uint8 or storage.numel % dtype.itemsize:
      raise CheckpointFormatError(f"cannot view a {storage.dtype} storage as {dtype}")
    storage = dataclasses.replace(storage, dtype=dtype, numel=storage.numel // dtype.itemsize,
                                  element_offset=storage.element_offset // dtype.itemsize)
  return rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata)


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """torch._utils._rebuild_parameter(_with_state): a Parameter is its data."""
  del requires_grad, backward_hooks, state
  if not isinstance(data, TensorRef):
    raise CheckpointFormatError(f"a Parameter must wrap a tensor, got {type(data).__name__}")
  return data


def rebuild_from_type(func, new_type, args, state):
  """torch._tensor._rebuild_from_type_v2: plain Tensor or Parameter only; `func` is itself allow-listed."""
  del state
  if not isinstance(new_type, _TensorType) or func not in _REBUILD_FUNCTIONS:
    raise UnsafeCheckpointError(f"refusing tensor subclass {new_type!r} rebuilt by {func!r}")
  return func(*args)


def encode_latin1(text, encoding):
  """_codecs.encode as protocol-2 pickles use it for bytes objects; nothing else."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeCheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
  return text.encode("latin1")


_REBUILD_FUNCTIONS = (rebuild_tensor, rebuild_tensor_v3, rebuild_parameter)

ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type,
    ("torch", "Tensor"): _TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("argparse", "Namespace"): TrainingArgs,
    ("_codecs", "encode"): encode_latin1,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", name): StorageType(name, dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): dtype for name, dtype in TORCH_DTYPES.items()},
}


class SafeUnpickler(pickle.Unpickler):
  """Resolves only ALLOWED_GLOBALS; storages come from `persistent_load`, recorded as StorageRef.

  Every callable a pickle can invoke (REDUCE, NEWOBJ, BUILD's __setstate__, EXT codes) is first looked up
  through `find_class`, so refusing there means nothing from the file runs.
  """

  def __init__(self, file, source, legacy=False):
    super().__init__(file)
    self.source = source
    self.legacy = legacy
    self.storages = {}  # key -> StorageRef of the root storage

  def find_class(self, module, name):
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):
      raise UnsafeCheckpointError(
          f"{self.source}: refusing to load global '{module}.{name}'; a checkpoint may only hold tensors, "
          "plain containers (dict, OrderedDict, list, tuple, numbers, strings) and argparse.Namespace. "
          "If you trust the file, load it with torch and save its state_dict instead.") from None

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      raise CheckpointFormatError(f"{self.source}: unexpected persistent id {pid!r} (expected a storage)")
    expected = 6 if self.legacy else 5
    if len(pid) != expected:
      raise CheckpointFormatError(f"{self.source}: storage id {pid!r} should have {expected} fields")
    storage_type, key, _location, numel = pid[1:5]  # location (cpu, cuda:0, ...) is irrelevant here
    if not isinstance(storage_type, StorageType):
      raise CheckpointFormatError(f"{self.source}: unknown storage type {storage_type!r}")
    if not isinstance(numel, int) or numel < 0:
      raise CheckpointFormatError(f"{self.source}: storage {key!r} has invalid size {numel!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    root = self.storages.setdefault(key, StorageRef(key, storage_type.dtype, numel))
    if root.dtype != storage_type.dtype:
      raise CheckpointFormatError(f"{self.source}: storage {key} is viewed as both {root.dtype} and "
                                  f"{storage_type.dtype}")
    view = pid[5] if self.legacy else None
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])
            and 0 <= view[1] and 0 <= view[2] and view[1] + view[2] <= root.numel):
      raise CheckpointFormatError(f"{self.source}: storage view {view!r} is not a part of storage {key}")
    _view_key, offset, view_numel = view
    return StorageRef(key, root.dtype, view_numel, element_offset=offset)


def _storage_array(data, storage, byteorder, source):
  """Raw bytes of a root storage -> flat native-order numpy array of the elements `storage` covers."""
  itemsize = storage.dtype.itemsize
  count = storage.element_offset + storage.numel
  if len(data) < count * itemsize:
    raise CheckpointFormatError(f"{source}: storage {storage.key} holds {len(data)} bytes, "
                                f"needs {count * itemsize}")
  dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">") if itemsize > 1 else storage.dtype
  return np.frombuffer(data, dtype=dtype, count=count)[storage.element_offset:]


class TorchCheckpoint:
  """An opened `.pt` file: `tree` holds its pickled object with TensorRef leaves.

      with TorchCheckpoint(path) as ckpt:
        state_dict = ckpt.materialize(ckpt.tree["ema"])
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self._file = open(self.path, "rb")
    try:
      if zipfile.is_zipfile(self._file):
        self._open_zip()
      else:
        self._open_legacy()
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error) as error:
      self._file.close()
      if isinstance(error, UnsafeCheckpointError):
        raise
      raise CheckpointFormatError(f"{self.path}: corrupt or truncated checkpoint ({error})") from error
    except BaseException:
      self._file.close()
      raise

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    self._file.close()

  def _open_zip(self):
    self._zip = zipfile.ZipFile(self._file)
    pickles = [n for n in self._zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise CheckpointFormatError(f"{self.path}: a zip checkpoint needs exactly one '<root>/data.pkl' record, "
                                  f"found {pickles or 'none'} (TorchScript archives are not state dicts)")
    self._root = pickles[0][:-len("data.pkl")]
    names = set(self._zip.namelist())
    byteorder = (self._zip.read(self._root + "byteorder").decode("ascii").strip()
                 if self._root + "byteorder" in names else "little")  # torch's default when unrecorded
    if byteorder not in ("little", "big"):
      raise CheckpointFormatError(f"{self.path}: unknown byte order {byteorder!r}")
    self.byteorder = byteorder
    unpickler = SafeUnpickler(io.BytesIO(self._zip.read(pickles[0])), self.path)
    self.tree = unpickler.load()
    self._storages = unpickler.storages
    self._read_storage = self._read_zip_storage

  def _read_zip_storage(self, key):
    try:
      return self._zip.read(f"{self._root}data/{key}")
    except KeyError:
      raise CheckpointFormatError(f"{self.path}: storage record data/{key} is missing") from None

  def _open_legacy(self):
    legacy_magic, legacy_protocol = 0x1950A86A20F9469CFC6C, 1001
    f = self._file
    f.seek(0)
    is_pickle = f.read(1) == b"\x80"  # binary pickles start with the PROTO opcode
    f.seek(0)
    header = [SafeUnpickler(f, self.path).load() for _ in range(2)] if is_pickle else None
    if header is None or header != [legacy_magic, legacy_protocol]:
      raise CheckpointFormatError(f"{self.path}: not a PyTorch checkpoint (neither a torch zip archive nor the "
                                  "legacy torch.save format; tar checkpoints of torch < 0.4 are not supported)")
    SafeUnpickler(f, self.path).load()  # sys info: byte order and C type sizes of the writer
    unpickler = SafeUnpickler(f, self.path, legacy=True)
    self.tree = unpickler.load()
    keys = SafeUnpickler(f, self.path).load()
    self._storages = unpickler.storages
    self._read_storage = self._read_legacy_storage
    self.byteorder = "little"  # the legacy writer stores counts and elements little-endian
    # Index each storage's bytes: int64 element count, then the elements.
    self._legacy_offsets = {}
    for key in keys:
      key = str(key)
      if key not in self._storages:
        raise CheckpointFormatError(f"{self.path}: storage {key} is listed but never used")
      (numel,) = struct.unpack("<q", f.read(8))
      if numel != self._storages[key].numel:
        raise CheckpointFormatError(f"{self.path}: storage {key} holds {numel} elements, the pickle says "
                                    f"{self._storages[key].numel}")
      nbytes = numel * self._storages[key].dtype.itemsize
      self._legacy_offsets[key] = (f.tell(), nbytes)
      f.seek(nbytes, io.SEEK_CUR)

  def _read_legacy_storage(self, key):
    if key not in self._legacy_offsets:
      raise CheckpointFormatError(f"{self.path}: storage {key} has no data in the file")
    offset, nbytes = self._legacy_offsets[key]
    self._file.seek(offset)
    return self._file.read(nbytes)

  def materialize(self, tree):
    """Replaces every TensorRef in `tree` (dicts, lists, tuples, sets, TrainingArgs) by a numpy array."""
    raw = {}  # storage key -> bytes; tensors sharing a storage read it once

    def storage_array(storage):
      if storage.key not in raw:
        raw[storage.key] = self._read_storage(storage.key)
      return _storage_array(raw[storage.key], storage, self.byteorder, self.path)

    def tensor(ref):
      itemsize = ref.dtype.itemsize
      flat = storage_array(ref.storage)
      view = np.lib.stride_tricks.as_strided(flat[ref.offset:] if all(ref.shape) else flat[:0],
                                             shape=ref.shape,
                                             strides=tuple(s * itemsize for s in ref.stride))
      out = np.empty(ref.shape, dtype=ref.dtype.newbyteorder("="))  # a contiguous copy in native byte order
      out[...] = view
      return out

    def walk(node):
      if isinstance(node, TensorRef):
        return tensor(node)
      if isinstance(node, dict):
        return type(node)((k, walk(v)) for k, v in node.items())
      if isinstance(node, (list, tuple, set, frozenset)):
        return type(node)(walk(v) for v in node)
      if isinstance(node, TrainingArgs):
        return TrainingArgs(**{k: walk(v) for k, v in vars(node).items()})
      return node

    return walk(tree)


def read_torch_checkpoint(path):
  """The whole object saved in a `.pt` file, tensors as numpy arrays (bfloat16 via ml_dtypes)."""
  with TorchCheckpoint(path) as checkpoint:
    return checkpoint.materialize(checkpoint.tree)
