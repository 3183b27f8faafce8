"""One ``DicomSlice`` per 2-D image: a single-frame file, or one frame of a multi-frame file.

Enhanced multi-frame objects carry geometry and scaling per frame in functional groups; turning each
frame into the same record as a classic slice lets one grouping and geometry code path serve both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipelines.errors import InputError
from pipelines.ingestion.dicom.sources import DicomFile, read_header
from pipelines.limits import check_voxels, current_limits

# Modalities and SOP classes whose instances hold no image we can stack into volumes.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "KO", "PR", "REG", "RWV", "DOC"}
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data, Spatial Registration, Spatial Fiducials, Segmentation, ...
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT plan, structure set, dose, ...
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF, CDA, STL
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.4.2",  # MR spectroscopy
)
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


@lru_cache(maxsize=64)
def _reread_header(source: DicomFile) -> Dataset:
    read = read_header(source)
    if read is None:
        raise ValueError(f"{source.name} is no longer readable")
    return read[0]


@dataclass
class DicomSlice:
    source: DicomFile
    frame: int | None
    header: Dataset | None  # None in a light slice (made in a worker process); see dataset()
    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    manufacturer: str
    sop_class_uid: str
    transfer_syntax: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    samples_per_pixel: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    instance_number: int | None
    echo: str
    acquisition_number: str
    temporal_position: str
    trigger_time: str
    acquisition_time: str
    stack_id: str
    rescale_slope: float
    rescale_intercept: float
    tile_origin: tuple[int, int] | None = None  # (row, column) of this slice's tile in a mosaic or UIH grid
    pixel_offset: int | None = None  # byte offset of the PixelData element in a plain file
    bits_allocated: int = 0
    bits_stored: int = 0
    pixel_representation: int = 0
    frames_in_file: int = 1
    file_rows: int = 0
    file_columns: int = 0
    photometric: str = ""
    complex_component: str = ""  # MAGNITUDE, PHASE, REAL, IMAGINARY (MIXED or empty: ImageType decides)
    missing_geometry: tuple[str, str] | None = None  # (code, message) when the kind of image says why
    patient_id: str = ""  # never logged or reported: only compared (a volume never mixes patients)

    def dataset(self) -> Dataset:
        """The file's header (re-read, once per file, for a light slice)."""
        return self.header if self.header is not None else _reread_header(self.source)

    def light(self) -> DicomSlice:
        """The same slice without its pydicom header: cheap to send between processes."""
        return replace(self, header=None)

    @property
    def normal(self) -> np.ndarray:
        assert self.orientation is not None
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def holds_no_image(self) -> bool:
        """An instance of a SOP class without image pixels (raw data, a report, a presentation state...)."""
        return (self.modality in NON_IMAGE_MODALITIES or self.rows == 0 or self.columns == 0
                or self.sop_class_uid.startswith(NON_IMAGE_SOP_CLASS_PREFIXES))

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type or "SCOUT" in self.image_type

    @property
    def is_derived_capture(self) -> bool:
        return self.sop_class_uid.startswith(SECONDARY_CAPTURE_PREFIX) or (
            "DERIVED" in self.image_type and "SECONDARY" in self.image_type and "SCREEN SAVE" in self.image_type
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _vector(value: Any, size: int) -> np.ndarray | None:
    try:
        array = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return array if array.shape == (size,) and np.all(np.isfinite(array)) else None


def _group_value(frame_groups: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """A value from a functional group: the frame's own first, then the shared one."""
    for groups in (frame_groups, shared):
        if groups is not None and sequence in groups and len(groups[sequence].value):
            item = groups[sequence].value[0]
            if keyword in item:
                return item[keyword].value
    return None


def _common(ds: Dataset, source: DicomFile) -> dict[str, Any]:
    transfer = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return {
        "source": source,
        "header": ds,
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "series_number": int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
        "series_description": str(ds.get("SeriesDescription", "")),
        "modality": str(ds.get("Modality", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "sop_class_uid": str(ds.get("SOPClassUID", "")),
        "transfer_syntax": str(transfer) if transfer else "",
        "rows": int(ds.get("Rows", 0) or 0),
        "columns": int(ds.get("Columns", 0) or 0),
        "samples_per_pixel": int(ds.get("SamplesPerPixel", 1) or 1),
        "instance_number": int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        "bits_allocated": int(ds.get("BitsAllocated", 0) or 0),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "pixel_representation": int(ds.get("PixelRepresentation", 0) or 0),
        "frames_in_file": _count(ds.get("NumberOfFrames", 1)),
        "file_rows": int(ds.get("Rows", 0) or 0),
        "file_columns": int(ds.get("Columns", 0) or 0),
        "photometric": str(ds.get("PhotometricInterpretation", "")),
        "patient_id": str(ds.get("PatientID", "") or "").strip(),
    }


def slices_from_header(ds: Dataset, source: DicomFile, pixel_offset: int | None = None) -> Iterator[DicomSlice]:
    """The 2-D images of one file, as slices (one per frame for a multi-frame file)."""
    common = {**_common(ds, source), "pixel_offset": pixel_offset}
    frames = common["frames_in_file"]
    limits = current_limits()
    if frames > limits.max_frames:
        raise InputError("VOLUME_TOO_LARGE", f"a DICOM file declares {frames:,} frames, at most "
                                             f"{limits.max_frames:,} allowed (TESSERA_MAX_FRAMES)")
    check_voxels((common["columns"], common["rows"], frames), "a DICOM file", limits)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if frames > 1 and per_frame is not None:
        yield from _enhanced_frames(ds, common, frames)
        return
    base = {
        **common,
        "image_type": tuple(_text(ds.get("ImageType")).upper().split("\\")) if ds.get("ImageType") else (),
        "position": _vector(ds.get("ImagePositionPatient"), 3),
        "orientation": _vector(ds.get("ImageOrientationPatient"), 6),
        "pixel_spacing": _spacing(ds.get("PixelSpacing")),
        "slice_thickness": _float(ds.get("SliceThickness")),
        "echo": _text(ds.get("EchoNumbers")),
        "acquisition_number": _text(ds.get("AcquisitionNumber")),
        "temporal_position": _text(ds.get("TemporalPositionIdentifier")),
        "trigger_time": _text(ds.get("TriggerTime")),
        "acquisition_time": _text(ds.get("AcquisitionTime")),
        "stack_id": "",
        "complex_component": _text(ds.get("ComplexImageComponent")).upper(),
        "rescale_slope": _float(ds.get("RescaleSlope"), 1.0) or 1.0,
        "rescale_intercept": _float(ds.get("RescaleIntercept"), 0.0) or 0.0,
    }
    if frames == 1 and "MOSAIC" in base["image_type"]:
        yield from _mosaic_tiles(ds, base)
        return
    grid_slices = _uih_grid_count(ds) if frames == 1 else 0
    if grid_slices > 1:
        yield from _uih_grid_tiles(ds, base, grid_slices)
        return
    if frames == 1:
        yield DicomSlice(frame=None, **base)
        return
    # Legacy multi-frame (no functional groups): frames stacked along the normal from the first position.
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness"))
    for index in range(frames):
        position = base["position"]
        if position is not None and base["orientation"] is not None and step:
            normal = np.cross(base["orientation"][:3], base["orientation"][3:])
            position = position + index * step * normal
        elif index:
            position = None  # geometry of later frames unknown: refused as MISSING_GEOMETRY
        yield DicomSlice(frame=index, **{**base, "position": position})


def _mosaic_tiles(ds: Dataset, base: dict[str, Any]) -> Iterator[DicomSlice]:
    """A Siemens mosaic: one slice per tile. The tile count and slice normal come from the CSA header;
    the stored position is the mosaic's corner, shifted here to the first tile's corner."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental on import
        from nibabel.nicom import csareader

        try:
            csa = csareader.get_csa_header(ds, "image")
            count = int(csareader.get_n_mosaic(csa))
            normal = np.asarray(csareader.get_slice_normal(csa), dtype=np.float64)
        except Exception:  # CSA missing or unreadable: the geometry check reports the missing pieces
            count, normal = 0, None
    tiles_per_side = int(np.ceil(np.sqrt(count))) if count else 0
    geometry_known = base["position"] is not None and base["orientation"] is not None and base["pixel_spacing"]
    if not tiles_per_side or normal is None or not geometry_known:
        yield DicomSlice(frame=None, **{**base, "position": None})
        return
    rows, columns = base["rows"] // tiles_per_side, base["columns"] // tiles_per_side
    row_spacing, column_spacing = base["pixel_spacing"]
    shift_rows, shift_columns = (base["rows"] - rows) / 2, (base["columns"] - columns) / 2
    orientation = base["orientation"]
    first = (base["position"] + orientation[3:] * row_spacing * shift_rows
             + orientation[:3] * column_spacing * shift_columns)
    step = _float(ds.get("SpacingBetweenSlices")) or _float(ds.get("SliceThickness")) or 0.0
    for tile in range(count):
        origin = ((tile // tiles_per_side) * rows, (tile % tiles_per_side) * columns)
        yield DicomSlice(frame=None, **{**base, "rows": rows, "columns": columns, "tile_origin": origin,
                                        "position": first + tile * step * normal})


UIH_PRIVATE_CREATOR = "Image Private Header"
UIH_MANUFACTURERS = ("UIH", "UNITED IMAGING")


def _uih_private(ds: Dataset, element: int) -> Any:
    """An element of United Imaging's private block (group 0065, creator "Image Private Header"); the fixed
    (0065,10xx) slot dcm2niix reads when the creator is missing. None when absent."""
    try:
        tag = int(ds.private_block(0x0065, UIH_PRIVATE_CREATOR).get_tag(element))
    except KeyError:
        tag = 0x00651000 | element
    return ds[tag].value if tag in ds else None


def _uih_grid_count(ds: Dataset) -> int:
    """Slices in a United Imaging grid image (0065,xx50: number of images in the grid); 0 for anything else."""
    if not str(ds.get("Manufacturer", "")).upper().startswith(UIH_MANUFACTURERS):
        return 0
    count = _float(_uih_private(ds, 0x50))
    return int(count) if count and count > 1 and float(count).is_integer() else 0


def _uih_grid_tiles(ds: Dataset, base: dict[str, Any], count: int) -> Iterator[DicomSlice]:
    """A United Imaging grid ("SaveBySlc" off: one image per volume): slice ``k`` in tile row ``k // n``, column
    ``k % n`` of a square grid of side ``n = ceil(sqrt(count))``, each tile placed by its own
    ImagePositionPatient in the private per-slice sequence (0065,xx51). Without those positions the slices
    cannot be placed: refused as UIH_GRID_WITHOUT_POSITIONS."""
    side = int(np.ceil(np.sqrt(count)))
    rows, columns = base["rows"] // side, base["columns"] // side
    items = _uih_private(ds, 0x51)
    positions = [_vector(item.get("ImagePositionPatient"), 3) for item in items] if items else []
    if len(positions) != count or any(p is None for p in positions) or not rows or not columns:
        reason = ("UIH_GRID_WITHOUT_POSITIONS", f"a United Imaging grid image of {count} slices without a "
                  "position for each slice (private sequence 0065,xx51): its slices cannot be placed in space")
        yield DicomSlice(frame=None, **{**base, "position": None, "missing_geometry": reason})
        return
    for tile, position in enumerate(positions):
        origin = ((tile // side) * rows, (tile % side) * columns)
        yield DicomSlice(frame=None, **{**base, "rows": rows, "columns": columns, "tile_origin": origin,
                                        "position": position})


def _enhanced_frames(ds: Dataset, common: dict[str, Any], frames: int) -> Iterator[DicomSlice]:
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.PerFrameFunctionalGroupsSequence
    image_type = tuple(_text(ds.get("ImageType")).upper().split("\\")) if ds.get("ImageType") else ()
    for index in range(min(frames, len(per_frame))):
        groups = per_frame[index]

        def value(sequence: str, keyword: str, groups: Dataset = groups) -> Any:
            return _group_value(groups, shared, sequence, keyword)

        frame_type = value("MRImageFrameTypeSequence", "FrameType") or value("CTImageFrameTypeSequence", "FrameType")
        component = value("MRImageFrameTypeSequence", "ComplexImageComponent") or ds.get("ComplexImageComponent")
        echo_time = value("MREchoSequence", "EffectiveEchoTime")
        yield DicomSlice(
            frame=index,
            **common,
            image_type=tuple(_text(frame_type).upper().split("\\")) if frame_type else image_type,
            position=_vector(value("PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_vector(value("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_spacing(value("PixelMeasuresSequence", "PixelSpacing")),
            slice_thickness=_float(value("PixelMeasuresSequence", "SliceThickness")),
            echo=_text(echo_time),
            acquisition_number="",
            temporal_position=_text(value("FrameContentSequence", "TemporalPositionIndex")),
            trigger_time=_text(value("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")),
            acquisition_time=_text(value("FrameContentSequence", "FrameAcquisitionDateTime")),
            stack_id=_text(value("FrameContentSequence", "StackID")),
            complex_component=_text(component).upper(),
            rescale_slope=_float(value("PixelValueTransformationSequence", "RescaleSlope"),
                                 _float(ds.get("RescaleSlope"), 1.0)) or 1.0,
            rescale_intercept=_float(value("PixelValueTransformationSequence", "RescaleIntercept"),
                                     _float(ds.get("RescaleIntercept"), 0.0)) or 0.0,
        )


def _count(value: Any) -> int:
    """NumberOfFrames as an integer (IS may hold anything a writer put there; invalid counts as one frame)."""
    try:
        return max(int(value or 1), 1)
    except (TypeError, ValueError, OverflowError):
        return 1


def _spacing(value: Any) -> tuple[float, float] | None:
    vector = _vector(value, 2) if value is not None else None
    if vector is None or np.any(vector <= 0):
        return None
    return (float(vector[0]), float(vector[1]))
