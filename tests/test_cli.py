"""The batch CLI as a user runs it: a real process, real files, exit codes, no tracebacks."""

import json
import shutil

import nibabel as nib
import pytest

from tests.conftest import run_tessera as tessera


@pytest.fixture()
def case_folder(tmp_path, small_phantom_files):
    folder = tmp_path / "cases"
    folder.mkdir()
    for name in ("case3", "case4"):
        shutil.copy(small_phantom_files[name], folder / f"{name}.nii.gz")
    good = small_phantom_files["case3"].read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(good[: len(good) // 3])
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_one_corrupt_case_fails_alone(tmp_path, case_folder, tiny_model):
    out = tmp_path / "out"
    run = tessera("segment", str(case_folder), "-o", str(out), "--model", str(tiny_model.manifest_path))
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    failed = [line for line in run.stderr.splitlines() if "FAILED" in line]
    assert failed == [failed[0]] and "corrupt" in failed[0] and "NIFTI_UNREADABLE" in failed[0]
    for case in ("case3", "case4"):
        mask = nib.load(out / case / "mask.nii.gz")
        source = nib.load(case_folder / f"{case}.nii.gz")
        assert mask.shape == source.shape
        assert (mask.affine == source.affine).all()
        report = json.loads((out / case / "report.json").read_text())
        assert report["status"] == "succeeded"
        assert report["model"]["weights_sha256"] == tiny_model.weights.sha256
        assert set(report["timings_s"]) >= {"read", "preprocess", "predict", "to_source_grid", "write", "total"}
        labels = json.loads((out / case / "labels.json").read_text())
        assert labels["labels"]["3"] == "kidney_left"
    report = json.loads((out / "corrupt" / "report.json").read_text())
    assert report["status"] == "failed" and report["error"]["code"] == "NIFTI_UNREADABLE"
    assert not (out / "corrupt" / "mask.nii.gz").exists()
    assert not list(out.glob(".*partial"))

    # A re-run skips finished cases and retries the failed one; --overwrite redoes everything.
    again = tessera("segment", str(case_folder), "-o", str(out), "--model", str(tiny_model.manifest_path))
    assert again.returncode == 1
    assert again.stderr.count("skipped case") == 2, again.stderr
    (case_folder / "corrupt.nii.gz").unlink()
    redo = tessera("segment", str(case_folder), "-o", str(out), "--model", str(tiny_model.manifest_path),
                   "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert "2 succeeded, 0 failed, 0 skipped" in redo.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("segment", "/no/such/input.nii.gz", "-o", "x"),
        ("segment", "sample_data/imagesTs", "-o", "x", "--model", "no-such-model"),
        ("segment", "sample_data/imagesTs", "-o", "x", "--device", "tpu"),
        ("segment", "sample_data/imagesTs", "-o", "x", "--lanes", "0"),
        ("segment", "sample_data/imagesTs"),
        ("frobnicate",),
    ],
)
def test_usage_errors_exit_2_without_traceback(tmp_path, args):
    args = tuple(str(tmp_path / "x") if a == "x" else a for a in args)
    run = tessera(*args)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr


def test_models_lists_the_default_model():
    run = tessera("models")
    assert run.returncode == 0
    assert "swin-unetr-phantom" in run.stdout
