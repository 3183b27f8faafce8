"""``tessera convert``: a DICOM study to one NIfTI + JSON sidecar per volume, refusals listed with codes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pipelines.errors import InputError
from pipelines.ingestion.dicom.reader import load_volume, read_study, volume_name
from pipelines.ingestion.dicom.selection import select_series
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.volume import Volume

log = logging.getLogger(__name__)


@dataclass
class ConversionOutcome:
    written: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    selected_refused: bool = False


def volume_image(volume: Volume) -> nib.Nifti1Image:
    """NIfTI with qform = sform = the volume's affine (code 1, scanner); int16 when lossless, else float32."""
    array = volume.array
    integral = np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767
    image = nib.Nifti1Image(array.astype(np.int16 if integral else np.float32), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _refusal(candidate: VolumeCandidate, error: InputError) -> dict[str, Any]:
    return {"series": candidate.label, "series_instance_uid": candidate.series_uid,
            "series_number": candidate.series_number, "codes": list(getattr(error, "codes", [error.code])),
            "message": error.message}


def _selected(candidates: list[VolumeCandidate], all_series: bool, series: str | None,
              modality: str | None) -> tuple[list[VolumeCandidate], dict[int, str], bool]:
    """The volumes to write, why each was chosen, and whether a selected volume was refused."""
    if all_series:
        return candidates, {id(c): "--all-series" for c in candidates}, any(not c.ok for c in candidates)
    if series:
        matches = [c for c in candidates if c.series_uid == series or str(c.series_number) == series]
        if not matches:
            raise InputError("SERIES_NOT_FOUND", f"no series with UID or number '{series}' in the study")
        return matches, {id(c): "requested with --series" for c in matches}, any(not c.ok for c in matches)
    selection = select_series(candidates, modality=modality)
    return [selection.chosen], {id(selection.chosen): selection.reason}, False


def convert_study(
    source: Path,
    out_dir: Path,
    *,
    all_series: bool = False,
    series: str | None = None,
    modality: str | None = None,
    tilt: str = "refuse",
    min_slices: int = 3,
) -> ConversionOutcome:
    study = read_study(source, tilt=tilt, min_slices=min_slices)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcome = ConversionOutcome(set_aside=[{"series_number": s.series_number, "description": s.series_description,
                                            "reason": s.reason, "images": s.images} for s in study.set_aside])
    try:
        selected, reasons, outcome.selected_refused = _selected(study.candidates, all_series, series, modality)
    except InputError as exc:
        selected, reasons, outcome.selected_refused = [], {}, True
        outcome.refused.append({"series": "study", "codes": [exc.code], "message": exc.message})
    for candidate in study.candidates:
        if not candidate.ok:
            assert candidate.error is not None
            outcome.refused.append(_refusal(candidate, candidate.error))
    for candidate in selected:
        if not candidate.ok:
            continue
        name = volume_name(candidate)
        try:
            volume = load_volume(candidate, case_id=name)
        except InputError as exc:
            outcome.refused.append(_refusal(candidate, exc))
            outcome.selected_refused = True
            continue
        nib.save(volume_image(volume), out_dir / f"{name}.nii.gz")
        sidecar = {**volume.metadata.extra, "SelectionReason": reasons[id(candidate)]}
        (out_dir / f"{name}.json").write_text(json.dumps(sidecar, indent=2) + "\n")
        outcome.written.append({"file": f"{name}.nii.gz", "reason": reasons[id(candidate)]})
    summary = {"source": source.name, "written": outcome.written, "refused": outcome.refused,
               "set_aside": outcome.set_aside, "skipped_files": len(study.skipped_files)}
    (out_dir / "conversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    return outcome
