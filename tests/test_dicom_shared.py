"""DICOM ingestion on real scanner data from ../shared/data, against the peers' reference conversions."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.ingestion.dicom.pixels import decode_volume
from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.ingestion.dicom.selection import select_series
from tests.conftest import run_tessera, shared_data_dir

pytestmark = pytest.mark.shared_data

D2N = Path("dicom2nifti/tests/data")
# Pairs with fewer than 3 slices per volume are refused by default (TOO_FEW_SLICES); they convert exactly
# with a lower --min-slices. The RGB secondary capture is set aside (derived capture, not a scanner volume).
MIN_SLICES = {"philips/fmri/001": 2, "philips/fmri/001_implicit": 2}
NOT_CONVERTED = {"ge/anatomical/001_single_slice": "TOO_FEW_SLICES", "generic/rgb/001": "DERIVED_CAPTURE"}
FAILING = {
    "failing/gantrytilting/001": "GANTRY_TILT",
    "failing/notavolume/001": "NOT_A_VOLUME",
    "failing/slicecount/001": "TOO_FEW_SLICES",
    "failing/sliceincrement/001": "MISSING_SLICES",
    "failing/sliceincrement/002": "MISSING_SLICES",
    "failing/sliceorientation/001": "INCONSISTENT_ORIENTATION",
}


def _dicom2nifti_pairs() -> list[str]:
    root = shared_data_dir()
    if root is None:
        return []
    names = sorted(str(p.relative_to(root / D2N))[: -len("_ground_truth.nii.gz")]
                   for p in (root / D2N).rglob("*_ground_truth.nii.gz"))
    return [n for n in names if not n.startswith("failing/")]


def _canonical(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(array, dtype=np.float64), affine))


def _assert_same(volume_array: np.ndarray, affine: np.ndarray, reference: np.ndarray, reference_affine: np.ndarray):
    ours, theirs = _canonical(volume_array, affine), _canonical(reference, reference_affine)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    # References store integers with a float32 scl_slope: allow their rounding, nothing more.
    tolerance = 1e-4 + 2e-5 * float(np.abs(theirs.get_fdata()).max())
    np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", _dicom2nifti_pairs())
def test_dicom2nifti_pair(shared_data, name):
    root = shared_data / D2N
    if name in NOT_CONVERTED:
        study = read_study(root / name)
        codes = [code for c in study.refused for code in c.codes] + [s.reason.split(":")[0] for s in study.set_aside]
        assert not study.volumes and NOT_CONVERTED[name] in codes
        return
    study = read_study(root / name, min_slices=MIN_SLICES.get(name, 3))
    assert not study.refused, [(c.label, c.codes) for c in study.refused]
    truth = nib.load(root / f"{name}_ground_truth.nii.gz")
    data = np.asanyarray(truth.dataobj)
    frames = [data] if data.ndim == 3 else [data.reshape(*data.shape[:3], -1)[..., t] for t in
                                             range(int(np.prod(data.shape[3:])))]
    assert len(study.volumes) == len(frames)
    for candidate, frame in zip(study.volumes, frames, strict=True):
        volume = load_volume(candidate)
        _assert_same(volume.array, volume.affine, frame, truth.affine)


@pytest.mark.parametrize(("name", "code"), sorted(FAILING.items()))
def test_failing_series_are_refused_with_their_code(shared_data, name, code):
    study = read_study(shared_data / D2N / name)
    assert not study.volumes
    assert study.refused[0].codes[0] == code, study.refused[0].codes
    assert study.refused[0].error is not None and len(study.refused[0].error.message.splitlines()) == 1


def test_tilted_series_can_be_resampled_on_request(shared_data):
    study = read_study(shared_data / D2N / "failing/gantrytilting/001", tilt="resample")
    volume = load_volume(study.volumes[0])
    columns = volume.affine[:3, :3]
    gram = columns.T @ columns
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-6)  # an orthogonal grid
    assert any(w.startswith("GANTRY_TILT") for w in volume.metadata.extra["Warnings"])


def test_nine_transfer_syntaxes_decode_identically_and_match_dcm2niix(shared_data):
    files = sorted((shared_data / "dcm_qa_ts" / "In").glob("*.dcm"))
    assert len(files) == 9
    arrays = []
    for path in files:
        study = read_study(path, min_slices=1)
        arrays.append(decode_volume(study.candidates[0].slices))
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])
    assert arrays[0].shape == (64, 64, 35)  # a Siemens mosaic of 35 tiles
    volume = load_volume(read_study(files[0]).volumes[0])
    reference = nib.load(shared_data / "dcm_qa_ts" / "Ref" / "1.nii")
    _assert_same(volume.array, volume.affine, np.asarray(reference.dataobj), reference.affine)


def test_dcm_qa_ct_reports_tilt_and_uneven_spacing(shared_data):
    study = read_study(shared_data / "dcm_qa_ct" / "In" / "GE")
    codes = study.refused[0].codes
    assert "GANTRY_TILT" in codes and ("NON_UNIFORM_SPACING" in codes or "MISSING_SLICES" in codes)
    assert "18.50 degrees" in study.refused[0].error.message


@pytest.mark.parametrize(
    ("folder", "reference"),
    [
        ("dcm_qa_xa30/In/5_anat-T1w_acq-tfl", "dcm_qa_xa30/Ref/5_anat-T1w_acq-tfl.nii"),
        ("dcm_qa_xa30/In/27_asl_2d_tra", "dcm_qa_xa30/Ref/27_asl_2d_tra.nii"),
        ("dcm_qa_xa30/In/28_asl_2d_tra", "dcm_qa_xa30/Ref/28_asl_2d_tra.nii"),
        ("dcm_qa_xa30/In/9_gre_field_mapping", "dcm_qa_xa30/Ref/9_gre_field_mapping_e2_ph.nii"),
    ],
)
def test_enhanced_siemens_xa30_matches_dcm2niix(shared_data, folder, reference):
    study = read_study(shared_data / folder)
    assert len(study.volumes) == 1
    volume = load_volume(study.volumes[0])
    ref = nib.load(shared_data / reference)
    _assert_same(volume.array, volume.affine, np.asarray(ref.dataobj), ref.affine)


def test_multi_echo_and_time_series_are_split(shared_data):
    echoes = read_study(shared_data / "dcm_qa_xa30/In/8_gre_field_mapping")
    assert [c.suffix for c in echoes.volumes] == ["e1", "e2"]
    for candidate, name in zip(echoes.volumes, ("e1", "e2"), strict=True):
        ref = nib.load(shared_data / f"dcm_qa_xa30/Ref/8_gre_field_mapping_{name}.nii")
        volume = load_volume(candidate)
        _assert_same(volume.array, volume.affine, np.asarray(ref.dataobj), ref.affine)
    for folder, reference in (("dcm_qa_xa30/In/25_asl_2d_tra", "dcm_qa_xa30/Ref/25_asl_2d_tra.nii"),
                              ("dcm_qa_enh/In/Siemens/XA10", "dcm_qa_enh/Ref/Siemens_REST1_w_SMS_PF7-8_6.nii")):
        series = read_study(shared_data / folder)
        ref = nib.load(shared_data / reference)
        assert len(series.volumes) == ref.shape[3]
        for t, candidate in enumerate(series.volumes):
            volume = load_volume(candidate)
            _assert_same(volume.array, volume.affine, np.asarray(ref.dataobj)[..., t], ref.affine)


def test_philips_enhanced_scaling_convention(shared_data):
    """Philips: we apply RescaleSlope/Intercept; dcm2niix's values differ by a linear factor (documented)."""
    study = read_study(shared_data / "dcm_qa_enh/In/Philips")
    volumes = {c.suffix: load_volume(c) for c in study.volumes}
    fieldmap = nib.load(shared_data / "dcm_qa_enh/Ref/Philips_WIP_B0_NS_801_e2_fieldmaphz.nii")
    _assert_same(volumes["e2"].array, volumes["e2"].affine, np.asarray(fieldmap.dataobj), fieldmap.affine)
    magnitude = nib.load(shared_data / "dcm_qa_enh/Ref/Philips_WIP_B0_NS_801_e1.nii")
    ours = _canonical(volumes["e1"].array, volumes["e1"].affine).get_fdata().ravel()
    theirs = _canonical(np.asarray(magnitude.dataobj), magnitude.affine).get_fdata().ravel()
    slope, intercept = np.polyfit(ours, theirs, 1)
    assert np.abs(slope * ours + intercept - theirs).max() <= 1e-3 * np.abs(theirs).max()


def test_totalsegmentator_dicom_has_the_grid_of_its_reference(shared_data):
    root = shared_data / "totalsegmentator/tests/reference_files"
    study = read_study(root / "example_ct_dicom")
    selection = select_series(study.candidates, modality="CT")
    volume = load_volume(selection.chosen)
    reference = nib.load(root / "example_seg_dicom.nii.gz")
    ours, theirs = _canonical(volume.array, volume.affine), nib.as_closest_canonical(reference)
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.affine, theirs.affine)
    assert "CT" in selection.reason and "20 slices" in selection.reason


def test_convert_cli_writes_sidecars_without_patient_identifiers(shared_data, tmp_path):
    run = run_tessera("convert", str(shared_data / "totalsegmentator/tests/reference_files/example_ct_dicom"),
                      "-o", str(tmp_path))
    assert run.returncode == 0, run.stderr
    (image,) = tmp_path.glob("*.nii.gz")
    sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
    assert sidecar["Modality"] == "CT" and sidecar["SliceCount"] == 20 and "SeriesInstanceUID" in sidecar
    text = json.dumps(sidecar) + run.stderr
    header = read_study(shared_data / "totalsegmentator/tests/reference_files/example_ct_dicom").volumes[0].slices[0]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(header.dataset().get(keyword, "") or "")
        if len(value) > 2:
            assert value not in text, keyword


def test_convert_cli_refusal_exit_code(shared_data, tmp_path):
    run = run_tessera("convert", str(shared_data / D2N / "failing/notavolume/001"), "-o", str(tmp_path))
    assert run.returncode == 1
    assert "NOT_A_VOLUME" in run.stderr and "Traceback" not in run.stderr


def test_segment_accepts_a_dicom_folder_and_records_the_series(shared_data, tmp_path, tiny_model):
    source = shared_data / "totalsegmentator/tests/reference_files/example_ct_dicom"
    run = run_tessera("segment", str(source), "-o", str(tmp_path), "--model", str(tiny_model.manifest_path))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "example_ct_dicom" / "report.json").read_text())
    channel = report["input_provenance"]["channels"][0]
    assert channel["format"] == "dicom" and channel["modality"] == "CT"
    assert "best of" in channel["selection_reason"]
    mask = nib.load(tmp_path / "example_ct_dicom" / "mask.nii.gz")
    volume = load_volume(read_study(source).volumes[0])
    assert mask.shape == volume.spatial_shape
    np.testing.assert_allclose(mask.affine, volume.affine, atol=1e-6)
