"""Uploaded files: recognised by their bytes (never by the client's file name), checked, stored under the job."""

from __future__ import annotations

import gzip
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pipelines.errors import InputError
from pipelines.ingestion.dicom.sources import check_zip_archive

KINDS = ("nifti", "zip", "dicom")


@dataclass(frozen=True)
class StoredUpload:
    kind: str  # nifti, zip or dicom
    name: str  # file name under the job's input folder


def _head(path: Path, size: int = 544) -> tuple[bytes, bool]:
    with path.open("rb") as handle:
        raw = handle.read(size)
    if raw[:2] != b"\x1f\x8b":
        return raw, False
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read(size), True
    except (OSError, EOFError, zlib.error):
        raise InputError("UPLOAD_UNREADABLE", "a gzip-compressed upload could not be decompressed") from None


def _is_nifti(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in "<>":
        size = struct.unpack(f"{order}i", head[:4])[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def sniff(path: Path) -> tuple[str, bool]:
    """(kind, gzipped) of an uploaded file from its first bytes; an unknown kind is a coded error."""
    head, gzipped = _head(path)
    if not gzipped and head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip", False
    if _is_nifti(head):
        return "nifti", gzipped
    if head[128:132] == b"DICM":
        return "dicom", gzipped
    raise InputError("UPLOAD_NOT_AN_IMAGE", "an uploaded file is neither NIfTI (.nii/.nii.gz), a zip of a DICOM "
                                            "study nor a DICOM file")


def store_upload(source: BinaryIO, folder: Path, index: int, zip_max_members: int, zip_max_bytes: int) -> StoredUpload:
    """Copy one upload into ``folder``, recognise and check it, and name it so the readers know it."""
    staging = folder / f"upload_{index:04d}"
    with staging.open("wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    kind, gzipped = sniff(staging)
    if kind == "zip":
        check_zip_archive(staging, zip_max_members, zip_max_bytes)
        name = f"study_{index:04d}.zip"
    elif kind == "nifti":
        name = f"image_{index:04d}.nii" + (".gz" if gzipped else "")
        _check_nifti_header(staging, gzipped)
    else:
        name = f"image_{index:04d}.dcm" + (".gz" if gzipped else "")
    staging.rename(folder / name)
    return StoredUpload(kind, name)


def _check_nifti_header(path: Path, gzipped: bool) -> None:
    import nibabel as nib

    try:
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as handle:
            header = nib.Nifti1Header.from_fileobj(handle) if _is_nifti1(path, gzipped) else \
                nib.Nifti2Header.from_fileobj(handle)
        shape = header.get_data_shape()
    except Exception as exc:  # nibabel raises many kinds; all mean the same to the client
        raise InputError("NIFTI_UNREADABLE", f"the NIfTI header could not be read ({type(exc).__name__})") from None
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise InputError("NIFTI_NOT_3D", f"the NIfTI image has shape {tuple(shape)}; a 3-D volume is needed")


def _is_nifti1(path: Path, gzipped: bool) -> bool:
    head, _ = _head(path, 4)
    return 348 in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0])
