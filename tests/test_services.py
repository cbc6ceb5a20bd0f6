"""Services on real databases (SQLite and PostgreSQL): intake, series life cycle, work queue.

The services are built directly (no DICOM network): what the SCP and the worker call is
called here, and the database is inspected afterwards.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

from mriqa_node.config import load_config
from mriqa_node.db.models import (
    Alert,
    Event,
    Instance,
    ModelVersion,
    Series,
    SeriesVerdict,
    SliceScore,
    Study,
)
from mriqa_node.db.sql import now_utc
from mriqa_node.dicom.headers import parse_header
from mriqa_node.domain.completion import CompletionRule
from mriqa_node.domain.records import InstanceHeader
from mriqa_node.domain.verdict import SeriesPolicy
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from mriqa_node.services.intake import Intake, StoreOutcome
from mriqa_node.services.scoring import Claim, InstanceResult, WorkQueue
from mriqa_node.services.series import SeriesService
from mriqa_node.spool import TMP_SUFFIX, Spool
from tests.conftest import GRACE, IDLE, Env

T = TypeVar("T")
HOUR = timedelta(hours=1)
MODEL_META = {
    "name": "hand-made",
    "version": "1",
    "sha256": "ab" * 32,
    "task": "binary",
    "class_names": ["non_diagnostic", "diagnostic"],
    "policy": SeriesPolicy(slice_threshold=0.4, series_threshold=0.5).as_dict(),
}


@pytest.fixture(autouse=True)
def _no_mriqa_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config(None, ...) also reads MRIQA_* variables: keep the caller's out."""
    for key in [k for k in os.environ if k.startswith("MRIQA_")]:
        monkeypatch.delenv(key)


def encode(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def store(env: Env, ds: pydicom.Dataset, aet: str | None = "SCANNER1") -> StoreOutcome:
    return env.intake.store(parse_header(ds, ds.file_meta.TransferSyntaxUID), encode(ds), aet)


def series_of(env: Env, uid: str) -> Series:
    with env.session() as s:
        return s.scalar(select(Series).where(Series.series_uid == uid))


def events(env: Env, uid: str, kind: str | None = None) -> list[Event]:
    with env.session() as s:
        q = select(Event).where(Event.series_uid == uid).order_by(Event.id)
        if kind:
            q = q.where(Event.kind == kind)
        return list(s.scalars(q))


def verdicts(env: Env, uid: str) -> list[SeriesVerdict]:
    with env.session() as s:
        return list(
            s.scalars(
                select(SeriesVerdict)
                .join(Series)
                .where(Series.series_uid == uid)
                .order_by(SeriesVerdict.id)
            )
        )


def score_all(env: Env, p: float, worker: str = "host:1:a", model_id: int | None = None) -> set:
    """Claim everything pending and record P(non-diagnostic) = p for each frame."""
    model_id = model_id or env.queue.model_version_id(MODEL_META)
    claims = env.queue.claim(worker, 1000)
    results = [InstanceResult(c, [[p, 1.0 - p]], [float(c.instance_id)]) for c in claims]
    return env.queue.record(worker, model_id, results)


def part_files(spool: Spool) -> list[Path]:
    return [p for p in spool.root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def later(env: Env, uid: str, seconds: float):
    return series_of(env, uid).last_received_at + timedelta(seconds=seconds)


def fake_header(series_uid: str, study_uid: str, n: int) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid=generate_uid(),
        series_uid=series_uid,
        study_uid=study_uid,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        instance_number=n,
    )


def register_fake_series(env: Env, n: int) -> str:
    """n instance rows (no files: the queue never reads them) in a new series."""
    series_uid, study_uid = generate_uid(), generate_uid()
    for i in range(n):
        h = fake_header(series_uid, study_uid, i + 1)
        env.intake.register(h, f"{study_uid}/{series_uid}/{h.sop_instance_uid}.dcm", 10, None)
    return series_uid


def run_concurrently(calls: list[Callable[[], T]], timeout: float = 60.0) -> list[T]:
    """Start all calls at the same moment in threads; their results, in order."""
    barrier = threading.Barrier(len(calls))
    results: list[T | None] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = calls[i]()
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def claim_until_empty(queue: WorkQueue, worker: str) -> list[int]:
    got: list[int] = []
    while claims := queue.claim(worker, 3):
        got += [c.instance_id for c in claims]
    return got


# -- intake --------------------------------------------------------------------------------------


def test_store_writes_the_file_and_the_rows(env: Env) -> None:
    ds = synth_series(3, size=64, seed=21)[0]
    data = encode(ds)
    assert store(env, ds) is StoreOutcome.stored

    with env.session() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
        assert inst is not None and inst.state == "pending"
        assert inst.sop_class_uid == ds.SOPClassUID
        assert inst.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
        assert inst.instance_number == 1 and inst.frames == 1 and inst.size_bytes == len(data)
        assert (
            inst.spool_path
            == f"{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        )
        series = inst.series
        assert series.series_uid == ds.SeriesInstanceUID and series.calling_aet == "SCANNER1"
        assert (series.received_instances, series.received_slices) == (1, 1)
        assert series.expected_slices == 3 and series.state == "receiving"
        assert series.modality == "MR" and series.series_description == ds.SeriesDescription
        study = s.scalar(select(Study).where(Study.study_uid == ds.StudyInstanceUID))
        assert study.patient_id == ds.PatientID and study.accession_number == ds.AccessionNumber
    # byte for byte as received, and no temporary file left behind
    assert env.spool.read(inst.spool_path) == data
    assert part_files(env.spool) == []


def test_duplicate_sop_instance_keeps_the_first_file(env: Env) -> None:
    first = synth_series(2, size=64, seed=22)[0]
    original = encode(first)
    assert store(env, first) is StoreOutcome.stored

    again = pydicom.dcmread(BytesIO(original))
    again.SeriesDescription = "SOMETHING ELSE"
    again.PixelData = bytes(len(again.PixelData))
    assert encode(again) != original
    assert store(env, again) is StoreOutcome.duplicate

    relpath = env.spool.relpath(
        first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID
    )
    assert env.spool.read(relpath) == original
    assert part_files(env.spool) == []
    with env.session() as s:
        assert s.scalar(select(func.count(Instance.id))) == 1
    series = series_of(env, first.SeriesInstanceUID)
    assert series.received_instances == 1 and series.received_slices == 1


def test_announced_count_completes_on_the_last_instance(env: Env) -> None:
    datasets = synth_series(3, size=64, seed=23)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets[:2]:
        store(env, ds)
    assert series_of(env, uid).state == "receiving"
    assert events(env, uid, "series_complete") == []
    store(env, datasets[2])
    series = series_of(env, uid)
    assert series.state == "complete" and series.completed_at is not None
    (done,) = events(env, uid, "series_complete")
    assert "announced count" in done.payload["why"]


def test_more_instances_than_announced_falls_back_to_idle(env: Env) -> None:
    datasets = synth_series(3, size=64, seed=24)
    for ds in datasets:
        ds.ImagesInAcquisition = 2  # the header count is wrong
    uid = datasets[0].SeriesInstanceUID
    store(env, datasets[0])
    store(env, datasets[1])
    assert series_of(env, uid).state == "complete"  # trusted at first

    store(env, datasets[2])
    series = series_of(env, uid)
    assert series.expected_slices == 0  # proved wrong: never trusted again
    assert series.state == "receiving" and series.completed_at is None
    assert series.received_instances == 3
    assert len(events(env, uid, "series_reopened")) == 1

    env.series.tick(now=later(env, uid, IDLE - 1))
    assert series_of(env, uid).state == "receiving"
    env.series.tick(now=later(env, uid, IDLE + 0.5))
    assert series_of(env, uid).state == "complete"
    assert "quiet" in events(env, uid, "series_complete")[-1].payload["why"]


def test_tick_completes_a_quiet_series(env: Env) -> None:
    datasets = synth_series(3, size=64, seed=25, announce_count=False)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        store(env, ds)
    assert series_of(env, uid).expected_slices is None
    assert env.series.tick(now=later(env, uid, IDLE - 0.5)) == []
    assert series_of(env, uid).state == "receiving"
    assert env.series.tick(now=later(env, uid, IDLE + 0.1)) == []  # complete, not yet scored
    assert series_of(env, uid).state == "complete"
    (done,) = events(env, uid, "series_complete")
    assert "quiet" in done.payload["why"] and "release" not in done.payload["why"]


def test_release_shortens_the_wait_but_not_a_stale_release(env: Env) -> None:
    datasets = synth_series(4, size=64, seed=26, announce_count=False)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets[:2]:
        store(env, ds)
    env.intake.mark_released({uid})
    # A later association sends more of the series: the earlier release no longer counts.
    store(env, datasets[2])
    env.series.tick(now=later(env, uid, GRACE + 0.5))
    assert series_of(env, uid).state == "receiving"

    store(env, datasets[3])
    env.intake.mark_released({uid})
    env.series.tick(now=later(env, uid, GRACE + 0.1))
    assert series_of(env, uid).state == "complete"
    assert "after release" in events(env, uid, "series_complete")[-1].payload["why"]


def test_new_instance_after_decided_reopens_and_gets_a_second_verdict(env: Env) -> None:
    datasets = synth_series(2, size=64, seed=27)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        store(env, ds)
    assert series_of(env, uid).state == "complete"
    score_all(env, 0.1)
    assert env.series.tick() == [uid]
    assert series_of(env, uid).state == "decided"
    assert [v.n_slices for v in verdicts(env, uid)] == [2]

    extra = pydicom.dcmread(BytesIO(encode(datasets[1])))
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.InstanceNumber = 3
    assert store(env, extra) is StoreOutcome.stored
    series = series_of(env, uid)
    assert series.state == "receiving"
    assert series.completed_at is None and series.released_at is None
    assert len(events(env, uid, "series_reopened")) == 1

    env.series.tick(now=later(env, uid, IDLE + 1))
    assert series_of(env, uid).state == "complete"
    assert env.series.tick(now=later(env, uid, IDLE + 1)) == []  # the new instance is pending
    score_all(env, 0.1)
    assert env.series.tick(now=later(env, uid, IDLE + 1)) == [uid]
    assert [v.n_slices for v in verdicts(env, uid)] == [2, 3]
    assert series_of(env, uid).state == "decided"
    assert len(events(env, uid, "verdict")) == 2


def test_two_receivers_storing_one_series_concurrently_count_each_instance_once(
    env: Env,
) -> None:
    """Two receiver processes (separate Intake objects) get the same series, each sending
    every instance (a scanner retrying on another association): kept once, counted once."""
    datasets = synth_series(10, size=32, seed=36)
    uid = datasets[0].SeriesInstanceUID
    second = Intake(env.sessions, env.spool)

    def receive(intake: Intake, order: list[pydicom.Dataset]) -> list[StoreOutcome]:
        return [
            intake.store(parse_header(ds, ds.file_meta.TransferSyntaxUID), encode(ds), "SCANNER1")
            for ds in order
        ]

    a, b = run_concurrently(
        [
            functools.partial(receive, env.intake, datasets),
            functools.partial(receive, second, datasets[::-1]),
        ],
        timeout=120,
    )
    assert a.count(StoreOutcome.stored) + b.count(StoreOutcome.stored) == 10
    assert len(a) == len(b) == 10
    series = series_of(env, uid)
    assert series.received_instances == 10 and series.received_slices == 10
    assert series.expected_slices == 10 and series.state == "complete"
    assert len(events(env, uid, "series_complete")) == 1
    assert events(env, uid, "series_reopened") == []
    with env.session() as s:
        assert s.scalar(select(func.count(Instance.id))) == 10
    assert len(list(env.spool.root.rglob("*.dcm"))) == 10 and part_files(env.spool) == []


def test_concurrent_try_decide_records_one_verdict(env: Env) -> None:
    rounds = 6 if env.url.startswith("postgresql") else 2
    for r in range(rounds):
        datasets = synth_series(2, size=32, seed=100 + r)
        for ds in datasets:
            store(env, ds)
        score_all(env, 0.9)  # non-diagnostic: the alert must not be doubled either
        series_id = series_of(env, datasets[0].SeriesInstanceUID).id
        decided = run_concurrently([functools.partial(env.series.try_decide, series_id)] * 3)
        assert sorted(decided, key=str) == [datasets[0].SeriesInstanceUID, None, None]
        assert len(verdicts(env, datasets[0].SeriesInstanceUID)) == 1
        with env.session() as s:
            assert s.scalar(select(func.count(Alert.id)).where(Alert.series_id == series_id)) == 1


# -- work queue ----------------------------------------------------------------------------------


def test_two_concurrent_claimers_never_share_an_instance(env: Env) -> None:
    rounds, per_round = (12, 24) if env.url.startswith("postgresql") else (4, 24)
    for r in range(rounds):
        uid = register_fake_series(env, per_round)
        a, b = run_concurrently(
            [functools.partial(claim_until_empty, env.queue, w) for w in ("w:1", "w:2")]
        )
        assert len(a) == len(set(a)) and len(b) == len(set(b))
        assert not set(a) & set(b), f"round {r}: both workers claimed {set(a) & set(b)}"
        with env.session() as s:
            rows = s.execute(
                select(Instance.id, Instance.state, Instance.claimed_by)
                .join(Series)
                .where(Series.series_uid == uid)
            ).all()
        assert {row.id for row in rows} == set(a) | set(b)  # nothing lost
        owner = {i: "w:1" for i in a} | {i: "w:2" for i in b}
        assert all(row.state == "claimed" and row.claimed_by == owner[row.id] for row in rows)


def test_workers_starting_together_share_one_model_version_row(env: Env) -> None:
    rounds = 8 if env.url.startswith("postgresql") else 2
    for r in range(rounds):
        meta = {**MODEL_META, "sha256": f"{r:02x}" * 32}
        ids = run_concurrently([functools.partial(env.queue.model_version_id, meta)] * 4)
        assert len(set(ids)) == 1, f"round {r}: {ids}"
        with env.session() as s:
            count = select(func.count(ModelVersion.id)).where(ModelVersion.sha256 == meta["sha256"])
            assert s.scalar(count) == 1


def test_expired_claim_is_taken_by_another_worker_and_the_loser_is_dropped(env: Env) -> None:
    register_fake_series(env, 1)
    model_id = env.queue.model_version_id(MODEL_META)
    short = WorkQueue(env.sessions, claim_seconds=1.0)
    (mine,) = short.claim("host:1:slow", 10)
    assert env.queue.claim("host:2:fast", 10) == []  # still held
    threading.Event().wait(1.2)
    (theirs,) = env.queue.claim("host:2:fast", 10)
    assert theirs.instance_id == mine.instance_id

    late = env.queue.record("host:1:slow", model_id, [InstanceResult(mine, [[0.9, 0.1]], [1.0])])
    assert late == set()
    with env.session() as s:
        inst = s.get(Instance, mine.instance_id)
        assert inst.state == "claimed" and inst.claimed_by == "host:2:fast"
        assert s.scalar(select(func.count(SliceScore.id))) == 0

    done = env.queue.record("host:2:fast", model_id, [InstanceResult(theirs, [[0.2, 0.8]], [2.0])])
    assert done == {theirs.series_id}
    with env.session() as s:
        inst = s.get(Instance, mine.instance_id)
        assert inst.state == "scored" and inst.claimed_by is None
        (score,) = s.scalars(select(SliceScore)).all()
        assert score.p_nondiagnostic == pytest.approx(0.2) and score.position == 2.0
    assert env.queue.depth() == 0


def hold(env: Env, ids: list[int], worker: str) -> None:
    """Put instances in the state a live claim leaves them in (independent of claim())."""
    with env.sessions.begin() as s:
        s.execute(
            update(Instance)
            .where(Instance.id.in_(ids))
            .values(state="claimed", claimed_by=worker, claim_expires_at=now_utc() + HOUR)
        )


def test_release_dead_claims_gives_back_only_a_dead_local_pid(env: Env) -> None:
    register_fake_series(env, 6)
    host, me = socket.gethostname(), os.getpid()
    dead = f"{host}:{2**22 + 12345}:x"
    alive = f"{host}:{me}:y"
    remote = f"otherhost:{2**22 + 12345}:z"
    hold(env, [1, 2], dead)
    hold(env, [3, 4], alive)
    hold(env, [5, 6], remote)
    assert env.queue.claim("host:9:new", 10) == []

    assert env.queue.release_dead_claims(host, lambda pid: pid == me) == 2
    with env.session() as s:
        rows = s.execute(select(Instance.id, Instance.state, Instance.claimed_by)).all()
    assert sorted((r.id, r.state, r.claimed_by) for r in rows) == [
        (1, "pending", None), (2, "pending", None), (3, "claimed", alive),
        (4, "claimed", alive), (5, "claimed", remote), (6, "claimed", remote),
    ]  # fmt: skip
    assert env.queue.release_dead_claims(host, lambda pid: pid == me) == 0
    assert [c.instance_id for c in env.queue.claim("host:9:new", 10)] == [1, 2]


def test_claim_respects_the_limit(env: Env) -> None:
    register_fake_series(env, 10)
    first = env.queue.claim("host:1:a", 3)
    assert [c.instance_id for c in first] == [1, 2, 3]
    second = env.queue.claim("host:2:b", 3)
    assert [c.instance_id for c in second] == [4, 5, 6]
    with env.session() as s:
        pending = s.scalar(select(func.count(Instance.id)).where(Instance.state == "pending"))
    assert pending == 4
    assert env.queue.depth() == 10


def test_try_decide_waits_for_pending_and_claimed_instances(env: Env) -> None:
    datasets = synth_series(2, size=64, seed=28)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        store(env, ds)
    series_id = series_of(env, uid).id
    model_id = env.queue.model_version_id(MODEL_META)
    first, second = env.queue.claim("host:1:a", 10)
    env.queue.record("host:1:a", model_id, [InstanceResult(first, [[0.1, 0.9]], [0.0])])
    assert env.series.try_decide(series_id) is None  # second still claimed
    with env.session() as s:
        assert s.get(Instance, second.instance_id).state == "claimed"
    assert env.series.try_decide(series_id) is None
    assert series_of(env, uid).state == "complete" and verdicts(env, uid) == []
    env.queue.record("host:1:a", model_id, [InstanceResult(second, [[0.2, 0.8]], [7.0])])
    assert env.series.try_decide(series_id) == uid
    assert env.series.try_decide(series_id) is None  # once only
    (v,) = verdicts(env, uid)
    assert v.n_slices == 2 and v.label == "diagnostic"


def test_try_decide_does_not_decide_a_receiving_series(env: Env) -> None:
    datasets = synth_series(3, size=64, seed=29)
    for ds in datasets[:2]:
        store(env, ds)
    score_all(env, 0.1)
    assert env.series.try_decide(series_of(env, datasets[0].SeriesInstanceUID).id) is None


def test_non_diagnostic_verdict_raises_exactly_one_open_alert(env: Env) -> None:
    datasets = synth_series(2, size=64, seed=30)
    uid = datasets[0].SeriesInstanceUID
    for ds in datasets:
        store(env, ds)
    touched = score_all(env, 0.9)
    series_id = series_of(env, uid).id
    assert touched == {series_id}
    assert env.series.tick() == [uid]

    (v,) = verdicts(env, uid)
    assert v.label == "non_diagnostic" and v.score == pytest.approx(0.9)
    assert v.n_slices == 2 and len(v.worst_slices) == 2 and v.n_unscorable == 0
    assert v.policy["slice_threshold"] == 0.4  # the model's policy
    with env.session() as s:
        (alert,) = s.scalars(select(Alert)).all()
    assert alert.state == "open" and alert.series_id == series_id and alert.verdict_id == v.id
    kinds = [e.kind for e in events(env, uid)]
    assert kinds.count("verdict") == 1 and kinds.count("alert") == 1
    (verdict_event,) = events(env, uid, "verdict")
    assert verdict_event.payload["label"] == "non_diagnostic"
    assert verdict_event.payload["verdict_id"] == v.id
    (alert_event,) = events(env, uid, "alert")
    assert alert_event.payload["alert_id"] == alert.id
    assert "patient" not in str(alert_event.payload).lower()

    # The scanner sends one more slice, still bad: a new verdict, but still one open alert.
    extra = pydicom.dcmread(BytesIO(encode(datasets[1])))
    extra.SOPInstanceUID = generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    store(env, extra)
    env.series.tick(now=later(env, uid, IDLE + 1))
    score_all(env, 0.95)
    assert env.series.tick(now=later(env, uid, IDLE + 1)) == [uid]
    vs = verdicts(env, uid)
    assert len(vs) == 2
    with env.session() as s:
        open_alerts = s.scalars(select(Alert).where(Alert.state == "open")).all()
    assert len(open_alerts) == 1 and open_alerts[0].verdict_id == vs[-1].id
    assert len(events(env, uid, "alert")) == 2


def test_diagnostic_and_unscorable_series_raise_no_alert(env: Env) -> None:
    good = synth_series(2, size=64, seed=31)
    empty = synth_series(1, size=64, seed=32)
    for ds in good + empty:
        store(env, ds)
    model_id = env.queue.model_version_id(MODEL_META)
    claims = env.queue.claim("host:1:a", 10)
    empty_uid = empty[0].SOPInstanceUID
    results = [
        InstanceResult(c, reason="no pixel data")
        if c.sop_instance_uid == empty_uid
        else InstanceResult(c, [[0.1, 0.9]], [0.0])
        for c in claims
    ]
    env.queue.record("host:1:a", model_id, results)
    assert sorted(env.series.tick()) == sorted(
        [good[0].SeriesInstanceUID, empty[0].SeriesInstanceUID]
    )
    (v,) = verdicts(env, empty[0].SeriesInstanceUID)
    assert v.label == "unscorable" and v.n_unscorable == 1 and v.model_version_id is None
    assert verdicts(env, good[0].SeriesInstanceUID)[0].label == "diagnostic"
    with env.session() as s:
        assert s.scalar(select(func.count(Alert.id))) == 0
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == empty_uid))
        assert inst.state == "unscorable" and inst.reason == "no pixel data"


def test_config_overrides_replace_only_the_keys_that_are_set(env: Env) -> None:
    overrides = {"slice_threshold": None, "series_threshold": 0.95, "top_fraction": None,
                 "worst_count": None}  # fmt: skip
    service = SeriesService(env.sessions, CompletionRule(IDLE, GRACE), overrides)
    datasets = synth_series(2, size=64, seed=33)
    for ds in datasets:
        store(env, ds)
    score_all(env, 0.9)
    assert service.tick() == [datasets[0].SeriesInstanceUID]
    (v,) = verdicts(env, datasets[0].SeriesInstanceUID)
    assert v.label == "diagnostic"  # 0.9 < 0.95
    assert v.policy == {**MODEL_META["policy"], "series_threshold": 0.95}


def test_real_worker_scores_and_a_zero_threshold_forces_an_alert(env: Env, model_dir: Path) -> None:
    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.worker import Worker

    overrides = {"series_threshold": 0.0, "slice_threshold": None}
    service = SeriesService(env.sessions, CompletionRule(IDLE, GRACE), overrides)
    datasets = synth_series(3, size=64, seed=34)
    nopix = pydicom.dcmread(BytesIO(encode(datasets[2])))
    del nopix.PixelData
    for ds in [*datasets[:2], nopix]:
        store(env, ds)
    uid = datasets[0].SeriesInstanceUID
    assert series_of(env, uid).state == "complete"

    worker = Worker(env.queue, service, env.spool, Scorer(model_dir), max_batch=4, max_wait_ms=0)
    assert worker.drain() == 3
    assert worker.scored_slices == 2
    series = series_of(env, uid)
    assert series.state == "decided"
    (v,) = verdicts(env, uid)
    assert v.label == "non_diagnostic" and v.n_slices == 2 and v.n_unscorable == 1
    assert v.policy["series_threshold"] == 0.0
    with env.session() as s:
        assert s.scalar(select(func.count(Alert.id))) == 1
        scores = s.scalars(select(SliceScore)).all()
        assert len(scores) == 2
        assert all(sum(sc.probabilities) == pytest.approx(1.0, abs=1e-4) for sc in scores)
        # positions come from the headers (ImagePositionPatient along the normal)
        positions = sorted(sc.position for sc in scores)
        assert positions == pytest.approx(
            sorted(float(ds.ImagePositionPatient[2]) for ds in datasets[:2])
        )
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == nopix.SOPInstanceUID))
        assert inst.state == "unscorable" and "pixel" in inst.reason.lower()
    assert worker.drain() == 0


def test_worker_does_not_score_an_image_without_anatomy(env: Env, model_dir: Path) -> None:
    """The air beyond the head at the end of a sagittal series is noise: not assessed, and it
    cannot condemn the series."""
    import numpy as np

    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.preprocess import NO_ANATOMY
    from mriqa_node.worker import Worker

    overrides = {"series_threshold": 0.0, "slice_threshold": None}
    service = SeriesService(env.sessions, CompletionRule(IDLE, GRACE), overrides)
    datasets = synth_series(3, size=64, seed=36)
    rng = np.random.default_rng(0)
    noise = np.hypot(rng.normal(0, 40, (64, 64)), rng.normal(0, 40, (64, 64)))
    air = datasets[2]
    air.PixelData = noise.astype("<u2").tobytes()
    for ds in datasets:
        store(env, ds)
    worker = Worker(env.queue, service, env.spool, Scorer(model_dir), max_batch=4, max_wait_ms=0)
    assert worker.drain() == 3
    assert worker.scored_slices == 2
    (v,) = verdicts(env, datasets[0].SeriesInstanceUID)
    assert v.n_slices == 2 and v.n_unscorable == 1
    with env.session() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == air.SOPInstanceUID))
        assert inst.state == "unscorable" and inst.reason == NO_ANATOMY
        assert s.scalar(select(func.count(SliceScore.id)).where(
            SliceScore.instance_id == inst.id)) == 0  # fmt: skip


# -- recovery ------------------------------------------------------------------------------------


def test_recover_spool_registers_a_file_without_a_row(db_url: str, tmp_path: Path) -> None:
    settings = load_config(
        None,
        storage={"spool_dir": str(tmp_path / "spool"), "database_url": db_url, "fsync": False},
        model={"path": str(tmp_path / "no-model")},
    )
    node = Node(settings)
    try:
        node.upgrade_db()
        ds = synth_series(2, size=64, seed=35)[0]
        data = encode(ds)
        relpath = node.spool.relpath(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        node.spool.write(relpath, data)  # the crash came between the file and the commit
        # Junk beside it: a non-DICOM file and a temp file of an interrupted write.
        junk = node.spool.relpath("1.2.3", "1.2.3.4", "1.2.3.4.5")
        node.spool.write(junk, b"not a dicom file at all")
        leftover = node.spool.path(relpath).parent / f".x.dcm.0123{TMP_SUFFIX}"
        leftover.write_bytes(b"partial")

        assert node.recover_spool() == 1
        assert node.work_available.is_set()
        assert not leftover.exists()
        with node.sessions() as s:
            inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
            assert inst is not None and inst.state == "pending"
            assert inst.spool_path == relpath and inst.size_bytes == len(data)
            assert inst.series.series_uid == ds.SeriesInstanceUID
            assert inst.series.received_instances == 1 and inst.series.expected_slices == 2
            assert s.scalar(select(func.count(Instance.id))) == 1
        assert node.spool.read(relpath) == data
        assert node.recover_spool() == 0  # idempotent
        claim: Claim = node.queue.claim("host:1:a", 10)[0]
        assert claim.spool_path == relpath
    finally:
        node.stop()
