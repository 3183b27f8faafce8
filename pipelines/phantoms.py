"""Deterministic synthetic CT-like phantoms: a body outline and organ-like structures.

Each structure has its own Hounsfield level and texture; shapes and positions are random but fixed by
the seed; voxel spacing is anisotropic and the stored orientation is deliberately often not RAS, so
every geometry path of the pipeline is exercised. Left and right kidneys look alike and differ only by
side: a model that flips left/right cannot score well on them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage


@dataclass(frozen=True)
class PhantomStructure:
    value: int
    name: str
    hu: float
    color: tuple[int, int, int]


STRUCTURES: tuple[PhantomStructure, ...] = (
    PhantomStructure(1, "liver", 60.0, (221, 130, 101)),
    PhantomStructure(2, "spleen", 115.0, (157, 108, 162)),
    PhantomStructure(3, "kidney_left", 185.0, (96, 186, 108)),
    PhantomStructure(4, "kidney_right", 185.0, (78, 150, 222)),
    PhantomStructure(5, "spine", 480.0, (241, 214, 145)),
)
ORIENTATION_CYCLE: tuple[str, ...] = ("LPS", "RAS", "LAS", "ASL", "RPI")
AIR_HU = -1000.0
TISSUE_HU = -90.0


@dataclass(frozen=True)
class Phantom:
    image: nib.Nifti1Image
    label: nib.Nifti1Image


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], coarse: int = 5) -> np.ndarray:
    """A smooth random field in about [-1, 1], cheap: cubic zoom of a coarse noise grid."""
    grid = rng.standard_normal((coarse, coarse, coarse))
    factors = [s / coarse for s in shape]
    field = ndimage.zoom(grid, factors, order=3, mode="nearest")[: shape[0], : shape[1], : shape[2]]
    return field / (np.abs(field).max() + 1e-6)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    angles = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid(
    rng: np.random.Generator,
    coords: np.ndarray,
    centre: Sequence[float],
    semi_axes: Sequence[float],
    jitter_mm: float,
    axes_jitter: float,
) -> np.ndarray:
    centre_mm = np.asarray(centre) + rng.uniform(-jitter_mm, jitter_mm, size=3)
    semi = np.asarray(semi_axes) * rng.uniform(1 - axes_jitter, 1 + axes_jitter, size=3)
    rotated = np.einsum("ij,j...->i...", _rotation(rng, 15.0), coords - centre_mm[:, None, None, None])
    level = sum((rotated[i] / semi[i]) ** 2 for i in range(3))
    deform = 0.25 * _smooth_field(rng, coords.shape[1:])
    return level + deform <= 1.0


def make_phantom(
    seed: int,
    orientation: str | None = None,
    spacing: Sequence[float] | None = None,
) -> Phantom:
    """One phantom CT and its label map, both on the same grid, stored in ``orientation``."""
    rng = np.random.default_rng(seed)
    if spacing is None:
        in_plane = rng.uniform(1.8, 2.3)
        spacing = (in_plane, in_plane, rng.uniform(3.0, 4.0))
    spacing_mm = np.asarray(spacing, dtype=float)
    body_semi = np.array([rng.uniform(78, 92), rng.uniform(58, 70)])
    half_fov = np.array([body_semi[0] + rng.uniform(8, 16), body_semi[1] + rng.uniform(8, 16), rng.uniform(72, 86)])
    shape = tuple(int(n) for n in np.ceil(2 * half_fov / spacing_mm))
    # Voxel centres relative to the body centre; the scanner origin is elsewhere, as on real scanners.
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing_mm, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    scanner_offset = np.array([rng.uniform(-20, 20), rng.uniform(-40, 0), rng.uniform(-400, -200)])
    x, y, z = coords

    body_wobble = 1 + 0.04 * _smooth_field(rng, shape, coarse=3)
    body = (x / body_semi[0]) ** 2 + (y / body_semi[1]) ** 2 <= body_wobble
    labels = np.zeros(shape, dtype=np.uint8)
    # RAS+: +x is the patient's right, +y anterior, +z superior.
    shapes = {
        "liver": _ellipsoid(rng, coords, (40, 8, 18), (42, 36, 38), 7, 0.12),
        "spleen": _ellipsoid(rng, coords, (-50, -12, 24), (20, 26, 28), 6, 0.15),
        "kidney_left": _ellipsoid(rng, coords, (-38, -30, -28), (16, 14, 30), 5, 0.12),
        "kidney_right": _ellipsoid(rng, coords, (38, -30, -34), (16, 14, 30), 5, 0.12),
    }
    spine_x = rng.uniform(-3, 3) + 4 * np.sin(z / 60.0 + rng.uniform(0, np.pi))
    spine_y = -body_semi[1] + rng.uniform(18, 24)
    spine_r = rng.uniform(11, 14)
    shapes["spine"] = (x - spine_x) ** 2 + (y - spine_y) ** 2 <= spine_r**2
    for structure in STRUCTURES:
        labels[shapes[structure.name] & body] = structure.value

    image = np.full(shape, AIR_HU, dtype=np.float32)
    image[body] = TISSUE_HU + 35 * _smooth_field(rng, shape, coarse=8)[body]
    texture = _smooth_field(rng, shape, coarse=12)
    for structure in STRUCTURES:
        inside = labels == structure.value
        image[inside] = structure.hu + 14 * texture[inside]
    discs = np.cos(2 * np.pi * (z + rng.uniform(0, 30)) / 30.0) > 0.8
    image[(labels == 5) & discs] = 260.0
    image = ndimage.gaussian_filter(image, sigma=0.7 / np.maximum(spacing_mm / spacing_mm.min(), 1.0))
    image += rng.normal(0.0, rng.uniform(10, 22), size=shape).astype(np.float32)

    affine = np.diag([*spacing_mm, 1.0])
    affine[:3, 3] = [axis[0] for axis in axes] + scanner_offset
    code = orientation or ORIENTATION_CYCLE[seed % len(ORIENTATION_CYCLE)]
    return Phantom(
        image=_to_nifti(np.round(image).astype(np.int16), affine, code),
        label=_to_nifti(labels, affine, code),
    )


def _to_nifti(array: np.ndarray, ras_affine: np.ndarray, axcodes: str) -> nib.Nifti1Image:
    """Store a RAS-indexed array in another orientation: same physical image, different axes."""
    transform = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(tuple(axcodes)))
    stored = orientations.apply_orientation(array, transform)
    affine = ras_affine @ orientations.inv_ornt_aff(transform, array.shape)
    image = nib.Nifti1Image(np.ascontiguousarray(stored), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_dataset(out_dir: str | Path, n_train: int = 20, n_test: int = 4, first_seed: int = 0) -> Path:
    """An MSD-style dataset (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``, ``labelsTs``)."""
    root = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(n_train + n_test):
        seed = first_seed + index
        split = "Tr" if index < n_train else "Ts"
        case = f"phantom_{seed:03d}"
        phantom = make_phantom(seed)
        nib.save(phantom.image, root / f"images{split}" / f"{case}.nii.gz")
        nib.save(phantom.label, root / f"labels{split}" / f"{case}.nii.gz")
        if split == "Tr":
            training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
        else:
            test.append(f"./imagesTs/{case}.nii.gz")
    return write_dataset_json(root, "TesseraPhantom", "Synthetic CT-like phantoms generated by tessera "
                              "(pipelines/phantoms.py); not patient data", ["CT"],
                              {s.value: s.name for s in STRUCTURES}, training, test, "pipelines.phantoms", first_seed)


def write_dataset_json(root: Path, name: str, description: str, modalities: Sequence[str], labels: dict[int, str],
                       training: Sequence[object], test: Sequence[object], generator: str, first_seed: int) -> Path:
    """``root/dataset.json`` of a generated MSD-style dataset; returns ``root``."""
    dataset = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {"0": "background", **{str(v): n for v, n in labels.items()}},
        "numTraining": len(training),
        "numTest": len(test),
        "training": list(training),
        "test": list(test),
        "generator": {"module": generator, "first_seed": first_seed},
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return root
