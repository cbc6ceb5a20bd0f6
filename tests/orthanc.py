"""A real Orthanc (Debian package `orthanc`) as the PACS in tests: its own temporary storage,
index and config, started on 127.0.0.1 and stopped by its own PID (never the system service)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from tests.peers import DCMTK_ENV, stop_process

ORTHANC = "/usr/sbin/Orthanc"
AET = "ORTHANC"


class Orthanc:
    def __init__(self, workdir: Path, dicom_port: int, http_port: int,
                 modalities: dict[str, tuple[str, str, int]] | None = None) -> None:  # fmt: skip
        """``modalities``: name -> (AE title, host, port) of the peers Orthanc may C-MOVE to."""
        self.workdir = Path(workdir)
        self.dicom_port, self.http_port = dicom_port, http_port
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "mriqa-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": AET,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([ORTHANC, str(config_path)], env=DCMTK_ENV, stdout=self._log,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc did not start:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=30)
            self._log.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST -------------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> dict[str, Any]:
        response = httpx.post(f"{self.url}/instances", content=Path(path).read_bytes(), timeout=30)
        response.raise_for_status()
        return response.json()

    def sop_instance_uids(self, series_uid: str | None = None) -> list[str]:
        """SOP Instance UIDs held (optionally of one series), one per stored instance."""
        uids = []
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            if series_uid is None or tags.get("SeriesInstanceUID") == series_uid:
                uids.append(tags["SOPInstanceUID"])
        return uids

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file of an instance, as Orthanc keeps it."""
        found = httpx.post(f"{self.url}/tools/lookup", content=sop_instance_uid, timeout=30).json()
        (instance,) = [f for f in found if f["Type"] == "Instance"]
        return httpx.get(f"{self.url}/instances/{instance['ID']}/file", timeout=30).content
