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
from pipelines.ingestion.nifti import check_nifti_header


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


def _nifti_version(head: bytes) -> int | None:
    """1 or 2 for a NIfTI header (either byte order), else ``None``."""
    if len(head) < 348:
        return None
    for order in "<>":
        size = struct.unpack(f"{order}i", head[:4])[0]
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return 1
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return 2
    return None


def _kind(head: bytes, gzipped: bool) -> str:
    if not gzipped and head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if _nifti_version(head):
        return "nifti"
    if head[128:132] == b"DICM":
        return "dicom"
    raise InputError("UPLOAD_NOT_AN_IMAGE", "an uploaded file is neither NIfTI (.nii/.nii.gz), a zip of a DICOM "
                                            "study nor a DICOM file")


def sniff(path: Path) -> tuple[str, bool]:
    """(kind, gzipped) of an uploaded file from its first bytes; an unknown kind is a coded error."""
    head, gzipped = _head(path)
    return _kind(head, gzipped), gzipped


def store_upload(source: BinaryIO, folder: Path, index: int, zip_max_members: int, zip_max_bytes: int) -> StoredUpload:
    """Copy one upload into ``folder``, recognise and check it, and name it so the readers know it."""
    staging = folder / f"upload_{index:04d}"
    with staging.open("wb") as out:
        shutil.copyfileobj(source, out, 1024 * 1024)
    head, gzipped = _head(staging)
    kind = _kind(head, gzipped)
    if kind == "zip":
        check_zip_archive(staging, zip_max_members, zip_max_bytes)
        name = f"study_{index:04d}.zip"
    elif kind == "nifti":
        _check_nifti_header(head, staging.stat().st_size if gzipped else None)
        name = f"image_{index:04d}.nii" + (".gz" if gzipped else "")
    else:
        name = f"image_{index:04d}.dcm" + (".gz" if gzipped else "")
    staging.rename(folder / name)
    return StoredUpload(kind, name)


def _check_nifti_header(head: bytes, compressed_bytes: int | None) -> None:
    """The header (already read to recognise the file) parses and describes a 3-D volume."""
    import nibabel as nib

    version = _nifti_version(head)
    header_class, size = (nib.Nifti1Header, 348) if version == 1 else (nib.Nifti2Header, 540)
    try:  # the fixed header only: extensions (which follow it, of any length) are the reader's business
        header = header_class(binaryblock=head[:size], check=False)
        shape = header.get_data_shape()
    except Exception as exc:  # nibabel raises many kinds; all mean the same to the client
        raise InputError("NIFTI_UNREADABLE", f"the NIfTI header could not be read ({type(exc).__name__})") from None
    if len(shape) < 3 or min(shape[:3]) < 1:
        raise InputError("NIFTI_NOT_3D", f"the NIfTI image has shape {tuple(shape)}; a 3-D volume is needed")
    check_nifti_header(header, "the uploaded NIfTI image", compressed_bytes)
