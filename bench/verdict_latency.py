"""Verdict latency: from the last instance's C-STORE response to the series verdict in the DB.

`mriqa serve` runs as a subprocess with the worker on and a full-width untrained ConvNet
(widths 32,64,128,256, built into a temp dir). Each series goes in its own storescu association
(TCP_NODELAY=1, `-v`); the next one is sent only once the previous is decided, so every series
meets an idle node. Two modes:

  announced     ImagesInAcquisition in every header: complete when the count is reached
  unannounced   no count: complete after `release_grace_seconds` of quiet once the association
                is released (or `idle_seconds` without a release)

t_last is the wall-clock (UTC) moment the last "Received Store Response" line of `storescu -v`
was read; t_verdict is series_verdict.decided_at written by the node (same host clock).
Run: .venv/bin/python bench/verdict_latency.py [--help]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    CALLING_AET,
    DCMTK_ENV,
    HOST,
    NODE_AET,
    BenchError,
    NodeServer,
    ThrowawayPostgres,
    machine_line,
    make_series,
    median,
    percentile,
    table,
    tool,
)

MODES = {"announced": True, "unannounced": False}


@dataclass
class Sent:
    t_start: datetime
    t_first_request: datetime | None
    t_last_response: datetime
    t_exit: datetime
    responses: int


def send_series(port: int, files: list[Path], timeout: float = 120.0) -> Sent:
    """storescu -v in one association; every output line is time-stamped as it arrives."""
    cmd = [tool("storescu"), "-v", "-aet", CALLING_AET, "-aec", NODE_AET, HOST, str(port),
           *map(str, files)]  # fmt: skip
    t_start = datetime.now(UTC)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=DCMTK_ENV,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    stamped: list[tuple[datetime, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((datetime.now(UTC), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise BenchError("storescu did not finish in time") from None
    reader.join(10)
    t_exit = datetime.now(UTC)
    if rc != 0:
        out = "".join(line for _, line in stamped)
        raise BenchError(f"storescu failed ({rc}):\n{out[-3000:]}")
    responses = [t for t, line in stamped if "Received Store Response" in line]
    if len(responses) != len(files) or not all(
        "Success" in line for _, line in stamped if "Received Store Response" in line
    ):
        out = "".join(line for _, line in stamped)
        raise BenchError(f"{len(responses)} responses for {len(files)} files:\n{out[-3000:]}")
    requests = [t for t, line in stamped if "Sending Store Request" in line]
    return Sent(t_start, requests[0] if requests else None, responses[-1], t_exit, len(responses))


class Poller:
    """Reads the node's database without disturbing it.

    On SQLite a plain read-only engine is used: mriqa's make_engine begins *every* transaction
    with BEGIN IMMEDIATE (the write lock), so polling through it would block the node's writers.
    """

    def __init__(self, db_url: str, sqlite_path: Path | None) -> None:
        from sqlalchemy import create_engine

        from mriqa_node.db.engine import make_engine

        if sqlite_path is not None:
            self.engine = create_engine(f"sqlite:///file:{sqlite_path}?mode=ro&uri=true")
        else:
            self.engine = make_engine(db_url)

    def verdict(self, series_uid: str):
        """(decided_at, completed_at, last_received_at, label) or None."""
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        from mriqa_node.db.models import Series, SeriesVerdict

        with Session(self.engine) as session:
            return session.execute(
                select(
                    SeriesVerdict.decided_at,
                    Series.completed_at,
                    Series.last_received_at,
                    SeriesVerdict.label,
                )
                .join(Series, SeriesVerdict.series_id == Series.id)
                .where(Series.series_uid == series_uid)
            ).first()

    def scored_after(self, series_uid: str, when: datetime) -> int:
        """Instances of the series whose score was recorded after ``when``."""
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from mriqa_node.db.models import Instance, Series

        with Session(self.engine) as session:
            return session.scalar(
                select(func.count(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .where(Series.series_uid == series_uid, Instance.scored_at > when)
            )

    def wait_verdict(self, series_uid: str, timeout: float, interval: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.verdict(series_uid)
            if row is not None:
                return row
            time.sleep(interval)
        raise BenchError(f"no verdict for series {series_uid} within {timeout:.0f} s")

    def close(self) -> None:
        self.engine.dispose()


def series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def _model_name(model: Path) -> str:
    import json

    meta = json.loads((model / "model.json").read_text())
    return f"{meta['name']} {meta['version']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--series", type=int, default=20, help="series per mode (default 20)")
    ap.add_argument("--slices", type=int, default=30, help="slices per series (default 30)")
    ap.add_argument("--modes", default="announced,unannounced", help="default: both")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="[series] idle_seconds")
    ap.add_argument(
        "--release-grace", type=float, default=1.0, help="[series] release_grace_seconds"
    )
    ap.add_argument("--max-batch", type=int, default=16, help="[worker] max_batch (default 16)")
    ap.add_argument("--widths", default="32,64,128,256", help="ConvNet widths (default full)")
    ap.add_argument("--model", type=Path, help="use this model artifact instead of building one")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--warmup", type=int, default=1, help="untimed series sent first (default 1)")
    ap.add_argument("--series-timeout", type=float, default=90.0, help="seconds per verdict")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(modes) - MODES.keys():
        ap.error(f"modes are {', '.join(MODES)}")
    widths = tuple(int(w) for w in args.widths.split(","))

    with tempfile.TemporaryDirectory(prefix="mriqa-bench-latency-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        data: dict[str, list[list[Path]]] = {}
        data["warmup"] = make_series(root / "warmup", args.warmup, args.slices, seed0=900)
        for i, mode in enumerate(modes):
            data[mode] = make_series(
                root / mode, args.series, args.slices, MODES[mode], seed0=200 + 100 * i
            )
        t_data = time.perf_counter() - t0
        model = args.model
        if model is None:
            from mriqa_node.ml.artifact import untrained_convnet_artifact

            model = root / "model"
            untrained_convnet_artifact(model, widths=widths)
        print(
            f"# verdict latency: {args.series} series x {args.slices} slices"
            f" (512x512) per mode, one storescu association each; data {t_data:.1f} s"
        )
        print(f"# machine: {machine_line()}")
        print(
            f"# node: worker on (max_batch {args.max_batch}), model {_model_name(model)}"
            f" widths {args.widths if args.model is None else '(given)'}, {args.db},"
            f" [series] idle_seconds={args.idle_seconds}"
            f" release_grace_seconds={args.release_grace}"
        )

        if args.db == "postgres":
            pg = ThrowawayPostgres()
            pg.__enter__()
            db_url, sqlite_path = pg.url, None
        else:
            pg = None
            sqlite_path = root / "node" / "mriqa.db"
            db_url = f"sqlite:///{sqlite_path}"
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        node = NodeServer(
            root / "node",
            db_url,
            model={"path": str(model)},
            worker={"enabled": True, "max_batch": args.max_batch},
            series={
                "idle_seconds": args.idle_seconds,
                "release_grace_seconds": args.release_grace,
            },
        )
        poller = None
        try:
            t_start = time.perf_counter()
            node.start(timeout=180)
            ready = time.perf_counter() - t_start
            print(f"# node ready (model loaded and warmed up) in {ready:.1f} s")
            poller = Poller(db_url, sqlite_path)
            for mode in ["warmup", *modes]:
                for k, files in enumerate(data[mode]):
                    uid = series_uid_of(files[0])
                    sent = send_series(node.port, files)
                    row = poller.wait_verdict(uid, args.series_timeout)
                    decided, completed, last_received, label = row
                    backlog = poller.scored_after(uid, sent.t_last_response)
                    r = {
                        "send": (sent.t_exit - sent.t_start).total_seconds(),
                        "latency": (decided - sent.t_last_response).total_seconds(),
                        "complete": (completed - sent.t_last_response).total_seconds(),
                        "node_latency": (decided - last_received).total_seconds(),
                        "backlog": backlog,
                    }
                    print(
                        f"  {mode:<11} {k + 1:>2}: send {r['send']:5.2f} s,"
                        f" last response -> complete {r['complete']:5.2f} s,"
                        f" -> verdict {r['latency']:5.2f} s ({label});"
                        f" {backlog} slice(s) recorded after the last response",
                        flush=True,
                    )
                    if mode != "warmup":
                        results[mode].append(r)
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
    for mode in modes:
        rs = results[mode]
        lat = [r["latency"] for r in rs]
        target = 1.0 if mode == "announced" else args.idle_seconds + 1.0
        p95 = percentile(lat, 95)
        rows.append(
            [
                mode,
                len(rs),
                f"{median([r['send'] for r in rs]):.2f}",
                f"{median([r['complete'] for r in rs]):.2f}",
                f"{percentile(lat, 50):.2f}",
                f"{p95:.2f}",
                f"{max(lat):.2f}",
                f"{median([r['node_latency'] for r in rs]):.2f}",
                f"{median([r['backlog'] for r in rs]):.0f}",
                f"<= {target:.1f}" + (" met" if p95 <= target else " NOT met"),
            ]
        )
    print()
    print(
        table(
            [
                "mode",
                "series",
                "send p50 s",
                "last->complete p50 s",
                "last->verdict p50 s",
                "p95 s",
                "max s",
                "node-side p50 s",
                "slices recorded after last p50",
                "target (p95)",
            ],
            rows,
        )
    )
    print(
        "# node-side = decided_at - series.last_received_at (the node's own clock for the last"
        " commit); last->complete = series.completed_at - t_last"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
