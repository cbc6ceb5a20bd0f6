"""Hostile and broken peers on the network: bounded memory, bounded waits, a reason logged,
and the scanner served throughout (issue: reliability, network fuzzing)."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from mriqa_node.dicom.limits import PduReader, PeerExceedsLimit
from mriqa_node.phantom import synth_series
from tests.fuzz import mutate_request, recorded_request
from tests.peers import wait_for
from tests.test_failures import rows, send, start_node


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def pdv(data: bytes, dataset: bool = True, last: bool = False) -> bytes:
    control = (0 if dataset else 1) | (2 if last else 0)
    return struct.pack(">LBB", len(data) + 2, 1, control) + data


def test_the_reader_refuses_a_pdu_larger_than_the_limit_after_its_header() -> None:
    a, b = socket.socketpair()
    with a, b:
        reader = PduReader(a, max_pdu_bytes=2000)
        b.sendall(pdu(4, pdv(b"d" * 1000, last=True)) + b"\x01\x00\xff\xff\xff\xff")
        pdu_type, body = reader.read()
        assert pdu_type == 4 and len(body) == 1006 and bytes(body[6:]) == b"d" * 1000
        with pytest.raises(PeerExceedsLimit, match="declares 4,294,967,295 bytes"):
            reader.read()  # the header is enough: nothing of the body is waited for
        b.close()
        assert PduReader(a, 2000).read() is None  # closed between PDUs: the end, no error


def test_the_reader_holds_what_a_peer_sends_not_what_it_declares() -> None:
    """A header declaring 512 MiB (within the limit) and ten bytes: a few MiB held, not 512."""
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"\x04\x00" + struct.pack(">L", 512 * 2**20) + b"d" * 10)
        b.close()
        tracemalloc.start()
        try:
            with pytest.raises(ConnectionError, match="inside a PDU"):
                PduReader(a, max_pdu_bytes=2**30).read()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 16 * 2**20
    a, b = socket.socketpair()
    with a, b:  # and a large PDU that does come arrives whole
        big = pdu(4, pdv(bytes(range(256)) * 40_000, last=True))  # 10 MB
        threading.Thread(target=b.sendall, args=(big,), daemon=True).start()
        pdu_type, body = PduReader(a, max_pdu_bytes=2**30).read()
        assert pdu_type == 4 and bytes(body) == big[6:]


def test_the_reader_drops_a_pdu_that_trickles_in_and_not_one_that_flows() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        request = pdu(1, b"r" * 400)

        def trickle(sender: socket.socket) -> None:
            with contextlib.suppress(OSError):
                for k in range(30):  # one byte every 50 ms
                    sender.sendall(request[k : k + 1])
                    time.sleep(0.05)

        threading.Thread(target=trickle, args=(b,), daemon=True).start()
        with pytest.raises(PeerExceedsLimit, match=r"a PDU trickles in: \d+ bytes in 1 s"):
            PduReader(a, 2**20, patience_seconds=0.6).read()
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        big = pdu(4, pdv(b"d" * 300_000, last=True))

        def flow(sender: socket.socket) -> None:
            for k in range(0, len(big), 10_000):  # 300 kB in about 1.5 s
                sender.sendall(big[k : k + 10_000])
                time.sleep(0.05)

        threading.Thread(target=flow, args=(b,), daemon=True).start()
        assert len(PduReader(a, 2**20, patience_seconds=0.6).read()[1]) == 300_006


def _closed_by_node(sock: socket.socket, payload: bytes, within: float) -> float:
    """Send ``payload`` (as far as the node lets us) and return how long until it closes."""
    start = time.monotonic()
    sock.settimeout(within)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(payload)
    with contextlib.suppress(ConnectionResetError):
        while sock.recv(65536):  # an A-ABORT or A-ASSOCIATE-RJ may come first
            pass
    return time.monotonic() - start


def test_hostile_peers_are_cut_off_and_the_scanner_is_served_throughout(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir,
                      max_instance_mb=1, acse_timeout_seconds=2.0, network_timeout_seconds=2.0,
                      max_associations=6, max_associations_per_peer=3)  # fmt: skip
    port = node.settings.dicom.port
    rng = random.Random(5)
    try:
        # A PDU header declaring 4 GiB, then data: closed after the header, nothing held.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            huge = b"\x01\x00\xff\xff\xff\xf0" + bytes(64 * 2**20)
            assert _closed_by_node(sock, huge, 10) < 10
        # Garbage, and PDUs of unknown types, in many shapes.
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                junk = rng.choice([rng.randbytes(rng.randrange(1, 300)),
                                   pdu(rng.choice([0, 8, 0x7F, 0xFF]), rng.randbytes(20)),
                                   pdu(1, rng.randbytes(rng.randrange(0, 200)))])  # fmt: skip
                assert _closed_by_node(sock, junk, 10) < 10
        # Broken association requests: each ends, and none keeps a slot of its address
        # (pynetdicom's reactor thread can die on one, and then no close event comes).
        request = recorded_request("SCANNER1")
        for _ in range(40):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                assert _closed_by_node(sock, mutate_request(request, rng), 10) < 10
        wait_for(lambda: node.scp.open_connections("127.0.0.1") == 0, 10, 0.2, "slots freed")
        # Half a PDU header, then silence: dropped by the timeouts, not held for good.
        with socket.create_connection(("127.0.0.1", port)) as sock:
            assert _closed_by_node(sock, b"\x01\x00\x00", 15) < 15

        # A real association whose dataset is larger than max_instance_mb (1 MiB).
        big = synth_series(1, size=800, seed=47)[0]  # 800 x 800 x 2 bytes = 1.2 MiB
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(MRImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MRIQA")
        assert assoc.is_established
        status = assoc.send_c_store(big)
        assert not status or int(status.Status) != 0  # never Success
        assoc.abort()
        assert rows(node) == {}

        # Silent connections from many addresses fill every slot: the oldest are closed to
        # make room (after a second), so the scanner still gets in while they wait.
        silent = []
        for i in range(2, 22):
            for _ in range(2):
                s = socket.socket()
                s.bind((f"127.0.2.{i}", 0))
                s.connect(("127.0.0.1", port))
                silent.append(s)
        time.sleep(1.5)
        datasets = synth_series(3, size=64, seed=48)
        assert send(node, datasets).sent == 3  # the scanner, after (and beside) all of the above
        for s in silent:
            s.close()
        assert set(rows(node)) == {str(ds.SOPInstanceUID) for ds in datasets}
        assert "declares 4,294,967,280 bytes, more than the" in caplog.text
        assert "a dataset of more than 1,048,576 bytes ([dicom] max_instance_mb)" in caplog.text
        assert "that never associated, to make room" in caplog.text
    finally:
        node.stop()
