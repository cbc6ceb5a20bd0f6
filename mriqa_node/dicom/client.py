"""Opening associations as a client (SCU), in one place: TCP_NODELAY, TLS and clean release.

The sender (`mriqa send`), the forwarder and query/retrieve all connect through here, so a
fix to how we connect (a socket option, a TLS default) reaches every one of them.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Iterator
from typing import Any

from pynetdicom import AE, Association, evt

from mriqa_node.config import RemoteAE


def _no_delay(event: evt.Event) -> None:
    """Nagle's algorithm holds each request's last short PDU until the peer's delayed ACK
    (~40 ms); pynetdicom leaves it on. Measured forwarding to Orthanc: 2.3x faster off."""
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NO_DELAY = [(evt.EVT_CONN_OPEN, _no_delay)]


class NotAssociated(Exception):
    """The peer rejected, aborted or did not answer the association request."""

    def __init__(self, assoc: Association) -> None:
        super().__init__("association rejected, aborted or not answered")
        self.assoc = assoc


def tls_context(peer: RemoteAE) -> ssl.SSLContext:
    """Client TLS for ``peer``: verify it with tls_ca (else the system CAs); present
    tls_cert/tls_key when set (for peers that require a client certificate). Raises OSError
    or ssl.SSLError for unreadable files."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=peer.tls_ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if peer.tls_cert:
        context.load_cert_chain(peer.tls_cert, peer.tls_key or None)
    return context


def open_association(ae: AE, host: str, port: int, called_aet: str,
                     tls: ssl.SSLContext | None = None) -> Association:  # fmt: skip
    """``ae.associate`` with TCP_NODELAY, given a context TLS (the peer's certificate checked
    against ``host``), and responses kept for the sends waiting for them (keep_responses). The
    association may not be established: check it."""
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_aet, tls_args=tls_args,
                         evt_handlers=NO_DELAY)  # fmt: skip
    keep_responses(assoc)
    return assoc


def keep_responses(assoc: Association) -> None:
    """Hand a response the association's reactor thread took back to the request waiting for
    it. pynetdicom pauses that thread while a send_* waits, but the pause can be stale: a
    response that comes back within the thread's wake-up (a fast peer, such as this node's
    own receiver, refusing an instance at once) is taken by it, logged as "Received unexpected
    ... service message" and dropped, and the send waits for its DIMSE timeout
    (pydicom/pynetdicom#875). Only this association's method is replaced."""
    serve_request = assoc._serve_request

    def serve_or_return(msg: Any, context_id: int) -> None:
        if msg.is_valid_request:
            serve_request(msg, context_id)
        else:
            assoc.dimse.msg_queue.put((context_id, msg))

    assoc._serve_request = serve_or_return  # type: ignore[method-assign]


@contextlib.contextmanager
def association(ae: AE, host: str, port: int, called_aet: str,
                tls: ssl.SSLContext | None = None) -> Iterator[Association]:  # fmt: skip
    """An established association (NotAssociated otherwise); released on a normal exit,
    aborted when the body raises (a request may still be in flight)."""
    assoc = open_association(ae, host, port, called_aet, tls)
    if not assoc.is_established:
        raise NotAssociated(assoc)
    try:
        yield assoc
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
