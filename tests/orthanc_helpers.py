"""A real Orthanc PACS (Debian ``orthanc`` + ``orthanc-dicomweb``) on a loopback port, with its own configuration
and storage, for the DICOMweb tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.service_helpers import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_FOLDERS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
USER, PASSWORD = "tessera", "s3cret-for-tests"


def dicomweb_plugin() -> Path | None:
    for folder in PLUGIN_FOLDERS:
        found = sorted(folder.glob("libOrthancDicomWeb.so*"))
        if found:
            return found[0]
    return None


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() and dicomweb_plugin() is not None


@dataclass
class Orthanc:
    folder: Path
    port: int = 0
    process: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.port = self.port or free_port()
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "tessera-tests", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
            "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(dicomweb_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("a")
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"Orthanc exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.client().get("/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"Orthanc not up after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / "orthanc.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(USER, PASSWORD), timeout=30)

    def store(self, files: list[Path]) -> str:
        """DICOM files stored through Orthanc's REST API; the StudyInstanceUID they belong to."""
        studies = set()
        with self.client() as client:
            for path in files:
                response = client.post("/instances", content=path.read_bytes())
                assert response.status_code == 200, response.text
                studies.add(response.json()["ParentStudy"])
            (study,) = studies
            return str(client.get(f"/studies/{study}").json()["MainDicomTags"]["StudyInstanceUID"])

    def series_of(self, study_uid: str) -> list[dict]:
        """QIDO-RS series of a study (DICOM JSON)."""
        with self.client() as client:
            response = client.get(f"/dicom-web/studies/{study_uid}/series")
            return response.json() if response.status_code == 200 else []
