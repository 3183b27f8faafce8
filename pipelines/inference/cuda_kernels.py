"""CuPy kernels for the CUDA stitching path: fused accumulate, argmax over classes, normalise (+ softmax).

Torch tensors in and out, shared zero-copy through their data pointers and strides; every kernel runs on
torch's current CUDA stream, one thread per voxel looping over the classes, 64-bit indices throughout.
Arithmetic is float32; float16 / bfloat16 are read and written as raw 16-bit values converted with PTX
``cvt`` instructions (round to nearest even on store), so NVRTC needs no CUDA headers (``cuda_fp16.h``
is not shipped with the NVRTC wheel). CuPy is imported lazily: this module imports without it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from functools import cache
from typing import Any

import torch

log = logging.getLogger(__name__)

THREADS = 256
NO_CUPY_ENV = "TESSERA_NO_CUPY"

# torch dtype -> (name suffix, CUDA storage type)
_VALUE_TYPES: dict[torch.dtype, tuple[str, str]] = {
    torch.float32: ("f32", "float"),
    torch.float16: ("f16", "Half"),
    torch.bfloat16: ("bf16", "BFloat16"),
}
_LABEL_TYPES: dict[torch.dtype, tuple[str, str, int]] = {
    torch.uint8: ("u8", "unsigned char", 256),
    torch.int16: ("i16", "short", 32768),
}
ACCUMULATE_TARGETS = (torch.float32, torch.float16)
ACCUMULATE_LOGITS = (torch.float32, torch.float16, torch.bfloat16)
SCORE_TYPES = (torch.float32, torch.float16)

_COMMON = r"""
// Raw 16-bit storage types: no cuda_fp16.h / cuda_bf16.h needed.
struct Half { unsigned short bits; };
struct BFloat16 { unsigned short bits; };

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const Half* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
}
__device__ __forceinline__ float load(const BFloat16* p) {
    return __uint_as_float(((unsigned int)p->bits) << 16);
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(Half* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}

// torch.maximum semantics: NaN wins.
__device__ __forceinline__ float nan_max(float a, float b) { return (b != b || b > a) ? b : a; }

__device__ __forceinline__ long long voxel_index() {
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

// target (K, d, h, w) strided view; logits (K, d, h, w) contiguous; weights (d, h, w) contiguous.
template <typename T, typename L>
__device__ __forceinline__ void accumulate_body(
        T* target, const L* logits, const float* weights, int classes, long long d, long long h, long long w,
        long long sk, long long sd, long long sh, long long sw, int centre) {
    const long long n = d * h * w;
    const long long i = voxel_index();
    if (i >= n) return;
    const long long plane = h * w;
    const long long z = i / plane;
    const long long rest = i - z * plane;
    const long long y = rest / w;
    const long long x = rest - y * w;
    T* t = target + z * sd + y * sh + x * sw;
    const L* l = logits + i;
    const float weight = weights[i];
    float peak = 0.0f;
    if (centre) {
        peak = load(l);
        for (int k = 1; k < classes; ++k) peak = nan_max(peak, load(l + (long long)k * n));
    }
    for (int k = 0; k < classes; ++k) {
        T* tk = t + (long long)k * sk;
        store(tk, load(tk) + (load(l + (long long)k * n) - peak) * weight);
    }
}

// scores (K, n) with class stride `stride`, each class contiguous; ties and NaN as argmax_classes.
template <typename T, typename O>
__device__ __forceinline__ void argmax_body(const T* scores, O* out, long long stride, int classes, long long n) {
    const long long i = voxel_index();
    if (i >= n) return;
    const T* s = scores + i;
    float best = load(s);
    int label = 0;
    for (int k = 1; k < classes; ++k) {
        const float v = load(s + (long long)k * stride);
        if (v > best) label = k;
        best = nan_max(best, v);
    }
    out[i] = (O)label;
}

// out (K, n) contiguous = accumulator / weight_sum, then softmax over K if asked.
template <typename T>
__device__ __forceinline__ void normalise_body(
        const T* accumulator, const float* weight_sum, float* out, long long stride, int classes, long long n,
        int softmax) {
    const long long i = voxel_index();
    if (i >= n) return;
    const T* a = accumulator + i;
    float* o = out + i;
    const float total = weight_sum[i];
    if (!softmax) {
        for (int k = 0; k < classes; ++k) o[(long long)k * n] = load(a + (long long)k * stride) / total;
        return;
    }
    float peak = load(a) / total;
    for (int k = 1; k < classes; ++k) peak = nan_max(peak, load(a + (long long)k * stride) / total);
    float sum = 0.0f;
    for (int k = 0; k < classes; ++k) {
        const float e = expf(load(a + (long long)k * stride) / total - peak);
        o[(long long)k * n] = e;
        sum += e;
    }
    const float inverse = 1.0f / sum;
    for (int k = 0; k < classes; ++k) o[(long long)k * n] *= inverse;
}
"""

_ACCUMULATE = r"""
extern "C" __global__ void __launch_bounds__(256) {name}(
        {target}* target, const {logits}* logits, const float* weights, int classes, long long d, long long h,
        long long w, long long sk, long long sd, long long sh, long long sw, int centre) {{
    accumulate_body<{target}, {logits}>(target, logits, weights, classes, d, h, w, sk, sd, sh, sw, centre);
}}
"""

_ARGMAX = r"""
extern "C" __global__ void __launch_bounds__(256) {name}(
        const {scores}* scores, {out}* out, long long stride, int classes, long long n) {{
    argmax_body<{scores}, {out}>(scores, out, stride, classes, n);
}}
"""

_NORMALISE = r"""
extern "C" __global__ void __launch_bounds__(256) {name}(
        const {scores}* accumulator, const float* weight_sum, float* out, long long stride, int classes,
        long long n, int softmax) {{
    normalise_body<{scores}>(accumulator, weight_sum, out, stride, classes, n, softmax);
}}
"""


def accumulate_name(target: torch.dtype, logits: torch.dtype) -> str:
    return f"tessera_accumulate_{_VALUE_TYPES[target][0]}_{_VALUE_TYPES[logits][0]}"


def argmax_name(scores: torch.dtype, out: torch.dtype) -> str:
    return f"tessera_argmax_{_VALUE_TYPES[scores][0]}_{_LABEL_TYPES[out][0]}"


def normalise_name(accumulator: torch.dtype) -> str:
    return f"tessera_normalise_{_VALUE_TYPES[accumulator][0]}"


def kernel_names() -> tuple[str, ...]:
    """Every kernel the module source defines, one per dtype combination."""
    names = [accumulate_name(t, lg) for t in ACCUMULATE_TARGETS for lg in ACCUMULATE_LOGITS]
    names += [argmax_name(s, o) for s in SCORE_TYPES for o in _LABEL_TYPES]
    names += [normalise_name(s) for s in SCORE_TYPES]
    return tuple(names)


@cache
def kernel_source() -> str:
    """The CUDA source of all kernels (one NVRTC compilation)."""
    parts = [_COMMON]
    for t in ACCUMULATE_TARGETS:
        for lg in ACCUMULATE_LOGITS:
            parts.append(_ACCUMULATE.format(name=accumulate_name(t, lg), target=_VALUE_TYPES[t][1],
                                            logits=_VALUE_TYPES[lg][1]))
    for s in SCORE_TYPES:
        for o, (_, ctype, _) in _LABEL_TYPES.items():
            parts.append(_ARGMAX.format(name=argmax_name(s, o), scores=_VALUE_TYPES[s][1], out=ctype))
    for s in SCORE_TYPES:
        parts.append(_NORMALISE.format(name=normalise_name(s), scores=_VALUE_TYPES[s][1]))
    return "".join(parts)


_LOCK = threading.Lock()
_MODULE: Any = None
_FUNCTIONS: dict[tuple[int, str], Any] = {}
_STREAMS: dict[tuple[int, int], Any] = {}
_AVAILABLE: dict[int, bool] = {}


def _cupy() -> Any:
    import cupy

    return cupy


def _function(device: torch.device, name: str) -> Any:
    """The compiled kernel ``name`` on ``device``; the module is compiled once (CuPy caches it on disk too)."""
    global _MODULE
    index = _index(device)
    key = (index, name)
    found = _FUNCTIONS.get(key)
    if found is not None:
        return found
    cupy = _cupy()
    with _LOCK:
        if _MODULE is None:
            _MODULE = cupy.RawModule(code=kernel_source(), options=("--std=c++17",))
            log.debug("CuPy stitching kernels: module created (%d kernels)", len(kernel_names()))
        with cupy.cuda.Device(index):
            found = _MODULE.get_function(name)
        _FUNCTIONS[key] = found
    return found


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _stream(device: torch.device) -> Any:
    """Torch's current stream on ``device`` as a CuPy stream (cached per stream handle)."""
    index = _index(device)
    current = torch.cuda.current_stream(index)
    key = (index, int(current.cuda_stream))
    found = _STREAMS.get(key)
    if found is None:
        cupy = _cupy()
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(current, "__cuda_stream__"):
            found = from_external(current)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                found = cupy.cuda.ExternalStream(key[1], index)
        _STREAMS[key] = found
    return found


def cupy_available(device: torch.device) -> bool:
    """Whether the CuPy kernels can run on ``device``: CUDA, CuPy importable, kernels compiled. Never raises."""
    if os.environ.get(NO_CUPY_ENV, "") == "1":
        return False
    try:
        if device.type != "cuda" or not torch.cuda.is_available():
            return False
        index = _index(device)
    except Exception:  # a probe: any failure means "no"
        return False
    known = _AVAILABLE.get(index)
    if known is not None:
        return known
    try:
        cupy = _cupy()
        ok = cupy.cuda.runtime.getDeviceCount() > index
        if ok:
            _function(device, argmax_name(torch.float32, torch.uint8))  # compiles the module once
    except Exception as error:
        log.info("CuPy stitching kernels unavailable on %s: %s", device, error)
        ok = False
    _AVAILABLE[index] = ok
    return ok


def _launch(device: torch.device, name: str, voxels: int, args: tuple) -> None:
    if voxels == 0:
        return
    cupy = _cupy()
    kernel = _function(device, name)
    blocks = (voxels + THREADS - 1) // THREADS
    with cupy.cuda.Device(_index(device)), _stream(device):
        kernel((blocks,), (THREADS,), args)


def _pointer(tensor: torch.Tensor) -> Any:
    import numpy

    return numpy.uint64(tensor.data_ptr())  # data_ptr includes the storage offset


def _i64(value: int) -> Any:
    import numpy

    return numpy.int64(value)


def _i32(value: int) -> Any:
    import numpy

    return numpy.int32(value)


def _check_device(*tensors: torch.Tensor) -> torch.device:
    device = tensors[0].device
    if device.type != "cuda":
        raise ValueError(f"CuPy kernels need CUDA tensors, got {device}")
    for tensor in tensors[1:]:
        if tensor.device != device:
            raise ValueError(f"tensors on different devices: {device} and {tensor.device}")
    return device


def _class_stride(scores: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``scores`` (K, *S) with each class block contiguous (a slice along axis 1 is fine), and its class stride."""
    expected = 1
    for size, stride in zip(reversed(scores.shape[1:]), reversed(scores.stride()[1:]), strict=True):
        if size != 1 and stride != expected:
            scores = scores.contiguous()
            break
        expected *= size
    return scores, int(scores.stride(0)) if scores.shape[0] > 1 else math.prod(scores.shape[1:])


def accumulate(target: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, centre: bool) -> None:
    """``target += (logits - centre * max_k logits) * weights`` in one pass; ``target`` may be a strided view."""
    device = _check_device(target, logits, weights)
    if target.ndim != 4 or tuple(logits.shape) != tuple(target.shape):
        raise ValueError(f"target and logits must both be (K, d, h, w), got {tuple(target.shape)} and "
                         f"{tuple(logits.shape)}")
    if tuple(weights.shape) != tuple(target.shape[1:]):
        raise ValueError(f"weights must be {tuple(target.shape[1:])}, got {tuple(weights.shape)}")
    if target.dtype not in ACCUMULATE_TARGETS or logits.dtype not in ACCUMULATE_LOGITS:
        raise ValueError(f"unsupported dtypes: target {target.dtype}, logits {logits.dtype}")
    logits = logits.contiguous()
    weights = weights.to(torch.float32).contiguous()
    classes, d, h, w = (int(s) for s in target.shape)
    sk, sd, sh, sw = (int(s) for s in target.stride())
    args = (_pointer(target), _pointer(logits), _pointer(weights), _i32(classes), _i64(d), _i64(h), _i64(w),
            _i64(sk), _i64(sd), _i64(sh), _i64(sw), _i32(int(centre)))
    _launch(device, accumulate_name(target.dtype, logits.dtype), d * h * w, args)


def argmax(scores: torch.Tensor, out: torch.Tensor) -> None:
    """``out = argmax over axis 0 of scores``, ties to the lower class (as ``argmax_classes``)."""
    device = _check_device(scores, out)
    if tuple(scores.shape[1:]) != tuple(out.shape):
        raise ValueError(f"scores (K, *S) and out (*S) disagree: {tuple(scores.shape)} and {tuple(out.shape)}")
    if scores.dtype not in SCORE_TYPES or out.dtype not in _LABEL_TYPES:
        raise ValueError(f"unsupported dtypes: scores {scores.dtype}, out {out.dtype}")
    classes = int(scores.shape[0])
    if not 1 <= classes <= _LABEL_TYPES[out.dtype][2]:
        raise ValueError(f"{classes} classes do not fit {out.dtype}")
    scores, stride = _class_stride(scores)
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    voxels = target.numel()
    args = (_pointer(scores), _pointer(target), _i64(stride), _i32(classes), _i64(voxels))
    _launch(device, argmax_name(scores.dtype, out.dtype), voxels, args)
    if target is not out:
        out.copy_(target)


def normalise(accumulator: torch.Tensor, weight_sum: torch.Tensor, out: torch.Tensor, softmax: bool) -> None:
    """``out = accumulator / weight_sum``, then softmax over axis 0 (max-subtracted) when ``softmax``."""
    device = _check_device(accumulator, weight_sum, out)
    if tuple(accumulator.shape) != tuple(out.shape) or tuple(weight_sum.shape) != tuple(out.shape[1:]):
        raise ValueError(f"shapes disagree: accumulator {tuple(accumulator.shape)}, weight_sum "
                         f"{tuple(weight_sum.shape)}, out {tuple(out.shape)}")
    if accumulator.dtype not in SCORE_TYPES or out.dtype != torch.float32:
        raise ValueError(f"unsupported dtypes: accumulator {accumulator.dtype}, out {out.dtype}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    accumulator, stride = _class_stride(accumulator)
    weight_sum = weight_sum.to(torch.float32).contiguous()
    classes = int(out.shape[0])
    voxels = math.prod(out.shape[1:])
    args = (_pointer(accumulator), _pointer(weight_sum), _pointer(out), _i64(stride), _i32(classes),
            _i64(voxels), _i32(int(softmax)))
    _launch(device, normalise_name(accumulator.dtype), voxels, args)
