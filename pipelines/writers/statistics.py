"""Per-label statistics of a segmentation: volumes, intensities, centroids and bounding boxes.

Everything is computed in one streamed pass over the mask (slabs of a few million voxels), with
``np.bincount`` on a compact label index: a 512 x 512 x 400 mask with 100 labels costs about as much as
100 labels as one, and never one boolean mask per label. Centroids and bounding boxes come from the
per-axis marginal counts of each label, which the same pass accumulates.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import UsageError
from pipelines.volume import Volume

logger = logging.getLogger(__name__)

Triple = tuple[float, float, float]
IndexTriple = tuple[int, int, int]

SLAB_VOXELS = 1 << 22  # voxels per streamed slab: bounds the temporaries to some tens of MB
LOOKUP_MAX_SPAN = 1 << 24  # label values spanning more than this are matched by sorted search instead


@dataclass(frozen=True)
class LabelStatistics:
    """One label of a mask measured on its source grid. Values are None where the label is empty.

    ``intensity_*`` are in the source image's units (HU for CT); ``intensity_std`` is the population
    standard deviation. ``centroid_ras_mm`` is in the volume's RAS+ world frame (NIfTI), ``centroid_lps_mm``
    the same point in DICOM patient coordinates. ``bbox_min``/``bbox_max`` are inclusive voxel indices
    ``(i, j, k)`` of the stored array; ``bbox_size_mm`` is the box's extent along those voxel axes.
    ``spacing_mm`` and ``voxel_volume_ml`` describe the grid (the same for every label of one mask).
    """

    value: int
    name: str
    voxel_count: int
    volume_ml: float
    intensity_mean: float | None
    intensity_std: float | None
    intensity_min: float | None
    intensity_max: float | None
    centroid_ras_mm: Triple | None
    centroid_lps_mm: Triple | None
    bbox_min: IndexTriple | None
    bbox_max: IndexTriple | None
    bbox_size_mm: Triple | None
    spacing_mm: Triple
    voxel_volume_ml: float


@dataclass
class _Sums:
    """Running per-label sums; index 0 collects voxels of values not asked for."""

    marginals: list[np.ndarray]  # per axis: (axis length, n + 1) voxel counts
    intensity_sum: np.ndarray
    intensity_sum_sq: np.ndarray
    intensity_min: np.ndarray
    intensity_max: np.ndarray

    @classmethod
    def empty(cls, shape: Sequence[int], n_bins: int) -> _Sums:
        return cls(
            marginals=[np.zeros((length, n_bins), dtype=np.int64) for length in shape],
            intensity_sum=np.zeros(n_bins),
            intensity_sum_sq=np.zeros(n_bins),
            intensity_min=np.full(n_bins, np.inf),
            intensity_max=np.full(n_bins, -np.inf),
        )


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel in millilitres: |det| of the affine's linear part (mm^3) / 1000."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


def label_statistics(labels: np.ndarray, volume: Volume, names: Mapping[int, str]) -> list[LabelStatistics]:
    """Statistics for every label value in ``names`` (in sorted order), also for values absent from ``labels``."""
    labels = _spatial(labels, volume.spatial_shape, "labels")
    image = _spatial(volume.array, volume.spatial_shape, "image")
    values = np.array(sorted(int(v) for v in names), dtype=np.int64)
    if values.size == 0:
        return []
    sums = _accumulate(labels, image, values)
    stats = _summarise(sums, values, names, volume.affine)
    logger.debug("statistics of %d labels on a %s grid", len(stats), "x".join(map(str, labels.shape)))
    return stats


def _spatial(array: np.ndarray, shape: tuple[int, int, int], what: str) -> np.ndarray:
    """The 3-D array on ``shape``: channel 0 of a channel-first 4-D array, a 3-D array as it is."""
    array = np.asarray(array)
    if array.ndim == 4:
        array = array[0]
    if array.shape != shape:
        raise UsageError("STATISTICS_GRID_MISMATCH", f"{what} shape {array.shape} does not match the grid {shape}")
    return array


def _memory_order(array: np.ndarray) -> tuple[int, ...]:
    """Axes from the slowest to the fastest in memory, so that slabs along the first are contiguous."""
    return tuple(int(a) for a in np.argsort([-abs(s) for s in array.strides], kind="stable"))


def _accumulate(labels: np.ndarray, image: np.ndarray, values: np.ndarray) -> _Sums:
    order = _memory_order(labels)
    labels_view = labels.transpose(order)
    image_view = image.transpose(order)
    sums = _Sums.empty(labels_view.shape, values.size + 1)
    lookup = _Lookup(values, labels.dtype)
    for start, stop in _slabs(labels_view.shape):
        _add_slab(sums, lookup(labels_view[start:stop]), image_view[start:stop], start)
    inverse = np.argsort(order)
    sums.marginals = [sums.marginals[int(a)] for a in inverse]  # back to the (i, j, k) axes of the volume
    return sums


def _slabs(shape: Sequence[int]) -> Iterator[tuple[int, int]]:
    per_slice = max(1, int(np.prod(shape[1:])))
    step = max(1, SLAB_VOXELS // per_slice)
    for start in range(0, shape[0], step):
        yield start, min(start + step, shape[0])


class _Lookup:
    """Maps label values to a compact index: 1 + the position in the sorted ``values``, 0 if not among them."""

    def __init__(self, values: np.ndarray, dtype: np.dtype) -> None:
        self.values = values
        self.small_int = dtype.kind in "ui" and dtype.itemsize <= 2
        if self.small_int:
            # Index the table with the raw bits: int8/int16 values seen as unsigned wrap to the table's top half.
            info = np.iinfo(dtype)
            inside = (values >= info.min) & (values <= info.max)
            self.unsigned = np.dtype(f"u{dtype.itemsize}")
            self.table = np.zeros(1 << (8 * dtype.itemsize), dtype=np.intp)
            self.table[values[inside] % self.table.size] = np.flatnonzero(inside) + 1
        else:
            self.lo, self.hi = int(values[0]), int(values[-1])
            self.dense = self.hi - self.lo <= LOOKUP_MAX_SPAN
            self.table = np.zeros(self.hi - self.lo + 3 if self.dense else 0, dtype=np.intp)
            if self.dense:  # one spare bin either side for values out of range
                self.table[values - self.lo + 1] = np.arange(1, values.size + 1)

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        if self.small_int:
            return self.table[labels.view(self.unsigned)]
        whole = np.rint(labels).astype(np.int64) if labels.dtype.kind == "f" else labels.astype(np.int64)
        if self.dense:
            np.clip(whole, self.lo - 1, self.hi + 1, out=whole)
            whole -= self.lo - 1
            return self.table[whole]
        position = np.clip(np.searchsorted(self.values, whole), 0, self.values.size - 1)
        return np.where(self.values[position] == whole, position + 1, 0).astype(np.intp)


def _add_slab(sums: _Sums, index: np.ndarray, image: np.ndarray, start: int) -> None:
    """Accumulate the labelled voxels of one slab: marginal counts along each axis and intensity sums."""
    depth, rows, columns = index.shape
    n_bins = sums.intensity_sum.size
    flat = index.ravel()
    where = np.flatnonzero(flat)
    if where.size == 0:
        return
    bins = flat[where]
    slice_row, column = np.divmod(where, columns)
    counts = np.bincount(slice_row * n_bins + bins, minlength=depth * rows * n_bins).reshape(depth, rows, n_bins)
    sums.marginals[0][start : start + depth] += counts.sum(axis=1)
    sums.marginals[1] += counts.sum(axis=0)
    sums.marginals[2] += np.bincount(column * n_bins + bins, minlength=columns * n_bins).reshape(columns, n_bins)
    intensity = image.reshape(-1)[where].astype(np.float64)
    sums.intensity_sum += np.bincount(bins, weights=intensity, minlength=n_bins)
    sums.intensity_sum_sq += np.bincount(bins, weights=intensity * intensity, minlength=n_bins)
    np.minimum.at(sums.intensity_min, bins, intensity)
    np.maximum.at(sums.intensity_max, bins, intensity)


def _summarise(sums: _Sums, values: np.ndarray, names: Mapping[int, str], affine: np.ndarray) -> list[LabelStatistics]:
    affine = np.asarray(affine, dtype=float)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    voxel_ml = voxel_volume_ml(affine)
    counts = sums.marginals[0].sum(axis=0)
    stats = []
    for position, value in enumerate(values.tolist(), start=1):
        count = int(counts[position])
        common: dict[str, Any] = {"value": value, "name": names[value], "voxel_count": count,
                                  "volume_ml": count * voxel_ml, "spacing_mm": spacing, "voxel_volume_ml": voxel_ml}
        if count == 0:
            stats.append(LabelStatistics(**common, **_EMPTY))
            continue
        stats.append(LabelStatistics(**common, **_intensity(sums, position, count),
                                     **_geometry(sums.marginals, position, count, affine, spacing)))
    return stats


_EMPTY: dict[str, Any] = {
    "intensity_mean": None, "intensity_std": None, "intensity_min": None, "intensity_max": None,
    "centroid_ras_mm": None, "centroid_lps_mm": None, "bbox_min": None, "bbox_max": None, "bbox_size_mm": None,
}


def _intensity(sums: _Sums, position: int, count: int) -> dict[str, Any]:
    mean = sums.intensity_sum[position] / count
    variance = max(sums.intensity_sum_sq[position] / count - mean * mean, 0.0)
    return {"intensity_mean": float(mean), "intensity_std": float(np.sqrt(variance)),
            "intensity_min": float(sums.intensity_min[position]), "intensity_max": float(sums.intensity_max[position])}


def _geometry(
    marginals: list[np.ndarray], position: int, count: int, affine: np.ndarray, spacing: Sequence[float]
) -> dict[str, Any]:
    centroid_index = np.empty(3)
    low, high = [0, 0, 0], [0, 0, 0]
    for axis, marginal in enumerate(marginals):
        along = marginal[:, position]
        centroid_index[axis] = float(np.dot(np.arange(along.size, dtype=float), along)) / count
        present = np.flatnonzero(along)
        low[axis], high[axis] = int(present[0]), int(present[-1])
    ras = affine[:3, :3] @ centroid_index + affine[:3, 3]
    size = tuple(float((high[a] - low[a] + 1) * spacing[a]) for a in range(3))
    return {
        "centroid_ras_mm": _triple(ras),
        "centroid_lps_mm": _triple(ras * np.array([-1.0, -1.0, 1.0])),
        "bbox_min": (low[0], low[1], low[2]),
        "bbox_max": (high[0], high[1], high[2]),
        "bbox_size_mm": size,
    }


def _triple(vector: np.ndarray) -> Triple:
    return (float(vector[0]), float(vector[1]), float(vector[2]))


# --- writing ------------------------------------------------------------------------------------------

_AXES = {"centroid_ras_mm": ("centroid_ras_{}_mm", "xyz"), "centroid_lps_mm": ("centroid_lps_{}_mm", "xyz"),
         "bbox_min": ("bbox_min_{}", "ijk"), "bbox_max": ("bbox_max_{}", "ijk"),
         "bbox_size_mm": ("bbox_size_{}_mm", "ijk")}
_LABEL_FIELDS = ("value", "name", "voxel_count", "volume_ml", "intensity_mean", "intensity_std", "intensity_min",
                 "intensity_max", "centroid_ras_mm", "centroid_lps_mm", "bbox_min", "bbox_max", "bbox_size_mm")


def statistics_header(stats: Sequence[LabelStatistics]) -> dict[str, Any]:
    """The grid and units shared by all labels of one mask."""
    grids = {(s.spacing_mm, s.voxel_volume_ml) for s in stats}
    if len(grids) > 1:
        raise UsageError("STATISTICS_MIXED_GRIDS", "the statistics come from masks on different grids")
    spacing, voxel_ml = grids.pop() if grids else (None, None)
    return {
        "units": {"volume": "ml", "centroid": "mm", "bbox_size": "mm", "bbox": "voxel index (i, j, k), inclusive",
                  "intensity": "source image units (HU for CT)"},
        "coordinates": {"centroid_ras_mm": "RAS+ (NIfTI world)", "centroid_lps_mm": "LPS (DICOM patient)"},
        "spacing_mm": list(spacing) if spacing else None,
        "voxel_volume_ml": voxel_ml,
        "voxel_volume_mm3": voxel_ml * 1000.0 if voxel_ml is not None else None,
    }


def label_record(stat: LabelStatistics) -> dict[str, Any]:
    """One label as a JSON-ready dict (triples as lists, None kept)."""
    return {name: _plain(getattr(stat, name)) for name in _LABEL_FIELDS}


def flat_record(stat: LabelStatistics) -> dict[str, Any]:
    """One label as a flat row: each triple in three columns, e.g. ``centroid_ras_x_mm``."""
    row: dict[str, Any] = {}
    for name in _LABEL_FIELDS:
        value = getattr(stat, name)
        if name in _AXES:
            pattern, axes = _AXES[name]
            row.update({pattern.format(a): (value[n] if value is not None else None) for n, a in enumerate(axes)})
        else:
            row[name] = value
    return row


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def write_statistics(
    stats: Sequence[LabelStatistics], json_path: str | Path, csv_path: str | Path,
    extra: Mapping[int, Mapping[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """``json_path``: a header (units, spacing, voxel volume) and one record per label; ``csv_path``: flat rows.
    ``extra``: more fields per label value (e.g. ``uncertainty_mean`` from a sampling family)."""
    json_path, csv_path = Path(json_path), Path(csv_path)
    more = extra or {}
    document = {**statistics_header(stats), "labels": [{**label_record(s), **more.get(s.value, {})} for s in stats]}
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    rows = [{**flat_record(s), **more.get(s.value, {})} for s in stats]
    columns = list(rows[0]) if rows else list(flat_record(_placeholder()))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    logger.info("wrote statistics of %d labels to %s and %s", len(stats), json_path.name, csv_path.name)
    return json_path, csv_path


def _placeholder() -> LabelStatistics:
    return LabelStatistics(value=0, name="", voxel_count=0, volume_ml=0.0, spacing_mm=(0.0, 0.0, 0.0),
                           voxel_volume_ml=0.0, **_EMPTY)


def uncertainty_by_label(labels: np.ndarray, spread: np.ndarray, values: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per label value v, the mean of ``spread[v - 1]`` (that class's across-member standard deviation) over the
    label's voxels; None where the label is empty."""
    result: dict[int, dict[str, Any]] = {}
    for value in values:
        inside = labels == value
        mean = float(spread[value - 1][inside].mean()) if inside.any() else None
        result[value] = {"uncertainty_mean": None if mean is None else round(mean, 6)}
    return result
