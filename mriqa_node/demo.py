"""`mriqa demo`: the node with embedded defaults and a demo scanner sending phantom series."""

from __future__ import annotations

import logging
import secrets
import threading
import time

from mriqa_node.config import Settings
from mriqa_node.db.models import Role
from mriqa_node.dicom.scu import send_datasets
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from mriqa_node.services.queries import recent_series
from mriqa_node.services.users import UserService

log = logging.getLogger(__name__)


DEMO_USER = "demo"
# The demo scanner sends the same phantoms every run (series i has seed DEMO_SEED + i), so the
# demo shows what the README says it shows; seeds from the clock sometimes drew a clean
# phantom that the model's out-of-distribution guard left not assessed.
DEMO_SEED = 1000
MOTIONS = (0.0, 0.8, 0.2, 1.0)  # cycled over the series


def _demo_login(node: Node) -> tuple[str, str]:
    """A demo admin with a fresh random password, printed for the person running the demo."""
    password = secrets.token_urlsafe(9)
    UserService(node.sessions).add(DEMO_USER, Role.admin, password, replace=True)
    return DEMO_USER, password


def run_demo(
    settings: Settings, n_series: int, slices: int, keep_running: bool, stop: threading.Event
) -> None:
    node = Node(settings)
    node.start(console=settings.console.enabled)
    login = _demo_login(node) if settings.console.enabled else None
    d = settings.dicom
    calling = d.allowed_calling_aets[0] if d.allowed_calling_aets else "SCANNER1"
    sent: list[str] = []
    study = None
    for i in range(n_series):
        motion = MOTIONS[i % len(MOTIONS)]
        series = synth_series(
            n_slices=slices,
            motion=motion,
            seed=DEMO_SEED + i,
            study_uid=study,
            series_number=i + 1,
            series_description=f"T2 FSE AX demo {i + 1} (motion {motion:.1f})",
        )
        study = series[0].StudyInstanceUID
        report = send_datasets(series, d.host, d.port, called_aet=d.ae_title, calling_aet=calling)
        log.info(
            "demo scanner sent series %d (motion %.1f): %d/%d instances accepted",
            i + 1,
            motion,
            report.sent,
            len(series),
        )
        sent.append(series[0].SeriesInstanceUID)
    deadline = time.monotonic() + settings.series.idle_seconds + 60
    while time.monotonic() < deadline and not stop.is_set():
        rows = {r["series_uid"]: r for r in recent_series(node.reads, 100)}
        if all(rows.get(uid, {}).get("state") == "decided" for uid in sent):
            break
        time.sleep(0.2)
    for r in reversed(recent_series(node.reads, len(sent))):
        print(
            f"  {r['series_description']:<36} {r['state']:<9} {r['label'] or '-':<15}"
            f" score={r['score']} worst slices={r['worst_slices']}",
            flush=True,
        )
    if login:
        print(f"console: {settings.console.url}  user {login[0]}  password {login[1]}", flush=True)
    if keep_running:
        print(f"node running: DICOM {d.ae_title}@{d.host}:{d.port}; Ctrl-C to stop", flush=True)
        node.run_until_signalled()
    else:
        node.stop()
