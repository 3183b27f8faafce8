"""Finding DICOM files: folders (recursive), zips, ``.dcm.gz``, single files; non-DICOM skipped."""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError

from pipelines.errors import InputError
from pipelines.limits import check_inflation, inflate_capped

log = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 20_000
MAX_ZIP_BYTES = 8 * 1024**3
_SKIP_NAMES = {"DICOMDIR"}


@dataclass(frozen=True)
class DicomFile:
    """Where one DICOM file's bytes come from: a path, or a member of a zip, possibly gzipped."""

    name: str
    path: Path
    member: str | None = None
    gzipped: bool = False

    @property
    def safe_name(self) -> str:
        """The name for messages and logs: a zip member's own name (which often carries the patient's name) is
        replaced by a short digest of it."""
        if self.member is None:
            return self.path.name
        return f"{self.path.name}[member {hashlib.sha1(self.member.encode()).hexdigest()[:8]}]"

    def open(self) -> io.BufferedIOBase | io.BytesIO:
        """The file's bytes; a gzipped file or member is inflated with a cap (``DECOMPRESSED_TOO_LARGE``), a
        member the zip cannot give back is ``ZIP_CORRUPT``."""
        if self.member is None and not self.gzipped:
            return self.path.open("rb")
        if self.member is None:
            with self.path.open("rb") as handle:
                return inflate_capped(handle, self.safe_name, marker=DICOM_MARKER)
        try:
            archive = _archive(self.path)
            info = archive.getinfo(self.member)
            if info.flag_bits & 0x1:
                raise InputError("ZIP_ENCRYPTED", f"a member of {self.path.name} is encrypted; Tessera reads no "
                                                  "encrypted archives")
            if info.compress_type not in _ZIP_METHODS:
                raise InputError("ZIP_UNSUPPORTED_COMPRESSION", f"a member of {self.path.name} uses compression "
                                                                f"method {info.compress_type}, which zip readers "
                                                                "do not support")
            with archive.open(info) as handle:
                if self.gzipped:
                    return inflate_capped(handle, self.safe_name, marker=DICOM_MARKER)  # type: ignore[arg-type]
                return _member_bytes(handle, info, self.safe_name)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError,
                zlib.error, ValueError) as exc:
            raise InputError("ZIP_CORRUPT", f"a member of {self.path.name} cannot be read ({_reason(exc)})") from None


DICOM_MARKER = (128, b"DICM")  # after the preamble; pydicom (not forced) reads no file without it


def _member_bytes(handle: BinaryIO, info: zipfile.ZipInfo, name: str) -> io.BytesIO:
    """A zip member in memory: refused past the decompression limits by its declared sizes (``zipfile`` never
    inflates past them), and only its first bytes when they are not DICOM's."""
    check_inflation(info.file_size, info.compress_size if info.compress_type else info.file_size, name)
    out = io.BytesIO()
    offset, marker = DICOM_MARKER
    head = handle.read(offset + len(marker))
    out.write(head)
    if head[offset:] == marker:
        shutil.copyfileobj(handle, out, 2**20)
    out.seek(0)
    return out


_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_open_archives: dict[tuple[int, Path], zipfile.ZipFile] = {}


def _archive(path: Path) -> zipfile.ZipFile:
    """One open ``ZipFile`` per archive and process (its central directory parsed once, not once per member;
    never shared with a forked child, whose file offset would be the parent's)."""
    key = (os.getpid(), path)
    if key not in _open_archives:
        for stale in [k for k in _open_archives if k[0] != key[0]]:
            del _open_archives[stale]  # inherited through fork: the parent's, left alone
        if len(_open_archives) >= 8:
            _open_archives.pop(next(iter(_open_archives))).close()
        _open_archives[key] = zipfile.ZipFile(path)
    return _open_archives[key]


def _reason(exc: BaseException) -> str:
    """An exception in one short line without file names (zip member names can carry patient names)."""
    return type(exc).__name__


_DICOM_SUFFIXES = (".dcm", ".ima", ".dcm.gz", ".dicom")


def looks_like_dicom(path: Path) -> bool:
    """A DICOM file by name (.dcm, .ima, .dcm.gz) or by its 'DICM' preamble marker (also inside .gz)."""
    if path.name.lower().endswith(_DICOM_SUFFIXES):
        return True
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                head = handle.read(132)
        else:
            with path.open("rb") as handle:
                head = handle.read(132)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    return head[128:132] == b"DICM"


def iter_sources(root: Path) -> Iterator[DicomFile]:
    """Every candidate file under ``root`` (a folder, a zip or one file), in a stable order."""
    if root.is_dir():
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if path.name.startswith(".") or path.name in _SKIP_NAMES:
                continue
            if zipfile.is_zipfile(path) and path.suffix.lower() == ".zip":
                yield from _zip_members(path)
            else:
                yield DicomFile(str(path.relative_to(root)), path, gzipped=path.name.lower().endswith(".gz"))
    elif root.suffix.lower() == ".zip" or zipfile.is_zipfile(root):
        yield from _zip_members(root)
    else:
        yield DicomFile(root.name, root, gzipped=root.name.lower().endswith(".gz"))


def check_zip_archive(path: Path, max_members: int = MAX_ZIP_MEMBERS,
                      max_bytes: int = MAX_ZIP_BYTES) -> list[zipfile.ZipInfo]:
    """The file members of a zip, refused with a coded error when unsafe to unpack or read.

    Refused: not a zip, more than ``max_members`` files, more than ``max_bytes`` uncompressed (zip bombs: the
    declared sizes bound what ``zipfile`` will ever inflate), members whose path leaves the archive
    (absolute, drive letters, ``..``) and symbolic links.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
        raise InputError("ZIP_UNREADABLE", f"{path.name}: not a readable zip archive ({exc})") from exc
    if len(members) > max_members:
        raise InputError("ZIP_TOO_MANY_FILES", f"{path.name}: {len(members)} files, at most {max_members} allowed")
    total = sum(m.file_size for m in members)
    if total > max_bytes:
        raise InputError("ZIP_TOO_LARGE", f"{path.name}: {total / 1024**2:.0f} MiB uncompressed, at most "
                                          f"{max_bytes / 1024**2:.0f} MiB allowed")
    for member in members:
        name = member.filename.replace("\\", "/")
        if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
            raise InputError("ZIP_UNSAFE_PATH", f"{path.name}: member '{name}' points outside the archive")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise InputError("ZIP_UNSAFE_LINK", f"{path.name}: member '{name}' is a symbolic link")
    return members


def _zip_members(path: Path) -> Iterator[DicomFile]:
    for member in sorted(check_zip_archive(path), key=lambda m: m.filename):
        name = member.filename
        if Path(name).name.startswith(".") or Path(name).name in _SKIP_NAMES or name.startswith("__MACOSX"):
            continue
        yield DicomFile(f"{path.name}:{name}", path, member=name, gzipped=name.lower().endswith(".gz"))


def read_header(source: DicomFile) -> tuple[pydicom.Dataset, int | None] | None:
    """The header (no pixel data) of a DICOM file and, for a plain file, the byte offset of its pixel data
    element (where a header-only read stops); ``None`` for a file that is not DICOM.

    A file that cannot be given back whole (``ZIP_CORRUPT``, ``DECOMPRESSED_TOO_LARGE``, ``GZIP_CORRUPT``)
    raises its :class:`InputError`; the reader skips it and reports the code when nothing else is left."""
    try:
        return _dcmread(source, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            OverflowError, MemoryError, RecursionError, struct.error, UnicodeError) as exc:
        log.warning("skipping a file: not a readable DICOM file (%s)", type(exc).__name__)
        return None


def read_dataset(source: DicomFile) -> pydicom.Dataset:
    """The whole dataset, pixel data included."""
    return _dcmread(source)[0]


def _dcmread(source: DicomFile, stop_before_pixels: bool = False) -> tuple[pydicom.Dataset, int | None]:
    """The dataset and, for a plain file, where the read stopped."""
    with source.open() as handle:
        dataset = pydicom.dcmread(handle, stop_before_pixels=stop_before_pixels)
        offset = handle.tell() if source.member is None and not source.gzipped else None
    if isinstance(handle, io.BytesIO):
        dataset.buffer = None  # closed with the inflated bytes: nothing to read or copy from it later
    return dataset, offset
