"""Hostile and broken input (issue 13), at the readers: bombs and absurd sizes refused before allocating,
every malformed file a coded error (never INTERNAL_ERROR), one bad member of a study skipped alone."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from pipelines.errors import InputError
from pipelines.ingestion.dicom.reader import read_study
from pipelines.ingestion.nifti import read_nifti
from pipelines.phantom_dicom import write_phantom_series


def _nifti(path: Path, shape: tuple[int, ...], *, version: int = 1, datatype: int = 4,
           pixdim: tuple[float, ...] = (1.0, 1.0, 1.0), codes: tuple[int, int] = (1, 1), data: bytes = b"") -> Path:
    """A NIfTI file written byte by byte (nibabel refuses to write most of these)."""
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    header.set_data_dtype(np.int16)
    header["dim"][:] = 1
    header["dim"][0] = len(shape)
    header["dim"][1:1 + len(shape)] = shape
    header["datatype"] = datatype
    header["bitpix"] = {2: 8, 4: 16, 128: 24, 16: 32}.get(datatype, 16)
    header["pixdim"][1:4] = pixdim
    header["qform_code"], header["sform_code"] = codes
    header["vox_offset"] = 352 if version == 1 else 544
    block = header.binaryblock + b"\0" * 4 + data
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(block))
    else:
        path.write_bytes(block)
    return path


def _code(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as caught:
        call()
    return caught.value.code


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_a_nifti_declaring_a_huge_grid_is_refused_before_reading(tmp_path: Path, name: str, version: int) -> None:
    path = _nifti(tmp_path / name, (30000, 30000, 30000), version=version)
    assert _code(lambda: read_nifti(path)) == "VOLUME_TOO_LARGE"


def test_a_small_nifti_gz_that_would_inflate_to_gigabytes_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(b"\0" * (16 * 2**20))  # zeros inflate 1000-fold; the header asks for 8 GiB
    path = tmp_path / "bomb.nii.gz"
    header_path = _nifti(tmp_path / "bomb.nii", (2048, 2048, 1024))
    path.write_bytes(gzip.compress(header_path.read_bytes()) + data)
    assert path.stat().st_size < 2**20
    assert _code(lambda: read_nifti(path)) == "VOLUME_TOO_LARGE"


def test_absurd_nifti_2_dimensions_are_a_code_not_an_overflow(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "absurd.nii", (2**40, 2**40, 2**40), version=2)
    assert _code(lambda: read_nifti(path)) in {"VOLUME_TOO_LARGE", "NIFTI_UNREADABLE"}


def test_an_rgb_nifti_is_refused_with_its_datatype(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "rgb.nii", (4, 4, 4), datatype=128, data=b"\1" * (4 * 4 * 4 * 3))
    assert _code(lambda: read_nifti(path)) == "NIFTI_UNSUPPORTED_DATATYPE"


def test_zero_voxel_sizes_without_qform_or_sform_are_refused_not_invented(tmp_path: Path) -> None:
    path = _nifti(tmp_path / "nogeometry.nii", (4, 4, 4), pixdim=(0.0, 0.0, 0.0), codes=(0, 0),
                  data=b"\0" * (4 * 4 * 4 * 2))
    assert _code(lambda: read_nifti(path)) == "NIFTI_NO_VOXEL_SIZE"
    fine = _nifti(tmp_path / "fine.nii", (4, 4, 4), pixdim=(1.5, 1.5, 2.0), codes=(0, 0),
                  data=b"\0" * (4 * 4 * 4 * 2))
    assert read_nifti(fine).spatial_shape == (4, 4, 4)  # codes 0 with real voxel sizes: read, with a warning


def test_a_nifti_with_a_header_extension_and_nan_voxels_is_read(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    data[1, 1, 1] = np.nan
    image = nib.Nifti1Image(data, np.diag([1.2, 1.3, 1.4, 1.0]))
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 5000))
    nib.save(image, tmp_path / "extended.nii.gz")
    volume = read_nifti(tmp_path / "extended.nii.gz")
    assert volume.spatial_shape == (4, 5, 6) and np.isfinite(volume.array).all()


def test_a_small_volume_of_huge_voxels_is_refused_before_resampling(tmp_path: Path) -> None:
    from pipelines.preprocessing import check_model_grid

    affine = np.diag([2000.0, 2000.0, 2000.0, 1.0])
    assert _code(lambda: check_model_grid((10, 10, 10), affine, (1.5, 1.5, 1.5), "case")) == "VOLUME_TOO_LARGE"
    check_model_grid((10, 10, 10), np.diag([2.0, 2.0, 2.0, 1.0]), (1.5, 1.5, 1.5), "case")


def _series(tmp_path: Path, name: str = "series") -> Path:
    folder = tmp_path / name
    write_phantom_series(3, folder, spacing=(8.0, 8.0, 10.0))
    return folder


BOMB = b"\0" * 128 + b"DICM" + b"\0" * (8 * 2**20)  # starts as DICOM does, then 8 MiB of zeros


def test_a_dcm_gz_that_inflates_past_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_MAX_DECOMPRESSED_BYTES", str(2**20))
    study = tmp_path / "bomb"
    study.mkdir()
    (study / "image.dcm.gz").write_bytes(gzip.compress(BOMB))
    assert _code(lambda: read_study(study)) == "DECOMPRESSED_TOO_LARGE"
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w") as out:  # nested compression: the zip's own size check sees 8 KiB
        out.writestr("study/image.dcm.gz", gzip.compress(BOMB))
    assert _code(lambda: read_study(archive)) == "DECOMPRESSED_TOO_LARGE"
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w", zipfile.ZIP_DEFLATED) as out:  # one member declaring 8 MiB
        out.writestr("study/image.dcm", BOMB)
    assert _code(lambda: read_study(plain)) == "DECOMPRESSED_TOO_LARGE"


def test_a_bomb_that_is_not_dicom_is_given_up_after_its_first_bytes(tmp_path: Path) -> None:
    from pipelines.ingestion.dicom.sources import DicomFile
    from pipelines.limits import inflate_capped

    zeros = gzip.compress(b"\0" * (64 * 2**20))
    (tmp_path / "zeros.dcm.gz").write_bytes(zeros)
    with (tmp_path / "zeros.dcm.gz").open("rb") as handle:
        assert len(inflate_capped(handle, "zeros", marker=(128, b"DICM")).getvalue()) <= 2**20
    archive = tmp_path / "zeros.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("a.dcm", b"\0" * (64 * 2**20))
    member = DicomFile("a.dcm", archive, member="a.dcm")
    with member.open() as handle:
        assert len(handle.read()) == 132  # read no further than where 'DICM' should be
    assert _code(lambda: read_study(archive)) == "NO_DICOM_IMAGES"


def test_a_corrupt_gzip_member_is_skipped_beside_good_images(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    noise = np.random.default_rng(0).integers(0, 255, 100_000, dtype=np.uint8).tobytes()
    (folder / "broken.dcm.gz").write_bytes(gzip.compress(b"\0" * 128 + b"DICM" + noise)[:20_000])
    study = read_study(folder)
    assert len(study.volumes) == 1 and "broken.dcm.gz" in study.skipped_files


def test_a_dicom_declaring_millions_of_frames_is_refused(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.NumberOfFrames = 5_000_000
    ds.save_as(tmp_path / "frames.dcm")
    lone = tmp_path / "lone"
    lone.mkdir()
    (tmp_path / "frames.dcm").rename(lone / "frames.dcm")
    assert _code(lambda: read_study(lone)) == "VOLUME_TOO_LARGE"


def test_thousands_of_nested_sequences_skip_the_file_not_the_study(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "plain.dcm", enforce_file_format=True)
    # (0040,A730) Content Sequence, explicit VR little endian, undefined lengths, nested 5000 deep
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                          0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    depth = 5000
    (folder / "nested.dcm").write_bytes((tmp_path / "plain.dcm").read_bytes() + opening * depth + closing * depth)
    study = read_study(folder)
    assert len(study.volumes) == 1
    assert "nested.dcm" in study.skipped_files


def _zip_with_series(tmp_path: Path) -> Path:
    folder = _series(tmp_path)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(folder.iterdir()):
            out.write(path, f"study/{path.name}")
    return archive


def _patch_local_header(archive: Path, member: str, patch) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the local file header of ``member`` (offset from the central directory) with ``patch``."""
    with zipfile.ZipFile(archive) as z:
        offset = z.getinfo(member).header_offset
    raw = bytearray(archive.read_bytes())
    patch(raw, offset)
    archive.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["crc", "name", "method", "encrypted"])
def test_one_damaged_zip_member_is_skipped_and_the_study_read(tmp_path: Path, damage: str) -> None:
    archive = _zip_with_series(tmp_path)
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        victim = names[len(names) // 2]

    def patch(raw: bytearray, offset: int) -> None:
        if damage == "crc":
            name_length, extra_length = struct.unpack("<HH", raw[offset + 26:offset + 30])
            start = offset + 30 + name_length + extra_length
            raw[start + 10:start + 20] = bytes(b ^ 0x55 for b in raw[start + 10:start + 20])
        elif damage == "name":
            raw[offset + 30] = ord("X")
        elif damage == "method":
            raw[offset + 8:offset + 10] = struct.pack("<H", 99)
        else:
            flags = struct.unpack("<H", raw[offset + 6:offset + 8])[0] | 0x1
            raw[offset + 6:offset + 8] = struct.pack("<H", flags)

    _patch_local_header(archive, victim, patch)
    if damage in ("method", "encrypted"):  # the central directory says so too
        raw = bytearray(archive.read_bytes())
        index = 0
        while True:
            index = raw.find(b"PK\x01\x02", index)
            if index < 0:
                break
            length = struct.unpack("<H", raw[index + 28:index + 30])[0]
            if raw[index + 46:index + 46 + length].decode() == victim:
                if damage == "method":
                    raw[index + 10:index + 12] = struct.pack("<H", 99)
                else:
                    raw[index + 8:index + 10] = struct.pack("<H", struct.unpack("<H", raw[index + 8:index + 10])[0]
                                                            | 0x1)
            index += 4
        archive.write_bytes(bytes(raw))
    study = read_study(archive)
    assert len(study.skipped_files) == 1
    candidate = study.candidates[0]
    assert candidate.codes in ([], ["MISSING_SLICES"])  # a hole where the member was, coded if it matters


def test_a_zip_of_only_encrypted_members_says_so(tmp_path: Path) -> None:
    archive = tmp_path / "secret.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("a.dcm", b"\0" * 200)
    raw = bytearray(archive.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        index = raw.find(signature)
        flags = struct.unpack("<H", raw[index + flag_at:index + flag_at + 2])[0] | 0x1
        raw[index + flag_at:index + flag_at + 2] = struct.pack("<H", flags)
    archive.write_bytes(bytes(raw))
    assert _code(lambda: read_study(archive)) == "ZIP_ENCRYPTED"


def test_a_zip_whose_central_directory_lies_about_sizes_is_a_code(tmp_path: Path) -> None:
    archive = _zip_with_series(tmp_path)
    raw = bytearray(archive.read_bytes())
    index = 0
    while (index := raw.find(b"PK\x01\x02", index)) >= 0:
        raw[index + 24:index + 28] = struct.pack("<I", 100)  # "100 bytes" each: a bomb passes the size check so
        index += 4
    archive.write_bytes(bytes(raw))
    try:  # zipfile stops inflating at the declared size: each member then fails its CRC
        read_study(archive)
    except InputError as exc:
        assert exc.code == "ZIP_CORRUPT"
    else:
        pytest.fail("a zip whose every member is longer than declared was read")


def test_a_series_whose_slices_carry_two_patient_ids_is_refused(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    for path in sorted(folder.iterdir())[::2]:
        ds = pydicom.dcmread(path)
        ds.PatientID = "OTHER-PATIENT-77"
        ds.save_as(path)
    study = read_study(folder)
    assert study.volumes == []
    assert [c.codes for c in study.refused] == [["MIXED_PATIENTS"]]
    assert "OTHER-PATIENT-77" not in str(study.refused[0].error)


def test_a_study_of_two_patients_is_not_one_case(tmp_path: Path) -> None:
    from models.manifest import Channel
    from pipelines.ingestion.reading import read_case

    study = tmp_path / "study"
    write_phantom_series(3, study / "a", spacing=(8.0, 8.0, 10.0), patient_id="PAT-A", series_number=1)
    write_phantom_series(4, study / "b", spacing=(8.0, 8.0, 10.0), patient_id="PAT-B", series_number=2)
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(study.rglob("*.dcm")):
            out.write(path, str(path.relative_to(study)))
    for source in (study, archive):
        with pytest.raises(InputError) as caught:
            read_case([source], (Channel("CT", "CT"),), "case")
        assert caught.value.code == "MIXED_PATIENTS"
        assert "PAT-A" not in str(caught.value) and "PAT-B" not in str(caught.value)


def test_reader_processes_die_with_a_killed_parent(tmp_path: Path) -> None:
    """The forked pool the DICOM reader uses: SIGKILL its parent (a worker killed by the service) and the children
    are gone too, instead of living on with parent 1."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import os, time\n"
        "from pipelines.processes import forked_pool\n"
        "pool = forked_pool(2)\n"
        "futures = [pool.submit(time.sleep, 60) for _ in range(2)]\n"
        "time.sleep(1.5)\n"
        "print(' '.join(str(p) for p in pool._processes), flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert parent.stdout is not None
    children = [int(p) for p in parent.stdout.readline().split()]
    assert len(children) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [p for p in children if Path(f"/proc/{p}").exists() and
                 Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
        time.sleep(0.1)
    assert alive == [], f"reader processes {alive} outlived their parent"


@pytest.mark.parametrize("files", [40, 80])  # serial reading, and the forked pool (64 files and more)
def test_the_read_stage_answers_a_timeout_or_cancel(tmp_path: Path, files: int) -> None:
    from pipelines.errors import Interrupted
    from pipelines.ingestion.dicom.reader import PARALLEL_HEADERS_MIN_FILES
    from pipelines.processes import stage_progress

    folder = tmp_path / "long"
    from pipelines.phantom_dicom import write_ct_series

    write_ct_series(np.zeros((8, 8, files), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]), folder)
    assert (len(list(folder.iterdir())) >= PARALLEL_HEADERS_MIN_FILES) == (files >= PARALLEL_HEADERS_MIN_FILES)
    seen: list[float] = []

    def stop_when_started(fraction: float) -> None:
        seen.append(fraction)
        if fraction > 0:
            raise Interrupted("cancelled")

    with pytest.raises(Interrupted), stage_progress(stop_when_started):
        read_study(folder)
    assert seen[0] == 0.0 and 0 < seen[-1] < 1


@pytest.mark.parametrize("compressed", [False, True])  # uncompressed slices read in place; compressed ones decoded
def test_decoding_the_pixels_reports_progress_and_answers_a_cancel(tmp_path: Path, compressed: bool) -> None:
    from pipelines.errors import Interrupted
    from pipelines.ingestion.dicom.reader import load_volume
    from pipelines.phantom_dicom import write_ct_series
    from pipelines.processes import stage_progress

    folder = tmp_path / "series"
    write_ct_series(np.arange(8 * 8 * 48, dtype=np.int16).reshape(8, 8, 48), np.diag([2.0, 2.0, 3.0, 1.0]), folder,
                    **({"transfer_syntax": RLELossless} if compressed else {}))
    candidate = read_study(folder).volumes[0]
    seen: list[float] = []
    with stage_progress(seen.append):
        load_volume(candidate)
    assert seen and all(0.5 <= f < 1 for f in seen)  # the second half of the read stage, after the headers
    assert len(seen) == 3  # every 16 of 48 slices

    def stop_when_decoding(fraction: float) -> None:
        if fraction > 0.5:
            raise Interrupted("cancelled")

    with pytest.raises(Interrupted), stage_progress(stop_when_decoding):
        load_volume(candidate)


def _zeros_nifti_gz(path: Path, shape: tuple[int, int, int]) -> Path:
    """A valid NIfTI of zeros, gzipped in pieces: a few hundred KiB that inflate to ``shape`` x 2 bytes."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_qform(np.diag([0.6, 0.6, 0.6, 1.0]), 1)
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(header.binaryblock + b"\0" * 4)
        for _ in range(shape[2]):
            out.write(b"\0" * (shape[0] * shape[1] * 2))
    return path


def test_a_nifti_gz_of_zeros_within_the_voxel_limit_is_refused_by_its_inflation_ratio(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _zeros_nifti_gz(tmp_path / "zeros.nii.gz", (256, 256, 600))  # 75 MiB from ~80 KiB
    assert path.stat().st_size < 2**20
    with pytest.raises(InputError) as caught:
        read_nifti(path)
    assert caught.value.code == "DECOMPRESSED_TOO_LARGE" and "TESSERA_MAX_INFLATE_RATIO" in caught.value.message
    monkeypatch.setenv("TESSERA_MAX_INFLATE_RATIO", str(10**6))  # the limit is a setting
    assert read_nifti(path).spatial_shape == (256, 256, 600)


def test_the_inflation_ratio_stops_a_gzip_and_a_zip_member_of_dicom_shaped_zeros(tmp_path: Path) -> None:
    bomb = b"\0" * 128 + b"DICM" + b"\0" * (80 * 2**20)  # under the 2 GiB limit, 1000 fold
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "image.dcm.gz").write_bytes(gzip.compress(bomb))
    assert _code(lambda: read_study(tmp_path / "gz")) == "DECOMPRESSED_TOO_LARGE"
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        out.writestr("study/image.dcm", bomb)
    assert _code(lambda: read_study(archive)) == "DECOMPRESSED_TOO_LARGE"
