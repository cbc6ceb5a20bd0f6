"""Mutation fuzzing of the intake path, shared by the suite's short run (tests/test_fuzz.py,
hypothesis) and the long one (stress/fuzz_intake.py).

Inputs are real files (one per folder of ../shared/data/intake, else the MR images pydicom
ships) with a few random mutations: bit flips, overwritten and inserted bytes, truncation,
repeated chunks, and element lengths set to odd or huge values. Each goes through what the node
does with a received file: the header as the receiver parses it, then the worker's
``prepare_data``, which must return a result or a reason and never raise.

For the network (tests/test_network_limits.py, stress/fuzz_network.py): a real A-ASSOCIATE-RQ,
recorded from pynetdicom, broken in the same spirit.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from mriqa_node.dicom.headers import parse_header, read_header
from mriqa_node.services.scoring import Claim
from mriqa_node.worker import prepare_data

INTAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "intake"
MAX_SEED_BYTES = 1_500_000
CLAIM = Claim(instance_id=0, series_id=0, sop_instance_uid="1.2.3", spool_path="fuzz.dcm")
HUGE = (0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000, 0x0000FFFF, 1, 3)


def seed_files() -> list[Path]:
    """One small file per intake folder (every transfer syntax and vendor there), else
    pydicom's own MR images."""
    if INTAKE.is_dir():
        seeds = []
        for folder in sorted(p for p in INTAKE.iterdir() if p.is_dir()):
            files = sorted(f for f in folder.rglob("*") if f.is_file()
                           and f.stat().st_size <= MAX_SEED_BYTES)  # fmt: skip
            seeds += files[:1] if folder.name != "siemens_trio_ts" else files  # 8 syntaxes
        if seeds:
            return seeds
    from pydicom.data import get_testdata_file

    names = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
             "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "MR2_UNCR.dcm")  # fmt: skip
    return [Path(p) for n in names if (p := get_testdata_file(n))]


def _flip(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i] ^= 1 << rng.randrange(8)


def _overwrite(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i : i + 4] = rng.randbytes(min(4, len(b) - i))


def _truncate(b: bytearray, rng: random.Random) -> None:
    del b[rng.randrange(1, len(b)) :]


def _insert(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i:i] = rng.randbytes(rng.randrange(1, 16))


def _repeat(b: bytearray, rng: random.Random) -> None:
    i = rng.randrange(len(b))
    b[i:i] = b[i : i + rng.randrange(1, 256)]


def _length(b: bytearray, rng: random.Random) -> None:
    """A 16- or 32-bit value after a plausible tag set to an odd or huge length (the declared
    lengths of explicit- and implicit-VR elements, sequences and pixel data)."""
    i = rng.randrange(max(1, len(b) - 12))
    if rng.random() < 0.5:
        b[i : i + 4] = struct.pack("<I", rng.choice(HUGE))
    else:
        b[i : i + 2] = struct.pack("<H", rng.choice((0xFFFF, 0xFFFE, 1, 3)))


MUTATIONS: dict[str, Callable[[bytearray, random.Random], None]] = {
    "flip": _flip, "overwrite": _overwrite, "truncate": _truncate, "insert": _insert,
    "repeat": _repeat, "length": _length,
}  # fmt: skip


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four mutations, most of them past the 128-byte preamble (where they matter)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if len(b) < 2:
            break
        rng.choice(list(MUTATIONS.values()))(b, rng)
    return bytes(b)


def split(data: bytes) -> tuple[bytes, str]:
    """A Part 10 file -> (its data set bytes as a C-STORE carries them, its transfer syntax)."""
    f = BytesIO(data)
    read_preamble(f, False)
    meta = _read_file_meta_info(f)
    return data[f.tell() :], str(meta.get("TransferSyntaxUID", ""))


def ingest(data: bytes, size: int = 64) -> str:
    """The node's outcome for these bytes as a file: "scored", "not scored: <reason kind>",
    or "refused: <exception>" at the header (the receiver answers those with a failure
    status). Raises only if the worker's prepare_data does, which is the bug sought."""
    try:  # as the receiver reads a C-STORE's data set: scanned, else decoded by pydicom
        stream, ts = split(data)

        def decode() -> pydicom.Dataset:
            ds = pydicom.dcmread(BytesIO(data))
            parse_header(ds, ts)  # the receiver's pydicom path checks completeness
            return ds

        read_header(stream, ts, decode)
    except Exception as exc:  # the receiver maps any decode error to a failure status
        header = f"refused: {type(exc).__name__}"
    else:
        header = "accepted"
    prepared = prepare_data(CLAIM, data, size)
    if prepared.frames is not None:
        return f"{header}, scored"
    return f"{header}, not scored: {(prepared.reason or '').split(':')[0][:40]}"


# -- the network: association requests ----------------------------------------------------------


def recorded_request(calling_aet: str = "STORESCU") -> bytes:
    """The bytes of a real A-ASSOCIATE-RQ: pynetdicom associating with a socket that only
    listens."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got = bytearray()

    def take() -> None:
        conn, _ = listener.accept()
        conn.settimeout(1.0)
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                got.extend(chunk)
        conn.close()

    t = threading.Thread(target=take)
    t.start()
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = 1.5
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    ae.associate("127.0.0.1", port, ae_title="MRIQA")
    t.join()
    listener.close()
    return bytes(got)


def mutate_request(request: bytes, rng: random.Random) -> bytes:
    """A real A-ASSOCIATE-RQ broken in one of several ways (or replaced by garbage)."""
    b = bytearray(request)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncated
        del b[rng.randrange(1, len(b)) :]
    elif kind == 2:  # a length field (PDU or item) set to something else
        i = rng.choice([2, *range(74, len(b) - 4, 7)])
        b[i : i + 4] = struct.pack(">L", rng.choice([0, 1, len(b), 2**16, 2**31, 2**32 - 1]))
    elif kind == 3:  # garbage
        return rng.randbytes(rng.randrange(1, 2000))
    elif kind == 4:  # a valid request, then broken P-DATA-TF PDUs
        for _ in range(rng.randrange(1, 4)):
            body = rng.randbytes(rng.randrange(0, 300))
            b += struct.pack(">BxL", 4, rng.choice([len(body), len(body) + 10, 2**31]))
            b += body
    else:  # bytes inserted
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randrange(1, 50))
    return bytes(b)
