"""DICOM-SEG: valid by dciodvfy, read back voxel for voxel, same frames as dcmqi's own SEG."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.phantom_dicom import write_phantom_series
from pipelines.writers.export import export_seg, mask_on_stack
from pipelines.writers.seg import OutputError
from tests.conftest import ROOT, dciodvfy_errors, run_tessera

TOTALSEG = Path("totalsegmentator/tests/reference_files")
PYDICOM_SEG_PYTHON = ROOT / ".venv-pydicom-seg" / "bin" / "python"




def read_back_with_pydicom_seg(seg_path: Path, out_dir: Path) -> dict[int, nib.Nifti1Image]:
    """pydicom-seg (unmaintained; needs pydicom 2 / numpy 1) runs in its own venv made by .ci/run."""
    if not PYDICOM_SEG_PYTHON.exists():
        pytest.skip("pydicom-seg venv absent (.ci/run creates .venv-pydicom-seg)")
    script = (
        "import sys, pydicom, pydicom_seg, SimpleITK as sitk\n"
        "result = pydicom_seg.SegmentReader().read(pydicom.dcmread(sys.argv[1]))\n"
        "for number in result.available_segments:\n"
        "    sitk.WriteImage(result.segment_image(number), f'{sys.argv[2]}/segment_{number}.nii.gz')\n"
    )
    run = subprocess.run([str(PYDICOM_SEG_PYTHON), "-c", script, str(seg_path), str(out_dir)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return {int(p.name.split("_")[1].split(".")[0]): nib.load(p) for p in out_dir.glob("segment_*.nii.gz")}


def _canonical_bool(image: nib.Nifti1Image) -> nib.Nifti1Image:
    canonical = nib.as_closest_canonical(image)
    return nib.Nifti1Image((np.asarray(canonical.dataobj) > 0).astype(np.uint8), canonical.affine)


def check_seg(seg_path: Path, source: Path, mask: nib.Nifti1Image, tmp_path: Path) -> None:
    """dciodvfy clean; highdicom and pydicom-seg both read back the mask, in source geometry."""
    assert _validator_errors(seg_path) == []
    study = read_study(source)
    (candidate,) = [c for c in study.volumes if mask_on_stack(mask, c) is not None]
    labels = mask_on_stack(mask, candidate)
    assert labels is not None
    seg = hd.seg.segread(seg_path)
    uids = [s.dataset().get("SOPInstanceUID") or s.dataset().file_meta.MediaStorageSOPInstanceUID
            for s in candidate.geometry.slices]  # type: ignore[union-attr]
    stack = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True,
                                              assert_missing_frames_are_empty=True)
    values = sorted(int(v) for v in np.unique(labels) if v > 0)
    table = np.array([0, *values])
    np.testing.assert_array_equal(table[stack].transpose(2, 1, 0), labels)
    segments = read_back_with_pydicom_seg(seg_path, tmp_path)
    for number, value in enumerate(values, start=1):
        if number not in segments:
            assert not np.any(labels == value)
            continue
        theirs = _canonical_bool(segments[number])
        ours = _canonical_bool(nib.Nifti1Image((labels == value).astype(np.uint8), candidate.geometry.affine))
        # pydicom-seg returns the extent of the frames it has: compare in world coordinates
        shift = np.linalg.solve(ours.affine, theirs.affine[:, 3])[:3]
        start = np.rint(shift).astype(int)
        np.testing.assert_allclose(shift, start, atol=1e-3)
        sub = np.asarray(ours.dataobj)[tuple(slice(s, s + n) for s, n in zip(start, theirs.shape, strict=True))]
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), sub)
        assert np.asarray(theirs.dataobj).sum() == (labels == value).sum()


def _threshold_mask(source: Path, tmp_path: Path) -> Path:
    volume = load_volume(read_study(source).volumes[0])
    data = volume.array.astype(np.float32)
    labels = np.zeros(data.shape, np.uint8)
    labels[data > np.percentile(data, 60)] = 1
    labels[data > np.percentile(data, 90)] = 2
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(labels, volume.affine), path)
    return path


def test_segment_phantom_series_writes_a_valid_seg(tmp_path):
    series = tmp_path / "study"
    write_phantom_series(40, series, orientation="LPS", spacing=(4.0, 4.0, 5.0))
    run = run_tessera("segment", str(series), "-o", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr
    case = tmp_path / "out" / "study"
    report = json.loads((case / "report.json").read_text())
    assert {"mask.nii.gz", "seg.dcm", "stats.json", "preview.png"} <= set(report["outputs"])
    seg = pydicom.dcmread(case / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen", "kidney_left", "kidney_right",
                                                             "spine"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SNOMED liver
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == \
        "swin-unetr-phantom"
    source = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert seg.PatientID == source.PatientID and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    check_seg(case / "seg.dcm", series, nib.load(case / "mask.nii.gz"), tmp_path)


@pytest.mark.shared_data
def test_export_seg_of_totalsegmentators_real_mask(shared_data, tmp_path):
    """TotalSegmentator's own multi-label mask (stored with dcm2niix's flipped rows) on its CT series."""
    source = shared_data / TOTALSEG / "example_ct_dicom"
    mask_path = shared_data / TOTALSEG / "example_seg_dicom.nii.gz"
    run = run_tessera("export-seg", "--mask", str(mask_path), "--source", str(source), "-o", str(tmp_path / "s.dcm"))
    assert run.returncode == 0, run.stderr
    check_seg(tmp_path / "s.dcm", source, nib.load(mask_path), tmp_path)


@pytest.mark.shared_data
@pytest.mark.parametrize("series", ["ge/anatomical/001", "generic/anatomical/002_non_isotropic",
                                    "philips/anatomical/001"], ids=["sagittal", "oblique", "oblique-coronal"])
def test_export_seg_on_sagittal_and_oblique_series(shared_data, tmp_path, series):
    source = shared_data / "dicom2nifti/tests/data" / series
    mask_path = _threshold_mask(source, tmp_path)
    export_seg(mask_path, source, tmp_path / "s.dcm")
    check_seg(tmp_path / "s.dcm", source, nib.load(mask_path), tmp_path)


def _nrrd_as_nifti(path: Path) -> nib.Nifti1Image:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return nib.Nifti1Image(sitk.GetArrayFromImage(image).transpose(2, 1, 0), np.diag([-1, -1, 1, 1]) @ lps)


@pytest.mark.shared_data
def test_dcmqi_liver_seg_frames_match(shared_data, tmp_path):
    root = shared_data / "dcmqi/data/segmentations"
    mask = _nrrd_as_nifti(root / "liver_seg.nrrd")
    nib.save(mask, tmp_path / "liver.nii.gz")
    ours = pydicom.dcmread(export_seg(tmp_path / "liver.nii.gz", root / "ct-3slice", tmp_path / "ours.dcm"))
    theirs = pydicom.dcmread(root / "liver.dcm")

    def frames(seg: pydicom.Dataset) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
        return {
            group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID:
                (np.asarray(group.PlanePositionSequence[0].ImagePositionPatient, float), pixels[index])
            for index, group in enumerate(seg.PerFrameFunctionalGroupsSequence)
        }

    ours_frames, theirs_frames = frames(ours), frames(theirs)
    for uid, (position, pixels) in theirs_frames.items():
        if uid not in ours_frames:
            assert not pixels.any()  # we omit empty frames by default
            continue
        np.testing.assert_allclose(ours_frames[uid][0], position, atol=1e-3)
        np.testing.assert_array_equal(ours_frames[uid][1], pixels)
    assert set(ours_frames) <= set(theirs_frames)


def test_seg_needs_dicom_input_and_a_matching_grid(tmp_path, small_phantom_files):
    run = run_tessera("segment", str(small_phantom_files["case3"]), "-o", str(tmp_path / "o"), "--format",
                      "nifti,dicom-seg")
    assert run.returncode == 1 and "SEG_NEEDS_DICOM" in run.stderr and "Traceback" not in run.stderr
    series = tmp_path / "study"
    write_phantom_series(41, series, orientation="LPS", spacing=(4.0, 4.0, 5.0))
    wrong = nib.Nifti1Image(np.ones((7, 7, 7), np.uint8), np.eye(4))
    nib.save(wrong, tmp_path / "wrong.nii.gz")
    with pytest.raises(OutputError) as info:
        export_seg(tmp_path / "wrong.nii.gz", series, tmp_path / "x.dcm")
    assert info.value.code == "SEG_GRID_MISMATCH"


def test_fractional_seg_is_valid_and_reads_back(tmp_path, tiny_model):
    series = tmp_path / "study"
    write_phantom_series(42, series, orientation="ASL", spacing=(4.0, 4.0, 5.0))
    run = run_tessera("segment", str(series), "-o", str(tmp_path / "out"), "--model", str(tiny_model.manifest_path),
                      "--format", "nifti,dicom-seg,probabilities", "--seg-type", "fractional")
    assert run.returncode == 0, run.stderr
    seg_path = tmp_path / "out" / "study" / "seg.dcm"
    assert pydicom.dcmread(seg_path, stop_before_pixels=True).SegmentationType == "FRACTIONAL"
    assert _validator_errors(seg_path) == []
    probabilities = nib.load(tmp_path / "out" / "study" / "probabilities.nii.gz")
    assert probabilities.shape[-1] == 6 and probabilities.get_fdata().max() <= 1.0 + 1e-6  # float32 scl_slope
    np.testing.assert_allclose(probabilities.get_fdata().sum(axis=-1), 1.0, atol=6 * 0.5 / 255 + 1e-6)


def _validator_errors(path: Path) -> list[str]:
    return dciodvfy_errors(path, "Segmentation")
