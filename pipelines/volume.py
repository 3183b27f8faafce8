"""The ``Volume``: one image on one grid, as it flows through every stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np


@dataclass
class VolumeMetadata:
    """What we know about where a volume came from; never patient identifiers."""

    case_id: str
    source: str
    modality: str = "unknown"
    source_format: str = "nifti"
    qform_code: int = 1
    sform_code: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Volume:
    """A 3-D (or channel-first 4-D) image with its voxel-to-RAS+ affine (millimetres).

    ``array`` is indexed ``[i, j, k]`` (or ``[c, i, j, k]``) exactly as ``affine`` maps voxel
    indices to world coordinates; the affine is in NIfTI's RAS+ convention. Values are float32, or int16
    where every value is an exact integer that fits (CT from DICOM), as other readers return them.
    """

    array: np.ndarray
    affine: np.ndarray
    metadata: VolumeMetadata
    header: nib.Nifti1Header | None = None

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        shape = self.array.shape[-3:]
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    @property
    def spacing(self) -> tuple[float, float, float]:
        zooms = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(zooms[0]), float(zooms[1]), float(zooms[2]))

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))
