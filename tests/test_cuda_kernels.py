"""CuPy stitching kernels: NVRTC compiles their source, the same source built for the host (g++) and, on a GPU,
the CuPy kernels match the torch reference."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipelines.inference import cuda_kernels as ck
from pipelines.inference.sliding_window import argmax_classes, softmax_classes


def _has_cupy_gpu() -> bool:
    return torch.cuda.is_available() and ck.cupy_available(torch.device("cuda"))


gpu = pytest.mark.skipif(not _has_cupy_gpu(), reason="needs a CUDA GPU and CuPy")


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()  # loads libnvrtc
    except Exception as error:
        pytest.skip(f"NVRTC not available: {error}")
    return nvrtc


@pytest.mark.parametrize("arch", ["compute_75", "compute_90"])
def test_source_compiles_with_nvrtc(arch):
    nvrtc = _nvrtc()
    program = nvrtc.createProgram(ck.kernel_source(), "tessera_stitch.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"-arch={arch}", "--std=c++17"])
    except Exception as error:
        pytest.fail(f"NVRTC failed: {error}\n{nvrtc.getProgramLog(program)}")
    ptx = nvrtc.getPTX(program)
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    for name in ck.kernel_names():
        assert f".entry {name}(" in ptx
    assert "cvt.rn.f16.f32" in ptx  # float16 stores round to nearest


def test_kernel_names_unique_and_cover_dtypes():
    names = ck.kernel_names()
    assert len(set(names)) == len(names) == 6 + 4 + 2
    assert ck.accumulate_name(torch.float16, torch.bfloat16) in names
    assert ck.argmax_name(torch.float16, torch.int16) in names


def test_unavailable_without_cuda(monkeypatch):
    assert not ck.cupy_available(torch.device("cpu"))
    monkeypatch.setenv(ck.NO_CUPY_ENV, "1")
    assert not ck.cupy_available(torch.device("cuda"))
    assert not ck.cupy_available(torch.device("cuda", 0))


def test_cpu_tensors_rejected():
    with pytest.raises(ValueError, match="CUDA"):
        ck.argmax(torch.zeros(3, 4), torch.zeros(4, dtype=torch.uint8))


# --- kernels against the torch reference: on the GPU (CuPy), and on the host (the same source built with g++) ------


_HOST_SHIM = r"""
#include <cmath>
#include <cstring>
struct Dim { unsigned int x; };
static Dim blockIdx, threadIdx, blockDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
"""


def _host_source() -> str:
    """The kernel source as host C++: PTX conversions swapped for _Float16, one serial launcher per kernel."""
    source = ck.kernel_source()
    source = source.replace('asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));',
                            "{ _Float16 v; std::memcpy(&v, &p->bits, 2); f = (float)v; }")
    source = source.replace('asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));',
                            "{ _Float16 r = (_Float16)v; std::memcpy(&h, &r, 2); }")
    assert "asm(" not in source
    launchers = []
    for name in ck.kernel_names():
        params = re.search(name + r"\((.*?)\)\s*\{", source, re.S).group(1)  # type: ignore[union-attr]
        args = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
        launchers.append(
            f'extern "C" void host_{name}(long long blocks, {params}) {{\n'
            f"    blockDim.x = {ck.THREADS};\n"
            f"    for (long long b = 0; b < blocks; ++b) for (unsigned t = 0; t < {ck.THREADS}; ++t) {{\n"
            f"        blockIdx.x = (unsigned)b; threadIdx.x = t; {name}({args});\n    }}\n}}\n")
    return _HOST_SHIM + source + "".join(launchers)


@pytest.fixture(scope="session")
def host_library(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the kernels for the host")
    folder = tmp_path_factory.mktemp("cuda_kernels_host")
    (folder / "kernels.cpp").write_text(_host_source())
    built = subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "kernels.cpp",
                            "-o", "kernels.so"], cwd=folder, capture_output=True, text=True)
    if built.returncode != 0:  # e.g. no _Float16 on this compiler / architecture
        pytest.skip(f"g++ could not build the host kernels: {built.stderr[-500:]}")
    return ctypes.CDLL(str(folder / "kernels.so"))


def _host_launch(library):
    def launch(device, name, voxels, args):
        if voxels == 0:
            return
        converted = []
        for arg in args:
            if isinstance(arg, np.uint64):
                converted.append(ctypes.c_void_p(int(arg)))
            elif isinstance(arg, np.int64):
                converted.append(ctypes.c_longlong(int(arg)))
            else:
                assert isinstance(arg, np.int32)
                converted.append(ctypes.c_int(int(arg)))
        getattr(library, f"host_{name}")(ctypes.c_longlong(-(-voxels // ck.THREADS)), *converted)

    return launch


@pytest.fixture(params=["host", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])])
def device(request, monkeypatch):
    if request.param == "cuda":
        return torch.device("cuda")
    library = request.getfixturevalue("host_library")
    monkeypatch.setattr(ck, "_launch", _host_launch(library))
    monkeypatch.setattr(ck, "_check_device", lambda *tensors: tensors[0].device)
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reference_accumulate(target: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, centre: bool) -> None:
    logits = logits.float()
    if centre:
        logits = logits - logits.amax(dim=0, keepdim=True)
    target.copy_((target.float() + logits * weights).to(target.dtype))


@pytest.mark.parametrize("classes", [1, 3, 14, 105])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("centre", [False, True])
def test_accumulate_matches_torch(device, classes, target_dtype, logits_dtype, centre):
    generator = torch.Generator(device=device).manual_seed(classes)
    shape = (classes, 11, 13, 17)
    start = torch.randn(shape, device=device, generator=generator).to(target_dtype)
    ours, theirs = start.clone(), start.clone()
    window = (slice(None), slice(2, 7), slice(3, 10), slice(5, 14))  # d, h, w = 5, 7, 9 at an offset
    logits = (4 * torch.randn((classes, 5, 7, 9), device=device, generator=generator)).to(logits_dtype)
    weights = torch.rand((5, 7, 9), device=device, generator=generator) + 0.1
    for _ in range(3):
        view = ours[window]
        assert not view.is_contiguous() and view.storage_offset() > 0
        ck.accumulate(view, logits, weights, centre)
        _reference_accumulate(theirs[window], logits, weights, centre)
    _sync(device)
    # float16: one rounding per step either way; a fused multiply-add on the GPU may differ by an ulp
    tol = {"atol": 1e-5, "rtol": 1e-6} if target_dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-3}
    torch.testing.assert_close(ours, theirs, **tol)
    outside = torch.ones(shape, dtype=torch.bool, device=device)
    outside[window] = False
    assert torch.equal(ours[outside], start[outside])  # nothing written outside the window


def test_accumulate_noncontiguous_logits_and_nan(device):
    target = torch.zeros((4, 6, 6, 6), device=device)
    logits = torch.randn((6, 6, 6, 4), device=device).permute(3, 0, 1, 2)  # not contiguous
    logits[1, 0, 0, 0] = float("nan")
    weights = torch.rand((6, 6, 6), device=device)
    ck.accumulate(target, logits, weights, centre=True)
    _sync(device)
    peak = torch.maximum(torch.maximum(logits[0], logits[1]), torch.maximum(logits[2], logits[3]))  # NaN wins
    torch.testing.assert_close(target, (logits - peak) * weights, atol=1e-6, rtol=1e-6, equal_nan=True)
    assert target[:, 0, 0, 0].isnan().all()


@gpu
@pytest.mark.gpu
def test_accumulate_runs_on_torch_current_stream():
    target = torch.zeros((4, 6, 6, 6), device="cuda")
    logits = torch.randn((4, 6, 6, 6), device="cuda")
    weights = torch.rand((6, 6, 6), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(50):
            ck.accumulate(target, logits, weights, centre=False)
        result = target.clone()  # ordered after the kernels only if they ran on this stream
    stream.synchronize()
    torch.testing.assert_close(result, 50 * logits * weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("classes,out_dtype", [(1, torch.uint8), (3, torch.uint8), (105, torch.uint8),
                                               (256, torch.uint8), (300, torch.int16), (14, torch.int16)])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float16])
def test_argmax_matches_reference(device, classes, out_dtype, score_dtype):
    generator = torch.Generator(device=device).manual_seed(classes)
    scores = torch.randint(-3, 4, (classes, 5, 7, 9), device=device, generator=generator).to(score_dtype)  # ties
    out = torch.full((5, 7, 9), 77, dtype=out_dtype, device=device)
    ck.argmax(scores, out)
    _sync(device)
    assert torch.equal(out, argmax_classes(scores, out_dtype))
    assert torch.equal(out.long(), torch.argmax(scores.float(), dim=0))  # the first maximum wins
    slab = torch.empty((2, 7, 9), dtype=out_dtype, device=device)
    ck.argmax(scores[:, 1:3], slab)  # a slab of the accumulator: class blocks contiguous, class stride 5*7*9
    _sync(device)
    assert torch.equal(slab, out[1:3])


def test_argmax_ties_and_nan_as_argmax_classes(device):
    nan = float("nan")
    scores = torch.tensor([[0.0, nan, 1.0, 5.0, 2.0], [1.0, 2.0, nan, 0.0, 2.0], [2.0, 9.0, 3.0, nan, 2.0]],
                          device=device)
    out = torch.empty(5, dtype=torch.uint8, device=device)
    ck.argmax(scores, out)
    _sync(device)
    assert out.tolist() == argmax_classes(scores).tolist() == [2, 0, 0, 0, 0]  # a NaN freezes the label


@pytest.mark.parametrize("classes", [1, 3, 14, 105])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float16])
def test_normalise_matches_torch(device, classes, softmax, acc_dtype):
    generator = torch.Generator(device=device).manual_seed(classes)
    accumulator = (5 * torch.randn((classes, 5, 7, 9), device=device, generator=generator)).to(acc_dtype)
    weight_sum = torch.rand((5, 7, 9), device=device, generator=generator) + 0.05
    out = torch.empty((classes, 5, 7, 9), device=device)
    ck.normalise(accumulator, weight_sum, out, softmax)
    _sync(device)
    blended = accumulator.float().div_(weight_sum)
    expected = softmax_classes(blended) if softmax else blended
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7 if softmax else 0.0)
    if softmax:
        torch.testing.assert_close(out.sum(0), torch.ones_like(weight_sum), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("output", ["labels", "probabilities", "logits"])
@pytest.mark.parametrize("accumulate_dtype", [torch.float32, torch.float16])
def test_engine_cupy_and_torch_paths_agree(monkeypatch, output, accumulate_dtype):
    """The whole engine on CUDA: CuPy kernels and the torch ops give the same stitching."""
    from pipelines.inference.sliding_window import sliding_window_inference

    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 7, 3, padding=1).cuda().eval()
    image = torch.randn(1, 1, 45, 38, 29, device="cuda")
    kwargs = dict(overlap=0.5, output=output, accumulate_dtype=accumulate_dtype, memory_budget_bytes=2**20)
    with torch.no_grad():
        fast = sliding_window_inference(image, (16, 16, 16), 3, network, **kwargs)
        assert sliding_window_inference.last_plan.kernels == "cupy"
        monkeypatch.setenv(ck.NO_CUPY_ENV, "1")
        slow = sliding_window_inference(image, (16, 16, 16), 3, network, **kwargs)
        assert sliding_window_inference.last_plan.kernels == "torch"
    if output == "labels":
        agree = (fast == slow).float().mean().item()
        assert agree >= (1.0 if accumulate_dtype == torch.float32 else 0.9999)
    else:
        torch.testing.assert_close(fast, slow, atol=1e-5 if accumulate_dtype == torch.float32 else 2e-3, rtol=0)
