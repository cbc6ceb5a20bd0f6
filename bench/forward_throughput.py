"""Forwarding rate: instances/s from the node's outbox to Orthanc, against DCMTK storescu.

The same files go to the same kind of peer in the same run, each time to a fresh Orthanc (its
own empty temp storage and index, fsync on: its default), so neither side pays for duplicates:

  storescu        DCMTK storescu sends every file in one association (TCP_NODELAY=1)
  pynetdicom      a bare pynetdicom SCU in this process: one association, send_c_store(path)
                  for each file (the floor of any pynetdicom-based sender; not run by default)
  node-sqlite/B   the node's real Forwarder + StoreSender in a thread of this process, on a
                  fresh SQLite database (WAL, synchronous=FULL) whose outbox holds one job per
                  instance, destination batch B (instances per association)
  node-pg/B       the same on a throwaway PostgreSQL database (--db sqlite,postgres)

The node's sender turns Nagle off on its sockets (pynetdicom 3.0 leaves it on). Diagnostic
(--nodelay): the bare pynetdicom sender again with TCP_NODELAY set, patched in this process only
("+nodelay" row). The node rows use the destination's default `lanes` (associations in
parallel, each sending a different series); --lanes N adds rows with `lanes = N` (N associations
in parallel, sharing the outbox through claims; "xN" rows).

For the node, the instances are first kept through Intake.store with one ForwardRule to "pacs"
(spool file + row + forward job in one transaction, fsync on): the receive path, benchmarked by
bench/ingest.py and not timed here. The clock then runs from starting the Forwarder until every
job is recorded "sent" (the lane's ForwardQueue.record commit for the last one returned; the
table is checked afterwards), and Orthanc must hold every instance.

Run: .venv/bin/python bench/forward_throughput.py [--help]
     .venv/bin/python bench/forward_throughput.py --breakdown   # where the node's time goes
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    HOST,
    NODE_AET,
    BenchError,
    OrthancServer,
    SqliteDb,
    ThrowawayPostgres,
    machine_line,
    make_series,
    median,
    postgres_available,
    storescu,
    table,
)

TARGET_RATIO = 0.8  # the issue: forwarding >= 0.8x storescu to the same Orthanc
DESTINATION = "pacs"
POLL_SECONDS = 0.5  # only to notice a stuck forwarder


@dataclass(frozen=True)
class Config:
    sender: str  # storescu, pynetdicom, node
    db: str = "-"  # sqlite, postgres (node only)
    batch: int = 0  # instances per association (node only)
    nodelay: bool = False  # diagnostic: TCP_NODELAY on the bare pynetdicom sender's socket
    lanes: int = 0  # the destination's lanes (associations in parallel); 0: the config default

    @property
    def label(self) -> str:
        name = self.sender
        if self.sender == "node":
            name = f"node-{'pg' if self.db == 'postgres' else self.db}/{self.batch}"
            name += f"x{self.lanes or default_lanes()}"
        return name + ("+nodelay" if self.nodelay else "")


@contextmanager
def pynetdicom_nodelay():
    """TCP_NODELAY on every client socket pynetdicom makes while inside (this process only)."""
    from pynetdicom.transport import AssociationSocket

    original = AssociationSocket._create_socket

    def create(self, address):
        sock = original(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    AssociationSocket._create_socket = create
    try:
        yield
    finally:
        AssociationSocket._create_socket = original


def default_lanes() -> int:
    from mriqa_node.config import DestinationConfig

    return DestinationConfig.model_fields["lanes"].default


def default_batch() -> int:
    from mriqa_node.config import DestinationConfig

    return DestinationConfig.model_fields["batch"].default


# -- data ----------------------------------------------------------------------------------------


def load_instances(files: list[Path]) -> list[tuple[object, bytes]]:
    """(InstanceHeader, file bytes) per file: what the node's SCP hands Intake.store."""
    import pydicom

    from mriqa_node.dicom.headers import parse_header

    out = []
    for path in files:
        ds = pydicom.dcmread(path)
        out.append((parse_header(ds, ds.file_meta.TransferSyntaxUID), path.read_bytes()))
    return out


# -- the node's outbox ---------------------------------------------------------------------------


class Outbox:
    """A fresh database and spool whose outbox holds one pending job per instance for "pacs"."""

    def __init__(self, workdir: Path, db_url: str, instances: list[tuple[object, bytes]]) -> None:
        from mriqa_node.db import migrate
        from mriqa_node.db.engine import make_engine, make_sessionmaker
        from mriqa_node.domain.routing import ForwardRule
        from mriqa_node.services.intake import Intake
        from mriqa_node.spool import Spool

        self.engine = make_engine(db_url)
        self.read_engine = make_engine(db_url, readonly=True)
        migrate.upgrade(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.reads = make_sessionmaker(self.read_engine)
        self.spool = Spool(workdir / "spool", fsync=True)
        intake = Intake(self.sessions, self.spool, routes=[ForwardRule(DESTINATION)])
        for header, encoded in instances:
            intake.store(header, encoded, "SCANNER1")
        if self.count("pending") != len(instances):
            raise BenchError(f"{self.count('pending')} of {len(instances)} jobs queued")

    def count(self, state: str) -> int:
        from sqlalchemy import func, select

        from mriqa_node.db.models import ForwardJob, ForwardState

        j = ForwardJob
        with self.reads() as session:
            query = select(func.count(j.id)).where(
                j.destination == DESTINATION, j.state == ForwardState(state)
            )
            return session.scalar(query) or 0

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


def forward_all(outbox: Outbox, port: int, called_aet: str, batch: int, n: int, queue=None,
                sender=None, lanes: int = 0) -> float:  # fmt: skip
    """Run the node's Forwarder (the destination with ``lanes`` associations in parallel)
    until all n jobs are sent; seconds from its start.

    The end is when the ForwardQueue.record call that commits the n-th "sent" returns (taken in
    the lane itself, so watching costs the lane nothing); the table is then checked.
    """
    from mriqa_node.config import DestinationConfig
    from mriqa_node.dicom.forward import StoreSender
    from mriqa_node.services.forwarding import Forwarder, ForwardQueue

    dest = DestinationConfig(
        name=DESTINATION,
        ae_title=called_aet,
        host=HOST,
        port=port,
        batch=batch,
        lanes=lanes or default_lanes(),
    )
    queue = queue or ForwardQueue(outbox.sessions, outbox.reads)
    all_sent = threading.Event()
    lock = threading.Lock()
    sent = [0, 0.0]  # jobs recorded as sent, perf_counter() when the last of them was

    def record(dest, worker_id, jobs, outcomes, _record=queue.record):
        _record(dest, worker_id, jobs, outcomes)
        with lock:
            sent[0] += sum(o.sent for o in outcomes.values())
            if sent[0] >= n and not all_sent.is_set():
                sent[1] = time.perf_counter()
                all_sent.set()

    queue.record = record
    sender = sender or StoreSender(outbox.spool, NODE_AET)
    forwarder = Forwarder(queue, [dest], sender, worker_id=f"{socket.gethostname()}:{os.getpid()}")
    stop = threading.Event()
    threads = [threading.Thread(target=forwarder.run, args=(stop,), name="forwarder", daemon=True)]
    deadline = time.monotonic() + 60 + n  # bounded: ~1 s per instance would be a broken run
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    try:
        while not all_sent.wait(POLL_SECONDS):
            if time.monotonic() > deadline or not all(t.is_alive() for t in threads):
                failed, pending = outbox.count("failed"), outbox.count("pending")
                raise BenchError(f"forwarder stuck: {pending} pending, {failed} failed")
    finally:
        stop.set()
        forwarder.wake.set()
        for thread in threads:
            thread.join(30)
    if outbox.count("sent") != n:
        raise BenchError(f"{outbox.count('sent')} of {n} jobs sent in the database")
    return sent[1] - t0


# -- the peers -----------------------------------------------------------------------------------


def pynetdicom_send(port: int, called_aet: str, files: list[Path]) -> float:
    """A bare pynetdicom SCU: the files in one association, as StoreSender sends them."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import MRImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=NODE_AET)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    t0 = time.perf_counter()
    assoc = ae.associate(HOST, port, ae_title=called_aet)
    if not assoc.is_established:
        raise BenchError("pynetdicom: association not established")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                raise BenchError(f"pynetdicom: {path.name} not stored ({status})")
    finally:
        if assoc.is_established:
            assoc.release()
    return time.perf_counter() - t0


def one_run(
    config: Config, files: list[Path], instances: list[tuple[object, bytes]], workdir: Path
) -> float:
    """A fresh Orthanc (and, for the node, a fresh outbox), every file sent, checked; seconds."""
    with pynetdicom_nodelay() if config.nodelay else nullcontext():
        return _one_run(config, files, instances, workdir)


def _one_run(
    config: Config, files: list[Path], instances: list[tuple[object, bytes]], workdir: Path
) -> float:
    n = len(files)
    if config.sender == "node":
        with ThrowawayPostgres() if config.db == "postgres" else SqliteDb(workdir) as db:
            outbox = Outbox(workdir, db.url, instances)  # the receive path: not timed
            try:
                os.sync()  # flush the intake's dirty pages before the clock starts
                with OrthancServer(workdir / "orthanc") as orthanc:
                    orthanc.start()
                    elapsed = forward_all(
                        outbox, orthanc.port, orthanc.aet, config.batch, n, lanes=config.lanes
                    )
                    kept = orthanc.instance_count()
            finally:
                outbox.dispose()
    else:
        with OrthancServer(workdir / "orthanc") as orthanc:
            orthanc.start()
            if config.sender == "storescu":
                elapsed = storescu(orthanc.port, orthanc.aet, files)
            else:
                elapsed = pynetdicom_send(orthanc.port, orthanc.aet, files)
            kept = orthanc.instance_count()
    if kept != n:
        raise BenchError(f"{config.label}: Orthanc holds {kept} of {n} instances")
    return elapsed


# -- breakdown -----------------------------------------------------------------------------------


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed


def breakdown(root: Path, files: list[Path], instances, batch: int, nodelay: bool) -> None:
    """One instrumented node run (SQLite) to a fresh Orthanc: time per step of the lane, with
    pynetdicom's and storescu's per-instance time to the same Orthanc beside it."""
    import pydicom
    import pynetdicom
    from pynetdicom.association import Association

    from mriqa_node.dicom.forward import StoreSender
    from mriqa_node.services.forwarding import ForwardQueue

    n = len(files)
    timers = Timers()
    patched = [
        (pydicom.filereader, "read_file_meta_info"),
        (pynetdicom.AE, "associate"),
        (Association, "send_c_store"),
        (Association, "release"),
    ]
    originals = [(obj, name, getattr(obj, name)) for obj, name in patched]
    workdir = root / "breakdown"
    outbox = Outbox(workdir, f"sqlite:///{workdir / 'mriqa.db'}", instances)
    queue = ForwardQueue(outbox.sessions, outbox.reads)
    queue.claim = timers.wrap("ForwardQueue.claim (1 transaction)", queue.claim)
    queue.record = timers.wrap("ForwardQueue.record (1 transaction)", queue.record)
    sender = timers.wrap("StoreSender (whole batch)", StoreSender(outbox.spool, NODE_AET))
    os.sync()
    try:
        for obj, name, fn in originals:
            setattr(obj, name, timers.wrap(_LABELS[name], fn))
        with OrthancServer(workdir / "orthanc") as orthanc:
            orthanc.start()
            cpu0 = time.process_time()
            elapsed = forward_all(outbox, orthanc.port, orthanc.aet, batch, n, queue, sender)
            node_cpu = time.process_time() - cpu0
            if orthanc.instance_count() != n:
                raise BenchError("breakdown: Orthanc does not hold every instance")
    finally:
        for obj, name, fn in originals:
            setattr(obj, name, fn)
        outbox.dispose()
    peers = {}  # name: (wall seconds, sender CPU seconds)
    for sender_name in ("pynetdicom", "storescu"):
        with OrthancServer(root / f"breakdown-{sender_name}") as orthanc:
            orthanc.start()
            if sender_name == "storescu":
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds = storescu(orthanc.port, orthanc.aet, files)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            else:
                cpu0 = time.process_time()
                seconds = pynetdicom_send(orthanc.port, orthanc.aet, files)
                cpu = time.process_time() - cpu0
            peers[sender_name] = (seconds, cpu)
    rows = []
    for label in sorted(timers.total, key=lambda k: -timers.total[k]):
        rows.append([label, timers.calls[label], f"{1000 * timers.total[label] / n:.2f}",
                     f"{100 * timers.total[label] / elapsed:.0f} %", "-"])  # fmt: skip
    rows.append(["node: whole run (Forwarder start -> all sent)", 1,
                 f"{1000 * elapsed / n:.2f}", "100 %", f"{1000 * node_cpu / n:.2f}"])  # fmt: skip
    for name, (seconds, cpu) in peers.items():
        rows.append([f"{name}: whole run, one association", 1, f"{1000 * seconds / n:.2f}", "-",
                     f"{1000 * cpu / n:.2f}"])  # fmt: skip
    socket_note = ", TCP_NODELAY on pynetdicom's socket (diagnostic)" if nodelay else ""
    print(f"# breakdown: {n} instances, batch {batch}, SQLite, one instrumented run{socket_note}")
    headers = ["step", "calls", "ms per instance", "of the node's wall time",
               "sender CPU ms per instance"]  # fmt: skip
    print(table(headers, rows))


_LABELS = {
    "read_file_meta_info": "read_file_meta_info (per file)",
    "associate": "AE.associate (per batch)",
    "send_c_store": "Association.send_c_store (per file)",
    "release": "Association.release (per batch)",
}


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--series", type=int, default=10, help="series to send (default 10)")
    ap.add_argument("--slices", type=int, default=30, help="slices per series (default 30)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per sender (default 3)")
    batch0 = default_batch()
    ap.add_argument(
        "--batch",
        type=int,
        default=batch0,
        help=f"destination batch checked against the target (default {batch0}, the config's)",
    )
    ap.add_argument(
        "--batches",
        default=f"1,{batch0}",
        help=f"batch sizes run on SQLite (default 1,{batch0}; --batch is always included)",
    )
    ap.add_argument(
        "--db", default="sqlite", help="databases for the node: sqlite, postgres or sqlite,postgres"
    )
    ap.add_argument(
        "--pynetdicom",
        action="store_true",
        help="also a bare pynetdicom SCU (one association), the floor of a pynetdicom sender",
    )
    ap.add_argument(
        "--nodelay",
        action="store_true",
        help="diagnostic: also the bare pynetdicom sender with TCP_NODELAY on its socket",
    )
    ap.add_argument(
        "--lanes",
        type=int,
        default=0,
        help="also the node with this many lanes (1: the destination in strict order)",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: one instrumented node run, time per step of the forwarder lane",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if set(dbs) - {"sqlite", "postgres"}:
        ap.error(f"unknown database(s): {args.db}")
    if "postgres" in dbs and not postgres_available():
        print("PostgreSQL not reachable on 127.0.0.1:5432: skipping node-pg", file=sys.stderr)
        dbs.remove("postgres")
    batches = sorted({int(b) for b in args.batches.split(",") if b.strip()} | {args.batch})
    if min(batches) < 1:
        ap.error("batch sizes are >= 1")

    configs = [Config("storescu")] + ([Config("pynetdicom")] if args.pynetdicom else [])
    for db in dbs:
        for batch in batches if db == "sqlite" else [args.batch]:
            configs.append(Config("node", db, batch))
    if args.nodelay and args.pynetdicom:
        configs.append(Config("pynetdicom", nodelay=True))
    if args.lanes and args.lanes != default_lanes():
        configs += [Config("node", db, args.batch, lanes=args.lanes) for db in dbs]

    with tempfile.TemporaryDirectory(prefix="mriqa-bench-forward-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        series = make_series(root / "data", args.series, args.slices, size=args.size)
        files = [f for s in series for f in s]
        instances = load_instances(files)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"# forward: {len(files)} instances ({args.series} x {args.slices},"
            f" {args.size}x{args.size} 16-bit MR, {size_mb:.0f} MB) to a fresh Orthanc per run;"
            f" data made in {time.perf_counter() - t0:.1f} s"
        )
        print(f"# machine: {machine_line()}")
        print(f"# started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        if args.breakdown:
            with pynetdicom_nodelay() if args.nodelay else nullcontext():
                breakdown(root, files, instances, args.batch, args.nodelay)
            return 0

        times: dict[Config, list[float]] = {c: [] for c in configs}
        for rep in range(args.repeat):
            for config in configs:  # alternating, so drift hits every sender alike
                workdir = root / f"{config.label.replace('/', '-')}-{rep}"
                os.sync()  # the previous run's writeback would slow this run's fsyncs
                elapsed = one_run(config, files, instances, workdir)
                shutil.rmtree(workdir, ignore_errors=True)
                times[config].append(elapsed)
                print(
                    f"  run {rep + 1}/{args.repeat} {config.label:<24} {elapsed:6.2f} s"
                    f"  {len(files) / elapsed:7.1f} inst/s  (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )

    n = len(files)
    rates = {c: n / median(v) for c, v in times.items()}
    ref = rates[configs[0]]
    rows = []
    for config in configs:
        runs = " ".join(f"{n / v:.0f}" for v in times[config])
        # The node claims one series at a time: an association per series and batch.
        per_series = -(-args.slices // config.batch) if config.batch else 0
        assoc = "1" if config.sender != "node" else f"{args.series * per_series}"
        rows.append(
            [config.label, config.db, config.batch or "-", assoc, f"{rates[config]:.0f}", runs,
             f"{rates[config] / ref:.2f}x"]
        )  # fmt: skip
    print()
    headers = ["sender", "database", "batch", "associations", "median inst/s", "runs (inst/s)",
               "vs storescu"]  # fmt: skip
    print(table(headers, rows))
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {os.getloadavg()[0]:.2f}")
    for config in configs:
        default = not config.nodelay and not config.lanes
        if config.sender == "node" and config.batch == args.batch and default:
            ratio = rates[config] / ref
            verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
            print(f"# target {config.label} >= {TARGET_RATIO}x storescu: {ratio:.2f}x ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
