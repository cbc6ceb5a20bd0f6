"""Webhook outbox on real databases (SQLite and PostgreSQL) against real local HTTP receivers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.config import WebhookConfig
from mriqa_node.db import migrate
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Cursor, DeliveryState, Event, WebhookDelivery
from mriqa_node.db.sql import now_utc
from mriqa_node.services.webhooks import WebhookOutbox, backoff, cursor_name, sign, verify
from tests.peers import free_port

SECRET = "s3cret"
CONSOLE = "https://qa.example.org/"


class Receiver:
    """A local HTTP endpoint that answers ``statuses`` in turn (then the last one forever),
    after ``delay`` seconds, and records every request."""

    def __init__(self, statuses: tuple[int, ...] = (200,), delay: float = 0.0) -> None:
        self.requests: list[tuple[dict[str, str], bytes, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(delay)
                n = len(receiver.requests)
                status = statuses[min(n, len(statuses) - 1)]
                receiver.requests.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self) -> list[tuple[dict[str, str], bytes, int]]:
        return [r for r in self.requests if 200 <= r[2] < 300]


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(*statuses: int, delay: float = 0.0) -> Receiver:
        started.append(Receiver(statuses or (200,), delay))
        return started[-1]

    yield start
    for r in started:
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def db(db_url: str) -> Iterator[tuple[sessionmaker[Session], sessionmaker[Session]]]:
    engine, read_engine = make_engine(db_url), make_engine(db_url, readonly=True)
    migrate.upgrade(engine)
    yield make_sessionmaker(engine), make_sessionmaker(read_engine)
    engine.dispose()
    read_engine.dispose()


def hook(name: str, url: str, **kw: Any) -> WebhookConfig:
    return WebhookConfig(name=name, url=url, secret=SECRET, **{"backoff_seconds": 0.05, **kw})


def outbox(db, *hooks: WebhookConfig, worker: str = "host:1") -> WebhookOutbox:
    """An outbox whose cursors exist (a webhook gets the events from its first fan-out on)."""
    box = WebhookOutbox(db[0], db[1], list(hooks), CONSOLE, worker)
    box.fan_out()
    return box


def add_event(db, kind: str = "verdict", **extra: Any) -> int:
    """An event as SeriesService writes it (plus ``extra`` payload keys)."""
    uid = generate_uid()
    payload = {
        "series_uid": uid,
        "series_description": "t2_tse_sag",
        "calling_aet": "SCANNER1",
        "label": "non_diagnostic",
        "score": 0.91,
        "worst_slices": [{"slice_index": 7, "p_nondiagnostic": 0.97, "sop_instance_uid": "1.2"}],
        "n_slices": 20,
        "n_unscorable": 0,
        "verdict_id": 1,
        **extra,
    }
    with db[0].begin() as s:
        event = Event(kind=kind, series_uid=uid, payload=payload, created_at=now_utc())
        s.add(event)
        s.flush()
        return event.id


def rows(db, webhook: str | None = None) -> list[WebhookDelivery]:
    with db[0]() as s:
        q = select(WebhookDelivery).order_by(WebhookDelivery.id)
        if webhook:
            q = q.where(WebhookDelivery.webhook == webhook)
        return list(s.scalars(q))


def wait_for(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def running(box: WebhookOutbox) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=box.run, args=(stop,), daemon=True)
    thread.start()
    return stop, thread


def deliver_due(box: WebhookOutbox) -> int:
    """One pass of what run() does, in the test's thread."""
    box.fan_out()
    items = box.claim_due(10)
    for item in items:
        box.deliver(item)
    return len(items)


def test_sign_and_verify() -> None:
    body = b'{"event":"verdict"}'
    signature = sign(SECRET, "1700000000", body)
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(SECRET, "1700000000", body, signature)
    assert not verify(SECRET, "1700000001", body, signature)
    assert not verify(SECRET, "1700000000", body + b" ", signature)
    assert not verify("other", "1700000000", body, signature)
    assert cursor_name("ris") == "webhook:ris" and len(cursor_name("x" * 100)) <= 64


def test_receiver_failing_twice_gets_it_exactly_once_signed(db, receivers) -> None:
    receiver = receivers(500, 500, 200)
    box = outbox(db, hook("ris", receiver.url))
    stop, thread = running(box)
    try:
        t0 = time.monotonic()
        event_id = add_event(db, "verdict")
        wait_for(lambda: receiver.requests)
        assert time.monotonic() - t0 < 1.5  # the first attempt follows the verdict at once
        wait_for(lambda: rows(db) and rows(db)[0].state == DeliveryState.delivered)
        time.sleep(0.3)  # nothing more arrives
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert [status for *_, status in receiver.requests] == [500, 500, 200]
    (row,) = rows(db)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.delivered, 3, 200)
    assert row.delivered_at is not None and row.last_error is None and row.claimed_by is None
    for headers, body, _ in receiver.requests:
        assert verify(SECRET, headers["X-MRIQA-Timestamp"], body, headers["X-MRIQA-Signature"])
        assert headers["X-MRIQA-Delivery"] == str(row.id)
        assert headers["X-MRIQA-Event"] == "verdict"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == "mriqa-node"
    data = json.loads(receiver.delivered()[0][1])
    assert data["event"] == "verdict" and data["event_id"] == event_id
    assert data["delivery_id"] == row.id
    assert (data["label"], data["score"], data["n_slices"]) == ("non_diagnostic", 0.91, 20)
    assert data["worst_slices"][0]["slice_index"] == 7
    assert data["console_url"] == f"https://qa.example.org/series/{data['series_uid']}"
    assert "alert_id" not in data
    (admin,) = box.deliveries()
    assert admin["id"] == row.id and admin["event"] == "verdict" and admin["attempts"] == 3
    assert admin["state"] == "delivered" and box.deliveries(state="failed") == []


def test_gives_up_after_max_attempts(db, receivers) -> None:
    receiver = receivers(500)
    box = outbox(db, hook("ris", receiver.url, max_attempts=3, backoff_seconds=0.01))
    add_event(db, "alert", alert_id=5)
    assert box.fan_out() == 1
    deadline = time.monotonic() + 10
    while rows(db)[0].state == DeliveryState.pending:
        deliver_due(box)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (row,) = rows(db)
    assert (row.state, row.attempts, row.last_status) == (DeliveryState.failed, 3, 500)
    assert row.last_error.startswith("HTTP 500")
    assert len(receiver.requests) == 3
    time.sleep(0.05)
    assert deliver_due(box) == 0  # failed rows are never claimed again
    (admin,) = box.deliveries(state="failed")
    assert admin["last_status"] == 500 and admin["event"] == "alert"


def test_dead_and_slow_webhooks_do_not_hold_up_a_healthy_one(db, receivers) -> None:
    healthy, slow = receivers(200), receivers(200, delay=2.0)
    dead = hook("dead", f"http://127.0.0.1:{free_port()}/hook", max_attempts=3)
    box = outbox(
        db,
        dead,
        hook("slow", slow.url, timeout_seconds=0.3, max_attempts=2),
        hook("ok", healthy.url),
    )
    stop, thread = running(box)
    try:
        add_event(db, "verdict")
        wait_for(lambda: len(healthy.requests) == 1, timeout=1.5)
        wait_for(lambda: all(r.state == DeliveryState.failed for r in rows(db, "dead")))
        wait_for(lambda: all(r.state == DeliveryState.failed for r in rows(db, "slow")))
        add_event(db, "alert", alert_id=1)  # the loop is still alive
        wait_for(lambda: len(healthy.requests) == 2)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    refused = rows(db, "dead")[0]
    assert refused.attempts == 3 and refused.last_status is None
    assert "ConnectError" in refused.last_error
    timed_out = rows(db, "slow")[0]
    assert timed_out.attempts == 2 and "Timeout" in timed_out.last_error
    assert [r.state for r in rows(db, "ok")] == [DeliveryState.delivered] * 2


def test_database_errors_do_not_kill_the_loop(db, receivers, monkeypatch) -> None:
    receiver = receivers(200)
    box = outbox(db, hook("ris", receiver.url))
    real, calls = box.fan_out, []

    def flaky() -> int:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError("database away")
        return real()

    monkeypatch.setattr(box, "fan_out", flaky)
    stop, thread = running(box)
    try:
        add_event(db)
        wait_for(lambda: receiver.delivered())
        assert len(calls) > 2 and thread.is_alive()
    finally:
        stop.set()
        thread.join(10)


def test_event_kinds_are_filtered_and_bodies_carry_no_patient_data(db) -> None:
    box = outbox(db, hook("alerts", "http://127.0.0.1:9/a", events=["alert"]),
                 hook("all", "http://127.0.0.1:9/b"))  # fmt: skip
    verdict = add_event(db, "verdict", patient_name="DOE^JANE", patient_id="12345")
    alert = add_event(db, "alert", alert_id=42)
    add_event(db, "series_complete")
    assert box.fan_out() == 3
    assert sorted((r.webhook, r.event_id) for r in rows(db)) == [
        ("alerts", alert), ("all", verdict), ("all", alert)
    ]  # fmt: skip
    items = box.claim_due(10)
    bodies = {(i.webhook, i.kind): box.body(i) for i in items}
    assert bodies["alerts", "alert"]["alert_id"] == 42
    assert "alert_id" not in bodies["all", "verdict"]
    text = json.dumps(list(bodies.values()))
    assert "patient" not in text.lower() and "12345" not in text and "DOE" not in text


def test_fan_out_is_idempotent_and_safe_concurrently(db) -> None:
    hooks = [hook("a", "http://127.0.0.1:9/a"), hook("b", "http://127.0.0.1:9/b")]
    boxes = [outbox(db, *hooks, worker=f"host:{i}") for i in range(3)]
    n_events = 25
    barrier = threading.Barrier(len(boxes) + 1)
    done = threading.Event()
    errors: list[BaseException] = []

    def fan(box: WebhookOutbox) -> None:
        try:
            barrier.wait()
            while not done.is_set():
                box.fan_out()
            box.fan_out()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fan, args=(b,)) for b in boxes]
    for t in threads:
        t.start()
    barrier.wait()
    ids = [add_event(db) for _ in range(n_events)]
    done.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert boxes[0].fan_out() == 0
    with db[0].begin() as s:  # rewound cursors: the unique key still keeps one row each
        s.execute(update(Cursor).values(last_event_id=0))
    assert boxes[1].fan_out() == 0
    got = sorted((r.webhook, r.event_id) for r in rows(db))
    assert got == sorted((h, i) for h in "ab" for i in ids)
    with db[0]() as s:
        cursors = dict(s.execute(select(Cursor.name, Cursor.last_event_id)).all())
    assert cursors == {cursor_name("a"): ids[-1], cursor_name("b"): ids[-1]}


def test_a_new_webhook_starts_at_the_newest_event(db) -> None:
    old = add_event(db)
    box = outbox(db, hook("new", "http://127.0.0.1:9/"))
    new = add_event(db)
    assert box.fan_out() == 1
    assert [r.event_id for r in rows(db)] == [new] and new > old


def test_only_the_claim_holder_records_an_attempt(db, receivers) -> None:
    receiver = receivers(500)
    a = outbox(db, hook("ris", receiver.url), worker="host:a")
    b = WebhookOutbox(db[0], db[1], list(a.hooks.values()), CONSOLE, "host:b")
    add_event(db)
    a.fan_out()
    (mine,) = a.claim_due(5)
    assert b.claim_due(5) == []  # claimed
    with db[0].begin() as s:  # a's claim expires (it stalled); b takes over
        s.execute(update(WebhookDelivery).values(claim_expires_at=now_utc() - timedelta(1)))
    (theirs,) = b.claim_due(5)
    assert a.deliver(mine) is False  # sent, but the outcome is not a's to record
    (row,) = rows(db)
    assert (row.attempts, row.claimed_by, row.last_status) == (0, "host:b", None)
    b.deliver(theirs)
    assert rows(db)[0].attempts == 1 and rows(db)[0].claimed_by is None


def test_backoff_grows_and_is_capped(db, receivers) -> None:
    config = hook("ris", receivers(503).url, backoff_seconds=10, backoff_max_seconds=25,
                  max_attempts=5)  # fmt: skip
    assert [backoff(config, n) for n in (1, 2, 3, 4, 200)] == [10, 20, 25, 25, 25]
    box = outbox(db, config)
    add_event(db)
    box.fan_out()
    waits = []
    for _ in range(4):
        (item,) = box.claim_due(1)
        before = now_utc()
        box.deliver(item)
        waits.append((rows(db)[0].next_attempt_at - before).total_seconds())
        assert box.claim_due(1) == []  # not due before its backoff
        with db[0].begin() as s:
            s.execute(update(WebhookDelivery).values(next_attempt_at=now_utc()))
    for got, expected in zip(waits, [10, 20, 25, 25], strict=True):
        assert expected <= got < expected + 2
    (item,) = box.claim_due(1)
    box.deliver(item)
    assert (rows(db)[0].state, rows(db)[0].attempts) == (DeliveryState.failed, 5)


def test_fan_out_waits_for_an_uncommitted_lower_event_id(db, monkeypatch) -> None:
    """PostgreSQL hands out ids before commit: an id may commit after a higher one."""
    if db[0].kw["bind"].dialect.name != "postgresql":
        pytest.skip("SQLite has one writer: ids commit in order")
    box = outbox(db, hook("ris", "http://127.0.0.1:9/"))
    slow = db[0]()
    slow.begin()
    early = Event(kind="verdict", series_uid="1.2.3", payload={}, created_at=now_utc())
    slow.add(early)
    slow.flush()  # id taken, not committed
    late = add_event(db)
    assert late > early.id
    assert box.fan_out() == 0  # not past the missing id yet
    slow.commit()
    slow.close()
    assert box.fan_out() == 2
    # A rolled-back id is a permanent gap: passed once the grace period is over.
    slow = db[0]()
    slow.begin()
    slow.add(Event(kind="verdict", series_uid="1.2.4", payload={}, created_at=now_utc()))
    slow.flush()
    slow.rollback()
    slow.close()
    after = add_event(db)
    assert box.fan_out() == 0
    monkeypatch.setattr(box._gaps, "grace", 0.0)  # the grace period is over
    assert box.fan_out() == 1
    with db[0]() as s:
        assert s.scalar(select(func.max(WebhookDelivery.event_id))) == after
