"""Several receiver processes on one port ([dicom] receivers): real `mriqa serve`, four DCMTK
storescu scanners at once, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Instance, Series
from mriqa_node.phantom import synth_series, write_series
from tests.conftest import DCMTK_ENV, dcmtk
from tests.peers import wait_for

pytestmark = pytest.mark.slow
SCANNERS = [f"SCANNER{i}" for i in range(1, 5)]


def send_at_once(port: int, groups: list[list[Path]]) -> None:
    procs = [
        subprocess.Popen([dcmtk("storescu"), "-aet", aet, "-aec", "MRIQA", "127.0.0.1", str(port),
                          *map(str, files)], env=DCMTK_ENV, stderr=subprocess.PIPE, text=True)
        for aet, files in zip(SCANNERS, groups, strict=False)
    ]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]


def counts(db_url: str) -> tuple[int, int, int]:
    """Instance rows, distinct SOP Instance UIDs, series decided."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            rows = s.scalar(select(func.count(Instance.id)))
            uids = s.scalar(select(func.count(func.distinct(Instance.sop_instance_uid))))
            decided = s.scalar(select(func.count(Series.id)).where(Series.state == "decided"))
            return rows or 0, uids or 0, decided or 0
    finally:
        engine.dispose()


def receiver_pids(log: str) -> dict[int, int]:
    """The latest pid of each receiver process, from the node's log."""
    return {
        int(k): int(p) for k, p in re.findall(r"receiver process (\d+) started \(pid (\d+)\)", log)
    }


def test_receiver_processes_share_the_port_and_keep_everything(
    db_url: str, node_factory, tmp_path: Path
) -> None:
    node = node_factory(db_url, dicom={"receivers": 2, "allowed_calling_aets": SCANNERS})
    wait_for(lambda: node.log().count("DICOM SCP MRIQA listening") == 2, timeout=60,
             what="receiver process 1 listening beside the main one")  # fmt: skip
    groups = [write_series(synth_series(8, size=64, seed=80 + i), tmp_path / f"s{i}")
              for i in range(4)]  # fmt: skip
    send_at_once(node.port, groups)
    # The release response waited for the rows: everything is in once, and the main
    # process's worker (woken over loopback by the other receiver) decides every series.
    assert counts(db_url)[:2] == (32, 32)
    wait_for(lambda: counts(db_url)[2] == 4, timeout=60, what="four series decided")
    assert (tmp_path / "spool" / ".journal" / "receiver-1").is_dir()  # the other one's journal

    # A receiver process that dies is started again, and the port keeps serving meanwhile.
    old = receiver_pids(node.log())[1]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: receiver_pids(node.log()).get(1, old) != old, timeout=30,
             what="receiver process 1 restarted")  # fmt: skip
    more = [write_series(synth_series(8, size=64, seed=90 + i), tmp_path / f"t{i}")
            for i in range(4)]  # fmt: skip
    send_at_once(node.port, more)
    assert counts(db_url)[:2] == (64, 64)
    wait_for(lambda: counts(db_url)[2] == 8, timeout=60, what="eight series decided")
    spool = tmp_path / "spool"
    for files in groups + more:
        for path in files[:2]:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert next(spool.rglob(f"{uid}.dcm"), None) is not None
