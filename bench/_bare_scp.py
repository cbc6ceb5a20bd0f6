"""Bare pynetdicom C-STORE SCP for bench/ingest.py: `python bench/_bare_scp.py AET HOST PORT [MS]`.

MS: the DUL reactor's idle sleep per association, in milliseconds (pynetdicom's default 1).

The store handler answers Success without decoding or keeping anything: the ceiling of what
any pynetdicom-based receiver can reach on this machine. Stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import signal
import sys
import threading

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification


def handle_store(event: evt.Event) -> int:
    return 0x0000


def main() -> None:
    aet, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    poll = float(sys.argv[4]) / 1000 if len(sys.argv) > 4 else None

    def handle_open(event: evt.Event) -> None:
        if poll is not None:
            event.assoc.dul._run_loop_delay = poll

    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts[:127]:
        ae.add_supported_context(context.abstract_syntax)
    handlers = [(evt.EVT_C_STORE, handle_store), (evt.EVT_CONN_OPEN, handle_open)]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"bare pynetdicom SCP {aet} on {host}:{port}", flush=True)
    done.wait()
    server.shutdown()


if __name__ == "__main__":
    main()
