"""Hostile input against a real ``tessera serve``: every answer coded, no 5xx, no traceback, nothing left behind.

Starts the service on loopback with its default limits and the default model, sends hostile uploads (allocation
and decompression bombs, malformed NIfTI, damaged and lying zips, DICOM bombs, two patients in one study) and
hostile clients (slow request heads and bodies, disconnects mid-upload, downloads racing a delete), and valid edge
cases that must still succeed. Meanwhile it samples the resident memory of the whole server tree (server, workers,
their reader processes) every 50 ms. At the end it deletes every job, stops the server and looks for processes
and files left behind. Prints JSON:

    python bench/hostile_probe.py [--output bench/results/hostile_probe_cpu-2core.json]
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402

from pipelines.phantom_dicom import write_phantom_series  # noqa: E402
from pipelines.phantoms import make_phantom  # noqa: E402
from pipelines.processes import process_tree, resident_bytes  # noqa: E402

Upload = tuple[str, bytes]
TERMINAL = {"succeeded", "failed", "cancelled"}


# --- hostile and edge-case uploads ------------------------------------------------------------------------------


def _nifti_bytes(image: nib.Nifti1Image | nib.Nifti2Image, gz: bool = True) -> bytes:
    raw = image.to_bytes()
    return gzip.compress(raw, 6) if gz else raw


def _raw_nifti(shape: tuple[int, ...], *, version: int = 1, datatype: int = 4, gz: bool = False,
               pixdim: tuple[float, float, float] = (1.0, 1.0, 1.0), codes: tuple[int, int] = (1, 1),
               data: bytes = b"\0" * 4096) -> bytes:
    """NIfTI bytes written field by field (nibabel refuses to write most of these)."""
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    header["dim"][:] = 1
    header["dim"][0] = len(shape)
    header["dim"][1:1 + len(shape)] = shape
    header["datatype"], header["bitpix"] = datatype, {2: 8, 4: 16, 128: 24, 64: 64}.get(datatype, 16)
    header["pixdim"][1:4] = pixdim
    header["qform_code"], header["sform_code"] = codes
    header["vox_offset"] = 352 if version == 1 else 544
    raw = header.binaryblock + b"\0" * 4 + data
    return gzip.compress(raw) if gz else raw


def _gzip_zeros(size: int, prefix: bytes = b"") -> bytes:
    """``prefix`` and ``size`` zero bytes as one gzip stream, compressed in pieces (a few MiB per GiB)."""
    out = io.BytesIO()
    block = b"\0" * (16 * 2**20)
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as stream:
        stream.write(prefix)
        while size > 0:
            stream.write(block[: min(size, len(block))])
            size -= len(block)
    return out.getvalue()


def _zip_of_zeros(name: str, size: int) -> bytes:
    out = io.BytesIO()
    block = b"\0" * (16 * 2**20)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w", force_zip64=True) as m:
        while size > 0:
            m.write(block[: min(size, len(block))])
            size -= len(block)
    return out.getvalue()


def _zeros_bomb(shape: tuple[int, int, int], spacing: float, datatype: int) -> bytes:
    """A valid NIfTI of ``shape`` voxels of zeros as a small gzip stream."""
    itemsize = {4: 2, 16: 4, 64: 8}[datatype]
    head = _raw_nifti(shape, datatype=datatype, pixdim=(spacing,) * 3, codes=(1, 0), data=b"")  # qform: identity
    return _gzip_zeros(int(np.prod(shape)) * itemsize, head)


def _phantom(seed: int = 3, **kwargs: Any) -> nib.Nifti1Image:
    return make_phantom(seed, spacing=(4.0, 4.0, 5.0), **kwargs).image


def _series_files(folder: Path, seed: int = 5, patient: str = "PHANTOM") -> list[Path]:
    write_phantom_series(seed, folder, spacing=(8.0, 8.0, 10.0), patient_id=patient)
    return sorted(folder.iterdir())


def _zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def _patched_local_header(data: bytes, patch: Callable[[bytearray], None]) -> bytes:
    raw = bytearray(data)
    patch(raw)
    return bytes(raw)


def hostile_uploads(work: Path) -> dict[str, tuple[list[Upload], str]]:
    """name -> (files, expected outcome): 'ok', or the 4xx/job failure counts as coded."""
    series = _series_files(work / "series")
    slices = [(f"s/{p.name}", p.read_bytes()) for p in series]
    other = _series_files(work / "other", seed=6, patient="OTHER")
    frames = pydicom.dcmread(series[0])
    frames.NumberOfFrames = 5_000_000
    frames_io = io.BytesIO()
    frames.save_as(frames_io)
    mixed_ids = [(f"s/{p.name}", p.read_bytes()) for p in series]
    relabelled = pydicom.dcmread(series[1])
    relabelled.PatientID = "SOMEONE_ELSE"
    relabelled_io = io.BytesIO()
    relabelled.save_as(relabelled_io)
    mixed_ids[1] = (mixed_ids[1][0], relabelled_io.getvalue())
    opening = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                          0xFFFFFFFF)
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = series[0].read_bytes() + opening * 5000 + closing * 5000
    encrypted = _patched_local_header(_zip([("a.dcm", b"\0" * 200)]), lambda raw: raw.__setitem__(6, raw[6] | 1))
    unknown_method = _patched_local_header(_zip([("a.dcm", b"\0" * 200)]), lambda raw: raw.__setitem__(8, 99))
    extension = _phantom()
    extension.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 3000))
    nan_image = _phantom()
    nan_data = np.asarray(nan_image.dataobj, dtype=np.float32).copy()
    nan_data[:2] = np.nan
    odd = _phantom(4)
    odd_data = np.asarray(odd.dataobj)[:37, :23, :11]
    return {
        "nifti1 header 4000^3": ([("a.nii", _raw_nifti((4000, 4000, 4000)))], "coded"),
        "nifti1 header 4000^3 gz": ([("a.nii.gz", _raw_nifti((4000, 4000, 4000), gz=True))], "coded"),
        "nifti2 header 2^40 voxels": ([("a.nii", _raw_nifti((2**20, 2**20, 1), version=2))], "coded"),
        "nifti2 header absurd dims": ([("a.nii", _raw_nifti((2**40, 2**40, 2**40), version=2))], "coded"),
        "gz zeros 2^30 int16 voxels": ([("a.nii.gz", _zeros_bomb((1024, 1024, 1024), 0.5, 4))], "coded"),
        "gz zeros 640^3 float64 (2 GiB inflated)": ([("a.nii.gz", _zeros_bomb((640, 640, 640), 0.6, 64))],
                                                    "coded"),
        "gz zeros 256x256x300 int16 (37 MiB, under the ratio floor)": (
            [("a.nii.gz", _zeros_bomb((256, 256, 300), 0.8, 4))], "any"),
        "gz zeros 600x600x700 int16 (within the voxel limit)": (
            [("a.nii.gz", _zeros_bomb((600, 600, 700), 0.6, 4))], "coded"),
        "tiny grid of 2 m voxels": ([("a.nii.gz", _nifti_bytes(nib.Nifti1Image(
            np.zeros((10, 10, 10), np.int16), np.diag([2000.0, 2000.0, 2000.0, 1.0]))))], "coded"),
        "rgb24 nifti": ([("a.nii", _raw_nifti((4, 4, 4), datatype=128, data=b"\1" * 192))], "coded"),
        "pixdim 0, codes 0": ([("a.nii", _raw_nifti((4, 4, 4), pixdim=(0.0, 0.0, 0.0), codes=(0, 0),
                                                    data=b"\0" * 128))], "coded"),
        "truncated nifti.gz": ([("a.nii.gz", _nifti_bytes(_phantom())[:3000])], "coded"),
        "corrupt gzip": ([("a.nii.gz", b"\x1f\x8b" + b"\0" * 200)], "coded"),
        "dcm.gz bomb in zip": ([("s.zip", _zip([("s/a.dcm.gz", _gzip_zeros(5 * 2**30 // 2))],
                                              zipfile.ZIP_STORED))], "coded"),
        "zip bomb member": ([("s.zip", _zip_of_zeros("s/a.dcm", 5 * 2**30 // 2))], "coded"),
        "zip encrypted flag": ([("s.zip", encrypted)], "coded"),
        "zip unknown method": ([("s.zip", unknown_method)], "coded"),
        "zip truncated": ([("s.zip", _zip(slices)[:-2000])], "coded"),
        "zip of 5000 names": ([("s.zip", _zip([(f"n/{i}.dcm", slices[0][1]) for i in range(5000)]))], "coded"),
        "dicom 5 million frames": ([("f.dcm", frames_io.getvalue())], "coded"),
        "dicom nested 5000 deep": ([("n.dcm", nested)], "coded"),
        "study of two patients": ([("s.zip", _zip(slices + [(f"o/{p.name}", p.read_bytes()) for p in other]))],
                                  "coded"),
        "series with two patient ids": ([("s.zip", _zip(mixed_ids))], "coded"),
        "not an image": ([("a.nii", b"hello" * 100)], "coded"),
        "valid: header extension": ([("a.nii.gz", _nifti_bytes(extension))], "ok"),
        "valid: NaN voxels": ([("a.nii.gz", _nifti_bytes(nib.Nifti1Image(nan_data, nan_image.affine)))], "ok"),
        "valid: odd size 37x23x11": ([("a.nii.gz", _nifti_bytes(nib.Nifti1Image(odd_data, odd.affine)))], "ok"),
        "valid: DICOM study zip": ([("s.zip", _zip(slices))], "ok"),
    }


# --- the server and its memory ----------------------------------------------------------------------------------


class MemorySampler(threading.Thread):
    """Peak resident memory of a process tree, sampled every ``every`` seconds."""

    def __init__(self, root: int, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.every, self.peak, self.pids = root, every, 0, {root}
        self.done = threading.Event()

        self.window = 0  # the peak since the last ``window_peak()``

    def run(self) -> None:
        while not self.done.wait(self.every):
            tree = process_tree(self.root)  # one look through /proc per sample
            self.pids |= set(tree)
            used = sum(resident_bytes(pid) for pid in tree)
            self.peak, self.window = max(self.peak, used), max(self.window, used)

    def window_peak(self) -> float:
        """GiB at most since the last call."""
        peak, self.window = self.window, 0
        return round(peak / 2**30, 3)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_job(client: httpx.Client, job_id: str, timeout: float = 900.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in TERMINAL:
            return job
        time.sleep(0.3)
    raise SystemExit(f"job {job_id} did not finish in {timeout} s")


def _slow_clients(port: int, head: bytes, count: int = 40) -> int:
    """``count`` connections that stop inside the request head or body; how many the server let go of."""
    sockets = []
    for index in range(count):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(head[: 20 + index] if index % 2 else head + b"\0" * 100)
        sockets.append(raw)
    closed = 0
    for raw in sockets:
        raw.settimeout(90)
        try:
            while raw.recv(65536):
                pass
            closed += 1
        except OSError:
            pass
        raw.close()
    return closed


def _disconnects(port: int, head: bytes, count: int = 10) -> None:
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(head + b"\0" * 5000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        uploads = hostile_uploads(work)
        data_dir, log_path, port = work / "data", work / "server.log", _free_port()
        env = {**os.environ, "TESSERA_HOME": str(work / "home"), "PYTHONUNBUFFERED": "1"}
        key = subprocess.run([sys.executable, "-m", "app.cli.main", "keys", "create", "--data-dir", str(data_dir),
                              "--name", "probe"], capture_output=True, text=True, cwd=ROOT, env=env,
                             check=True).stdout.strip().splitlines()[-1]
        with log_path.open("w") as log:
            server = subprocess.Popen([sys.executable, "-m", "app.cli.main", "serve", "--port", str(port),
                                       "--data-dir", str(data_dir)], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sampler = MemorySampler(server.pid)
        sampler.start()
        statuses: list[int] = []
        outcomes: dict[str, Any] = {}
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
            jobs: dict[str, str] = {}
            sampler.window_peak()
            for name, (files, _) in uploads.items():  # one at a time: the memory each one costs
                response = client.post("/v1/jobs", files=[("file", (f, b, "application/octet-stream"))
                                                          for f, b in files])
                statuses.append(response.status_code)
                if response.status_code == 202:
                    jobs[name] = response.json()["id"]
                    job = _wait_job(client, jobs[name])
                    outcomes[name] = {"http": 202, "state": job["state"],
                                      "code": (job.get("error") or {}).get("code")}
                else:
                    body = response.json() if response.headers.get("content-type", "").endswith("json") else {}
                    outcomes[name] = {"http": response.status_code, "code": body.get("code")}
                time.sleep(0.2)
                outcomes[name]["peak_rss_gib"] = sampler.window_peak()
            upload_head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: "
                           "multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\nContent-"
                           "Disposition: form-data; name=\"file\"; filename=\"a.nii\"\r\n\r\n").encode()
            _disconnects(port, upload_head)
            let_go = _slow_clients(port, upload_head)
            race = [jobs[n] for n in jobs if outcomes[n]["state"] == "succeeded"][:1]
            race_statuses: list[int] = []
            for raced in race:
                names = [a["name"] for a in client.get(f"/v1/jobs/{raced}").json()["artifacts"]]
                threads = [threading.Thread(target=lambda url=f"/v1/jobs/{raced}/artifacts/{n}": race_statuses.append(
                    client.get(url).status_code)) for n in names * 3]
                for thread in threads:
                    thread.start()
                statuses.append(client.delete(f"/v1/jobs/{raced}").status_code)
                for thread in threads:
                    thread.join()
            statuses += race_statuses
            for url in ("/healthz", "/readyz", "/v1/models", "/v1/jobs"):
                statuses.append(client.head(url).status_code)
            for job_id in jobs.values():
                statuses.append(client.delete(f"/v1/jobs/{job_id}").status_code)
            time.sleep(2)  # the monitor sweeps deleted jobs' files every 0.5 s
        sampler.done.set()
        sampler.join()
        server.terminate()
        server.wait(timeout=90)
        time.sleep(1)
        left_running = [pid for pid in sampler.pids if Path(f"/proc/{pid}").exists()
                        and Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"]
        leaked = [str(p.relative_to(data_dir)) for p in (data_dir / "jobs").rglob("*")]
        log_text = log_path.read_text()
    expected = {name: want for name, (_, want) in uploads.items()}
    wrong = {name: outcome for name, outcome in outcomes.items()
             if (expected[name] == "ok" and outcome.get("state") != "succeeded")
             or (expected[name] == "coded" and (outcome.get("state") == "succeeded" or outcome.get("code") in
                                                (None, "INTERNAL_ERROR")))}
    emit({
        "benchmark": "hostile_probe",
        "inputs": len(uploads),
        "outcomes": outcomes,
        "not_as_expected": wrong,
        "http_5xx": sum(1 for s in statuses if s >= 500),
        "internal_errors": sum(1 for o in outcomes.values() if o.get("code") == "INTERNAL_ERROR"),
        "tracebacks_in_log": log_text.count("Traceback"),
        "slow_clients_let_go": f"{let_go}/40",
        "download_race_statuses": sorted(set(race_statuses)),
        "processes_left_running": len(left_running),
        "files_left_in_jobs_dir": len(leaked),
        "server_tree_peak_rss_gib": round(sampler.peak / 2**30, 3),
        "platform": platform.platform(),
    }, args.output)


if __name__ == "__main__":
    main()
