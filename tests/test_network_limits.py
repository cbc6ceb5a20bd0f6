"""Hostile and broken peers on the network: bounded memory, bounded waits, a reason logged,
and the scanner served throughout (issue: reliability, network fuzzing)."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from mriqa_node.dicom.limits import PeerExceedsLimit, UpperLayerMeter
from mriqa_node.phantom import synth_series
from tests.fuzz import mutate_request, recorded_request
from tests.peers import wait_for
from tests.test_failures import rows, send, start_node


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


def pdv(data: bytes, dataset: bool = True, last: bool = False) -> bytes:
    control = (0 if dataset else 1) | (2 if last else 0)
    return struct.pack(">LBB", len(data) + 2, 1, control) + data


def test_the_meter_counts_dataset_fragments_per_message_in_any_chunking() -> None:
    stream = (
        pdu(1, b"x" * 100)  # an association request: not data
        + pdu(4, pdv(b"c" * 50, dataset=False, last=True) + pdv(b"d" * 600))
        + pdu(4, pdv(b"d" * 400, last=True))  # 1,000 dataset bytes: the limit, not more
        + pdu(4, pdv(b"d" * 900, last=True))
    )  # the next message starts from zero
    for chunk in (1, 5, 4096):
        meter = UpperLayerMeter(max_pdu_bytes=2000, max_dataset_bytes=1000)
        for i in range(0, len(stream), chunk):
            meter.feed(stream[i : i + chunk])
        assert meter.dataset_bytes == 0
    too_much = pdu(4, pdv(b"d" * 600)) + pdu(4, pdv(b"d" * 401, last=True))
    for chunk in (5, 64, len(too_much)):  # small reads take the meter's short cut
        over = UpperLayerMeter(max_pdu_bytes=2000, max_dataset_bytes=1000)
        with pytest.raises(PeerExceedsLimit, match="dataset of more than 1,000 bytes"):
            for i in range(0, len(too_much), chunk):
                over.feed(too_much[i : i + chunk])
        assert len(too_much) - i <= chunk + 1  # raised at the byte past the limit, not later
    with pytest.raises(PeerExceedsLimit, match="declares 4,294,967,295 bytes"):
        UpperLayerMeter(2000, 1000).feed(b"\x01\x00\xff\xff\xff\xff")  # the header is enough


def test_the_meter_drops_a_pdu_that_trickles_in_and_not_one_that_flows() -> None:
    meter = UpperLayerMeter(2**20, 2**20, patience_seconds=10)
    request = pdu(1, b"r" * 400)
    for t in range(11):  # one byte a second: let be for ten seconds
        meter.feed(request[t : t + 1], now=1000.0 + t)
    with pytest.raises(PeerExceedsLimit, match="a PDU trickles in: 6 bytes in 11 s"):
        meter.feed(request[11:12], now=1011.0)
    flowing = UpperLayerMeter(2**20, 2**20, patience_seconds=10)
    big = pdu(4, pdv(b"d" * 300_000, last=True))  # 300 kB in 30 s: 10 kB/s is enough
    for k in range(30):
        flowing.feed(big[k * 10_000 : (k + 1) * 10_000], now=2000.0 + k)
    flowing.feed(big[300_000:], now=2030.0)


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
