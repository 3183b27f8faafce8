"""Head-and-neck PET/CT phantoms: deterministic, HECKTOR labels, PET on its own grid, a DICOM PET/CT study that
reads back into the model's two channels with SUV."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from models.manifest import Channel
from pipelines.ingestion.reading import read_case
from pipelines.phantom_dicom import write_hnc_study
from pipelines.phantoms_hnc import HNC_LABELS, make_hnc_phantom, write_hnc_dataset
from pipelines.training import read_msd_dataset

CHANNELS = (Channel("CT", "CT"), Channel("PET", "PT"))


def _world_to_index(image: nib.Nifti1Image, points: np.ndarray) -> np.ndarray:
    return np.rint((np.linalg.inv(image.affine) @ np.c_[points, np.ones(len(points))].T)[:3].T).astype(int)


def test_same_seed_same_phantom_and_labels_as_hecktor():
    a, b = make_hnc_phantom(3), make_hnc_phantom(3)
    for name in ("ct", "pet", "label"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name).dataobj), np.asarray(getattr(b, name).dataobj))
    labels = np.asarray(a.label.dataobj)
    assert set(np.unique(labels)) == {0, 1, 2} and HNC_LABELS == {1: "GTVp", 2: "GTVn"}
    assert a.label.shape == a.ct.shape and np.array_equal(a.label.affine, a.ct.affine)


def test_pet_is_coarser_in_another_orientation_and_tumours_are_hot_on_pet_not_on_ct():
    phantom = make_hnc_phantom(4)
    assert nib.aff2axcodes(phantom.pet.affine) != nib.aff2axcodes(phantom.ct.affine)
    assert np.prod(phantom.pet.header.get_zooms()) > 2 * np.prod(phantom.ct.header.get_zooms())
    labels, ct = np.asarray(phantom.label.dataobj), np.asarray(phantom.ct.dataobj)
    tumour = np.argwhere(labels > 0)
    world = (phantom.ct.affine @ np.c_[tumour, np.ones(len(tumour))].T)[:3].T
    pet_index = _world_to_index(phantom.pet, world)
    pet = np.asarray(phantom.pet.dataobj)
    inside = np.all((pet_index >= 0) & (pet_index < pet.shape), axis=1)
    tumour_suv = pet[tuple(pet_index[inside].T)].mean()
    soft_tissue = (ct > 0) & (ct < 80) & (labels == 0)
    assert tumour_suv > 3.0 and pet.min() >= 0.0
    assert abs(float(ct[labels > 0].mean()) - float(ct[soft_tissue].mean())) < 40  # little CT contrast


def test_dataset_lists_channel_files(tmp_path):
    root = write_hnc_dataset(tmp_path / "hnc", n_train=2, n_test=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["modality"] == {"0": "CT", "1": "PT"}
    assert meta["training"][0]["image"] == ["./imagesTr/hnc_000_0000.nii.gz", "./imagesTr/hnc_000_0001.nii.gz"]
    dataset = read_msd_dataset(root)
    assert dataset.modalities == ["CT", "PT"] and len(dataset.training) == 2


def test_dicom_study_reads_back_as_two_channels_with_suv(tmp_path):
    write_hnc_study(5, tmp_path / "study", uid_seed=1)
    phantom = make_hnc_phantom(5)
    case = read_case([tmp_path / "study"], CHANNELS, "hnc")
    assert sorted(case.volume.array.shape[1:]) == sorted(phantom.ct.shape)
    read_ct = nib.as_closest_canonical(nib.Nifti1Image(case.volume.array[0], case.volume.affine))
    written_ct = nib.as_closest_canonical(phantom.ct)
    np.testing.assert_array_equal(np.asarray(read_ct.dataobj), np.asarray(written_ct.dataobj))
    np.testing.assert_allclose(read_ct.affine, written_ct.affine, atol=1e-4)
    roles = [c["role"] for c in case.provenance["channels"]]
    assert roles == ["CT", "PET"]
    pet_on_ct = case.volume.array[1]
    assert pet_on_ct.min() >= 0.0 and 3.0 < pet_on_ct.max() < 30.0  # SUV, not Bq/mL
    assert not any("SUV" in w for w in case.warnings)


def test_pet_without_decay_information_keeps_its_units_with_a_warning(tmp_path):
    write_hnc_study(6, tmp_path / "study", uid_seed=2, decay_information=False)
    case = read_case([tmp_path / "study"], CHANNELS, "hnc")
    assert case.volume.array[1].max() > 100.0  # Bq/mL
    assert any("SUV" in w for w in case.warnings)


def test_a_pet_ct_model_trains_on_channel_files_and_segments_the_dicom_study(tmp_path):
    """One file per channel in training (PET resampled onto the CT as at inference); the DICOM study in."""
    from tests.conftest import run_tessera

    root = write_hnc_dataset(tmp_path / "hnc", n_train=3, n_test=0)
    out = tmp_path / "model"
    run = run_tessera("train", str(root), "-o", str(out), "--name", "tiny-petct", "--family", "mamba_clinix",
                      "--base-channels", "4", "--max-channels", "16", "--intensity", "zscore", "--iterations", "2",
                      "--validate-every", "2", "--validation-cases", "1", "--crop", "32", "--roi", "32",
                      "--spacing", "5", "--device", "cpu")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["modality"] for c in manifest["channels"]] == ["CT", "PT"]
    assert manifest["training"]["validation_cases"] == ["hnc_002_0000.nii.gz"]
    write_hnc_study(7, tmp_path / "study", uid_seed=3)
    segmented = run_tessera("segment", str(tmp_path / "study"), "-o", str(tmp_path / "seg"), "--model",
                            str(out / "manifest.json"), "--format", "nifti,dicom-seg")
    assert segmented.returncode == 0, segmented.stderr
    report = json.loads((tmp_path / "seg" / "study" / "report.json").read_text())
    assert [c["role"] for c in report["input_provenance"]["channels"]] == ["CT", "PT"]
    assert (tmp_path / "seg" / "study" / "seg.dcm").is_file()


def test_a_study_without_pet_fails_naming_the_missing_modality(tmp_path):
    import pytest

    from pipelines.errors import InputError

    write_hnc_study(8, tmp_path / "study", uid_seed=4, with_pet=False)
    with pytest.raises(InputError) as info:
        read_case([tmp_path / "study"], CHANNELS, "hnc")
    assert info.value.code == "MODALITY_MISMATCH" and "needs PT" in info.value.message


def test_committed_pet_ct_sample_data_match_the_generator():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "sample_data" / "hnc"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == len(meta["training"]) == 16 and meta["numTest"] == 4
    fresh = make_hnc_phantom(16)
    for channel, image, tolerance in (("0000", fresh.ct, 0.0), ("0001", fresh.pet, 1e-3)):  # PET: 0.001 SUV steps
        stored = nib.load(root / "imagesTs" / f"hnc_016_{channel}.nii.gz")
        np.testing.assert_allclose(np.asarray(stored.dataobj), np.asarray(image.dataobj), atol=tolerance, rtol=0)
        np.testing.assert_allclose(stored.affine, image.affine)
    np.testing.assert_array_equal(np.asarray(nib.load(root / "labelsTs" / "hnc_016.nii.gz").dataobj),
                                  np.asarray(fresh.label.dataobj))
