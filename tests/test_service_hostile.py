"""Hostile clients against a real ``tessera serve`` (uvicorn on loopback): coded 4xx answers, no tracebacks in
the server's log, no patient identifiers in it, HEAD where GET is, downloads that never end cut off."""

from __future__ import annotations

import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from pipelines.phantom_dicom import write_phantom_series
from pipelines.phantoms import make_phantom
from tests.service_helpers import Server, cli_env, create_key, post_job, wait_for

SECRET_NAME = "Doe_Jane_MRN-0042"


@pytest.fixture(scope="module")
def server(service_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("hostile")
    env = cli_env(service_models, tmp_path_factory.mktemp("home"))
    server = Server(folder / "data", env, "tiny", folder / "server.log",
                    settings={"max_upload_bytes": str(8 * 2**20), "max_voxels": str(4 * 2**20)})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client(create_key(server.data_dir, "mallory", server.env)) as client:
        yield client


def _problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code


def test_a_nifti_with_a_header_extension_is_accepted_and_segmented(client: httpx.Client, tmp_path: Path) -> None:
    image = make_phantom(3, spacing=(4.0, 4.0, 5.0)).image
    image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 3000))
    path = tmp_path / "extended.nii.gz"
    nib.save(image, path)
    response = post_job(client, path)
    assert response.status_code == 202, response.text
    assert wait_for(client, response.json()["id"])["state"] == "succeeded"


def test_a_header_declaring_a_huge_grid_is_refused_at_upload(client: httpx.Client, tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((4000, 4000, 4000))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), 1)
    path = tmp_path / "huge.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4 + b"\0" * 1024)
    _problem(post_job(client, path), 422, "VOLUME_TOO_LARGE")


def test_long_client_values_are_capped_in_answers(client: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "case.nii.gz"
    nib.save(make_phantom(3, spacing=(4.0, 4.0, 5.0)).image, path)
    response = post_job(client, path, model="m" * 100_000 + "\x1b[31m")
    assert 400 <= response.status_code < 500
    assert len(response.text) < 4000 and "\x1b" not in response.text


def test_head_works_where_get_does(server: Server, client: httpx.Client) -> None:
    for url in ("/healthz", "/readyz", "/v1/models", "/v1/jobs"):
        get, head = client.get(url), client.head(url)
        assert head.status_code == get.status_code == 200, url
        assert head.content == b"" and head.headers.get("content-type") == get.headers.get("content-type")
    assert httpx.head(f"{server.base_url}/healthz").status_code == 200


def test_a_client_that_disconnects_mid_upload_leaves_one_line_not_a_traceback(server: Server) -> None:
    before = server.log_path.read_text()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 1000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                        b"filename=\"a.nii\"\r\n\r\n" + b"\0" * 1000)
    with httpx.Client(base_url=server.base_url) as probe:  # the server still answers
        assert probe.get("/healthz").status_code == 200
    added = server.log_path.read_text()[len(before):]
    assert "Traceback" not in added and "internal error" not in added


def test_downloads_racing_a_delete_are_whole_or_refused(client: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "case.nii.gz"
    nib.save(make_phantom(3, spacing=(4.0, 4.0, 5.0)).image, path)
    job = wait_for(client, post_job(client, path).json()["id"])
    assert job["state"] == "succeeded"
    sizes = {a["name"]: a["bytes"] for a in job["artifacts"]}
    results: list[tuple[int, int, str]] = []

    def download(name: str) -> None:
        response = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
        results.append((response.status_code, len(response.content), name))

    threads = [threading.Thread(target=download, args=(name,)) for name in list(sizes) * 3]
    for thread in threads:
        thread.start()
    client.delete(f"/v1/jobs/{job['id']}")
    for thread in threads:
        thread.join()
    for status, length, name in results:
        assert status in (200, 404, 410), (status, name)
        if status == 200:
            assert length == sizes[name], name


def test_zip_member_names_never_reach_the_log(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    series = tmp_path / "series"
    write_phantom_series(5, series, spacing=(8.0, 8.0, 10.0))
    archive = tmp_path / "study.zip"
    files = sorted(series.iterdir())
    with zipfile.ZipFile(archive, "w") as out:
        for index, file in enumerate(files[:-1]):
            out.write(file, f"{SECRET_NAME}/{SECRET_NAME}_{index}.dcm")
        # the last slice ends inside its pixel data: the volume fails, and its message names the file
        out.writestr(f"{SECRET_NAME}/{SECRET_NAME}_last.dcm", files[-1].read_bytes()[:-100])
        out.writestr(f"{SECRET_NAME}/{SECRET_NAME}_broken.dcm", b"\0" * 128 + b"DICM" + b"\xff" * 64)
        out.writestr(f"{SECRET_NAME}/{SECRET_NAME}_bomb.dcm.gz", b"\x1f\x8b" + b"\0" * 64)
    response = post_job(client, archive)
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "PIXEL_DATA_CORRUPT"
    assert SECRET_NAME not in server.log_path.read_text()
    assert SECRET_NAME not in client.get(f"/v1/jobs/{job['id']}").text
