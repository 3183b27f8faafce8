"""A real ``tessera serve`` (uvicorn) in its own process on 127.0.0.1, and an httpx client for it."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"succeeded", "failed", "cancelled"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli_env(models_root: Path, home: Path) -> dict[str, str]:
    return {**os.environ, "TESSERA_MODELS_PATH": str(models_root), "TESSERA_HOME": str(home),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def create_key(data_dir: Path, name: str, env: dict[str, str]) -> str:
    run = subprocess.run([sys.executable, "-m", "app.cli.main", "keys", "create", "--data-dir", str(data_dir),
                          "--name", name], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().splitlines()[-1]


@dataclass
class Server:
    data_dir: Path
    env: dict[str, str]
    model: str
    log_path: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> Server:
        self.port = self.port or free_port()
        env = {**self.env, **{f"TESSERA_{k.upper()}": v for k, v in self.settings.items()}}
        log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli.main", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--model", self.model, "--device", "cpu"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def worker_pids(self) -> list[int]:
        with sqlite3.connect(self.data_dir / "tessera.sqlite3") as db:
            return [row[0] for row in db.execute("SELECT pid FROM workers")]

    def peak_rss_bytes(self) -> int:
        """The server process's resident-memory high-water mark (VmHWM)."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


def post_job(client: httpx.Client, *paths: Path, **fields: str) -> httpx.Response:
    files = [("file", (path.name, path.read_bytes(), "application/octet-stream")) for path in paths]
    return client.post("/v1/jobs", files=files, data=fields)


def wait_for(client: httpx.Client, job_id: str, states: set[str] = TERMINAL, timeout: float = 300.0,
             stage: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["state"] in states and (stage is None or job["stage"] == stage):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.get('state')} / {job.get('stage')} after {timeout} s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def wait_until_dead(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every one of ``pids`` is gone within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(pid_alive(pid) for pid in pids)
