"""Crash loop under load: what three scanners were told against what the node keeps.

Three DCMTK storescu scanners (calling AEs SCANNER1-3) send phantom series at once, each
series in one association, resending what was not answered Success until it is (as a
scanner's queue does). Meanwhile:

  A. `mriqa serve` (receiver, worker, forwarder to a real Orthanc) is killed with kill -9 at
     random moments, --cycles times, and started again;
  B. with `mriqa serve --no-worker`, a separate `mriqa worker` is killed whenever it holds
     claimed instances (mid-batch), --kills times;
  C. `mriqa serve` is killed whenever a forwarding lane holds claimed jobs (mid-batch),
     --kills times.

Then, with the node left running until the work is done: every instance a scanner was told
Success for must be in the database once and whole in the spool, every series decided with
one current verdict covering all its instances, no series with two open alerts or two alerts
for one verdict, every forward job sent and Orthanc holding every instance. Prints tables.
Run: .venv/bin/python stress/crash_loop.py [--db sqlite|postgresql|both] [--cycles 20]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    CALLING_AET,
    DCMTK_ENV,
    NODE_AET,
    NODE_ENV,
    NodeServer,
    OrthancServer,
    SqliteDb,
    ThrowawayPostgres,
    machine_line,
    make_series,
    postgres_available,
    table,
    tool,
    wait_until,
)
from sqlalchemy import create_engine, text  # noqa: E402

SCANNERS = ("SCANNER1", "SCANNER2", "SCANNER3")
SENT = re.compile(r"Sending file: (.+)$")
ANSWER = re.compile(r"Received Store Response \((\w+)")


@dataclass
class Told:
    """What the scanners were told, per file."""

    success: dict[Path, float] = field(default_factory=dict)  # file -> when
    other: Counter = field(default_factory=Counter)  # non-Success answers by status text
    sends: Counter = field(default_factory=Counter)  # storescu runs per file
    lock: threading.Lock = field(default_factory=threading.Lock)


class Scanner(threading.Thread):
    """Sends its series one after another; resends what was not answered Success."""

    def __init__(self, aet: str, port: int, series: list[list[Path]], told: Told,
                 pause: float) -> None:  # fmt: skip
        super().__init__(daemon=True, name=aet)
        self.aet, self.port, self.series, self.told = aet, port, series, told
        self.pause = pause  # between series, as a scanner acquires them
        self.last = threading.Event()  # finish the series in hand, then stop
        self.abandon = threading.Event()

    def run(self) -> None:
        for files in self.series:
            pending = list(files)
            while pending and not self.abandon.is_set():
                acked = self._send(pending)
                pending = [f for f in pending if f not in acked]
                if pending:
                    time.sleep(0.3)  # the node is down or refused: try again shortly
            if self.last.wait(self.pause):
                return

    def _send(self, files: list[Path]) -> set[Path]:
        cmd = [tool("storescu"), "-v", "-aet", self.aet, "-aec", NODE_AET, "-to", "10",
               "-ta", "10", "-td", "30", "127.0.0.1", str(self.port), *map(str, files)]  # fmt: skip
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=120)
            lines = (out.stdout + out.stderr).splitlines()
        except subprocess.TimeoutExpired:
            lines = []
        acked, current = set(), None
        with self.told.lock:
            for f in files:
                self.told.sends[f] += 1
            for line in lines:
                if m := SENT.search(line):
                    current = Path(m[1].strip())
                elif (m := ANSWER.search(line)) and current is not None:
                    if m[1] == "Success":
                        acked.add(current)
                        self.told.success.setdefault(current, time.monotonic())
                    else:
                        self.told.other[m[1]] += 1
                    current = None
        return acked


class Node:
    """The node under test: `mriqa serve` (optionally without its worker) and a `mriqa
    worker` process, both killable."""

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.worker: subprocess.Popen | None = None
        self.kills: Counter = Counter()

    def start(self, worker_inside: bool = True) -> None:
        args = ("serve",) if worker_inside else ("serve", "--no-worker")
        self.server.start(timeout=180, args=args)

    def kill_serve(self) -> None:
        proc = self.server.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.server.stop()  # closes the log; the process is already gone
        self.kills["serve"] += 1

    def start_worker(self) -> None:
        env = {**NODE_ENV, "MRIQA_CONFIG": str(self.server.config_path)}
        log = (self.server.workdir / "worker.log").open("ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "mriqa_node.cli", "worker"], env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.server.workdir,
        )  # fmt: skip

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.kill(self.worker.pid, signal.SIGKILL)
        self.worker.wait(10)
        self.kills["worker"] += 1

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.terminate()
            self.worker.wait(30)
        self.server.stop()


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def run_scanners(port: int, series: dict[str, list[list[Path]]], told: Told,
                 pause: float = 0.0) -> list[Scanner]:  # fmt: skip
    scanners = [Scanner(aet, port, series[aet], told, pause) for aet in SCANNERS]
    for s in scanners:
        s.start()
    return scanners


def wait_scanners(scanners: list[Scanner], timeout: float = 900.0) -> None:
    deadline = time.monotonic() + timeout
    for s in scanners:
        s.join(max(1.0, deadline - time.monotonic()))
        if s.is_alive():
            s.abandon.set()
            raise RuntimeError(f"{s.aet} did not finish in {timeout:.0f} s")


def crash_loop(node: Node, cycles: int, series, told: Told, rng: random.Random,
               pause: float) -> list[float]:  # fmt: skip
    """Phase A: kill -9 `mriqa serve` at random moments while the scanners send; they stop
    after the series in hand once the last cycle is done."""
    scanners = run_scanners(node.server.port, series, told, pause)
    downtimes = []
    for _ in range(cycles):
        time.sleep(rng.uniform(1.0, 4.0))
        node.kill_serve()
        down = time.monotonic()
        time.sleep(rng.uniform(0.1, 1.5))
        node.start()
        downtimes.append(time.monotonic() - down)
    for s in scanners:
        s.last.set()
    wait_scanners(scanners)
    return downtimes


def kill_when(engine, sql: str, kill, restart, kills: int, busy_timeout: float = 60.0) -> int:
    """Kill (then restart) whenever ``sql`` counts claimed work: mid-batch by construction."""
    done = 0
    while done < kills:
        try:
            wait_until(lambda: count(engine, sql) > 0, busy_timeout, "claimed work", 0.02)
        except Exception:
            break  # nothing left to interrupt
        kill()
        done += 1
        restart()
    return done


def settle(engine, orthanc: OrthancServer, expected: int, timeout: float = 600.0) -> float:
    """Wait until everything is scored, decided and forwarded; returns the seconds it took."""
    start = time.monotonic()

    def done() -> bool:
        return (
            count(engine, "select count(*) from instance where state in ('pending','claimed')") == 0
            and count(engine, "select count(*) from series where state <> 'decided'") == 0
            and count(engine, "select count(*) from forward_job where state <> 'sent'") == 0
            and orthanc.instance_count() >= expected
        )

    wait_until(done, timeout, "scoring, verdicts and forwarding to finish", 1.0)
    return time.monotonic() - start


# Per series: its current (newest) verdict, and whether that verdict came after the series'
# last instance and last score (so that it covers all of them; the OOD guard may leave slices
# out of its count, so the count itself is not the test).
CURRENT_VERDICTS = """
    select s.id, v.id, v.decided_at >= s.last_received_at and v.decided_at >= (
        select max(i.scored_at) from instance i where i.series_id = s.id)
    from series s left join series_verdict v
    on v.id = (select max(id) from series_verdict where series_id = s.id)
"""
REPEATS = {  # what must never happen twice
    "alerts": "select verdict_id from alert group by verdict_id having count(*) > 1",
    "open alerts": "select series_id from alert where state = 'open' group by series_id"
    " having count(*) > 1",
    "scores": "select instance_id, frame, model_version_id from slice_score"
    " group by instance_id, frame, model_version_id having count(*) > 1",
}


def check(engine, spool: Path, told: Told, uid_of: dict[Path, str], orthanc) -> list[list]:
    uid_of = {f: uid for f, uid in uid_of.items() if told.sends[f]}  # series never started
    acked = {uid_of[f] for f in told.success}
    with engine.connect() as conn:
        rows = conn.execute(text("select sop_instance_uid, spool_path from instance")).all()
        series = conn.execute(text(CURRENT_VERDICTS)).all()
        twice = {k: conn.execute(text(f"select count(*) from ({q}) x")).scalar()
                 for k, q in REPEATS.items()}  # fmt: skip
        attempts, jobs = conn.execute(text("select sum(attempts), count(*) from forward_job")).one()
    in_db = Counter(uid for uid, _ in rows)
    whole = sum(1 for _, p in rows if _whole(spool / p))
    undecided = sum(1 for _, v, _ in series if v is None)
    stale = sum(1 for _, v, after_all in series if v is not None and not after_all)
    return [
        ["instances sent (distinct)", len(uid_of)],
        ["storescu runs per instance (max)", max(told.sends.values(), default=0)],
        ["told Success", len(acked)],
        ["other answers", ", ".join(f"{k} {v}" for k, v in told.other.items()) or "-"],
        ["in the database", len(in_db)],
        ["lost (told Success, not kept)", len(acked - set(in_db))],
        ["duplicated rows", sum(n > 1 for n in in_db.values())],
        ["kept, never told Success", len(set(in_db) - acked)],
        ["spool files whole", f"{whole}/{len(rows)}"],
        ["series / without a verdict", f"{len(series)} / {undecided}"],
        ["current verdict older than an instance or score", stale],
        ["slices scored twice by one model", twice["scores"]],
        ["verdicts with two alerts / series with two open alerts",
         f"{twice['alerts']} / {twice['open alerts']}"],
        ["forward jobs (attempts)", f"{jobs} ({attempts})"],
        ["Orthanc instances", orthanc.instance_count()],
    ]  # fmt: skip


def _whole(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        return len(ds.PixelData) > 0
    except Exception:
        return False


def run(db: str, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix=f"mriqa-crash-{db}-"))
    phases = {"A": args.series, "B": 4, "C": 4}
    series: dict[str, dict[str, list[list[Path]]]] = {}
    uid_of: dict[Path, str] = {}
    import pydicom

    seed = 1000
    for phase, n in phases.items():
        series[phase] = {}
        for aet in SCANNERS:
            files = make_series(root / "data" / phase / aet, n, args.slices, seed0=seed,
                                size=args.size)  # fmt: skip
            seed += n
            series[phase][aet] = files
            for f in (f for s in files for f in s):
                uid_of[f] = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
    (root / "db").mkdir()
    database = SqliteDb(root / "db") if db == "sqlite" else ThrowawayPostgres("mriqa_crash")
    told = Told()
    with database, OrthancServer(root / "orthanc") as orthanc:
        orthanc.start()
        destination = {"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                       "port": orthanc.port, "send_sr": False, "send_kos": False, "batch": 16,
                       "backoff_max_seconds": 2.0}  # fmt: skip
        server = NodeServer(
            root / "node", database.url,
            dicom={"allowed_calling_aets": [*SCANNERS, CALLING_AET]},
            series={"idle_seconds": 2.0, "release_grace_seconds": 0.5},
            worker={"poll_seconds": 0.1, "claim_seconds": 20.0},
            pacs={"destinations": [destination]},
            console={"enabled": False},
        )  # fmt: skip
        node = Node(server)
        engine = create_engine(database.url)
        try:
            node.start()
            t0 = time.monotonic()
            downtimes = crash_loop(node, args.cycles, series["A"], told, rng, args.pause)
            phase_a = time.monotonic() - t0

            # B: scoring in its own process, killed while it holds claimed instances.
            node.kill_serve()
            node.start(worker_inside=False)
            node.start_worker()
            scanners = run_scanners(server.port, series["B"], told)
            claimed = "select count(*) from instance where state = 'claimed'"
            worker_kills = kill_when(engine, claimed, node.kill_worker, node.start_worker,
                                     args.kills)  # fmt: skip
            wait_scanners(scanners)

            # C: serve (its forwarding lanes) killed while a lane holds claimed jobs.
            node.kill_worker()
            node.kill_serve()
            node.start()
            scanners = run_scanners(server.port, series["C"], told)
            lanes = ("select count(*) from forward_job"
                     " where state = 'pending' and claimed_by is not null")  # fmt: skip
            lane_kills = kill_when(engine, lanes, node.kill_serve, node.start, args.kills)
            wait_scanners(scanners)
            settled = settle(engine, orthanc, sum(1 for f in uid_of if told.sends[f]))
            rows = check(engine, root / "node" / "spool", told, uid_of, orthanc)
        finally:
            node.stop()
            engine.dispose()
    print(f"\n## {db}: {args.cycles} kill -9 cycles of serve, {worker_kills} of a worker "
          f"mid-batch, {lane_kills} of serve with a forwarding lane mid-batch")  # fmt: skip
    print(f"# phase A {phase_a:.0f} s; serve down for {min(downtimes):.1f}-{max(downtimes):.1f} s "
          f"per kill (restart included); settled {settled:.0f} s after the last send")  # fmt: skip
    print(table(["what", "count"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--cycles", type=int, default=20, help="kill -9 cycles of serve (phase A)")
    ap.add_argument("--kills", type=int, default=5, help="kills in phases B and C each")
    ap.add_argument(
        "--series",
        type=int,
        default=30,
        help="series ready per scanner in phase A (those not begun are not sent)",
    )
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between a scanner's series")
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--size", type=int, default=128, help="phantom matrix (pixels)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print(machine_line())
    dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for db in dbs:
        if db == "postgresql" and not postgres_available():
            print("\n## postgresql: skipped, not reachable on 127.0.0.1:5432")
            continue
        run(db, args)


if __name__ == "__main__":
    main()
