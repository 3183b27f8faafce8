"""Tessera's sliding-window engine: MONAI's window grid, stitched with less time and memory.

Shared arguments mean what they mean in MONAI's ``sliding_window_inference`` and the window grid is
MONAI's own (``_get_scan_interval`` + ``dense_patch_slices``), so results can be compared exactly. What
differs is the stitching:

- the importance map (Gaussian or constant) is computed once per roi and cached, and so is the sum of
  the weights over a grid;
- each window's output is multiplied by its weight and added in one fused pass (``addcmul_``) into a
  preallocated accumulator that is reused across calls;
- ``output="labels"``: no division at all (the per-voxel weight sum is positive, so it cannot change the
  argmax) and, by default, slab streaming: a slab along the first spatial axis is finalised (argmax to
  uint8) as soon as every window touching it is done, so memory grows with one roi-thick slab, not the
  volume;
- a planner decides before the first forward where and in which precision to accumulate, from the
  volume, the class count, the output kind and the memory available; the plan is recorded
  (``sliding_window_inference.last_plan``; :func:`last_stitch_plan` for this thread's last call), there is no
  retry-from-scratch.

The reused buffers, the weight sums and the last plan are kept per thread: a batch that predicts several cases
at once on its own threads (lanes) never shares an accumulator.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from pipelines.inference import cuda_kernels

log = logging.getLogger(__name__)

OUTPUTS = ("labels", "probabilities", "logits")
MODES = ("gaussian", "constant")
MANY_CLASSES = 32  # from here on, labels are accumulated in float16 by default (>= 99.99% identical labels)
MONAI_WEIGHT_FLOOR = 1e-3
FLOAT16_WEIGHT_SCALE = 64.0  # floor weight 0.064; headroom up to |logit| ~ 1000 before float16 overflows
STREAM_ABOVE_BYTES = 512 * 2**20  # labels: keep the whole accumulator below this, stream slabs above it


def label_dtype(classes: int) -> torch.dtype:
    """Labels as uint8, int16 past 256 classes (torch has no uint16 arithmetic)."""
    return torch.uint8 if classes <= 256 else torch.int16


@dataclass(frozen=True)
class StitchPlan:
    """How one call stitches, decided before the first forward and recorded in the run report."""

    device: str
    accumulate_dtype: str  # "float32" or "float16"
    slab_streaming: bool
    accumulator_shape: tuple[int, ...]
    output: str
    windows: int
    estimated_bytes: int
    budget_bytes: int
    reason: str
    kernels: str = "torch"  # "cupy": CuPy RawKernels for accumulate / argmax / normalise (CUDA), else torch ops


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of the device (CUDA) or the host (MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def plan_stitching(
    image_size: Sequence[int],
    roi_size: Sequence[int],
    classes: int,
    windows: int,
    sw_batch_size: int,
    output: str,
    device: torch.device,
    memory_budget_bytes: int | None = None,
    accumulate_dtype: torch.dtype | None = None,
    slab_sink: bool = False,
) -> StitchPlan:
    """Decide accumulator precision and slab streaming from sizes and the memory at hand (``slab_sink``: the
    caller takes probabilities slab by slab, so they stream whenever the volume is deeper than a window)."""
    budget = memory_budget_bytes if memory_budget_bytes is not None else available_memory_bytes(device) // 2
    voxels = math.prod(image_size)
    roi_voxels = math.prod(roi_size)
    batch_bytes = 2 * sw_batch_size * classes * roi_voxels * 4  # predictor output + the weighted copy
    whole_bytes = classes * voxels * 4
    streaming = image_size[0] > roi_size[0] and (slab_sink or output == "labels" and (
        whole_bytes > STREAM_ABOVE_BYTES or whole_bytes > budget // 2))
    depth_voxels = (roi_size[0] * voxels // image_size[0]) if streaming else voxels
    label_bytes = voxels * label_dtype(classes).itemsize if output == "labels" else 0

    def need(item_size: int) -> int:
        weight_map = 0 if output == "labels" else voxels * 4
        if slab_sink:  # the probabilities of one slab, not of the volume
            return classes * depth_voxels * (item_size + 4) + weight_map + batch_bytes
        return classes * depth_voxels * item_size + weight_map + batch_bytes + label_bytes

    reasons = []
    if accumulate_dtype is not None:
        dtype = accumulate_dtype
        reasons.append("accumulator precision requested")
    elif output == "labels" and classes >= MANY_CLASSES:
        dtype = torch.float16
        reasons.append(f"{classes} classes, labels only: float16 accumulation halves the accumulator")
    elif need(4) > budget:
        dtype = torch.float16
        reasons.append("float32 accumulation does not fit the memory budget")
    else:
        dtype = torch.float32
        reasons.append("float32 accumulation fits")
    if streaming:
        reasons.append("labels only: slabs finalised as soon as their windows are done" if output == "labels" else
                       "probability slabs handed on as soon as their windows are done")
    estimated = need(2 if dtype == torch.float16 else 4)
    if estimated > budget:
        reasons.append(f"warning: needs about {estimated / 2**30:.2f} GiB, budget {budget / 2**30:.2f} GiB")
        log.warning("stitching needs about %.2f GiB of %.2f GiB available", estimated / 2**30, budget / 2**30)
    shape = (classes, roi_size[0] if streaming else image_size[0], *image_size[1:])
    kernels = "cupy" if cuda_kernels.cupy_available(device) else "torch"
    return StitchPlan(str(device), str(dtype).replace("torch.", ""), streaming, shape, output, windows, estimated,
                      budget, "; ".join(reasons), kernels)


@lru_cache(maxsize=16)
def _importance(roi_size: tuple[int, ...], mode: str, sigma_scale: float, device: str) -> torch.Tensor:
    """MONAI's importance map, floored as MONAI floors it, computed once per roi."""
    weights = compute_importance_map(roi_size, mode=mode, sigma_scale=sigma_scale, device=device, dtype=torch.float32)
    floor = max(float(weights.min()), MONAI_WEIGHT_FLOOR)
    return torch.clamp_(weights, min=floor)


class _BufferPool:
    """Reuses large buffers across calls: fresh memory is written several times slower than reused memory."""

    def __init__(self, capacity: int = 2) -> None:
        self._buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.capacity = capacity

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (shape, dtype, str(device))
        buffer = self._buffers.pop(key, None)
        if buffer is None:
            while len(self._buffers) >= self.capacity:
                self._buffers.popitem(last=False)
            buffer = torch.zeros(shape, dtype=dtype, device=device)
        else:
            buffer.zero_()
        self._buffers[key] = buffer
        return buffer

    def clear(self) -> None:
        self._buffers.clear()


class _ThreadState(threading.local):
    """What the engine keeps between calls, one per thread: its buffers, weight sums and last plan."""

    def __init__(self) -> None:
        self.pool = _BufferPool()
        self.weight_sums: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.plan: StitchPlan | None = None


_THREAD = _ThreadState()


def last_stitch_plan() -> StitchPlan | None:
    """The plan of this thread's last :func:`sliding_window_inference` call."""
    return _THREAD.plan


def _weight_sum(image_size: tuple[int, ...], slices: list[tuple[slice, ...]], weights: torch.Tensor,
                key: tuple) -> torch.Tensor:
    """The sum of the window weights over one grid, computed once per grid."""
    sums = _THREAD.weight_sums
    cached = sums.pop(key, None)
    if cached is None:
        cached = torch.zeros(image_size, dtype=torch.float32, device=weights.device)
        for window in slices:
            cached[window] += weights
        while len(sums) >= 4:
            sums.popitem(last=False)
    sums[key] = cached
    return cached


def _validate(inputs: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int, overlap: float, mode: str,
              output: str) -> tuple[int, int, int]:
    if inputs.ndim != 5:
        raise ValueError(f"inputs must be (batch, channels, D, H, W), got shape {tuple(inputs.shape)}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be 3 positive integers, got {roi_size}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    return (roi[0], roi[1], roi[2])


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every combination of flips of the spatial ``axes``, the identity first: ``(0, 2)`` -> ``[(), (0,), (2,),
    (0, 2)]``."""
    return [c for n in range(len(axes) + 1) for c in combinations(sorted(axes), n)]


def _mirrored(predictor: Callable[[torch.Tensor], torch.Tensor], axes: Sequence[int]) -> Callable:
    """Test-time mirroring: the mean of the outputs over every combination of flips of ``axes``."""
    combos = mirror_combinations(axes)

    def predict(batch: torch.Tensor) -> torch.Tensor:
        total = None
        for combo in combos:
            dims = [2 + a for a in combo]
            out = predictor(torch.flip(batch, dims) if dims else batch)
            out = torch.flip(out, dims) if dims else out
            total = out.float() if total is None else total + out.float()
        assert total is not None
        return total / len(combos)

    return predict


def sliding_window_inference(
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    output: str = "probabilities",
    plan: StitchPlan | None = None,
    memory_budget_bytes: int | None = None,
    accumulate_dtype: torch.dtype | None = None,
    amp: bool = False,
    mirror_axes: Sequence[int] = (),
    progress: Callable[[int, int], None] | None = None,
    slab_sink: SlabSink | None = None,
) -> torch.Tensor:
    """Sliding-window inference with MONAI's grid and Tessera's stitching.

    Returns ``labels`` ``(B, D, H, W)`` uint8 (int16 past 256 classes), or ``probabilities`` (softmax over
    classes) / ``logits`` (blended, as MONAI returns them) ``(B, K, D, H, W)`` float32. ``slab_sink`` (one
    input, ``probabilities`` or ``logits``): the result is handed over in consecutive slabs along the first
    spatial axis, ``slab_sink(start, values (K, depth, H, W))``, each as soon as its windows are done, and
    never held whole (an empty tensor is returned).
    """
    roi = _validate(inputs, roi_size, sw_batch_size, overlap, mode, output)
    if slab_sink is not None and (output == "labels" or inputs.shape[0] != 1):
        raise ValueError("slab_sink takes the probabilities or logits of one input")
    forward = _mirrored(predictor, mirror_axes) if mirror_axes else predictor
    results = []
    for item in range(inputs.shape[0]):
        results.append(_stitch_one(inputs[item : item + 1], roi, sw_batch_size, forward, overlap, mode,
                                   sigma_scale, padding_mode, cval, output, plan, memory_budget_bytes,
                                   accumulate_dtype, amp, progress, slab_sink))
    return torch.cat(results) if len(results) > 1 else results[0]


sliding_window_inference.last_plan = None  # type: ignore[attr-defined]


def _stitch_one(
    image: torch.Tensor,
    roi: tuple[int, int, int],
    sw_batch_size: int,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    overlap: float,
    mode: str,
    sigma_scale: float,
    padding_mode: str,
    cval: float,
    output: str,
    plan: StitchPlan | None,
    memory_budget_bytes: int | None,
    accumulate_dtype: torch.dtype | None,
    amp: bool,
    progress: Callable[[int, int], None] | None,
    slab_sink: SlabSink | None = None,
) -> torch.Tensor:
    original = tuple(int(s) for s in image.shape[2:])
    pad: list[int] = []
    for axis in (2, 1, 0):  # F.pad wants the last axis first, as MONAI builds it
        diff = max(roi[axis] - original[axis], 0)
        pad.extend([diff // 2, diff - diff // 2])
    if any(pad):
        image = F.pad(image, pad=pad, mode=padding_mode, value=cval)
    size = tuple(int(s) for s in image.shape[2:])
    interval = _get_scan_interval(size, roi, 3, (overlap,) * 3)
    slices = dense_patch_slices(size, roi, interval)
    device = image.device
    weights = _importance(roi, mode, float(sigma_scale), str(device))
    key = (size, roi, tuple(interval), mode, float(sigma_scale), str(device))
    crop = tuple(slice(pad[2 * (2 - axis)], pad[2 * (2 - axis)] + original[axis]) for axis in range(3))
    sink = None if slab_sink is None else _cropped_sink(slab_sink, crop)
    stitcher: _Stitcher | None = None
    done = 0
    for start in range(0, len(slices), sw_batch_size):
        batch_slices = slices[start : start + sw_batch_size]
        batch = torch.cat([image[(slice(None), slice(None), *window)] for window in batch_slices])
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = predictor(batch)
        if stitcher is None:
            classes = int(logits.shape[1])
            chosen = plan or plan_stitching(size, roi, classes, len(slices), sw_batch_size, output, device,
                                            memory_budget_bytes, accumulate_dtype, slab_sink=sink is not None)
            sliding_window_inference.last_plan = _THREAD.plan = chosen  # type: ignore[attr-defined]
            stitcher = _Stitcher(chosen, size, roi, weights, slices, device, key, sink)
        for index, window in enumerate(batch_slices):
            stitcher.add(window, logits[index])
        # drop this batch's output before the next forward: otherwise it lives on while the predictor makes the
        # next one (105 classes x 2 x 96^3 float32 = 0.7 GB held for nothing)
        del logits, batch
        done += len(batch_slices)
        if progress:
            progress(done, len(slices))
    assert stitcher is not None
    result = stitcher.finish()
    if sink is not None:
        return result
    if output == "labels":
        return result[(slice(None), *crop)]
    return result[(slice(None), slice(None), *crop)].contiguous()


SlabSink = Callable[[int, torch.Tensor], None]


def _cropped_sink(sink: SlabSink, crop: tuple[slice, ...]) -> SlabSink:
    """``sink`` told slabs of the unpadded volume: padded slabs cropped, their start shifted."""
    first, stop = int(crop[0].start), int(crop[0].stop)

    def take(start: int, values: torch.Tensor) -> None:
        lo, hi = max(start, first), min(start + values.shape[1], stop)
        if hi > lo:
            sink(lo - first, values[:, lo - start : hi - start, crop[1], crop[2]])

    return take


def argmax_classes(scores: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Argmax over the class axis (first) as a running maximum: one contiguous pass per class, about 4x
    faster than ``torch.argmax(dim=0)`` on the CPU; ties go to the lower class, as argmax does."""
    return argmax_over_chunks([scores], dtype)


def argmax_over_chunks(chunks: Iterable[torch.Tensor], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """:func:`argmax_classes` over classes that arrive in consecutive chunks ``(K_i, *S)``, so that all ``K``
    never need to be in memory at once (e.g. resampled onto the source grid a few classes at a time)."""
    best: torch.Tensor | None = None
    labels = better = None
    k = 0
    for chunk in chunks:
        for scores in chunk:
            if best is None:
                best = scores.float().clone()
                labels = torch.zeros(best.shape, dtype=dtype, device=best.device)
                better = torch.empty(best.shape, dtype=torch.bool, device=best.device)
            else:
                assert labels is not None and better is not None
                candidate = scores.float()
                torch.gt(candidate, best, out=better)
                labels.masked_fill_(better, k)
                torch.maximum(best, candidate, out=best)
            k += 1
    if labels is None:
        raise ValueError("no classes to take the argmax of")
    return labels


def softmax_classes(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (first) in contiguous per-class passes; returns a new float32 tensor."""
    peak = scores[0].float().clone()
    for k in range(1, scores.shape[0]):
        torch.maximum(peak, scores[k].float(), out=peak)
    out = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    total = torch.zeros_like(peak)
    for k in range(scores.shape[0]):
        torch.sub(scores[k].float(), peak, out=out[k])
        out[k].exp_()
        total += out[k]
    total.reciprocal_()
    for k in range(scores.shape[0]):
        out[k].mul_(total)
    return out


class _Stitcher:
    """Accumulates weighted window outputs; streams finished slabs to labels when the plan says so."""

    def __init__(self, plan: StitchPlan, size: tuple[int, ...], roi: tuple[int, int, int], weights: torch.Tensor,
                 slices: list[tuple[slice, ...]], device: torch.device, key: tuple,
                 sink: SlabSink | None = None) -> None:
        self.plan, self.size, self.roi, self.slices, self.key, self.sink = plan, size, roi, slices, key, sink
        dtype = torch.float16 if plan.accumulate_dtype == "float16" else torch.float32
        self.weights = weights.to(device=plan.device)
        # float16 labels: each window's logits minus their per-voxel class maximum (a per-voxel offset that is
        # the same for every class cannot change the argmax of the sum), so the values that decide the
        # argmax sit near zero where float16 is most precise; weights scaled out of the subnormal range.
        self.centre = dtype == torch.float16 and plan.output == "labels"
        self.scratch: dict[str, torch.Tensor] = {}
        if self.centre:
            self.weights = self.weights * FLOAT16_WEIGHT_SCALE
        self.accumulator = _THREAD.pool.zeros(plan.accumulator_shape, dtype, torch.device(plan.device))
        classes = plan.accumulator_shape[0]
        self.labels = None
        if plan.output == "labels":
            self.labels = torch.empty((1, *size), dtype=label_dtype(classes),
                                      device=plan.device)
        self.lo = 0  # first slice (axis 0) not yet finalised; the slab buffer starts there
        self.cupy = plan.kernels == "cupy" and self.accumulator.device.type == "cuda"

    def add(self, window: tuple[slice, ...], logits: torch.Tensor) -> None:
        z, y, x = window
        if self.plan.slab_streaming and z.start > self.lo:
            # Windows come ordered by their start along axis 0: everything before this one is complete.
            self._finalise(int(z.start))
        offset = z.start - self.lo if self.plan.slab_streaming else z.start
        target = self.accumulator[:, offset : offset + (z.stop - z.start), y, x]
        if self.cupy and logits.device == target.device:
            cuda_kernels.accumulate(target, logits, self.weights, centre=self.centre)
            return
        logits = logits.to(device=target.device, dtype=torch.float32)
        if not self.centre:
            target.addcmul_(logits, self.weights)
            return
        peak = self._buffer("peak", logits.shape[1:], target.device)
        peak.copy_(logits[0])
        for k in range(1, logits.shape[0]):
            torch.maximum(peak, logits[k], out=peak)
        # one class at a time through a roi-sized float32 row: never modify the predictor's own output, and
        # no class-by-roi scratch (105 classes x 96^3 would be 370 MB); CPU float16 arithmetic is slow, so add
        # in float32 and store float16
        row = self._buffer("row", logits.shape[1:], target.device)
        for k in range(logits.shape[0]):
            torch.sub(logits[k], peak, out=row).mul_(self.weights)
            row.add_(target[k])
            target[k].copy_(row)

    def _buffer(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        buffer = self.scratch.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = self.scratch[name] = torch.empty(shape, dtype=torch.float32, device=device)
        return buffer

    def _finalise(self, end: int) -> None:
        depth = end - self.lo
        if self.sink is not None:
            self.sink(self.lo, self._normalised(self.accumulator[:, :depth], self.lo, end))
        else:
            assert self.labels is not None
            self._argmax(self.accumulator[:, :depth], self.labels[0, self.lo : end])
        keep = self.accumulator.shape[1] - depth
        for index in range(keep):  # shift in place, front to back, so no source slice is overwritten early
            self.accumulator[:, index].copy_(self.accumulator[:, index + depth])
        self.accumulator[:, keep:].zero_()
        self.lo = end

    def _argmax(self, scores: torch.Tensor, out: torch.Tensor) -> None:
        if self.cupy:
            cuda_kernels.argmax(scores, out)
        else:
            out.copy_(argmax_classes(scores, out.dtype))

    def _normalised(self, accumulated: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Blended values of planes ``lo:hi`` (softmax for probabilities), a fresh float32 tensor."""
        total = _weight_sum(self.size, self.slices, self.weights, self.key)[lo:hi]
        if self.cupy:
            out = torch.empty(accumulated.shape, dtype=torch.float32, device=accumulated.device)
            cuda_kernels.normalise(accumulated.contiguous(), total, out, softmax=self.plan.output == "probabilities")
            return out
        blended = accumulated.float().div_(total)
        # a fresh tensor either way: the accumulator goes back to the pool
        return softmax_classes(blended) if self.plan.output == "probabilities" else blended.clone()

    def finish(self) -> torch.Tensor:
        if self.sink is not None:
            if self.plan.slab_streaming:
                self._finalise(self.size[0])
            else:
                self.sink(0, self._normalised(self.accumulator, 0, self.size[0]))
            return torch.empty(0)
        if self.plan.output == "labels":
            assert self.labels is not None
            if self.plan.slab_streaming:
                self._finalise(self.size[0])
            else:
                self._argmax(self.accumulator, self.labels[0])
            return self.labels
        return self._normalised(self.accumulator, 0, self.size[0])[None]
