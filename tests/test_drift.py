"""Drift per scanner and protocol: a scanner whose verdicts change character is reported once,
as an event, a webhook body and a metric; a steady scanner beside it is not."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
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
            s.add(SeriesVerdict(series_id=series.id, label=label, score=score, worst_slices=[],
                                n_slices=20, n_unscorable=0, policy={},
                                decided_at=now + timedelta(seconds=k)))  # fmt: skip


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
    assert body["console_url"] == "https://node.example"

    scraped = generate_latest(registry_for(env.sessions)).decode()
    assert 'mriqa_scanner_drifting{calling_aet="MR1",protocol="t2_tse_ax"} 1.0' in scraped
    assert 'mriqa_scanner_drifting{calling_aet="MR2",protocol="t2_tse_ax"} 0.0' in scraped

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
