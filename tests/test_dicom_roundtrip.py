"""Phantom -> DICOM CT series (pipelines.phantom_dicom) -> DICOM ingestion: exact voxels, exact geometry.

Every series is written by our own writer, so the expected voxels and affine are known exactly; both
sides are compared in the closest canonical (RAS) orientation, which only permutes and flips axes.
"""

from __future__ import annotations

import gzip
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from scipy import ndimage

from pipelines.errors import InputError
from pipelines.ingestion.dicom.pixels import decode_volume
from pipelines.ingestion.dicom.reader import DicomStudy, is_dicom_input, load_volume, read_study
from pipelines.phantom_dicom import write_ct_series, write_localizer, write_phantom_series
from pipelines.phantoms import make_phantom
from pipelines.volume import Volume

SPACING = (4.0, 4.0, 5.0)
SEED = 3
AFFINE_TOLERANCE_MM = 1e-4

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}


def _rotation_about_x(degrees: float) -> np.ndarray:
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation


def _source(orientation: str = "LPS", spacing: tuple[float, float, float] = SPACING,
            rotate_degrees: float = 0.0) -> nib.Nifti1Image:
    """A small phantom CT (int16 HU); ``rotate_degrees`` turns its grid about the scanner's x axis."""
    image = make_phantom(SEED, orientation=orientation, spacing=spacing).image
    if rotate_degrees:
        image = nib.Nifti1Image(np.asarray(image.dataobj), _rotation_about_x(rotate_degrees) @ image.affine)
    return image


def _only_volume(study: DicomStudy) -> Volume:
    assert not study.refused, [str(c.error) for c in study.refused]
    assert len(study.volumes) == 1
    return load_volume(study.volumes[0])


def _assert_same_image(volume: Volume, source: nib.Nifti1Image) -> None:
    """Same voxels at the same world positions: canonical arrays equal, canonical affines within 1e-4 mm."""
    assert volume.array.dtype in (np.int16, np.float32)  # exact integers stay int16
    got = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    want = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(source.dataobj).astype(np.float32), source.affine))
    assert got.shape == want.shape
    np.testing.assert_allclose(got.affine, want.affine, rtol=0, atol=AFFINE_TOLERANCE_MM)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))


def _write(image: nib.Nifti1Image, folder: Path, **kw: object) -> list[Path]:
    return write_ct_series(np.asarray(image.dataobj), image.affine, folder, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lps_source() -> nib.Nifti1Image:
    return _source("LPS")


@pytest.fixture(scope="module")
def lps_series(tmp_path_factory: pytest.TempPathFactory, lps_source: nib.Nifti1Image) -> Path:
    """The LPS phantom written once (explicit VR little endian); copy it before changing it."""
    folder = tmp_path_factory.mktemp("lps_series")
    _write(lps_source, folder, uid_seed="lps")
    return folder


# --- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "spacing", "rotate"),
    [
        ("LPS", SPACING, 0.0),
        ("RAS", SPACING, 0.0),
        ("ASL", SPACING, 0.0),  # slice axis against the image normal: the reader reverses the stack
        ("LPS", SPACING, 10.0),  # oblique
        ("RPI", (3.5, 4.5, 5.0), 0.0),  # non-square pixels: PixelSpacing is [row, column]
        ("LAS", (3.5, 4.5, 5.0), -12.0),
    ],
    ids=["LPS", "RAS", "ASL", "oblique", "RPI-anisotropic", "LAS-anisotropic-oblique"],
)
def test_roundtrip_geometry(tmp_path: Path, orientation: str, spacing: tuple[float, float, float],
                            rotate: float) -> None:
    source = _source(orientation, spacing, rotate)
    _write(source, tmp_path)
    volume = _only_volume(read_study(tmp_path))
    _assert_same_image(volume, source)
    assert volume.metadata.source_format == "dicom"
    assert volume.metadata.modality == "CT"
    np.testing.assert_allclose(sorted(volume.spacing), sorted(spacing), atol=1e-6)


def test_written_header_follows_the_conventions(lps_series: Path, lps_source: nib.Nifti1Image) -> None:
    first = pydicom.dcmread(sorted(lps_series.iterdir())[0])
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesInstanceUID",
                    "SeriesNumber", "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer",
                    "InstanceNumber", "KVP", "AcquisitionNumber", "SliceThickness", "RescaleIntercept",
                    "RescaleSlope", "PatientPosition"):
        assert keyword in first, keyword
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_source.affine
    np.testing.assert_allclose(first.ImagePositionPatient, affine_lps[:3, 3], atol=1e-6)
    np.testing.assert_allclose(first.ImageOrientationPatient, [1, 0, 0, 0, 1, 0], atol=1e-12)
    np.testing.assert_array_equal(first.pixel_array, np.asarray(lps_source.dataobj)[:, :, 0].T)
    assert float(first.SliceThickness) == pytest.approx(SPACING[2])


# --- transfer syntaxes and storage -------------------------------------------------------------------


@pytest.mark.parametrize("syntax", list(SYNTAXES), ids=list(SYNTAXES))
@pytest.mark.parametrize("signed", [True, False], ids=["int16", "uint16-1024"])
def test_roundtrip_transfer_syntaxes(tmp_path: Path, lps_source: nib.Nifti1Image, syntax: str, signed: bool) -> None:
    source = lps_source
    if not signed:  # stored as HU + 1024 with RescaleIntercept -1024: nothing below -1024 HU
        source = nib.Nifti1Image(np.clip(np.asarray(source.dataobj), -1024, None), source.affine)
    paths = _write(source, tmp_path, transfer_syntax=SYNTAXES[syntax], signed=signed)
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    assert float(header.RescaleIntercept) == (0.0 if signed else -1024.0)
    _assert_same_image(_only_volume(read_study(tmp_path)), source)


# --- how the files arrive ----------------------------------------------------------------------------


def test_shuffled_names_and_a_stray_file(tmp_path: Path, lps_source: nib.Nifti1Image) -> None:
    paths = _write(lps_source, tmp_path, file_names="shuffled", uid_seed=1)
    instances = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in sorted(paths)]
    assert instances != sorted(instances)  # name order is not slice order
    (tmp_path / "README.txt").write_text("not DICOM\n")
    study = read_study(tmp_path)
    assert study.skipped_files == ["README.txt"]
    _assert_same_image(_only_volume(study), lps_source)


def test_zip_of_the_folder(tmp_path: Path, lps_series: Path, lps_source: nib.Nifti1Image) -> None:
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(lps_series.iterdir()):
            out.write(path, f"study/series1/{path.name}")
        out.writestr("study/README.txt", "not DICOM\n")
    study = read_study(archive)
    assert study.skipped_files == ["study.zip:study/README.txt"]
    _assert_same_image(_only_volume(study), lps_source)


def test_gzipped_files(tmp_path: Path, lps_series: Path, lps_source: nib.Nifti1Image) -> None:
    for path in lps_series.iterdir():
        (tmp_path / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    (tmp_path / "README.txt").write_text("not DICOM\n")
    study = read_study(tmp_path)
    assert study.skipped_files == ["README.txt"]
    _assert_same_image(_only_volume(study), lps_source)


def test_writer_gzip_option(tmp_path: Path, lps_source: nib.Nifti1Image) -> None:
    paths = _write(lps_source, tmp_path, gzip_files=True, transfer_syntax=RLELossless)
    assert all(p.name.endswith(".dcm.gz") for p in paths)
    _assert_same_image(_only_volume(read_study(tmp_path)), lps_source)


# --- refusals ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"drop_slices": [11]}, "MISSING_SLICES"),
        ({"duplicate_slice": 7}, "DUPLICATE_SLICE_POSITIONS"),
        ({"keep": 2}, "TOO_FEW_SLICES"),
        ({"tilt_degrees": 15.0}, "GANTRY_TILT"),
    ],
    ids=["dropped", "duplicated", "two-slices", "tilted"],
)
def test_bad_series_are_refused(tmp_path: Path, lps_source: nib.Nifti1Image, options: dict, code: str) -> None:
    options = dict(options)
    array = np.asarray(lps_source.dataobj)
    if "keep" in options:
        array = array[:, :, : options.pop("keep")]
    write_ct_series(array, lps_source.affine, tmp_path, **options)
    study = read_study(tmp_path, tilt="refuse")
    assert not study.volumes
    assert len(study.refused) == 1
    refused = study.refused[0]
    assert refused.codes[0] == code
    assert refused.error is not None and refused.error.code == code
    with pytest.raises(InputError) as info:
        load_volume(refused)
    assert info.value.code == code


def test_gantry_tilt_resampled(tmp_path: Path, lps_source: nib.Nifti1Image) -> None:
    write_ct_series(np.asarray(lps_source.dataobj), lps_source.affine, tmp_path, tilt_degrees=15.0)
    header = pydicom.dcmread(sorted(tmp_path.iterdir())[0], stop_before_pixels=True)
    np.testing.assert_allclose(header.ImageOrientationPatient[3:], [0, np.cos(np.pi / 12), -np.sin(np.pi / 12)],
                               atol=1e-9)
    study = read_study(tmp_path, tilt="resample")
    candidate = study.volumes[0]
    assert candidate.geometry is not None
    assert candidate.geometry.tilt_degrees == pytest.approx(15.0, abs=1e-6)
    assert any(w.startswith("GANTRY_TILT") for w in candidate.warnings)
    volume = load_volume(candidate)
    assert any(w.startswith("GANTRY_TILT") for w in volume.metadata.extra["Warnings"])
    assert volume.array.shape == lps_source.shape
    axes = volume.affine[:3, :3] / np.linalg.norm(volume.affine[:3, :3], axis=0)
    np.testing.assert_allclose(axes.T @ axes, np.eye(3), atol=1e-9)  # orthogonal grid
    np.testing.assert_allclose(abs(volume.affine[2, 2]) / np.linalg.norm(volume.affine[:3, 2]),
                               np.cos(np.pi / 12), atol=1e-9)  # slice axis along the tilted normal
    # Values: the stack as stored, sampled (linearly) at the new grid's voxel centres.
    sheared = candidate.geometry.affine
    stored = decode_volume(candidate.geometry.slices)
    np.testing.assert_array_equal(stored, np.asarray(lps_source.dataobj, dtype=np.float32))
    index = np.indices(volume.array.shape).reshape(3, -1)
    points = (np.linalg.inv(sheared) @ volume.affine @ np.vstack([index, np.ones(index.shape[1])]))[:3]
    expected = ndimage.map_coordinates(stored.astype(np.float64), points, order=1, mode="constant", cval=np.nan)
    expected = expected.reshape(volume.array.shape)
    inside = np.isfinite(expected)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(volume.array[inside], expected[inside], atol=0.02)
    np.testing.assert_allclose(volume.array[:, :, 0], stored[:, :, 0], atol=0.02)  # the first slice stays


def test_localizer_is_set_aside(tmp_path: Path, lps_series: Path, lps_source: nib.Nifti1Image) -> None:
    folder = tmp_path / "study"
    shutil.copytree(lps_series, folder)
    write_localizer(folder, array_hu=np.asarray(lps_source.dataobj), affine_ras=lps_source.affine, uid_seed="lps")
    study = read_study(folder)
    assert len(study.set_aside) == 1
    assert study.set_aside[0].reason.startswith("LOCALIZER")
    assert study.set_aside[0].images == 1
    _assert_same_image(_only_volume(study), lps_source)


# --- damaged files -----------------------------------------------------------------------------------



def _truncate_pixel_data(path: Path) -> None:
    """Keep a valid file but cut the pixel data (for compressed data: the codestream of the only frame)."""
    dataset = pydicom.dcmread(path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        frame = next(generate_frames(dataset.PixelData, number_of_frames=1))
        dataset.PixelData = encapsulate([frame[: len(frame) // 2]])
    else:
        dataset.PixelData = dataset.PixelData[: len(dataset.PixelData) // 2]
    dataset.save_as(path)


def _cut_file(path: Path) -> None:
    """A download cut short: the file loses its last bytes (all inside the pixel data)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 600])


@pytest.mark.parametrize(
    ("syntax", "damage"),
    [
        ("explicit", _truncate_pixel_data),
        ("implicit", _truncate_pixel_data),
        ("rle", _truncate_pixel_data),
        ("j2k", _truncate_pixel_data),
        ("explicit", _cut_file),
        ("j2k", _cut_file),
    ],
    ids=["explicit-pixeldata", "implicit-pixeldata", "rle-pixeldata", "j2k-pixeldata", "explicit-cut", "j2k-cut"],
)
@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_pixel_data(tmp_path: Path, lps_source: nib.Nifti1Image, syntax: str,
                            damage: Callable[[Path], None]) -> None:
    paths = _write(lps_source, tmp_path, transfer_syntax=SYNTAXES[syntax])
    damage(paths[5])
    study = read_study(tmp_path)  # headers are intact: the series still forms a candidate
    assert len(study.volumes) == 1
    with pytest.raises(InputError) as info:
        load_volume(study.volumes[0])
    assert info.value.code in ("PIXEL_DATA_CORRUPT", "DICOM_UNREADABLE"), str(info.value)
    assert paths[5].name in info.value.message


# --- the writer itself -------------------------------------------------------------------------------


def test_uid_seed_makes_files_reproducible(tmp_path: Path, lps_source: nib.Nifti1Image) -> None:
    first = _write(lps_source, tmp_path / "a", uid_seed=7, file_names="shuffled")
    second = _write(lps_source, tmp_path / "b", uid_seed=7, file_names="shuffled")
    assert [p.name for p in first] == [p.name for p in second]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second, strict=True))
    other = _write(lps_source, tmp_path / "c", uid_seed=8)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in [*first, *other]}
    assert len(uids) == len(first) + len(other)


def test_write_phantom_series(tmp_path: Path) -> None:
    paths, phantom = write_phantom_series(SEED, tmp_path, orientation="ASL", spacing=SPACING, uid_seed=0)
    assert len(paths) == phantom.image.shape[2]
    _assert_same_image(_only_volume(read_study(tmp_path)), phantom.image)


def test_writer_refuses_what_it_cannot_store(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="uint16"):
        write_ct_series(np.full((40, 40, 3), -2000, np.int16), affine, tmp_path, signed=False)
    with pytest.raises(ValueError, match="JPEG 2000"):
        write_ct_series(np.zeros((40, 16, 3), np.int16), affine, tmp_path, transfer_syntax=JPEG2000Lossless)
    with pytest.raises(ValueError, match="whole Hounsfield"):
        write_ct_series(np.full((4, 4, 3), 0.5), affine, tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        write_ct_series(np.zeros((4, 4, 3), np.int16), affine, tmp_path, transfer_syntax="1.2.840.10008.1.2.4.50")


def test_gzipped_folder_is_recognised_as_dicom(tmp_path: Path, lps_series: Path) -> None:
    for path in lps_series.iterdir():
        (tmp_path / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()))
    assert is_dicom_input(tmp_path)


@pytest.mark.parametrize("syntax", ["explicit", "rle", "j2k"])
def test_simpleitk_reads_the_written_series(tmp_path: Path, syntax: str) -> None:
    """An independent reader (GDCM through SimpleITK) sees the same voxels and geometry."""
    sitk = pytest.importorskip("SimpleITK")
    source = _source("LAS", (3.5, 4.5, 5.0), 10.0)
    _write(source, tmp_path, transfer_syntax=SYNTAXES[syntax])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # [slice, row, column] -> [column, row, slice]
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    volume = Volume(array.astype(np.float32), affine, _only_volume(read_study(tmp_path)).metadata)
    _assert_same_image(volume, source)
