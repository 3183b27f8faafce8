"""Deterministic synthetic head-and-neck PET/CT phantoms with primary tumours (GTVp) and nodes (GTVn).

What the diffusion family needs to learn and what HECKTOR-like data looks like: a head and neck outline with
shoulders, brain, skull and mandible, cervical spine, airway, soft tissue; on PET, physiological uptake (brain,
salivary glands and tonsils, marrow) and the tumours' heterogeneous, partial-volume-blurred uptake (SUV-like
values); on CT the tumours have little contrast. The PET lives on a coarser grid in another orientation than the
CT (as scanners store them), so the pipeline's channel resampling is exercised. Labels on the CT grid follow
HECKTOR: 1 = GTVp, 2 = GTVn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipelines.phantoms import _ellipsoid, _smooth_field, _to_nifti, write_dataset_json

HNC_LABELS = {1: "GTVp", 2: "GTVn"}
HNC_COLORS = {1: (230, 80, 60), 2: (250, 200, 40)}
CT_ORIENTATIONS = ("LPS", "RAS", "LAS")
PET_ORIENTATIONS = ("RAS", "LPI", "LPS")
PET_FWHM_MM = 6.0


@dataclass(frozen=True)
class HncPhantom:
    ct: nib.Nifti1Image  # HU, int16, CT grid
    pet: nib.Nifti1Image  # SUV-like float32, coarser PET grid, another orientation
    label: nib.Nifti1Image  # uint8 on the CT grid: 1 GTVp, 2 GTVn


def make_hnc_phantom(seed: int, ct_spacing: tuple[float, float, float] = (2.5, 2.5, 3.0),
                     pet_spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> HncPhantom:
    """One PET/CT phantom; the same seed gives the same volumes."""
    rng = np.random.default_rng(10_000 + seed)
    half_fov = np.array([rng.uniform(84, 92), rng.uniform(92, 100), rng.uniform(88, 96)])  # RAS, mm
    spacing = np.asarray(ct_spacing, float)
    shape = tuple(int(n) for n in np.ceil(2 * half_fov / spacing))
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))
    x, y, z = coords
    # the head above z = 10 mm, the neck below, shoulders at the bottom
    head = _ellipsoid(rng, coords, (0, 5, 55), (66, 80, 70), 3, 0.05)
    neck_r = rng.uniform(48, 56) + np.clip(-(z + 55) * 1.6, 0, 40)  # widens into the shoulders
    neck = (x / (neck_r * 1.25)) ** 2 + ((y + 5) / neck_r) ** 2 <= 1.0
    body = head | (neck & (z < 40))
    brain = _ellipsoid(rng, coords, (0, 5, 60), (56, 70, 55), 2, 0.05) & (z > 18)
    skull = head & ~brain & (z > 12)
    mandible = ((x / 42) ** 2 + ((y - 38) / 34) ** 2 <= 1) & ((x / 34) ** 2 + ((y - 38) / 26) ** 2 > 1) \
        & (np.abs(z + 4) < 7) & (y > 24)
    spine = ((x - rng.uniform(-2, 2)) ** 2 + (y + 28) ** 2 <= rng.uniform(9, 11) ** 2) & (z < 20)
    airway_x = rng.uniform(-2, 2) + 2 * np.sin(z / 25)
    airway = ((x - airway_x) ** 2 + (y - 14) ** 2 <= rng.uniform(5, 7) ** 2) & (z < 8) & body
    glands = (_ellipsoid(rng, coords, (38, 20, 2), (11, 13, 16), 3, 0.2)
              | _ellipsoid(rng, coords, (-38, 20, 2), (11, 13, 16), 3, 0.2)) & body

    labels = np.zeros(shape, np.uint8)
    side = rng.choice([-1.0, 1.0])
    primary = _ellipsoid(rng, coords, (side * 12, 16, rng.uniform(-20, 0)),
                         [rng.uniform(9, 15)] * 3, 4, 0.25) & body & ~airway & ~spine
    labels[primary] = 1
    for _ in range(int(rng.integers(1, 4))):
        node_side = side if rng.random() < 0.75 else -side
        centre = (node_side * rng.uniform(28, 38), rng.uniform(-2, 16), rng.uniform(-50, -12))
        node = _ellipsoid(rng, coords, centre, [rng.uniform(5, 9)] * 3, 3, 0.2) & body & (labels == 0)
        labels[node] = 2

    ct = np.full(shape, -1000.0, np.float32)
    ct[body] = 40 + 12 * _smooth_field(rng, shape, coarse=8)[body]
    ct[body & (np.abs(x) > 38) & (z < -30)] = -90  # fat over the shoulders
    ct[brain] = 32
    ct[skull | mandible] = 750
    ct[spine] = 420
    ct[labels > 0] += 14 + 8 * _smooth_field(rng, shape, coarse=10)[labels > 0]  # little CT contrast
    ct[airway] = -950
    ct = ndimage.gaussian_filter(ct, 0.6) + rng.normal(0, 14, shape).astype(np.float32)

    suv = np.zeros(shape, np.float32)
    suv[body] = 0.9 + 0.2 * _smooth_field(rng, shape, coarse=6)[body]
    suv[brain] = rng.uniform(6.5, 9.0)
    suv[glands] = rng.uniform(1.8, 3.0)
    suv[spine | mandible] = 1.6
    suv[airway] = 0.0
    hot = _smooth_field(rng, shape, coarse=10)
    for value, level in ((1, rng.uniform(7, 14)), (2, rng.uniform(4, 9))):
        inside = labels == value
        suv[inside] = level * (0.75 + 0.25 * hot[inside])
    if rng.random() < 0.4:  # a necrotic core in the primary
        core = ndimage.binary_erosion(labels == 1, iterations=2)
        suv[core] *= 0.45
    suv = ndimage.gaussian_filter(suv, PET_FWHM_MM / 2.3548 / spacing)

    ct_affine = np.diag([*spacing, 1.0])
    offset = np.array([rng.uniform(-10, 10), rng.uniform(-30, 10), rng.uniform(-150, -80)])
    ct_affine[:3, 3] = [axis[0] for axis in axes] + offset
    pet, pet_affine = _pet_grid(suv, ct_affine, half_fov, np.asarray(pet_spacing, float), rng)
    pet = np.clip(pet * (1 + rng.normal(0, 0.08, pet.shape)), 0, None).astype(np.float32)
    code_ct = CT_ORIENTATIONS[seed % len(CT_ORIENTATIONS)]
    code_pet = PET_ORIENTATIONS[seed % len(PET_ORIENTATIONS)]
    pet_image = _to_nifti(np.round(pet * 1000).astype(np.int16), pet_affine, code_pet)
    pet_image.header.set_slope_inter(0.001, 0.0)  # SUV in 0.001 steps: a third of a float32 file
    pet_image = nib.Nifti1Image.from_bytes(pet_image.to_bytes())  # dataobj now applies the slope, as on disk
    return HncPhantom(ct=_to_nifti(np.round(ct).astype(np.int16), ct_affine, code_ct), pet=pet_image,
                      label=_to_nifti(labels, ct_affine, code_ct))


def _pet_grid(suv: np.ndarray, ct_affine: np.ndarray, half_fov: np.ndarray, spacing: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sample the (blurred) uptake at the centres of a coarser PET grid covering the CT's field of view."""
    shape = tuple(int(n) for n in np.ceil(2 * half_fov / spacing))
    pet_affine = np.diag([*spacing, 1.0])
    centre = ct_affine[:3, :3] @ ((np.asarray(suv.shape) - 1) / 2) + ct_affine[:3, 3]
    pet_affine[:3, 3] = centre - spacing * (np.asarray(shape) - 1) / 2 + rng.uniform(-1, 1, 3)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).reshape(3, -1)
    world = pet_affine[:3, :3] @ index + pet_affine[:3, 3:4]
    ct_index = np.linalg.inv(ct_affine[:3, :3]) @ (world - ct_affine[:3, 3:4])
    values = ndimage.map_coordinates(suv, ct_index, order=1, mode="constant", cval=0.0)
    return values.reshape(shape).astype(np.float32), pet_affine


def write_hnc_dataset(out_dir: str | Path, n_train: int = 16, n_test: int = 4, first_seed: int = 0) -> Path:
    """An MSD-style PET/CT dataset with nnU-Net channel files ``<case>_0000`` (CT) and ``<case>_0001`` (PET)."""
    root = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training: list[dict[str, object]] = []
    test: list[dict[str, object]] = []
    for index in range(n_train + n_test):
        seed = first_seed + index
        split = "Tr" if index < n_train else "Ts"
        case = f"hnc_{seed:03d}"
        phantom = make_hnc_phantom(seed)
        channels = [f"./images{split}/{case}_0000.nii.gz", f"./images{split}/{case}_0001.nii.gz"]
        nib.save(phantom.ct, root / channels[0])
        nib.save(phantom.pet, root / channels[1])
        nib.save(phantom.label, root / f"labels{split}" / f"{case}.nii.gz")
        (training if split == "Tr" else test).append({"image": channels, "label": f"./labels{split}/{case}.nii.gz"})
    return write_dataset_json(root, "TesseraHeadNeckPetCt", "Synthetic head-and-neck PET/CT phantoms generated by "
                              "tessera (pipelines/phantoms_hnc.py); not patient data", ["CT", "PT"], HNC_LABELS,
                              training, test, "pipelines.phantoms_hnc", first_seed)
