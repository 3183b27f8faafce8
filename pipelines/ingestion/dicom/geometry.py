"""Slice-stack geometry: order, spacing from positions, the checks, and the affine.

Spacing comes from ImagePositionPatient projected on the slice normal, never from SliceThickness.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipelines.errors import InputError
from pipelines.ingestion.dicom.slices import DicomSlice

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DUPLICATE_TOLERANCE_MM = 0.01
TILT_TOLERANCE_DEGREES = 0.1


@dataclass(frozen=True)
class SpacingTolerance:
    relative: float = 0.02
    absolute_mm: float = 0.05

    def of(self, step: float) -> float:
        return max(self.relative * step, self.absolute_mm)


@dataclass
class StackGeometry:
    """A checked slice stack: slices in order along the normal, and its voxel -> RAS affine."""

    slices: list[DicomSlice]
    affine: np.ndarray
    slice_spacing: float
    tilt_degrees: float
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        first = self.slices[0]
        return (first.columns, first.rows, len(self.slices))


class GeometryError(InputError):
    """A stack refused for its geometry; ``codes`` lists every problem found, the first is ``code``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(problems[0][0], "; ".join(message for _, message in problems))
        self.codes = [code for code, _ in problems]
        self.problems = problems

    def __reduce__(self) -> tuple:
        return (type(self), (self.problems,))


def projections(slices: list[DicomSlice]) -> np.ndarray:
    normal = slices[0].normal
    return np.array([float(np.dot(s.position, normal)) for s in slices])  # type: ignore[arg-type]


def check_stack(
    slices: list[DicomSlice],
    *,
    tilt: str = "refuse",
    tolerance: SpacingTolerance | None = None,
    min_slices: int = 3,
) -> StackGeometry:
    """Order ``slices`` along their normal and check them; raise :class:`GeometryError` if not a regular volume.

    ``tilt="resample"`` accepts gantry tilt (the caller resamples onto a regular grid); ``"refuse"`` does not.
    """
    tolerance = tolerance or SpacingTolerance()
    missing = [s for s in slices if s.position is None or s.orientation is None or s.pixel_spacing is None]
    known = [s.missing_geometry for s in missing if s.missing_geometry is not None]
    if known:
        raise GeometryError([known[0]])
    if missing:
        message = (f"{len(missing)} image(s) lack ImagePositionPatient, ImageOrientationPatient or PixelSpacing; "
                   "cannot place them in space")
        raise GeometryError([("MISSING_GEOMETRY", message)])
    if len(slices) < max(min_slices, 2):
        raise GeometryError([("TOO_FEW_SLICES", f"{len(slices)} slice(s); a volume needs at least {max(min_slices, 2)}"
                              " (a smaller minimum can be set: --min-slices)")])
    ordered = sorted(slices, key=lambda s: float(np.dot(s.position, s.normal)))  # type: ignore[arg-type]
    along = projections(ordered)
    steps = np.diff(along)
    problems: list[tuple[str, str]] = []
    duplicates = int((steps < DUPLICATE_TOLERANCE_MM).sum())
    if duplicates:
        raise GeometryError([("DUPLICATE_SLICE_POSITIONS",
                              f"{duplicates} slice(s) share a position with another; remove duplicates or split the "
                              "series (echoes, time points) before converting")])
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > tolerance.of(step)
    if uneven.any():
        multiples = steps[uneven] / step
        if np.all(np.abs(multiples - np.round(multiples)) * step <= tolerance.of(step)) and np.all(multiples > 1.5):
            count = int(np.round(multiples).sum() - len(multiples))
            problems.append(("MISSING_SLICES", f"{count} slice(s) missing: gaps of "
                             f"{', '.join(f'{g:.2f}' for g in steps[uneven])} mm where {step:.3f} mm is expected"))
        else:
            problems.append(("NON_UNIFORM_SPACING", f"slice spacing varies from {steps.min():.3f} to "
                             f"{steps.max():.3f} mm (median {step:.3f} mm)"))
    first, last = ordered[0].position, ordered[-1].position
    step_vector = (last - first) / (len(ordered) - 1)  # type: ignore[operator]
    normal = ordered[0].normal
    along_normal = float(np.dot(step_vector, normal))
    lateral = float(np.linalg.norm(step_vector - along_normal * normal))
    tilt_degrees = float(np.degrees(np.arctan2(lateral, abs(along_normal))))
    if tilt_degrees > TILT_TOLERANCE_DEGREES and tilt == "refuse":
        problems.append(("GANTRY_TILT", f"gantry tilt of {tilt_degrees:.2f} degrees; convert with tilt "
                         "correction (--tilt resample) to resample onto a regular grid"))
    if problems:
        raise GeometryError(problems)
    affine = stack_affine(ordered[0], step_vector)
    warnings = []
    if tilt_degrees > TILT_TOLERANCE_DEGREES:
        warnings.append(f"GANTRY_TILT: {tilt_degrees:.2f} degrees, resampled onto a regular grid")
    return StackGeometry(ordered, affine, float(np.linalg.norm(step_vector)), tilt_degrees, warnings)


def stack_affine(first: DicomSlice, step_vector: np.ndarray) -> np.ndarray:
    """Voxel ``[column, row, slice]`` -> RAS+ mm. Column index moves along the row direction cosine."""
    assert first.orientation is not None and first.pixel_spacing is not None and first.position is not None
    row_spacing, column_spacing = first.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * column_spacing
    lps[:3, 1] = first.orientation[3:] * row_spacing
    lps[:3, 2] = step_vector
    lps[:3, 3] = first.position
    return LPS_TO_RAS @ lps
