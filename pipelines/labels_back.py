"""Class scores on the model grid -> labels on an axis-aligned target grid, at the speed of memory.

When each voxel axis of the target grid is an axis of the model grid (up to scale and offset: what MONAI's
``Spacing`` makes of the reoriented source, oblique or not), trilinear resampling is separable and its argmax
can be decided cell by cell. A target voxel lies in one cell of the model grid (the box between 8 neighbouring
model voxels); its interpolated score vector is a convex combination of theirs, and a convex combination of
score vectors that all have the same argmax has that argmax (strictly larger stays larger, ties stay ties and go
to the lower class). So the cells whose 8 corners agree hand their label to their run of target voxels (uint8
copies, one axis at a time); only the cells whose corners disagree, the boundaries (a few percent), are
interpolated, separably, over all classes, and their voxels take the argmax of that.

The interpolation is the one MONAI's ``SpatialResample`` (``grid_sample``, bilinear, border padding) does: the
same coordinates, the same weights, summed in another order, so a voxel whose two best classes tie to within
float32 rounding may take the other one (tested: >= 99.99% identical labels; in practice all or a handful).
Everything runs on the device of the scores (CUDA when the model ran there) with torch's threaded kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.inference.sliding_window import argmax_classes


@dataclass(frozen=True)
class AxisMap:
    """Target voxel index ``i`` on axis ``a`` sits at model voxel coordinate ``scale[a] * i + offset[a]``."""

    scale: tuple[float, float, float]
    offset: tuple[float, float, float]


def axis_aligned_map(model_affine: np.ndarray, target_affine: np.ndarray, tolerance: float = 1e-6) -> AxisMap | None:
    """The per-axis map from target voxels to model voxels, or None when the grids' axes are not aligned."""
    voxel_to_voxel = np.linalg.inv(np.asarray(model_affine, dtype=np.float64)) @ np.asarray(target_affine, np.float64)
    linear = voxel_to_voxel[:3, :3]
    diagonal = np.diag(linear)
    if np.abs(linear - np.diag(diagonal)).max() > tolerance * max(float(np.abs(diagonal).max()), 1.0):
        return None
    if diagonal.min() <= 0:  # an axis running against the model's: not what Orientation + Spacing make
        return None
    offset = voxel_to_voxel[:3, 3]
    return AxisMap((float(diagonal[0]), float(diagonal[1]), float(diagonal[2])),
                   (float(offset[0]), float(offset[1]), float(offset[2])))


@dataclass(frozen=True)
class _Axis:
    """One target axis against the model axis it lies on: per model cell, its run of target indices."""

    weight: torch.Tensor  # float32, per target index: the weight of the cell's second model voxel
    start: torch.Tensor  # int64, per cell: its first target index
    count: torch.Tensor  # int64, per cell: how many target indices it holds (0 when the target skips it)
    model_size: int

    @property
    def cells(self) -> int:
        return int(self.count.shape[0])


def _axis(size: int, model_size: int, scale: float, offset: float, device: torch.device) -> _Axis:
    coordinate = np.clip(np.arange(size, dtype=np.float64) * scale + offset, 0.0, model_size - 1.0)  # border padding
    low = np.minimum(np.floor(coordinate), max(model_size - 2, 0)).astype(np.int64)  # monotone: scale > 0
    weight = (coordinate - low).astype(np.float32)
    count = np.bincount(low, minlength=max(model_size - 1, 1))
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    weights, starts, counts = (torch.from_numpy(a).to(device) for a in (weight, start, count))
    return _Axis(weights, starts, counts, model_size)


def _corner_extremes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model cell (2x2x2 neighbours; 1 wide on a one-voxel axis), the smallest and largest label."""
    low = high = labels
    for axis in range(3):
        if labels.shape[axis] > 1:
            n = low.shape[axis] - 1
            low = torch.minimum(low.narrow(axis, 0, n), low.narrow(axis, 1, n))
            high = torch.maximum(high.narrow(axis, 0, n), high.narrow(axis, 1, n))
    return low, high


def labels_on_target(scores: torch.Tensor, mapping: AxisMap, target_shape: tuple[int, int, int],
                     dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The argmax over classes of ``scores`` ``(K, *model)`` resampled trilinearly (border padding) onto the
    target grid ``target_shape`` that ``mapping`` places on the model grid (positive scales); ``(*target_shape)``
    labels on the scores' device."""
    slabs = SlabLabels(mapping, tuple(int(s) for s in scores.shape[1:]), target_shape, scores.device, dtype)
    slabs.add(0, scores)
    return slabs.finish()


class SlabLabels:
    """:func:`labels_on_target` fed the scores in consecutive slabs along the first model axis (as the
    sliding-window engine finishes them), so that the scores are never held whole: each slab labels the target
    voxels whose cells it completes (a cell needs its two model planes; the last plane is carried over)."""

    def __init__(self, mapping: AxisMap, model_shape: tuple[int, ...], target_shape: tuple[int, int, int],
                 device: torch.device, dtype: torch.dtype = torch.uint8) -> None:
        if min(mapping.scale) <= 0:
            raise ValueError(f"target axes run against the model's (scales {mapping.scale})")
        self.axes = [_axis(n, int(m), s, o, device)
                     for n, m, s, o in zip(target_shape, model_shape, mapping.scale, mapping.offset, strict=True)]
        self.labels = torch.empty(target_shape, dtype=dtype, device=device)
        self.model_depth = int(model_shape[0])
        self.carry: torch.Tensor | None = None  # the last plane received, for the cell it shares with the next
        self.next_cell = 0

    def add(self, start: int, scores: torch.Tensor) -> None:
        """Model planes ``start : start + depth`` of the scores ``(K, depth, *model[1:])``."""
        if start != self.next_cell + (0 if self.carry is None else 1):
            raise ValueError(f"slab at plane {start}, expected {self.next_cell + (self.carry is not None)}")
        planes = scores if self.carry is None else torch.cat([self.carry, scores], dim=1)
        done = self.next_cell + planes.shape[1] - 1 if self.model_depth > 1 else 1  # cells now complete
        if done > self.next_cell:
            self._label_cells(planes, self.next_cell, done)
        self.carry = scores[:, -1:].clone()
        self.next_cell = done

    def finish(self) -> torch.Tensor:
        if self.next_cell != self.axes[0].cells:
            raise ValueError(f"{self.next_cell} of {self.axes[0].cells} cells along the first axis labelled")
        return self.labels

    def _label_cells(self, planes: torch.Tensor, first: int, stop: int) -> None:
        """Cells ``first:stop`` along the first axis from ``planes`` (model planes ``first : stop + 1``)."""
        whole = self.axes[0]
        low = int(whole.start[first])
        high = int(whole.start[stop - 1] + whole.count[stop - 1])
        if high == low:
            return
        sub = _Axis(whole.weight[low:high], whole.start[first:stop] - low, whole.count[first:stop], planes.shape[1])
        axes = [sub, *self.axes[1:]]
        lowest, highest = _corner_extremes(argmax_classes(planes, self.labels.dtype))
        labels = lowest  # right wherever a cell's corners agree; the boundary cells are overwritten below
        for axis in (2, 1, 0):  # each cell's label over its run of target voxels: smallest intermediate first
            labels = torch.repeat_interleave(labels, axes[axis].count, dim=axis)
        boundary = torch.nonzero(lowest != highest)
        step = max(1, (1 << 24) // (planes.shape[0] * math.prod(max(int(a.count.max()), 1) for a in axes)))
        for begin in range(0, boundary.shape[0], step):
            _interpolate_cells(labels, planes, axes, boundary[begin : begin + step])
        self.labels[low:high] = labels


def _interpolate_cells(labels: torch.Tensor, scores: torch.Tensor, axes: list[_Axis], cells: torch.Tensor) -> None:
    """Label every target voxel of ``cells`` ``(n, 3)`` in place: each class interpolated separably from the
    cell's 8 corners (along x, then y, then z), then the argmax (ties to the lower class)."""
    corner = [torch.stack([cells[:, a], torch.clamp(cells[:, a] + 1, max=axes[a].model_size - 1)], 1)
              for a in range(3)]  # (n, 2) model indices per axis
    values = scores[:, corner[0][:, :, None, None], corner[1][:, None, :, None], corner[2][:, None, None, :]]
    index, inside, weight = [], [], []  # per axis (n, block): target indices, which are the cell's, their weights
    for a in range(3):
        offsets = torch.arange(int(axes[a].count.max()), device=cells.device)
        inside.append(offsets[None] < axes[a].count[cells[:, a]][:, None])
        index.append(torch.clamp(axes[a].start[cells[:, a]][:, None] + offsets[None], max=axes[a].weight.shape[0] - 1))
        weight.append(axes[a].weight[index[a]])
    # values (K, n, 2, 2, 2) -> (K, n, 2, 2, bx) -> (K, n, 2, by, bx) -> (K, n, bz, by, bx)
    values = torch.lerp(values[..., :1], values[..., 1:], weight[2][None, :, None, None, :])
    values = torch.lerp(values[:, :, :, :1], values[:, :, :, 1:], weight[1][None, :, None, :, None])
    values = torch.lerp(values[:, :, :1], values[:, :, 1:], weight[0][None, :, :, None, None])
    winners = argmax_classes(values, labels.dtype)  # (n, bz, by, bx)
    n1, n2 = labels.shape[1], labels.shape[2]
    flat = index[0][:, :, None, None] * (n1 * n2) + index[1][:, None, :, None] * n2 + index[2][:, None, None, :]
    valid = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
    labels.view(-1)[flat[valid]] = winners[valid]
