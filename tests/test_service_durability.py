"""The service under stress: ``kill -9`` mid-job and a restart, and 20 clients uploading at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.service_helpers import Server, cli_env, create_key, post_job, wait_for, wait_until_dead
from tests.test_service import _cli_mask


@pytest.fixture()
def phantoms(tmp_path: Path) -> dict[str, Path]:
    from pipelines.phantoms import make_phantom

    big, small = tmp_path / "big.nii.gz", tmp_path / "small.nii.gz"
    nib.save(make_phantom(11, spacing=(1.0, 1.0, 1.0)).image, big)  # ~10 s of windows for tiny-native
    nib.save(make_phantom(12, spacing=(4.0, 4.0, 5.0)).image, small)
    return {"big": big, "small": small}


def test_kill_9_mid_job_then_restart_completes_every_accepted_job(service_models: Path, phantoms: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    env = cli_env(service_models, tmp_path / "home")
    server = Server(tmp_path / "data", env, "tiny", tmp_path / "server.log", settings={"concurrency": "1"})
    server.start()
    key = create_key(server.data_dir, "alice", env)
    try:
        with server.client(key) as client:
            running = post_job(client, phantoms["big"], model="tiny-native").json()["id"]
            queued = post_job(client, phantoms["small"]).json()["id"]
            wait_for(client, running, {"running"}, stage="predict")
            wait_for(client, queued, {"running"})  # read ahead while the first one is predicted
            workers = server.worker_pids()
        server.kill9()
        assert wait_until_dead(workers), "a worker outlived its server"
        (partial,) = (server.data_dir / "jobs" / running / "output").glob(".*.partial")  # half-done, not done
        assert not (server.data_dir / "jobs" / running / "output" / running).exists()

        server.port = 0
        server.start()
        with server.client(key) as client:
            first, second = wait_for(client, running), wait_for(client, queued)
            assert first["state"] == second["state"] == "succeeded", (first, second, server.log_tail())
            assert first["attempts"] == 2 and second["attempts"] == 1
            response = client.get(f"{first['url']}/artifacts/mask.nii.gz")
            (tmp_path / "mask.nii.gz").write_bytes(response.content)
            served = np.asarray(nib.load(tmp_path / "mask.nii.gz").dataobj)
        server.model = "tiny-native"
        np.testing.assert_array_equal(served, _cli_mask(server, phantoms["big"], tmp_path / "cli"))
        assert "re-queued 2 job(s)" in server.log_path.read_text()  # the one predicted, the one read ahead
    finally:
        server.stop()


def test_twenty_concurrent_uploads_get_202_or_429_and_memory_stays_bounded(
        service_models: Path, phantoms: dict[str, Path], tmp_path: Path, record_property: object) -> None:
    env = cli_env(service_models, tmp_path / "home")
    server = Server(tmp_path / "data", env, "tiny", tmp_path / "server.log", settings={"max_queued_jobs": "4"})
    server.start()
    key = create_key(server.data_dir, "alice", env)
    payload = phantoms["small"].read_bytes()
    clients = 20
    barrier = threading.Barrier(clients)

    def upload(index: int) -> httpx.Response:
        with server.client(key) as client:
            barrier.wait(timeout=60)
            return client.post("/v1/jobs", files=[("file", (f"case{index}.nii.gz", payload))])

    try:
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(upload, range(clients)))
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {202, 429}, codes
        assert codes.count(202) >= 1 and codes.count(429) >= 1, codes
        for answer in answers:
            if answer.status_code == 429:
                assert answer.json()["code"] == "QUEUE_FULL" and int(answer.headers["retry-after"]) >= 1
        accepted = [a.json()["id"] for a in answers if a.status_code == 202]
        with server.client(key) as client:
            for job_id in accepted:
                assert wait_for(client, job_id)["state"] == "succeeded"
        assert httpx.get(f"{server.base_url}/healthz").status_code == 200
        peak = server.peak_rss_bytes()
        record_property("server_peak_rss_mib", round(peak / 2**20))
        print(f"server peak RSS {peak / 2**20:.0f} MiB; answers {codes.count(202)} x 202, {codes.count(429)} x 429")
        assert peak < 300 * 2**20  # no volumes, no torch in the server: uploads stream to disk, models live in workers
    finally:
        server.stop()


def test_graceful_shutdown_puts_the_running_job_back_in_the_queue(service_models: Path, phantoms: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    import sqlite3

    env = cli_env(service_models, tmp_path / "home")
    server = Server(tmp_path / "data", env, "tiny", tmp_path / "server.log")
    server.start()
    key = create_key(server.data_dir, "alice", env)
    with server.client(key) as client:
        job_id = post_job(client, phantoms["big"], model="tiny-native").json()["id"]
        wait_for(client, job_id, {"running"}, stage="predict")
    server.stop()  # SIGTERM, as systemd or docker stop send it
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells what happened
    assert server.process is not None and server.process.returncode in (0, -15), server.log_tail()
    assert "Application shutdown complete" in server.log_tail()
    with sqlite3.connect(server.data_dir / "tessera.sqlite3") as db:
        state, attempts = db.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert (state, attempts) == ("queued", 0)  # a shutdown is not a failed attempt
    log = server.log_path.read_text()
    assert "interrupted by shutdown" in log and "leaked semaphore" not in log
