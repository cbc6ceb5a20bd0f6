"""Console latency: from the verdict in the database to the rescan banner in a real browser, and
the console's page load with 1,000 series in the database.

`mriqa serve` runs as a subprocess with the bundled (trained) model, the worker and the console.
A technologist signs in through the login form in headless Chromium (/usr/bin/chromium, driven
by Playwright) and keeps the live page open. Motion-corrupted phantom series (motion=1.0,
512x512, count announced) go in one storescu association each (TCP_NODELAY=1); the next one is
sent once the previous banner is shown and acknowledged ("Accepted anyway"), so every series
meets an idle node and a page with no banner.

  banner latency  window.mriqa.bannerShownAt[alert_id] (Date.now() in the page when console.js
                  put the banner in, ms) - series_verdict.decided_at (written by the node);
                  one host, one clock
  page load       after --history series (with verdicts, a mix of labels, --open-alerts open
                  alerts) are inserted straight into the database: GET / and /api/series with
                  httpx and the browser's session cookie (loopback round trip, median of 10),
                  then the browser's navigation timing (median of 5, warm cache)

Run: .venv/bin/python bench/console_latency.py [--help]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    NODE_AET,
    BenchError,
    NodeServer,
    ThrowawayPostgres,
    free_port,
    machine_line,
    median,
    percentile,
    postgres_available,
    storescu,
    table,
    wait_until,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
CHROMIUM = "/usr/bin/chromium"
USER, PASSWORD = "bench.tech", "bench-password-1"
LABELS = ["diagnostic"] * 14 + ["non_diagnostic"] * 5 + ["unscorable"]  # 70 / 25 / 5 %


def motion_series(out_dir: Path, n_series: int, n_slices: int, seed0: int) -> list[list[Path]]:
    """Motion-corrupted phantom series (the bundled model calls them non-diagnostic)."""
    from mriqa_node.phantom import synth_series, write_series

    series = []
    for k in range(n_series):
        datasets = synth_series(
            n_slices,
            motion=1.0,
            seed=seed0 + k,
            series_number=k + 1,
            series_description=f"BENCH MOTION {k + 1:03d}",
        )
        series.append(write_series(datasets, out_dir / f"series{k:03d}"))
    return series


def series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


class Poller:
    """The node's database, read beside it (SQLite: a deferred, read-only transaction)."""

    def __init__(self, db_url: str) -> None:
        from mriqa_node.db.engine import make_engine, make_sessionmaker

        self.engine = make_engine(db_url, readonly=True)
        self.sessions = make_sessionmaker(self.engine)

    def verdict(self, series_uid: str):
        """(label, decided_at, alert_id or None) of the series' latest verdict, or None."""
        from sqlalchemy import select

        from mriqa_node.db.models import Alert, Series, SeriesVerdict

        with self.sessions() as session:
            return session.execute(
                select(SeriesVerdict.label, SeriesVerdict.decided_at, Alert.id)
                .join(Series, SeriesVerdict.series_id == Series.id)
                .outerjoin(Alert, Alert.verdict_id == SeriesVerdict.id)
                .where(Series.series_uid == series_uid)
                .order_by(SeriesVerdict.id.desc())
            ).first()

    def close(self) -> None:
        self.engine.dispose()


def add_user(db_url: str) -> None:
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.users import UserService

    engine = make_engine(db_url)
    try:
        UserService(make_sessionmaker(engine)).add(USER, "technologist", PASSWORD)
    finally:
        engine.dispose()


def insert_history(db_url: str, n: int, open_alerts: int, seed: int = 7) -> dict[str, int]:
    """``n`` decided series (one study each) with a verdict, older than anything sent; every
    non-diagnostic one has an alert, the newest ``open_alerts`` of them still open."""
    from pydicom.uid import generate_uid
    from sqlalchemy import func, select

    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.db.models import (
        Alert,
        AlertState,
        ModelVersion,
        Series,
        SeriesState,
        SeriesVerdict,
        Study,
    )

    rng = random.Random(seed)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    start = datetime.now(UTC) - timedelta(hours=1)
    counts = {label: 0 for label in sorted(set(LABELS))}
    try:
        with sessions.begin() as session:
            model_id = session.scalar(select(func.min(ModelVersion.id)))
            verdicts: list[tuple[SeriesVerdict, Series]] = []
            for k in range(n):
                last = start - timedelta(seconds=90 * k)  # newest first, one every 90 s
                label = LABELS[k % len(LABELS)]
                counts[label] += 1
                study = Study(study_uid=generate_uid(), study_description="BENCH HISTORY",
                              created_at=last - timedelta(seconds=60))  # fmt: skip
                series = Series(
                    series_uid=generate_uid(),
                    study=study,
                    calling_aet="SCANNER1",
                    modality="MR",
                    series_number=k % 12 + 1,
                    series_description=f"HISTORY {k:04d} T2 AX",
                    expected_slices=30,
                    received_instances=30,
                    received_slices=30,
                    state=SeriesState.decided,
                    first_received_at=last - timedelta(seconds=40),
                    last_received_at=last,
                    completed_at=last,
                    decided_at=last + timedelta(seconds=1),
                )
                scorable = label != "unscorable"
                score = (rng.uniform(0.5, 1.0) if label == "non_diagnostic"
                         else rng.uniform(0.0, 0.003) if scorable else None)  # fmt: skip
                verdict = SeriesVerdict(
                    series=series,
                    model_version_id=model_id if scorable else None,
                    label=label,
                    score=score,
                    worst_slices=[
                        {
                            "sop_instance_uid": generate_uid(),
                            "frame": 0,
                            "slice_index": i,
                            "instance_number": i + 1,
                            "position": float(i),
                            "p_nondiagnostic": 0.5,
                            "flagged": label == "non_diagnostic",
                        }
                        for i in (rng.sample(range(30), 3) if scorable else [])
                    ],
                    n_slices=30 if scorable else 0,
                    n_unscorable=0 if scorable else 30,
                    policy={"series_threshold": 0.004, "top_fraction": 0.2, "worst_count": 3},
                    decided_at=last + timedelta(seconds=1),
                    seconds_after_last=1.0,
                )
                session.add_all([study, series, verdict])
                verdicts.append((verdict, series))
            session.flush()
            n_open = 0
            actions = ["rescanned", "accepted", "disagree"]
            for i, (verdict, series) in enumerate(
                vs for vs in verdicts if vs[0].label == "non_diagnostic"
            ):
                still_open = n_open < open_alerts
                n_open += still_open
                session.add(
                    Alert(
                        series_id=series.id,
                        verdict_id=verdict.id,
                        kind="non_diagnostic",
                        state=AlertState.open if still_open else AlertState.acknowledged,
                        created_at=verdict.decided_at,
                        acknowledged_at=None if still_open else verdict.decided_at,
                        acknowledged_by=None if still_open else USER,
                        action=None if still_open else actions[i % 3],
                    )
                )
    finally:
        engine.dispose()
    return {**counts, "open alerts": n_open}


def server_times(base_url: str, cookies: dict[str, str], path: str, n: int) -> tuple[list, int]:
    """Loopback round trips of GET path (ms) with the browser's session, after one warm-up."""
    import httpx

    times = []
    with httpx.Client(base_url=base_url, cookies=cookies, timeout=60,
                      headers={"Accept": "text/html,application/json"}) as client:  # fmt: skip
        size = 0
        for i in range(n + 1):
            t0 = time.perf_counter()
            response = client.get(path)
            elapsed = (time.perf_counter() - t0) * 1000
            if response.status_code != 200:
                raise BenchError(f"GET {path}: {response.status_code} {response.text[:200]}")
            size = len(response.content)
            if i:
                times.append(elapsed)
    return times, size


NAV_TIMING = """() => { const n = performance.getEntriesByType("navigation")[0];
  return [n.responseStart, n.domContentLoadedEventEnd, n.loadEventEnd]; }"""


def browser_loads(page, path: str, n: int) -> list[tuple[float, float, float]]:
    """Navigation timing (ms from navigation start): first byte, DOMContentLoaded, load."""
    out = []
    for i in range(n + 1):
        page.goto("about:blank")
        page.goto(path, wait_until="load")
        page.wait_for_function("performance.getEntriesByType('navigation')[0].loadEventEnd > 0")
        if i:  # the first one warms the cache (console.js, console.css)
            out.append(tuple(page.evaluate(NAV_TIMING)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--series", type=int, default=20, help="timed series (default 20)")
    ap.add_argument("--slices", type=int, default=12, help="slices per series (default 12)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed series sent first (default 1)")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument(
        "--postgres",
        dest="db",
        action="store_const",
        const="postgres",
        help="same as --db postgres (a throwaway database on 127.0.0.1:5432)",
    )
    ap.add_argument("--idle-seconds", type=float, default=1.0, help="[series] idle_seconds")
    ap.add_argument("--history", type=int, default=1000, help="series inserted (default 1000)")
    ap.add_argument("--open-alerts", type=int, default=20, help="of them open (default 20)")
    ap.add_argument("--gets", type=int, default=10, help="httpx GETs per URL (default 10)")
    ap.add_argument("--loads", type=int, default=5, help="browser loads per URL (default 5)")
    ap.add_argument("--series-timeout", type=float, default=90.0, help="seconds per banner")
    args = ap.parse_args()
    if not Path(CHROMIUM).is_file():
        raise BenchError(f"{CHROMIUM} missing (Debian package chromium)")
    if args.db == "postgres" and not postgres_available():
        raise BenchError("PostgreSQL not reachable on 127.0.0.1:5432")

    from playwright.sync_api import sync_playwright

    from mriqa_node.node import BUNDLED_MODEL

    with tempfile.TemporaryDirectory(prefix="mriqa-bench-console-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data = motion_series(root / "data", args.warmup + args.series, args.slices, seed0=700)
        t_data = time.perf_counter() - t0
        print(
            f"# console latency: {args.series} series x {args.slices} slices (512x512, motion 1.0)"
            f" one storescu association each, + {args.warmup} warm-up; data {t_data:.1f} s"
        )
        print(f"# machine: {machine_line()}")
        print(
            f"# node: bundled model, worker on, console on, {args.db},"
            f" [series] idle_seconds={args.idle_seconds}; headless Chromium {CHROMIUM}"
        )
        pg = ThrowawayPostgres().__enter__() if args.db == "postgres" else None
        db_url = pg.url if pg else f"sqlite:///{root / 'node' / 'mriqa.db'}"
        http_port = free_port()
        base_url = f"http://127.0.0.1:{http_port}"
        node = NodeServer(
            root / "node",
            db_url,
            model={"path": str(BUNDLED_MODEL)},
            worker={"enabled": True},
            series={"idle_seconds": args.idle_seconds, "release_grace_seconds": 0.5},
            console={"port": http_port},
        )
        poller = None
        latencies: list[dict[str, float]] = []
        loads: dict[str, list] = {}
        gets: dict[str, tuple[list, int]] = {}
        history: dict[str, int] = {}
        rendered: dict[str, int] = {}
        try:
            t_start = time.perf_counter()
            node.start(timeout=180)
            ready = time.perf_counter() - t_start
            print(f"# node ready (model loaded and warmed up) in {ready:.1f} s")
            add_user(db_url)
            poller = Poller(db_url)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
                context = browser.new_context(base_url=base_url)
                page = context.new_page()
                page.goto("/login")
                page.fill("input[name=username]", USER)
                page.fill("input[name=password]", PASSWORD)
                page.click("form.login button[type=submit]")
                page.wait_for_url(f"{base_url}/")
                page.wait_for_selector("#live-status.live-on", timeout=30_000)
                page.evaluate("window.__noReload = true")

                for k, files in enumerate(data):
                    uid = series_uid_of(files[0])
                    send_s = storescu(node.port, NODE_AET, files)
                    sent_ms = time.time() * 1000  # storescu has exited: association released
                    label, decided, alert_id = wait_until(
                        lambda uid=uid: poller.verdict(uid), args.series_timeout, f"verdict {k}"
                    )
                    if alert_id is None:
                        raise BenchError(f"series {k} came out {label}: no alert to time")
                    handle = page.wait_for_function(
                        "id => window.mriqa.bannerShownAt[id]", arg=str(alert_id),
                        timeout=args.series_timeout * 1000,
                    )  # fmt: skip
                    shown_ms = float(handle.json_value())
                    r = {
                        "send": send_s,
                        "banner": shown_ms - decided.timestamp() * 1000,
                        "e2e": shown_ms - sent_ms,
                    }
                    banner = page.locator(f'section.alert-banner[data-alert-id="{alert_id}"]')
                    t_click = time.perf_counter()
                    banner.locator("button[data-action=accepted]").click()
                    banner.wait_for(state="detached")
                    r["ack"] = (time.perf_counter() - t_click) * 1000
                    warm = k < args.warmup
                    name = "warm-up" if warm else "series"
                    print(
                        f"  {name} {k + 1 - args.warmup * (not warm):>3}:"
                        f" send {send_s:5.2f} s, decided_at -> banner {r['banner']:6.0f} ms,"
                        f" storescu exit -> banner {r['e2e']:6.0f} ms,"
                        f" ack click -> banner gone {r['ack']:5.0f} ms ({label})",
                        flush=True,
                    )
                    if not warm:
                        latencies.append(r)
                if not page.evaluate("window.__noReload"):
                    raise BenchError("the live page reloaded during the run")

                t0 = time.perf_counter()
                history = insert_history(db_url, args.history, args.open_alerts)
                t_insert = time.perf_counter() - t0
                print(f"# inserted {args.history} series with verdicts in {t_insert:.1f} s: "
                      + ", ".join(f"{v} {k}" for k, v in history.items()))  # fmt: skip
                cookies = {c["name"]: c["value"] for c in context.cookies()}
                for path in ("/", "/api/series?limit=100"):
                    gets[path] = server_times(base_url, cookies, path, args.gets)
                    loads[path] = browser_loads(page, path, args.loads)
                page.goto("/")
                rendered = {
                    "rows": page.locator("#series-rows tr").count(),
                    "banners": page.locator("section.alert-banner").count(),
                }
                browser.close()
        finally:
            if poller is not None:
                poller.close()
            node.stop()
            if pg is not None:
                pg.__exit__(None, None, None)
            log = node.log()
        errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
        if errors:
            print(f"# node logged {len(errors)} error line(s), first: {errors[0][:200]}")

    rows = []
    for key, what in [
        ("banner", "verdict decided_at -> banner shown in the page"),
        ("e2e", "storescu exit (last image sent) -> banner shown"),
        ("ack", "click 'Accepted anyway' -> banner removed"),
    ]:
        values = [r[key] for r in latencies]
        rows.append([what, len(values), f"{percentile(values, 50):.0f}",
                     f"{percentile(values, 95):.0f}", f"{max(values):.0f}"])  # fmt: skip
    print()
    print(table(["banner latency", "n", "p50 ms", "p95 ms", "max ms"], rows))

    total = args.history + args.warmup + args.series
    rows = []
    for path, (times, size) in gets.items():
        first, dcl, load = zip(*loads[path], strict=True)
        rows.append(
            [
                f"GET {path}",
                f"{median(times):.0f}",
                f"{median(first):.0f}",
                f"{median(dcl):.0f}",
                f"{median(load):.0f}",
                f"{size / 1024:.0f} KiB",
            ]
        )
    print()
    print(
        table(
            [
                f"page, {total} series in the database",
                f"server p50 ms (httpx, n={args.gets})",
                f"browser first byte p50 ms (n={args.loads})",
                "DOMContentLoaded p50 ms",
                "load p50 ms",
                "size",
            ],
            rows,
        )
    )
    print(
        f"# live page rendered {rendered.get('rows', 0)} rows and"
        f" {rendered.get('banners', 0)} open-alert banners; browser times are navigation timing"
        " from navigation start, warm cache (console.js, console.css)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
