"""Prometheus metrics, read from the database at scrape time.

Counting in the database rather than in process memory keeps the numbers right when receivers
and workers run as separate processes or hosts, and across restarts.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import (
    Alert,
    DeliveryState,
    Instance,
    InstanceState,
    SeriesVerdict,
    WebhookDelivery,
)
from mriqa_node.domain.drift import GroupDrift
from mriqa_node.services.drift import DriftMonitor
from mriqa_node.spool import Spool

VERDICT_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class NodeCollector:
    def __init__(self, reads: sessionmaker[Session], drift: DriftMonitor,
                 spool: Spool | None = None) -> None:  # fmt: skip
        self.reads = reads
        self.drift = drift
        self.spool = spool

    def collect(self) -> Iterator[Metric]:
        with self.reads() as session:
            instances = session.scalar(select(func.count(Instance.id))) or 0
            depth = session.scalar(
                select(func.count(Instance.id)).where(
                    Instance.state.in_((InstanceState.pending, InstanceState.claimed))
                )
            )
            verdicts = session.execute(
                select(SeriesVerdict.label, func.count(SeriesVerdict.id)).group_by(
                    SeriesVerdict.label
                )
            ).all()
            alerts = session.execute(
                select(Alert.state, func.count(Alert.id)).group_by(Alert.state)
            ).all()
            latency = SeriesVerdict.seconds_after_last
            buckets = session.execute(
                select(
                    *(func.sum(case((latency <= b, 1), else_=0)) for b in VERDICT_BUCKETS),
                    func.count(latency),
                    func.sum(latency),
                )
            ).one()
            deliveries = session.execute(
                select(WebhookDelivery.state, func.count(WebhookDelivery.id)).group_by(
                    WebhookDelivery.state
                )
            ).all()

        yield CounterMetricFamily(
            "mriqa_instances_received", "DICOM instances kept (spool + database)", instances
        )
        decided = CounterMetricFamily(
            "mriqa_series_decided", "Series verdicts recorded", labels=["label"]
        )
        for label, n in verdicts:
            decided.add_metric([label], n)
        yield decided
        alert_family = CounterMetricFamily(
            "mriqa_alerts", "Rescan alerts raised, by current state", labels=["state"]
        )
        for state, n in alerts:
            alert_family.add_metric([str(state.value)], n)
        yield alert_family
        yield GaugeMetricFamily(
            "mriqa_worker_queue_depth", "Instances waiting for or being scored", depth or 0
        )
        *cumulative, count, total = buckets
        hist = HistogramMetricFamily(
            "mriqa_time_to_verdict_seconds",
            "Seconds from a series' last instance to its verdict",
            buckets=[
                (str(b), int(c or 0)) for b, c in zip(VERDICT_BUCKETS, cumulative, strict=True)
            ]
            + [("+Inf", int(count or 0))],
            sum_value=float(total or 0.0),
        )
        yield hist
        delivery_family = GaugeMetricFamily(
            "mriqa_webhook_deliveries", "Webhook deliveries by state", labels=["state"]
        )
        for state in DeliveryState:
            delivery_family.add_metric([state.value], dict(deliveries).get(state, 0))
        yield delivery_family
        yield from _drift_metrics(self.drift.groups())
        if self.spool is not None:
            space = self.spool.space()
            yield GaugeMetricFamily(
                "mriqa_spool_free_bytes",
                "Free bytes on the spool's file system",
                space["free_bytes"],
            )
            yield GaugeMetricFamily(
                "mriqa_spool_low_space",
                "1 while free space is below [storage] min_free_mb (instances refused with 0xA700)",
                int(space["low"]),
            )


def _drift_metrics(groups: list[GroupDrift]) -> Iterator[Metric]:
    """Per scanner (calling AE) and protocol with enough series: recent and baseline rates."""
    labels = ["calling_aet", "protocol", "window"]
    alert = GaugeMetricFamily(
        "mriqa_scanner_alert_rate",
        "Share of series alerted, per scanner and protocol (recent series and the ones before)",
        labels=labels,
    )
    unassessed = GaugeMetricFamily(
        "mriqa_scanner_not_assessed_rate",
        "Share of series not assessed, per scanner and protocol",
        labels=labels,
    )
    score = GaugeMetricFamily(
        "mriqa_scanner_mean_score",
        "Mean series score P(non-diagnostic), per scanner and protocol (recent and before)",
        labels=labels,
    )
    drifting = GaugeMetricFamily(
        "mriqa_scanner_drifting",
        "1 while a scanner's recent verdicts depart from its own baseline",
        labels=labels[:2],
    )
    for g in groups:
        key = [g.calling_aet or "", g.protocol or ""]
        for name, w in (("recent", g.recent), ("baseline", g.baseline)):
            alert.add_metric([*key, name], w.alert_rate)
            unassessed.add_metric([*key, name], w.not_assessed_rate)
            if w.mean_score is not None:
                score.add_metric([*key, name], w.mean_score)
        drifting.add_metric(key, int(g.drifting))
    yield from (alert, unassessed, score, drifting)


def registry_for(reads: sessionmaker[Session], drift: DriftMonitor | None = None,
                 spool: Spool | None = None) -> CollectorRegistry:  # fmt: skip
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(reads, drift or DriftMonitor(reads), spool))
    return registry
