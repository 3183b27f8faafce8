"""The selective scan of Mamba, with ``mamba_ssm.selective_scan_fn``'s signature and three backends.

For every batch ``b``, channel ``d`` and state ``n``::

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t        (x_0 = 0)
    y_t = sum_n C_t * x_t  (+ D * u_t)  (* silu(z_t))

Backends, chosen by :func:`selective_scan` (or forced with ``$TESSERA_SCAN_BACKEND``):

- ``sequential``: the recurrence one step at a time in float32 (CPU default for short sequences).
  It iterates over ``unbind()`` slices: indexing ``dA[:, :, i]`` in the loop makes backward ~200x slower.
- ``chunked``: exact and vectorised. The sequence is cut into chunks of about sqrt(L) steps; all chunks
  run the recurrence side by side (sqrt(L) steps on tensors holding every chunk), a short sequential carry
  passes each chunk's final state to the next, and a second pass produces the outputs from the true
  initial states. Only products of factors <= 1 appear (exp of delta*A with A < 0, and exp of a chunk's
  non-positive total), never exp of a positive cumulative sum, which overflows. Working memory is one
  chunk-position slice, not the (B, D, L, N) tensors the reference materialises.
- ``cuda``: ``mamba_ssm``'s CUDA kernel, when ``mamba_ssm`` is importable and was built with it.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from enum import Enum

import torch
import torch.nn.functional as F

from pipelines.errors import ModelError

BACKEND_ENV = "TESSERA_SCAN_BACKEND"
SHORT_SEQUENCE = 256  # at or below this length the sequential loop is the faster CPU backend


class ScanBackend(str, Enum):
    AUTO = "auto"
    SEQUENTIAL = "sequential"
    CHUNKED = "chunked"
    CUDA = "cuda"


class _Calls(threading.local):
    """What ran, for the run report: backend name -> number of calls since the last reset, per thread (a batch
    predicting several cases at once on its own threads reports each case's own)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}


_CALLS = _Calls()


def backends_used(reset: bool = False) -> dict[str, int]:
    """How often each backend ran on this thread since the last reset (the predictor records it in report.json)."""
    used = dict(_CALLS.counts)
    if reset:
        _CALLS.counts.clear()
    return used


def cuda_kernel() -> Callable[..., torch.Tensor] | None:
    """``mamba_ssm``'s ``selective_scan_fn`` when its CUDA extension is built, else ``None``.

    Since mamba_ssm 2.3 the extension is compiled only with ``MAMBA_KEEP_CUDA_BUILD=TRUE``; without it the
    package imports but ``selective_scan_interface.selective_scan_cuda`` is ``None``.
    """
    try:
        from mamba_ssm.ops import selective_scan_interface as interface
    except Exception:  # not installed, or installed without a working triton / torch match
        return None
    if getattr(interface, "selective_scan_cuda", None) is None:
        return None
    return interface.selective_scan_fn


def resolve_backend(backend: str | ScanBackend | None, length: int, on_cuda: bool) -> ScanBackend:
    """The backend to run: an explicit choice, else ``$TESSERA_SCAN_BACKEND``, else by device and length."""
    raw = backend if backend is not None else os.environ.get(BACKEND_ENV, ScanBackend.AUTO.value)
    try:
        chosen = ScanBackend(str(getattr(raw, "value", raw)).lower())
    except ValueError as exc:
        names = ", ".join(b.value for b in ScanBackend)
        raise ModelError("SCAN_BACKEND_UNKNOWN", f"scan backend must be one of {names}, got {raw!r}") from exc
    if chosen is ScanBackend.CUDA:
        if not on_cuda or cuda_kernel() is None:
            where = "the tensors are on the CPU" if not on_cuda else "mamba_ssm's CUDA kernel is not importable"
            raise ModelError("SCAN_BACKEND_UNAVAILABLE", f"the cuda scan backend was asked for but {where}; "
                                                         f"use {BACKEND_ENV}=chunked or auto")
        return chosen
    if chosen is not ScanBackend.AUTO:
        return chosen
    if on_cuda:
        return ScanBackend.CUDA if cuda_kernel() is not None else ScanBackend.CHUNKED
    return ScanBackend.SEQUENTIAL if length <= SHORT_SEQUENCE else ScanBackend.CHUNKED


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str | ScanBackend | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan, as ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn``.

    Shapes: ``u``, ``delta``, ``z``: (batch, dim, L); ``A``: (dim, N) real; ``B``, ``C``: (dim, N) constant,
    (batch, N, L) or (batch, groups, N, L) per step; ``D``, ``delta_bias``: (dim,). Returns ``y`` (batch, dim,
    L) in ``u``'s dtype, and the last state (batch, dim, N) in float32 when ``return_last_state``.
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != u.shape[1] or A.is_complex():
        raise ValueError(f"A must be real (dim, N) with dim={u.shape[1]}, got {tuple(A.shape)} {A.dtype}")
    chosen = resolve_backend(backend, u.shape[-1], u.is_cuda)
    _CALLS.counts[chosen.value] = _CALLS.counts.get(chosen.value, 0) + 1
    if chosen is ScanBackend.CUDA:
        kernel = cuda_kernel()
        assert kernel is not None  # resolve_backend checked it
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    dtype_in = u.dtype
    work = torch.float64 if u.dtype == torch.float64 else torch.float32
    delta = delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(work)
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(work)
    deltaU = delta * u.to(work)
    B_steps = _per_step(B, u.shape[1], work)
    C_steps = _per_step(C, u.shape[1], work)
    run = _sequential if chosen is ScanBackend.SEQUENTIAL else _chunked
    y, last_state = run(delta, deltaU, A, B_steps, C_steps)
    if D is not None:
        y = y + u.to(work) * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, last_state) if return_last_state else y


def _per_step(BC: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """B or C as (batch or 1, dim or 1, L or 1, N), broadcastable against (batch, dim, L, N)."""
    BC = BC.to(dtype)
    if BC.dim() == 2:  # (dim, N), the same at every step
        return BC[None, :, None, :]
    if BC.dim() == 3:  # (batch, N, L), shared by every channel
        return BC.transpose(1, 2)[:, None]
    if BC.dim() == 4:  # (batch, groups, N, L): each group serves dim / groups consecutive channels
        groups = BC.shape[1]
        if dim % groups:
            raise ValueError(f"B/C groups ({groups}) must divide dim ({dim})")
        return BC.repeat_interleave(dim // groups, dim=1).transpose(2, 3)
    raise ValueError(f"B/C must have 2, 3 or 4 dimensions, got shape {tuple(BC.shape)}")


def _sequential(
    delta: torch.Tensor, deltaU: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, length = delta.shape
    state = delta.new_zeros(batch, dim, A.shape[1])
    # time first and contiguous, so that unbind() hands out contiguous slices
    dA = torch.exp(delta.unsqueeze(-1) * A[:, None, :]).permute(2, 0, 1, 3).contiguous()
    dBu = (deltaU.unsqueeze(-1) * B).permute(2, 0, 1, 3).contiguous()
    C_t = C.permute(2, 0, 1, 3)
    C_slices = C_t.unbind(0) if C_t.shape[0] == length else [C_t[0]] * length
    outputs = []
    for a, b, c in zip(dA.unbind(0), dBu.unbind(0), C_slices, strict=True):
        state = a * state + b
        outputs.append((state * c).sum(-1))
    return torch.stack(outputs, dim=-1), state


def chunk_length(length: int) -> int:
    """About sqrt(L), a power of two between 8 and 256: both loops then take about sqrt(L) steps."""
    return int(min(256, max(8, 2 ** round(math.log2(max(length, 1)) / 2))))


def _chunked(
    delta: torch.Tensor, deltaU: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, dim, length = delta.shape
    T = chunk_length(length)
    chunks = -(-length // T)
    pad = chunks * T - length
    # padding steps have delta = 0: factor exp(0) = 1 and no input, so they leave the state unchanged;
    # chunk position first and contiguous: step t of every chunk is one contiguous slice
    delta_t = F.pad(delta, (0, pad)).view(batch, dim, chunks, T).permute(3, 0, 1, 2).contiguous()
    deltaU_t = F.pad(deltaU, (0, pad)).view(batch, dim, chunks, T).permute(3, 0, 1, 2).contiguous()
    B_t, C_t = _chunk_steps(B, pad, chunks, T), _chunk_steps(C, pad, chunks, T)
    A_ = A[:, None, :]  # (dim, 1, N) against (batch, dim, chunks, N)

    def steps() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Factor, inflow and C of step t of every chunk at once, (batch, dim, chunks, N), made as needed."""
        for d_t, du_t, b_t, c_t in zip(delta_t.unbind(0), deltaU_t.unbind(0), _slices(B_t, T), _slices(C_t, T),
                                       strict=True):
            yield torch.exp(d_t[..., None] * A_), du_t[..., None] * b_t, c_t

    # pass 1: each chunk's final state from a zero start
    local = delta.new_zeros(batch, dim, chunks, A.shape[1])
    for factor, inflow, _ in steps():
        local = factor * local + inflow
    # each chunk's total factor: exp(A * sum(delta)) <= 1
    decay = torch.exp(delta_t.sum(0)[..., None] * A_)
    # carry: the true state entering each chunk
    entering = [delta.new_zeros(batch, dim, A.shape[1])]
    for decay_c, local_c in zip(decay.unbind(2), local.unbind(2), strict=True):
        entering.append(decay_c * entering[-1] + local_c)
    last_state = entering[-1]
    state = torch.stack(entering[:-1], dim=2)
    # pass 2: the recurrence again from the true starts, with outputs
    outputs = []
    for factor, inflow, c_t in steps():
        state = factor * state + inflow
        outputs.append((state * c_t).sum(-1))
    y = torch.stack(outputs, dim=-1).reshape(batch, dim, chunks * T)[..., :length]
    return y, last_state


def _chunk_steps(BC: torch.Tensor, pad: int, chunks: int, T: int) -> torch.Tensor:
    """(b, d, L or 1, N) -> (T or 1, b, d, chunks or 1, N), chunk position first."""
    if BC.shape[2] == 1:
        return BC[None]
    padded = F.pad(BC, (0, 0, 0, pad))
    return padded.view(BC.shape[0], BC.shape[1], chunks, T, BC.shape[3]).permute(3, 0, 1, 2, 4).contiguous()


def _slices(steps: torch.Tensor, T: int) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    return steps.unbind(0) if steps.shape[0] == T else [steps[0]] * T
