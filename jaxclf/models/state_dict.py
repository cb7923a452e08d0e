"""PyTorch state dicts as plain arrays, and a model's Flax variables filled from them.

`read_torch_state_dict` reads both torch file formats (the zip of torch >= 1.6 and the legacy
pickle stream) without importing torch and without running pickled code: the unpickler resolves
only an OrderedDict, the tensor rebuild functions and torch storage types.
`fill_variables` writes converted arrays ({flax path: array}) into a model's variables, keeping
a fresh classifier head for transfer learning and fitting an RGB stem to the input channels.

Both the catalogue of shipped ImageNet weights (pretrained.py) and users' own converted files
(weights.py) are built on these; neither imports the other's internals.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_dtypes  # a jax dependency: numpy's bfloat16
import numpy as np
from flax import traverse_util
from flax.core import FrozenDict, freeze

log = logging.getLogger(__name__)


class PretrainedError(ValueError):
  """A checkpoint that cannot be read or does not fit the model; the message names the key/file."""


# ----------------------------------------------------------------------------- torch files, no torch

# torch.<Name>Storage -> numpy dtype. Only these names resolve; everything else in the pickle is refused.
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": ml_dtypes.bfloat16,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass
class _StorageRef:
  """A storage named in the pickle; its bytes come after the pickle (legacy) or in the zip (new)."""
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]
  view: tuple[int, int] | None = None  # (element offset, numel) into storage, legacy views


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # autograd state means nothing here
  view = None
  if isinstance(storage, tuple):  # a legacy view: (_StorageRef, offset, numel)
    storage, view_offset, view_numel = storage
    view = (view_offset, view_numel)
  if not isinstance(storage, _StorageRef):  # ValueError: read_torch_state_dict names the file
    raise ValueError(f"a tensor is built on {type(storage).__name__}, not a storage")
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride), view)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only an OrderedDict, the two tensor rebuild functions and torch.*Storage types.
  Any other global (os.system, builtins.eval, ...) raises, so a hostile file cannot run code."""

  def __init__(self, f, source: str, storages: dict[str, _StorageRef]):
    super().__init__(f, encoding="utf-8")
    self.source = source
    self.storages = storages

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise PretrainedError(f"{self.source}: refusing to unpickle global {module}.{name} (only "
                          "tensors in an OrderedDict are allowed)")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or _ascii(pid[0]) != "storage":
      raise PretrainedError(f"{self.source}: unsupported persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    view = pid[5] if len(pid) > 5 else None
    if not isinstance(storage_type, _StorageType):
      raise PretrainedError(f"{self.source}: storage {key!r} has no torch storage type")
    key = str(key)
    ref = self.storages.setdefault(key, _StorageRef(key, storage_type.dtype, int(numel)))
    if view is not None:
      _view_key, offset, view_numel = view
      return (ref, int(offset), int(view_numel))
    return ref


def _ascii(x) -> str:
  return x.decode("ascii") if isinstance(x, bytes) else str(x)


def _materialise(name: str, t: _TensorRef, source: str) -> np.ndarray:
  data = t.storage.data
  if data is None:
    raise PretrainedError(f"{source}: tensor {name!r} refers to storage {t.storage.key!r} "
                          "whose data is missing")
  if t.view is not None:
    data = data[t.view[0]:t.view[0] + t.view[1]]
  extent = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride)) + 1 if all(
      t.size) else t.offset
  if t.offset < 0 or extent > data.size or any(st < 0 for st in t.stride):
    raise PretrainedError(f"{source}: tensor {name!r} (size {t.size}, stride {t.stride}, offset "
                          f"{t.offset}) lies outside its storage of {data.size} values")
  item = data.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(data[t.offset:], shape=t.size,
                                         strides=tuple(st * item for st in t.stride))
  return np.array(view)  # a copy: own, contiguous memory


def _to_arrays(obj, source: str, nested: bool = False) -> dict[str, np.ndarray]:
  """The tensors of a state dict. nested=True: also those of dicts inside it, under dotted names
  ({'model': {'fc.weight': t}, 'epoch': 3} -> {'model.fc.weight': t}), other values skipped."""
  if not isinstance(obj, Mapping):
    raise PretrainedError(f"{source}: expected a state dict (OrderedDict of tensors), got "
                          f"{type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    if nested and isinstance(v, Mapping):
      out.update({f"{k}.{name}": t for name, t in _to_arrays(v, source, nested=True).items()})
    elif isinstance(v, _TensorRef):
      out[str(k)] = _materialise(str(k), v, source)
    elif not nested:
      raise PretrainedError(f"{source}: entry {k!r} is {type(v).__name__}, not a tensor")
  return out


def _read_legacy(f: io.BufferedReader, source: str, nested: bool = False) -> dict[str, np.ndarray]:
  """torch < 1.6 format: pickles of magic, protocol, sys info, the state dict and the storage keys,
  then each storage as an int64 little-endian element count followed by its raw bytes."""
  storages: dict[str, _StorageRef] = {}
  unpickle = lambda: _RestrictedUnpickler(f, source, storages).load()  # noqa: E731
  if unpickle() != LEGACY_MAGIC:
    raise PretrainedError(f"{source}: not a torch checkpoint (bad magic number)")
  if (proto := unpickle()) != LEGACY_PROTOCOL:
    raise PretrainedError(f"{source}: unsupported torch legacy protocol {proto}")
  sys_info = unpickle()
  if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
    raise PretrainedError(f"{source}: big-endian checkpoints are not supported")
  state = unpickle()
  keys = unpickle()
  for key in keys:
    ref = storages.get(str(key))
    if ref is None:
      raise PretrainedError(f"{source}: storage {key!r} listed but never used")
    header = f.read(8)
    if len(header) != 8:
      raise PretrainedError(f"{source}: truncated before storage {key!r}")
    (numel,) = struct.unpack("<q", header)
    if numel != ref.numel:
      raise PretrainedError(f"{source}: storage {key!r} holds {numel} values, pickle says "
                            f"{ref.numel}")
    if numel < 0 or numel * ref.dtype.itemsize > _bytes_left(f):  # before allocating it
      raise PretrainedError(f"{source}: truncated inside storage {key!r} (needs {numel} values)")
    raw = f.read(numel * ref.dtype.itemsize)
    if len(raw) != numel * ref.dtype.itemsize:
      raise PretrainedError(f"{source}: truncated inside storage {key!r}")
    ref.data = np.frombuffer(raw, dtype=_little_endian(ref.dtype))
  return _to_arrays(state, source, nested)


def _bytes_left(f) -> int:
  return os.fstat(f.fileno()).st_size - f.tell()


def _little_endian(dtype: np.dtype) -> np.dtype:
  return dtype if dtype.kind == "V" else dtype.newbyteorder("<")  # 'V': ml_dtypes' bfloat16


def _read_zip(path: str, source: str, nested: bool = False) -> dict[str, np.ndarray]:
  """torch >= 1.6 format: a zip with <root>/data.pkl and one <root>/data/<key> file per storage."""
  storages: dict[str, _StorageRef] = {}
  with zipfile.ZipFile(path) as z:
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise PretrainedError(f"{source}: zip checkpoint without exactly one data.pkl")
    root = pkl[0][:-len("data.pkl")]
    state = _RestrictedUnpickler(io.BytesIO(z.read(pkl[0])), source, storages).load()
    for key, ref in storages.items():
      try:
        raw = z.read(f"{root}data/{key}")
      except KeyError:
        raise PretrainedError(f"{source}: storage {key!r} missing from the archive") from None
      if len(raw) < ref.numel * ref.dtype.itemsize:
        raise PretrainedError(f"{source}: storage {key!r} holds {len(raw)} bytes, the pickle "
                              f"says {ref.numel} values of {ref.dtype.itemsize} bytes")
      ref.data = np.frombuffer(raw, dtype=_little_endian(ref.dtype))[:ref.numel]
  return _to_arrays(state, source, nested)


def read_torch_state_dict(path: str, nested: bool = False) -> dict[str, np.ndarray]:
  """A PyTorch state dict file -> {key: numpy array}, without importing torch or running pickled code.
  nested=True also reads checkpoints that wrap it ({'state_dict': {...}, 'epoch': 3}, dotted names)."""
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path, path, nested)
    with open(path, "rb") as f:
      if f.read(4) == b"PK\x03\x04":  # a zip whose central directory (at the end) is gone
        raise PretrainedError(f"{path}: truncated or damaged zip-format torch checkpoint (no "
                              "readable zip directory)")
      f.seek(0)
      return _read_legacy(f, path, nested)
  except PretrainedError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, AttributeError,
          KeyError, IndexError, RecursionError, zipfile.BadZipFile, zlib.error, OSError) as e:
    raise PretrainedError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e})") \
        from None


# ------------------------------------------------------------------------- arrays -> Flax variables


def _flatten(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(dict(variables))


def fit_stem(kernel: np.ndarray, in_channels: int, key: str) -> np.ndarray:
  """Adapts an RGB stem kernel (k, k, 3, F) to `in_channels`. 1 channel: the sum over RGB, which is
  exactly the RGB stem applied to the grey image repeated three times (same mean/std per channel)."""
  if kernel.shape[2] == in_channels:
    return kernel
  if kernel.shape[2] == 3 and in_channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  raise PretrainedError(f"{key}: the pretrained stem takes {kernel.shape[2]} channels; cannot adapt "
                        f"it to {in_channels} (only 1 or 3 are supported)")


def fill_variables(variables: Mapping[str, Any], given_flat: Mapping[tuple[str, ...], Any],
                   num_classes: int, load_head: bool, source: str, hint: str = "",
                   head: tuple = ("classifier",),
                   stem: tuple[str, ...] = ("params", "stem_conv", "kernel")) -> dict[str, Any]:
  """`variables` with every 'params'/'batch_stats' leaf replaced by the same path of `given_flat`
  ({('params', 'conv_init', 'kernel'): array, ...}), the module `head` only when load_head
  (`head`: one module path, ('classifier',), or several, (('Dense_0',), ('Dense_1',)), the last
  being the classifier). The `stem` kernel is fitted to the model's input channels (`fit_stem`).
  One PretrainedError lists every missing, unexpected and mismatched key."""
  heads = tuple(head) if head and isinstance(head[0], tuple) else (tuple(head),)
  target = _flatten(variables)
  target_head = target.get(("params", *heads[-1], "kernel"))
  if target_head is not None and target_head.shape[-1] != num_classes:
    raise PretrainedError(f"num_classes={num_classes} but the model's classifier has "
                          f"{target_head.shape[-1]} outputs")

  def is_head(path):
    return any(path[1:1 + len(h)] == h for h in heads)

  def wanted_path(path):
    return path[0] in ("params", "batch_stats") and (load_head or not is_head(path))

  wanted = {p for p in target if wanted_path(p)}
  given = {p for p in given_flat if wanted_path(p)}
  missing = sorted("/".join(p) for p in wanted - given)
  unexpected = sorted("/".join(p) for p in given - wanted)
  mismatched = []
  filled = dict(target)
  for path in sorted(wanted & given):
    value, current = np.asarray(given_flat[path]), target[path]
    key = "/".join(path)
    if path == stem:
      value = fit_stem(value, current.shape[2], f"{source}: {key}")
    if tuple(value.shape) != tuple(current.shape):
      mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(current.shape)}")
      continue
    filled[path] = jnp.asarray(value, dtype=current.dtype)
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"{len(missing)} model weights not in the checkpoint: {', '.join(missing[:10])}")
    if unexpected:
      parts.append(f"{len(unexpected)} checkpoint weights the model lacks: "
                   f"{', '.join(unexpected[:10])}")
    if mismatched:
      parts.append(f"{len(mismatched)} shape mismatches: {'; '.join(mismatched[:10])}")
    raise PretrainedError(f"{source} does not fit the model{hint}: " + " | ".join(parts))
  log.info("loaded %d pretrained arrays from %s; classifier head %s", len(wanted & given), source,
           "from the checkpoint" if load_head else f"kept fresh ({num_classes} classes)")
  out = traverse_util.unflatten_dict(filled)
  # Same container types as given (FrozenDict or dict, outside and per collection), so a TrainState
  # built from the result keeps the pytree structure its checkpoints were written with.
  out = {k: freeze(v) if isinstance(variables.get(k), FrozenDict) else v for k, v in out.items()}
  return freeze(out) if isinstance(variables, FrozenDict) else out
