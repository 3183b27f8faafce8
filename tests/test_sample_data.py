"""The committed sample data is what the generator makes, and it exercises the geometry paths."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from pipelines.phantoms import STRUCTURES, make_phantom

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_generator_is_deterministic():
    a, b = make_phantom(5), make_phantom(5)
    np.testing.assert_array_equal(np.asarray(a.image.dataobj), np.asarray(b.image.dataobj))
    np.testing.assert_array_equal(a.image.affine, b.image.affine)


def test_committed_cases_match_the_generator():
    dataset = json.loads((SAMPLE / "dataset.json").read_text())
    assert dataset["numTraining"] == len(dataset["training"]) and dataset["numTest"] == len(dataset["test"])
    for seed, split in ((0, "Tr"), (dataset["numTraining"], "Ts")):
        case = f"phantom_{seed:03d}.nii.gz"
        image, label = nib.load(SAMPLE / f"images{split}" / case), nib.load(SAMPLE / f"labels{split}" / case)
        fresh = make_phantom(seed)
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(fresh.image.dataobj))
        np.testing.assert_array_equal(np.asarray(label.dataobj), np.asarray(fresh.label.dataobj))
        np.testing.assert_allclose(image.affine, fresh.image.affine)


def test_sample_data_covers_orientations_and_anisotropy():
    orientations, labels_seen = set(), set()
    for path in sorted((SAMPLE / "labelsTs").glob("*.nii.gz")) + sorted((SAMPLE / "labelsTr").glob("*.nii.gz"))[:5]:
        image = nib.load(path)
        orientations.add("".join(nib.aff2axcodes(image.affine)))
        zooms = image.header.get_zooms()
        assert max(zooms) / min(zooms) > 1.2  # anisotropic
        labels_seen |= set(np.unique(np.asarray(image.dataobj)).tolist())
    assert len(orientations) >= 3 and orientations != {"RAS"}
    assert labels_seen == {0, *[s.value for s in STRUCTURES]}


def test_left_kidney_is_on_the_patients_left():
    phantom = make_phantom(2, orientation="LPS")
    canonical = nib.as_closest_canonical(phantom.label)
    labels = np.asarray(canonical.dataobj)
    world_x = {}
    for value in (3, 4):
        centre = np.argwhere(labels == value).mean(axis=0)
        world_x[value] = (canonical.affine @ [*centre, 1.0])[0]
    assert world_x[3] < world_x[4]  # RAS+: +x is the patient's right
