"""Real peers for the tests and the benchmarks (bench/_common.py builds on this): free ports,
bounded waits, child processes stopped by their own PID, DCMTK, throwaway PostgreSQL
databases, and `mriqa serve` as a child process. No pytest here; everything on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# DCMTK (storescu, storescp, echoscu and Orthanc's DICOM layer) reads this and turns Nagle off;
# without it every instance stalls ~44 ms on the peer's delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll until ``predicate()`` is truthy; returns its value (TimeoutError after timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen | None, grace: float = 20.0) -> None:
    """SIGTERM a process we started (by its own PID), SIGKILL it if it does not exit in time."""
    if proc is not None and proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def dcmtk_tool(name: str) -> str | None:
    """The path of a DCMTK tool, None when the dcmtk package is not installed."""
    return shutil.which(name)


def postgres_available() -> bool:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except psycopg.Error:
        return False


@contextmanager
def throwaway_postgres(prefix: str = "mriqa_test") -> Iterator[str]:
    """A fresh, empty database on the local server (its SQLAlchemy URL), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


NODE_LOGS: list[Path] = []  # every node child process's log, for the suite's patient-data scan


class NodeProcess:
    """`mriqa serve` (or ``start_args``) as a real child process, stopped by its own PID."""

    def __init__(self, config: Path, port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.config, self.port, self.log_path = config, port, log_path
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.start_args = ["serve"]
        self._log = None

    def start(self, timeout: float = 60.0) -> NodeProcess:
        env = {**os.environ, "MRIQA_CONFIG": str(self.config), "TF_CPP_MIN_LOG_LEVEL": "2",
               **self.env}  # fmt: skip
        self._log = self.log_path.open("ab")
        NODE_LOGS.append(self.log_path)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mriqa_node.cli", *self.start_args], env=env,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.config.parent,
        )  # fmt: skip

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited early ({self.proc.returncode}):\n{self.log()}")
            return "DICOM SCP" in self.log() and port_open(self.port)

        try:
            wait_for(listening, timeout, 0.1, "the node listening")
        except TimeoutError:
            raise TimeoutError(f"node did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None


class FlakyReceiver(ThreadingHTTPServer):
    """Answers 500 to the first two requests, then 200; keeps every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FlakyReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            status = 500 if len(self.server.requests) < 2 else 200
            self.server.requests.append((dict(self.headers), body, status))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass
