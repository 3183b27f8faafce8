"""The selective scan: chunked == sequential, gradients, the closed form, mamba_ssm's reference, the dispatcher."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from models.mamba_clinix import scan
from models.mamba_clinix.reference import mamba_reference
from models.mamba_clinix.scan import chunk_length, resolve_backend, selective_scan
from pipelines.errors import ModelError

LENGTHS = [1, 5, 64, 65, 300, 1000]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _inputs(length: int, dtype: torch.dtype, bc: str = "variable", seed: int = 0, batch: int = 2, dim: int = 6,
            state: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    shapes = {"constant": (dim, state), "variable": (batch, state, length), "grouped": (batch, 2, state, length)}
    return {
        "u": rand(batch, dim, length), "delta": rand(batch, dim, length) * 0.5,
        "A": -torch.rand(dim, state, generator=g, dtype=dtype) * 2 - 0.05,
        "B": rand(*shapes[bc]), "C": rand(*shapes[bc]),
        "D": rand(dim), "z": rand(batch, dim, length), "delta_bias": rand(dim) * 0.1,
    }


def _run(inputs: dict[str, torch.Tensor], backend: str, options: dict[str, bool]) -> tuple[torch.Tensor, ...]:
    kwargs = {k: inputs[k] for k in ("D", "z", "delta_bias") if options.get(k)}
    delta = inputs["delta"] if options.get("softplus") else inputs["delta"].abs()
    out = selective_scan(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"], **kwargs,
                         delta_softplus=bool(options.get("softplus")), return_last_state=True, backend=backend)
    return out  # type: ignore[return-value]


OPTIONS = [{}, {"D": True, "z": True, "delta_bias": True, "softplus": True}, {"D": True}, {"z": True, "softplus": True}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "all", "D", "z+softplus"])
def test_chunked_equals_sequential(length, dtype, options):
    inputs = _inputs(length, dtype)
    y_seq, last_seq = _run(inputs, "sequential", options)
    y_chunk, last_chunk = _run(inputs, "chunked", options)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y_chunk, y_seq, rtol=tol, atol=tol)
    torch.testing.assert_close(last_chunk, last_seq, rtol=tol, atol=tol)
    assert y_chunk.dtype == dtype and y_chunk.shape == inputs["u"].shape


@pytest.mark.parametrize("bc", ["constant", "grouped"])
def test_constant_and_grouped_b_and_c(bc):
    inputs = _inputs(130, torch.float64, bc=bc)
    y_seq, _ = _run(inputs, "sequential", OPTIONS[1])
    y_chunk, _ = _run(inputs, "chunked", OPTIONS[1])
    torch.testing.assert_close(y_chunk, y_seq, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_gradcheck_fp64(backend):
    inputs = _inputs(20, torch.float64, batch=1, dim=3, state=2, seed=1)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    leaves = tuple(inputs[k].clone().requires_grad_(True) for k in names)

    def fn(*args: torch.Tensor) -> torch.Tensor:
        u, delta, A, B, C, D, z, bias = args
        return selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, backend=backend)  # type: ignore

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_length_one_closed_form():
    inputs = _inputs(1, torch.float64)
    u, A, B, C, D, z, bias = (inputs[k] for k in ("u", "A", "B", "C", "D", "z", "delta_bias"))
    delta = F.softplus(inputs["delta"] + bias[:, None])
    # x_1 = delta * B * u (x_0 = 0, so exp(delta A) drops out); y = (C . x_1 + D u) * silu(z)
    state = delta[..., None] * B.transpose(1, 2)[:, None] * u[..., None]  # (batch, dim, 1, N)
    expected_y = ((state * C.transpose(1, 2)[:, None]).sum(-1) + D[:, None] * u) * F.silu(z)
    for backend in ("sequential", "chunked"):
        y, last = selective_scan(u, inputs["delta"], A, B, C, D, z, bias, True, True, backend=backend)
        torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(last, state[:, :, 0], rtol=1e-12, atol=1e-12)


def test_chunked_uses_no_factor_above_one():
    """Long sequences with strong decay: a scan built on exp of cumulative sums overflows here; ours is finite."""
    inputs = _inputs(4096, torch.float32, batch=1, dim=4, state=4)
    delta = inputs["delta"].abs() * 40  # sum(delta * A) reaches about -1e5 over the sequence
    y, last = selective_scan(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"], return_last_state=True,
                             backend="chunked")
    y_seq, last_seq = selective_scan(inputs["u"], delta, inputs["A"], inputs["B"], inputs["C"],
                                     return_last_state=True, backend="sequential")
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    torch.testing.assert_close(y, y_seq, rtol=1e-5, atol=1e-5)


def test_chunk_length_is_about_the_square_root():
    assert [chunk_length(n) for n in (1, 64, 512, 4096, 32768, 10**7)] == [8, 8, 16, 64, 256, 256]


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_matches_mamba_ssm_reference(backend):
    reference = mamba_reference()
    if reference is None:
        pytest.skip("mamba_ssm is not installed (make setup installs it without its CUDA build)")
    inputs = _inputs(300, torch.float32)
    expected = reference.selective_scan_ref(*(inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                                   "delta_bias")), True, True)
    got = _run(inputs, backend, OPTIONS[1])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=2e-5)


def test_dispatcher_by_length_device_and_environment(monkeypatch):
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    assert resolve_backend(None, 100, on_cuda=False) is scan.ScanBackend.SEQUENTIAL
    assert resolve_backend(None, 4096, on_cuda=False) is scan.ScanBackend.CHUNKED
    monkeypatch.setenv(scan.BACKEND_ENV, "chunked")
    assert resolve_backend(None, 10, on_cuda=False) is scan.ScanBackend.CHUNKED
    monkeypatch.setenv(scan.BACKEND_ENV, "sequential")
    scan.backends_used(reset=True)
    inputs = _inputs(10, torch.float32)
    selective_scan(inputs["u"], inputs["delta"].abs(), inputs["A"], inputs["B"], inputs["C"])
    assert scan.backends_used(reset=True) == {"sequential": 1}
    assert scan.backends_used() == {}


def test_cuda_backend_where_it_does_not_exist_is_a_coded_error(monkeypatch):
    monkeypatch.setenv(scan.BACKEND_ENV, "cuda")
    inputs = _inputs(10, torch.float32)
    with pytest.raises(ModelError) as info:
        selective_scan(inputs["u"], inputs["delta"].abs(), inputs["A"], inputs["B"], inputs["C"])
    assert info.value.code == "SCAN_BACKEND_UNAVAILABLE" and "chunked" in info.value.message
    monkeypatch.setenv(scan.BACKEND_ENV, "fastest")
    with pytest.raises(ModelError) as info:
        selective_scan(inputs["u"], inputs["delta"].abs(), inputs["A"], inputs["B"], inputs["C"])
    assert info.value.code == "SCAN_BACKEND_UNKNOWN"


def test_runs_without_mamba_ssm(monkeypatch):
    """A clean install without mamba_ssm: no CUDA kernel, every CPU path works."""
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes `import mamba_ssm...` fail
    monkeypatch.delenv(scan.BACKEND_ENV, raising=False)
    assert scan.cuda_kernel() is None
    inputs = _inputs(300, torch.float32)
    assert torch.isfinite(_run(inputs, "auto", OPTIONS[1])[0]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_chunked_on_cuda_matches_mamba_ssm_kernel():
    kernel = scan.cuda_kernel()
    if kernel is None:
        pytest.skip("mamba_ssm's CUDA kernel is not built here")
    inputs = {k: v.cuda() for k, v in _inputs(2048, torch.float32, dim=64, state=16).items()}
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    expected = kernel(*[a.contiguous() for a in args], True, True)
    got = selective_scan(*args, True, True, backend="chunked")
    # mamba_ssm's own test tolerances for fp32
    torch.testing.assert_close(got[0], expected[0], rtol=6e-4, atol=2e-3)
