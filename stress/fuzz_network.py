"""Hostile and broken peers against a running `mriqa serve`: does the scanner stay served and
the node's memory bounded?

  1. --inputs connections from 127.0.0.3, each sending a mutation of a real A-ASSOCIATE-RQ
     (recorded from pynetdicom), optionally followed by mutated P-DATA-TF PDUs, or plain
     garbage; after each: how the node ended it, and every 100 inputs a C-ECHO from the
     scanner (127.0.0.1);
  2. 500 silent connections at once, from one address and then from 63 addresses (8 each);
  3. a slow sender: an A-ASSOCIATE-RQ one byte a second;
  4. a C-STORE whose dataset declares 2 GB of pixel data (a sparse file, streamed).

The node's resident memory (VmRSS, peak VmHWM) is read from /proc before and after.
Run: .venv/bin/python stress/fuzz_network.py [--inputs 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from _common import (  # noqa: E402
    CALLING_AET,
    NODE_AET,
    NodeServer,
    SqliteDb,
    echo_ok,
    machine_line,
    table,
)
from pynetdicom import AE, _config  # noqa: E402
from pynetdicom.sop_class import MRImageStorage  # noqa: E402

from mriqa_node.dicom.scu import send_datasets  # noqa: E402
from mriqa_node.phantom import synth_series  # noqa: E402
from tests.fuzz import mutate_request, recorded_request  # noqa: E402


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


FUZZER = "127.0.0.3"  # the hostile peer's address; the scanner's is 127.0.0.1


def ending(port: int, payload: bytes, timeout: float) -> str:
    """Send, then wait for the node's first answer or for it to end the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(FUZZER, 0)) as sock:  # fmt: skip
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(payload)
            answer = sock.recv(1)
        except TimeoutError:
            return "waiting for more (2 s)"
        except ConnectionResetError:
            return "reset"
    if not answer:
        return "closed"
    names = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x07: "A-ABORT"}
    return names.get(answer[0], "other answer")


def fuzz_pdus(port: int, inputs: int, seed: int) -> tuple[Counter, int, int]:
    rng, request = random.Random(seed), recorded_request()
    outcomes, echoes, echo_failures = Counter(), 0, 0
    for n in range(inputs):
        outcomes[ending(port, mutate_request(request, rng), timeout=2.0)] += 1
        if n % 100 == 99:
            echoes += 1
            echo_failures += not echo_ok(port, NODE_AET)
    return outcomes, echoes, echo_failures


def silent_flood(port: int, addresses: list[str], per_address: int) -> dict[str, object]:
    """Connections that send nothing, all at once; those the node refuses are closed by us
    as soon as we see it, the others kept until the node ends them."""
    socks, not_connected = [], 0
    for address in addresses:
        for _ in range(per_address):
            s = socket.socket()
            s.settimeout(5.0)
            s.bind((address, 0))
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                not_connected += 1  # the listen backlog was full: the kernel dropped the SYN
                s.close()
                continue
            socks.append(s)
    time.sleep(1.0)
    held = []
    for s in socks:  # closed at accept: readable with EOF at once
        s.setblocking(False)
        try:
            closed = s.recv(1) == b""
        except BlockingIOError:
            closed = False
        except ConnectionResetError:
            closed = True
        if closed:
            s.close()
        else:
            held.append(s)
    start = time.monotonic()
    echo = echo_ok(port, NODE_AET)
    echo_seconds = time.monotonic() - start
    start = time.monotonic()
    for s in held:
        s.settimeout(60)
        with contextlib.suppress(OSError):
            s.recv(1)
        s.close()
    return {
        "connections": len(socks),
        "connect timed out": not_connected,
        "refused or closed at once": len(socks) - len(held),
        "held": len(held),
        "scanner C-ECHO meanwhile": f"ok in {echo_seconds:.2f} s" if echo else "refused",
        "held ones closed by the node after s": round(time.monotonic() - start, 1),
    }


def slow_sender(port: int, request: bytes, limit: float) -> float:
    """Seconds until the node drops a peer sending one byte a second (at most ``limit``)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), source_address=(FUZZER, 0)) as sock:
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            if time.monotonic() - start > limit:
                return float("inf")
            time.sleep(1.0)
    return time.monotonic() - start


def two_gigabyte_dataset(port: int, root: Path) -> str:
    """A C-STORE whose pixel data declares 2 GiB, streamed from a sparse file."""
    ds = synth_series(1, size=64, seed=3)[0]
    path = root / "huge.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    tag = data.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, explicit VR OW
    data[tag + 8 : tag + 12] = struct.pack("<L", 2**31)
    path.write_bytes(bytes(data[: tag + 12]))
    with path.open("r+b") as f:
        f.truncate(tag + 12 + 2**31)  # sparse: no disk used
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(MRImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return "not associated"
    start = time.monotonic()
    try:
        status = assoc.send_c_store(path)
        answer = f"status 0x{int(status.Status):04X}" if status else "connection closed by node"
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.abort()
        path.unlink()
    return f"{answer} after {time.monotonic() - start:.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-limit", type=float, default=120.0)
    args = ap.parse_args()
    print(machine_line())
    root = Path(tempfile.mkdtemp(prefix="mriqa-netfuzz-"))
    (root / "db").mkdir()
    with SqliteDb(root / "db") as db, NodeServer(root / "node", db.url) as node:
        node.start()
        pid = node.proc.pid
        before = memory(pid)
        rows = [["start", "-", "-", before["VmRSS"], before["VmHWM"]]]
        t = time.monotonic()
        outcomes, echoes, failed = fuzz_pdus(node.port, args.inputs, args.seed)
        m = memory(pid)
        rows.append([f"{args.inputs} mutated PDU streams ({time.monotonic() - t:.0f} s)",
                     ", ".join(f"{k} {v}" for k, v in outcomes.most_common()),
                     f"C-ECHO {echoes - failed}/{echoes} ok", m["VmRSS"], m["VmHWM"]])  # fmt: skip
        for label, addresses, per in (("500 silent, one address", ["127.0.0.2"], 500),
                                      ("504 silent, 63 addresses",
                                       [f"127.0.1.{i}" for i in range(1, 64)], 8)):  # fmt: skip
            flood = silent_flood(node.port, addresses, per)
            m = memory(pid)
            rows.append([label, ", ".join(f"{k} {v}" for k, v in flood.items()), "-",
                         m["VmRSS"], m["VmHWM"]])  # fmt: skip
        slow = slow_sender(node.port, recorded_request(), args.slow_limit)
        m = memory(pid)
        rows.append(["one byte a second", f"dropped after {slow:.0f} s", "-", m["VmRSS"],
                     m["VmHWM"]])  # fmt: skip
        huge = two_gigabyte_dataset(node.port, root)
        m = memory(pid)
        rows.append(["dataset declaring 2 GiB", huge, "-", m["VmRSS"], m["VmHWM"]])
        series = synth_series(6, size=128, seed=9)
        report = send_datasets(series, "127.0.0.1", node.port, calling_aet=CALLING_AET)
        rows.append(["a scanner's series afterwards", f"{report.sent}/6 stored", "-", "-", "-"])
        log = node.log()
    print(table(["attack", "how the node ended it", "scanner", "RSS MiB", "peak MiB"], rows))
    reasons = Counter()
    for line in log.splitlines():
        for reason in ("closing connection from", "refused connection from",
                       "refused TLS connection", "Unknown PDU type", "Invalid PDU"):  # fmt: skip
            if reason in line:
                reasons[reason] += 1
    print(table(["logged", "lines"], sorted(reasons.items())))


if __name__ == "__main__":
    main()
