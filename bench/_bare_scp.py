"""Bare pynetdicom C-STORE SCP for bench/ingest.py:
`python bench/_bare_scp.py AET HOST PORT [MS [PROCESSES]]`.

MS: the DUL reactor's idle sleep per association, in milliseconds (pynetdicom's default 1).
PROCESSES: that many processes listening on the one port with SO_REUSEPORT, as the node's
`[dicom] receivers` do (default 1).

The store handler answers Success without decoding or keeping anything: the ceiling of what
any pynetdicom-based receiver can reach on this machine. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import multiprocessing
import signal
import socket
import sys
import threading

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer


class SharedPortServer(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT, as the node's receiver processes do."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def handle_store(event: evt.Event) -> int:
    return 0x0000


def _until_signalled() -> None:
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def serve(aet: str, host: str, port: int, poll: float | None, shared: bool) -> None:
    def handle_open(event: evt.Event) -> None:
        if poll is not None:
            event.assoc.dul._run_loop_delay = poll

    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts[:127]:
        ae.add_supported_context(context.abstract_syntax)
    handlers = [(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_open)]
    server = ae.make_server(
        (host, port),
        evt_handlers=handlers,
        server_class=SharedPortServer if shared else ThreadedAssociationServer,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"bare pynetdicom SCP {aet} on {host}:{port}", flush=True)
    _until_signalled()
    server.shutdown()


def main() -> None:
    aet, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    poll = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    processes = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    if processes == 1:
        serve(aet, host, port, poll, shared=False)
        return
    workers = [multiprocessing.Process(target=serve, args=(aet, host, port, poll, True))
               for _ in range(processes)]  # fmt: skip
    for w in workers:
        w.start()
    _until_signalled()
    for w in workers:
        w.terminate()
    for w in workers:
        w.join(10)


if __name__ == "__main__":
    main()
