"""RTSTRUCT (RT Structure Set) with rt-utils, on the source series, verified by reading it back.

For radiotherapy systems that import contours rather than DICOM-SEG. One ROI per label present in the mask
(ROI name = label name, display colour = label colour or rt-utils' palette), contoured slice by slice on the
source images (OpenCV traces each slice's regions; each contour references its source instance).

rt-utils reads the source series from a folder, so the source slices are staged in a temporary folder:
linked where the file can be used as it is, rewritten where it comes from a zip or a .dcm.gz, lacks an
identifier rt-utils needs (anonymised data), or where rt-utils' pixel spacing must be compensated (below).
Its slice order (sorted along the normal) is matched to the stack by SOPInstanceUID, not assumed.

Two defects of rt-utils 1.2.7 are handled here:

* it scales the row direction by PixelSpacing[0] (the row spacing) instead of PixelSpacing[1], which
  misplaces every contour on images with non-square pixels: detected at run time and, where present,
  compensated by staging the images with the two spacings exchanged;
* its read-back masks are sized Columns x Rows but indexed [row, column], so on non-square images it
  cannot represent the whole image: its read-back is compared where it can.

The written contours are also rasterised independently, in Tessera's own geometry of the stack (contour
points -> voxel indices through the stack affine; each contour must lie on the plane of the image it
references), so a contour misplaced in patient space is caught even though rt-utils would read its own
misplacement back consistently. Contours are polygons through the boundary voxel centres: every ROI of at
least ``MIN_VERIFIED_VOXELS`` voxels must read back with Dice >= ``MIN_DICE`` in both read-backs.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from models.manifest import Label
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.writers.codes import ANATOMICAL_STRUCTURE, segment_codes
from pipelines.writers.seg import (
    OutputError,
    SegAlgorithm,
    _source_datasets,
    check_source_grid,
    is_tiled,
    source_frames,
)

log = logging.getLogger(__name__)

MIN_DICE = 0.95
MIN_VERIFIED_VOXELS = 50
PLANE_TOLERANCE_MM = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# What rt-utils reads from the staged images (besides the geometry): present and repaired in the staged copies.
_RT_UTILS_KEYS = ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                  "StudyDate", "StudyTime", "StudyID")
_STUDY_AND_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                      "ReferringPhysicianName", "StudyID", "AccessionNumber")
_OPTIONAL_COPIED = ("PatientAge", "PatientSize", "PatientWeight", "StudyDescription", "InstitutionName")


def _rt_utils() -> Any:
    """rt-utils' RTStructBuilder, imported on first use: RTSTRUCT output is an optional extra."""
    try:
        import cv2  # noqa: F401  (rt-utils needs it; a broken OpenCV fails here, not half-way through)
        from rt_utils import RTStructBuilder
    except ImportError as exc:
        raise OutputError("RTSTRUCT_UNAVAILABLE", f"RTSTRUCT output needs rt-utils and OpenCV ({exc}); install "
                                                  "them with: pip install 'tessera[rtstruct]'") from exc
    return RTStructBuilder


class _QuietDeprecations(logging.Filter):
    """rt-utils sets ``is_implicit_VR``/``is_little_endian``, which pydicom 3 logs as deprecated on every RTSTRUCT."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be removed in v4.0" not in record.getMessage()


@contextlib.contextmanager
def _quiet_pydicom_deprecations() -> Iterator[None]:
    quiet = _QuietDeprecations()
    logger = logging.getLogger("pydicom")
    logger.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will be removed in v4.0", category=DeprecationWarning)
            yield
    finally:
        logger.removeFilter(quiet)


def rt_utils_swaps_pixel_spacing() -> bool:
    """True when the installed rt-utils scales the row direction by the row spacing (PixelSpacing[0]), the
    defect of rt-utils <= 1.2.7 (qurit/rt-utils#92); False when it is fixed or cannot be probed."""
    try:
        from rt_utils import image_helper

        probe = Dataset()
        probe.ImagePositionPatient = [0.0, 0.0, 0.0]
        probe.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        probe.PixelSpacing = [2.0, 3.0]  # rows 2 mm apart, columns 3 mm apart: a step along a row is 3 mm
        matrix = image_helper.get_pixel_to_patient_transformation_matrix([probe])
        return bool(np.isclose(float(matrix[0][0]), 2.0))
    except Exception:  # internal API changed: rely on the independent verification
        log.debug("could not probe rt-utils' pixel spacing convention", exc_info=True)
        return False


def _source_headers(candidate: VolumeCandidate) -> list[Dataset]:
    """The source headers in stack order, repaired as for a SEG (identifiers, character set, values)."""
    try:
        if source_frames(candidate) is not None:
            raise OutputError("SEG_SOURCE_UNSUPPORTED", "RTSTRUCT on enhanced multi-frame sources is not supported "
                                                        "yet (contours reference single-frame images); write a "
                                                        "DICOM-SEG, which references the source frames")
        if is_tiled(candidate):
            raise OutputError("SEG_SOURCE_UNSUPPORTED", "RTSTRUCT on tiled sources (a mosaic, a grid) is not "
                                                        "supported (contours reference whole images); write a "
                                                        "DICOM-SEG")
        datasets = _source_datasets(candidate)
    except OutputError as exc:
        code = "RTSTRUCT_" + exc.code.removeprefix("SEG_")
        message = exc.message.replace("DICOM-SEG", "RTSTRUCT output").replace("a SEG", "an RTSTRUCT")
        raise OutputError(code, message) from exc
    uids = [str(d.SOPInstanceUID) for d in datasets]
    if len(set(uids)) != len(uids):
        raise OutputError("RTSTRUCT_SOURCE_INCOMPLETE", "source images share a SOPInstanceUID; contours could not "
                                                        "reference their image")
    return datasets


def _stage_series(candidate: VolumeCandidate, headers: Sequence[Dataset], folder: Path, swap_spacing: bool) -> None:
    """The source slices (only those) in ``folder``, as rt-utils can read them."""
    assert candidate.geometry is not None
    linked = rewritten = 0
    for index, (item, header) in enumerate(zip(candidate.geometry.slices, headers, strict=True)):
        source, target = item.source, folder / f"{index:05d}.dcm"
        plain = source.member is None and not source.gzipped
        with source.open() as handle:
            data = None if plain else handle.read()
            # What the file holds (the slice's cached header may already carry repairs made for a SEG)
            on_disk = dcmread(handle if data is None else io.BytesIO(data), stop_before_pixels=True,
                              specific_tags=list(_RT_UTILS_KEYS))
        repairs = [k for k in _RT_UTILS_KEYS if on_disk.get(k) != header.get(k)]
        if repairs or swap_spacing:
            if data is None:
                data = source.path.read_bytes()
            full = dcmread(io.BytesIO(data))
            for keyword in repairs:
                setattr(full, keyword, header.get(keyword))
            if swap_spacing:
                row_spacing, column_spacing = full.PixelSpacing
                full.PixelSpacing = [column_spacing, row_spacing]
            full.save_as(target)
            rewritten += 1
        elif data is not None:
            target.write_bytes(data)
            rewritten += 1
        else:
            try:
                target.symlink_to(source.path.resolve())
            except OSError:
                shutil.copyfile(source.path, target)
            linked += 1
    log.debug("staged %d source image(s) for rt-utils (%d linked, %d rewritten)", linked + rewritten, linked,
              rewritten)


def _stack_order(series_data: Sequence[Dataset], headers: Sequence[Dataset]) -> list[int]:
    """For each image in rt-utils' order, its index in the stack (matched by SOPInstanceUID)."""
    index = {str(h.SOPInstanceUID): k for k, h in enumerate(headers)}
    theirs = [str(d.SOPInstanceUID) for d in series_data]
    if len(theirs) != len(index) or set(theirs) != set(index):
        raise OutputError("RTSTRUCT_SOURCE_UNREADABLE", f"rt-utils read {len(set(theirs) & set(index))} of the "
                                                        f"{len(index)} source images (pixel data it cannot decode?)")
    return [index[uid] for uid in theirs]


def _roi_names(labels: Sequence[Label]) -> list[str]:
    names: list[str] = []
    for label in labels:
        name = label.name[:64] or f"label_{label.value}"
        if name in names:
            name = f"{name[:56]}_{label.value}"
        names.append(name)
    return names


def _now() -> tuple[str, str]:
    now = datetime.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _finish_header(ds: Dataset, source: Dataset, algorithm: SegAlgorithm, labels: Sequence[Label], *,
                   series_number: int, software_version: str) -> None:
    """Tessera's identity, the source's patient and study modules (repaired), and rt-utils' placeholders
    replaced."""
    for keyword in _STUDY_AND_PATIENT:
        setattr(ds, keyword, source.get(keyword, ""))
    for keyword in _OPTIONAL_COPIED:
        if source.get(keyword) not in (None, ""):
            setattr(ds, keyword, source.get(keyword))
        elif keyword in ds:
            delattr(ds, keyword)
    if source.get("SpecificCharacterSet"):
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.FrameOfReferenceUID = source.FrameOfReferenceUID  # the Frame of Reference module of the IOD
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    ds.OperatorsName = ""  # Type 2 in the RT Series module
    date, time = _now()
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = f"Tessera {algorithm.name}"[:64]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = 1
    ds.Manufacturer = "Tessera"
    ds.ManufacturerModelName = algorithm.name[:64]
    ds.SoftwareVersions = software_version
    ds.StructureSetLabel = "TESSERA"
    ds.StructureSetName = algorithm.name[:64]
    ds.StructureSetDescription = f"Automatic segmentation by {algorithm.name} {algorithm.version}"
    description = f"{algorithm.name} {algorithm.version}"[:64]
    for roi in ds.StructureSetROISequence:
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = description
    for observation, label in zip(ds.RTROIObservationsSequence, labels, strict=True):
        if "ROIObservationDescription" in observation:  # rt-utils' viewer hints
            del observation.ROIObservationDescription
        category, _ = segment_codes(label.name, label.code)
        anatomical = category.value == ANATOMICAL_STRUCTURE.value and category.scheme_designator == "SCT"
        observation.RTROIInterpretedType = "ORGAN" if anatomical else ""


def _snap_contours(ds: Dataset, headers: Sequence[Dataset]) -> None:
    """Contour points exactly on the plane of the image they reference, as decimal strings DICOM accepts.

    rt-utils places slice k at first + k x (mean spacing); the source slices may sit a little off that."""
    normal = np.cross(np.asarray(headers[0].ImageOrientationPatient[:3], float),
                      np.asarray(headers[0].ImageOrientationPatient[3:], float))
    along = {str(h.SOPInstanceUID): float(np.dot(np.asarray(h.ImagePositionPatient, float), normal))
             for h in headers}
    for roi_contour in ds.ROIContourSequence:
        for contour in roi_contour.get("ContourSequence", []):
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            target = along[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            points += np.outer(target - points @ normal, normal)
            contour.ContourData = [format_number_as_ds(float(v) + 0.0) for v in np.round(points, 4).ravel()]
            contour.NumberOfContourPoints = len(points)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def rasterise_rtstruct(ds: Dataset, candidate: VolumeCandidate,
                       headers: Sequence[Dataset] | None = None) -> dict[int, np.ndarray]:
    """ROI number -> its contours filled on the stack grid ``[column, row, slice]``, in Tessera's geometry
    (``headers``: the repaired source headers in stack order, as the RTSTRUCT references them).

    Contours are placed by ReferencedSOPInstanceUID; a contour that references no image of the stack or
    lies off its image's plane raises ``RTSTRUCT_VERIFY_FAILED``. Contours of one slice are filled together
    (even-odd: a contour inside another is a hole)."""
    import cv2

    geometry = candidate.geometry
    assert geometry is not None
    columns, rows, count = geometry.shape
    to_voxel = np.linalg.inv(_LPS_TO_RAS @ geometry.affine)  # LPS mm -> [column, row, slice]
    normal = geometry.slices[0].normal
    assert normal is not None
    headers = _source_headers(candidate) if headers is None else headers
    index = {str(header.SOPInstanceUID): (k, float(np.dot(item.position, normal)))  # type: ignore[arg-type]
             for k, (item, header) in enumerate(zip(geometry.slices, headers, strict=True))}
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    masks: dict[int, np.ndarray] = {}
    for roi_contour in ds.ROIContourSequence:
        number = int(roi_contour.ReferencedROINumber)
        polygons: dict[int, list[np.ndarray]] = {}
        for contour in roi_contour.get("ContourSequence", []):
            uid = str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)
            if uid not in index:
                raise OutputError("RTSTRUCT_VERIFY_FAILED", f"ROI '{names.get(number)}' has a contour on an image "
                                                            "outside the source series; nothing was kept")
            k, along = index[uid]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
            off_plane = float(np.abs(points @ normal - along).max())
            if off_plane > PLANE_TOLERANCE_MM:
                raise OutputError("RTSTRUCT_VERIFY_FAILED", f"ROI '{names.get(number)}' has a contour {off_plane:.3f} "
                                                            f"mm off the plane of slice {k}; nothing was kept")
            voxels = (np.c_[points, np.ones(len(points))] @ to_voxel.T)[:, :2]
            polygons.setdefault(k, []).append(np.rint(voxels).astype(np.int32).reshape(-1, 1, 2))
        mask = np.zeros((columns, rows, count), dtype=bool)
        for k, shapes in polygons.items():
            plane = np.zeros((rows, columns), dtype=np.uint8)
            cv2.fillPoly(plane, shapes, 1)
            mask[:, :, k] = plane.T.astype(bool)
        masks[number] = mask
    return masks


def _rt_utils_dice(theirs: np.ndarray, ours: np.ndarray) -> tuple[float, int]:
    """Dice of rt-utils' read-back against ours (both in rt-utils' slice order, ours ``[row, column]``), and
    the voxels of ours compared. rt-utils 1.2.7 sizes its masks Columns x Rows but indexes them [row, column]:
    on non-square images it is compared inside the square it can hold (the full images are compared by the
    independent read-back)."""
    if theirs.shape == ours.shape:
        return _dice(theirs, ours), int(ours.sum())
    rows, columns = ours.shape[:2]
    if theirs.shape != (columns, rows, ours.shape[2]):
        return 0.0, int(ours.sum())
    side = min(rows, columns)
    window, inside = theirs[:side, :side], ours[:side, :side]
    transposed = _dice(theirs.transpose(1, 0, 2), ours)  # in case a later rt-utils indexes [column, row]
    return max((_dice(window, inside), int(inside.sum())), (transposed, int(ours.sum())))


def _verify(path: Path, staged: Path, builder: Any, labels: np.ndarray, candidate: VolumeCandidate,
            headers: Sequence[Dataset], rois: Sequence[tuple[int, str, Label]], order: Sequence[int]) -> None:
    written = dcmread(path)
    ours_world = rasterise_rtstruct(written, candidate, headers)
    try:
        back = builder.create_from(dicom_series_path=str(staged), rt_struct_path=str(path))
        theirs = {name: np.asarray(back.get_roi_mask_by_name(name), dtype=bool) for _, name, _ in rois}
    except Exception as exc:  # rt-utils raises bare Exceptions
        raise OutputError("RTSTRUCT_VERIFY_FAILED", f"rt-utils cannot read the written RTSTRUCT back ({exc}); "
                                                    "nothing was kept") from exc
    shortfalls = []
    for number, name, label in rois:
        mask = labels == label.value
        world = _dice(ours_world.get(number, np.zeros_like(mask)), mask)
        rt_dice, rt_voxels = _rt_utils_dice(theirs[name], mask[:, :, order].transpose(1, 0, 2))
        voxels = int(mask.sum())
        log.info("RTSTRUCT ROI '%s' (%d voxels) read back with Dice %.4f in Tessera's geometry, %.4f by rt-utils (on "
                 "%d voxels)", name, voxels, world, rt_dice, rt_voxels)
        if voxels >= MIN_VERIFIED_VOXELS and world < MIN_DICE:
            shortfalls.append(f"'{name}' Dice {world:.3f} in Tessera's geometry")
        elif voxels and not ours_world.get(number, mask[:0]).any():
            shortfalls.append(f"'{name}' ({voxels} voxels) has no contour")
        if rt_voxels >= MIN_VERIFIED_VOXELS and rt_dice < MIN_DICE:
            shortfalls.append(f"'{name}' Dice {rt_dice:.3f} read back by rt-utils")
    if shortfalls:
        raise OutputError("RTSTRUCT_VERIFY_FAILED", f"the written RTSTRUCT does not read back as the mask (Dice >= "
                                                    f"{MIN_DICE} required): {'; '.join(shortfalls)}; nothing was kept")


def write_rtstruct(
    labels: np.ndarray,
    candidate: VolumeCandidate,
    label_table: Sequence[Label],
    algorithm: SegAlgorithm,
    path: Path,
    *,
    series_number: int = 7002,
    software_version: str = "0",
) -> Path:
    """Write ``labels`` (on the source stack grid ``[column, row, slice]``) as an RTSTRUCT of the series.

    One ROI per label of ``label_table`` present in the mask. The file is read back (by rt-utils and
    independently) and compared with the mask; a shortfall raises ``RTSTRUCT_VERIFY_FAILED`` and removes it.
    """
    builder = _rt_utils()
    check_source_grid(candidate, labels.shape, kind="RTSTRUCT")
    headers = _source_headers(candidate)
    present = {int(v) for v in np.unique(labels) if v > 0}
    ordered = [lbl for lbl in sorted(label_table, key=lambda lbl: lbl.value) if lbl.value in present]
    unknown = present - {lbl.value for lbl in label_table}
    if unknown:
        log.warning("mask values %s are not in the label table; left out of the RTSTRUCT", sorted(unknown))
    if not ordered:
        raise OutputError("RTSTRUCT_EMPTY", "the mask holds none of the labels; an RTSTRUCT needs at least one ROI")
    rois = list(zip(range(1, len(ordered) + 1), _roi_names(ordered), ordered, strict=True))
    swap = rt_utils_swaps_pixel_spacing()
    with tempfile.TemporaryDirectory(prefix="tessera-rtstruct-") as tmp:
        staged = Path(tmp)
        row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
        try:
            _stage_series(candidate, headers, staged, swap_spacing=swap and not np.isclose(row_spacing, column_spacing))
        except Exception as exc:  # unreadable or unwritable source copies: pydicom and OS errors alike
            raise OutputError("RTSTRUCT_FAILED", f"could not stage the source images for rt-utils ({exc})") from exc
        try:
            with _quiet_pydicom_deprecations():
                rtstruct = builder.create_new(dicom_series_path=str(staged))
            order = _stack_order(rtstruct.series_data, headers)
            stack = labels[:, :, order].transpose(1, 0, 2)  # (row, column, slice) in rt-utils' order
            for _, name, label in rois:
                color = [int(c) for c in label.color] if label.color else None
                rtstruct.add_roi(mask=stack == label.value, color=color, name=name, roi_generation_algorithm=0)
        except OutputError:
            raise
        except Exception as exc:  # rt-utils raises bare Exceptions
            raise OutputError("RTSTRUCT_FAILED", f"rt-utils could not contour the mask ({exc})") from exc
        ds = rtstruct.ds
        _finish_header(ds, headers[0], algorithm, ordered, series_number=series_number,
                       software_version=software_version)
        _snap_contours(ds, headers)
        ds.save_as(path, enforce_file_format=True)
        try:
            _verify(path, staged, builder, labels, candidate, headers, rois, order)
        except OutputError:
            path.unlink(missing_ok=True)
            raise
    log.info("wrote RTSTRUCT %s: %d ROI(s) on %s", path.name, len(rois), candidate.label)
    return path
