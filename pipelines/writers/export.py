"""``tessera export-seg``: a mask made anywhere, on a source series' grid, becomes a DICOM-SEG."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from models.manifest import Label
from pipelines.errors import InputError
from pipelines.ingestion.dicom.reader import read_study
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.writers.seg import OutputError, SegAlgorithm, write_dicom_seg

log = logging.getLogger(__name__)
GRID_TOLERANCE_MM = 0.05


def read_label_table(path: Path | None, values: list[int]) -> list[Label]:
    """Labels from a Tessera labels.json, an MSD dataset.json, or ``label_N`` names for the mask's values."""
    names: dict[int, str] = {}
    if path is not None:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError("LABELS_INVALID", f"{path.name}: not a readable labels JSON ({exc})") from exc
        table = data.get("labels", data) if isinstance(data, dict) else {}
        names = {int(k): str(v) for k, v in table.items() if str(k).isdigit() and int(k) != 0}
        details = {int(d["value"]): d for d in data.get("details", [])} if isinstance(data, dict) else {}
    else:
        details = {}
    labels = []
    for value in values:
        detail = details.get(value, {})
        color = tuple(detail["color"]) if detail.get("color") else None
        labels.append(Label(value, names.get(value, f"label_{value}"), color, detail.get("code")))  # type: ignore[arg-type]
    return labels


def mask_on_stack(mask: nib.Nifti1Image, candidate: VolumeCandidate) -> np.ndarray | None:
    """The mask's labels on ``candidate``'s ``[column, row, slice]`` grid, or None if the grids differ."""
    assert candidate.geometry is not None
    target_affine, target_shape = candidate.geometry.affine, candidate.geometry.shape
    transform = orientations.ornt_transform(orientations.io_orientation(mask.affine),
                                            orientations.io_orientation(target_affine))
    moved = mask.as_reoriented(transform)
    if moved.shape[:3] != target_shape:
        return None
    if np.abs(moved.affine - target_affine).max() > GRID_TOLERANCE_MM:
        return None
    return np.rint(np.asarray(moved.dataobj)).astype(np.int32).reshape(target_shape)


def export_seg(mask_path: Path, source: Path, out_path: Path, *, labels_path: Path | None = None,
               series: str | None = None, algorithm: SegAlgorithm | None = None) -> Path:
    try:
        mask = nib.load(str(mask_path))
        assert isinstance(mask, (nib.Nifti1Image, nib.Nifti2Image))
    except Exception as exc:
        raise InputError("NIFTI_UNREADABLE", f"{mask_path.name}: not a readable NIfTI mask ({exc})") from exc
    study = read_study(source)
    candidates = [c for c in study.volumes if series is None or series in (c.series_uid, str(c.series_number))]
    for candidate in candidates:
        labels = mask_on_stack(mask, candidate)  # type: ignore[arg-type]
        if labels is None:
            continue
        values = sorted(int(v) for v in np.unique(labels) if v > 0)
        if not values:
            raise InputError("MASK_EMPTY", f"{mask_path.name} has no labelled voxels")
        table = read_label_table(labels_path, values)
        log.info("mask matches %s; writing %d segment(s)", candidate.label, len(table))
        return write_dicom_seg(labels, candidate, table, algorithm or SegAlgorithm("external", "unknown"), out_path)
    grids = ", ".join(f"{c.label} {c.geometry.shape}" for c in candidates if c.geometry) or "none"
    raise OutputError("SEG_GRID_MISMATCH", f"{mask_path.name} (shape {mask.shape[:3]}) lies on no series of the "
                                           f"source (usable series: {grids}); resample it onto the series first")
