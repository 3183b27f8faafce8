"""Read a study: find files, read headers, build and check volume candidates; decode on demand."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from pipelines.errors import InputError
from pipelines.ingestion.dicom.geometry import TILT_TOLERANCE_DEGREES
from pipelines.ingestion.dicom.pixels import decode_volume
from pipelines.ingestion.dicom.series import SetAside, VolumeCandidate, build_candidates
from pipelines.ingestion.dicom.slices import DicomSlice, slices_from_header
from pipelines.ingestion.dicom.sources import DicomFile, iter_sources, looks_like_dicom, read_header
from pipelines.ingestion.suv import suv_inputs_from_dataset, suvbw_factors
from pipelines.limits import check_voxels
from pipelines.processes import collected, forked_pool, mapped
from pipelines.volume import Volume, VolumeMetadata

log = logging.getLogger(__name__)

TILT_POLICIES = ("refuse", "resample")


@dataclass
class DicomStudy:
    root: Path
    candidates: list[VolumeCandidate]
    set_aside: list[SetAside]
    skipped_files: list[str] = field(default_factory=list)

    @property
    def volumes(self) -> list[VolumeCandidate]:
        return [c for c in self.candidates if c.ok]

    @property
    def patients(self) -> int:
        """How many Patient IDs the study's images carry (an empty ID counts as one)."""
        return len({s.patient_id for c in self.candidates for s in c.slices})

    @property
    def refused(self) -> list[VolumeCandidate]:
        return [c for c in self.candidates if not c.ok]


def is_dicom_input(path: Path) -> bool:
    """A zip, a folder with at least one DICOM file in it (recursively), or one DICOM file."""
    if path.is_file():
        return path.suffix.lower() == ".zip" or looks_like_dicom(path)
    if path.is_dir():
        return any(p.is_file() and (p.suffix.lower() == ".zip" or looks_like_dicom(p)) for p in path.rglob("*"))
    return False


def read_study(path: str | Path, *, tilt: str = "refuse", min_slices: int = 3) -> DicomStudy:
    """Headers of every DICOM file under ``path``, grouped and checked; pixels are not decoded yet."""
    if tilt not in TILT_POLICIES:
        raise ValueError(f"tilt must be one of {TILT_POLICIES}, got {tilt!r}")
    root = Path(path)
    if not root.exists():
        raise InputError("INPUT_NOT_FOUND", f"{root.name}: no such file or folder")
    slices: list[DicomSlice] = []
    skipped: list[str] = []
    problems: list[InputError] = []
    for name, found, problem in _read_slices(list(iter_sources(root))):
        if found is None:
            skipped.append(name)
            problems.extend([problem] if problem else [])
        else:
            slices.extend(found)
    if problems:
        log.warning("%s: %d file(s) skipped: %s", root.name, len(problems),
                    ", ".join(sorted({p.code for p in problems})))
    if not slices:
        if problems:  # nothing else was there: the reason the files could not be read is the answer
            raise InputError(problems[0].code, f"{problems[0].message}"
                             + (f" ({len(skipped) - 1} other files skipped)" if len(skipped) > 1 else ""))
        raise InputError("NO_DICOM_IMAGES", f"{root.name}: no readable DICOM images found"
                         + (f" ({len(skipped)} other files skipped)" if skipped else ""))
    candidates, set_aside = build_candidates(slices, tilt=tilt, min_slices=min_slices)
    if skipped:
        log.warning("%s: skipped %d file(s) that are not DICOM", root.name, len(skipped))
    return DicomStudy(root, candidates, set_aside, skipped)


PARALLEL_HEADERS_MIN_FILES = 64
HEADERS_SPAN = (0.0, 0.5)  # of the read stage's progress; decoding pixels is the rest


SlicesOfFile = tuple[str, list[DicomSlice] | None, InputError | None]


def _slices_of(source: DicomFile, light: bool = False) -> SlicesOfFile:
    """One file's slices; ``None`` and the reason (when it has a code) for a file that is skipped alone."""
    try:
        read = read_header(source)
        if read is None:
            return source.name, None, None
        found = list(slices_from_header(read[0], source, read[1]))
    except InputError as exc:
        return source.name, None, exc
    return source.name, [s.light() for s in found] if light else found, None


def _slices_of_light(source: DicomFile) -> SlicesOfFile:
    return _slices_of(source, light=True)


def _read_slices(sources: list[DicomFile]) -> list[SlicesOfFile]:
    """Headers to slices (the first half of the read stage's progress); a large study is read by forked workers
    that send back light slices (parsing and attribute access are GIL-bound, and pydicom headers are slower to
    unpickle than to parse)."""
    workers = min(os.cpu_count() or 1, 8)
    if len(sources) < PARALLEL_HEADERS_MIN_FILES or workers < 2:
        return collected(map(_slices_of, sources), len(sources), HEADERS_SPAN)
    with forked_pool(workers) as pool:
        return mapped(pool, _slices_of_light, sources, total=len(sources), span=HEADERS_SPAN,
                      chunksize=max(1, len(sources) // (workers * 4)))


def load_volume(candidate: VolumeCandidate, case_id: str | None = None) -> Volume:
    """Decode a checked candidate into a :class:`Volume` (RAS+ affine, modality values)."""
    if not candidate.ok or candidate.geometry is None:
        assert candidate.error is not None
        raise candidate.error
    geometry = candidate.geometry
    first = geometry.slices[0]
    check_voxels((first.columns, first.rows, len(geometry.slices)), candidate.label)
    array = decode_volume(geometry.slices)
    affine = geometry.affine
    warnings: list[str] = []
    units = None
    if candidate.modality == "PT":
        array = array.astype(np.float32)
        units, warning = _to_suv(array, geometry.slices)
        warnings.extend([warning] if warning else [])
    if geometry.tilt_degrees > TILT_TOLERANCE_DEGREES:
        array, affine = _resample_tilted(array, affine)
    metadata = VolumeMetadata(
        case_id=case_id or volume_name(candidate),
        source=candidate.label,
        modality=candidate.modality or "unknown",
        source_format="dicom",
        extra={**series_sidecar(candidate, array.shape, affine), "Units": units},
    )
    metadata.extra["Warnings"].extend(warnings)
    log.debug("loaded %s: %s slices, transfer syntax %s", candidate.label, len(geometry.slices), first.transfer_syntax)
    return Volume(array=array, affine=affine, metadata=metadata)


def _to_suv(array: np.ndarray, slices: list[DicomSlice]) -> tuple[str, str | None]:
    """PET values to SUVbw in place (g/mL), one factor per slice; left as stored units when impossible."""
    units = str(slices[0].dataset().get("Units", "unknown"))
    try:
        factors = suvbw_factors([suv_inputs_from_dataset(s.dataset()) for s in slices])
    except InputError as exc:
        return units, f"{exc.code}: PET values left in {units}, no SUV ({exc.message})"
    array *= np.asarray(factors, dtype=np.float32)[None, None, :]
    return "SUVbw g/mL", None


def _resample_tilted(array: np.ndarray, sheared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gantry tilt: resample the sheared stack onto the orthogonal grid through the first slice."""
    in_plane = np.cross(sheared[:3, 0], sheared[:3, 1])
    normal = in_plane / np.linalg.norm(in_plane)
    spacing = float(np.dot(sheared[:3, 2], normal))
    target = sheared.copy()
    target[:3, 2] = normal * spacing
    floor = float(array.min())
    moving = MetaTensor(torch.from_numpy(array - floor)[None], affine=torch.as_tensor(sheared))
    resampled = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=np.float32)(
        moving, dst_affine=torch.as_tensor(target), spatial_size=array.shape
    )
    return np.asarray(torch.as_tensor(resampled)[0], dtype=np.float32) + floor, target


def volume_name(candidate: VolumeCandidate) -> str:
    """``<SeriesNumber>_<SeriesDescription>[_suffix]``, safe as a file name."""
    description = re.sub(r"[^A-Za-z0-9.-]+", "_", candidate.series_description).strip("_.") or "series"
    number = "x" if candidate.series_number is None else str(candidate.series_number)
    name = f"{number}_{description}"
    return f"{name}_{candidate.suffix}" if candidate.suffix else name


def series_sidecar(candidate: VolumeCandidate, shape: tuple[int, ...], affine: np.ndarray) -> dict:
    """What a researcher needs to know about a converted volume; no patient identifiers."""
    first = candidate.slices[0]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    philips_scale = first.dataset().get((0x2005, 0x100E))
    return {
        "SeriesInstanceUID": candidate.series_uid,
        "SeriesNumber": candidate.series_number,
        "SeriesDescription": candidate.series_description,
        "Modality": candidate.modality,
        "Manufacturer": first.manufacturer,
        "TransferSyntaxUID": first.transfer_syntax,
        "ImageType": list(first.image_type),
        "SliceCount": len(candidate.slices),
        "Shape": [int(s) for s in shape],
        "SpacingMM": [round(float(z), 6) for z in zooms],
        "Orientation": "".join(nib.aff2axcodes(affine)),
        "AffineRAS": np.round(affine, 6).tolist(),
        "TiltDegrees": None if candidate.geometry is None else round(candidate.geometry.tilt_degrees, 3),
        "PhilipsScaleSlope": None if philips_scale is None else float(philips_scale.value),
        "IntensityConvention": "stored value x RescaleSlope + RescaleIntercept (per frame); no private scaling",
        "Warnings": list(candidate.warnings),
    }
