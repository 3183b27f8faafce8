"""The REST service over real HTTP: ``tessera serve`` (uvicorn) on 127.0.0.1, httpx as the client.

One server for the module; results are compared with the CLI's for the same input and model.
"""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from pipelines.phantom_dicom import write_phantom_series
from pipelines.phantoms import make_phantom
from tests.service_helpers import ROOT, Server, cli_env, create_key, post_job, wait_for

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "MRN-0042-XYZ"


@pytest.fixture(scope="module")
def env(service_models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return cli_env(service_models, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("service")
    server = Server(folder / "data", env, "tiny", folder / "server.log",
                    settings={"max_upload_bytes": str(8 * 2**20), "zip_max_bytes": str(64 * 2**20)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keys(server: Server) -> dict[str, str]:
    return {name: create_key(server.data_dir, name, server.env) for name in ("alice", "bob")}


@pytest.fixture(scope="module")
def alice(server: Server, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with server.client(keys["alice"]) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server: Server, keys: dict[str, str]) -> Iterator[httpx.Client]:
    with server.client(keys["bob"]) as client:
        yield client


@pytest.fixture(scope="module")
def nifti_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom under a file name that carries 'patient identifiers' (it must never surface)."""
    path = tmp_path_factory.mktemp("nifti") / f"{PATIENT_NAME.replace('^', '_')}_{PATIENT_ID}.nii.gz"
    nib.save(make_phantom(3, spacing=(4.0, 4.0, 5.0)).image, path)
    return path


def _dicom_zip(folder: Path, name: str, drop_slices: tuple[int, ...] = ()) -> Path:
    series = folder / f"{name}_series"
    write_phantom_series(5, series, spacing=(4.0, 4.0, 5.0), patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                         drop_slices=drop_slices)
    archive = folder / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(series.iterdir()):
            out.write(path, f"study/{path.name}")
    return archive


@pytest.fixture(scope="module")
def dicom_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _dicom_zip(tmp_path_factory.mktemp("dicom"), "study")


def _cli_mask(server: Server, source: Path, out: Path, model: str | None = None) -> np.ndarray:
    """The CLI's mask for the same input and model (the server's default unless named): what the service must
    reproduce."""
    run = subprocess.run([sys.executable, "-m", "app.cli.main", "segment", str(source), "-o", str(out), "--model",
                          model or server.model, "--device", "cpu", "--format", "nifti"], capture_output=True,
                         text=True, cwd=ROOT, env=server.env, timeout=600)
    assert run.returncode == 0, run.stderr
    (mask,) = out.glob("*/mask.nii.gz")
    return np.asarray(nib.load(mask).dataobj)


def _download_mask(client: httpx.Client, job: dict, path: Path) -> nib.Nifti1Image:
    response = client.get(f"{job['url']}/artifacts/mask.nii.gz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/gzip"
    path.write_bytes(response.content)
    return nib.load(path)


def _assert_problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["detail"], body
    assert "Traceback" not in response.text
    return body


def test_health_ready_and_schema(server: Server) -> None:
    assert httpx.get(f"{server.base_url}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server.base_url}/readyz").json()["status"] == "ready"
    schema = httpx.get(f"{server.base_url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/artifacts/{name}", "/v1/models"} <= set(schema["paths"])
    upload = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["file"]["type"] == "array"


def test_every_v1_route_needs_a_live_key(server: Server, keys: dict[str, str]) -> None:
    with server.client(None) as anonymous:
        for method, url in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("POST", "/v1/jobs"),
                            ("GET", "/v1/jobs/" + "0" * 32), ("DELETE", "/v1/jobs/" + "0" * 32)):
            response = anonymous.request(method, url)
            _assert_problem(response, 401, "AUTH_REQUIRED")
            assert response.headers["www-authenticate"] == "Bearer"
    with server.client("tsk_not-a-real-key") as forged:
        _assert_problem(forged.get("/v1/jobs"), 401, "AUTH_INVALID")
    carol = create_key(server.data_dir, "carol", server.env)
    with server.client(carol) as client:
        assert client.get("/v1/models").status_code == 200
        revoke = subprocess.run([sys.executable, "-m", "app.cli.main", "keys", "revoke", "--data-dir",
                                 str(server.data_dir), "carol"], cwd=ROOT, env=server.env, capture_output=True)
        assert revoke.returncode == 0
        _assert_problem(client.get("/v1/models"), 401, "AUTH_INVALID")
    listing = subprocess.run([sys.executable, "-m", "app.cli.main", "keys", "list", "--data-dir",
                              str(server.data_dir)], cwd=ROOT, env=server.env, capture_output=True, text=True)
    assert "carol" in listing.stdout and "revoked" in listing.stdout and carol not in listing.stdout
    database = (server.data_dir / "tessera.sqlite3").read_bytes()
    assert carol.encode() not in database  # stored hashed only


def test_models_lists_the_default(alice: httpx.Client) -> None:
    models = {m["name"]: m for m in alice.get("/v1/models").json()["models"]}
    assert models["tiny"]["default"] is True
    assert [label["name"] for label in models["tiny"]["labels"]][:2] == ["liver", "spleen"]


def test_nifti_upload_gives_the_clis_mask(server: Server, alice: httpx.Client, nifti_case: Path,
                                          tmp_path: Path) -> None:
    response = post_job(alice, nifti_case)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["location"] == accepted["url"] == f"/v1/jobs/{accepted['id']}"
    job = wait_for(alice, accepted["id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["error"] is None and job["timings_s"]["total"] > 0
    names = {a["name"] for a in job["artifacts"]}
    assert {"mask.nii.gz", "stats.json", "stats.csv", "preview.png", "report.json", "labels.json"} <= names
    mask = _download_mask(alice, job, tmp_path / "mask.nii.gz")
    source = nib.load(nifti_case)
    np.testing.assert_array_equal(mask.affine, source.affine)
    expected = _cli_mask(server, nifti_case, tmp_path / "cli")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    assert (np.asarray(mask.dataobj) > 0).any()
    preview = alice.get(f"{job['url']}/artifacts/preview.png")
    assert preview.headers["content-type"] == "image/png" and preview.content[:4] == b"\x89PNG"
    assert any(j["id"] == job["id"] for j in alice.get("/v1/jobs").json()["jobs"])
    for sneaky in ("..%2F..%2Ftessera.sqlite3", "%2E%2E", "..\\report.json"):
        escape = alice.get(f"{job['url']}/artifacts/{sneaky}")
        assert escape.status_code == 404 and b"SQLite" not in escape.content
    _assert_problem(alice.get(f"{job['url']}/artifacts/secret.txt"), 404, "ARTIFACT_NOT_FOUND")


def test_dicom_zip_upload_gives_the_clis_mask_and_a_seg(server: Server, alice: httpx.Client, dicom_zip: Path,
                                                       tmp_path: Path) -> None:
    response = post_job(alice, dicom_zip, formats="nifti,dicom-seg,stats")
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert {"mask.nii.gz", "seg.dcm", "stats.json"} <= {a["name"] for a in job["artifacts"]}
    assert "preview.png" not in {a["name"] for a in job["artifacts"]}
    seg = alice.get(f"{job['url']}/artifacts/seg.dcm")
    assert seg.headers["content-type"] == "application/dicom" and seg.content[128:132] == b"DICM"
    mask = _download_mask(alice, job, tmp_path / "mask.nii.gz")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), _cli_mask(server, dicom_zip, tmp_path / "cli"))


def test_one_file_per_channel_for_a_multichannel_model(server: Server, alice: httpx.Client, tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    folder.mkdir()
    phantom = make_phantom(21, spacing=(4.0, 4.0, 5.0))
    nib.save(phantom.image, folder / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(phantom.image.dataobj)[::2, ::2, :].astype(np.float32),
                             phantom.image.affine @ np.diag([2.0, 2.0, 1.0, 1.0])), folder / "case_0001.nii.gz")
    response = post_job(alice, folder / "case_0000.nii.gz", folder / "case_0001.nii.gz", model="tiny-2ch")
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    mask = _download_mask(alice, job, tmp_path / "mask.nii.gz")
    expected = _cli_mask(server, folder, tmp_path / "cli", model="tiny-2ch")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)
    _assert_problem(post_job(alice, folder / "case_0000.nii.gz", folder / "case_0001.nii.gz",
                             folder / "case_0001.nii.gz", model="tiny-2ch"), 422, "CHANNEL_COUNT_MISMATCH")


def test_a_mamba_clinix_model_runs_as_a_job_like_the_cli(server: Server, alice: httpx.Client, dicom_zip: Path,
                                                          tmp_path: Path) -> None:
    """The second family needs nothing of its own in the service: a DICOM job with SEG, same mask as the CLI."""
    response = post_job(alice, dicom_zip, model="tiny-mamba", formats="nifti,dicom-seg,stats")
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert {"mask.nii.gz", "seg.dcm", "stats.json"} <= {a["name"] for a in job["artifacts"]}
    report = alice.get(f"{job['url']}/artifacts/report.json").json()
    assert report["model"]["family"] == "mamba_clinix"
    assert set(report["settings"]["network_runtime"]["scan_backends"]) <= {"sequential", "chunked"}
    mask = _download_mask(alice, job, tmp_path / "mask.nii.gz")
    expected = _cli_mask(server, dicom_zip, tmp_path / "cli", model="tiny-mamba")
    np.testing.assert_array_equal(np.asarray(mask.dataobj), expected)


def test_a_key_sees_only_its_own_jobs(alice: httpx.Client, bob: httpx.Client, nifti_case: Path) -> None:
    job_id = post_job(alice, nifti_case).json()["id"]
    _assert_problem(bob.get(f"/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
    _assert_problem(bob.get(f"/v1/jobs/{job_id}/artifacts/mask.nii.gz"), 404, "JOB_NOT_FOUND")
    _assert_problem(bob.delete(f"/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
    assert all(job["id"] != job_id for job in bob.get("/v1/jobs").json()["jobs"])
    assert wait_for(alice, job_id)["state"] == "succeeded"  # bob's DELETE did nothing


def test_oversized_upload_is_413(server: Server, alice: httpx.Client) -> None:
    body = b"\0" * (9 * 2**20)
    _assert_problem(alice.post("/v1/jobs", files=[("file", ("big.nii", body))]), 413, "UPLOAD_TOO_LARGE")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced on the stream
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\n'
        for _ in range(9):
            yield b"\0" * 2**20

    streamed = alice.post("/v1/jobs", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    _assert_problem(streamed, 413, "UPLOAD_TOO_LARGE")
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def _zip_bytes(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def _symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("study/link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


BAD_UPLOADS = {
    "traversal": (lambda: _zip_bytes([("../../etc/evil.dcm", b"x"), ("study/ok.dcm", b"y")]), "ZIP_UNSAFE_PATH"),
    "absolute": (lambda: _zip_bytes([("/tmp/evil.dcm", b"x")]), "ZIP_UNSAFE_PATH"),
    "symlink": (lambda: _zip_bytes([(_symlink_entry(), b"/etc/passwd")]), "ZIP_UNSAFE_LINK"),
    "zip_bomb": (lambda: _zip_bytes([(f"study/{i}.dcm", b"\0" * 30 * 2**20) for i in range(3)]), "ZIP_TOO_LARGE"),
    "not_a_zip": (lambda: b"PK\x03\x04 this is not really a zip", "ZIP_UNREADABLE"),
    "text_file": (lambda: b"Patient notes, not an image\n" * 100, "UPLOAD_NOT_AN_IMAGE"),
    "png": (lambda: b"\x89PNG\r\n\x1a\n" + b"\0" * 600, "UPLOAD_NOT_AN_IMAGE"),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_with_a_code(server: Server, alice: httpx.Client, kind: str) -> None:
    make, code = BAD_UPLOADS[kind]
    before = {p.name for p in (server.data_dir / "jobs").iterdir()}
    response = alice.post("/v1/jobs", files=[("file", (f"{kind}.bin", make()))])
    _assert_problem(response, 422, code)
    assert {p.name for p in (server.data_dir / "jobs").iterdir()} == before  # nothing kept
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def _study_zip(folder: Path, name: str, with_pet: bool = True) -> Path:
    from pipelines.phantom_dicom import write_hnc_study

    study = folder / f"{name}_study"
    write_hnc_study(16, study, uid_seed=11, with_pet=with_pet)
    archive = folder / f"{name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as out:
        for path in sorted(p for p in study.rglob("*") if p.is_file()):
            out.write(path, f"study/{path.relative_to(study)}")
    return archive


@pytest.mark.skipif(not (ROOT / "models" / "weights" / "diffusion-hnc-phantom" / "manifest.json").is_file(),
                    reason="diffusion-hnc-phantom is not shipped yet")
def test_a_pet_ct_study_through_the_diffusion_demo_model(server: Server, alice: httpx.Client, tmp_path: Path) -> None:
    """A PET + CT DICOM study in one zip: the diffusion demo model reads both series into its channels and returns
    the mask, a SEG, the uncertainty maps and stats; the form's sampler settings reach the report; a study without
    its PET fails with the code that names the missing modality; bad sampler settings are 422 at upload."""
    archive = _study_zip(tmp_path, "petct")
    response = post_job(alice, archive, model="diffusion-hnc-phantom", formats="nifti,dicom-seg,stats",
                        steps="2", members="2", seed="5")
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert {"mask.nii.gz", "seg.dcm", "stats.json", "uncertainty.nii.gz"} <= {a["name"] for a in job["artifacts"]}
    report = alice.get(f"{job['url']}/artifacts/report.json").json()
    runtime = report["settings"]["network_runtime"]
    assert (runtime["sampler"]["steps"], runtime["sampler"]["members"], runtime["sampler"]["seed"]) == (2, 2, 5)
    assert [c["modality"] for c in report["input_provenance"]["channels"]] == ["CT", "PT"]
    mask = _download_mask(alice, job, tmp_path / "mask.nii.gz")
    labels = np.asarray(mask.dataobj)
    assert {1, 2} <= set(np.unique(labels)), "the demo model finds the tumour and the node"
    uncertainty = alice.get(f"{job['url']}/artifacts/uncertainty.nii.gz")
    (tmp_path / "u.nii.gz").write_bytes(uncertainty.content)
    assert nib.load(tmp_path / "u.nii.gz").shape == (*labels.shape, 4)  # std and entropy of GTVp and GTVn
    stats = alice.get(f"{job['url']}/artifacts/stats.json").json()["labels"]
    assert all("uncertainty_mean" in row for row in stats)
    without_pet = post_job(alice, _study_zip(tmp_path, "ct_only", with_pet=False), model="diffusion-hnc-phantom",
                           steps="1", members="1")
    failed = wait_for(alice, without_pet.json()["id"])
    assert failed["state"] == "failed" and failed["error"]["code"] == "MODALITY_MISMATCH", failed
    assert "PT" in failed["error"]["message"]
    _assert_problem(post_job(alice, archive, model="diffusion-hnc-phantom", steps="0"), 422, "SAMPLING_INVALID")
    _assert_problem(post_job(alice, archive, model="diffusion-hnc-phantom", members="many"), 422, "SAMPLING_INVALID")
    _assert_problem(post_job(alice, archive, steps="3"), 422, "SAMPLING_NOT_SUPPORTED")


def test_form_mistakes_are_4xx(alice: httpx.Client, nifti_case: Path) -> None:
    _assert_problem(alice.post("/v1/jobs", data={"model": "tiny"}, files=[("other", ("x", b"1"))]), 422, "NO_FILE")
    _assert_problem(post_job(alice, nifti_case, colour="blue"), 422, "REQUEST_INVALID")
    _assert_problem(alice.post("/v1/jobs", content=b"x", headers={"content-type": "text/plain"}), 415,
                    "UNSUPPORTED_MEDIA_TYPE")
    _assert_problem(alice.post("/v1/jobs", json={"file": "x"}), 422, "REQUEST_INVALID")  # JSON: a study reference
    _assert_problem(alice.post("/v1/jobs", json={"pacs": "none", "study": "1.2.3"}), 422, "PACS_UNKNOWN")
    _assert_problem(post_job(alice, nifti_case, model="no-such-model"), 422, "MODEL_NOT_FOUND")
    _assert_problem(post_job(alice, nifti_case, formats="nifti,jpeg"), 422, "UNKNOWN_FORMAT")
    _assert_problem(post_job(alice, nifti_case, nifti_case), 422, "CHANNEL_COUNT_MISMATCH")
    _assert_problem(alice.get("/v1/jobs", params={"limit": -3}), 422, "REQUEST_INVALID")


def test_bad_volumes_fail_their_job_with_the_ingestion_code(server: Server, alice: httpx.Client, nifti_case: Path,
                                                            tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(nifti_case.read_bytes()[: nifti_case.stat().st_size // 2])
    missing = _dicom_zip(tmp_path, "missing", drop_slices=(7,))
    for path, code in ((truncated, "NIFTI_UNREADABLE"), (missing, "MISSING_SLICES")):
        response = post_job(alice, path)
        if response.status_code == 202:
            job = wait_for(alice, response.json()["id"])
            assert job["state"] == "failed", job
            assert code in f"{job['error']['code']} {job['error']['message']}", job  # study: NO_USABLE_SERIES (...)
            assert job["artifacts"] == []
        else:
            _assert_problem(response, 422, code)
    assert httpx.get(f"{server.base_url}/readyz").status_code == 200


def test_delete_cancels_a_running_job_and_removes_it(server: Server, alice: httpx.Client, tmp_path: Path) -> None:
    big = tmp_path / "big.nii.gz"
    nib.save(make_phantom(11, spacing=(1.0, 1.0, 1.0)).image, big)
    running = post_job(alice, big, model="tiny-native").json()["id"]
    ahead = post_job(alice, big, model="tiny-native").json()["id"]  # read by the worker while `running` predicts
    queued = post_job(alice, big, model="tiny-native").json()["id"]
    wait_for(alice, running, {"running"}, stage="predict")
    wait_for(alice, ahead, {"running"})
    assert alice.get(f"/v1/jobs/{queued}").json()["queue_position"] == 0
    assert alice.delete(f"/v1/jobs/{queued}").status_code == 204
    _assert_problem(alice.get(f"/v1/jobs/{queued}"), 404, "JOB_NOT_FOUND")
    answer = alice.delete(f"/v1/jobs/{running}")
    assert answer.status_code == 202 and answer.json()["state"] == "running"
    _assert_problem(alice.get(f"/v1/jobs/{running}"), 404, "JOB_NOT_FOUND")  # gone for the client at once
    folder = server.data_dir / "jobs" / running
    deadline = time.monotonic() + 60
    while folder.exists() and time.monotonic() < deadline:  # the worker stops at its next window
        time.sleep(0.2)
    assert not folder.exists()
    assert "cancelled" in server.log_tail(200)
    assert not (server.data_dir / "jobs" / queued).exists()
    assert alice.delete(f"/v1/jobs/{ahead}").status_code == 202  # running too: cancelled, then removed
    deadline = time.monotonic() + 60
    while (server.data_dir / "jobs" / ahead).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (server.data_dir / "jobs" / ahead).exists()


def test_a_worker_reads_the_next_job_while_it_predicts_one(alice: httpx.Client, tmp_path: Path) -> None:
    case = tmp_path / "case.nii.gz"
    nib.save(make_phantom(12, spacing=(1.5, 1.5, 1.5)).image, case)
    ids = [post_job(alice, case, model="tiny-native").json()["id"] for _ in range(3)]
    jobs = [wait_for(alice, job_id) for job_id in ids]
    assert [job["state"] for job in jobs] == ["succeeded"] * 3
    for before, after in zip(jobs, jobs[1:], strict=False):  # claimed and read before the one ahead was done
        assert after["started_at"] < before["finished_at"]
    masks = [alice.get(f"{job['url']}/artifacts/mask.nii.gz").content for job in jobs]
    arrays = [np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(m)).dataobj) for m in masks]
    for array in arrays[1:]:
        np.testing.assert_array_equal(array, arrays[0])


def test_schemathesis_finds_no_server_errors_and_no_schema_violations(server: Server, keys: dict[str, str],
                                                                     tmp_path: Path) -> None:
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    # every check (no 5xx, status codes, content types and bodies as documented, auth enforced, Allow on 405...)
    # except positive_data_acceptance: the schema cannot say "a NIfTI or DICOM file", random bytes are refused
    run = subprocess.run([binary, "run", f"{server.base_url}/openapi.json", "--checks", "all",
                          "--exclude-checks", "positive_data_acceptance",
                          "--header", f"Authorization: Bearer {keys['bob']}", "--max-examples", "25",
                          "--generation-deterministic", "--workers", "1", "--report-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "passed" in run.stdout
    assert httpx.get(f"{server.base_url}/healthz").status_code == 200


def test_logs_and_answers_carry_no_patient_identifiers(server: Server, alice: httpx.Client) -> None:
    log = server.log_path.read_text()
    assert "job " in log and "queued" in log  # the log is there and says what happened
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe_Jane", "Traceback"):
        assert secret not in log, secret
    jobs = alice.get("/v1/jobs").text
    assert PATIENT_ID not in jobs and "Doe_Jane" not in jobs
