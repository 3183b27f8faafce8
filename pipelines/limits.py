"""Bounds on what one input may make Tessera allocate, checked before allocating.

A hostile or broken file can declare a huge grid, inflate from kilobytes to gigabytes, or explode when
resampled onto the model's grid; each is refused with a code before any memory is taken. The defaults keep
one job well inside a few GiB; ``TESSERA_MAX_VOXELS``, ``TESSERA_MAX_MODEL_VOXELS``,
``TESSERA_MAX_DECOMPRESSED_BYTES`` and ``TESSERA_MAX_FRAMES`` (or the service settings of the same names)
change them.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, fields
from typing import BinaryIO

from pipelines.errors import InputError

MiB, GiB = 1024**2, 1024**3


@dataclass(frozen=True)
class InputLimits:
    max_voxels: int = 512 * 512 * 1024  # one input volume (a 512 x 512 x 1024 CT)
    max_model_voxels: int = 512 * 512 * 1024  # the volume on the model's grid, after resampling
    max_decompressed_bytes: int = 2 * GiB  # one gzip stream or zip member, inflated
    max_frames: int = 20_000  # frames declared by one DICOM file

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


def inflate_capped(stream: BinaryIO, what: str, cap: int | None = None, chunk: int = 1 * MiB) -> bytes:
    """A gzip stream inflated, refused as ``DECOMPRESSED_TOO_LARGE`` past ``cap`` bytes (never fully inflated
    first) and as ``GZIP_CORRUPT`` when it is not valid gzip."""
    cap = cap if cap is not None else current_limits().max_decompressed_bytes
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    parts: list[bytes] = []
    size = 0
    try:
        while True:
            data = inflater.unconsumed_tail or stream.read(chunk)
            if not data:
                break
            out = inflater.decompress(data, chunk)
            size += len(out)
            if size > cap:
                raise InputError("DECOMPRESSED_TOO_LARGE", f"{what}: inflates past {cap / MiB:,.0f} MiB "
                                                           "(TESSERA_MAX_DECOMPRESSED_BYTES)")
            parts.append(out)
            if inflater.eof:
                break
    except zlib.error as exc:
        raise InputError("GZIP_CORRUPT", f"{what}: not valid gzip data ({exc})") from None
    if not inflater.eof:
        raise InputError("GZIP_CORRUPT", f"{what}: the gzip stream is truncated")
    return b"".join(parts)
