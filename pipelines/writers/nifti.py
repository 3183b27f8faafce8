"""Masks as NIfTI on the exact source grid, with the source's qform/sform and codes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipelines.volume import Volume


def mask_image(labels: np.ndarray, volume: Volume) -> nib.Nifti1Image:
    """A label image with ``volume``'s shape, affine, qform/sform matrices and codes.

    When the source was NIfTI its header is reused, so the qform and sform (which may differ) are
    carried over unchanged; otherwise both are set to the volume's affine with code 1 (scanner).
    """
    if labels.shape != volume.spatial_shape:
        raise ValueError(f"mask shape {labels.shape} does not match the source grid {volume.spatial_shape}")
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_dtype(labels.dtype)
        header.set_data_shape(labels.shape)
        header.set_slope_inter(1.0, 0.0)
        image = nib.Nifti1Image(labels, None, header=header)
        image.set_qform(volume.header.get_qform(), code=int(volume.header["qform_code"]))
        image.set_sform(volume.header.get_sform(), code=int(volume.header["sform_code"]))
    else:
        image = nib.Nifti1Image(labels, volume.affine)
        image.set_qform(volume.affine, code=1)
        image.set_sform(volume.affine, code=1)
    image.header["cal_min"] = 0
    image.header["cal_max"] = float(labels.max()) if labels.size else 0.0
    image.header["descrip"] = b"tessera label map"
    image.header["intent_code"] = 1002  # NIFTI_INTENT_LABEL
    return image


def write_mask(labels: np.ndarray, volume: Volume, path: str | Path) -> Path:
    path = Path(path)
    nib.save(mask_image(labels, volume), str(path))
    return path


def write_probabilities(probabilities: np.ndarray, volume: Volume, path: str | Path) -> Path:
    """Class probabilities ``(K, *grid)`` as one 4-D NIfTI ``(*grid, K)``: uint8 with scl_slope 1/255.

    NIfTI-1 has no float16; 8 bits with a slope keeps files small (0.4% steps), readers get floats in [0, 1].
    """
    scaled = np.clip(np.rint(np.moveaxis(probabilities, 0, -1) * 255.0), 0, 255).astype(np.uint8)
    image = nib.Nifti1Image(scaled, volume.affine)
    image.header.set_slope_inter(1.0 / 255.0, 0.0)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header["intent_code"] = 2016  # NIFTI_INTENT_PROB... vector of probabilities per voxel
    image.header["descrip"] = b"tessera class probabilities (background first)"
    path = Path(path)
    nib.save(image, str(path))
    return path


def write_float_maps(maps: np.ndarray, volume: Volume, path: str | Path, description: str = "tessera maps") -> Path:
    """Per-voxel float maps ``(n, *grid)`` on the source grid as float32 NIfTI (4-D ``(*grid, n)`` when n > 1)."""
    data = np.moveaxis(np.asarray(maps, np.float32), 0, -1)
    data = data[..., 0] if data.shape[-1] == 1 else data
    image = nib.Nifti1Image(np.ascontiguousarray(data), volume.affine)
    image.set_qform(volume.affine, code=1)
    image.set_sform(volume.affine, code=1)
    image.header["descrip"] = description.encode()[:79]
    path = Path(path)
    nib.save(image, str(path))
    return path
