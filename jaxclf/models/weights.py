"""Users' own weights: read .pth (zip and legacy torch formats) and .safetensors files without torch
and without running pickled code, and convert torchvision-layout ResNet / VGG-BN state dicts to a
`.npz` that `model.pretrained` accepts.

  jaxclf weights inspect FILE                       # names, shapes, dtypes; nothing executed
  jaxclf weights convert FILE --arch resnet50 --out weights/resnet50.npz [--sha256 HEX]
  python -m jaxclf.main --config=configs/resnet.py:model=resnet50 \\
      --config.model.kwargs.stem=imagenet --config.model.pretrained=weights/resnet50.npz

The `.npz` holds one array per Flax variable, keyed by its path ('params/conv_init/kernel',
'batch_stats/bn_init/mean', ...), in Flax layout (HWIO kernels, (in, out) dense), plus a JSON
record under `__jaxclf_weights__`: the architecture, the model kwargs it needs, the head and stem
modules, the source file's name and sha256 (and whether it was pinned), and the normalisation the
weights were trained with. Loading reads it with allow_pickle=False.

Mapping notes:
  - ResNet: torchvision's layout is v1.5 (stride on the 3x3 conv), as jaxclf's; jaxclf's ResNet pads
    like torchvision (jaxclf/models/resnet.py), so the logits match. It needs stem='imagenet'.
  - VGG-BN: torchvision's convs have a bias, jaxclf's (followed by BatchNorm) do not. The bias is
    folded into the BatchNorm running mean (mean - bias): exact in eval mode, and in training the
    batch mean cancels a per-channel bias anyway. torchvision's 3-layer 4096-wide classifier has no
    counterpart (jaxclf's head is GAP + one dense) and is dropped: its keys are checked by name
    only, and the head is always a new one.
  - num_batches_tracked counters are optional (older torchvision files lack them) and not kept.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from jaxclf.hashing import sha256_file
from jaxclf.models.state_dict import PretrainedError, fill_variables, read_torch_state_dict

log = logging.getLogger(__name__)

META_KEY = "__jaxclf_weights__"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's transforms for its ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------- reading files

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 << 20  # the reference implementation's limit too


def _safetensors_entries(path: str, header: Any, buffer_size: int) -> dict[str, tuple]:
  """Validates the JSON header: {name: (dtype, shape, begin, end)}, offsets within the buffer,
  each tensor's byte length = prod(shape) * itemsize, no two tensors overlapping."""
  if not isinstance(header, dict):
    raise PretrainedError(f"{path}: safetensors header is not a JSON object")
  entries = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    where = f"{path}: safetensors tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
      raise PretrainedError(f"{where}: expected dtype, shape and data_offsets, got {info!r:.120}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _SAFETENSORS_DTYPES:
      raise PretrainedError(f"{where}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
      raise PretrainedError(f"{where}: shape {shape!r:.80} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
      raise PretrainedError(f"{where}: data_offsets {offsets!r:.80} are not [begin, end]")
    begin, end = offsets
    if end > buffer_size:
      raise PretrainedError(f"{where}: data_offsets [{begin}, {end}] run past the data "
                            f"({buffer_size} bytes; truncated file or a lying header)")
    need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_SAFETENSORS_DTYPES[dtype]).itemsize
    if end - begin != need:
      raise PretrainedError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                            f"but {dtype} {shape} needs {need}")
    entries[name] = (np.dtype(_SAFETENSORS_DTYPES[dtype]), tuple(shape), begin, end)
  spans = sorted((b, e, n) for n, (_, _, b, e) in entries.items() if e > b)
  for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
    if b1 < e0:
      raise PretrainedError(f"{path}: safetensors tensors {n0!r} and {n1!r} overlap")
  return entries


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors file -> {name: array}: an 8-byte little-endian header length, a JSON header,
  then the raw little-endian tensor bytes. Every offset is checked before anything is read."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise PretrainedError(f"{path}: too short for a safetensors file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n > min(_MAX_HEADER, size - 8):
      raise PretrainedError(f"{path}: safetensors header length {n} exceeds the file "
                            f"({size} bytes; truncated, or not a safetensors file)")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise PretrainedError(f"{path}: safetensors header is not valid JSON ({e})") from None
    entries = _safetensors_entries(path, header, size - 8 - n)
    data = np.fromfile(f, dtype=np.uint8)
  out = {}
  for name, (dtype, shape, begin, end) in entries.items():
    le = dtype if dtype.kind == "V" else dtype.newbyteorder("<")
    out[name] = np.frombuffer(data[begin:end].tobytes(), dtype=le).reshape(shape)
  return out


def weights_format(path: str) -> str:
  """'torch-zip' | 'torch-legacy' | 'safetensors', by content (the extension can lie)."""
  if not os.path.isfile(path):
    raise PretrainedError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    return "torch-zip"
  # safetensors: an 8-byte header length (any first byte), then the JSON header's '{'
  if path.endswith(".safetensors") or head[8:9] == b"{":
    return "safetensors"
  if head[:1] == b"\x80":  # pickle protocol 2+: torch's legacy format starts with a pickled magic
    return "torch-legacy"
  raise PretrainedError(f"{path}: neither a torch checkpoint (.pth, zip or legacy) nor a "
                        ".safetensors file")


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .pth (zip or legacy, state dicts nested in a checkpoint get dotted names)
  or .safetensors file, as numpy arrays. Nothing in the file is executed."""
  if weights_format(path) == "safetensors":
    return read_safetensors(path)
  return read_torch_state_dict(path, nested=True)


def inspect_weights(path: str) -> dict[str, Any]:
  """{'file', 'format', 'sha256', 'tensors': [{'name', 'shape', 'dtype'}], 'count', 'values'}."""
  tensors = read_weights(path)
  return {"file": path, "format": weights_format(path), "sha256": sha256_file(path),
          "count": len(tensors), "values": int(sum(t.size for t in tensors.values())),
          "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)}
                      for k, v in tensors.items()]}


# ----------------------------------------------------------------------------- torchvision layouts

@dataclasses.dataclass(frozen=True)
class Arch:
  family: str  # 'resnet' | 'vgg'
  jaxclf_model: str
  model_kwargs: dict
  stages: tuple = ()  # ResNet blocks per stage
  bottleneck: bool = False
  layers: tuple = ()  # VGG config, 'M' = max pool


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
ARCHS = {
    "resnet18": Arch("resnet", "resnet18", {"stem": "imagenet"}, stages=(2, 2, 2, 2)),
    "resnet34": Arch("resnet", "resnet34", {"stem": "imagenet"}, stages=(3, 4, 6, 3)),
    "resnet50": Arch("resnet", "resnet50", {"stem": "imagenet"}, stages=(3, 4, 6, 3),
                     bottleneck=True),
    "vgg11_bn": Arch("vgg", "vgg11", {}, layers=_VGG11),
    "vgg16_bn": Arch("vgg", "vgg16", {}, layers=_VGG16),
}
_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_OPTIONAL = "num_batches_tracked"  # expected shape (), not kept
_ANY_SHAPE = None  # a key checked by name only (VGG's dropped classifier)


def _conv(table, key, shape, module):
  table[f"{key}.weight"] = (shape, ("params", *module, "kernel"))


def _bn(table, key, c, module):
  for field, (collection, name) in _BN.items():
    table[f"{key}.{field}"] = ((c,), (collection, *module, name))
  table[f"{key}.{_OPTIONAL}"] = ((), None)


def _resnet_layout(a: Arch) -> dict[str, tuple]:
  t: dict[str, tuple] = {}
  _conv(t, "conv1", (64, 3, 7, 7), ("conv_init",))
  _bn(t, "bn1", 64, ("bn_init",))
  block_cls = "BottleneckResNetBlock" if a.bottleneck else "ResNetBlock"
  cin, idx = 64, 0
  for s, n in enumerate(a.stages):
    planes = 64 * 2**s
    cout = planes * 4 if a.bottleneck else planes
    for b in range(n):
      key, mod = f"layer{s + 1}.{b}", f"{block_cls}_{idx}"
      convs = ([(planes, cin, 1, 1), (planes, planes, 3, 3), (cout, planes, 1, 1)] if a.bottleneck
               else [(planes, cin, 3, 3), (planes, planes, 3, 3)])
      for k, shape in enumerate(convs):
        _conv(t, f"{key}.conv{k + 1}", shape, (mod, f"Conv_{k}"))
        _bn(t, f"{key}.bn{k + 1}", shape[0], (mod, f"BatchNorm_{k}"))
      if (s > 0 and b == 0) or cin != cout:
        _conv(t, f"{key}.downsample.0", (cout, cin, 1, 1), (mod, "conv_proj"))
        _bn(t, f"{key}.downsample.1", cout, (mod, "norm_proj"))
      cin, idx = cout, idx + 1
  t["fc.weight"] = ((1000, cin), ("params", "Dense_0", "kernel"))
  t["fc.bias"] = ((1000,), ("params", "Dense_0", "bias"))
  return t


def _vgg_layout(a: Arch) -> dict[str, tuple]:
  t: dict[str, tuple] = {}
  i, n, cin = 0, 0, 3
  for spec in a.layers:
    if spec == "M":
      i += 1
      continue
    _conv(t, f"features.{i}", (spec, cin, 3, 3), (f"Conv_{n}",))
    t[f"features.{i}.bias"] = ((spec,), ("fold", f"BatchNorm_{n}"))  # folded into the BN mean
    _bn(t, f"features.{i + 1}", spec, (f"BatchNorm_{n}",))
    i, n, cin = i + 3, n + 1, spec
  for j in (0, 3, 6):  # Linear(25088, 4096), Linear(4096, 4096), Linear(4096, 1000): dropped
    t[f"classifier.{j}.weight"] = (_ANY_SHAPE, None)
    t[f"classifier.{j}.bias"] = (_ANY_SHAPE, None)
  return t


def torchvision_layout(arch: str) -> dict[str, tuple]:
  """{torchvision key: (torch shape or None = any, Flax path or None = dropped)} for `arch`."""
  if arch not in ARCHS:
    raise PretrainedError(f"unknown --arch {arch!r}; supported: {', '.join(ARCHS)}")
  a = ARCHS[arch]
  return _resnet_layout(a) if a.family == "resnet" else _vgg_layout(a)


def _strip_wrapper(state: Mapping[str, np.ndarray], layout: Mapping[str, tuple]):
  """Accepts a state dict saved inside a checkpoint ('state_dict.' / 'model.') or from
  DataParallel ('module.'): strips the prefix when that makes the keys match the layout."""
  for prefix in ("", "state_dict.", "model.", "module.", "state_dict.module.", "model.module."):
    if any(k.startswith(prefix) and k[len(prefix):] in layout for k in state):
      return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
  return dict(state)


def _differences(state: Mapping[str, np.ndarray], arch: str):
  """(state without its wrapper prefix, (missing keys, unexpected keys, shape differences))."""
  layout = torchvision_layout(arch)
  state = _strip_wrapper(state, layout)
  missing = [k for k in layout if k not in state and not k.endswith(_OPTIONAL)]
  unexpected = [k for k in state if k not in layout]
  shapes = [f"{k}: file {tuple(state[k].shape)} vs {arch} {layout[k][0]}" for k in layout
            if k in state and layout[k][0] is not None and tuple(state[k].shape) != layout[k][0]]
  return state, (missing, unexpected, shapes)


def check_layout(state: Mapping[str, np.ndarray], arch: str, source: str) -> dict[str, np.ndarray]:
  """The state dict with any wrapper prefix stripped, or ONE PretrainedError listing the missing
  keys, unexpected keys and shape differences against torchvision's `arch` (counts, the first 8
  of each) and the architecture the file does fit, if any."""
  state, (missing, unexpected, shapes) = _differences(state, arch)
  if missing or unexpected or shapes:
    fits = [a for a in ARCHS if a != arch and not any(_differences(state, a)[1])]
    parts = [f"it fits --arch {fits[0]}"] if fits else []
    for label, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", shapes)):
      if items:
        parts.append(f"{len(items)} {label}: {'; '.join(items[:8])}"
                     + (f"; ... ({len(items) - 8} more)" if len(items) > 8 else ""))
    raise PretrainedError(f"{source} is not a torchvision {arch} state dict: " + " | ".join(parts))
  return state


def _flax_layout(value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if value.dtype.kind in "fV":  # float16 / bfloat16 / float64 -> the models' float32
    value = value.astype(np.float32)
  if value.ndim == 4:  # OIHW -> HWIO
    value = value.transpose(2, 3, 1, 0)
  elif value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
    value = value.T
  return np.ascontiguousarray(value)


def convert_torchvision(state: Mapping[str, np.ndarray], arch: str,
                        source: str = "state dict") -> dict[tuple[str, ...], np.ndarray]:
  """torchvision `arch` state dict -> {Flax path: array in Flax layout}."""
  state = check_layout(state, arch, source)
  layout = torchvision_layout(arch)
  out, folds = {}, {}
  for key, value in state.items():
    path = layout[key][1]
    if path is None:
      continue
    if path[0] == "fold":
      folds[path[1]] = np.asarray(value, np.float32)
    else:
      out[path] = _flax_layout(value)
  for module, bias in folds.items():  # BN(conv(x) + b) = BN'(conv(x)) with mean' = mean - b
    out[("batch_stats", module, "mean")] = out[("batch_stats", module, "mean")] - bias
  return out


# ----------------------------------------------------------------------------- .npz in and out

def convert_file(path: str, arch: str, out: str, sha256: str | None = None) -> dict[str, Any]:
  """Reads `path`, checks the pin, converts, writes `out` (.npz). Returns the recorded metadata."""
  if not out.endswith(".npz"):
    raise PretrainedError(f"--out {out}: the output must be a .npz file")
  if arch not in ARCHS:
    raise PretrainedError(f"unknown --arch {arch!r}; supported: {', '.join(ARCHS)}")
  digest = sha256_file(path) if os.path.isfile(path) else None
  if sha256 is not None and digest != sha256.strip().lower():
    raise PretrainedError(f"{path}: sha256 {digest} does not match the pinned --sha256 "
                          f"{sha256} (a different or corrupt file)")
  flat = convert_torchvision(read_weights(path), arch, source=path)
  a = ARCHS[arch]
  meta = {"arch": arch, "model": a.jaxclf_model, "model_kwargs": a.model_kwargs,
          "layout": "torchvision", "source_file": os.path.basename(path),
          "source_format": weights_format(path), "source_sha256": digest,
          "sha256_pinned": sha256 is not None, "num_classes": 1000 if a.family == "resnet" else 0,
          "head": ["Dense_0"], "stem": ["params", "conv_init" if a.family == "resnet" else "Conv_0",
                                        "kernel"],
          "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  arrays = {"/".join(p): v for p, v in flat.items()}
  tmp = f"{out}.tmp.npz"
  np.savez(tmp, **arrays, **{META_KEY: np.array(json.dumps(meta))})
  os.replace(tmp, out)
  meta["sha256"] = sha256_file(out)
  log.info("converted %s (%s, sha256 %s%s) -> %s (sha256 %s)", path, arch, digest,
           ", pinned" if sha256 else "", out, meta["sha256"])
  return meta


def read_converted(path: str) -> tuple[dict[tuple[str, ...], np.ndarray], dict[str, Any]]:
  """A `weights convert` .npz -> ({Flax path: array}, metadata). No pickles are loaded."""
  if not os.path.isfile(path):
    raise PretrainedError(f"{path}: no such file (model.pretrained)")
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError, EOFError) as e:
    raise PretrainedError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  if META_KEY not in arrays:
    raise PretrainedError(f"{path}: no {META_KEY} record; write it with `jaxclf weights convert`")
  meta = json.loads(str(arrays.pop(META_KEY)))
  return {tuple(k.split("/")): v for k, v in arrays.items()}, meta


def load_converted(path: str, variables: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
  """`variables` filled from a converted .npz; its head only when it has num_classes outputs."""
  flat, meta = read_converted(path)
  head = tuple(meta["head"])
  load_head = ("params", *head, "kernel") in flat and int(meta["num_classes"]) == num_classes
  hint = (f" (the file is torchvision {meta['arch']}: use model.name={meta['model']}"
          + "".join(f", model.kwargs.{k}={v}" for k, v in meta["model_kwargs"].items()) + ")")
  log.info("pretrained %s: %s from %s, sha256 %s", path, meta["arch"], meta["source_file"],
           sha256_file(path))
  return fill_variables(variables, flat, num_classes, load_head, path, hint, head=head,
                        stem=tuple(meta["stem"]))


def pretrained_provenance(spec: str) -> dict[str, Any] | None:
  """What run.json should record for model.pretrained=`spec` when it is a file: its sha256 and,
  for a converted .npz, the source file's name, sha256 and whether it was pinned. None otherwise."""
  if not spec or not os.path.isfile(spec):
    return None
  record = {"path": spec, "sha256": sha256_file(spec)}
  if spec.endswith(".npz"):
    _, meta = read_converted(spec)
    record.update({k: meta[k] for k in ("arch", "source_file", "source_sha256", "sha256_pinned")})
  return record


_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def check_sha256_arg(value: str) -> str:
  if not _HEX.match(value.strip()):
    raise PretrainedError(f"--sha256 {value!r}: expected 64 hex digits")
  return value.strip().lower()
