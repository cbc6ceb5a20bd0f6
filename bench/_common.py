"""Shared helpers for the benchmarks: the peers of the tests (tests/peers.py: ports, bounded
waits, processes stopped by their own PID, throwaway PostgreSQL), the servers compared here
(the node, storescp, Orthanc, a bare pynetdicom SCP), phantom data and plain-text tables.

Everything listens on and talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import tomli_w

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import (  # noqa: E402
    DCMTK_ENV,
    HOST,
    NodeProcess,
    dcmtk_tool,
    free_port,
    port_open,
    postgres_available,
    stop_process,
    throwaway_postgres,
    wait_for,
)

# Re-exported for the bench scripts: free_port, postgres_available (and HOST, DCMTK_ENV).
__all__ = ["DCMTK_ENV", "HOST", "free_port", "postgres_available"]
PYTHON = sys.executable
NODE_AET = "MRIQA"
CALLING_AET = "STORESCU"
NODE_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}


class BenchError(RuntimeError):
    """A benchmark prerequisite is missing or a server did not come up."""


# -- small utilities ----------------------------------------------------------------------------


def tool(name: str) -> str:
    path = dcmtk_tool(name)
    if path is None:
        raise BenchError(f"{name} not found (Debian package dcmtk)")
    return path


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    try:
        return wait_for(predicate, timeout, interval, what)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def echo_ok(port: int, called_aet: str, calling_aet: str = CALLING_AET) -> bool:
    """One DCMTK echoscu: the server is really accepting associations."""
    try:
        result = subprocess.run(
            [tool("echoscu"), "-aet", calling_aet, "-aec", called_aet, HOST, str(port)],
            capture_output=True, env=DCMTK_ENV, timeout=10,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return result.returncode == 0


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown-compatible table (pastes straight into docs/benchmarks.md)."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPU(s), {cpu}, Python {platform.python_version()},"
        f" load average {load:.2f} at start"
    )


# -- data -----------------------------------------------------------------------------------------


def make_series(
    out_dir: Path,
    n_series: int,
    n_slices: int,
    announce_count: bool = True,
    seed0: int = 100,
    size: int = 512,
) -> list[list[Path]]:
    """Phantom series written as files (distinct UIDs per series): [[IM0001.dcm, ...], ...]."""
    from mriqa_node.phantom import synth_series, write_series

    series = []
    for k in range(n_series):
        datasets = synth_series(
            n_slices,
            size=size,
            motion=0.3 * (k % 3),
            seed=seed0 + k,
            announce_count=announce_count,
            series_number=k + 1,
        )
        series.append(write_series(datasets, out_dir / f"series{k:03d}"))
    return series


# -- processes -----------------------------------------------------------------------------------


class Server:
    """A child process stopped by its own PID (SIGTERM, then SIGKILL)."""

    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def _popen(self, cmd: list[str], env: dict[str, str]) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _alive_check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited early ({self.proc.returncode}):\n{self.log()}")

    def wait_echo(self, called_aet: str, timeout: float = 60.0) -> None:
        def ready() -> bool:
            self._alive_check()
            return port_open(self.port) and echo_ok(self.port, called_aet)

        wait_until(ready, timeout, f"{self.name} to answer C-ECHO", interval=0.1)

    def stop(self) -> None:
        stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class NodeServer(Server):
    """`mriqa serve` as a subprocess, configured by a TOML file written here."""

    name = "node"

    def __init__(self, workdir: Path, db_url: str, **sections: dict[str, object]) -> None:
        super().__init__(workdir)
        self.db_url = db_url
        base: dict[str, dict[str, object]] = {
            "dicom": {
                "ae_title": NODE_AET,
                "host": HOST,
                "port": self.port,
                "allowed_calling_aets": [CALLING_AET, *(f"SCANNER{i}" for i in range(1, 17))],
            },
            "storage": {
                "spool_dir": str(workdir / "spool"),
                "database_url": db_url,
                "fsync": True,
            },
            "logging": {"level": "INFO"},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.config = base
        self.config_path = workdir / "node.toml"
        self.config_path.write_text(tomli_w.dumps(base))

    def start(self, timeout: float = 120.0, args: Sequence[str] = ("serve",)) -> NodeServer:
        process = NodeProcess(self.config_path, self.port, self.log_path, env=NODE_ENV)
        process.start_args = list(args)
        try:
            process.start(timeout)
        except (RuntimeError, TimeoutError) as exc:
            process.stop()
            raise BenchError(str(exc)) from None
        self.proc, self._log = process.proc, process._log
        self.wait_echo(NODE_AET)
        return self


class StoreSCPServer(Server):
    """DCMTK storescp writing every instance to a directory."""

    name = "storescp"
    aet = "STORESCP"

    def start(self) -> StoreSCPServer:
        out = self.workdir / "out"
        out.mkdir(exist_ok=True)
        # +xa: accept every supported transfer syntax (uncompressed preferred, as the default).
        cmd = [tool("storescp"), "-aet", self.aet, "+xa", "--output-directory", str(out),
               str(self.port)]  # fmt: skip
        self._popen(cmd, DCMTK_ENV)
        self.wait_echo(self.aet)
        return self


ORTHANC = "/usr/sbin/Orthanc"


class OrthancServer(Server):
    """Orthanc with its own throwaway storage and index, not the system service."""

    name = "orthanc"
    aet = "ORTHANC"

    def start(self, timeout: float = 60.0) -> OrthancServer:
        if not Path(ORTHANC).is_file():
            raise BenchError(f"{ORTHANC} missing: apt-get install -y orthanc")
        self.http_port = free_port()
        config = {
            "Name": "mriqa-bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "LogExportedResources": False,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self._popen([ORTHANC, str(config_path)], DCMTK_ENV)
        wait_until(self._http_ready, timeout, "Orthanc's HTTP /system", interval=0.1)
        self.wait_echo(self.aet)
        return self

    def _http_ready(self) -> bool:
        import urllib.error
        import urllib.request

        self._alive_check()
        try:
            url = f"http://{HOST}:{self.http_port}/system"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def instance_count(self) -> int:
        import urllib.request

        url = f"http://{HOST}:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(json.load(resp)["CountInstances"])


class BarePynetdicomServer(Server):
    """pynetdicom alone: an AE whose C-STORE handler returns Success without looking."""

    name = "pynetdicom"
    aet = "BARE"

    def __init__(self, workdir: Path, poll_ms: float | None = None, processes: int = 1) -> None:
        super().__init__(workdir)
        self.poll_ms = poll_ms  # the DUL reactor's idle sleep; None: pynetdicom's 1 ms
        self.processes = processes  # on one port with SO_REUSEPORT, as the node's receivers

    def start(self) -> BarePynetdicomServer:
        script = Path(__file__).with_name("_bare_scp.py")
        poll = "-" if self.poll_ms is None else str(self.poll_ms)
        self._popen([PYTHON, str(script), self.aet, HOST, str(self.port), poll,
                     str(self.processes)], NODE_ENV)  # fmt: skip
        self.wait_echo(self.aet)
        return self


# -- DCMTK storescu ------------------------------------------------------------------------------


def storescu(port: int, called_aet: str, files: Sequence[Path], timeout: float = 300.0) -> float:
    """Send all files in one association; returns the wall-clock seconds storescu took."""
    cmd = [tool("storescu"), "-aet", CALLING_AET, "-aec", called_aet, HOST, str(port),
           *map(str, files)]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise BenchError(f"storescu failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def storescu_parallel(port: int, called_aet: str, groups: Sequence[Sequence[Path]],
                      timeout: float = 300.0) -> float:  # fmt: skip
    """One storescu process per group, all started at once (a scanner each, with their own
    calling AE titles SCANNER1..N); the wall-clock seconds from the first start to the last
    exit."""
    t0 = time.perf_counter()
    cmds = [[tool("storescu"), "-aet", f"SCANNER{i + 1}", "-aec", called_aet, HOST, str(port),
             *map(str, files)] for i, files in enumerate(groups)]  # fmt: skip
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=DCMTK_ENV) for cmd in cmds]  # fmt: skip
    failures = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"storescu failed ({proc.returncode}):\n{err[-2000:]}")
    elapsed = time.perf_counter() - t0
    if failures:
        raise BenchError("\n".join(failures))
    return elapsed


# -- PostgreSQL ----------------------------------------------------------------------------------


class SqliteDb:
    """A SQLite database file in a work directory, used like ThrowawayPostgres (a context)."""

    def __init__(self, workdir: Path) -> None:
        self.url = f"sqlite:///{workdir / 'mriqa.db'}"

    def __enter__(self) -> SqliteDb:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class ThrowawayPostgres:
    """A fresh database on the local server (``url``), dropped (WITH FORCE) on exit."""

    def __init__(self, prefix: str = "mriqa_bench") -> None:
        self._database = throwaway_postgres(prefix)
        self.url = ""

    def __enter__(self) -> ThrowawayPostgres:
        self.url = self._database.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._database.__exit__(*exc)
