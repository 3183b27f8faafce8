"""Real-scanner round 2: what held-out scanner exports got wrong, rebuilt on generated DICOM and ../shared."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.phantom_dicom import write_phantom_series

RAW_DATA = "1.2.840.10008.5.1.4.1.1.66"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_PR = "1.2.840.10008.5.1.4.1.1.11.1"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"


def add_non_image_instance(image: Path, out: Path, sop_class: str, modality: str) -> Path:
    """An instance of ``sop_class`` (no pixel data) in the same study and series as ``image``."""
    source = pydicom.dcmread(image, stop_before_pixels=True)
    ds = Dataset()
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber",
                    "StudyDate", "FrameOfReferenceUID"):
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.Modality, ds.InstanceNumber = modality, 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize(("sop_class", "modality"), [(RAW_DATA, "CT"), (BASIC_TEXT_SR, "SR"), (GRAYSCALE_PR, "PR"),
                                                     (KEY_OBJECT, "KO")])
def test_a_non_image_instance_beside_the_images_is_left_out_alone(tmp_path: Path, sop_class: str,
                                                                   modality: str) -> None:
    paths, phantom = write_phantom_series(31, tmp_path / "study", spacing=(6.0, 6.0, 8.0))
    expected = load_volume(read_study(tmp_path / "study").volumes[0])
    # named to sort (and be read) first: it must not decide the fate of the series
    add_non_image_instance(paths[0], tmp_path / "study" / "000_raw.dcm", sop_class, modality)
    study = read_study(tmp_path / "study")
    assert study.set_aside == [] and len(study.volumes) == 1
    (candidate,) = study.volumes
    assert any("1 instance(s) without an image" in w for w in candidate.warnings), candidate.warnings
    volume = load_volume(candidate)
    np.testing.assert_array_equal(volume.array, expected.array)
    np.testing.assert_allclose(volume.affine, expected.affine)


def test_a_series_of_non_image_instances_only_is_still_set_aside(tmp_path: Path) -> None:
    paths, _ = write_phantom_series(32, tmp_path / "study", spacing=(6.0, 6.0, 8.0))
    raw = add_non_image_instance(paths[0], tmp_path / "study" / "000_raw.dcm", RAW_DATA, "MR")
    other = pydicom.dcmread(raw)
    other.SeriesInstanceUID, other.SeriesNumber = generate_uid(), 99
    other.save_as(raw)
    study = read_study(tmp_path / "study")
    assert [(s.series_number, s.reason.split(":")[0]) for s in study.set_aside] == [(99, "NOT_AN_IMAGE")]
    assert len(study.volumes) == 1 and not study.volumes[0].warnings


def test_an_enhanced_mr_beside_raw_data_of_its_series_is_read(shared_data: Path, tmp_path: Path) -> None:
    """The held-out case: Raw Data Storage with the Series Instance UID of an enhanced multi-frame MR."""
    source = shared_data / "dcm_qa_enh" / "In" / "Siemens" / "XA10"
    folder = tmp_path / "xa10"
    shutil.copytree(source, folder)
    before = read_study(folder)
    first = sorted(p for p in folder.rglob("*") if p.is_file())[0]
    add_non_image_instance(first, folder / "000_raw.dcm", RAW_DATA, "MR")
    after = read_study(folder)
    assert [c.label for c in after.volumes] == [c.label for c in before.volumes]
    assert after.set_aside == before.set_aside
    ref = load_volume(before.volumes[0])
    got = load_volume(after.volumes[0])
    np.testing.assert_array_equal(got.array, ref.array)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(ref.affine)


def _with_defective_copied_attributes(folder: Path) -> None:
    """What a classic Philips export carried: an empty Procedure Code Sequence (the module wants 1-n items),
    plus an empty Referenced Study Sequence and a code item without its meaning, on every image."""
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.ProcedureCodeSequence = pydicom.Sequence([])
        ds.ReferencedStudySequence = pydicom.Sequence([])
        broken = Dataset()
        broken.CodeValue, broken.CodingSchemeDesignator = "T-1234", "SRT"  # no CodeMeaning
        ds.AdmittingDiagnosesCodeSequence = pydicom.Sequence([broken])
        ds.save_as(path)


def test_seg_and_rtstruct_drop_empty_and_invalid_sequences_copied_from_the_source(tmp_path: Path) -> None:
    from models.manifest import Label
    from pipelines.writers.export import mask_on_stack
    from pipelines.writers.rtstruct import write_rtstruct
    from pipelines.writers.seg import SegAlgorithm, write_dicom_seg
    from tests.conftest import dciodvfy_errors

    _, phantom = write_phantom_series(33, tmp_path / "study", spacing=(4.0, 4.0, 5.0))
    _with_defective_copied_attributes(tmp_path / "study")
    (candidate,) = read_study(tmp_path / "study").volumes
    labels = mask_on_stack(phantom.label, candidate)
    assert labels is not None
    table = [Label(int(v), f"label_{int(v)}") for v in np.unique(labels) if v > 0]
    algorithm = SegAlgorithm("tessera-test", "1")
    seg = write_dicom_seg(labels, candidate, table, algorithm, tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg, "Segmentation") == []
    written = pydicom.dcmread(seg)
    assert "ProcedureCodeSequence" not in written
    rt_utils = pytest.importorskip("rt_utils")
    del rt_utils
    rtstruct = write_rtstruct(labels, candidate, table, algorithm, tmp_path / "rtstruct.dcm")
    assert dciodvfy_errors(rtstruct, "RTStructureSet") == []


def _mixed_echoes() -> tuple[list[tuple[float, str, np.ndarray, float, float]], np.ndarray]:
    rng = np.random.default_rng(7)
    shape = (12, 10, 6)
    volumes = []
    for echo_time in (2.3, 4.6):
        for component, slope, intercept in (("MAGNITUDE", 1.5, 0.0), ("PHASE", 0.001534, -3.1416)):
            volumes.append((echo_time, component, rng.integers(0, 4096, shape).astype(np.uint16), slope, intercept))
    affine = np.array([[-1.2, 0, 0, 30], [0, 0, 3.0, -40], [0, -1.1, 0, 12], [0, 0, 0, 1]])  # coronal
    return volumes, affine


def test_enhanced_mr_mixing_magnitude_phase_and_echoes_splits_as_dcm2niix(tmp_path: Path) -> None:
    from pipelines.phantom_dicom import write_enhanced_mr

    volumes, affine = _mixed_echoes()
    write_enhanced_mr(volumes, affine, tmp_path / "study" / "IM_0001.dcm", uid_seed=5)
    study = read_study(tmp_path / "study")
    assert study.refused == []
    by_suffix = {c.suffix: c for c in study.volumes}
    assert sorted(by_suffix) == ["e1", "e1_ph", "e2", "e2_ph"]
    expected = {"e1": volumes[0], "e1_ph": volumes[1], "e2": volumes[2], "e2_ph": volumes[3]}
    for suffix, (_, _, stored, slope, intercept) in expected.items():
        volume = load_volume(by_suffix[suffix])
        canonical = nib.as_closest_canonical(nib.Nifti1Image(volume.array.astype(np.float64), volume.affine))
        truth = nib.as_closest_canonical(nib.Nifti1Image(stored * slope + intercept, affine))
        np.testing.assert_allclose(canonical.affine, truth.affine, atol=1e-4)
        np.testing.assert_allclose(np.asarray(canonical.dataobj), np.asarray(truth.dataobj), rtol=1e-6, atol=1e-5)


def _seg_of_threshold_mask(candidate, tmp_path: Path, name: str) -> tuple[Path, np.ndarray]:  # type: ignore[no-untyped-def]
    from models.manifest import Label
    from pipelines.writers.seg import SegAlgorithm, write_dicom_seg

    volume = load_volume(candidate)
    data = volume.array.astype(np.float32)
    labels = np.zeros(data.shape, np.uint8)
    labels[data > np.percentile(data, 70)] = 1
    labels[data > np.percentile(data, 95)] = 2
    seg = write_dicom_seg(labels, candidate, [Label(1, "bright"), Label(2, "brightest")],
                          SegAlgorithm("tessera-test", "1"), tmp_path / f"{name}.dcm")
    return seg, labels


def test_seg_on_an_enhanced_multi_frame_source_references_its_frames(tmp_path: Path) -> None:
    """One SEG frame per source frame it covers (Referenced SOP Instance UID + Referenced Frame Number), valid
    by dciodvfy, reading back as the mask; the phase volume of the same file gets its own SEG."""
    from pipelines.phantom_dicom import write_enhanced_mr
    from tests.conftest import dciodvfy_errors

    volumes, affine = _mixed_echoes()
    source = write_enhanced_mr(volumes, affine, tmp_path / "study" / "IM_0001.dcm", uid_seed=6)
    study = read_study(tmp_path / "study")
    by_suffix = {c.suffix: c for c in study.volumes}
    for suffix in ("e2", "e1_ph"):
        candidate = by_suffix[suffix]
        seg_path, labels = _seg_of_threshold_mask(candidate, tmp_path, suffix)  # verified on writing, too
        assert dciodvfy_errors(seg_path, "Segmentation") == []
        seg = pydicom.dcmread(seg_path)
        referenced = {int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                      for f in seg.PerFrameFunctionalGroupsSequence}
        own = {int(s.frame) + 1 for s in candidate.geometry.slices}  # type: ignore[union-attr]
        assert referenced and referenced <= own
        assert {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
                for f in seg.PerFrameFunctionalGroupsSequence} == {str(pydicom.dcmread(source).SOPInstanceUID)}
        del labels


def test_seg_on_real_enhanced_siemens_mr(shared_data: Path, tmp_path: Path) -> None:
    from tests.conftest import dciodvfy_errors

    (candidate,) = read_study(shared_data / "dcm_qa_xa30" / "In" / "5_anat-T1w_acq-tfl").volumes
    seg_path, _ = _seg_of_threshold_mask(candidate, tmp_path, "xa30")
    assert dciodvfy_errors(seg_path, "Segmentation") == []


def _uih_volumes() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(12)
    volumes = [rng.integers(0, 4000, (10, 12, 7)).astype(np.uint16) for _ in range(3)]
    theta = np.deg2rad(12)
    rotation = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 2.2, 3.5])
    affine[:3, 3] = [-10.0, 20.0, -30.0]
    return volumes, affine


def test_a_united_imaging_grid_series_is_read_through_its_private_slice_positions(tmp_path: Path) -> None:
    from pipelines.phantom_dicom import write_uih_grid_series

    volumes, affine = _uih_volumes()
    write_uih_grid_series(volumes, affine, tmp_path / "study", uid_seed=7)
    study = read_study(tmp_path / "study")
    assert study.refused == []
    assert len(study.volumes) == 3
    for candidate, stored in zip(study.volumes, volumes, strict=True):
        volume = load_volume(candidate)
        canonical = nib.as_closest_canonical(nib.Nifti1Image(volume.array.astype(np.float64), volume.affine))
        truth = nib.as_closest_canonical(nib.Nifti1Image(stored.astype(np.float64), affine))
        np.testing.assert_allclose(canonical.affine, truth.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(canonical.dataobj), np.asarray(truth.dataobj))


def test_seg_on_a_united_imaging_grid_volume_is_valid_and_reads_back(tmp_path: Path) -> None:
    from pipelines.phantom_dicom import write_uih_grid_series
    from tests.conftest import dciodvfy_errors
    from tests.test_seg_sweep import _world_offsets_mm

    volumes, affine = _uih_volumes()
    write_uih_grid_series(volumes, affine, tmp_path / "study", uid_seed=9)
    candidate = read_study(tmp_path / "study").volumes[1]
    seg_path, labels = _seg_of_threshold_mask(candidate, tmp_path, "grid")  # verified on writing, too
    assert dciodvfy_errors(seg_path, "Segmentation") == []
    worst, wrong = _world_offsets_mm(seg_path, labels, load_volume(candidate).affine)
    assert wrong == 0 and worst <= 0.1


def test_a_united_imaging_grid_without_slice_positions_is_refused_as_what_it_is(tmp_path: Path) -> None:
    from pipelines.phantom_dicom import write_uih_grid_series

    volumes, affine = _uih_volumes()
    write_uih_grid_series(volumes, affine, tmp_path / "study", uid_seed=8, slice_positions=False)
    study = read_study(tmp_path / "study")
    assert study.volumes == [] or all(not c.ok for c in study.volumes)
    codes = {code for c in study.refused for code in c.codes}
    assert codes == {"UIH_GRID_WITHOUT_POSITIONS"}
