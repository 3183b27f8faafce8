"""Decoding a volume's pixels: files in parallel, each frame rescaled to modality values (float32)."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from pipelines.errors import InputError
from pipelines.ingestion.dicom.slices import DicomSlice
from pipelines.ingestion.dicom.sources import DicomFile, read_dataset

log = logging.getLogger(__name__)


def _decode_file(source: DicomFile) -> np.ndarray:
    try:
        dataset = read_dataset(source)
    except Exception as exc:
        raise InputError("DICOM_UNREADABLE", f"{source.name}: cannot be read ({type(exc).__name__})") from exc
    if len(dataset) == 0:  # pydicom returns an empty dataset for some truncated files, with only a warning
        raise InputError("DICOM_UNREADABLE", f"{source.name}: the file is truncated or empty")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise InputError("NOT_AN_IMAGE", f"{source.name}: has no pixel data")
    syntax = UID(str(dataset.file_meta.TransferSyntaxUID)) if "TransferSyntaxUID" in dataset.file_meta else None
    if syntax is not None and syntax.is_compressed and not _decoder_available(syntax):
        raise InputError("UNSUPPORTED_TRANSFER_SYNTAX", f"{source.name}: no decoder installed for transfer syntax "
                                                        f"{syntax.name} ({syntax}); install tessera[dicom]")
    try:
        return np.asarray(dataset.pixel_array)
    except Exception as exc:  # decoders raise many types for damaged data
        raise InputError("PIXEL_DATA_CORRUPT", f"{source.name}: pixel data cannot be decoded "
                                               f"({type(exc).__name__})") from exc


def _decoder_available(syntax: UID) -> bool:
    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):
        return False


def decode_volume(slices: list[DicomSlice], workers: int | None = None) -> np.ndarray:
    """A ``[column, row, slice]`` float32 array of modality values for slices already in order."""
    if any(s.samples_per_pixel != 1 for s in slices):
        raise InputError("UNSUPPORTED_PHOTOMETRIC",
                         f"colour images ({slices[0].header.get('PhotometricInterpretation', '?')}) are not volumes "
                         "Tessera segments; only single-sample (MONOCHROME) images are supported")
    by_file: dict[DicomFile, list[int]] = defaultdict(list)
    for index, s in enumerate(slices):
        by_file[s.source].append(index)
    files = list(by_file)
    workers = workers or min(len(files), os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        decoded = list(pool.map(_decode_file, files))
    first = slices[0]
    volume = np.empty((first.columns, first.rows, len(slices)), dtype=np.float32)
    for source, pixels in zip(files, decoded, strict=True):
        for index in by_file[source]:
            s = slices[index]
            frame = pixels if s.frame is None else (pixels[s.frame] if pixels.ndim == 3 else pixels)
            if s.tile_origin is not None:
                row, column = s.tile_origin
                frame = frame[row : row + s.rows, column : column + s.columns]
            if frame.shape != (s.rows, s.columns):
                raise InputError("PIXEL_DATA_CORRUPT", f"{source.name}: frame shape {frame.shape} differs from "
                                                       f"Rows x Columns {(s.rows, s.columns)}")
            volume[:, :, index] = frame.T.astype(np.float64) * s.rescale_slope + s.rescale_intercept
    return volume
