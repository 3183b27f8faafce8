"""The Ray backend on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head that runs
no work and two nodes of one CPU each, as two GPU nodes would be. No mocks of Ray: raylets are killed for real."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from app.cli.main import main as tessera
from models.manifest import ModelManifest
from pipelines.cases import discover_cases
from pipelines.segment import OutputOptions, RunSettings
from tests.service_helpers import Server, cli_env, create_key, post_job, wait_for, wait_until_dead
from tests.test_service import _cli_mask

STORE_BYTES = 200 * 2**20
# node deaths seen in about 2 s rather than Ray's default 30 s
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster(service_models: Path) -> Iterator[object]:
    """Head (GCS, no CPUs) plus two 1-CPU nodes; their workers inherit the model folder of the service tests."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    saved = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED", "TESSERA_MODELS_PATH")}
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", TESSERA_MODELS_PATH=str(service_models))
    head = {"num_cpus": 0, "include_dashboard": False, "object_store_memory": STORE_BYTES,
            "_system_config": FAST_HEALTH_CHECKS}
    ray_cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(2):
        add_cpu_node(ray_cluster)
    ray_cluster.wait_for_nodes()
    try:
        yield ray_cluster
    finally:
        ray_cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def add_cpu_node(ray_cluster: object) -> object:
    return ray_cluster.add_node(num_cpus=1, object_store_memory=STORE_BYTES)  # type: ignore[attr-defined]


@pytest.fixture()
def two_nodes(cluster: object) -> Iterator[object]:
    """The cluster with two CPU nodes again after a test that removed one."""
    yield cluster
    while len(cluster.worker_nodes) < 2:  # type: ignore[attr-defined]
        add_cpu_node(cluster)
    cluster.wait_for_nodes()  # type: ignore[attr-defined]


@pytest.fixture()
def one_torch_thread() -> Iterator[None]:
    """This process's torch on one thread, as an actor on a 1-CPU node (see :func:`_cli_mask_on_one_thread`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _phantom_folder(folder: Path, seeds: range, spacing: tuple[float, float, float]) -> Path:
    from pipelines.phantoms import make_phantom

    folder.mkdir(parents=True)
    for seed in seeds:
        nib.save(make_phantom(seed, spacing=spacing).image, folder / f"case{seed}.nii.gz")
    return folder


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {mask.parent.name: np.asarray(nib.load(mask).dataobj) for mask in sorted(out.glob("*/mask.nii.gz"))}


def _summary(out: Path) -> dict:
    import json

    return json.loads((out / "run_summary.json").read_text())


def test_a_folder_across_two_nodes_gives_the_local_masks_and_the_local_bookkeeping(
        cluster: object, tiny_model: ModelManifest, tmp_path: Path, one_torch_thread: None) -> None:
    cases = _phantom_folder(tmp_path / "cases", range(20, 24), (4.0, 4.0, 5.0))
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b not a nifti")  # one failure, isolated, with its code
    common = ["--model", str(tiny_model.manifest_path), "--device", "cpu", "--format", "nifti,stats"]
    address = cluster.address  # type: ignore[attr-defined]

    assert tessera(["segment", str(cases), "-o", str(tmp_path / "local"), *common]) == 1
    assert tessera(["segment", str(cases), "-o", str(tmp_path / "ray"), *common, "--backend", "ray",
                    "--ray-address", address]) == 1

    local, remote = _masks(tmp_path / "local"), _masks(tmp_path / "ray")
    assert sorted(remote) == ["case20", "case21", "case22", "case23"] and sorted(local) == sorted(remote)
    for case, mask in local.items():
        assert np.array_equal(mask, remote[case]), case
    assert nib.load(tmp_path / "ray" / "case20" / "mask.nii.gz").affine.tolist() == \
        nib.load(tmp_path / "local" / "case20" / "mask.nii.gz").affine.tolist()
    for out in ("local", "ray"):
        assert {k: _summary(tmp_path / out)[k] for k in ("succeeded", "failed", "skipped")} == \
            {"succeeded": 4, "failed": 1, "skipped": 0}
    import json

    assert json.loads((tmp_path / "ray" / "broken" / "report.json").read_text())["error"]["code"] == \
        json.loads((tmp_path / "local" / "broken" / "report.json").read_text())["error"]["code"]
    assert not list((tmp_path / "ray").glob(".*.partial"))

    # resumed: the finished cases are skipped by the driver, the failed one runs again
    assert tessera(["segment", str(cases), "-o", str(tmp_path / "ray"), *common, "--backend", "ray",
                    "--ray-address", address]) == 1
    assert {k: _summary(tmp_path / "ray")[k] for k in ("succeeded", "failed", "skipped")} == \
        {"succeeded": 0, "failed": 1, "skipped": 4}


def test_a_node_killed_mid_run_loses_no_case_and_writes_none_twice(
        two_nodes: object, tiny_model: ModelManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, one_torch_thread: None) -> None:
    import pipelines.segment
    from app.jobs.ray_batch import segment_cases_on_ray

    folder = _phantom_folder(tmp_path / "cases", range(30, 36), (2.0, 2.0, 2.5))
    cases = discover_cases([folder])
    published: Counter[str] = Counter()
    publish = pipelines.segment.publish_case

    def counted(staging: Path, case_dir: Path) -> Path:
        published[case_dir.name] += 1
        return publish(staging, case_dir)

    monkeypatch.setattr(pipelines.segment, "publish_case", counted)
    settings = RunSettings(model=str(tiny_model.manifest_path), device="cpu",
                           outputs=OutputOptions(formats=frozenset({"nifti"})))
    results = []
    with caplog.at_level(logging.WARNING, logger="app.jobs.ray_batch"):
        run = segment_cases_on_ray(cases, tmp_path / "out", settings, address=two_nodes.address)  # type: ignore[attr-defined]
        results.append(next(run))  # the other actor is mid-case now: its node goes
        victim = two_nodes.worker_nodes  # type: ignore[attr-defined]
        two_nodes.remove_node(next(iter(victim)), allow_graceful=False)  # type: ignore[attr-defined]
        results += list(run)

    assert sorted(r.case_id for r in results) == [c.case_id for c in cases]
    assert {r.status for r in results} == {"succeeded"}, [(r.case_id, r.error_code) for r in results]
    assert "running it again on another" in caplog.text
    assert published == Counter({c.case_id: 1 for c in cases})
    assert not list((tmp_path / "out").glob(".*.partial"))

    job = settings.case_job(tmp_path / "local", settings.predictor())
    for case in cases:  # the cases that ran again (and all others) give the local masks
        job.run(case)
    remote, local = _masks(tmp_path / "out"), _masks(tmp_path / "local")
    assert sorted(remote) == sorted(local) and all(np.array_equal(remote[c], local[c]) for c in local)


def test_without_ray_the_ray_backend_is_a_coded_usage_error(
        tiny_model: ModelManifest, small_phantom_files: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when the extra is absent
    code = tessera(["segment", str(small_phantom_files["case3"]), "-o", str(tmp_path / "out"), "--model",
                    str(tiny_model.manifest_path), "--backend", "ray"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert "BACKEND_UNAVAILABLE" in error and "pip install 'tessera[ray]'" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
    assert tessera(["serve", "--data-dir", str(tmp_path / "data"), "--executor", "ray"]) == 2
    assert "BACKEND_UNAVAILABLE" in capsys.readouterr().err


def test_an_address_where_no_cluster_listens_is_a_coded_usage_error(
        tiny_model: ModelManifest, small_phantom_files: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    from tests.service_helpers import free_port

    started = time.monotonic()
    code = tessera(["segment", str(small_phantom_files["case3"]), "-o", str(tmp_path / "out"), "--model",
                    str(tiny_model.manifest_path), "--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}"])
    assert code == 2 and "RAY_UNREACHABLE" in capsys.readouterr().err
    assert time.monotonic() - started < 30 and not (tmp_path / "out" / "case3").exists()
    assert tessera(["serve", "--data-dir", str(tmp_path / "data"), "--executor", "ray", "--concurrency", "1",
                    "--ray-address", f"127.0.0.1:{free_port()}"]) == 2
    assert "RAY_UNREACHABLE" in capsys.readouterr().err


# --- the service with the Ray executor ------------------------------------------------------------------------


@pytest.fixture()
def big_phantom(tmp_path: Path) -> Path:
    from pipelines.phantoms import make_phantom

    path = tmp_path / "big.nii.gz"
    nib.save(make_phantom(11, spacing=(1.0, 1.0, 1.0)).image, path)
    return path


def _ray_server(tmp_path: Path, service_models: Path, address: str) -> tuple[Server, str]:
    env = cli_env(service_models, tmp_path / "home")
    server = Server(tmp_path / "data", env, "tiny", tmp_path / "server.log",
                    settings={"executor": "ray", "ray_address": address, "concurrency": "1"})
    server.start()
    return server, create_key(server.data_dir, "alice", env)


def _cli_mask_on_one_thread(server: Server, source: Path, out: Path) -> np.ndarray:
    """The CLI's mask with the torch threads of an actor on a 1-CPU node: a random-weight tiny network has
    near-ties that 1 and 2 threads (another float summation order) may break differently (1 voxel in 4 million)."""
    return _cli_mask(replace(server, env={**server.env, "OMP_NUM_THREADS": "1"}), source, out)


def _cluster_cpus_free(address: str, cpus: int, timeout: float = 30.0) -> bool:
    """Whether the cluster's ``cpus`` CPUs are all free within ``timeout``: no actor holds one."""
    from app.jobs.ray_cluster import ray_connection

    with ray_connection(address) as ray:
        deadline = time.monotonic() + timeout
        while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
            time.sleep(0.2)
        return bool(ray.available_resources().get("CPU", 0) >= cpus)


def _served_mask(client: httpx.Client, job: dict, path: Path) -> np.ndarray:
    path.write_bytes(client.get(f"{job['url']}/artifacts/mask.nii.gz").content)
    return np.asarray(nib.load(path).dataobj)


def test_service_on_ray_survives_kill_9_of_the_server_mid_job(
        cluster: object, service_models: Path, big_phantom: Path, tmp_path: Path) -> None:
    server, key = _ray_server(tmp_path, service_models, cluster.address)  # type: ignore[attr-defined]
    try:
        with server.client(key) as client:
            job_id = post_job(client, big_phantom).json()["id"]
            wait_for(client, job_id, {"running"}, stage="predict")  # on the actor now
            workers = server.worker_pids()
        server.kill9()
        assert wait_until_dead(workers), "a worker outlived its server"
        assert _cluster_cpus_free(cluster.address, 2), "an actor outlived its server"  # type: ignore[attr-defined]
        assert not (server.data_dir / "jobs" / job_id / "output" / job_id).exists()

        server.port = 0
        server.start()
        with server.client(key) as client:
            job = wait_for(client, job_id)
            assert (job["state"], job["attempts"]) == ("succeeded", 2), (job, server.log_tail())
            served = _served_mask(client, job, tmp_path / "served.nii.gz")
        np.testing.assert_array_equal(served, _cli_mask_on_one_thread(server, big_phantom, tmp_path / "cli"))
        log_text = server.log_path.read_text()
        assert "re-queued 1 job(s)" in log_text and "Ray actor on node" in log_text
    finally:
        server.stop()


def test_service_on_ray_requeues_the_job_of_a_lost_node_and_cancels_on_the_cluster(
        two_nodes: object, service_models: Path, big_phantom: Path, tmp_path: Path) -> None:
    server, key = _ray_server(tmp_path, service_models, two_nodes.address)  # type: ignore[attr-defined]
    try:
        with server.client(key) as client:
            job_id = post_job(client, big_phantom).json()["id"]
            wait_for(client, job_id, {"running"}, stage="predict")
            (node_id,) = re.findall(r"Ray actor on node ([0-9a-f]+)", server.log_path.read_text())
            (victim,) = [n for n in two_nodes.worker_nodes if n.node_id == node_id]  # type: ignore[attr-defined]
            two_nodes.remove_node(victim, allow_graceful=False)  # type: ignore[attr-defined]
            job = wait_for(client, job_id)
            assert (job["state"], job["attempts"]) == ("succeeded", 2), (job, server.log_tail())
            served = _served_mask(client, job, tmp_path / "served.nii.gz")

            # a cancel (DELETE of a running job) stops the case on the cluster: its actor is killed at once
            doomed = post_job(client, big_phantom).json()["id"]
            wait_for(client, doomed, {"running"}, stage="predict")
            assert client.delete(f"/v1/jobs/{doomed}").status_code == 202
            deadline = time.monotonic() + 10  # well inside cancel_grace_s (20 s): the worker did it, not the monitor
            while client.get(f"/v1/jobs/{doomed}").status_code != 404 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert client.get(f"/v1/jobs/{doomed}").status_code == 404, server.log_tail()
        np.testing.assert_array_equal(served, _cli_mask_on_one_thread(server, big_phantom, tmp_path / "cli"))
        log_text = server.log_path.read_text()
        assert "its Ray actor was lost" in log_text and f"job {doomed}: cancelled" in log_text
        assert "ignored the cancel" not in log_text
    finally:
        server.stop()


def test_a_cluster_with_gpus_gets_one_actor_per_gpu_with_its_share_of_the_cpus(two_nodes: object) -> None:
    """GPU resources declared on a node (Ray counts them, it does not look for them): slots follow them."""
    from app.jobs.ray_cluster import ActorSlot, actor_slots, ray_connection

    gpu_node = two_nodes.add_node(num_cpus=4, num_gpus=2, object_store_memory=STORE_BYTES)  # type: ignore[attr-defined]
    try:
        two_nodes.wait_for_nodes()  # type: ignore[attr-defined]
        with ray_connection(two_nodes.address) as ray:  # type: ignore[attr-defined]
            slots = actor_slots(ray)
        assert slots == [ActorSlot(num_cpus=2, num_gpus=1, node_id=gpu_node.node_id)] * 2
    finally:
        two_nodes.remove_node(gpu_node)  # type: ignore[attr-defined]
