"""Ingest rate: instances/s received from DCMTK storescu, in one association or N at once.

Receivers, each started fresh (empty storage) for every repetition:

  node-sqlite   `mriqa serve`, worker off, SQLite, fsync on (the default deployment)
  node-pg       the same on a throwaway PostgreSQL database (postgresql://127.0.0.1:5432)
  storescp      DCMTK storescp writing files to a directory (no fsync, no database)
  orthanc       Orthanc 1.x with its own temp storage/index (SyncStorageArea default: fsync)
  pynetdicom    bare pynetdicom AE whose store handler returns Success without keeping anything

Each receiver first gets --warm-up instances of other series (untimed; default as many as are
timed), so the figure is the steady state a running node is in (journal segments recycled,
caches warm); --warm-up 0 measures a cold start. The time is storescu's wall clock (process
start to exit: association, 300 C-STOREs, release), the same for every receiver. With
--associations N, N storescu processes (calling AEs SCANNER1..N) each send a contiguous 1/N
of the same files at once; the time runs from the first start to the last exit. The node's
release response waits until its instances have rows, so the node's time includes its
database. "CPU ms/inst" is the receiver's own processes' CPU time (user + system, its child
processes included; a PostgreSQL server's not) over the timed part, per instance: a figure
other load on the machine hardly moves. Run: .venv/bin/python bench/ingest.py [--help]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BarePynetdicomServer,
    BenchError,
    NodeServer,
    OrthancServer,
    SqliteDb,
    StoreSCPServer,
    ThrowawayPostgres,
    machine_line,
    make_series,
    median,
    postgres_available,
    storescu,
    storescu_parallel,
    table,
)

TARGETS = ("node-sqlite", "node-pg", "storescp", "orthanc", "pynetdicom")
# Diagnostic only (not run by default): the node with [storage] fsync = false, bare pynetdicom
# with a 0.1 ms DUL poll, and bare pynetdicom in as many processes as the node's --receivers.
EXTRA_TARGETS = ("node-sqlite-nofsync", "pynetdicom-poll0.1", "pynetdicom-receivers")


def count_node_instances(db_url: str) -> int:
    from sqlalchemy import func, select

    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.db.models import Instance

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return session.scalar(select(func.count(Instance.id))) or 0
    finally:
        engine.dispose()


def one_run(target: str, files: list[Path], workdir: Path, associations: int = 1,
            node: dict[str, object] | None = None,
            warm: Sequence[Path] = ()) -> tuple[float, float]:  # fmt: skip
    """Start a fresh receiver, send the ``warm`` files (untimed), then every file (timed),
    check, stop; seconds, and the receiver's CPU seconds meanwhile."""

    def send_files(port: int, aet: str, batch: Sequence[Path]) -> float:
        if associations == 1:
            return storescu(port, aet, batch)
        n = len(batch)
        return storescu_parallel(
            port,
            aet,
            [
                batch[i * n // associations : (i + 1) * n // associations]
                for i in range(associations)
            ],
        )

    def send(port: int, aet: str, pid: int) -> float:
        if warm:  # steady state: a node's journal segments recycled, caches filled
            send_files(port, aet, warm)
            os.sync()
        before = tree_cpu_seconds(pid)
        elapsed = send_files(port, aet, files)
        cpu.append(tree_cpu_seconds(pid) - before)
        return elapsed

    cpu: list[float] = []
    dicom = {k: v for k, v in (node or {}).items() if v is not None}
    if target in ("node-sqlite", "node-sqlite-nofsync"):
        db_url = f"sqlite:///{workdir / 'mriqa.db'}"
        storage = {"fsync": target == "node-sqlite"}
        with NodeServer(workdir, db_url, worker={"enabled": False}, storage=storage,
                        dicom=dicom) as server:  # fmt: skip
            server.start()
            elapsed = send(server.port, "MRIQA", server.proc.pid)
            kept = count_node_instances(db_url)
    elif target == "node-pg":
        with (
            ThrowawayPostgres() as pg,
            NodeServer(workdir, pg.url, worker={"enabled": False}, dicom=dicom) as server,
        ):
            server.start()
            elapsed = send(server.port, "MRIQA", server.proc.pid)
            kept = count_node_instances(pg.url)
    elif target == "storescp":
        with StoreSCPServer(workdir) as scp:
            scp.start()
            elapsed = send(scp.port, scp.aet, scp.proc.pid)
            kept = sum(1 for p in (workdir / "out").iterdir() if p.is_file())
    elif target == "orthanc":
        with OrthancServer(workdir) as orthanc:
            orthanc.start()
            elapsed = send(orthanc.port, orthanc.aet, orthanc.proc.pid)
            kept = orthanc.instance_count()
    elif target in ("pynetdicom", "pynetdicom-poll0.1", "pynetdicom-receivers"):
        poll = 0.1 if target == "pynetdicom-poll0.1" else None
        processes = int(dicom.get("receivers", 1)) if target == "pynetdicom-receivers" else 1
        with BarePynetdicomServer(workdir, poll, processes) as bare:
            bare.start()
            elapsed = send(bare.port, bare.aet, bare.proc.pid)
            kept = len(files) + len(warm)  # keeps nothing by design
    else:
        raise ValueError(target)
    if kept != len(files) + len(warm):
        raise BenchError(f"{target}: {kept} of {len(files) + len(warm)} instances kept")
    return elapsed, cpu[0]


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (a node's receiver processes), from
    /proc; a figure that other load on the machine hardly moves, unlike the rate."""
    tick = os.sysconf("SC_CLK_TCK")
    pids, total = [pid], 0.0
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in task.read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def breakdown(root: Path, n_instances: int = 60) -> None:
    """In-process cost per instance of each step of the node's receive path (no network).

    The handler (StoreSCP.handle_store): read_header (one scan of the bytes; pydicom's decode
    and parse_header, its fallback, for comparison), the file meta prefix (pynetdicom's own
    encoding for comparison), JournaledIntake.accept (journal record + fdatasync). Behind it:
    the applier's batches (spool files, one syncfs, rows in one transaction). For comparison,
    the previous synchronous Intake.store (file fsync + directory fsync + a transaction each).
    """
    import io

    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dsutils import create_file_meta, decode, encode_file_meta

    from mriqa_node.config import load_config
    from mriqa_node.dicom import upper
    from mriqa_node.dicom.headers import parse_header, read_header
    from mriqa_node.dicom.part10 import file_prefix
    from mriqa_node.journal import Journal
    from mriqa_node.node import Node
    from mriqa_node.phantom import synth_series
    from mriqa_node.services.receiving import JournaledIntake

    datasets = []
    while len(datasets) < n_instances + 1:
        k = len(datasets) // 30
        datasets += synth_series(30, seed=700 + k, series_number=k + 1)
    datasets = datasets[: n_instances + 1]
    received = []  # the data set bytes as they come off the wire (Explicit VR Little Endian)
    for ds in datasets:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        received.append(buf.getvalue())
    ts = datasets[0].file_meta.TransferSyntaxUID

    rows = []

    def timed(label: str, fn, items) -> list:
        t0, c0 = time.perf_counter(), time.process_time()
        out = [fn(x) for x in items]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append([label, f"{1000 * wall / len(items):.2f}", f"{1000 * cpu / len(items):.2f}"])
        return out

    buffer = upper.MessageBuffer()

    def assemble(pdus: bytes) -> bytes:
        """What the receiver does with one data set's P-DATA PDUs, minus the socket reads:
        split the PDVs, append each behind the file meta (dicom/scp.py, Association)."""
        buffer.start(file_prefix(*sops[0], ts))
        view, i = memoryview(pdus), 0
        while i < len(view):
            length = upper.PDU_HEADER.unpack_from(view, i)[1]
            for _, _, _, data in upper.iter_pdvs(view[i + 6 : i + 6 + length]):
                buffer.add(data)
            i += 6 + length
        return buffer.take()

    timed("read_header: one scan of the bytes (the handler's path)",
          lambda b: read_header(b, ts, None), received)  # fmt: skip
    decoded = timed(
        "  pydicom instead: decode the data set (event.dataset)",
        lambda b: decode(io.BytesIO(b), False, True),
        received,
    )
    headers = timed("  pydicom instead: parse_header", lambda d: parse_header(d, ts), decoded)
    sops = [(h.sop_class_uid, h.sop_instance_uid) for h in headers]
    encoded = timed(
        "file_prefix + data set (the handler's path)",
        lambda i: file_prefix(*sops[i], ts) + received[i],
        range(len(sops)),
    )
    # storescu sends 128 KiB PDUs to a receiver that announces no limit, as the node does
    streams = [upper.encode_pdata(1, False, raw, 131072) for raw in received]
    timed("the receiver's 128 KiB PDUs -> file meta + data set (socket reads aside)",
          assemble, streams)  # fmt: skip
    timed(
        "  pynetdicom instead: create_file_meta + encode_file_meta",
        lambda c: encode_file_meta(create_file_meta(sop_class_uid=c[0], sop_instance_uid=c[1],
                                                    transfer_syntax=ts)),
        sops,
    )  # fmt: skip

    @contextlib.contextmanager
    def fresh_node(work: Path, engine: str, fsync: bool):
        with ThrowawayPostgres() if engine == "postgresql" else SqliteDb(work) as db:
            settings = load_config(
                None, storage={"spool_dir": work / "spool", "database_url": db.url, "fsync": fsync}
            )
            node = Node(settings)
            node.upgrade_db()
            try:
                yield node
            finally:
                node.engine.dispose()

    for fsync in (True, False):
        for engine in ("sqlite", "postgresql"):
            if engine == "postgresql" and not postgres_available():
                continue
            on = "on" if fsync else "off"
            with fresh_node(root / f"breakdown-{engine}-{fsync}", engine, fsync) as node:
                journal = Journal(root / f"journal-{engine}-{fsync}", fsync=fsync)
                receiving = JournaledIntake(node.intake, journal, batch=64)
                receiving.accept(headers[0], encoded[0], "BENCH")  # first of a series: untimed
                receiving.apply_pending()
                os.sync()
                timed(
                    f"JournaledIntake.accept (the handler's wait), fsync={on}",
                    lambda i, r=receiving: r.accept(headers[i], encoded[i], "BENCH"),
                    range(1, len(encoded)),
                )
                t0, c0 = time.perf_counter(), time.process_time()
                receiving.apply_pending()  # behind the handler, in its own thread
                n = len(encoded) - 1
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append([f"  behind it: files + rows in batches of 64, {engine}, fsync={on}",
                             f"{1000 * wall / n:.2f}", f"{1000 * cpu / n:.2f}"])  # fmt: skip
                journal.close()
            with fresh_node(root / f"breakdown-{engine}-{fsync}-store", engine, fsync) as node:
                node.intake.store(headers[0], encoded[0], "BENCH")
                os.sync()
                timed(
                    f"previous: Intake.store (synchronous), {engine}, fsync={on}",
                    lambda i, node=node: node.intake.store(headers[i], encoded[i], "BENCH"),
                    range(1, len(encoded)),
                )
    print(table(["step (in process, one thread)", "ms per instance", "CPU ms"], rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--series", type=int, default=10, help="series to send (default 10)")
    ap.add_argument("--slices", type=int, default=30, help="slices per series (default 30)")
    ap.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per receiver (default 3)")
    ap.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}; also {','.join(EXTRA_TARGETS)}",
    )
    ap.add_argument(
        "--warm-up",
        type=int,
        default=None,
        help="instances of other series each receiver gets first, untimed (default: as many"
        " as timed; 0: a cold start)",
    )
    ap.add_argument(
        "--associations",
        type=int,
        default=1,
        help="storescu processes at once, each a 1/N of the files (default 1)",
    )
    ap.add_argument(
        "--receivers",
        type=int,
        default=1,
        help="the node's [dicom] receivers: processes on its port (default 1)",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="instead: cost per instance of each step of the node's store handler, in process",
    )
    args = ap.parse_args()
    if args.breakdown:
        with tempfile.TemporaryDirectory(prefix="mriqa-bench-breakdown-") as tmp:
            print(f"# machine: {machine_line()}")
            breakdown(Path(tmp))
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS) - set(EXTRA_TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    if "node-pg" in targets and not postgres_available():
        print("PostgreSQL not reachable on 127.0.0.1:5432: skipping node-pg", file=sys.stderr)
        targets.remove("node-pg")

    with tempfile.TemporaryDirectory(prefix="mriqa-bench-ingest-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        series = make_series(root / "data", args.series, args.slices, size=args.size)
        files = [f for s in series for f in s]
        warm_n = len(files) if args.warm_up is None else args.warm_up
        warm_series = make_series(root / "warm", -(-warm_n // args.slices), args.slices,
                                  seed0=500, size=args.size) if warm_n else []  # fmt: skip
        warm = [f for s in warm_series for f in s][:warm_n]
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        print(
            f"# ingest: {len(files)} instances ({args.series} x {args.slices},"
            f" {args.size}x{args.size} 16-bit MR, {size_mb:.0f} MB) in {args.associations}"
            f" association(s) at once, after {len(warm)} untimed (warm-up), storescu"
            f" TCP_NODELAY=1; node receivers={args.receivers};"
            f" data made in {time.perf_counter() - t0:.1f} s"
        )
        print(f"# machine: {machine_line()}")

        times: dict[str, list[float]] = {t: [] for t in targets}
        cpus: dict[str, list[float]] = {t: [] for t in targets}
        for rep in range(args.repeat):
            for target in targets:  # interleaved, so drift hits every receiver alike
                workdir = root / f"{target}-{rep}"
                # Flush the previous run's dirty pages: its writeback would slow this run's fsyncs.
                os.sync()
                node = {"receivers": args.receivers}
                elapsed, cpu = one_run(target, files, workdir, args.associations, node, warm)
                shutil.rmtree(workdir, ignore_errors=True)
                times[target].append(elapsed)
                cpus[target].append(cpu)
                print(
                    f"  run {rep + 1}/{args.repeat} {target:<20} {elapsed:6.2f} s"
                    f"  {len(files) / elapsed:7.1f} inst/s",
                    flush=True,
                )

    rates = {t: len(files) / median(v) for t, v in times.items()}
    orthanc, bare = rates.get("orthanc"), rates.get("pynetdicom")
    rows = []
    for target in targets:
        rate = rates[target]
        runs = " ".join(f"{len(files) / v:.0f}" for v in times[target])
        cpu_ms = 1000 * median(cpus[target]) / len(files)
        rows.append([target, f"{rate:.0f}", runs, f"{rate / orthanc:.2f}x" if orthanc else "-",
                     f"{rate / bare:.2f}x" if bare else "-", f"{cpu_ms:.2f}",
                     _note(target)])  # fmt: skip
    print()
    headers = ["receiver", "median inst/s", "runs (inst/s)", "vs Orthanc", "vs pynetdicom",
               "CPU ms/inst", "keeps"]  # fmt: skip
    print(table(headers, rows))
    # The targets of the ingest issue: one association >= 0.9x bare pynetdicom, several at
    # once >= 1.0x Orthanc.
    peer, name, factor = (bare, "pynetdicom", 0.9) if args.associations == 1 else (
        orthanc, "Orthanc", 1.0)  # fmt: skip
    if peer:
        for target in ("node-sqlite", "node-pg"):
            if target in rates:
                ok = rates[target] >= factor * peer
                print(f"# target {target} >= {factor}x {name} ({args.associations} association(s)):"
                      f" {rates[target] / peer:.2f}x ({'met' if ok else 'NOT met'})")  # fmt: skip
    return 0


def _note(target: str) -> str:
    return {
        "node-sqlite": "spool file + SQLite row, fsync",
        "node-sqlite-nofsync": "spool file (no fsync) + SQLite row (synchronous=FULL)",
        "node-pg": "spool file + PostgreSQL row, fsync",
        "storescp": "file, no fsync",
        "orthanc": "file (fsync) + SQLite index",
        "pynetdicom": "nothing",
        "pynetdicom-poll0.1": "nothing; DUL idle sleep 0.1 ms, not 1 ms",
        "pynetdicom-receivers": "nothing; as many processes on the port as --receivers",
    }[target]


if __name__ == "__main__":
    sys.exit(main())
