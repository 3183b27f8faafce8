"""RTSTRUCT: valid by dciodvfy, one ROI per label, contours on the source images, read back with Dice >= 0.95."""

from __future__ import annotations

import gzip
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from models.manifest import Label
from pipelines.ingestion.dicom.reader import load_volume, read_study
from pipelines.ingestion.dicom.series import VolumeCandidate
from pipelines.phantom_dicom import write_phantom_series
from pipelines.phantoms import STRUCTURES, Phantom
from pipelines.writers import rtstruct
from pipelines.writers.export import mask_on_stack
from pipelines.writers.rtstruct import rasterise_rtstruct, write_rtstruct
from pipelines.writers.seg import OutputError, SegAlgorithm
from tests.conftest import dciodvfy_errors, run_tessera

try:
    import cv2  # noqa: F401
    import rt_utils  # noqa: F401

    RT_UTILS_MISSING = ""
except ImportError as exc:  # the optional 'rtstruct' extra
    RT_UTILS_MISSING = f"rt-utils/OpenCV not importable ({exc}); install the 'rtstruct' extra"

needs_rt_utils = pytest.mark.skipif(bool(RT_UTILS_MISSING), reason=RT_UTILS_MISSING or "rt-utils present")

ALGORITHM = SegAlgorithm("swin-unetr-phantom", "1.2.3")
TABLE = [Label(s.value, s.name, s.color) for s in STRUCTURES]
SPACING = (4.0, 4.0, 5.0)




def series_and_labels(folder: Path, phantom: Phantom) -> tuple[VolumeCandidate, np.ndarray]:
    """The series the phantom's label map lies on, and the labels on its stack grid, checked against the volume
    as the reader decodes it (the phantom CT on the same grid reproduces it voxel for voxel)."""
    (candidate,) = [c for c in read_study(folder).volumes if mask_on_stack(phantom.label, c) is not None]
    labels = mask_on_stack(phantom.label, candidate)
    volume = load_volume(candidate)
    assert labels is not None and labels.shape == volume.array.shape
    np.testing.assert_allclose(volume.affine, candidate.geometry.affine)  # type: ignore[union-attr]
    np.testing.assert_array_equal(mask_on_stack(phantom.image, candidate), volume.array)
    return candidate, labels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(int(a.sum()) + int(b.sum()), 1)


def source_uids(candidate: VolumeCandidate) -> list[str]:
    return [str(s.dataset().SOPInstanceUID) for s in candidate.geometry.slices]  # type: ignore[union-attr]


def check_vertices_on_mask(ds: pydicom.Dataset, candidate: VolumeCandidate, labels: np.ndarray) -> None:
    """Contours trace boundary voxel centres: every vertex, mapped to the stack grid by the series affine,
    is the centre of a voxel of its ROI on the slice its contour references (catches misplaced contours)."""
    to_voxel = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ candidate.geometry.affine)  # type: ignore[union-attr]
    slice_of = {uid: k for k, uid in enumerate(source_uids(candidate))}
    value_of = {int(r.ROINumber): next(lbl.value for lbl in TABLE if lbl.name == r.ROIName)
                for r in ds.StructureSetROISequence}
    for roi_contour in ds.ROIContourSequence:
        value = value_of[int(roi_contour.ReferencedROINumber)]
        for contour in roi_contour.ContourSequence:
            k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            assert int(contour.NumberOfContourPoints) * 3 == len(contour.ContourData)
            voxels = nib.affines.apply_affine(to_voxel, np.asarray(contour.ContourData, float).reshape(-1, 3))
            index = np.rint(voxels).astype(int)
            np.testing.assert_allclose(voxels, index, atol=1e-3)
            assert (index[:, 2] == k).all()
            assert (labels[index[:, 0], index[:, 1], k] == value).all()


def check_rt_utils_read_back(folder: Path, path: Path, candidate: VolumeCandidate, labels: np.ndarray) -> None:
    """rt-utils' own read-back (its slice order matched by SOPInstanceUID). rt-utils 1.2.7 sizes its masks
    Columns x Rows but indexes them [row, column]: compared in the square it can hold."""
    from rt_utils import RTStructBuilder

    back = RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(path))
    uids = source_uids(candidate)
    order = [uids.index(d.SOPInstanceUID) for d in back.series_data]
    ours = labels[:, :, order].transpose(1, 0, 2)  # (row, column, slice) in rt-utils' order
    side = min(ours.shape[:2])
    for lbl in TABLE:
        theirs = back.get_roi_mask_by_name(lbl.name)
        mine = ours == lbl.value
        if theirs.shape != mine.shape:
            theirs, mine = theirs[:side, :side], mine[:side, :side]
        assert mine.sum() >= rtstruct.MIN_VERIFIED_VOXELS
        assert dice(theirs, mine) >= 0.95, lbl.name


def check_rtstruct(path: Path, folder: Path, candidate: VolumeCandidate, labels: np.ndarray, *,
                   rt_utils_folder: Path | None = None) -> None:
    assert _validator_errors(path) == []
    ds = pydicom.dcmread(path)
    source = candidate.geometry.slices[0].dataset()  # type: ignore[union-attr]
    assert ds.Modality == "RTSTRUCT" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ALGORITHM.name in ds.SeriesDescription
    assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert [r.ROIName for r in ds.StructureSetROISequence] == [s.name for s in STRUCTURES]
    assert [list(c.ROIDisplayColor) for c in ds.ROIContourSequence] == [list(s.color) for s in STRUCTURES]
    assert {r.ROIGenerationAlgorithm for r in ds.StructureSetROISequence} == {"AUTOMATIC"}
    referenced = {c.ContourImageSequence[0].ReferencedSOPInstanceUID
                  for roi in ds.ROIContourSequence for c in roi.ContourSequence}
    assert referenced <= set(source_uids(candidate))
    check_vertices_on_mask(ds, candidate, labels)
    filled = rasterise_rtstruct(ds, candidate)
    for number, lbl in enumerate(TABLE, start=1):
        assert dice(filled[number], labels == lbl.value) >= 0.95, lbl.name
    check_rt_utils_read_back(rt_utils_folder or folder, path, candidate, labels)


@pytest.fixture(scope="module")
def lps(tmp_path_factory) -> tuple[Path, Phantom]:
    folder = tmp_path_factory.mktemp("lps") / "series"
    _, phantom = write_phantom_series(50, folder, orientation="LPS", spacing=SPACING)
    return folder, phantom


@pytest.fixture(scope="module")
def sagittal(tmp_path_factory) -> tuple[Path, Phantom]:
    """An ASL (sagittal, non-square pixels) series in a folder it shares with another series."""
    folder = tmp_path_factory.mktemp("asl") / "study"
    _, phantom = write_phantom_series(50, folder, orientation="ASL", spacing=SPACING)
    write_phantom_series(51, folder, orientation="LPS", spacing=(6.0, 6.0, 8.0), series_number=2)
    return folder, phantom


@needs_rt_utils
def test_rtstruct_of_phantom_series(lps, tmp_path):
    folder, phantom = lps
    candidate, labels = series_and_labels(folder, phantom)
    path = write_rtstruct(labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    assert path == tmp_path / "rtstruct.dcm"
    check_rtstruct(path, folder, candidate, labels)


@needs_rt_utils
def test_rtstruct_of_sagittal_series_with_non_square_pixels(sagittal, tmp_path):
    folder, phantom = sagittal
    candidate, labels = series_and_labels(folder, phantom)
    row_spacing, column_spacing = candidate.geometry.slices[0].pixel_spacing  # type: ignore[union-attr,misc]
    assert row_spacing != column_spacing  # what rt-utils 1.2.7 gets wrong
    path = write_rtstruct(labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    only_series = tmp_path / "only"  # rt-utils reads a folder holding exactly the referenced series
    only_series.mkdir()
    for item in candidate.geometry.slices:  # type: ignore[union-attr]
        shutil.copy(item.source.path, only_series)
    if rtstruct.rt_utils_swaps_pixel_spacing():  # rt-utils' read-back mirrors its write: stage as the writer does
        for file in only_series.iterdir():
            ds = pydicom.dcmread(file)
            ds.PixelSpacing = list(reversed(ds.PixelSpacing))
            ds.save_as(file)
    check_rtstruct(path, folder, candidate, labels, rt_utils_folder=only_series)


@needs_rt_utils
def test_uncompensated_spacing_fails_verification(sagittal, tmp_path, monkeypatch):
    """Without the compensation rt-utils misplaces the contours and reads its misplacement back as perfect; the
    check in Tessera's own geometry refuses the file and names the ROIs."""
    folder, phantom = sagittal
    candidate, labels = series_and_labels(folder, phantom)
    monkeypatch.setattr(rtstruct, "rt_utils_swaps_pixel_spacing", lambda: False)
    with pytest.raises(OutputError) as raised:
        write_rtstruct(labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    assert raised.value.code == "RTSTRUCT_VERIFY_FAILED"
    assert "'liver' Dice" in raised.value.message
    assert not (tmp_path / "rtstruct.dcm").exists()


@needs_rt_utils
def test_rtstruct_of_anonymised_gzipped_series(tmp_path):
    """.dcm.gz sources without StudyID/StudyDate (which rt-utils needs): staged as repaired copies."""
    folder = tmp_path / "gz"
    paths, phantom = write_phantom_series(52, folder, orientation="LPS", spacing=(6.0, 6.0, 8.0), gzip_files=True)
    for file in paths:
        with gzip.open(file, "rb") as handle:
            ds = pydicom.dcmread(handle)
        del ds.StudyID, ds.StudyDate
        with gzip.open(file, "wb") as handle:
            ds.save_as(handle)
    candidate, labels = series_and_labels(folder, phantom)
    path = write_rtstruct(labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    assert _validator_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.StudyID == "" and [r.ROIName for r in ds.StructureSetROISequence] == [s.name for s in STRUCTURES]
    check_vertices_on_mask(ds, candidate, labels)


@needs_rt_utils
def test_only_present_labels_become_rois(lps, tmp_path):
    folder, phantom = lps
    candidate, labels = series_and_labels(folder, phantom)
    kept = np.where(np.isin(labels, [2, 5]), labels, 0)
    table = [*TABLE[:4], Label(5, "spine")]  # no colour: rt-utils' palette
    path = write_rtstruct(kept, candidate, table, ALGORITHM, tmp_path / "rtstruct.dcm")
    ds = pydicom.dcmread(path)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["spleen", "spine"]
    assert len(ds.ROIContourSequence[1].ROIDisplayColor) == 3
    with pytest.raises(OutputError) as raised:
        write_rtstruct(np.zeros_like(labels), candidate, TABLE, ALGORITHM, tmp_path / "empty.dcm")
    assert raised.value.code == "RTSTRUCT_EMPTY"


@needs_rt_utils
def test_mask_on_another_grid_is_refused(lps, sagittal, tmp_path):
    candidate, _ = series_and_labels(*lps)
    _, sagittal_labels = series_and_labels(*sagittal)
    with pytest.raises(OutputError) as raised:
        write_rtstruct(sagittal_labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    assert raised.value.code == "RTSTRUCT_GRID_MISMATCH"
    assert not (tmp_path / "rtstruct.dcm").exists()


@needs_rt_utils
def test_tilt_resampled_series_is_refused(tmp_path):
    folder = tmp_path / "tilt"
    write_phantom_series(53, folder, orientation="LPS", spacing=(6.0, 6.0, 8.0), tilt_degrees=12.0)
    (candidate,) = read_study(folder, tilt="resample").volumes
    assert candidate.geometry is not None and candidate.geometry.tilt_degrees > 1
    with pytest.raises(OutputError) as raised:
        write_rtstruct(np.ones(candidate.geometry.shape, np.int32), candidate, TABLE, ALGORITHM, tmp_path / "r.dcm")
    assert raised.value.code == "RTSTRUCT_NEEDS_SOURCE_GRID"


def test_missing_rt_utils_is_reported(lps, tmp_path, monkeypatch):
    candidate, labels = series_and_labels(*lps)
    monkeypatch.setitem(sys.modules, "rt_utils", None)  # import fails as when the extra is not installed
    with pytest.raises(OutputError) as raised:
        write_rtstruct(labels, candidate, TABLE, ALGORITHM, tmp_path / "rtstruct.dcm")
    assert raised.value.code == "RTSTRUCT_UNAVAILABLE"
    assert "rtstruct" in raised.value.message


def test_segment_writes_rtstruct_on_request(tmp_path: Path, tiny_model) -> None:


    series = tmp_path / "study"
    write_phantom_series(51, series, orientation="LPS", spacing=(4.0, 4.0, 5.0))
    run = run_tessera("segment", str(series), "-o", str(tmp_path / "out"), "--model", str(tiny_model.manifest_path),
                      "--format", "nifti,rtstruct")
    assert run.returncode == 0, run.stderr
    path = tmp_path / "out" / "study" / "rtstruct.dcm"
    assert pydicom.dcmread(path, stop_before_pixels=True).Modality == "RTSTRUCT"
    assert _validator_errors(path) == []


def _validator_errors(path: Path) -> list[str]:
    return dciodvfy_errors(path, "RTStructureSet")
