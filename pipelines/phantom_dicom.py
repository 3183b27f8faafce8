"""Write volumes (phantoms) as DICOM CT series, for tests and benchmarks of DICOM ingestion.

Conventions (the inverse of :mod:`pipelines.ingestion.dicom`):

* ``array_hu`` is indexed ``[i, j, k]`` and ``affine_ras`` maps voxel indices to RAS+ millimetres
  (NIfTI convention). DICOM patient coordinates are LPS: x and y of the affine are negated.
* One file (one image) per index ``k`` along the array's third axis. Along a DICOM row the column index
  grows, so the row direction cosine (the first triplet of ImageOrientationPatient) is the affine's first
  column normalised; the column direction cosine (second triplet) is its second column normalised.
  The stored pixels are ``array[:, :, k].T`` (``Rows x Columns``), and
  ``PixelSpacing = [row spacing, column spacing] = [|second column|, |first column|]``.
* ImagePositionPatient is the centre of voxel ``(0, 0, k)`` in LPS. SliceThickness is the slice spacing
  along the image normal and SliceLocation the position projected on that normal.
* Voxel values are Hounsfield units = stored value x RescaleSlope + RescaleIntercept. ``signed=True``
  stores int16 values with intercept 0; ``signed=False`` stores uint16 values ``HU + 1024`` with
  intercept -1024, as many scanners do (values below -1024 HU cannot be stored then).
* Transfer syntaxes: explicit and implicit VR little endian, RLE Lossless and JPEG 2000 Lossless (through
  ``Dataset.compress``; pylibjpeg). JPEG 2000 needs images of at least 32 x 32 pixels (the encoder always
  uses 6 wavelet resolutions).
* UIDs come from :func:`pydicom.uid.generate_uid`; with ``uid_seed`` they are derived from the seed
  (``entropy_srcs``), so the same seed and options give the same files, byte for byte.

"Bad" series for tests of the reader's refusals: ``drop_slices`` (a gap: MISSING_SLICES),
``duplicate_slice`` (a second image at one position: DUPLICATE_SLICE_POSITIONS) and ``tilt_degrees``
(a gantry tilt: the image plane is rotated about the row direction while the slice positions keep moving
along the untilted slice axis, the pattern of tilted CT acquisitions; GantryDetectorTilt is set too).
:func:`write_localizer` writes a one-image localizer (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) in the
coronal plane.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from pipelines.phantoms import Phantom, make_phantom

log = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless)
SUPPORTED_SYNTAXES = UNCOMPRESSED_SYNTAXES + COMPRESSED_SYNTAXES
UNSIGNED_INTERCEPT = -1024
J2K_MIN_SIZE = 32
_FLIP = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
_DATE, _TIME = "20240101", "120000"
FileNames = Literal["instance", "shuffled"]


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS), as precise as fits."""
    return format_number_as_ds(float(value) + 0.0)  # + 0.0: no "-0"


def _ds_list(values: Sequence[float] | np.ndarray) -> list[str]:
    return [_ds(v) for v in values]


def _uid(uid_seed: str | int | None, *parts: object) -> UID:
    if uid_seed is None:
        return generate_uid()
    return generate_uid(entropy_srcs=["tessera-phantom-dicom", str(uid_seed), *(str(p) for p in parts)])


def _stored_pixels(plane_hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> stored values (int16, or uint16 with the -1024 intercept), refusing what does not fit."""
    values = np.asarray(plane_hu)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise ValueError("array_hu must hold whole Hounsfield units (integers)")
        values = np.round(values).astype(np.int64)
    dtype: type[np.integer] = np.int16 if signed else np.uint16
    offset = 0 if signed else -UNSIGNED_INTERCEPT
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    shifted = values.astype(np.int64) + offset
    if shifted.size and (shifted.min() < low or shifted.max() > high):
        raise ValueError(f"values {values.min()}..{values.max()} HU do not fit {np.dtype(dtype).name} storage"
                         + ("" if signed else " with intercept -1024"))
    return np.ascontiguousarray(shifted.astype(dtype))


def _base_dataset(
    *,
    sop_instance_uid: UID,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    series_description: str,
    patient_id: str,
    patient_name: str,
    image_type: Sequence[str],
) -> Dataset:
    """The modules of the CT Image IOD common to every image of a series (Type 1 and 2 attributes)."""
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = _DATE
    ds.InstanceCreationTime = _TIME
    # Patient (Type 2: present, may be empty)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    # General Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = _DATE
    ds.StudyTime = _TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Tessera synthetic study"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.SeriesDate = _DATE
    ds.SeriesTime = _TIME
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = "Tessera"
    ds.ManufacturerModelName = "phantom_dicom"
    ds.SoftwareVersions = "tessera"
    # General Image / General Acquisition
    ds.ImageType = list(image_type)
    ds.AcquisitionNumber = 1
    ds.ContentDate = _DATE
    ds.ContentTime = _TIME
    ds.AcquisitionDate = _DATE
    ds.AcquisitionTime = _TIME
    # CT Image (Type 2 acquisition parameters left empty: a phantom has none)
    ds.KVP = ""
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, signed: bool, transfer_syntax: UID) -> None:
    """Image Pixel module + PixelData (encoded for compressed transfer syntaxes)."""
    rows, columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = "0" if signed else str(UNSIGNED_INTERCEPT)
    ds.RescaleSlope = "1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TESSERA_PHANTOM"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if transfer_syntax == JPEG2000Lossless and min(rows, columns) < J2K_MIN_SIZE:
        # pylibjpeg-openjpeg always uses 6 wavelet resolutions, which need 2**5 pixels along each side.
        raise ValueError(f"JPEG 2000 encoding needs images of at least {J2K_MIN_SIZE} x {J2K_MIN_SIZE} pixels, "
                         f"got {rows} x {columns}")
    if transfer_syntax in COMPRESSED_SYNTAXES:
        ds.compress(transfer_syntax, arr=pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
        meta.TransferSyntaxUID = transfer_syntax


def _save(ds: Dataset, path: Path, gzip_file: bool) -> None:
    if not gzip_file:
        ds.save_as(path, enforce_file_format=True)
        return
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0))


def _check_syntax(transfer_syntax: str) -> UID:
    syntax = UID(str(transfer_syntax))
    if syntax not in SUPPORTED_SYNTAXES:
        names = ", ".join(UID(s).name for s in SUPPORTED_SYNTAXES)
        raise ValueError(f"transfer syntax {syntax.name or syntax} is not supported here; use one of: {names}")
    return syntax


def write_ct_series(
    array_hu: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: str | Path,
    *,
    series_number: int = 1,
    series_description: str = "Tessera phantom",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_names: FileNames = "instance",
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Tessera",
    uid_seed: str | int | None = None,
    signed: bool = True,
    drop_slices: Sequence[int] = (),
    duplicate_slice: int | None = None,
    tilt_degrees: float = 0.0,
    gzip_files: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``array_hu`` (``[i, j, k]``, whole HU) as a CT Image Storage series, one file per ``k``.

    See the module docstring for the geometry and value conventions. ``file_names="instance"`` names files
    ``S<series>_I<instance>.dcm`` (name order = slice order); ``"shuffled"`` gives names whose order is a
    random permutation of the slices. ``drop_slices`` omits those ``k``; ``duplicate_slice`` writes slice
    ``k`` a second time (same position and pixels, its own SOP Instance UID); ``tilt_degrees`` tilts the
    image plane about the row direction (gantry tilt). ``gzip_files`` writes ``.dcm.gz`` files.
    ``progress(done, total)`` is called after each file. Returns the paths written, in slice order.
    """
    array = np.asarray(array_hu)
    if array.ndim != 3:
        raise ValueError(f"array_hu must be 3-D [i, j, k], got shape {array.shape}")
    affine = np.asarray(affine_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine_ras must be 4x4, got {affine.shape}")
    if file_names not in ("instance", "shuffled"):
        raise ValueError(f"file_names must be 'instance' or 'shuffled', got {file_names!r}")
    syntax = _check_syntax(transfer_syntax)
    n_slices = array.shape[2]
    dropped = {int(k) for k in drop_slices}
    if any(not 0 <= k < n_slices for k in dropped):
        raise ValueError(f"drop_slices must be in 0..{n_slices - 1}")
    if duplicate_slice is not None and not 0 <= duplicate_slice < n_slices:
        raise ValueError(f"duplicate_slice must be in 0..{n_slices - 1}")

    lps = _FLIP @ affine[:3, :3]
    origin = _FLIP @ affine[:3, 3]
    column_spacing = float(np.linalg.norm(lps[:, 0]))
    row_spacing = float(np.linalg.norm(lps[:, 1]))
    row_cosine = lps[:, 0] / column_spacing
    column_cosine = lps[:, 1] / row_spacing
    step = lps[:, 2]
    if tilt_degrees:
        across = step - np.dot(step, row_cosine) * row_cosine
        across /= np.linalg.norm(across)
        angle = np.deg2rad(tilt_degrees)
        column_cosine = np.cos(angle) * column_cosine - np.sin(angle) * across
        column_cosine -= np.dot(column_cosine, row_cosine) * row_cosine
        column_cosine /= np.linalg.norm(column_cosine)
    normal = np.cross(row_cosine, column_cosine)
    thickness = abs(float(np.dot(step, normal)))

    study_uid = study_uid or _uid(uid_seed, "study")
    series_uid = series_uid or _uid(uid_seed, "series", series_number)
    frame_of_reference_uid = frame_of_reference_uid or _uid(uid_seed, "frame-of-reference")
    order = [k for k in range(n_slices) if k not in dropped]
    if duplicate_slice is not None:
        order.insert(order.index(duplicate_slice) + 1 if duplicate_slice in order else len(order), duplicate_slice)
    shuffled: np.ndarray | None = None
    if file_names == "shuffled":
        # The permutation follows the seed (through its UID digits: str hashes are salted per process).
        name_seed = None if uid_seed is None else int(_uid(uid_seed, "names", series_number).rsplit(".", 1)[-1])
        shuffled = np.random.default_rng(name_seed).permutation(len(order))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".dcm.gz" if gzip_files else ".dcm"
    paths: list[Path] = []
    for index, k in enumerate(order):
        instance = index + 1
        position = origin + k * step
        ds = _base_dataset(
            sop_instance_uid=_uid(uid_seed, "series", series_number, "instance", instance),
            study_uid=study_uid,
            series_uid=series_uid,
            frame_of_reference_uid=frame_of_reference_uid,
            series_number=series_number,
            series_description=series_description,
            patient_id=patient_id,
            patient_name=patient_name,
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        )
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = _ds_list(position)
        ds.ImageOrientationPatient = _ds_list([*row_cosine, *column_cosine])
        ds.PixelSpacing = _ds_list([row_spacing, column_spacing])
        ds.SliceThickness = _ds(thickness)
        ds.SliceLocation = _ds(float(np.dot(position, normal)))
        if tilt_degrees:
            ds.GantryDetectorTilt = _ds(tilt_degrees)
        _set_pixels(ds, _stored_pixels(array[:, :, k].T, signed), signed=signed, transfer_syntax=syntax)
        stem = f"S{series_number:03d}_" + (f"I{instance:05d}" if shuffled is None else f"X{shuffled[index]:05d}")
        path = out / f"{stem}{suffix}"
        _save(ds, path, gzip_files)
        paths.append(path)
        if progress is not None:
            progress(index + 1, len(order))
    log.debug("wrote %d image(s) of series %s to %s (%s)", len(paths), series_number, out, syntax.name)
    return paths


def write_phantom_series(
    seed: int,
    out_dir: str | Path,
    *,
    orientation: str | None = None,
    spacing: Sequence[float] | None = None,
    **kw: object,
) -> tuple[list[Path], Phantom]:
    """:func:`make_phantom` ``(seed, orientation, spacing)`` written with :func:`write_ct_series` (``**kw``)."""
    phantom = make_phantom(seed, orientation=orientation, spacing=spacing)
    array = np.asarray(phantom.image.dataobj)
    paths = write_ct_series(array, phantom.image.affine, out_dir, **kw)  # type: ignore[arg-type]
    return paths, phantom


def write_localizer(
    out_dir: str | Path,
    *,
    array_hu: np.ndarray | None = None,
    affine_ras: np.ndarray | None = None,
    series_number: int = 99,
    series_description: str = "Tessera localizer",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "PHANTOM",
    patient_name: str = "Phantom^Tessera",
    uid_seed: str | int | None = None,
    file_name: str = "localizer.dcm",
) -> Path:
    """A one-image localizer series (ImageType ORIGINAL\\PRIMARY\\LOCALIZER) in the coronal plane.

    With ``array_hu`` and ``affine_ras`` the image is the volume's mean along anterior-posterior (taken in
    the closest canonical orientation, so placement is exact only for volumes aligned with the axes), placed
    through the volume's centre; without them, a 64 x 64 ramp at the origin with 4 mm pixels.
    """
    syntax = _check_syntax(transfer_syntax)
    # Coronal plane in LPS: along a row towards the patient's left (+x), down the columns towards the feet (-z).
    row_cosine = np.array([1.0, 0.0, 0.0])
    column_cosine = np.array([0.0, 0.0, -1.0])
    if array_hu is not None and affine_ras is not None:
        canonical = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array_hu, dtype=np.float32),
                                                             np.asarray(affine_ras, dtype=np.float64)))
        data = np.asarray(canonical.dataobj, dtype=np.float32)
        zooms = canonical.header.get_zooms()[:3]
        projection = data.mean(axis=1)  # [R->L index i, S index k] in RAS index order
        # pixel[r, c]: c grows towards the left (i decreasing), r towards the feet (k decreasing).
        plane = np.round(projection[::-1, ::-1].T)
        n_i, n_j, n_k = data.shape
        first_ras = canonical.affine @ np.array([n_i - 1, (n_j - 1) / 2, n_k - 1, 1.0])
        position = _FLIP @ first_ras[:3]
        row_spacing, column_spacing = float(zooms[2]), float(zooms[0])
    else:
        rows = columns = 64
        plane = np.add.outer(np.arange(rows) * 10.0, np.arange(columns) * 5.0) - 1000.0
        position = np.zeros(3)
        row_spacing = column_spacing = 4.0
    ds = _base_dataset(
        sop_instance_uid=_uid(uid_seed, "localizer", series_number, "instance", 1),
        study_uid=study_uid or _uid(uid_seed, "study"),
        series_uid=_uid(uid_seed, "series", series_number),
        frame_of_reference_uid=frame_of_reference_uid or _uid(uid_seed, "frame-of-reference"),
        series_number=series_number,
        series_description=series_description,
        patient_id=patient_id,
        patient_name=patient_name,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = _ds_list(position)
    ds.ImageOrientationPatient = _ds_list([*row_cosine, *column_cosine])
    ds.PixelSpacing = _ds_list([row_spacing, column_spacing])
    ds.SliceThickness = ""
    _set_pixels(ds, _stored_pixels(plane, True), signed=True, transfer_syntax=syntax)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name
    _save(ds, path, gzip_file=file_name.endswith(".gz"))
    return path


# PET: what SUVbw needs, as a scanner writes it (Units BQML, decay corrected to the series start).
PET_HALF_LIFE_S = 6586.2  # F-18
PET_DOSE_BQ = 3.7e8
PET_WEIGHT_KG = 75.0
PET_UPTAKE_S = 3600.0  # injection at 11:00, series at 12:00


def write_pet_series(
    suv: np.ndarray,
    affine_ras: np.ndarray,
    out_dir: str | Path,
    *,
    series_number: int = 2,
    series_description: str = "Tessera phantom PET",
    decay_information: bool = True,
    **kw: object,
) -> list[Path]:
    """Write SUV values as a PET Image Storage series in Bq/mL (Units BQML, DecayCorrection START), with the
    patient weight and radiopharmaceutical information that SUVbw needs, so that reading it back gives ``suv``
    again (to the storage's 16-bit precision). ``decay_information=False`` leaves out the injection time and
    half-life (a PET whose values must stay in Bq/mL). Other keywords as for :func:`write_ct_series` (share
    ``study_uid`` and ``frame_of_reference_uid`` with a CT to make one PET/CT study)."""
    decay = 2.0 ** (-PET_UPTAKE_S / PET_HALF_LIFE_S)
    bq_ml = np.asarray(suv, np.float64) * PET_DOSE_BQ * decay / (PET_WEIGHT_KG * 1000.0)
    slope = max(float(bq_ml.max()), 1.0) / 32000.0
    stored = np.round(bq_ml / slope).astype(np.int16)
    paths = write_ct_series(stored, affine_ras, out_dir, series_number=series_number,
                            series_description=series_description, **kw)  # type: ignore[arg-type]
    from pydicom import dcmread
    from pydicom.uid import PositronEmissionTomographyImageStorage

    for path in paths:
        ds = dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PositronEmissionTomographyImageStorage
        ds.Modality = "PT"
        for keyword in ("KVP", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleIntercept = "0"
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["DECY", "ATTN"]
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.PatientWeight = _ds(PET_WEIGHT_KG)
        ds.WindowCenter, ds.WindowWidth = _ds(float(bq_ml.max()) / 4), _ds(float(bq_ml.max()) / 2)
        item = Dataset()
        item.Radiopharmaceutical = "Fluorodeoxyglucose F^18^"
        item.RadionuclideTotalDose = _ds(PET_DOSE_BQ)
        if decay_information:
            item.RadionuclideHalfLife = _ds(PET_HALF_LIFE_S)
            item.RadiopharmaceuticalStartTime = "110000"
        ds.RadiopharmaceuticalInformationSequence = [item]
        ds.save_as(path, enforce_file_format=True)
    return paths


def write_hnc_study(seed: int, out_dir: str | Path, *, uid_seed: str | int | None = None,
                    decay_information: bool = True, with_pet: bool = True) -> list[Path]:
    """A head-and-neck PET/CT phantom (:func:`pipelines.phantoms_hnc.make_hnc_phantom`) as one DICOM study:
    CT series 1 and PET series 2 sharing the study and frame of reference, each on its own grid."""
    from pipelines.phantoms_hnc import make_hnc_phantom

    phantom = make_hnc_phantom(seed)
    study, frame = _uid(uid_seed, "hnc-study", seed), _uid(uid_seed, "hnc-for", seed)
    out = Path(out_dir)
    paths = write_ct_series(np.asarray(phantom.ct.dataobj), phantom.ct.affine, out, series_number=1,
                            series_description="Tessera phantom CT", uid_seed=uid_seed, study_uid=study,
                            frame_of_reference_uid=frame)
    if with_pet:
        paths += write_pet_series(np.asarray(phantom.pet.dataobj), phantom.pet.affine, out,
                                  decay_information=decay_information, uid_seed=uid_seed, study_uid=study,
                                  frame_of_reference_uid=frame)
    return paths


EnhancedMRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4.1")
MRImageStorage = UID("1.2.840.10008.5.1.4.1.1.4")


def write_enhanced_mr(
    volumes: Sequence[tuple[float, str, np.ndarray, float, float]],
    affine_ras: np.ndarray,
    path: str | Path,
    *,
    uid_seed: str | int | None = None,
    series_number: int = 301,
    series_description: str = "Tessera enhanced MR",
) -> Path:
    """Several volumes in one enhanced multi-frame MR file, frames interleaved slice by slice as Philips
    stores them: ``volumes`` holds (effective echo time, complex image component MAGNITUDE|PHASE|REAL|IMAGINARY,
    stored uint16 values ``[i, j, k]``, rescale slope, rescale intercept) per volume; each frame carries its own
    MR Image Frame Type (Frame Type value 4 M/P/R/I and ComplexImageComponent), MR Echo and Pixel Value
    Transformation. ImageType is MIXED when the components differ. Geometry as :func:`write_ct_series`."""
    affine = np.asarray(affine_ras, dtype=np.float64)
    lps, origin = _FLIP @ affine[:3, :3], _FLIP @ affine[:3, 3]
    column_spacing, row_spacing = float(np.linalg.norm(lps[:, 0])), float(np.linalg.norm(lps[:, 1]))
    row_cosine, column_cosine = lps[:, 0] / column_spacing, lps[:, 1] / row_spacing
    thickness = abs(float(np.dot(lps[:, 2], np.cross(row_cosine, column_cosine))))
    shape = volumes[0][2].shape
    components = {component for _, component, _, _, _ in volumes}
    ds = _base_dataset(sop_instance_uid=_uid(uid_seed, "enhanced", series_number), study_uid=_uid(uid_seed, "study"),
                       series_uid=_uid(uid_seed, "series", series_number),
                       frame_of_reference_uid=_uid(uid_seed, "frame-of-reference"), series_number=series_number,
                       series_description=series_description, patient_id="PHANTOM", patient_name="Phantom^Tessera",
                       image_type=("ORIGINAL", "PRIMARY", "T1", "MIXED" if len(components) > 1 else
                                   _FRAME_TYPE_PART[components.pop()]))
    ds.SOPClassUID, ds.Modality = EnhancedMRImageStorage, "MR"
    for keyword in ("KVP", "RescaleType", "WindowCenter", "WindowWidth"):
        delattr(ds, keyword)
    ds.InstanceNumber = 1
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _ds_list([row_spacing, column_spacing])
    measures.SliceThickness = _ds(thickness)
    orientation = Dataset()
    orientation.ImageOrientationPatient = _ds_list([*row_cosine, *column_cosine])
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, planes = [], []
    for k in range(shape[2]):
        for echo_time, component, stored, slope, intercept in volumes:
            group = Dataset()
            position = Dataset()
            position.ImagePositionPatient = _ds_list(origin + k * lps[:, 2])
            content = Dataset()
            content.StackID, content.InStackPositionNumber = "1", k + 1
            content.TemporalPositionIndex = 1
            frame_type = Dataset()
            frame_type.FrameType = ["ORIGINAL", "PRIMARY", "T1", _FRAME_TYPE_PART[component]]
            frame_type.ComplexImageComponent = component
            echo = Dataset()
            echo.EffectiveEchoTime = float(echo_time)
            transform = Dataset()
            transform.RescaleSlope, transform.RescaleIntercept = _ds(slope), _ds(intercept)
            transform.RescaleType = "US"
            group.PlanePositionSequence, group.FrameContentSequence = [position], [content]
            group.MRImageFrameTypeSequence, group.MREchoSequence = [frame_type], [echo]
            group.PixelValueTransformationSequence = [transform]
            frames.append(group)
            planes.append(np.asarray(stored[:, :, k].T, dtype=np.uint16))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = shape[1], shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack(planes).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


_FRAME_TYPE_PART = {"MAGNITUDE": "M", "PHASE": "P", "REAL": "R", "IMAGINARY": "I"}


UIH_PRIVATE_CREATOR = "Image Private Header"


def write_uih_grid_series(
    volumes: Sequence[np.ndarray],
    affine_ras: np.ndarray,
    out_dir: str | Path,
    *,
    uid_seed: str | int | None = None,
    slice_positions: bool = True,
    series_number: int = 401,
    series_description: str = "Tessera UIH grid DWI",
) -> list[Path]:
    """A United Imaging "grid" MR series (diffusion saved by volume): one classic MR image per volume whose
    pixels hold all its slices as tiles of a square grid (slice ``k`` at tile row ``k // n``, column ``k % n``,
    ``n = ceil(sqrt(slices))``, as dcm2niix and GDCM read them). The image has no ImagePositionPatient of its
    own; the private block "Image Private Header" in group 0065 holds the slice count (0065,xx50) and, with
    ``slice_positions``, one ImagePositionPatient per slice in a sequence (0065,xx51). ``volumes`` holds stored
    uint16 values ``[i, j, k]``, geometry as :func:`write_ct_series`; volume ``v`` has AcquisitionNumber v + 1."""
    affine = np.asarray(affine_ras, dtype=np.float64)
    lps, origin = _FLIP @ affine[:3, :3], _FLIP @ affine[:3, 3]
    column_spacing, row_spacing = float(np.linalg.norm(lps[:, 0])), float(np.linalg.norm(lps[:, 1]))
    row_cosine, column_cosine = lps[:, 0] / column_spacing, lps[:, 1] / row_spacing
    shape = volumes[0].shape
    side = int(np.ceil(np.sqrt(shape[2])))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, stored in enumerate(volumes):
        ds = _base_dataset(sop_instance_uid=_uid(uid_seed, "uih-grid", series_number, index),
                           study_uid=_uid(uid_seed, "study"), series_uid=_uid(uid_seed, "series", series_number),
                           frame_of_reference_uid=_uid(uid_seed, "frame-of-reference"), series_number=series_number,
                           series_description=series_description, patient_id="PHANTOM",
                           patient_name="Phantom^Tessera", image_type=("ORIGINAL", "PRIMARY", "M", "DIFFUSION"))
        ds.SOPClassUID, ds.Modality, ds.Manufacturer = MRImageStorage, "MR", "UIH"
        for keyword in ("KVP", "RescaleType", "WindowCenter", "WindowWidth"):
            delattr(ds, keyword)
        ds.InstanceNumber, ds.AcquisitionNumber = index + 1, index + 1
        ds.ImageOrientationPatient = _ds_list([*row_cosine, *column_cosine])
        ds.PixelSpacing = _ds_list([row_spacing, column_spacing])
        ds.SliceThickness = _ds(abs(float(np.dot(lps[:, 2], np.cross(row_cosine, column_cosine)))))
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "EP", "SK", "", "2D"
        ds.EchoTrainLength = 1
        block = ds.private_block(0x0065, UIH_PRIVATE_CREATOR, create=True)
        block.add_new(0x50, "DS", str(shape[2]))
        if slice_positions:
            items = []
            for k in range(shape[2]):
                item = Dataset()
                item.ImagePositionPatient = _ds_list(origin + k * lps[:, 2])
                items.append(item)
            block.add_new(0x51, "SQ", items)
        grid = np.zeros((side * shape[1], side * shape[0]), np.uint16)
        for k in range(shape[2]):
            row, column = (k // side) * shape[1], (k % side) * shape[0]
            grid[row:row + shape[1], column:column + shape[0]] = np.asarray(stored[:, :, k].T, dtype=np.uint16)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = grid.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds.PixelData = grid.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = out / f"IM_{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
