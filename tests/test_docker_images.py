"""Tessera's images on a real Docker engine: run by ``docker/test.sh`` once it has built them.

The image under test is named by TESSERA_DOCKER_IMAGE and its kind (cpu or gpu) by TESSERA_DOCKER_KIND;
without them (a plain ``pytest`` run) everything here skips. The engine is the one DOCKER_HOST points at,
driven through the ``docker`` client named by DOCKER.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.service_helpers import free_port, post_job, wait_for

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("TESSERA_DOCKER_IMAGE", "")
KIND = os.environ.get("TESSERA_DOCKER_KIND", "")
DOCKER = os.environ.get("DOCKER") or shutil.which("docker") or "docker"
SAMPLE_IN_IMAGE = "/opt/tessera/sample_data/imagesTs"
USER = "1000:1000"

cpu_image = pytest.mark.skipif(not IMAGE or KIND != "cpu", reason="no CPU image under test (docker/test.sh sets it)")
gpu_image = pytest.mark.skipif(not IMAGE or KIND != "gpu", reason="no GPU image under test (docker/test.sh sets it)")


def docker(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert run.returncode == 0, f"docker {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return run


def data_folder(path: Path) -> Path:
    """A host folder the container's user (uid 1000) may write: the data volume of a `docker run -v`."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, 1000, 1000)
    return path


def masks(folder: Path) -> dict[str, np.ndarray]:
    found = {p.parent.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*/mask.nii.gz"))}
    assert found, f"no masks under {folder}"
    return found


@pytest.fixture(scope="module")
def host_masks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The host's masks of the sample test cases with the default model: what the image must reproduce."""
    out = tmp_path_factory.mktemp("host") / "out"
    run = subprocess.run([sys.executable, "-m", "app.cli.main", "segment", str(ROOT / "sample_data" / "imagesTs"),
                          "-o", str(out), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr
    return masks(out)


@cpu_image
def test_the_image_runs_as_the_non_root_user() -> None:
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == USER
    assert config["Entrypoint"] == ["tessera"]
    assert docker("run", "--rm", "--entrypoint", "id", IMAGE, "-u").stdout.strip() == "1000"


@cpu_image
def test_offline_read_only_run_segments_the_samples_like_the_host(host_masks: dict[str, np.ndarray],
                                                                  tmp_path: Path) -> None:
    data = data_folder(tmp_path / "data")
    run = docker("run", "--rm", "--init", "--network", "none", "--read-only", "--tmpfs", "/tmp",
                 "-v", f"{data}:/data", IMAGE, "segment", SAMPLE_IN_IMAGE, "-o", "/data/out", timeout=900)
    assert "4 succeeded, 0 failed" in run.stderr, run.stderr[-2000:]
    produced = masks(data / "out")
    assert produced.keys() == host_masks.keys()
    for case, mask in host_masks.items():
        assert np.array_equal(produced[case], mask), f"{case}: the container's mask differs from the host's"
    for path in (data / "out").rglob("*"):
        assert path.stat().st_uid == 1000, f"{path} not written by the container's user"


@cpu_image
def test_cli_tools_answer_offline() -> None:
    version = docker("run", "--rm", "--network", "none", IMAGE, "--version").stdout
    assert version.strip().startswith("tessera")
    listing = docker("run", "--rm", "--network", "none", IMAGE, "models", "list").stdout
    assert "swin-unetr-phantom" in listing and "diffusion-hnc-phantom" in listing


class Container:
    """`tessera serve` in a detached container with a named data volume, published on a loopback port."""

    def __init__(self, name: str, volume: str) -> None:
        self.name, self.volume, self.port = name, volume, free_port()

    def run(self) -> None:
        docker("run", "-d", "--init", "--name", self.name, "-p", f"127.0.0.1:{self.port}:8000",
               "-v", f"{self.volume}:/data", "--health-interval", "2s", "--health-start-period", "120s",
               "-e", "TESSERA_CONCURRENCY=1", IMAGE, "serve", "--host", "0.0.0.0", "--port", "8000",
               "--data-dir", "/data", "--device", "cpu")

    def wait_healthy(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = json.loads(docker("inspect", "--format", "{{json .State}}", self.name).stdout)
            if not state["Running"]:
                raise AssertionError(f"container exited {state['ExitCode']}:\n{self.logs()}")
            if state.get("Health", {}).get("Status") == "healthy":
                return
            time.sleep(1)
        raise AssertionError(f"not healthy after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        run = docker("logs", self.name, check=False)
        return (run.stdout + run.stderr)[-4000:]

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=60)

    def remove(self) -> None:
        docker("rm", "-f", self.name, check=False)


@pytest.fixture()
def service() -> Iterator[Container]:
    suffix = f"{os.getpid()}-{time.monotonic_ns()}"
    container = Container(f"tessera-test-{suffix}", f"tessera-test-data-{suffix}")
    docker("volume", "create", container.volume)
    container.run()
    try:
        container.wait_healthy()
        yield container
    finally:
        container.remove()
        docker("volume", "rm", "-f", container.volume, check=False)


@cpu_image
def test_the_service_in_the_image_gives_the_clis_mask_and_survives_docker_stop(
        service: Container, host_masks: dict[str, np.ndarray], tmp_path: Path) -> None:
    from pipelines.phantoms import make_phantom

    key = docker("exec", service.name, "tessera", "keys", "create", "--data-dir", "/data", "--name", "me")
    key_text = key.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=f"http://127.0.0.1:{service.port}", timeout=30) as anonymous:
        assert anonymous.get("/").status_code == 200  # the results page, with NiiVue's bundle in the image
        assert anonymous.get("/page/niivue.js").status_code == 200
    case = ROOT / "sample_data" / "imagesTs" / "phantom_020.nii.gz"
    with service.client(key_text) as client:
        job = wait_for(client, post_job(client, case).json()["id"], timeout=600)
        assert job["state"] == "succeeded", job
        (tmp_path / "served.nii.gz").write_bytes(client.get(f"{job['url']}/artifacts/mask.nii.gz").content)
        served = np.asarray(nib.load(tmp_path / "served.nii.gz").dataobj)
        assert np.array_equal(served, host_masks["phantom_020"])

        big = tmp_path / "big.nii.gz"  # a case long enough to be caught in its predict stage
        nib.save(make_phantom(11, spacing=(0.8, 0.8, 0.8)).image, big)
        running = post_job(client, big).json()["id"]
        wait_for(client, running, {"running"}, stage="predict", timeout=600)
    docker("stop", "--time", "60", service.name, timeout=120)  # SIGTERM to tessera, as systemd would send it
    stopped = json.loads(docker("inspect", "--format", "{{json .State}}", service.name).stdout)
    assert stopped["ExitCode"] in (0, 143), service.logs()  # a graceful exit, not a kill after the grace time
    assert "interrupted by shutdown" in service.logs()

    docker("start", service.name)
    service.wait_healthy()
    with service.client(key_text) as client:
        job = wait_for(client, running, timeout=900)
        assert job["state"] == "succeeded", job
        assert job["attempts"] == 1, job  # the shutdown was not counted as a failed attempt


@gpu_image
def test_the_gpu_image_imports_torch_and_cupy_and_answers() -> None:
    probe = ("import torch, cupy; print(torch.__version__, torch.version.cuda, cupy.__version__, "
             "torch.cuda.is_available())")
    run = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", probe)
    torch_version, cuda, cupy_version, available = run.stdout.split()
    assert cuda != "None", f"the GPU image has a CPU build of torch {torch_version}"
    assert cupy_version
    assert docker("run", "--rm", "--network", "none", IMAGE, "--version").stdout.strip().startswith("tessera")
    assert "swin-unetr-phantom" in docker("run", "--rm", "--network", "none", IMAGE, "models", "list").stdout
    config = json.loads(docker("image", "inspect", "--format", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == USER
