"""The receive journal (Success = its record synced) and the batches applied behind it.

The journal is exercised directly (group commit, torn tails, failed writes, segments), then
with the intake services on both databases: what it holds after a crash becomes files and
rows exactly once, and a file the crash left unsynced is rewritten from the journal.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from mriqa_node.db.models import Instance, Series
from mriqa_node.dicom.headers import parse_header
from mriqa_node.journal import Journal
from mriqa_node.phantom import synth_series
from mriqa_node.services.receiving import JournaledIntake, replay
from mriqa_node.spool import SpoolError
from tests.conftest import Env


def test_records_come_back_whole_and_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    payloads = [os.urandom(n) for n in (0, 1, 1000, 300_000)]
    for i, payload in enumerate(payloads):
        journal.append({"i": i}, payload)
    records = list(journal.read(journal.start))
    assert [r.meta["i"] for r in records] == [0, 1, 2, 3]
    assert [r.payload for r in records] == payloads
    assert records[-1].end == journal.synced()


@pytest.mark.parametrize("cache_bytes", [0, 9_000, 2**20])  # none, some, all in memory
def test_reads_from_memory_and_from_disk_agree(tmp_path: Path, cache_bytes: int) -> None:
    journal = Journal(tmp_path / "j", segment_bytes=10_000, cache_bytes=cache_bytes)
    payloads = [os.urandom(4000) for _ in range(9)]
    ends = [journal.append({"i": i}, p) for i, p in enumerate(payloads)]
    assert [r.payload for r in journal.read(journal.start)] == payloads  # across segments
    journal.release(ends[3])
    assert [r.meta["i"] for r in journal.read(ends[3])] == [4, 5, 6, 7, 8]
    assert [r.meta["i"] for r in journal.read(ends[3], ends[6])] == [4, 5, 6]
    more = journal.append({"i": 9}, os.urandom(10))  # room again once released
    assert [r.meta["i"] for r in journal.read(ends[8])] == [9] and journal.synced() == more


def test_concurrent_appends_share_one_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: eight associations appending at once while a sync takes 50 ms cost two
    or three syncs, not eight, and each append returns only once a sync covered it."""
    journal = Journal(tmp_path / "j")
    syncs: list[tuple[int, int]] = []
    real = os.fdatasync

    def slow_sync(fd: int) -> None:
        real(fd)
        time.sleep(0.05)
        syncs.append((time.monotonic_ns(), fd))

    monkeypatch.setattr(os, "fdatasync", slow_sync)
    start = threading.Barrier(8)
    returned: list[int] = []

    def append(i: int) -> None:
        start.wait()
        journal.append({"i": i}, b"x" * 10_000)
        returned.append(time.monotonic_ns())

    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(syncs) <= 3, syncs
    assert min(returned) >= syncs[0][0]  # nobody returned before the first sync ended
    assert len(list(journal.read(journal.start))) == 8


def test_a_torn_tail_is_dropped_and_what_came_before_kept(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    ends = [journal.append({"i": i}, os.urandom(5000))[1] for i in range(3)]
    journal.close()
    segment = next((tmp_path / "j").glob("*.journal"))
    data = bytearray(segment.read_bytes())
    # A crash mid-write: the last record is half there (the rest still zeros), one byte wrong.
    data[ends[1] + 3000 : ends[2]] = bytes(ends[2] - ends[1] - 3000)
    data[ends[1] + 100] ^= 0xFF
    segment.write_bytes(bytes(data))
    after = Journal(tmp_path / "j")  # the next process
    assert after.start[0] == int(segment.stem)  # replay begins at the old segment
    assert [r.meta["i"] for r in after.read(after.start)] == [0, 1]
    # A flipped byte inside a complete record is caught by its checksum.
    data[200] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert [r.meta["i"] for r in after.read(after.start)] == []
    after.close()


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path / "j")
    journal.append({"i": 0}, b"a" * 100)
    real = os.pwritev

    def half_then_full(fd: int, views: list, offset: int) -> int:
        real(fd, [bytes(views[0])[:7]], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwritev", half_then_full)
    with pytest.raises(OSError):
        journal.append({"i": 1}, b"b" * 100)
    monkeypatch.setattr(os, "pwritev", real)
    journal.append({"i": 2}, b"c" * 100)
    assert [r.meta["i"] for r in journal.read(journal.start)] == [0, 2]


def test_segments_rotate_and_only_applied_ones_are_deleted(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j", segment_bytes=10_000)
    ends = [journal.append({"i": i}, b"x" * 4000) for i in range(10)]
    assert len(journal.segments()) >= 4
    journal.release(ends[5])
    left = journal.segments()
    assert min(left) == ends[5][0]  # the segment holding unapplied records stays
    assert [r.meta["i"] for r in journal.read((min(left), 0))][-4:] == [6, 7, 8, 9]
    journal.release(journal.synced())
    current = journal.synced()[0]
    assert min(journal.segments()) == current  # never the one being written (nor the spare)


def test_a_recycled_segment_ends_where_its_new_records_end(tmp_path: Path) -> None:
    """An applied segment becomes the next one without a zero fill; its old records (with
    their old segment number) are not read as new ones, in this process or after a crash."""
    journal = Journal(tmp_path / "j", segment_bytes=20_000)
    ends = [journal.append({"i": i}, os.urandom(6000)) for i in range(3)]
    journal.release(ends[2])  # nothing before segment 1 yet: nothing recycled
    journal.append({"i": 3}, os.urandom(6000))  # segment 2
    journal.release(journal.synced())  # segment 1 applied: recycled as segment 3
    assert journal._spare is not None and journal._spare[0] == 3
    for i in range(4, 8):
        journal.append({"i": i}, os.urandom(100 if i == 7 else 6000))
    assert journal.synced()[0] == 3  # writing into the recycled file
    assert [r.meta["i"] for r in journal.read((3, 0))] == [6, 7]
    journal.close()
    after = Journal(tmp_path / "j")  # a crash: replay reads the files alone
    assert [r.meta["i"] for r in after.read(after.start)][-2:] == [6, 7]
    after.close()


# -- with the intake services (SQLite and PostgreSQL) ---------------------------------------------


def encode(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def accept_all(receiving: JournaledIntake, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        receiving.accept(parse_header(ds, ds.file_meta.TransferSyntaxUID), encode(ds), "SCANNER1")


def count(env: Env, model=Instance) -> int:
    with env.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.parametrize("batch", [7, 64])  # duplicates in later batches, in the same one
def test_applied_in_batches_once_each_with_files(env: Env, tmp_path: Path, batch: int) -> None:
    receiving = JournaledIntake(env.intake, Journal(tmp_path / "journal" / "r0"), batch=batch)
    datasets = synth_series(20, size=32, seed=90)
    accept_all(receiving, datasets)
    accept_all(receiving, datasets[:3])  # the scanner resends three: duplicates
    assert count(env) == 0  # Success came from the journal; rows are behind it
    assert receiving.apply_pending()
    assert count(env) == 20
    with env.session() as s:
        series = s.scalar(select(Series))
        assert series.received_instances == 20
        for row in s.scalars(select(Instance)):
            assert (
                pydicom.dcmread(env.spool.path(row.spool_path)).SOPInstanceUID
                == row.sop_instance_uid
            )
    assert receiving.backlog()["bytes"] == 0


def test_a_crash_before_the_rows_is_repaired_at_start(env: Env, tmp_path: Path) -> None:
    """Acknowledged, then killed before the batch: the next start applies the journal; a
    spool file the crash left unsynced (here: garbage, no row) is rewritten from it."""
    root = tmp_path / "journal"
    receiving = JournaledIntake(env.intake, Journal(root / "receiver-0"))
    datasets = synth_series(5, size=32, seed=91)
    accept_all(receiving, datasets)
    receiving.journal.close()  # kill -9: nothing applied
    torn = env.spool.path(env.spool.relpath(str(datasets[0].StudyInstanceUID),
                                            str(datasets[0].SeriesInstanceUID),
                                            str(datasets[0].SOPInstanceUID)))  # fmt: skip
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"\0" * 100)
    assert replay(env.intake, [root / "receiver-0"]) == 5
    assert count(env) == 5
    assert pydicom.dcmread(torn).PixelData == datasets[0].PixelData
    assert not list(root.rglob("*.journal"))
    assert replay(env.intake, [root / "receiver-0"]) == 0  # and again: nothing twice


def test_while_the_database_is_away_instances_are_refused_not_lost(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    receiving = JournaledIntake(env.intake, Journal(tmp_path / "journal" / "r0"))
    datasets = synth_series(4, size=32, seed=92)
    accept_all(receiving, datasets[:2])
    real = env.intake.apply_batch

    def away(*args, **kwargs):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(env.intake, "apply_batch", away)
    assert not receiving.apply_pending()
    with pytest.raises(SpoolError, match="not being kept"):
        accept_all(receiving, datasets[2:3])
    monkeypatch.setattr(env.intake, "apply_batch", real)
    assert receiving.apply_pending() and receiving.failing is None
    accept_all(receiving, datasets[2:])
    assert receiving.apply_pending()
    assert count(env) == 4


def test_one_process_per_journal(tmp_path: Path) -> None:
    """A receiver restarted while its predecessor still holds the journal waits, then gives
    up with a clear error, rather than writing beside it."""
    from mriqa_node import journal as journal_module

    first = Journal(tmp_path / "j")
    with pytest.raises(journal_module.JournalBusy, match="held by another process"):
        journal_module._own(tmp_path / "j", wait=0.3)
    first.close()
    Journal(tmp_path / "j").close()  # free again once the holder is gone
