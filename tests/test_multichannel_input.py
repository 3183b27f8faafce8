"""Several inputs for one case: channels resampled onto the first channel's grid, roles recorded."""

import json

import nibabel as nib
import numpy as np
import pytest

from models.manifest import Channel
from pipelines.cases import discover_cases
from pipelines.errors import InputError, UsageError
from pipelines.ingestion.reading import read_case
from pipelines.phantoms import make_phantom
from tests.conftest import run_tessera, write_tiny_model


def _two_grids(tmp_path):
    phantom = make_phantom(21, orientation="LPS", spacing=(4.0, 4.0, 5.0))
    nib.save(phantom.image, tmp_path / "case_0000.nii.gz")
    # The second channel: the same physical image on another grid (other orientation, coarser voxels).
    moved = nib.as_closest_canonical(phantom.image)
    coarse = nib.Nifti1Image(np.asarray(moved.dataobj)[::2, ::2, :].astype(np.float32),
                             moved.affine @ np.diag([2.0, 2.0, 1.0, 1.0]))
    nib.save(coarse, tmp_path / "case_0001.nii.gz")
    return phantom


def test_channels_are_resampled_onto_the_reference_grid(tmp_path):
    phantom = _two_grids(tmp_path)
    channels = (Channel("CT", "CT"), Channel("CT2", "CT"))
    (case,) = discover_cases([tmp_path], channels=2)
    assert case.case_id == "case" and [p.name for p in case.paths] == ["case_0000.nii.gz", "case_0001.nii.gz"]
    result = read_case(list(case.paths), channels, case.case_id)
    volume = result.volume
    assert volume.array.shape == (2, *phantom.image.shape)
    np.testing.assert_array_equal(volume.affine, phantom.image.affine)
    body = volume.array[0] > -500
    assert np.corrcoef(volume.array[0][body], volume.array[1][body])[0, 1] > 0.9  # same anatomy, resampled
    assert [c["role"] for c in result.provenance["channels"]] == ["CT", "CT2"]
    assert result.provenance["reference_grid"] == "CT"


def test_missing_channel_is_a_usage_error(tmp_path):
    _two_grids(tmp_path)
    (tmp_path / "case_0001.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "other_0001.nii.gz")
    with pytest.raises(UsageError) as info:
        discover_cases([tmp_path], channels=2)
    assert info.value.code == "CHANNELS_INCOMPLETE"


def test_channel_count_must_match(tmp_path):
    _two_grids(tmp_path)
    with pytest.raises(InputError) as info:
        read_case([tmp_path / "case_0000.nii.gz"], (Channel("CT", "CT"), Channel("PET", "PT")), "case")
    assert info.value.code == "CHANNEL_COUNT_MISMATCH"


def test_two_channel_model_segments_a_case_folder(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    _two_grids(folder)
    manifest = write_tiny_model(tmp_path / "model", name="tiny-2ch", channels=2)
    run = run_tessera("segment", str(folder), "-o", str(tmp_path / "out"), "--model", str(manifest.manifest_path))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "out" / "case" / "report.json").read_text())
    assert report["input"] == ["case_0000.nii.gz", "case_0001.nii.gz"]
    assert nib.load(tmp_path / "out" / "case" / "mask.nii.gz").shape == nib.load(folder / "case_0000.nii.gz").shape
