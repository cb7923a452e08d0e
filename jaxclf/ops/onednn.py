"""oneDNN kernels for the CPU train step, called from jitted JAX through `jax.ffi`: 2-D convolution
(forward, backward-data, backward-weights; grouped too, so depthwise with groups = channels),
training-mode batch normalisation with an optional fused ReLU (forward + backward), and max
pooling (forward + backward).
Why: XLA CPU's convolution *gradients* are very slow (openxla/xla#34273); on the anchor CNN a
train step costs ~18x the forward pass. PyTorch on CPU runs its convolutions on oneDNN. This
module calls oneDNN's convolution forward, backward-data and backward-weights primitives from a
jitted step (C++ handlers in `onednn_conv.cc`, built into `_onednn_conv*.so` by the package's
install, see setup.py) and makes them differentiable with `jax.custom_vjp`.

  from jaxclf.ops import onednn
  y = onednn.conv2d(x, kernel, strides=(1, 1), padding="SAME")   # NHWC x, HWIO kernel, float32
  y = onednn.conv2d(x, dw_kernel, strides=(2, 2), groups=C)      # depthwise: (k, k, 1, C) kernel
  y, mean, var = onednn.batch_norm_train(x, scale, shift, relu=True)  # relu(bn(x)), batch stats
  y = onednn.max_pool(x, (2, 2), (2, 2))                           # VALID, odd edges dropped

Same result as `jax.lax.conv_general_dilated(x, kernel, strides, padding,
dimension_numbers=("NHWC", "HWIO", "NHWC"))` to float32 rounding, forward and gradients
(tests/test_onednn_conv.py). When the extension is not built (or JAXCLF_ONEDNN=0), or for inputs
it does not handle (non-float32), `conv2d` *is* that lax call, so callers need no fallback.

oneDNN build: PyPI `onednn-cpu-gomp==2023.2.0` (oneDNN 3.2, CPU only, GNU OpenMP threading: the
system libgomp, no other runtime) plus `onednn-devel-cpu-gomp` for the headers. The newer
`onednn==2026.1.0` wheel is the SYCL build: it needs libtbb, libsycl, libsvml/libimf/libintlc
(tbb, intel-sycl-rt, intel-cmplr-lib-rt, intel-opencl-rt, dpcpp-cpp-rt wheels) for a CPU-only
use; it was not tried (its speed is unmeasured here), the 3.2 build already beats PyTorch per layer.

Layouts: activations stay NHWC (oneDNN's `nhwc`), the kernel is HWIO (oneDNN's `hwio`); each
primitive is created with `format_tag::any` for the weights (a cheap reorder per call into the
blocked layout oneDNN picks; `impl_info()` reports e.g. "brgconv:avx2 reorders: in1") and plain
NHWC for the activations.
Letting oneDNN choose blocked activation layouts too (JAXCLF_ONEDNN_ACT_ANY_<PASS>=1) adds two
activation reorders per call; measured: fwd and bwd-data slower (c2 fwd 87 -> 106 ms, c4 fwd
79 -> 100 ms under load), bwd-weights 5-15% faster, within the noise of the whole step, so off.
Primitives are cached per shape in the library (creation is milliseconds), scratchpads are
per-thread user buffers, and calls are serialised by a mutex (one call already uses every core
through OpenMP; two OpenMP teams on 2 cores only oversubscribe). XLA's pool threads calling a
oneDNN primitive each become an OpenMP master with its own team (OMP_NUM_THREADS, default: all
cores); libgomp's default spin-wait is kept (measured: GOMP_SPINCOUNT=0 486 img/s vs 537
default; serialise off 497).

Forward: oneDNN's by default (measured faster than XLA's in the step and per layer, below);
`forward="xla"` or JAXCLF_ONEDNN_FORWARD=xla uses XLA's conv. Backward-data can be XLA's with
JAXCLF_ONEDNN_BWD_DATA=xla (measured slower in the step: 128-191 vs 175-279 img/s under load).

Measured 2026-12-01, 2 cores AMD EPYC (AVX2, oneDNN picks brgconv:avx2 / jit:avx2), quiet-ish
machine (load ~1.6), `bench/conv.py --part layers --resnet`, median ms per call, batch 256 for
the anchor layers, 128 for the ResNet ones:

  layer (px, cin->cout)     XLA fwd / bwd-data / bwd-w    oneDNN fwd / bwd-data / bwd-w    PyTorch 2.13
  c1 28 1->32                 4.5 / 13.5 /   42.8           2.6 / 11.4 /  2.9               3.0 / 16.3 /  3.4
  c2 28 32->32               65.3 / 64.3 / 1448.9          28.7 / 29.3 / 57.3              39.3 / 39.7 / 67.3
  c3 14 32->64               25.4 / 38.1 /  212.4          17.0 / 15.2 / 22.4              19.6 / 19.0 / 31.0
  c4 14 64->64               50.5 / 51.2 /  424.7          28.7 / 29.4 / 46.6              37.6 / 38.2 / 58.8
  c5 7 64->128               31.9 / 29.3 /   36.8          13.7 / 13.1 / 21.3              18.9 / 18.4 / 28.7
  3x3 s2 32px 16->32          6.9 / 16.6 /   25.0           4.8 /  5.1 /  4.8               5.5 /  5.4 /  6.1
  1x1 s2 32px 16->32          2.3 /  2.5 /   11.6           0.8 /  2.0 /  0.6               0.8 /  1.6 /  0.7
  3x3 s2 16px 64->128        27.2 / 17.5 /   29.0          10.8 / 12.8 / 20.8              15.1 / 15.2 / 21.0
  1x1 s2 16px 64->128         3.5 /  3.2 /   15.5           2.9 /  4.7 /  2.5               2.5 /  3.5 /  2.4
  3x3 s2 8px 128->256        14.0 / 12.8 /   19.4          12.6 / 15.5 / 24.4              12.7 / 15.8 / 23.6
  1x1 s2 8px 128->256         2.9 /  1.6 /    9.2           2.7 /  4.1 /  2.6               2.4 /  3.9 /  2.5

(XLA's bwd-data is faster only for the small stride-2 ResNet shapes at 8-16 px, by 1-3 ms.)

Depthwise / grouped (EfficientNet's DepthwiseConv on CPU, 2026-12-07, AVX-512 EPYC): the flax
(KH, KW, C/G, O) kernel is handed to oneDNN as a strided (G, O/G, C/G, KH, KW) view, no copy;
oneDNN picks brdgmm_dw (forward), jit_dw (backward-data), jit_dw / jit (backward-weights), with the
activations NHWC. Letting it choose blocked activation layouts (JAXCLF_ONEDNN_ACT_ANY_*) was
slower in every pass and fell back to gemm for k5 backward-weights, so NHWC stays. Lite0 at 128 px,
batch 32, forward + both gradients of all 16 depthwise convs: 312 ms against 1,198 ms as taps
(efficientnet.depthwise_taps, the previous lever) in the same run; per layer see bench/lite0_step.py's `convs` breakdown.

Anchor-CNN train step, batch 256 (`bench/conv.py --part step`, img/s, same run each line):
  nn.Conv (lax) 106-138 | conv2d XLA fwd + oneDNN bwd 362-375 | conv2d all oneDNN 464-641 |
  PyTorch 2.13 508-789 (load ~1.5; under load ~5 the same four read 131-136 | 269-313 |
  239-316 | 179-189; a full `--part all --resnet --repeats 2` run at load 1.6-3.8: 94-96 |
  259-294 | 313 | 165-169; `bench/conv.py` writes docs/results/conv.json).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
import sys
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["available", "batch_norm_train", "conv2d", "load_error", "max_pool"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_TARGETS = {"fwd": "jaxclf_onednn_conv_fwd", "bwd_data": "jaxclf_onednn_conv_bwd_data",
            "bwd_weights": "jaxclf_onednn_conv_bwd_weights", "bn_fwd": "jaxclf_onednn_bn_fwd",
            "bn_bwd": "jaxclf_onednn_bn_bwd", "pool_fwd": "jaxclf_onednn_pool_fwd",
            "pool_bwd": "jaxclf_onednn_pool_bwd"}
_SYMBOLS = {"fwd": "JaxclfOnednnConvFwd", "bwd_data": "JaxclfOnednnConvBwdData",
            "bwd_weights": "JaxclfOnednnConvBwdWeights", "bn_fwd": "JaxclfOnednnBnFwd",
            "bn_bwd": "JaxclfOnednnBnBwd", "pool_fwd": "JaxclfOnednnPoolFwd",
            "pool_bwd": "JaxclfOnednnPoolBwd"}
_DIMS = ("NHWC", "HWIO", "NHWC")

# Measured choices (bench/conv.py, module docstring); the env variables are for benchmarking.
# Forward: "xla" | "onednn".
_FORWARD = os.environ.get("JAXCLF_ONEDNN_FORWARD", "onednn")
# Backward-data: "onednn" | "xla" (XLA's transposed conv).
_BWD_DATA = os.environ.get("JAXCLF_ONEDNN_BWD_DATA", "onednn")
# Per pass: let oneDNN choose blocked activation layouts (reordering from/to NHWC around the call)
# instead of computing on NHWC directly.
_ACT_ANY = {p: os.environ.get(f"JAXCLF_ONEDNN_ACT_ANY_{p.upper()}", d) == "1"
            for p, d in (("fwd", "0"), ("bwd_data", "0"), ("bwd_weights", "0"))}

_lock = threading.Lock()
_lib = None
_error: str | None = None
_tried = False


def _lib_dirs() -> list[str]:
  """Where libdnnl.so.3 may be: the venv's lib/ (where the onednn wheel puts it), then others."""
  dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib")]
  extra = os.environ.get("JAXCLF_ONEDNN_LIBDIR")
  return ([extra] if extra else []) + dirs


def _load():
  global _lib, _error, _tried
  with _lock:
    if _tried:
      return _lib
    _tried = True
    try:
      if os.environ.get("JAXCLF_ONEDNN", "1") == "0":
        raise RuntimeError("disabled by JAXCLF_ONEDNN=0")
      sos = sorted(glob.glob(os.path.join(_HERE, "_onednn_conv*.so")))
      if not sos:
        raise RuntimeError(f"extension not built: no _onednn_conv*.so in {_HERE} "
                           "(bash scripts/setup.sh builds it when oneDNN is installed)")
      # Load libdnnl by full path first, so the extension's NEEDED libdnnl.so.3 resolves to it
      # wherever the venv lives (the .so also carries an rpath to the venv it was built in).
      for d in _lib_dirs():
        p = os.path.join(d, "libdnnl.so.3")
        if os.path.exists(p):
          ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
          break
      lib = ctypes.CDLL(sos[-1])
      for key, sym in _SYMBOLS.items():
        jax.ffi.register_ffi_target(_TARGETS[key], jax.ffi.pycapsule(getattr(lib, sym)),
                                    platform="cpu")
      lib.jaxclf_onednn_set_serialize.argtypes = [ctypes.c_int]
      lib.jaxclf_onednn_set_num_threads.argtypes = [ctypes.c_int]
      lib.jaxclf_onednn_bn_workspace_bytes.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float,
                                                                            ctypes.c_int]
      lib.jaxclf_onednn_bn_workspace_bytes.restype = ctypes.c_int64
      lib.jaxclf_onednn_pool_workspace_bytes.argtypes = [ctypes.c_int64] * 8
      lib.jaxclf_onednn_pool_workspace_bytes.restype = ctypes.c_int64
      lib.jaxclf_onednn_impl.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
                                         ctypes.c_char_p, ctypes.c_int]
      threads = int(os.environ.get("JAXCLF_ONEDNN_THREADS", "0") or 0)
      lib.jaxclf_onednn_set_num_threads(threads)
      lib.jaxclf_onednn_set_serialize(int(os.environ.get("JAXCLF_ONEDNN_SERIALIZE", "1")))
      _lib = lib
    except Exception as e:  # never raise: conv2d falls back to lax
      _error = f"{type(e).__name__}: {e}"
      _lib = None
    return _lib


def available() -> bool:
  """True when the compiled extension was found, loads, and its FFI targets are registered."""
  try:
    return _load() is not None
  except Exception:
    return False


def load_error() -> str | None:
  """Why `available()` is False (None when it is True or was not asked yet)."""
  available()
  return _error


def _pads(padding, in_hw: Sequence[int], k_hw: Sequence[int], strides: Sequence[int]):
  """lax's padding semantics -> ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    p = padding.upper()
    if p == "VALID":
      return ((0, 0), (0, 0))
    if p == "SAME":
      out = []
      for n, k, s in zip(in_hw, k_hw, strides):
        o = -(-n // s)
        total = max((o - 1) * s + k - n, 0)
        out.append((total // 2, total - total // 2))
      return tuple(out)
    raise ValueError(f"padding must be 'SAME', 'VALID' or ((lo, hi), (lo, hi)), got {padding!r}")
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f"need 2 spatial (lo, hi) pairs, got {padding!r}")
  return pads


def _out_hw(in_hw, k_hw, strides, pads):
  return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(in_hw, k_hw, strides, pads))


def _attrs(kind, strides, pads, groups):
  (pt, pb), (pl, pr) = pads
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt), pb=np.int64(pb),
              pl=np.int64(pl), pr=np.int64(pr), groups=np.int64(groups),
              act_any=np.int64(int(_ACT_ANY[kind])))


def _ffi(kind, shape, a, b, strides, pads, groups):
  if _load() is None:
    raise RuntimeError(f"jaxclf.ops.onednn is unavailable: {_error}")
  return jax.ffi.ffi_call(_TARGETS[kind], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(a, b, **_attrs(kind, strides, pads, groups))


def _lax_conv(x, kernel, strides, pads, groups=1):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMS,
                                  feature_group_count=groups)


def _fwd_impl(x, kernel, strides, pads, forward, groups):
  if forward == "onednn":
    n, h, w, _ = x.shape
    oh, ow = _out_hw((h, w), kernel.shape[:2], strides, pads)
    return _ffi("fwd", (n, oh, ow, kernel.shape[3]), x, kernel, strides, pads, groups)
  return _lax_conv(x, kernel, strides, pads, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, forward, groups):
  return _fwd_impl(x, kernel, strides, pads, forward, groups)


def _conv_fwd(x, kernel, strides, pads, forward, groups):
  return _fwd_impl(x, kernel, strides, pads, forward, groups), (x, kernel)


def _conv_bwd(strides, pads, forward, groups, res, dy):
  x, kernel = res
  dy = dy.astype(jnp.float32)
  if _BWD_DATA == "xla":
    dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads, groups), x)[1](dy)[0]
  else:
    dx = _ffi("bwd_data", x.shape, dy, kernel, strides, pads, groups)
  dw = _ffi("bwd_weights", kernel.shape, x, dy, strides, pads, groups)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _supported(x, kernel, strides, pads, groups=1) -> bool:
  return (x.ndim == 4 and kernel.ndim == 4 and x.dtype == jnp.float32
          and kernel.dtype == jnp.float32 and groups >= 1
          and x.shape[3] == kernel.shape[2] * groups and kernel.shape[3] % groups == 0
          and min(x.shape) > 0 and min(kernel.shape) > 0
          and all(lo >= 0 and hi >= 0 for lo, hi in pads)
          and all(o > 0 for o in _out_hw(x.shape[1:3], kernel.shape[:2], strides, pads)))


def conv2d(x, kernel, *, strides: Sequence[int] = (1, 1), padding="SAME",
           forward: str | None = None, groups: int = 1):
  """`lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"),
  feature_group_count=groups)`, with its gradients (and, where faster, its forward) computed by
  oneDNN.

  x: (N, H, W, C) float32; kernel: (KH, KW, C/groups, O) float32 (flax `nn.Conv`'s `kernel`;
  groups=C with O=C is a depthwise convolution), no dilation. padding: 'SAME' | 'VALID' | ((lo, hi), (lo, hi)) as in lax. forward: 'xla' or
  'onednn' to force the forward implementation (default: the measured faster one). Falls back to
  the lax call when the extension is unavailable or the inputs are not float32.
  """
  strides = tuple(int(s) for s in strides)
  if len(strides) != 2:
    raise ValueError(f"strides must have 2 entries, got {strides}")
  pads = _pads(padding, x.shape[1:3], kernel.shape[:2], strides)
  groups = int(groups)
  if not (available() and _supported(x, kernel, strides, pads, groups)):
    return _lax_conv(x, kernel, strides, pads, groups)
  forward = forward or _FORWARD
  if forward not in ("xla", "onednn"):
    raise ValueError(f"forward must be 'xla' or 'onednn', got {forward!r}")
  return _conv(x, kernel, strides, pads, forward, groups)


def impl_info(kind: str, x_shape, k_shape, strides=(1, 1), padding="SAME", groups=1) -> str:
  """The oneDNN implementation (e.g. 'brg:avx2', 'jit:avx') picked for one shape and pass."""
  lib = _load()
  if lib is None:
    return f"unavailable ({_error})"
  pads = _pads(padding, x_shape[1:3], k_shape[:2], strides)
  n, h, w, c = x_shape
  oh, ow = _out_hw((h, w), k_shape[:2], strides, pads)
  v = (n, h, w, c, k_shape[3], k_shape[0], k_shape[1], oh, ow, strides[0], strides[1],
       pads[0][0], pads[0][1], pads[1][0], pads[1][1], int(_ACT_ANY[kind]), int(groups))
  arr = (ctypes.c_int64 * 17)(*v)
  buf = ctypes.create_string_buffer(256)
  lib.jaxclf_onednn_impl({"fwd": 0, "bwd_data": 1, "bwd_weights": 2}[kind], arr, buf, 256)
  return buf.value.decode()


# ----------------------------------------------------------------------------- batch norm, pool
# The rest of a conv-BN-ReLU-pool step on oneDNN too (onednn_norm_pool.cc): XLA CPU's loop
# fusions for BatchNorm's statistics and max pool's gradient are single-pass but poorly
# vectorised, and together they measured ~45% of the anchor CNN's step after the conv levers
# (bench/step_profile.py). Same maths as layers.BatchNorm / layers.max_pool_2x2.
# JAXCLF_ONEDNN_NORM_POOL=0 keeps BN and pooling in XLA (bench/train.py's `onednn_conv_only`).
_NORM_POOL = os.environ.get("JAXCLF_ONEDNN_NORM_POOL", "1") != "0"


def norm_pool_available() -> bool:
  """True when BatchNorm and max pooling may run on oneDNN (extension built, not disabled)."""
  return _NORM_POOL and available()

def _workspace(kind: str, *args) -> int:
  lib = _load()
  if lib is None:
    raise RuntimeError(f"jaxclf.ops.onednn is unavailable: {_error}")
  fn = {"bn": lib.jaxclf_onednn_bn_workspace_bytes,
        "pool": lib.jaxclf_onednn_pool_workspace_bytes}[kind]
  n = int(fn(*args))
  if n < 0:
    raise RuntimeError(f"oneDNN cannot make a {kind} primitive for {args}")
  return max(n, 1)


def _bn_call(x, scale, shift, epsilon, relu):
  n, h, w, c = x.shape
  ws = _workspace("bn", n, h, w, c, float(epsilon), int(relu))
  stat = jax.ShapeDtypeStruct((c,), jnp.float32)
  return jax.ffi.ffi_call(
      _TARGETS["bn_fwd"], (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat,
                           jax.ShapeDtypeStruct((ws,), jnp.uint8)),
      vmap_method="sequential")(x, scale, shift, eps=np.float32(epsilon), relu=np.int64(relu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn(x, scale, shift, epsilon, relu):
  y, mean, var, _ = _bn_call(x, scale, shift, epsilon, relu)
  return y, mean, var


def _bn_fwd(x, scale, shift, epsilon, relu):
  y, mean, var, ws = _bn_call(x, scale, shift, epsilon, relu)
  return (y, mean, var), (x, scale, mean, var, ws)


def _bn_bwd(epsilon, relu, res, cotangents):
  # mean and var feed only the running averages, not the loss: their cotangents are dropped.
  x, scale, mean, var, ws = res
  dy = cotangents[0].astype(jnp.float32)
  stat = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
  dx, dscale, dshift = jax.ffi.ffi_call(
      _TARGETS["bn_bwd"], (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat),
      vmap_method="sequential")(x, dy, scale, mean, var, ws, eps=np.float32(epsilon),
                                relu=np.int64(relu))
  return dx, dscale, dshift


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, shift, *, epsilon: float = 1e-5, relu: bool = False):
  """Training-mode batch norm over the last axis of NHWC float32 `x`:
  y = (x - mean) / sqrt(var + epsilon) * scale + shift, then ReLU when `relu` (fused: the
  backward reads a 1-bit mask instead of the output). Returns (y, mean, var), with mean and the
  biased variance of the batch (what flax's BatchNorm feeds its running averages).
  Differentiable in x, scale and shift. Requires `available()`."""
  if x.ndim != 4 or x.dtype != jnp.float32:
    raise ValueError(f"batch_norm_train: need NHWC float32, got {x.shape} {x.dtype}")
  return _bn(x, scale.astype(jnp.float32), shift.astype(jnp.float32), float(epsilon), bool(relu))


def _pool_call(x, window, strides):
  n, h, w, c = x.shape
  (kh, kw), (sh, sw) = window, strides
  ws = _workspace("pool", n, h, w, c, kh, kw, sh, sw)
  oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
  return jax.ffi.ffi_call(
      _TARGETS["pool_fwd"], (jax.ShapeDtypeStruct((n, oh, ow, c), jnp.float32),
                             jax.ShapeDtypeStruct((ws,), jnp.uint8)),
      vmap_method="sequential")(x, kh=np.int64(kh), kw=np.int64(kw), sh=np.int64(sh),
                                sw=np.int64(sw))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pool(x, window, strides):
  return _pool_call(x, window, strides)[0]


def _pool_fwd(x, window, strides):
  y, ws = _pool_call(x, window, strides)
  return y, (ws, x.shape)


def _pool_bwd(window, strides, res, dy):
  ws, shape = res
  (kh, kw), (sh, sw) = window, strides
  dx = jax.ffi.ffi_call(_TARGETS["pool_bwd"], jax.ShapeDtypeStruct(shape, jnp.float32),
                        vmap_method="sequential")(dy.astype(jnp.float32), ws, kh=np.int64(kh),
                                                  kw=np.int64(kw), sh=np.int64(sh),
                                                  sw=np.int64(sw))
  return (dx,)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool(x, window=(2, 2), strides=(2, 2)):
  """Max pool of NHWC float32 `x` with VALID padding (trailing rows and columns that fill no
  window are dropped, as `nn.max_pool(..., padding='VALID')` does). The gradient goes to each
  window's first maximum. Requires `available()`."""
  if x.ndim != 4 or x.dtype != jnp.float32:
    raise ValueError(f"max_pool: need NHWC float32, got {x.shape} {x.dtype}")
  window, strides = tuple(int(v) for v in window), tuple(int(v) for v in strides)
  _, h, w, _ = x.shape
  hc = (h - window[0]) // strides[0] * strides[0] + window[0]
  wc = (w - window[1]) // strides[1] * strides[1] + window[1]
  if (hc, wc) != (h, w):
    x = x[:, :hc, :wc]  # the primitive wants exact windows; autodiff pads the gradient back
  return _pool(x, window, strides)
