"""Hostile clients against a real ``tessera serve`` (uvicorn on loopback): coded 4xx answers, no tracebacks in
the server's log, no patient identifiers in it, HEAD where GET is, downloads that never end cut off."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
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
from pipelines.processes import process_tree, resident_bytes, tree_resident_bytes
from tests.service_helpers import Server, cli_env, create_key, post_job, wait_for

SECRET_NAME = "Doe_Jane_MRN-0042"
SLOW_S = 1.5  # header_timeout_s and body_idle_timeout_s of the module's server


def _upload_head(client: httpx.Client | None = None) -> bytes:
    """The start of a 1 MB upload (with the client's key when given), up to the first file part's bytes."""
    auth = f"Authorization: {client.headers['Authorization']}\r\n".encode() if client else b""
    return (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 1000000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"a.nii\"\r\n\r\n")


@pytest.fixture(scope="module")
def server(service_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("hostile")
    env = cli_env(service_models, tmp_path_factory.mktemp("home"))
    server = Server(folder / "data", env, "tiny", folder / "server.log",
                    settings={"max_upload_bytes": str(8 * 2**20), "max_voxels": str(4 * 2**20),
                              "header_timeout_s": str(SLOW_S), "body_idle_timeout_s": str(SLOW_S),
                              "min_upload_rate": str(64 * 1024)})
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
            raw.sendall(_upload_head() + b"\0" * 1000)
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


def _answer_and_close(raw: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection, which it must do within ``within`` s."""
    raw.settimeout(within)
    received = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        chunk = raw.recv(65536)
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"connection still open after {within} s")


def _trickle(raw: socket.socket, data: bytes, every: float, until: float) -> None:
    """Send ``data`` a byte every ``every`` s until the server closes or ``until`` s have passed."""
    deadline = time.monotonic() + until
    for byte in data:
        if time.monotonic() > deadline:
            return
        try:
            raw.sendall(bytes([byte]))
        except OSError:  # the server closed it: what the caller checks
            return
        time.sleep(every)


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "])
def test_a_request_head_that_never_completes_is_answered_408_and_closed(server: Server, sent: bytes) -> None:
    before = server.log_path.read_text()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        started = time.monotonic()
        raw.sendall(sent)
        sender = threading.Thread(target=_trickle, args=(raw, b"a" * 100, 0.2, 3 * SLOW_S))
        sender.start()  # keeps sending a byte at a time: uvicorn's keep-alive timeout alone never ends it
        answer = _answer_and_close(raw, 4 * SLOW_S)
        sender.join()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started >= SLOW_S - 0.1
    assert "Traceback" not in server.log_path.read_text()[len(before):]


@pytest.mark.parametrize("how", ["stalled", "trickled"])
def test_a_request_body_that_stalls_or_trickles_gets_408_request_timeout(server: Server, client: httpx.Client,
                                                                       how: str) -> None:
    before = server.log_path.read_text()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(_upload_head(client) + b"\0" * 1000)
        if how == "trickled":  # never idle for SLOW_S, but 50 bytes/s against 64 KiB/s required
            sender = threading.Thread(target=_trickle, args=(raw, b"\0" * 1000, 0.02, 6 * SLOW_S))
            sender.start()
        answer = _answer_and_close(raw, 6 * SLOW_S)
        if how == "trickled":
            sender.join()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert json.loads(body)["code"] == "REQUEST_TIMEOUT"
    added = server.log_path.read_text()[len(before):]
    assert "Traceback" not in added and "internal error" not in added and "REQUEST_TIMEOUT" not in added
    assert "body_idle_timeout_s" in added or "min_upload_rate" in added  # one info line says which bound


def test_forty_slow_clients_are_all_let_go_and_others_are_served_meanwhile(server: Server,
                                                                          client: httpx.Client) -> None:
    before = server.log_path.read_text()
    head = _upload_head(client)
    sockets = []
    for index in range(40):  # half stop inside the request head, half inside the body
        raw = socket.create_connection(("127.0.0.1", server.port))
        raw.sendall(head[: 30 + index] if index % 2 else head + b"\0" * 100)
        sockets.append(raw)
    started = time.monotonic()
    with httpx.Client(base_url=server.base_url) as other:
        assert other.get("/healthz", timeout=5).status_code == 200
    assert time.monotonic() - started < SLOW_S  # answered while the 40 are held
    try:
        answers = [_answer_and_close(raw, 5 * SLOW_S) for raw in sockets]
    finally:
        for raw in sockets:
            raw.close()
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert "Traceback" not in server.log_path.read_text()[len(before):]


def test_the_process_tree_memory_counts_children_and_grandchildren() -> None:
    code = ("import os, time\nif os.fork() == 0:\n    block = bytearray(200 * 2**20)\n    time.sleep(30)\n"
            "else:\n    time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(process_tree(child.pid)) < 2:
            time.sleep(0.05)
        tree = process_tree(child.pid)
        assert len(tree) == 2 and tree[0] == child.pid
        while time.monotonic() < deadline and tree_resident_bytes(child.pid) < 200 * 2**20:
            time.sleep(0.05)
        assert tree_resident_bytes(child.pid) >= 200 * 2**20 > resident_bytes(child.pid)
    finally:
        for pid in process_tree(child.pid)[::-1]:
            os.kill(pid, signal.SIGKILL)
        child.wait()


def test_a_job_over_the_worker_memory_bound_fails_coded_and_the_worker_comes_back(
        service_models: Path, tmp_path: Path) -> None:
    env = cli_env(service_models, tmp_path / "home")
    # a bound every running job passes at once (the worker's model alone is more): the monitor must act
    bounded = Server(tmp_path / "data", env, "tiny", tmp_path / "server.log",
                     settings={"max_worker_memory_bytes": str(64 * 2**20)}).start()
    try:
        path = tmp_path / "case.nii.gz"
        nib.save(make_phantom(3, spacing=(4.0, 4.0, 5.0)).image, path)
        with bounded.client(create_key(bounded.data_dir, "big", env)) as client:
            job = wait_for(client, post_job(client, path).json()["id"])
            assert job["state"] == "failed" and job["error"]["code"] == "JOB_MEMORY_EXCEEDED", job
            assert "max_worker_memory_bytes" in job["error"]["message"]
            deadline = time.monotonic() + 120
            while client.get("/readyz").status_code != 200:  # the worker was restarted
                assert time.monotonic() < deadline, bounded.log_tail()
                time.sleep(0.3)
        assert "Traceback" not in bounded.log_path.read_text()
    finally:
        bounded.stop()
