"""DICOM-SEG with highdicom, on the frames of the source series, verified by reading it back.

Frames are aligned one-to-one with the source slices (axial, sagittal, coronal or oblique alike): frame k
is the mask's slice k of the source stack, referencing its source instance. Segment numbers are 1..N in
label order; each carries its name, coded category/type, display colour and the algorithm that made it.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from models.manifest import Label
from pipelines.errors import TesseraError
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.ingestion.dicom.slices import DicomSlice
from pipelines.writers.codes import segment_codes

log = logging.getLogger(__name__)


class OutputError(TesseraError):
    """An output cannot be written correctly."""


@dataclass(frozen=True)
class SegAlgorithm:
    name: str
    version: str


_GENERATED_WHEN_MISSING = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _normalise_character_set(dataset: Dataset) -> None:
    """Empty -> absent (default repertoire); a lone ISO 2022 term -> its plain form ('ISO 2022 IR 100' ->
    'ISO_IR 100')."""
    value = dataset.get("SpecificCharacterSet")
    if value is None:
        return
    terms = [str(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value]) if str(v).strip()]
    if not terms:
        del dataset.SpecificCharacterSet
    elif len(terms) == 1 and terms[0].startswith("ISO 2022 "):
        dataset.SpecificCharacterSet = terms[0].replace("ISO 2022 ", "ISO_", 1)


_COPIED_MODULE_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                           "PatientWeight", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                           "AccessionNumber", "StudyDescription")


def _repair_copied_values(dataset: Dataset) -> None:
    """Values the SEG copies from the source must be valid for their VR: repair the unambiguous (an Age
    String '0Y' -> '000Y'), blank the rest, so a source's defect does not make the SEG invalid."""
    for keyword in _COPIED_MODULE_KEYWORDS:
        if keyword not in dataset or dataset[keyword].value in (None, ""):
            continue
        element = dataset[keyword]
        try:
            validate_value(element.VR, element.value, config.RAISE)
            continue
        except (ValueError, TypeError):
            pass
        text = str(element.value)
        if element.VR == "AS" and re.fullmatch(r"\d{1,3}[DWMY]", text):
            element.value = text[:-1].zfill(3) + text[-1]
        else:
            element.value = ""
        log.warning("source %s is not a valid %s value; %s in the SEG", keyword, element.VR,
                    "repaired" if element.value else "left empty")


def _is_code_item(item: Dataset) -> bool:
    """A Code Sequence Macro item: a value (short, long or URN), its scheme (unless a URN) and a meaning."""
    value = item.get("CodeValue") or item.get("LongCodeValue")
    urn = item.get("URNCodeValue")
    return bool((value and item.get("CodingSchemeDesignator") or urn) and item.get("CodeMeaning"))


def _drop_invalid_sequences(dataset: Dataset) -> None:
    """Sequences a SEG (or RTSTRUCT) copies from its source must hold 1-n valid items: drop code items without
    value, scheme or meaning, then every empty sequence (a classic Philips export's empty Procedure Code Sequence
    made the SEG fail dciodvfy), with a warning. Applied recursively inside the items that remain."""
    for element in list(dataset):
        if element.VR != "SQ":
            continue
        if element.keyword.endswith("CodeSequence"):
            kept = [item for item in element.value if _is_code_item(item)]
            if len(kept) != len(element.value):
                log.warning("source %s has %d code item(s) without value, scheme or meaning; left out of the copy",
                            element.keyword or element.tag, len(element.value) - len(kept))
                element.value = kept
        for item in element.value:
            _drop_invalid_sequences(item)
        if len(element.value) == 0:
            log.warning("source %s is an empty sequence; left out of the copy", element.keyword or element.tag)
            del dataset[element.tag]


_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _source_datasets(candidate: VolumeCandidate) -> list[Dataset]:
    """The source headers, repaired where anonymisation emptied identifiers a SEG must reference."""
    assert candidate.geometry is not None
    slices = candidate.geometry.slices
    tiled = is_tiled(candidate)
    frames = source_frames(candidate)
    firsts = slices[:1] if frames is not None or tiled else slices  # multi-frame or tiled: one file, one dataset
    datasets = [copy.deepcopy(s.dataset()) for s in firsts]  # repairs must not leak into cached headers
    if tiled:
        _as_one_tile(datasets[0], slices[0])
    anchor = str(datasets[0].get("FrameOfReferenceUID", "")) or str(datasets[0].file_meta.get(
        "MediaStorageSOPInstanceUID", "tessera"))
    for dataset in datasets:
        meta = getattr(dataset, "file_meta", Dataset())
        for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                      ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not dataset.get(keyword):
                if not meta.get(meta_keyword):
                    raise OutputError("SEG_SOURCE_INCOMPLETE", f"source images lack {keyword}; a SEG cannot "
                                                               "reference them")
                setattr(dataset, keyword, meta.get(meta_keyword))
        for keyword in _GENERATED_WHEN_MISSING:
            if not dataset.get(keyword):
                setattr(dataset, keyword, generate_uid(entropy_srcs=[anchor, keyword]))
        _normalise_character_set(dataset)
        _drop_invalid_sequences(dataset)
        if not dataset.get("SliceThickness"):
            dataset.SliceThickness = round(candidate.geometry.slice_spacing, 6)  # measured from the positions
        for keyword in _TYPE2_COPIED:  # Type 2: must be present, may be empty
            if keyword not in dataset:
                setattr(dataset, keyword, "")
        _repair_copied_values(dataset)
    missing = [k for k in _GENERATED_WHEN_MISSING if not slices[0].dataset().get(k)]
    if missing:
        log.warning("source series lacks %s (anonymised?); the SEG got generated ones and will not be grouped with "
                    "its source by a PACS", " and ".join(missing))
    return datasets


def _parts_of_one_file(candidate: VolumeCandidate, is_part: Callable[[DicomSlice], bool], what: str) -> bool:
    """Whether the volume's slices are parts of one file (frames, tiles); refused when only some are, or when
    they come from several files, which one DICOM-SEG cannot reference."""
    assert candidate.geometry is not None
    slices = candidate.geometry.slices
    if not any(is_part(s) for s in slices):
        return False
    if not all(is_part(s) for s in slices) or len({s.source for s in slices}) > 1:
        raise OutputError("SEG_SOURCE_UNSUPPORTED", f"a volume made of {what} cannot be referenced by one "
                                                    "DICOM-SEG yet")
    return True


def is_tiled(candidate: VolumeCandidate) -> bool:
    """A volume cut from the tiles of one image (a Siemens mosaic, a United Imaging grid)."""
    return _parts_of_one_file(candidate, lambda s: s.tile_origin is not None, "tiles of several images")


def _as_one_tile(dataset: Dataset, first: DicomSlice) -> None:
    """Our copy of a tiled source as highdicom checks it: one tile's size and the first tile's position (the
    SEG gets its own plane positions, and references the image itself, not frames of it)."""
    dataset.Rows, dataset.Columns = first.rows, first.columns
    dataset.ImagePositionPatient = [float(v) for v in first.position]  # type: ignore[union-attr]


def source_frames(candidate: VolumeCandidate) -> list[int] | None:
    """For a volume made of frames of one multi-frame file (enhanced CT/MR), the 1-based frame number of each
    stack slice; ``None`` for single-frame images. Frames of several multi-frame files are not supported."""
    if not _parts_of_one_file(candidate, lambda s: s.frame is not None, "frames of several multi-frame files"):
        return None
    assert candidate.geometry is not None
    return [int(s.frame) + 1 for s in candidate.geometry.slices]  # type: ignore[arg-type]


def _frame_geometry(candidate: VolumeCandidate) -> dict[str, Any]:
    """The SEG's own plane positions, orientation and pixel measures for a volume taken from a multi-frame file
    (the file may hold other volumes at the same positions, so they cannot be copied from it)."""
    geometry = candidate.geometry
    assert geometry is not None
    first = geometry.slices[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    return {
        "plane_positions": [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                     [float(v) for v in s.position])  # type: ignore[union-attr]
                            for s in geometry.slices],
        "plane_orientation": hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                         [float(v) for v in first.orientation]),
        "pixel_measures": hd.PixelMeasuresSequence(first.pixel_spacing, round(geometry.slice_spacing, 6),
                                                   round(geometry.slice_spacing, 6)),
    }


def _reference_source_frames(seg: Any, candidate: VolumeCandidate, source: Dataset) -> None:
    """Each SEG frame references the source frame at its position: Referenced SOP Instance UID + Referenced
    Frame Number in its Derivation Image Sequence, spatial locations preserved."""
    geometry = candidate.geometry
    assert geometry is not None
    frames = source_frames(candidate) or []
    normal = geometry.slices[0].normal
    by_distance = {round(float(np.dot(s.position, normal)), 3): frame  # type: ignore[arg-type]
                   for s, frame in zip(geometry.slices, frames, strict=True)}
    purpose = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
    derivation_code = hd.sr.CodedConcept("113076", "DCM", "Segmentation")
    for item in seg.PerFrameFunctionalGroupsSequence:
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        frame = by_distance[round(float(np.dot(position, normal)), 3)]
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        reference.ReferencedFrameNumber = frame
        reference.PurposeOfReferenceCodeSequence = [purpose]
        reference.SpatialLocationsPreserved = "YES"
        derivation = Dataset()
        derivation.DerivationCodeSequence = [derivation_code]
        derivation.SourceImageSequence = [reference]
        item.DerivationImageSequence = [derivation]


def _shared_geometry_for_highdicom(dataset: Dataset, candidate: VolumeCandidate) -> None:
    """highdicom reads a multi-frame source's pixel measures and orientation from its shared functional
    groups; where a scanner put them per frame only (Siemens XA), copy frame 1's into the shared groups of our
    copy (the values are the same for every frame of one volume). A legacy multi-frame file (no functional
    groups, or per-frame ones only) gets what it lacks in our copy from the geometry the reader measured."""
    if "PerFrameFunctionalGroupsSequence" not in dataset or "SharedFunctionalGroupsSequence" not in dataset:
        _functional_groups_from_geometry(dataset, candidate)
    shared = dataset.SharedFunctionalGroupsSequence[0]
    first = dataset.PerFrameFunctionalGroupsSequence[0]
    for keyword in ("PixelMeasuresSequence", "PlaneOrientationSequence"):
        if keyword not in shared and keyword in first:
            setattr(shared, keyword, copy.deepcopy(first[keyword].value))


def _functional_groups_from_geometry(dataset: Dataset, candidate: VolumeCandidate) -> None:
    assert candidate.geometry is not None
    first = candidate.geometry.slices[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    by_frame = {int(s.frame): s for s in candidate.geometry.slices}  # type: ignore[arg-type]
    shared, measures, orientation = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = list(first.pixel_spacing)
    measures.SliceThickness = round(candidate.geometry.slice_spacing, 6)
    orientation.ImageOrientationPatient = [float(v) for v in first.orientation]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    if "SharedFunctionalGroupsSequence" not in dataset:
        dataset.SharedFunctionalGroupsSequence = [shared]
    if "PerFrameFunctionalGroupsSequence" in dataset:
        return
    frames = []
    for index in range(int(dataset.get("NumberOfFrames", 1) or 1)):
        position, group = Dataset(), Dataset()
        s = by_frame.get(index, first)
        position.ImagePositionPatient = [float(v) for v in s.position]  # type: ignore[union-attr]
        group.PlanePositionSequence = [position]
        frames.append(group)
    dataset.PerFrameFunctionalGroupsSequence = frames


def _sop_instance_uid(dataset: Dataset) -> str:
    """The instance's SOP Instance UID, from the file meta where anonymisation removed it."""
    return str(dataset.get("SOPInstanceUID") or dataset.file_meta.MediaStorageSOPInstanceUID)


def _stack_from_seg(seg: Any, candidate: VolumeCandidate, **options: Any) -> np.ndarray:
    """The SEG's pixels on the source stack's slices, in stack order (slice, row, column[, segment])."""
    assert candidate.geometry is not None
    frames = source_frames(candidate)
    first = candidate.geometry.slices[0].dataset()
    if is_tiled(candidate):
        return _stack_by_position(seg, candidate, **options)
    if frames is not None:
        uid = _sop_instance_uid(first)
        return np.asarray(seg.get_pixels_by_source_frame(source_sop_instance_uid=uid, source_frame_numbers=frames,
                                                         skip_overlap_checks=True, **options))
    uids = [_sop_instance_uid(s.dataset()) for s in candidate.geometry.slices]
    return np.asarray(seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, skip_overlap_checks=True,
                                                        **options))


def _stack_by_position(seg: Any, candidate: VolumeCandidate, **options: Any) -> np.ndarray:
    """The SEG read as a volume in its own geometry (highdicom), each stack slice taken at its position."""
    assert candidate.geometry is not None
    options.pop("assert_missing_frames_are_empty", None)  # a volume has no missing frames to check
    volume = seg.get_volume(**options)
    to_index = np.linalg.inv(volume.affine)
    array = np.asarray(volume.array)
    first = candidate.geometry.slices[0]
    stack = np.zeros((len(candidate.geometry.slices), first.rows, first.columns, *array.shape[3:]), array.dtype)
    for k, s in enumerate(candidate.geometry.slices):
        index = to_index[:3, :3] @ np.asarray(s.position, float) + to_index[:3, 3]
        if not np.allclose(index, np.rint(index), atol=1e-3) or abs(index[1]) > 1e-3 or abs(index[2]) > 1e-3:
            raise OutputError("SEG_VERIFY_FAILED", "the SEG's planes do not lie on the source tiles")
        if 0 <= int(np.rint(index[0])) < array.shape[0]:
            stack[k] = array[int(np.rint(index[0]))]
    return stack


def check_source_grid(candidate: VolumeCandidate, shape: tuple[int, ...], kind: str = "SEG") -> None:
    """A DICOM object of ``kind`` (SEG, RTSTRUCT) must lie on the source slices, on their exact grid."""
    geometry = candidate.geometry
    if geometry is None:
        raise OutputError(f"{kind}_SOURCE_REFUSED", f"{candidate.label} was refused; no {kind} can reference it")
    if geometry.tilt_degrees > 0.1:
        raise OutputError(f"{kind}_NEEDS_SOURCE_GRID", f"the series was resampled for gantry tilt; a {kind} must "
                                                       "lie on the source slices")
    if tuple(shape) != geometry.shape:
        raise OutputError(f"{kind}_GRID_MISMATCH",
                          f"mask grid {tuple(shape)} differs from the source stack {geometry.shape}")


def segment_descriptions(labels: Sequence[Label], algorithm: SegAlgorithm) -> list[hd.seg.SegmentDescription]:
    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, version=algorithm.version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, label in enumerate(labels, start=1):
        category, kind = segment_codes(label.name, label.code)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label.name[:64],
            segmented_property_category=category,
            segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_uid=hd.UID(),
            tracking_id=label.name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*label.color) if label.color else None,
        ))
    return descriptions


def write_dicom_seg(
    labels: np.ndarray,
    candidate: VolumeCandidate,
    label_table: Sequence[Label],
    algorithm: SegAlgorithm,
    path: Path,
    *,
    probabilities: np.ndarray | None = None,
    omit_empty_frames: bool = True,
    series_number: int = 7001,
    software_version: str = "0",
) -> Path:
    """Write ``labels`` (on the source stack grid ``[column, row, slice]``) as a SEG next to the series.

    ``probabilities`` (classes incl. background first, same grid) makes a FRACTIONAL SEG instead of BINARY.
    The file is read back and compared with the mask; any difference raises ``SEG_VERIFY_FAILED``.
    """
    check_source_grid(candidate, labels.shape)
    sources = _source_datasets(candidate)
    ordered = sorted(label_table, key=lambda lbl: lbl.value)
    if probabilities is None:
        remap = np.zeros(max(int(labels.max()), max(lbl.value for lbl in ordered)) + 1, dtype=np.uint16)
        for number, label in enumerate(ordered, start=1):
            remap[label.value] = number
        frames = remap[labels].transpose(2, 1, 0)  # (slice, row, column)
        kind, pixel_array = hd.seg.SegmentationTypeValues.BINARY, frames
    else:
        fractions = np.stack([probabilities[lbl.value] for lbl in ordered], axis=-1)  # (column, row, slice, N)
        kind, pixel_array = hd.seg.SegmentationTypeValues.FRACTIONAL, fractions.transpose(2, 1, 0, 3)
    multi_frame = source_frames(candidate) is not None
    own_geometry = multi_frame or is_tiled(candidate)
    if multi_frame:
        _shared_geometry_for_highdicom(sources[0], candidate)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(pixel_array),
        segmentation_type=kind,
        segment_descriptions=segment_descriptions(ordered, algorithm),
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Tessera",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=software_version,
        device_serial_number="0",
        series_description=f"Tessera {algorithm.name}"[:64],
        content_label="TESSERA",
        content_description=f"{algorithm.name} {algorithm.version}"[:64],
        omit_empty_frames=omit_empty_frames,
        **(_frame_geometry(candidate) if own_geometry else {}),
    )
    if multi_frame:
        _reference_source_frames(seg, candidate, sources[0])
    seg.save_as(path)
    if probabilities is None:
        verify_seg(path, labels, candidate, [lbl.value for lbl in ordered])
    else:
        verify_fractional_seg(path, fractions, candidate, omit_empty_frames)
    return path


def read_seg_labels(path: Path, candidate: VolumeCandidate, values: Sequence[int]) -> np.ndarray:
    """A SEG read back with highdicom as a label map on the source stack grid ``[column, row, slice]``."""
    stack = _stack_from_seg(hd.seg.segread(path), candidate, combine_segments=True, relabel=False,
                            assert_missing_frames_are_empty=True)
    table = np.zeros(len(values) + 1, dtype=np.int32)
    table[1:] = values
    return table[stack].transpose(2, 1, 0)


def verify_fractional_seg(path: Path, fractions: np.ndarray, candidate: VolumeCandidate, omitted: bool) -> None:
    """Fractional values read back within the 8-bit quantisation (1/255) of what was written."""
    back = _stack_from_seg(hd.seg.segread(path), candidate, assert_missing_frames_are_empty=omitted)
    expected = fractions.transpose(2, 1, 0, 3)
    error = float(np.abs(back.astype(np.float64) - expected).max()) if back.shape == expected.shape else np.inf
    if error > 1.0 / 255.0 + 1e-6:
        path.unlink(missing_ok=True)
        raise OutputError("SEG_VERIFY_FAILED", f"the fractional SEG reads back {error:.4f} away from the "
                                               "probabilities; nothing was kept")


def verify_seg(path: Path, labels: np.ndarray, candidate: VolumeCandidate, values: Sequence[int]) -> None:
    kept = np.where(np.isin(labels, values), labels, 0)
    back = read_seg_labels(path, candidate, values)
    if back.shape != kept.shape or not np.array_equal(back, kept):
        differing = int((back != kept).sum()) if back.shape == kept.shape else -1
        path.unlink(missing_ok=True)
        raise OutputError("SEG_VERIFY_FAILED", f"the written SEG does not read back as the mask ({differing} voxels "
                                               "differ); nothing was kept")
