"""A folder of mixed cases: a DICOM zip, a DICOM sub-folder, a NIfTI file; each segmented on its own grid."""

import json
import shutil

import nibabel as nib
import numpy as np

from pipelines.cases import discover_cases
from pipelines.phantom_dicom import write_phantom_series
from tests.conftest import run_tessera


def test_mixed_case_folder(tmp_path, tiny_model):
    cases = tmp_path / "cases"
    (cases / "study_a").mkdir(parents=True)
    _, phantom_a = write_phantom_series(30, cases / "study_a", orientation="LPS", spacing=(4.0, 4.0, 5.0))
    staging = tmp_path / "staging"
    staging.mkdir()
    _, phantom_b = write_phantom_series(31, staging / "nested" / "series", orientation="ASL", spacing=(4.0, 4.0, 5.0))
    shutil.make_archive(str(cases / "study_b"), "zip", staging)
    nib.save(phantom_a.image, cases / "volume_c.nii.gz")
    (cases / "notes.txt").write_text("not a case")

    found = discover_cases([cases])
    assert sorted(c.case_id for c in found) == ["study_a", "study_b", "volume_c"]

    out = tmp_path / "out"
    run = run_tessera("segment", str(cases), "-o", str(out), "--model", str(tiny_model.manifest_path))
    assert run.returncode == 0, run.stderr
    for case, phantom in (("study_a", phantom_a), ("study_b", phantom_b), ("volume_c", phantom_a)):
        mask = nib.load(out / case / "mask.nii.gz")
        ours = nib.as_closest_canonical(nib.Nifti1Image(np.zeros(mask.shape, np.uint8), mask.affine))
        theirs = nib.as_closest_canonical(phantom.image)
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    report = json.loads((out / "study_b" / "report.json").read_text())
    assert report["input_provenance"]["channels"][0]["format"] == "dicom"
