"""NIfTI-1/2 reading with nibabel, refusing what cannot be read correctly."""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from pipelines.errors import InputError
from pipelines.limits import check_inflation, check_voxels
from pipelines.volume import Volume, VolumeMetadata

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLAB_VOXELS = 8 * 2**20  # voxels read and converted at a time: the stored data is never held whole beside the result


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def case_id_for(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: str | Path, modality: str = "unknown") -> Volume:
    """A 3-D volume from a ``.nii``/``.nii.gz`` file (a 4-D file only if it holds one volume).

    Raises :class:`InputError` with a code for a missing, corrupt, truncated or non-3-D file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("INPUT_NOT_FOUND", f"{path.name}: no such file")
    try:
        image = nib.load(str(path), keep_file_open=True)  # slabs in one pass through a gzip stream
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError, OverflowError, MemoryError, struct.error,
            TypeError, KeyError, IndexError) as exc:
        raise InputError("NIFTI_UNREADABLE", f"{path.name}: not a readable NIfTI file ({_short(exc)})") from exc
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError("NIFTI_UNREADABLE", f"{path.name}: not a NIfTI image ({type(image).__name__})")
    shape = image.shape
    gzipped = path.name.lower().endswith(".gz")
    check_nifti_header(_raw_header(path, image.header), path.name, path.stat().st_size if gzipped else None)
    if len(shape) < 3:
        raise InputError("NIFTI_NOT_3D", f"{path.name}: has {len(shape)} dimensions {shape}; a 3-D volume is needed")
    extra = shape[3:]
    if any(n != 1 for n in extra):
        raise InputError(
            "NIFTI_MULTI_VOLUME",
            f"{path.name}: holds {int(np.prod(extra))} volumes {shape}; extract the one to segment "
            "(e.g. 'fslroi in out 0 1') or pass one file per channel",
        )
    if min(shape[:3]) < 2:
        raise InputError("NIFTI_NOT_3D", f"{path.name}: shape {shape[:3]} is a slice, not a volume")
    try:
        affine = np.asarray(image.affine, dtype=np.float64)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise InputError("NIFTI_BAD_AFFINE", f"{path.name}: the orientation header is invalid ({_short(exc)})") from exc
    _check_affine(path, affine)
    try:
        data = _voxels(image, shape[:3])
    except (OSError, EOFError, zlib.error, ValueError, OverflowError, MemoryError) as exc:
        message = f"{path.name}: image data is truncated or corrupt ({_short(exc)})"
        raise InputError("NIFTI_UNREADABLE", message) from exc
    if int(image.header["qform_code"]) == 0 and int(image.header["sform_code"]) == 0:
        log.warning("%s: qform and sform codes are 0: the orientation is unknown; read as the voxel axes in "
                    "RAS order with the header's voxel sizes (NIfTI's method 1)", path.name)
    if image.get_data_dtype().kind == "f" or _scaled(image.header):  # integers cannot be NaN or infinite
        _replace_non_finite(data, path.name)
    header = image.header
    metadata = VolumeMetadata(
        case_id=case_id_for(path),
        source=path.name,
        modality=modality,
        source_format="nifti",
        qform_code=int(header["qform_code"]),
        sform_code=int(header["sform_code"]),
    )
    return Volume(array=data, affine=affine, metadata=metadata, header=header.copy())


def _voxels(image: nib.Nifti1Image, shape: tuple[int, ...]) -> np.ndarray:
    """The image's voxels as float32 (scaled by the header), read a slab of slices at a time."""
    data = np.empty(shape, dtype=np.float32, order="F")
    extra = (0,) * (len(image.shape) - 3)  # a 4-D file of one volume
    for slab in _slabs(shape):
        data[:, :, slab] = image.dataobj[(slice(None), slice(None), slab, *extra)]
    return data


def _slabs(shape: tuple[int, ...]) -> list[slice]:
    """Slices along the last axis of about ``SLAB_VOXELS`` voxels each."""
    step = max(1, SLAB_VOXELS // max(shape[0] * shape[1], 1))
    return [slice(start, start + step) for start in range(0, shape[2], step)]


def _scaled(header: nib.Nifti1Header) -> bool:
    slope, inter = header.get_slope_inter()
    return slope not in (None, 1.0) or inter not in (None, 0.0)


def _replace_non_finite(data: np.ndarray, name: str) -> None:
    """Non-finite voxels set to the image's finite minimum, in place, a slab at a time (no volume-sized mask)."""
    bad, low = 0, np.inf
    for part in _slabs(data.shape):
        slab = data[:, :, part]
        finite = np.isfinite(slab)
        bad += int(slab.size - np.count_nonzero(finite))
        if finite.any():
            low = min(low, float(slab[finite].min()))
    if bad == 0:
        return
    if bad == data.size:
        raise InputError("NIFTI_NO_DATA", f"{name}: every voxel is NaN or infinite")
    log.warning("%s: %d non-finite voxels set to the image minimum", name, bad)
    for part in _slabs(data.shape):
        slab = data[:, :, part]
        slab[~np.isfinite(slab)] = low


def _raw_header(path: Path, loaded: nib.Nifti1Header) -> nib.Nifti1Header:
    """The fixed header as written, before nibabel's repairs (it sets zero voxel sizes to 1 on loading)."""
    size = 348 if isinstance(loaded, nib.Nifti1Header) and not isinstance(loaded, nib.Nifti2Header) else 540
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            block = handle.read(size)
        return type(loaded)(binaryblock=block, endianness=loaded.endianness, check=False)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError("NIFTI_UNREADABLE", f"{path.name}: the header cannot be read ({_short(exc)})") from exc


def check_nifti_header(header: nib.Nifti1Header, name: str, compressed_bytes: int | None = None) -> None:
    """What the header alone tells: a grid within the voxel limit, a scalar datatype, for a gzipped file of
    ``compressed_bytes`` no more to inflate than the decompression limits allow, voxel sizes that were written
    (not zero where no qform or sform replaces them). Also used at upload, before any data is read."""
    shape = tuple(int(n) for n in header.get_data_shape())
    check_voxels(shape[:3] + tuple(n for n in shape[3:] if n > 1), name)
    dtype = header.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        kind = "RGB colour" if dtype.fields is not None else f"{dtype}"
        raise InputError("NIFTI_UNSUPPORTED_DATATYPE", f"{name}: {kind} voxels (datatype "
                         f"{int(header['datatype'])}); a scalar image is needed (convert colour images to grey)")
    if compressed_bytes is not None:
        check_inflation(int(header.get_data_offset()) + int(np.prod(shape, dtype=object)) * dtype.itemsize,
                        compressed_bytes, name)
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    no_transform = int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0
    if no_transform and (not np.all(np.isfinite(pixdim)) or np.any(pixdim <= 0)):
        raise InputError("NIFTI_NO_VOXEL_SIZE", f"{name}: qform and sform codes are 0 and the voxel sizes "
                                                f"{pixdim.round(4).tolist()} are not positive: the image has no "
                                                "geometry (a mask on invented 1 mm voxels would be wrong)")


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)):
        raise InputError("NIFTI_BAD_AFFINE", f"{path.name}: the affine has non-finite entries")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.any(zooms < 1e-6) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("NIFTI_BAD_AFFINE", f"{path.name}: the affine is singular (voxel sizes {zooms.round(4)})")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
