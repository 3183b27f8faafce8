"""Which volume of a study to segment, by stated rules a user can override."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import InputError
from pipelines.ingestion.dicom.series import VolumeCandidate

RULES = "modality, ORIGINAL/PRIMARY, axial, most slices, smallest slice spacing"


@dataclass(frozen=True)
class SeriesSelection:
    chosen: VolumeCandidate
    reason: str
    ranking: list[str]


def _score(candidate: VolumeCandidate, modality: str | None) -> tuple[int, int, float, int, float]:
    geometry = candidate.geometry
    assert geometry is not None
    first = geometry.slices[0]
    axial = abs(float(first.normal[2]))  # LPS z component of the slice normal
    return (
        int(modality is None or candidate.modality.upper() == modality.upper()),
        int(first.image_type[:2] == ("ORIGINAL", "PRIMARY")),
        round(axial, 2),
        len(geometry.slices),
        -geometry.slice_spacing,
    )


def select_series(
    candidates: list[VolumeCandidate], modality: str | None = None, override: str | None = None
) -> SeriesSelection:
    """The best usable volume; ``override`` is a SeriesInstanceUID or SeriesNumber that wins outright."""
    usable = [c for c in candidates if c.ok]
    if override:
        matches = [c for c in candidates if c.series_uid == override or str(c.series_number) == override]
        if not matches:
            raise InputError("SERIES_NOT_FOUND", f"no series with UID or number '{override}' in the study")
        usable_matches = [c for c in matches if c.ok]
        if not usable_matches:
            refused = matches[0]
            assert refused.error is not None
            raise InputError(refused.error.code, f"the requested {refused.label} was refused: {refused.error.message}")
        usable = usable_matches
    if not usable:
        codes = sorted({code for c in candidates for code in c.codes})
        message = "no series in the study forms a usable volume"
        raise InputError("NO_USABLE_SERIES", f"{message} (refused: {', '.join(codes)})" if codes else message)
    ranked = sorted(usable, key=lambda c: _score(c, modality), reverse=True)
    chosen = ranked[0]
    geometry = chosen.geometry
    assert geometry is not None
    why = "requested by the user" if override else f"best of {len(usable)} usable volume(s) by rules: {RULES}"
    reason = (f"{chosen.label}: {chosen.modality}, {'/'.join(geometry.slices[0].image_type[:2]) or 'no ImageType'}, "
              f"{len(geometry.slices)} slices at {geometry.slice_spacing:.3g} mm; {why}")
    ranking = [f"{c.label} ({len(c.slices)} slices)" for c in ranked]
    return SeriesSelection(chosen, reason, ranking)

