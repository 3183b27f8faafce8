"""Source grid -> model space, and back again.

Forward: reorient (MONAI ``Orientation``: an exact flip/permute), resample to the model's spacing
(MONAI ``Spacing``), then the intensity transform. Back: resample class probabilities onto the oriented
source grid (MONAI ``SpatialResample``, in world coordinates), then undo the orientation exactly. The
mask therefore lands on the source grid by construction: same shape, same affine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    NormalizeIntensity,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacing,
    Spacingd,
    SpatialResample,
)
from nibabel import orientations

from models.manifest import IntensitySpec, PreprocessingSpec
from pipelines.limits import check_voxels
from pipelines.volume import Volume

if TYPE_CHECKING:
    from pipelines.labels_back import SlabLabels


@dataclass(frozen=True)
class GridMapping:
    """How one source grid relates to the model-space grid, enough to map results back."""

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    oriented_shape: tuple[int, int, int]
    oriented_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray

    @property
    def resampled(self) -> bool:
        return self.model_shape != self.oriented_shape or not np.allclose(
            self.model_affine, self.oriented_affine, atol=1e-6
        )

    def labels_to_source(self, channels: torch.Tensor, chunk: int = 8, by_cells: bool = True) -> torch.Tensor:
        """The argmax over classes of :meth:`to_source`. Axis-aligned grids (the usual case, oblique sources
        included): decided cell by cell on the scores' device (:mod:`pipelines.labels_back`), boundary voxels
        interpolated; otherwise ``chunk`` classes at a time through :meth:`to_source` (identical labels, ties to
        the lower class): memory grows with a few source-grid volumes, not classes x voxels. ``by_cells=False``
        takes the second way always."""
        from pipelines.inference.sliding_window import argmax_over_chunks, label_dtype

        if isinstance(channels, MetaTensor):
            channels = channels.as_tensor()
        classes = int(channels.shape[0])
        slabs = self.slab_labels(classes, channels.device) if by_cells else None
        if slabs is not None:
            slabs.add(0, channels.float())
            return self.labels_from_slabs(slabs)
        parts = (self.to_source(channels[start : start + chunk]) for start in range(0, classes, chunk))
        return argmax_over_chunks(parts, label_dtype(classes))

    def slab_labels(self, classes: int, device: torch.device) -> SlabLabels | None:
        """A consumer of model-space scores slab by slab that labels the oriented source grid
        (:class:`pipelines.labels_back.SlabLabels`), or None where the grids are not axis-aligned (or need no
        resampling, or the classes do not fit uint8 labels)."""
        from pipelines.labels_back import SlabLabels, axis_aligned_map

        aligned = axis_aligned_map(self.model_affine, self.oriented_affine) if self.resampled else None
        if aligned is None or classes > 256:
            return None
        return SlabLabels(aligned, self.model_shape, self.oriented_shape, device)

    def labels_from_slabs(self, slabs: SlabLabels) -> torch.Tensor:
        """The labels a fed :class:`~pipelines.labels_back.SlabLabels` made, on the source grid (CPU)."""
        return self._orient_back(slabs.finish().cpu().numpy()[None])[0]

    def to_source(self, channels: torch.Tensor) -> torch.Tensor:
        """Channel-first model-space values (probabilities, logits) on the exact source grid."""
        if isinstance(channels, MetaTensor):
            channels = channels.as_tensor()
        if self.resampled:
            moving = MetaTensor(channels.float(), affine=torch.as_tensor(self.model_affine, dtype=torch.float64))
            resampler = SpatialResample(mode="bilinear", padding_mode="border", dtype=np.float32)
            channels = resampler(
                moving, dst_affine=torch.as_tensor(self.oriented_affine, dtype=torch.float64),
                spatial_size=self.oriented_shape,
            )
        return self._orient_back(torch.as_tensor(channels).detach().cpu().numpy())

    def _orient_back(self, array: np.ndarray) -> torch.Tensor:
        """Channel-first values on the oriented grid, flipped and permuted exactly onto the source grid."""
        back = orientations.ornt_transform(
            orientations.io_orientation(self.oriented_affine), orientations.io_orientation(self.source_affine)
        )
        restored = orientations.apply_orientation(np.moveaxis(array, 0, -1), back)
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(restored, -1, 0)))


@dataclass(frozen=True)
class PreparedInput:
    image: torch.Tensor  # (C, *model_shape), float32
    mapping: GridMapping


def intensity_transform(spec: IntensitySpec) -> Any:
    if spec.kind == "window":
        return ScaleIntensityRange(spec.a_min, spec.a_max, spec.b_min, spec.b_max, clip=spec.clip)
    if spec.kind == "zscore":
        return NormalizeIntensity(nonzero=True, channel_wise=True)
    return lambda image: image


def prepare(volume: Volume, spec: PreprocessingSpec) -> PreparedInput:
    """The channel-first model input for ``volume`` and the mapping back to its grid."""
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    source = MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.as_tensor(volume.affine))
    oriented = Orientation(axcodes=spec.orientation)(source)
    if spec.spacing:
        check_model_grid(_spatial_shape(oriented), _affine(oriented), spec.spacing, volume.metadata.case_id)
    model = Spacing(pixdim=spec.spacing, mode="bilinear")(oriented) if spec.spacing else oriented
    image = intensity_transform(spec.intensity)(model)
    mapping = GridMapping(
        source_shape=volume.spatial_shape,
        source_affine=np.asarray(volume.affine, dtype=np.float64),
        oriented_shape=_spatial_shape(oriented),
        oriented_affine=_affine(oriented),
        model_shape=_spatial_shape(model),
        model_affine=_affine(model),
    )
    return PreparedInput(image=torch.as_tensor(image, dtype=torch.float32).contiguous(), mapping=mapping)


def check_model_grid(shape: tuple[int, ...], affine: np.ndarray, spacing: tuple[float, ...], what: str) -> None:
    """Refuse, before resampling, a volume (on the model's axes) whose grid at the model's spacing would exceed
    the model-space voxel limit (a small image of huge voxels explodes there)."""
    zooms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    extent = np.asarray(shape[:3], dtype=np.float64) * zooms
    model = [int(np.ceil(e / float(s))) for e, s in zip(extent, spacing, strict=True)]
    check_voxels(tuple(model), what, model_space=True)


def _spatial_shape(image: torch.Tensor) -> tuple[int, int, int]:
    _, i, j, k = image.shape
    return (int(i), int(j), int(k))


def _affine(image: torch.Tensor) -> np.ndarray:
    if not isinstance(image, MetaTensor):
        raise TypeError("MONAI spatial transforms should return a MetaTensor carrying its affine")
    return np.asarray(image.affine, dtype=np.float64)


def training_transforms(spec: PreprocessingSpec, keys: tuple[str, str] = ("image", "label"),
                        soft_classes: int | None = None) -> list[Any]:
    """The same model-space mapping as :func:`prepare`, as MONAI dictionary transforms for training. Labels are
    resampled by nearest neighbour, or with ``soft_classes`` made one-hot over that many classes (background
    included) and resampled trilinearly: per-class fractions of each model voxel."""
    steps: list[Any] = [AsDiscreted(keys=keys[1], to_onehot=soft_classes)] if soft_classes else []
    steps.append(Orientationd(keys=keys, axcodes=spec.orientation))
    if spec.spacing:
        label_mode = "bilinear" if soft_classes else "nearest"
        steps.append(Spacingd(keys=keys, pixdim=spec.spacing, mode=("bilinear", label_mode)))
    intensity = spec.intensity
    if intensity.kind == "window":
        steps.append(
            ScaleIntensityRanged(
                keys=keys[0], a_min=intensity.a_min, a_max=intensity.a_max,
                b_min=intensity.b_min, b_max=intensity.b_max, clip=intensity.clip,
            )
        )
    elif intensity.kind == "zscore":
        steps.append(NormalizeIntensityd(keys=keys[0], nonzero=True, channel_wise=True))
    return steps
