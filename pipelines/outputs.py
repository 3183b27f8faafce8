"""Which files a segmented case gets: the output formats and their options (no heavy imports: the REST
service checks a job's options with this before anything runs)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import UsageError

FORMATS = ("nifti", "dicom-seg", "rtstruct", "probabilities", "stats", "preview")
DICOM_ONLY_FORMATS = ("dicom-seg", "rtstruct")
DEFAULT_FORMATS = frozenset({"nifti", "stats", "preview"})


@dataclass(frozen=True)
class OutputOptions:
    """Which outputs a case gets. ``formats=None``: nifti, stats, preview, and dicom-seg for DICOM input."""

    formats: frozenset[str] | None = None
    seg_type: str = "binary"
    omit_empty_frames: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.formats or ()) - set(FORMATS))
        if unknown:
            raise UsageError("UNKNOWN_FORMAT", f"unknown output format(s) {unknown}; choose from {list(FORMATS)}")
        if self.seg_type not in ("binary", "fractional"):
            raise UsageError("UNKNOWN_FORMAT", f"seg_type must be binary or fractional, got {self.seg_type!r}")

    def for_case(self, dicom_input: bool) -> frozenset[str]:
        if self.formats is not None:
            return self.formats
        return DEFAULT_FORMATS | ({"dicom-seg"} if dicom_input else set())


__all__ = ["DEFAULT_FORMATS", "DICOM_ONLY_FORMATS", "FORMATS", "OutputOptions"]
