"""End to end with real parts: DCMTK storescu (the scanner) -> `mriqa serve` -> database verdict.

Every test here runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Alert, Instance, Series, SeriesVerdict
from mriqa_node.phantom import synth_series, write_series
from tests.conftest import storescu
from tests.peers import wait_for

pytestmark = pytest.mark.slow


def series_row(db_url: str, series_uid: str) -> tuple[Series | None, list[SeriesVerdict]]:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            series = s.scalar(select(Series).where(Series.series_uid == series_uid))
            verdicts = list(series.verdicts) if series else []
            return series, verdicts
    finally:
        engine.dispose()


def mriqa_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MRIQA_CONFIG": str(config), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "mriqa_node.cli", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_storescu_series_gets_verdict(db_url: str, node_factory, tmp_path: Path) -> None:
    node = node_factory(db_url)
    files = write_series(synth_series(30, motion=0.8, seed=11), tmp_path / "series")
    storescu(node.port, files)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    series = wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided" and s)
    _, verdicts = series_row(db_url, uid)
    assert series.received_instances == 30 and series.expected_slices == 30
    assert len(verdicts) == 1 and verdicts[0].n_slices == 30
    assert verdicts[0].label in {"non_diagnostic", "diagnostic"}
    assert 0.0 <= verdicts[0].score <= 1.0 and len(verdicts[0].worst_slices) == 3

    # Every instance is in the spool, byte for byte as sent, and in the database.
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        rows = s.scalars(select(Instance).join(Series).where(Series.series_uid == uid)).all()
        assert {r.state for r in rows} == {"scored"}
        assert all(len(r.slices) == 1 for r in rows)
    engine.dispose()
    spool = tmp_path / "spool"
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): f for f in files}
    assert {r.sop_instance_uid for r in rows} == set(sent)
    for r in rows:
        kept = pydicom.dcmread(spool / r.spool_path)
        original = pydicom.dcmread(sent[r.sop_instance_uid])
        assert kept.PixelData == original.PixelData
        assert kept.SOPInstanceUID == r.sop_instance_uid

    status = mriqa_cli(node.config, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert uid in status.stdout and '"state": "decided"' in status.stdout


def test_unannounced_series_completes_after_release(db_url: str, node_factory, tmp_path) -> None:
    node = node_factory(db_url, series={"idle_seconds": 30.0, "release_grace_seconds": 1.0})
    files = write_series(synth_series(12, seed=12, announce_count=False), tmp_path / "s")
    storescu(node.port, files)
    released = time.monotonic()
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    series = wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided" and s)
    # Decided on the release hint, long before the 30 s idle timeout.
    assert time.monotonic() - released < 15
    assert series.expected_slices is None and series.received_instances == 12


def test_refusals_and_bad_input(db_url: str, node_factory, tmp_path: Path) -> None:
    node = node_factory(db_url)
    good = write_series(synth_series(4, size=64, seed=13), tmp_path / "good")

    # Unknown calling AE: association rejected, nothing stored.
    bad_aet = storescu(node.port, good[:1], "INTRUDER", check=False)
    assert bad_aet.returncode != 0
    assert "Rejected" in bad_aet.stderr or "rejected" in bad_aet.stderr.lower()

    # A CT image: no presentation context for its SOP class.
    ct = storescu(node.port, [Path(get_testdata_file("CT_small.dcm"))], check=False)
    assert ct.returncode != 0
    assert re.search(r"no presentation context|no acceptable presentation", ct.stderr, re.I)

    # MR without pixel data: kept (Success), then unscorable with a reason.
    ds = pydicom.dcmread(good[0])
    del ds.PixelData
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.ImagesInAcquisition = 1
    nopix = tmp_path / "nopix.dcm"
    ds.save_as(nopix, enforce_file_format=True)
    storescu(node.port, [nopix])
    uid = str(ds.SeriesInstanceUID)
    wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided")
    _, verdicts = series_row(db_url, uid)
    assert verdicts[-1].label == "unscorable" and verdicts[-1].n_unscorable == 1
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert inst.state == "unscorable" and "pixel" in inst.reason.lower()
        assert s.scalar(select(func.count(Alert.id))) == 0  # unscorable is not an alert
    engine.dispose()

    # The SCP is still alive and well after all that.
    storescu(node.port, good)
    assert node.proc.poll() is None


def test_duplicate_instance_is_idempotent(db_url: str, node_factory, tmp_path: Path) -> None:
    node = node_factory(db_url)
    files = write_series(synth_series(3, size=64, seed=14, announce_count=False), tmp_path / "s")
    storescu(node.port, files)
    storescu(node.port, files)  # the scanner retries the whole series: still Success
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    series = wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided" and s)
    assert series.received_instances == 3


def test_kill9_while_sending_loses_nothing(db_url: str, node_factory, tmp_path: Path) -> None:
    node = node_factory(db_url)
    files = write_series(synth_series(40, seed=15), tmp_path / "s")
    env = {**os.environ, "TCP_NODELAY": "1"}
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "STORESCU", "-aec", "MRIQA", "127.0.0.1", str(node.port),
         *map(str, files)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    acknowledged: list[str] = []
    current = None
    assert sender.stdout is not None
    for line in sender.stdout:  # kill the node once ~15 instances were answered Success
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        if "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            if len(acknowledged) == 15:
                node.kill9()
    sender.wait(30)
    assert 15 <= len(acknowledged) < len(files)

    node.start()  # same config, same spool, same database
    engine = make_engine(db_url)
    with make_sessionmaker(engine)() as s:
        kept = set(s.scalars(select(Instance.sop_instance_uid)))
    engine.dispose()
    for path in acknowledged:
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in kept, f"{path} was answered Success but is not in the database"
        relpath = next((tmp_path / "spool").rglob(f"{sop}.dcm"), None)
        assert relpath is not None, f"{path} was answered Success but is not in the spool"

    storescu(node.port, files)  # the scanner resends the series
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    series = wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided" and s)
    assert series.received_instances == 40
    assert series_row(db_url, uid)[1][-1].n_slices == 40
