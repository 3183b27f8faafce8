"""Decoding a volume's pixels into modality values (float32), as fast as the data allows.

- Uncompressed little-endian files: the pixel bytes are read straight from the offset found while reading
  the header (one read per file, no second parse).
- Compressed files: decoded by pydicom's plugins (pylibjpeg, ...) in worker processes, since the decoders
  hold the GIL.
Rescale: stored x RescaleSlope + RescaleIntercept per slice, exact (float64 arithmetic where needed).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import BinaryIO

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipelines.errors import InputError
from pipelines.ingestion.dicom.slices import DicomSlice
from pipelines.ingestion.dicom.sources import DicomFile, read_dataset
from pipelines.processes import forked_pool, mapped

log = logging.getLogger(__name__)

_NATIVE = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
_PIXEL_TAG = b"\xe0\x7f\x10\x00"
PROCESS_POOL_MIN_FILES = 16
DECODE_SPAN = (0.5, 1.0)  # of the read stage's progress, after the headers


def _decode_with_pydicom(source: DicomFile) -> np.ndarray:
    try:
        dataset = read_dataset(source)
    except Exception as exc:
        raise InputError("DICOM_UNREADABLE", f"{source.safe_name}: cannot be read ({type(exc).__name__})") from exc
    if len(dataset) == 0:  # pydicom returns an empty dataset for some truncated files, with only a warning
        raise InputError("DICOM_UNREADABLE", f"{source.safe_name}: the file is truncated or empty")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise InputError("NOT_AN_IMAGE", f"{source.safe_name}: has no pixel data")
    syntax = UID(str(dataset.file_meta.TransferSyntaxUID)) if "TransferSyntaxUID" in dataset.file_meta else None
    if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
        raise InputError("UNSUPPORTED_TRANSFER_SYNTAX", f"{source.safe_name}: no decoder installed for transfer syntax "
                                                        f"{syntax.name} ({syntax}); reinstall tessera's codecs")
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as exc:  # decoders raise many types for damaged data
        raise InputError("PIXEL_DATA_CORRUPT", f"{source.safe_name}: pixel data cannot be decoded "
                                               f"({type(exc).__name__})") from exc


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def _native_layout(s: DicomSlice) -> tuple[np.dtype, int] | None:
    """dtype and value count for reading ``s``'s file raw, or ``None`` when pydicom must decode it."""
    bits = s.bits_allocated
    if (s.pixel_offset is None or s.transfer_syntax not in _NATIVE or s.samples_per_pixel != 1
            or bits not in (8, 16, 32) or s.bits_stored != bits):
        return None
    kind = "i" if s.pixel_representation == 1 else "u"
    return np.dtype(f"<{kind}{bits // 8}"), s.file_rows * s.file_columns * s.frames_in_file


def _seek_pixels(handle: BinaryIO, source: DicomFile, s: DicomSlice, nbytes: int) -> bool:
    """Position ``handle`` at the first pixel byte; False when the element is not where the header said."""
    assert s.pixel_offset is not None
    handle.seek(s.pixel_offset)
    head = handle.read(12)
    if head[:4] != _PIXEL_TAG:
        return False
    explicit = head[4:6] in (b"OW", b"OB", b"UN")
    length = struct.unpack("<I", head[8:12] if explicit else head[4:8])[0]
    if length == 0xFFFFFFFF or length < nbytes:
        raise InputError("PIXEL_DATA_CORRUPT", f"{source.safe_name}: pixel data is shorter than Rows x Columns")
    handle.seek(s.pixel_offset + (12 if explicit else 8))
    return True


def _read_native(source: DicomFile, s: DicomSlice, dtype: np.dtype, count: int) -> np.ndarray:
    with source.path.open("rb") as handle:
        if not _seek_pixels(handle, source, s, count * dtype.itemsize):
            return _decode_with_pydicom(source)
        pixels = np.fromfile(handle, dtype=dtype, count=count)
    if pixels.size != count:
        raise InputError("PIXEL_DATA_CORRUPT", f"{source.safe_name}: the file ends inside its pixel data")
    frames, rows, columns = s.frames_in_file, s.file_rows, s.file_columns
    return pixels.reshape((frames, rows, columns) if frames > 1 else (rows, columns))


def _read_native_into(s: DicomSlice, out: np.ndarray) -> None:
    """One uncompressed single-frame file read straight into its slot of the volume (no copy, no GIL)."""
    with s.source.path.open("rb") as handle:
        if not _seek_pixels(handle, s.source, s, out.nbytes):
            out[...] = _decode_with_pydicom(s.source)
            return
        if handle.readinto(out.data.cast("B")) != out.nbytes:
            raise InputError("PIXEL_DATA_CORRUPT", f"{s.source.safe_name}: the file ends inside its pixel data")


def _direct_dtype(slices: list[DicomSlice]) -> np.dtype | None:
    """The stored dtype when every slice is its own uncompressed single-frame file of one layout."""
    layouts = {_native_layout(s) for s in slices}
    if len(layouts) != 1 or None in layouts or len({s.source for s in slices}) != len(slices):
        return None
    if any(s.frames_in_file != 1 or s.tile_origin is not None for s in slices):
        return None
    layout = layouts.pop()
    assert layout is not None
    return layout[0]


def _decode_file(source: DicomFile, first: DicomSlice) -> np.ndarray:
    layout = _native_layout(first)
    if layout is None:
        return _decode_with_pydicom(source)
    return _read_native(source, first, *layout)


def _decode_all(files: list[DicomFile], firsts: list[DicomSlice]) -> list[np.ndarray]:
    compressed = sum(1 for s in firsts if _native_layout(s) is None)
    workers = min(len(files), os.cpu_count() or 1, 8)
    if compressed >= PROCESS_POOL_MIN_FILES and workers > 1:
        # Decoders hold the GIL: use processes. Slices stay here; workers get only the file to decode.
        try:
            with forked_pool(workers) as pool:
                return mapped(pool, _decode_with_pydicom, files, total=len(files), span=DECODE_SPAN,
                              chunksize=max(1, len(files) // (workers * 4)))
        except BrokenProcessPool as exc:  # a decoder crashed outright: this case fails, the process lives on
            raise InputError("PIXEL_DATA_CORRUPT", "a decoder crashed on this series' compressed pixel data") from exc
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return mapped(pool, _decode_file, files, firsts, total=len(files), span=DECODE_SPAN)


# What forked decoder processes write into: set just before the pool forks, read by the children.
_SHARED_TARGET: tuple[np.ndarray, list[DicomSlice]] | None = None


def _decode_into_shared(index: int) -> None:
    assert _SHARED_TARGET is not None
    stack, slices = _SHARED_TARGET
    pixels = _decode_with_pydicom(slices[index].source)
    if pixels.shape != stack.shape[1:]:
        raise InputError("PIXEL_DATA_CORRUPT", f"{slices[index].source.safe_name}: frame shape {pixels.shape} differs "
                                               f"from Rows x Columns {stack.shape[1:]}")
    stack[index] = pixels


def _decode_compressed_in_processes(slices: list[DicomSlice], workers: int) -> np.ndarray:
    """One compressed frame per file, decoded by forked workers straight into shared memory (no pickling)."""
    global _SHARED_TARGET
    first = slices[0]
    dtype = np.dtype(f"<{'i' if first.pixel_representation == 1 else 'u'}{max(first.bits_allocated, 8) // 8}")
    shape = (len(slices), first.rows, first.columns)
    buffer = mmap.mmap(-1, int(np.prod(shape)) * dtype.itemsize)
    stack = np.frombuffer(buffer, dtype=dtype).reshape(shape)
    _SHARED_TARGET = (stack, slices)
    try:
        with forked_pool(workers) as pool:
            mapped(pool, _decode_into_shared, range(len(slices)), total=len(slices), span=DECODE_SPAN,
                   chunksize=max(1, len(slices) // (workers * 4)))
    except BrokenProcessPool as exc:  # a decoder crashed outright: this case fails, the process lives on
        raise InputError("PIXEL_DATA_CORRUPT", "a decoder crashed on this series' compressed pixel data") from exc
    finally:
        _SHARED_TARGET = None
    return stack


def decode_volume(slices: list[DicomSlice]) -> np.ndarray:
    """A ``[column, row, slice]`` array of modality values (int16 when exact, else float32), slices in order."""
    if any(s.samples_per_pixel != 1 for s in slices):
        raise InputError("UNSUPPORTED_PHOTOMETRIC",
                         f"colour images ({slices[0].photometric or '?'}) are not volumes "
                         "Tessera segments; only single-sample (MONOCHROME) images are supported")
    first = slices[0]
    direct = _direct_dtype(slices)
    if direct is not None:
        stored = np.empty((len(slices), first.rows, first.columns), dtype=direct)
        with ThreadPoolExecutor(max_workers=min(len(slices), os.cpu_count() or 1, 8)) as pool:
            mapped(pool, _read_native_into, slices, stored, total=len(slices), span=DECODE_SPAN)
        return _rescale(stored, slices).transpose(2, 1, 0)
    workers = min(len(slices), os.cpu_count() or 1, 8)
    one_frame_per_file = len({s.source for s in slices}) == len(slices) and all(
        s.frames_in_file == 1 and s.tile_origin is None and s.bits_allocated in (8, 16, 32) for s in slices)
    if one_frame_per_file and workers > 1 and len(slices) >= PROCESS_POOL_MIN_FILES:
        return _rescale(_decode_compressed_in_processes(slices, workers), slices).transpose(2, 1, 0)
    by_file: dict[DicomFile, list[int]] = defaultdict(list)
    for index, s in enumerate(slices):
        by_file[s.source].append(index)
    files = list(by_file)
    decoded = _decode_all(files, [slices[by_file[f][0]] for f in files])
    dtypes = {pixels.dtype for pixels in decoded}
    stored = np.empty((len(slices), first.rows, first.columns), dtype=dtypes.pop() if len(dtypes) == 1 else np.float64)
    for source, pixels in zip(files, decoded, strict=True):
        for index in by_file[source]:
            s = slices[index]
            frame = pixels if s.frame is None else (pixels[s.frame] if pixels.ndim == 3 else pixels)
            if s.tile_origin is not None:
                row, column = s.tile_origin
                frame = frame[row : row + s.rows, column : column + s.columns]
            if frame.shape != (s.rows, s.columns):
                raise InputError("PIXEL_DATA_CORRUPT", f"{source.safe_name}: frame shape {frame.shape} differs from "
                                                       f"Rows x Columns {(s.rows, s.columns)}")
            stored[index] = frame
    return _rescale(stored, slices).transpose(2, 1, 0)


def _rescale(stored: np.ndarray, slices: list[DicomSlice]) -> np.ndarray:
    """Modality values ``stored x slope + intercept`` per slice, exactly.

    Integer data with slope 1 and integer intercepts whose values fit int16 (most CT) stay int16, as other
    readers return them; everything else becomes float32, computed in float64.
    """
    slopes = np.array([s.rescale_slope for s in slices])
    intercepts = np.array([s.rescale_intercept for s in slices])
    if stored.dtype.kind in "iu" and np.all(slopes == 1.0) and np.all(np.mod(intercepts, 1) == 0):
        shift = intercepts.astype(np.int64)
        low, high = int(stored.min()) + int(shift.min()), int(stored.max()) + int(shift.max())
        if low >= np.iinfo(np.int16).min and high <= np.iinfo(np.int16).max:
            if stored.dtype == np.int16 and not shift.any():
                return stored
            if stored.dtype in (np.int16, np.uint16):
                # In place: 16-bit wrap-around then reinterpretation as int16 is exact when the result fits.
                for index, value in enumerate(shift):
                    np.add(stored[index], value, out=stored[index], casting="unsafe")
                return stored.view(np.int16)
            return (stored.astype(np.int32) + shift.astype(np.int32)[:, None, None]).astype(np.int16)
    out32 = np.empty(stored.shape, dtype=np.float32)
    for index, (slope, intercept) in enumerate(zip(slopes, intercepts, strict=True)):
        out32[index] = stored[index].astype(np.float64) * slope + intercept
    return out32
