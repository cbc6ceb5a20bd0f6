"""Drift per scanner and protocol: a scanner whose verdicts change character is reported once,
as an event, a webhook body and a metric; a steady scanner beside it is not."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from pydicom.uid import generate_uid
from sqlalchemy import select

from mriqa_node.console.metrics import registry_for
from mriqa_node.db.models import Event, Series, SeriesState, SeriesVerdict, Study
from mriqa_node.db.sql import now_utc
from mriqa_node.domain.drift import DriftRule, assess_group, ks_critical, ks_statistic
from mriqa_node.services.drift import DriftMonitor
from mriqa_node.services.webhooks import WebhookOutbox
from tests.conftest import Env
from tests.peers import FlakyReceiver


def test_a_steady_group_does_not_drift_and_a_changed_one_does() -> None:
    rng = np.random.default_rng(1)
    steady = ["diagnostic"] * 76 + ["non_diagnostic"] * 4
    order = rng.permutation(len(steady))
    labels = [steady[i] for i in order]
    scores = list(rng.uniform(0.0, 0.4, len(labels)))
    assert not assess_group("MR1", "T2", labels, scores).drifting
    broken = labels[:60] + ["non_diagnostic"] * 20
    drift = assess_group("MR1", "T2", broken, scores[:60] + list(rng.uniform(0.7, 1, 20)))
    assert drift.drifting and drift.reasons[0].startswith("alert rate 100% in the last 20")
    assert any("score distribution moved" in r for r in drift.reasons)
    quiet = labels[:60] + ["not_assessed"] * 20  # e.g. a protocol renamed out of scope
    assert "not-assessed rate" in assess_group(None, None, quiet, scores).reasons[0]
    assert assess_group("MR1", "T2", labels[:30], scores[:30]) is None  # too few to tell
    assert assess_group("MR1", "T2", labels[:30], scores[:30], DriftRule(10, 20, 20)) is not None


def test_ks_statistic_and_its_critical_value() -> None:
    assert ks_statistic([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 0
    assert ks_statistic([0.1, 0.2], [0.8, 0.9]) == 1
    assert 0.50 < ks_critical(60, 20, 0.001) < 0.51


def _decided(env: Env, aet: str, protocol: str, labels: list[str], scores: list[float]) -> None:
    now = now_utc()
    with env.sessions.begin() as s:
        study = Study(study_uid=generate_uid(), created_at=now)
        s.add(study)
        s.flush()
        for k, (label, score) in enumerate(zip(labels, scores, strict=True)):
            series = Series(series_uid=generate_uid(), study_id=study.id,
                            calling_aet=aet, protocol_name=protocol, state=SeriesState.decided,
                            first_received_at=now, last_received_at=now,
                            decided_at=now)  # fmt: skip
            s.add(series)
            s.flush()
            decided_at = now - timedelta(milliseconds=len(labels) - k)  # in order, in the past
            s.add(SeriesVerdict(series_id=series.id, label=label, score=score, worst_slices=[],
                                n_slices=20, n_unscorable=0, policy={},
                                decided_at=decided_at))  # fmt: skip


def test_the_monitor_reports_the_scanner_that_changed_once(env: Env) -> None:
    _decided(env, "MR1", "t2_tse_ax", ["diagnostic"] * 40, [0.1] * 40)
    _decided(env, "MR2", "t2_tse_ax", ["diagnostic"] * 60, [0.1] * 60)
    # MR1 goes wrong (a broken coil): every series from it is flagged now.
    _decided(env, "MR1", "t2_tse_ax", ["non_diagnostic"] * 20, [0.9] * 20)
    monitor = DriftMonitor(env.sessions)
    changed = monitor.check()
    assert [(g.calling_aet, g.protocol) for g in changed] == [("MR1", "t2_tse_ax")]
    assert monitor.check() == []  # reported once, not every minute
    with env.sessions() as s:
        event = s.scalar(select(Event).where(Event.kind == "drift"))
    assert event.payload["recent"]["alert_rate"] == 1.0
    assert event.payload["baseline"]["alert_rate"] == 0.0

    outbox = WebhookOutbox(env.sessions, None, [], "https://node.example", "test")
    body = outbox.body(_delivery(event))
    assert body["event"] == "drift" and body["calling_aet"] == "MR1"
    assert body["protocol"] == "t2_tse_ax" and body["reasons"] and body["series_uid"] is None
    assert body["console_url"] == "https://node.example/scanners"

    scraped = generate_latest(registry_for(env.sessions)).decode()
    assert 'mriqa_scanner_drifting{calling_aet="MR1",protocol="t2_tse_ax"} 1.0' in scraped
    assert 'mriqa_scanner_drifting{calling_aet="MR2",protocol="t2_tse_ax"} 0.0' in scraped
    assert ('mriqa_scanner_mean_score{calling_aet="MR1",protocol="t2_tse_ax",window="recent"} 0.9'
            in scraped)  # fmt: skip

    # Fixed: MR1's series are fine again; once the recent window is clean the drift clears.
    _decided(env, "MR1", "t2_tse_ax", ["diagnostic"] * 20, [0.1] * 20)
    cleared = monitor.check()
    assert [g.drifting for g in cleared] == [False]
    with env.sessions() as s:
        assert s.scalar(select(Event.kind).order_by(Event.id.desc()).limit(1)) == "drift_cleared"


def _delivery(event: Event):
    from mriqa_node.services.webhooks import Delivery

    return Delivery(id=1, webhook="hook", event_id=event.id, kind=event.kind,
                    series_uid=event.series_uid, payload=event.payload,
                    created_at=event.created_at, attempts=0)  # fmt: skip


def test_the_scanners_page_charts_each_group_over_time(env: Env, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from mriqa_node.config import Settings
    from mriqa_node.console.app import ConsoleContext, create_app
    from mriqa_node.services.alerts import AlertService
    from mriqa_node.services.images import SliceImages
    from mriqa_node.services.ratings import RatingService
    from mriqa_node.services.users import UserService

    _decided(env, "MR1", "t2_tse_ax", ["diagnostic"] * 40, [0.1] * 40)
    _decided(env, "MR2", "t2_tse_ax", ["diagnostic"] * 45, [0.2] * 45)
    _decided(env, "MR1", "t2_tse_ax", ["non_diagnostic"] * 20, [0.9] * 20)
    _decided(env, "MR3", "t1_se_sag", ["diagnostic"] * 7, [0.3] * 7)
    settings = Settings(drift={"recent": 20, "min_baseline": 20})
    monitor = DriftMonitor(env.sessions, rule=settings.drift.rule())
    monitor.check()
    users = UserService(env.sessions)
    users.add("tech", "technologist", "pw-tech-123456")
    auth = {"Authorization": f"Bearer {users.create_token('tech')}"}
    ctx = ConsoleContext(settings=settings, reads=env.sessions, users=users,
                         alerts=AlertService(env.sessions), ratings=RatingService(env.sessions),
                         images=SliceImages(env.sessions, None, tmp_path, lambda: tmp_path),
                         drift=monitor)  # fmt: skip
    with TestClient(create_app(ctx, "test-secret")) as client:
        groups = {g["calling_aet"]: g for g in client.get("/api/drift", headers=auth).json()}
        page = client.get("/scanners", headers=auth)
    assert [groups[k]["state"] for k in ("MR1", "MR2", "MR3")] == [
        "drifting", "steady", "too few series"]  # fmt: skip
    mr1 = groups["MR1"]
    assert (mr1["series"], mr1["recent_from"], mr1["baseline_from"]) == (60, 40, 0)
    # 60 series in bins of 5: the alert rate is 0 until the coil broke, then 1.
    assert [b["alert_rate"] for b in mr1["bins"]] == [0.0] * 8 + [1.0] * 4
    assert mr1["bins"][0]["quartiles"] == [0.1, 0.1, 0.1] and mr1["bins"][-1]["start"] == 55
    assert [(e["kind"], e["after_series"]) for e in mr1["events"]] == [("drift", 60)]
    assert groups["MR2"]["events"] == [] and groups["MR3"]["recent"] is None

    assert page.status_code == 200
    sections = re.findall(r'<section class="scanner state-([a-z-]+)".*?data-calling-aet="(\w+)"',
                          page.text, re.S)  # fmt: skip
    assert sections == [("drifting", "MR1"), ("steady", "MR2"), ("too-few-series", "MR3")]
    mr1_svg = page.text.split('data-calling-aet="MR1"')[1].split("</svg>")[0]
    alert_line = re.search(r'<polyline class="alert-rate" points="([^"]+)"', mr1_svg)[1]
    ys = [float(p.split(",")[1]) for p in alert_line.split()]
    assert len(ys) == 12 and max(ys[:8]) > min(ys[8:])  # up on the chart once it alerts
    assert '<line class="event drift"' in mr1_svg and "alert rate 100% in the last 20" in mr1_svg
    assert "33 more decided series" in page.text  # MR3: 7 of the 40 needed


@pytest.mark.slow
def test_serve_warns_of_the_scanner_whose_series_changed_and_not_of_the_other(
    tmp_path: Path, receiver: FlakyReceiver
) -> None:
    """`mriqa serve` with the bundled model; storescu plays two scanners. MR_A's series start
    to come with heavy motion (every one alerted): a drift warning (log, event, webhook,
    metric, Scanners page) for MR_A only; MR_B sent the same clean protocol throughout."""
    import httpx

    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.node import BUNDLED_MODEL
    from mriqa_node.phantom import synth_series, write_series
    from mriqa_node.services.users import UserService
    from tests.conftest import storescu, write_config
    from tests.peers import NodeProcess, free_port, wait_for

    port, console_port = free_port(), free_port()
    db = f"sqlite:///{tmp_path / 'mriqa.db'}"
    config = write_config(
        tmp_path / "node.toml", port, db, BUNDLED_MODEL,
        dicom={"port": port, "allowed_calling_aets": ["MR_A", "MR_B"]},
        series={"idle_seconds": 30.0, "release_grace_seconds": 0.3},
        drift={"check_seconds": 0.5, "recent": 5, "baseline": 8, "min_baseline": 8},
        console={"port": console_port, "secret_file": str(tmp_path / "console.secret")},
        webhooks=[{"name": "ops", "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                   "secret": "s", "events": ["drift"], "backoff_seconds": 0.1}],
    )  # fmt: skip

    def series(k: int, motion: float) -> list[Path]:
        datasets = synth_series(3, size=128, motion=motion, seed=700 + k,
                                series_description="T2 FSE AX", series_number=k + 1)  # fmt: skip
        return write_series(datasets, tmp_path / f"s{k}")

    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        for k in range(8):
            storescu(port, series(k, 0.0), "MR_A")
        for k in range(8, 21):
            storescu(port, series(k, 0.0), "MR_B")
        for k in range(21, 26):
            storescu(port, series(k, 1.0), "MR_A")  # the scanner's series change character
        wait_for(lambda: "DRIFT: scanner MR_A" in node.log(), 120, what="a drift warning")
        engine = make_engine(db)
        users = UserService(make_sessionmaker(engine))
        users.add("ops", "admin", "pw-ops-123456")
        auth = {"Authorization": f"Bearer {users.create_token('ops')}"}
        engine.dispose()
        base = f"http://127.0.0.1:{console_port}"

        def delivered() -> list[dict]:
            with receiver.lock:
                return [json.loads(body) for _, body, status in receiver.requests
                        if status == 200]  # fmt: skip

        bodies = wait_for(delivered, 30, what="the drift webhook")
        assert [(b["event"], b["calling_aet"]) for b in bodies] == [("drift", "MR_A")]
        # Most of the five heavy series alerted (three 128 px slices each: 2.4.0 alerted on all
        # five, 2.5.0 on four).
        assert bodies[0]["recent"]["alert_rate"] >= 0.8
        assert bodies[0]["console_url"].endswith("/scanners")
        groups = {g["calling_aet"]: g for g in httpx.get(f"{base}/api/drift", headers=auth).json()}
        assert groups["MR_A"]["state"] == "drifting" and groups["MR_A"]["series"] == 13
        assert groups["MR_B"]["state"] == "steady" and groups["MR_B"]["events"] == []
        metrics = httpx.get(f"{base}/metrics", headers=auth).text
        assert 'mriqa_scanner_drifting{calling_aet="MR_A",protocol="T2 FSE AX"} 1.0' in metrics
        assert 'mriqa_scanner_drifting{calling_aet="MR_B",protocol="T2 FSE AX"} 0.0' in metrics
        page = httpx.get(f"{base}/scanners", headers=auth).text
        assert '<line class="event drift"' in page and "DRIFT: scanner MR_B" not in node.log()
    finally:
        node.stop()
