"""Shared fixtures: both database engines, the services on them (``env``), a tiny model artifact,
real node processes, DCMTK (the peers themselves are in tests/peers.py, shared with bench/)."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db import migrate
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.domain.completion import CompletionRule
from mriqa_node.services.intake import Intake
from mriqa_node.services.scoring import WorkQueue
from mriqa_node.services.series import SeriesService
from mriqa_node.spool import Spool
from tests import phi
from tests.peers import (
    DCMTK_ENV,
    NODE_LOGS,
    FlakyReceiver,
    NodeProcess,
    dcmtk_tool,
    free_port,
    postgres_available,
    throwaway_postgres,
)

REPO = Path(__file__).resolve().parents[1]
IN_PROCESS_LOG = Path(tempfile.gettempdir()) / f"mriqa-tests-{os.getpid()}.log"
_LOG_HANDLER = pytest.StashKey[logging.Handler]()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Keep every record the node logs in this process (INFO and up) for the scan below."""
    handler = logging.FileHandler(IN_PROCESS_LOG, mode="w", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    session.config.stash[_LOG_HANDLER] = handler
    for name in ("mriqa_node", "training"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any log the node wrote holds a patient name or ID of the test data."""
    handler = session.config.stash[_LOG_HANDLER]
    logging.getLogger().removeHandler(handler)
    handler.close()
    findings = phi.scan([IN_PROCESS_LOG, *NODE_LOGS], phi.identifiers())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if findings:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        lines = [f"{f.log}:{f.line}: {f.identifier!r}" for f in findings[:20]]
        message = "patient names or IDs in the node's logs:\n" + "\n".join(lines)
    else:
        message = f"no patient names or IDs in {1 + len(set(NODE_LOGS))} logs of the node"
        IN_PROCESS_LOG.unlink(missing_ok=True)
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(message, red=bool(findings))


SHARED_INTAKE = REPO.parent / "shared" / "data" / "intake"
TINY_WIDTHS = (4, 8, 8, 16)  # same architecture as the paper's ConvNet, a fraction of the cost
IDLE, GRACE = 5.0, 1.0  # the env fixture's completion rule: idle and release-grace seconds


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    with throwaway_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'mriqa.db'}"
        return
    with postgres_database() as url:
        yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@dataclass
class Env:
    """The services on one fresh database, built directly (no DICOM network, no worker)."""

    url: str
    sessions: sessionmaker[Session]
    spool: Spool
    intake: Intake
    series: SeriesService
    queue: WorkQueue

    def session(self) -> Session:
        return self.sessions()


@pytest.fixture
def env(db_url: str, tmp_path: Path) -> Iterator[Env]:
    engine = make_engine(db_url)
    migrate.upgrade(engine)
    sessions = make_sessionmaker(engine)
    spool = Spool(tmp_path / "spool", fsync=False)
    yield Env(
        db_url,
        sessions,
        spool,
        Intake(sessions, spool),
        SeriesService(sessions, CompletionRule(IDLE, GRACE)),
        WorkQueue(sessions, claim_seconds=30.0),
    )
    engine.dispose()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised (untrained) ConvNet artifact at the node's 512x512 input."""
    from mriqa_node.ml.artifact import untrained_convnet_artifact

    directory = tmp_path_factory.mktemp("model") / "convnet-tiny"
    untrained_convnet_artifact(directory, widths=TINY_WIDTHS)
    return directory


def write_config(path: Path, port: int, db_url: str, model: Path, **sections: dict | list) -> Path:
    """A node config file; ``sections`` override keys, e.g. series={"idle_seconds": 1}, or
    give a list section whole, e.g. webhooks=[{"name": ..., "url": ...}]."""
    base = {
        "dicom": {"port": port, "allowed_calling_aets": ["SCANNER1", "STORESCU"]},
        "storage": {"spool_dir": str(path.parent / "spool"), "database_url": db_url},
        "series": {"idle_seconds": 2.0, "release_grace_seconds": 1.0},
        "model": {"path": str(model)},
        "worker": {"poll_seconds": 0.1},
        "console": {"port": free_port()},
    }
    for name, values in sections.items():
        if isinstance(values, list):
            base[name] = values
        else:
            base.setdefault(name, {}).update(values)
    path.write_text(tomli_w.dumps(base))
    return path


@pytest.fixture
def node_factory(tmp_path: Path, model_dir: Path) -> Iterator:
    """Start real nodes: ``node_factory(db_url, **sections)``; all are stopped at teardown."""
    started: list[NodeProcess] = []

    def start(db_url: str, **sections: dict) -> NodeProcess:
        port = free_port()
        config = write_config(tmp_path / "node.toml", port, db_url, model_dir, **sections)
        node = NodeProcess(config, port, tmp_path / "node.log").start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def dcmtk(tool: str) -> str:
    path = dcmtk_tool(tool)
    if path is None:
        pytest.skip(f"DCMTK {tool} not installed (Debian package dcmtk)")
    return path


def storescu(port: int, files: list[Path], aet: str = "STORESCU", *extra: str,
             check: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    """DCMTK's storescu as the scanner (Nagle off, as DCMTK needs)."""
    cmd = [dcmtk("storescu"), "-v", "-aet", aet, "-aec", "MRIQA", *extra,
           "127.0.0.1", str(port), *map(str, files)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator:
    """A real Orthanc on free ports, stopped at teardown; `orthanc.modalities` may be set
    before `orthanc.start()` (it is started here with none; restart to change them)."""
    from tests.orthanc import ORTHANC, Orthanc

    if not Path(ORTHANC).is_file():
        pytest.skip(f"{ORTHANC} missing: apt-get install orthanc")
    server = Orthanc(tmp_path / "orthanc", free_port(), free_port())
    yield server
    server.stop()


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A throwaway key and certificate for 127.0.0.1 (openssl)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


@pytest.fixture
def receiver() -> Iterator[FlakyReceiver]:
    """A webhook receiver on a free port (fails twice, then accepts)."""
    server = FlakyReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
