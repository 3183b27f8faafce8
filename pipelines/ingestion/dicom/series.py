"""From slices to volume candidates: group by series, split where one series holds several volumes.

A series is split by orientation, image size, pixel spacing, echo, image type (magnitude/phase, ...),
and stack; slices repeating the same positions are split into time points or acquisitions. Localizers,
scouts and derived screen captures are set aside, not converted.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import InputError
from pipelines.ingestion.dicom.geometry import GeometryError, StackGeometry, check_stack, projections
from pipelines.ingestion.dicom.slices import DicomSlice

log = logging.getLogger(__name__)


@dataclass
class VolumeCandidate:
    """One volume of a series: checked geometry, or the reason it was refused."""

    series_uid: str
    series_number: int | None
    series_description: str
    modality: str
    suffix: str
    slices: list[DicomSlice]
    geometry: StackGeometry | None = None
    error: InputError | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.geometry is not None and self.error is None

    @property
    def label(self) -> str:
        number = "" if self.series_number is None else str(self.series_number)
        return f"series {number or '?'} '{self.series_description}'{(' ' + self.suffix) if self.suffix else ''}"

    @property
    def codes(self) -> list[str]:
        if self.error is None:
            return []
        return list(getattr(self.error, "codes", [self.error.code]))


@dataclass
class SetAside:
    series_uid: str
    series_number: int | None
    series_description: str
    reason: str
    images: int


def _round_orientation(s: DicomSlice) -> Hashable:
    return None if s.orientation is None else tuple(np.round(s.orientation, 3))


_SPLIT_KEYS: list[tuple[str, Callable[[DicomSlice], Hashable], str]] = [
    ("orientation", _round_orientation, "INCONSISTENT_ORIENTATION"),
    ("size", lambda s: (s.rows, s.columns), "MIXED_IMAGE_SIZES"),
    ("spacing", lambda s: None if s.pixel_spacing is None else tuple(np.round(s.pixel_spacing, 4)),
     "MIXED_PIXEL_SPACING"),
    ("echo", lambda s: s.echo, ""),
    ("type", lambda s: _image_kind(s), ""),
    ("stack", lambda s: s.stack_id, ""),
]
_SUFFIX = {"orientation": "o", "size": "s", "spacing": "p", "echo": "e", "type": "", "stack": "stack"}


def build_candidates(
    slices: list[DicomSlice], tilt: str = "refuse", min_slices: int = 3
) -> tuple[list[VolumeCandidate], list[SetAside]]:
    by_series: dict[str, list[DicomSlice]] = defaultdict(list)
    for s in slices:
        by_series[s.series_uid].append(s)
    candidates: list[VolumeCandidate] = []
    set_aside: list[SetAside] = []
    for uid, members in by_series.items():
        # instances without an image (raw data, reports, presentation states) are left out one by one: they
        # never decide the fate of the images that share their series
        images = [s for s in members if not s.holds_no_image]
        left_out = len(members) - len(images)
        first = (images or members)[0]
        reason = _set_aside_reason(images) if images else \
            f"NOT_AN_IMAGE: modality {first.modality or '?'} holds no image to convert"
        if reason:
            set_aside.append(SetAside(uid, first.series_number, first.series_description, reason, len(members)))
            continue
        patients = {s.patient_id for s in images}
        if len(patients) > 1:  # one Series Instance UID over two patients: never one volume
            candidate = _new(images, "")
            candidate.error = InputError("MIXED_PATIENTS", f"the images of this series carry {len(patients)} "
                                                           "different Patient IDs; a volume never mixes patients")
            candidates.append(candidate)
            continue
        series = _series_candidates(images, tilt, min_slices)
        if left_out:
            note = f"{left_out} instance(s) without an image (raw data, report, presentation state) left out"
            log.warning("series %s: %s", first.series_number, note)
            for candidate in series:
                candidate.warnings.append(note)
        candidates.extend(series)
    candidates.sort(key=lambda c: (c.series_number if c.series_number is not None else 1 << 30, c.suffix))
    return candidates, set_aside


def _set_aside_reason(members: list[DicomSlice]) -> str:
    if all(s.is_localizer for s in members):
        return "LOCALIZER: localizer/scout images"
    if all(s.is_derived_capture for s in members):
        return "DERIVED_CAPTURE: derived secondary capture (screenshots, reports)"
    return ""


def _new(members: list[DicomSlice], suffix: str) -> VolumeCandidate:
    first = members[0]
    return VolumeCandidate(first.series_uid, first.series_number, first.series_description, first.modality,
                           suffix, members)


def _series_candidates(members: list[DicomSlice], tilt: str, min_slices: int) -> list[VolumeCandidate]:
    localizers = [s for s in members if s.is_localizer]
    members = [s for s in members if not s.is_localizer]
    groups: list[tuple[str, list[DicomSlice]]] = [("", members)]
    notes = [f"{len(localizers)} localizer image(s) set aside"] if localizers else []
    for name, key, refusal in _SPLIT_KEYS:
        next_groups = []
        for suffix, group in groups:
            parts: dict[Hashable, list[DicomSlice]] = defaultdict(list)
            for s in group:
                parts[key(s)].append(s)
            if len(parts) == 1:
                next_groups.append((suffix, group))
                continue
            if refusal:
                usable = {k: v for k, v in parts.items() if len(v) >= min_slices}
                if not usable:
                    candidate = _new(group, suffix)
                    candidate.error = InputError(refusal, f"images of one series differ in {name} and no group of "
                                                          "them forms a volume")
                    return [candidate]
                dropped = len(group) - sum(len(v) for v in usable.values())
                if dropped:
                    notes.append(f"{dropped} image(s) with a different {name} set aside")
                parts = usable
            ordered = _ordered_parts(name, parts)
            tags = _type_tags([part[0] for _, part in ordered]) if name == "type" else \
                [f"{_SUFFIX[name]}{index}" for index in range(1, len(ordered) + 1)]
            for tag, (_, part) in zip(tags, ordered, strict=True):
                next_groups.append((f"{suffix}_{tag}".strip("_") if len(ordered) > 1 else suffix, part))
        groups = next_groups
    results = []
    for suffix, group in groups:
        for sub_suffix, volume_slices, error in _split_repeats(group):
            candidate = _new(volume_slices, "_".join(p for p in (suffix, sub_suffix) if p))
            candidate.warnings.extend(notes)
            if error is None:
                try:
                    candidate.geometry = check_stack(volume_slices, tilt=tilt, min_slices=min_slices)
                    candidate.warnings.extend(candidate.geometry.warnings)
                except GeometryError as exc:
                    error = exc
            candidate.error = error
            results.append(candidate)
    return results


_COMPLEX_PARTS = {"M": "mag", "MAGNITUDE": "mag", "P": "ph", "PHASE": "ph", "R": "real", "REAL": "real",
                  "I": "imag", "IMAGINARY": "imag"}


def _image_kind(s: DicomSlice) -> tuple[str, str]:
    """What separates volumes in ImageType: original vs derived, and the complex part (magnitude, phase, ...)."""
    origin = s.image_type[0] if s.image_type else ""
    if s.complex_component in _COMPLEX_PARTS:  # the frame's own Complex Image Component says it first
        return (origin, _COMPLEX_PARTS[s.complex_component])
    parts = sorted({_COMPLEX_PARTS[v] for v in s.image_type[2:] if v in _COMPLEX_PARTS})
    return (origin, "+".join(parts))


def _ordered_parts(name: str, parts: dict[Hashable, list[DicomSlice]]) -> list[tuple[Hashable, list[DicomSlice]]]:
    """Echoes as dcm2niix numbers them: by EchoNumbers in classic series, in frame order in an enhanced file
    (where the key is the effective echo time); every other split biggest first."""
    if name != "echo":
        return sorted(parts.items(), key=lambda kv: -len(kv[1]))
    if all(s.frame is not None for part in parts.values() for s in part):
        return sorted(parts.items(), key=lambda kv: min(s.frame or 0 for s in kv[1]))
    return sorted(parts.items(), key=lambda kv: _sortable(kv[0]))


def _type_tags(firsts: list[DicomSlice]) -> list[str]:
    """dcm2niix's names for the volumes an image type separates: magnitude untagged, then ``ph``, ``real``,
    ``imag``; where that leaves two alike (e.g. original and derived magnitude), the origin is added."""
    kinds = [_image_kind(s) for s in firsts]
    tags = ["" if part == "mag" else part for _, part in kinds]
    if len(set(tags)) < len(tags):
        tags = ["_".join(p for p in (origin.lower(), part) if p) or "type" for origin, part in kinds]
    return tags


_TIME_KEYS: list[tuple[str, Callable[[DicomSlice], Hashable]]] = [
    ("t", lambda s: s.temporal_position),
    ("a", lambda s: s.acquisition_number),
    ("tt", lambda s: s.trigger_time),
    ("at", lambda s: s.acquisition_time),
]


def _split_repeats(group: list[DicomSlice]) -> list[tuple[str, list[DicomSlice], InputError | None]]:
    """Slices that repeat positions: split into time points / acquisitions, or refuse."""
    if any(s.position is None or s.orientation is None for s in group):
        return [("", group, None)]  # the geometry check names what is missing
    rounded = np.round(projections(group) / 0.01).astype(np.int64)
    positions = len(set(rounded.tolist()))
    if positions == len(group):
        return [("", group, None)]
    if positions == 1:
        return [("", group, InputError("NOT_A_VOLUME", f"all {len(group)} images lie at one position: a time "
                                                       "series or repeated single slice, not a volume"))]
    if len(group) % positions == 0:
        for tag, key in _TIME_KEYS:
            parts: dict[Hashable, list[DicomSlice]] = defaultdict(list)
            for s in group:
                parts[key(s)].append(s)
            if len(parts) > 1 and all(_covers_once(part, positions) for part in parts.values()):
                ordered = sorted(parts.items(), key=lambda kv: _sortable(kv[0]))
                return [(f"{tag}{i:03d}", part, None) for i, (_, part) in enumerate(ordered, start=1)]
        # No tag separates them: the n-th image (by InstanceNumber) at every position is time point n.
        # This reads both time-major (GE) and slice-major (Philips) numbering.
        at_position: dict[int, list[DicomSlice]] = defaultdict(list)
        for key, s in sorted(zip(rounded.tolist(), group, strict=True), key=lambda p: (p[1].instance_number or 0,
                                                                                      p[1].frame or 0)):
            at_position[key].append(s)
        counts = {len(v) for v in at_position.values()}
        if len(counts) == 1:
            count = counts.pop()
            volumes = [[members[t] for members in at_position.values()] for t in range(count)]
            return [(f"t{t:03d}", volume, None) for t, volume in enumerate(volumes, start=1)]
    return [("", group, InputError("DUPLICATE_SLICE_POSITIONS",
                                   f"{len(group)} images at {positions} positions and no tag (temporal position, "
                                   "acquisition, trigger time) separates them into volumes"))]


def _covers_once(part: list[DicomSlice], positions: int) -> bool:
    rounded = np.round(projections(part) / 0.01).astype(np.int64)
    return len(part) == positions and len(set(rounded.tolist())) == positions


def _sortable(value: Hashable) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return (1, 0.0, str(value))
