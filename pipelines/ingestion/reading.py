"""One entry for every face: a case's input (NIfTI files, a DICOM folder, zip or file) to a model-ready Volume.

For multi-channel models the first channel is the reference grid; every other channel is resampled onto
it in world coordinates (MONAI ``SpatialResample``), and the report records each channel's role.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from models.manifest import Channel
from pipelines.errors import InputError
from pipelines.ingestion.dicom.reader import is_dicom_input, load_volume, read_study
from pipelines.ingestion.dicom.selection import select_series
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.ingestion.nifti import is_nifti, read_nifti
from pipelines.volume import Volume, VolumeMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadOptions:
    series: str | None = None  # SeriesInstanceUID or SeriesNumber to use instead of the rules' choice
    tilt: str = "refuse"
    min_slices: int = 3


@dataclass
class CaseVolume:
    volume: Volume
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    dicom_source: VolumeCandidate | None = None  # the series the reference grid came from (for DICOM-SEG)


def _read_one(path: Path, channel: Channel, options: ReadOptions, case_id: str) -> CaseVolume:
    if is_nifti(path):
        volume = read_nifti(path, modality=channel.modality)
        return CaseVolume(volume, {"role": channel.name, "format": "nifti", "file": path.name})
    if not is_dicom_input(path):
        raise InputError("UNSUPPORTED_INPUT",
                         f"{path.name}: neither NIfTI (.nii, .nii.gz) nor DICOM (folder, zip, file)")
    study = read_study(path, tilt=options.tilt, min_slices=options.min_slices)
    if study.patients > 1:
        raise InputError("MIXED_PATIENTS", f"{path.name}: holds images of {study.patients} patients; one case is "
                                           "one patient (give one study per case, or split the folder by patient)")
    selection = select_series(study.candidates, modality=channel.modality, override=options.series)
    chosen = selection.chosen
    if channel.modality.upper() not in ("", "UNKNOWN", "ANY") and chosen.modality.upper() != channel.modality.upper():
        raise InputError("MODALITY_MISMATCH", f"the model's '{channel.name}' channel needs {channel.modality}, the "
                                              f"study's best volume is {chosen.modality} ({chosen.label})")
    volume = load_volume(chosen, case_id=case_id)
    provenance = {
        "role": channel.name,
        "format": "dicom",
        "series_instance_uid": chosen.series_uid,
        "series_number": chosen.series_number,
        "series_description": chosen.series_description,
        "modality": chosen.modality,
        "selection_reason": selection.reason,
        "candidates": selection.ranking,
        "refused": [{"series": c.label, "codes": c.codes} for c in study.refused],
        "set_aside": [{"series_number": s.series_number, "reason": s.reason} for s in study.set_aside],
        "skipped_files": len(study.skipped_files),
        "units": volume.metadata.extra.get("Units"),
    }
    return CaseVolume(volume, provenance, list(volume.metadata.extra.get("Warnings", [])), dicom_source=chosen)


def read_case(
    paths: list[Path], channels: tuple[Channel, ...], case_id: str, options: ReadOptions | None = None
) -> CaseVolume:
    """The model input for one case: one path per channel (a DICOM study may serve every channel)."""
    options = options or ReadOptions()
    if len(paths) == 1 and len(channels) > 1 and not is_nifti(paths[0]):
        paths = paths * len(channels)  # one study holds every modality (e.g. PET + CT)
    if len(paths) != len(channels):
        raise InputError("CHANNEL_COUNT_MISMATCH", f"the model takes {len(channels)} channel(s) "
                         f"({', '.join(c.name for c in channels)}), the case has {len(paths)} input(s)")
    parts = [_read_one(path, channel, options, case_id) for path, channel in zip(paths, channels, strict=True)]
    reference = parts[0].volume
    reference.metadata.case_id = case_id
    if len(parts) == 1:
        return CaseVolume(reference, {"channels": [parts[0].provenance]}, parts[0].warnings, parts[0].dicom_source)
    arrays = [reference.array.astype(np.float32)] + [_onto(p.volume, reference) for p in parts[1:]]
    metadata = VolumeMetadata(case_id=case_id, source=reference.metadata.source,
                              modality="+".join(c.modality for c in channels),
                              source_format=reference.metadata.source_format, extra=reference.metadata.extra)
    volume = Volume(np.stack(arrays), reference.affine, metadata, header=reference.header)
    warnings = [w for p in parts for w in p.warnings]
    provenance = {"channels": [p.provenance for p in parts], "reference_grid": channels[0].name}
    return CaseVolume(volume, provenance, warnings, parts[0].dicom_source)


def _onto(moving: Volume, reference: Volume) -> np.ndarray:
    """``moving`` resampled onto ``reference``'s grid (world coordinates, trilinear, edge values outside)."""
    if moving.spatial_shape == reference.spatial_shape and np.allclose(moving.affine, reference.affine, atol=1e-4):
        return moving.array.astype(np.float32)
    image = MetaTensor(torch.from_numpy(np.ascontiguousarray(moving.array, dtype=np.float32))[None],
                       affine=torch.as_tensor(moving.affine))
    resampled = SpatialResample(mode="bilinear", padding_mode="border", dtype=np.float32)(
        image, dst_affine=torch.as_tensor(reference.affine), spatial_size=reference.spatial_shape)
    return np.asarray(torch.as_tensor(resampled)[0], dtype=np.float32)
