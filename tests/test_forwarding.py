"""The forwarding outbox on real databases (claims, outcomes, retries, order) and its C-STORE
sender against real DCMTK storescp peers (original transfer syntax kept where accepted,
decompressed where not, an unreachable peer reported as such)."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless
from sqlalchemy import select, update

from mriqa_node.config import DestinationConfig
from mriqa_node.db.models import ForwardJob
from mriqa_node.db.sql import now_utc
from mriqa_node.dicom.forward import StoreSender
from mriqa_node.domain.routing import ForwardRule, destinations_for
from mriqa_node.phantom import synth_series
from mriqa_node.services.forwarding import ForwardQueue, Job, Outcome
from mriqa_node.services.intake import Intake
from tests.conftest import Env, dcmtk
from tests.peers import free_port
from tests.test_services import run_concurrently, store


def dest(name: str = "pacs", port: int = 104, **kw) -> DestinationConfig:
    return DestinationConfig(name=name, ae_title="PACS", host="127.0.0.1", port=port, **kw)


def routed(env: Env, *rules: ForwardRule) -> Env:
    env.intake = Intake(env.sessions, env.spool, routes=rules)
    return env


def all_jobs(env: Env) -> list[ForwardJob]:
    with env.session() as s:
        return list(s.scalars(select(ForwardJob).order_by(ForwardJob.id)))


def make_due(env: Env) -> None:
    with env.sessions.begin() as s:
        s.execute(update(ForwardJob).values(next_attempt_at=now_utc() - timedelta(seconds=1)))


def test_rules_pick_destinations() -> None:
    rules = [
        ForwardRule("all"),
        ForwardRule("mr1-only", calling_aets=frozenset({"MR1"})),
        ForwardRule("t2", modalities=frozenset({"MR"}), series_description=r"\bt2\b"),
    ]
    assert destinations_for(rules, "MR1", "MR", "T2 FSE AX") == ["all", "mr1-only", "t2"]
    assert destinations_for(rules, "MR2", "MR", "T1 SE") == ["all"]
    assert destinations_for(rules, None, "CT", "t2 axial") == ["all"]
    back = [ForwardRule("pacs", own_aet="PACS")]  # a study pulled from the PACS stays here
    assert destinations_for(back, "PACS", "MR", "") == [] and destinations_for(
        back, "MR1", "MR", ""
    )


def test_intake_queues_each_new_instance_for_matching_destinations(env: Env) -> None:
    routed(env, ForwardRule("pacs"), ForwardRule("other", calling_aets=frozenset({"MR9"})))
    datasets = synth_series(3, size=32, seed=5)
    for ds in datasets:
        store(env, ds)
    store(env, datasets[0])  # a duplicate is not queued again
    jobs = all_jobs(env)
    assert [(j.destination, j.sop_instance_uid, j.state) for j in jobs] == [
        ("pacs", ds.SOPInstanceUID, "pending") for ds in datasets
    ]
    assert all(env.spool.exists(j.spool_path) and j.kind == "instance" for j in jobs)


def test_claim_order_outcomes_and_retries(env: Env) -> None:
    routed(env, ForwardRule("pacs"))
    for ds in synth_series(4, size=32, seed=6):
        store(env, ds)
    queue, d = ForwardQueue(env.sessions), dest(backoff_seconds=10, backoff_max_seconds=15)
    jobs = queue.claim("pacs", 10, "me:1")
    assert [j.id for j in jobs] == sorted(j.id for j in jobs) and len(jobs) == 4
    assert queue.claim("pacs", 10, "other:2") == []  # claimed
    outcomes = {jobs[0].id: Outcome(0), jobs[1].id: Outcome(0xB000),  # success, warning
                jobs[2].id: Outcome(None, "refused"), jobs[3].id: Outcome(0xA900)}  # fmt: skip
    queue.record(d, "not-me:3", jobs, outcomes)  # a lost claim records nothing
    assert {j.state for j in all_jobs(env)} == {"pending"}
    queue.record(d, "me:1", jobs, outcomes)
    states = [(j.state, j.attempts, j.last_status) for j in all_jobs(env)]
    assert states == [("sent", 1, 0), ("sent", 1, 0xB000), ("pending", 1, None),
                      ("pending", 1, 0xA900)]  # fmt: skip
    retry = all_jobs(env)[2]
    assert timedelta(seconds=9) < retry.next_attempt_at - now_utc() <= timedelta(seconds=10)
    assert queue.claim("pacs", 10, "me:1") == []  # not due yet
    for _ in range(2):  # refused twice more: failed; unreachable keeps trying
        make_due(env)
        again = queue.claim("pacs", 10, "me:1")
        queue.record(d, "me:1", again, {again[0].id: Outcome(None, "x"),
                                        again[1].id: Outcome(0xA900)})  # fmt: skip
    last = all_jobs(env)
    assert (last[2].state, last[2].attempts) == ("pending", 3)
    assert (last[3].state, last[3].attempts) == ("failed", 3)
    # backoff doubles and is capped: 10 s, 20 -> 15 s
    assert last[2].next_attempt_at - now_utc() <= timedelta(seconds=15)
    summary = {r["destination"]: r for r in queue.summary()}
    assert summary["pacs"]["sent"] == 2 and summary["pacs"]["failed"] == 1
    assert summary["pacs"]["pending"] == 1 and summary["pacs"]["last_error"] == "x"


def test_jobs_of_a_killed_local_lane_are_given_back_at_once(env: Env) -> None:
    routed(env, ForwardRule("pacs"))
    for seed in (7, 8, 9):
        for ds in synth_series(2, size=32, seed=seed):
            store(env, ds)
    queue, host, me = ForwardQueue(env.sessions), socket.gethostname(), os.getpid()
    dead, remote = f"{host}:{2**22 + 7}", f"otherhost:{2**22 + 7}"
    first, second = queue.claim("pacs", 10, dead), queue.claim("pacs", 10, remote)
    third = queue.claim("pacs", 10, f"{host}:{me}")
    assert len(first) == len(second) == len(third) == 2
    assert queue.claim("pacs", 10, "new:1") == []  # every series is claimed
    assert queue.release_dead_claims(host, lambda pid: pid == me) == 2
    assert [j.id for j in queue.claim("pacs", 10, "new:1")] == [j.id for j in first]
    assert queue.release_dead_claims(host, lambda pid: pid == me) == 0


def test_lanes_send_different_series_and_each_series_in_order(env: Env) -> None:
    routed(env, ForwardRule("pacs"))
    series = [synth_series(5, size=32, seed=20 + k) for k in range(3)]
    for datasets in series:
        for ds in datasets:
            store(env, ds)
    queue = ForwardQueue(env.sessions)
    a = queue.claim("pacs", 3, "lane:a")  # the oldest series, up to the batch size
    assert {j.series_uid for j in a} == {series[0][0].SeriesInstanceUID} and len(a) == 3
    b = queue.claim("pacs", 10, "lane:b")  # series 0 is busy: the next series, whole
    assert {j.series_uid for j in b} == {series[1][0].SeriesInstanceUID} and len(b) == 5
    c = queue.claim("pacs", 10, "lane:c")
    assert {j.series_uid for j in c} == {series[2][0].SeriesInstanceUID}
    assert queue.claim("pacs", 10, "lane:d") == []  # every series with work is being sent
    queue.record(dest(), "lane:a", a, {j.id: Outcome(0) for j in a})
    rest = queue.claim("pacs", 10, "lane:d")  # series 0 continues where lane a stopped
    assert [j.sop_instance_uid for j in a + rest] == [ds.SOPInstanceUID for ds in series[0]]


def test_concurrent_lanes_never_split_a_series(env: Env) -> None:
    routed(env, ForwardRule("pacs"))
    for k in range(6):
        for ds in synth_series(4, size=32, seed=40 + k):
            store(env, ds)
    queue = ForwardQueue(env.sessions)
    claims = run_concurrently([functools.partial(queue.claim, "pacs", 10, f"lane:{i}")
                               for i in range(4)])  # fmt: skip
    series_per_lane = [{j.series_uid for j in jobs} for jobs in claims]
    assert all(len(s) == 1 for s in series_per_lane)  # one series each ...
    assert len(set().union(*series_per_lane)) == 4  # ... and never the same one twice
    assert all(len(jobs) == 4 for jobs in claims)


def test_max_attempts_gives_up_on_an_unreachable_destination(env: Env) -> None:
    routed(env, ForwardRule("pacs"))
    store(env, synth_series(1, size=32, seed=7)[0])
    queue, d = ForwardQueue(env.sessions), dest(max_attempts=2)
    for _ in range(2):
        make_due(env)
        jobs = queue.claim("pacs", 10, "me:1")
        queue.record(d, "me:1", jobs, {jobs[0].id: Outcome(None, "connection refused")})
    (job,) = all_jobs(env)
    assert (job.state, job.attempts, job.last_error) == ("failed", 2, "connection refused")


# -- the sender against real DCMTK storescp ------------------------------------------------


class StoreSCP:
    """DCMTK storescp on a free port; ``accept_all``: every transfer syntax it knows."""

    def __init__(self, directory: Path, accept_all: bool) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.directory = free_port(), directory
        cmd = [dcmtk("storescp"), "-aet", "PACS", *(["+xa"] if accept_all else []),
               "--output-directory", str(directory), str(self.port)]  # fmt: skip
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(self.port)],
                             capture_output=True).returncode != 0:  # fmt: skip
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.directory.iterdir()) if p.is_file()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def rle_jobs(env: Env) -> list[Job]:
    """Three RLE-compressed instances in the spool, queued for "pacs"."""
    routed(env, ForwardRule("pacs"))
    for ds in synth_series(3, size=64, seed=8):
        ds.compress(RLELossless, generate_instance_uid=False)
        store(env, ds)
    return ForwardQueue(env.sessions).claim("pacs", 10, "me:1")


@pytest.mark.parametrize("accept_all", [True, False], ids=["keeps-syntax", "decompresses"])
def test_sender_keeps_or_converts_the_transfer_syntax(
    env: Env, rle_jobs: list[Job], tmp_path: Path, accept_all: bool
) -> None:
    scp = StoreSCP(tmp_path / "scp", accept_all)
    try:
        outcomes = StoreSender(env.spool, "MRIQA")(dest(port=scp.port), rle_jobs)
    finally:
        scp.stop()
    assert [outcomes[j.id] for j in rle_jobs] == [Outcome(0)] * 3
    got = {str(ds.SOPInstanceUID): ds for ds in scp.received()}
    assert set(got) == {j.sop_instance_uid for j in rle_jobs}
    for job in rle_jobs:
        original = pydicom.dcmread(env.spool.path(job.spool_path))
        ds = got[job.sop_instance_uid]
        assert (ds.pixel_array == original.pixel_array).all()
        if accept_all:  # byte for byte as received
            assert ds.file_meta.TransferSyntaxUID == RLELossless
            assert ds.PixelData == original.PixelData
        else:
            assert not ds.file_meta.TransferSyntaxUID.is_compressed


def test_sender_reports_an_unreachable_destination(env: Env, rle_jobs: list[Job]) -> None:
    outcomes = StoreSender(env.spool, "MRIQA")(dest(port=free_port()), rle_jobs)
    assert all(o.status is None and "127.0.0.1" in o.error for o in outcomes.values())
    assert not any(o.sent for o in outcomes.values())


def test_client_associations_turn_nagle_off(tmp_path: Path) -> None:
    """pynetdicom leaves Nagle on; with it each C-STORE waits out a delayed ACK (~40 ms)."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from mriqa_node.dicom.client import NO_DELAY

    scp = StoreSCP(tmp_path / "scp", accept_all=False)
    try:
        ae = AE("MRIQA")
        ae.add_requested_context(Verification)
        for handlers, expected in (([], 0), (NO_DELAY, 1)):
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="PACS", evt_handlers=handlers)
            sock = assoc.dul.socket.socket
            assert bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)) == expected
            assoc.release()
    finally:
        scp.stop()


def test_a_week_long_pacs_outage_keeps_a_bounded_retry_and_delivers_each_instance_once(
    env: Env, orthanc
) -> None:
    """A week of a PACS that refuses connections (real connection attempts, the week on an
    injected clock): retries stay at most backoff_max_seconds apart and never overflow; when
    the PACS (a real Orthanc on that port) comes back, every instance arrives once."""
    routed(env, ForwardRule("pacs"))
    datasets = synth_series(6, size=32, seed=9)
    for ds in datasets:
        store(env, ds)
    clock = [now_utc()]
    queue = ForwardQueue(env.sessions, clock=lambda: clock[0])
    cap = 4 * 3600  # a long cap keeps the week short in steps; the rule is the same
    d = dest(port=orthanc.dicom_port, backoff_seconds=1, backoff_max_seconds=cap)
    sender = StoreSender(env.spool, "MRIQA")

    def step() -> int:
        """One claim and send at the clock's time, then the clock jumps to the next due job."""
        jobs = queue.claim("pacs", 50, "lane:1")
        if jobs:
            queue.record(d, "lane:1", jobs, sender(d, jobs))
        pending = [j.next_attempt_at for j in all_jobs(env) if j.state == "pending"]
        if pending:
            clock[0] = max(clock[0], min(pending))
        return len(pending)

    start, gaps = clock[0], []
    while clock[0] - start < timedelta(days=7):
        before = clock[0]
        assert step() == len(datasets)  # nothing lost, nothing given up
        gaps.append(clock[0] - before)
    attempts = {j.attempts for j in all_jobs(env)}
    assert len(attempts) == 1 and attempts.pop() >= 7 * 24 * 3600 // cap  # for the whole week
    assert max(gaps) <= timedelta(seconds=cap)
    assert {j.last_error is not None for j in all_jobs(env)} == {True}

    orthanc.start()  # the PACS is back
    for _ in range(5):
        if step() == 0:
            break
    assert {j.state for j in all_jobs(env)} == {"sent"}
    held = orthanc.sop_instance_uids()
    assert sorted(held) == sorted(str(ds.SOPInstanceUID) for ds in datasets)  # each once
