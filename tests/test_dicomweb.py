"""DICOMweb against a real Orthanc: studies by reference through the CLI and the service, SEGs pushed back.

Real MR series from ../shared (dicom2nifti) are stored in an Orthanc started for these tests; a tiny MR model
segments them. A run by reference must equal the local run on the same files, the pushed SEG must be in Orthanc and
come back equal to the SEG written locally, and a PACS that is down or a UID it does not have must give the PACS
codes with nothing half-written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.conftest import ROOT, write_tiny_model
from tests.orthanc_helpers import PASSWORD, USER, Orthanc, orthanc_available
from tests.service_helpers import Server, create_key, free_port, wait_for

pytestmark = [pytest.mark.shared_data,
              pytest.mark.skipif(not orthanc_available(), reason="Orthanc + its DICOMweb plugin are not installed "
                                                                 "(Debian orthanc, orthanc-dicomweb; .ci/run installs "
                                                                 "them)")]
MR_SERIES = "dicom2nifti/tests/data/generic/anatomical/001"
J2K_SERIES = "dicom2nifti/tests/data/generic/compressed/001"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mr_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mr_models")
    write_tiny_model(root / "tiny-mr", name="tiny-mr", modality="MR")
    return root


@pytest.fixture(scope="module")
def studies(orthanc: Orthanc, shared_data: Path) -> dict[str, tuple[str, Path]]:
    """StudyInstanceUID and local folder of each series stored in Orthanc."""
    stored = {}
    for name, series in (("mr", MR_SERIES), ("j2k", J2K_SERIES)):
        folder = shared_data / series
        stored[name] = (orthanc.store(sorted(p for p in folder.iterdir() if p.is_file())), folder)
    return stored


def _env(tmp_path: Path, models: Path) -> dict[str, str]:
    return {**os.environ, "TESSERA_MODELS_PATH": str(models), "TESSERA_HOME": str(tmp_path / "home"),
            "TESSERA_DICOMWEB_PASSWORD": PASSWORD, "PYTHONUNBUFFERED": "1"}


def _tessera(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli.main", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)


def _same_seg(ours: pydicom.Dataset, theirs: pydicom.Dataset) -> None:
    """The same segmentation: frames, segments and the source instances they refer to (UIDs of the SEG itself
    are new in every run)."""
    np.testing.assert_array_equal(ours.pixel_array, theirs.pixel_array)
    assert [s.SegmentLabel for s in ours.SegmentSequence] == [s.SegmentLabel for s in theirs.SegmentSequence]

    def sources(seg: pydicom.Dataset) -> list[str]:
        return [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]

    assert sorted(sources(ours)) == sorted(sources(theirs))
    assert ours.StudyInstanceUID == theirs.StudyInstanceUID


def test_segment_by_reference_equals_the_local_run_and_the_pushed_seg_comes_back_equal(
        orthanc: Orthanc, studies: dict[str, tuple[str, Path]], mr_model: Path, tmp_path: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    study, folder = studies["mr"]
    env = _env(tmp_path, mr_model)
    url = f"{orthanc.dicomweb}/studies/{study}"
    by_reference = _tessera(env, "segment", url, "-o", str(tmp_path / "remote"), "--model", "tiny-mr", "--push",
                            "--dicomweb-user", USER)
    assert by_reference.returncode == 0, by_reference.stderr
    assert PASSWORD not in by_reference.stderr and PASSWORD not in (tmp_path / "remote" / "tessera.log").read_text()
    local = _tessera(env, "segment", str(folder), "-o", str(tmp_path / "local"), "--model", "tiny-mr")
    assert local.returncode == 0, local.stderr

    remote_case, local_case = tmp_path / "remote" / study, tmp_path / "local" / folder.name
    np.testing.assert_array_equal(np.asarray(nib.load(remote_case / "mask.nii.gz").dataobj),
                                  np.asarray(nib.load(local_case / "mask.nii.gz").dataobj))
    np.testing.assert_allclose(nib.load(remote_case / "mask.nii.gz").affine,
                               nib.load(local_case / "mask.nii.gz").affine, atol=1e-6)
    written = pydicom.dcmread(remote_case / "seg.dcm")
    _same_seg(written, pydicom.dcmread(local_case / "seg.dcm"))

    # the pushed SEG is listed in Orthanc and comes back equal to the one written here
    assert any((s.get("00080060", {}).get("Value") or [""])[0] == "SEG" for s in orthanc.series_of(study))
    client = DICOMwebClient(orthanc.dicomweb, session=_session())
    retrieved = client.retrieve_instance(study, written.SeriesInstanceUID, written.SOPInstanceUID,
                                         media_types=(("application/dicom", "*"),))
    assert retrieved == written

    # a second run of the same reference fetches nothing (the cache is keyed by SOP Instance UID) and does not
    # fetch the SEG series it pushed: it is not an image series
    again = _tessera(env, "segment", url, "-o", str(tmp_path / "again"), "--model", "tiny-mr",
                     "--dicomweb-user", USER)
    assert again.returncode == 0, again.stderr
    assert "0 instance(s) fetched, 4 already in the cache" in (tmp_path / "again" / "tessera.log").read_text()
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "again" / study / "mask.nii.gz").dataobj),
                                  np.asarray(nib.load(local_case / "mask.nii.gz").dataobj))


def _session() -> object:
    import requests

    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return session


def test_convert_a_compressed_series_by_reference_equals_the_local_convert(
        orthanc: Orthanc, studies: dict[str, tuple[str, Path]], mr_model: Path, tmp_path: Path) -> None:
    study, folder = studies["j2k"]
    env = _env(tmp_path, mr_model)
    (series,) = [s["0020000E"]["Value"][0] for s in orthanc.series_of(study)]
    remote = _tessera(env, "convert", f"{orthanc.dicomweb}/studies/{study}/series/{series}", "-o",
                      str(tmp_path / "remote"), "--dicomweb-user", USER)
    assert remote.returncode == 0, remote.stderr
    local = _tessera(env, "convert", str(folder), "-o", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    (ours,), (theirs,) = sorted((tmp_path / "remote").glob("*.nii.gz")), sorted((tmp_path / "local").glob("*.nii.gz"))
    np.testing.assert_array_equal(np.asarray(nib.load(ours).dataobj), np.asarray(nib.load(theirs).dataobj))
    np.testing.assert_allclose(nib.load(ours).affine, nib.load(theirs).affine, atol=1e-6)


def test_a_down_pacs_and_a_wrong_uid_fail_alone_with_their_codes_and_nothing_half_written(
        orthanc: Orthanc, studies: dict[str, tuple[str, Path]], mr_model: Path, tmp_path: Path) -> None:
    study, _ = studies["mr"]
    env = _env(tmp_path, mr_model)
    out, cache = tmp_path / "out", tmp_path / "cache"
    down = f"http://127.0.0.1:{free_port()}/dicom-web/studies/{study}"
    wrong = f"{orthanc.dicomweb}/studies/1.2.3.4.5.6.7.8.9"
    run = _tessera(env, "segment", wrong, down, f"{orthanc.dicomweb}/studies/{study}", "-o", str(out), "--model",
                   "tiny-mr", "--dicomweb-user", USER, "--dicomweb-cache", str(cache), "--dicomweb-timeout", "5")
    assert run.returncode == 1, run.stderr
    assert "PACS_NOT_FOUND" in run.stderr and "PACS_UNREACHABLE" in run.stderr and "Traceback" not in run.stderr
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["succeeded"], summary["failed"]) == (1, 2)
    assert (out / study / "mask.nii.gz").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [study]  # no folder for the failed references
    assert not list(cache.rglob("*.partial")) and not (cache / "1.2.3.4.5.6.7.8.9").exists()

    refused = _tessera({**env, "TESSERA_DICOMWEB_PASSWORD": "not-the-password-7431"}, "segment",
                       f"{orthanc.dicomweb}/studies/{study}", "-o", str(tmp_path / "refused"), "--model", "tiny-mr",
                       "--dicomweb-user", USER, "--dicomweb-cache", str(tmp_path / "cache2"))
    assert refused.returncode == 1 and "PACS_REJECTED" in refused.stderr and "7431" not in refused.stderr


def test_the_service_fetches_segments_and_pushes_a_study_by_reference(
        orthanc: Orthanc, studies: dict[str, tuple[str, Path]], mr_model: Path, tmp_path: Path) -> None:
    study, folder = studies["mr"]
    env = _env(tmp_path, mr_model)
    pacs = {"orthanc": {"url": orthanc.dicomweb, "user": USER, "password": PASSWORD},
            "down": {"url": f"http://127.0.0.1:{free_port()}/dicom-web", "timeout_s": 3, "retries": 1}}
    server = Server(tmp_path / "data", env, "tiny-mr", tmp_path / "server.log", settings={"pacs": json.dumps(pacs)})
    server.start()
    key = create_key(server.data_dir, "alice", env)
    seg_series_before = len(orthanc.series_of(study))
    try:
        with server.client(key) as client:
            job = client.post("/v1/jobs", json={"pacs": "orthanc", "study": study, "push": True})
            assert job.status_code == 202, job.text
            done = wait_for(client, job.json()["id"])
            assert done["state"] == "succeeded", done
            assert "seg.dcm" in [a["name"] for a in done["artifacts"]]
            (tmp_path / "seg.dcm").write_bytes(client.get(f"{done['url']}/artifacts/seg.dcm").content)
            (tmp_path / "mask.nii.gz").write_bytes(client.get(f"{done['url']}/artifacts/mask.nii.gz").content)
            image = client.get(f"{done['url']}/image")  # the results page's viewer reads the fetched study too
            assert image.status_code == 200, image.text

            unknown = client.post("/v1/jobs", json={"pacs": "elsewhere", "study": study})
            assert unknown.status_code == 422 and unknown.json()["code"] == "PACS_UNKNOWN"
            bad_uid = client.post("/v1/jobs", json={"pacs": "orthanc", "study": "http://evil/"})
            assert bad_uid.status_code == 422 and bad_uid.json()["code"] == "REQUEST_INVALID"
            missing = wait_for(client, client.post("/v1/jobs", json={"pacs": "orthanc",
                                                                     "study": "1.2.3.4.5"}).json()["id"])
            assert (missing["state"], missing["error"]["code"]) == ("failed", "PACS_NOT_FOUND"), missing
            down = wait_for(client, client.post("/v1/jobs", json={"pacs": "down", "study": study}).json()["id"])
            assert (down["state"], down["error"]["code"]) == ("failed", "PACS_UNREACHABLE"), down
    finally:
        server.stop()
    assert PASSWORD not in server.log_path.read_text()
    assert len(orthanc.series_of(study)) == seg_series_before + 1  # the pushed SEG's series
    pushed = pydicom.dcmread(tmp_path / "seg.dcm")
    with httpx.Client(base_url=orthanc.url, auth=(USER, PASSWORD)) as pacs_client:
        listed = pacs_client.get(f"/dicom-web/studies/{study}/series/{pushed.SeriesInstanceUID}/instances")
        assert listed.status_code == 200 and listed.json()[0]["00080018"]["Value"] == [pushed.SOPInstanceUID]

    local = _tessera(env, "segment", str(folder), "-o", str(tmp_path / "local"), "--model", "tiny-mr")
    assert local.returncode == 0, local.stderr
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj),
                                  np.asarray(nib.load(tmp_path / "local" / folder.name / "mask.nii.gz").dataobj))
    _same_seg(pushed, pydicom.dcmread(tmp_path / "local" / folder.name / "seg.dcm"))
