"""PostgreSQL restarted, then stopped for --stop-seconds, while a scanner keeps sending.

`mriqa serve` (worker off, console on) on a throwaway database of the local PostgreSQL; a
scanner (pynetdicom, one association per 6-slice series, back to back) sends throughout and
records what it was told for every instance; /healthz is polled twice a second. Timeline: 10 s
healthy, `pg_ctlcluster VERSION main restart`, 20 s, `... stop`, --stop-seconds, `... start`,
20 s. Afterwards what the sender was told Success for is compared with the database and the
spool: 0 lost, 0 duplicated is the bar. Needs root (pg_ctlcluster) and nothing else using the
PostgreSQL server meanwhile (the tests use it). Prints tables.
Run: .venv/bin/python stress/db_outage.py [--stop-seconds 60]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import NodeServer, ThrowawayPostgres, free_port, machine_line, table  # noqa: E402

from mriqa_node.dicom.scu import send_datasets  # noqa: E402
from mriqa_node.phantom import synth_series  # noqa: E402


def cluster() -> str:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    return versions[-1]


def pg_ctl(action: str) -> float:
    start = time.perf_counter()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster(), "main", action],
                   check=True, capture_output=True)  # fmt: skip
    return time.perf_counter() - start


class Scanner(threading.Thread):
    """Sends series until stopped; keeps (time, phase, status) per instance."""

    def __init__(self, port: int, phase: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.phase = port, phase
        self.stop = threading.Event()
        self.told: list[tuple[float, str, str, int]] = []  # t, phase, sop uid, status

    def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            series = synth_series(6, size=64, seed=seed)
            seed += 1
            names = [str(ds.SOPInstanceUID) for ds in series]
            report = send_datasets(series, "127.0.0.1", self.port, calling_aet="STORESCU",
                                   names=names)  # fmt: skip
            now, phase = time.monotonic(), self.phase[0]
            self.told += [(now, phase, n, report.failed.get(n, 0)) for n in names]
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stop-seconds", type=float, default=60.0)
    args = ap.parse_args()
    logging.getLogger("mriqa_node.dicom.scu").setLevel(logging.ERROR)  # one line per refusal
    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="mriqa-db-outage-"))
    http_port = free_port()
    health: list[tuple[float, str, int]] = []
    phase = ["healthy"]
    with ThrowawayPostgres("mriqa_stress") as pg:
        node = NodeServer(root / "node", pg.url, worker={"enabled": False},
                          console={"port": http_port})  # fmt: skip
        with node:
            node.start()
            scanner = Scanner(node.port, phase)
            stop_polling = threading.Event()

            def poll() -> None:
                while not stop_polling.is_set():
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz",
                                                    timeout=2) as r:  # fmt: skip
                            code = r.status
                    except urllib.error.HTTPError as exc:
                        code = exc.code
                    except OSError:
                        code = 0
                    health.append((time.monotonic(), phase[0], code))
                    stop_polling.wait(0.5)

            poller = threading.Thread(target=poll, daemon=True)
            scanner.start()
            poller.start()
            timings = {}
            time.sleep(10)
            phase[0] = "restart"
            timings["restart"] = pg_ctl("restart")
            phase[0] = "after restart"
            time.sleep(20)
            phase[0] = "stopped"
            pg_ctl("stop")
            time.sleep(args.stop_seconds)
            timings["start"] = pg_ctl("start")
            back = time.monotonic()
            phase[0] = "after start"
            time.sleep(20)
            scanner.stop.set()
            scanner.join(60)
            stop_polling.set()
            poller.join(5)
            rows = pg_rows(pg.url)
            spool = {p.stem for p in (root / "node" / "spool").rglob("*.dcm")}
    print_tables(scanner.told, health, rows, spool, back, timings)


def pg_rows(url: str) -> Counter:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql")) as conn:
        return Counter(r[0] for r in conn.execute("SELECT sop_instance_uid FROM instance"))


def print_tables(told, health, rows: Counter, spool: set[str], back: float, timings) -> None:
    by_phase: dict[str, Counter] = {}
    for _, phase, _, status in told:
        by_phase.setdefault(phase, Counter())[status] += 1
    out = []
    for phase, counts in by_phase.items():
        codes = {f"0x{c:04X}" if c >= 0 else "no association": n for c, n in counts.items()}
        h = [code for _, p, code in health if p == phase]
        out.append([phase, sum(counts.values()), counts.get(0, 0),
                    ", ".join(f"{k} {v}" for k, v in sorted(codes.items()) if k != "0x0000")
                    or "-", f"{sum(c == 503 for c in h)}/{len(h)}"])  # fmt: skip
    print(table(["phase", "instances", "Success", "other answers", "/healthz 503 / polls"], out))
    acked = {uid for _, _, uid, status in told if status == 0}
    first_ok = min((t for t, _, _, s in told if s == 0 and t > back), default=None)
    lost = acked - set(rows)
    duplicated = [uid for uid, n in rows.items() if n > 1]
    unacked_kept = set(rows) - acked
    print(table(["told Success", "in the database", "lost", "duplicated", "kept, not acked",
                 "spool files missing", "first Success after start"],
                [[len(acked), len(rows), len(lost), len(duplicated), len(unacked_kept),
                  len(acked - spool),
                  f"{first_ok - back:.1f} s" if first_ok else "never"]]))  # fmt: skip
    print(
        f"# pg_ctlcluster restart took {timings['restart']:.1f} s, start {timings['start']:.1f} s"
    )


if __name__ == "__main__":
    main()
