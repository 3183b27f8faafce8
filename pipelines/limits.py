"""Bounds on what one input may make Tessera allocate, checked before allocating.

A hostile or broken file can declare a huge grid, inflate from kilobytes to gigabytes, or explode when
resampled onto the model's grid; each is refused with a code before any memory is taken. The defaults keep
one job well inside a few GiB; ``TESSERA_MAX_VOXELS``, ``TESSERA_MAX_MODEL_VOXELS``,
``TESSERA_MAX_DECOMPRESSED_BYTES``, ``TESSERA_MAX_INFLATE_RATIO`` and ``TESSERA_MAX_FRAMES`` (or the service
settings of the same names) change them. The ratio catches what a size limit alone lets through: a 2 MiB upload
that inflates to a volume within the voxel limit, made of zeros, which no scanner writes (real images compress
2-10 fold; masks, which can compress 200 fold, are small).
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, fields
from typing import BinaryIO

from pipelines.errors import InputError

MiB, GiB = 1024**2, 1024**3
RATIO_FLOOR_BYTES = 64 * MiB  # below this much inflated data the ratio is not checked (small masks compress well)


@dataclass(frozen=True)
class InputLimits:
    max_voxels: int = 512 * 512 * 1024  # one input volume (a 512 x 512 x 1024 CT)
    max_model_voxels: int = 512 * 512 * 1024  # the volume on the model's grid, after resampling
    max_decompressed_bytes: int = 2 * GiB  # one gzip stream or zip member, inflated
    max_frames: int = 20_000  # frames declared by one DICOM file
    max_inflate_ratio: int = 200  # inflated / compressed bytes, once past RATIO_FLOOR_BYTES (images: under 10)

    @classmethod
    def from_environment(cls) -> InputLimits:
        values = {}
        for field in fields(cls):
            text = os.environ.get(f"TESSERA_{field.name.upper()}")
            if text:
                try:
                    values[field.name] = int(text)
                except ValueError:
                    raise InputError("BAD_SETTINGS", f"TESSERA_{field.name.upper()} must be an integer, "
                                                     f"got {text[:40]!r}") from None
        return cls(**values)


def current_limits() -> InputLimits:
    return InputLimits.from_environment()


def check_voxels(shape: tuple[int, ...], what: str, limits: InputLimits | None = None, *,
                 model_space: bool = False) -> None:
    """Refuse a grid of more voxels than the limit (Python integers: absurd dimensions cannot overflow);
    ``limits``: the caller's, when it has read them already."""
    limits = limits or current_limits()
    bound = limits.max_model_voxels if model_space else limits.max_voxels
    count = 1
    for n in shape:
        count *= max(int(n), 0)
    if count > bound:
        grid = " x ".join(str(int(n)) for n in shape)
        where, setting = ("on the model's grid ", "TESSERA_MAX_MODEL_VOXELS") if model_space else \
            ("", "TESSERA_MAX_VOXELS")
        raise InputError("VOLUME_TOO_LARGE", f"{what}: {count:,} voxels {where}({grid}), at most {bound:,} allowed "
                                             f"({setting})")


def check_inflation(inflated: int, compressed: int, what: str, limits: InputLimits | None = None) -> None:
    """Refuse ``inflated`` bytes past the decompression limit, or past ``max_inflate_ratio`` times the
    ``compressed`` bytes they came from (once past ``RATIO_FLOOR_BYTES``), as ``DECOMPRESSED_TOO_LARGE``."""
    limits = limits or current_limits()
    if inflated > limits.max_decompressed_bytes:
        raise InputError("DECOMPRESSED_TOO_LARGE", f"{what}: inflates past {limits.max_decompressed_bytes / MiB:,.0f}"
                                                   " MiB (TESSERA_MAX_DECOMPRESSED_BYTES)")
    if inflated > RATIO_FLOOR_BYTES and inflated > limits.max_inflate_ratio * max(compressed, 1):
        raise InputError("DECOMPRESSED_TOO_LARGE", f"{what}: {max(compressed, 1):,} compressed bytes inflate to "
                                                   f"{inflated / MiB:,.0f} MiB, more than "
                                                   f"{limits.max_inflate_ratio} fold (TESSERA_MAX_INFLATE_RATIO): a "
                                                   "decompression bomb, not an image")


def inflate_capped(stream: BinaryIO, what: str, chunk: int = 1 * MiB,
                   marker: tuple[int, bytes] | None = None) -> io.BytesIO:
    """A gzip stream inflated into memory (grown in place: never a second copy), refused as
    ``DECOMPRESSED_TOO_LARGE`` past the decompression limits (:func:`check_inflation`; never fully inflated
    first) and as ``GZIP_CORRUPT`` when it is not valid gzip. ``marker`` (offset, bytes): when the inflated data
    does not carry these bytes there (DICOM's 'DICM' at 128), inflating stops and what was inflated so far is
    returned (the caller sees a file that is not what it wants, and says so) rather than inflating a bomb to its
    cap."""
    limits = current_limits()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = io.BytesIO()
    size = consumed = 0
    try:
        while True:
            data = inflater.unconsumed_tail
            if not data:
                data = stream.read(chunk)
                consumed += len(data)
            if not data:
                break
            size += out.write(inflater.decompress(data, chunk))
            check_inflation(size, consumed, what, limits)
            if marker is not None and size >= marker[0] + len(marker[1]):
                if out.getbuffer()[marker[0]:marker[0] + len(marker[1])] != marker[1]:
                    out.seek(0)
                    return out
                marker = None
            if inflater.eof:
                break
    except zlib.error as exc:
        raise InputError("GZIP_CORRUPT", f"{what}: not valid gzip data ({exc})") from None
    if not inflater.eof:
        raise InputError("GZIP_CORRUPT", f"{what}: the gzip stream is truncated")
    out.seek(0)
    return out
