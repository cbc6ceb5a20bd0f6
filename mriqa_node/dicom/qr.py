"""Query/retrieve SCU (Study Root) for retrospective QA: `mriqa pacs find` and `mriqa pacs pull`.

``find`` runs C-FIND at STUDY or SERIES level and returns plain, JSON-able dicts keyed by DICOM
keyword. Only study and series attributes are asked for and returned: no patient names or IDs
(a ``patient_id`` filter is sent as a matching key, but never copied into the results).

``move`` runs C-MOVE and asks the PACS to send a study (or one series) to an AE title, normally
this node's own (``[dicom] ae_title``): the PACS opens a new association to that AE and sends
C-STOREs, which the running node (`mriqa serve`) receives like a scanner's. The PACS resolves the
destination AE title to a host and port from its own configuration, so it must know this node
(AE title, host, DICOM port), and the node must allow the PACS's AE title as a caller
(``[dicom] allowed_calling_aets``). Many PACS (Orthanc among them) also answer C-FIND and
C-MOVE only for calling AE titles they know.

Every failure (association refused or not answered, a failure status) raises ``QRError`` with a
message meant for a person.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from mriqa_node.config import RemoteAE
from mriqa_node.dicom.client import NotAssociated, association, tls_context
from mriqa_node.domain.retrieve import SUCCESS, MoveResult

log = logging.getLogger(__name__)

Level = Literal["STUDY", "SERIES"]

STUDY_KEYS = (
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Modality",
    "NumberOfSeriesRelatedInstances",
    "StudyInstanceUID",
)
_INTEGER_KEYS = {
    "SeriesNumber",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
}
_LIST_KEYS = {"ModalitiesInStudy"}

WARNING = 0xB000  # C-MOVE: sub-operations complete, one or more failed or had warnings
CANCEL = 0xFE00
PENDING = (0xFF00, 0xFF01)
MOVE_DESTINATION_UNKNOWN = 0xA801

# PS3.4 C.4.1.1.4 / C.4.2.1.5, the failure statuses a person can act on.
_FAILURES = {
    0xA700: "out of resources",
    0xA701: "out of resources: unable to calculate number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0x0122: "SOP class not supported",
}


class QRError(Exception):
    """A query or retrieve failed; str(exc) says what and, where it can, what to do."""


class PacsQR:
    """One PACS as the pull service sees it (services.retrieve.QueryRetrieve): series of a
    study, and moves to our own AE title."""

    def __init__(self, peer: RemoteAE, our_aet: str) -> None:
        self.peer = peer
        self.our_aet = our_aet
        self.name = peer.ae_title

    def find_series(self, study_uid: str) -> list[dict[str, Any]]:
        return find(self.peer, self.our_aet, "SERIES", study_uid=study_uid, modality=None)

    def move(self, study_uid: str, series_uid: str | None) -> MoveResult:
        return move(self.peer, self.our_aet, self.our_aet, study_uid, series_uid)


def dicom_date_range(date_from: date | None, date_to: date | None) -> str:
    """``YYYYMMDD-YYYYMMDD``, open-ended on a missing side; empty (any date) when both are."""
    if date_from and date_to and date_from > date_to:
        raise ValueError(f"date range is empty: {date_from} is after {date_to}")
    if date_from is None and date_to is None:
        return ""
    if date_from == date_to:
        return f"{date_from:%Y%m%d}"
    left = f"{date_from:%Y%m%d}" if date_from else ""
    right = f"{date_to:%Y%m%d}" if date_to else ""
    return f"{left}-{right}"


def _tls(peer: RemoteAE) -> ssl.SSLContext:
    try:
        return tls_context(peer)
    except (OSError, ssl.SSLError) as exc:
        raise QRError(f"cannot load the TLS files for {_name(peer)}: {exc}") from exc


def find(
    peer: RemoteAE,
    calling_aet: str,
    level: Level | str,
    *,
    date_from: date | None = None,
    date_to: date | None = None,
    modality: str | None = "MR",
    description: str | None = None,
    study_uid: str | None = None,
    patient_id: str | None = None,
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """C-FIND (Study Root) at STUDY or SERIES level; one dict per match (keys: STUDY_KEYS or
    SERIES_KEYS; missing or empty values are None, counts are ints, ModalitiesInStudy a list).

    Filters left as None match anything. ``description`` (``*`` and ``?`` wildcards) matches
    StudyDescription at STUDY level and SeriesDescription at SERIES level; ``modality`` matches
    ModalitiesInStudy at STUDY level and Modality at SERIES level. Date filters apply to
    StudyDate. A SERIES query is hierarchical, as the standard asks: unless only ``study_uid``
    is given, the studies are found first (dates, patient, modality, UID) and then each one's
    series, all on one association. Studies come newest first, series by study then number.
    """
    level = level.upper()
    if level not in ("STUDY", "SERIES"):
        raise ValueError(f"level must be STUDY or SERIES, not {level!r}")
    dates = dicom_date_range(date_from, date_to)
    with _association(peer, calling_aet, StudyRootQueryRetrieveInformationModelFind, timeout) as a:
        if level == "SERIES" and study_uid and not dates and not patient_id:
            study_uids = [study_uid]
        else:
            study_filter = {
                "StudyDate": dates,
                "ModalitiesInStudy": modality or "",
                "StudyDescription": (description or "") if level == "STUDY" else "",
                "StudyInstanceUID": study_uid or "",
                "PatientID": patient_id or "",
            }
            studies = _c_find(peer, a, "STUDY", STUDY_KEYS, study_filter)
            studies.sort(key=lambda s: (s["StudyDate"] or "", s["StudyTime"] or ""), reverse=True)
            if level == "STUDY":
                return studies
            study_uids = [s["StudyInstanceUID"] for s in studies if s["StudyInstanceUID"]]
        out: list[dict[str, Any]] = []
        for uid in study_uids:
            series_filter = {
                "StudyInstanceUID": uid,
                "Modality": modality or "",
                "SeriesDescription": description or "",
            }
            found = _c_find(peer, a, "SERIES", SERIES_KEYS, series_filter)
            found.sort(key=lambda s: (s["SeriesNumber"] is None, s["SeriesNumber"] or 0))
            out += found
        return out


def move(
    peer: RemoteAE,
    calling_aet: str,
    destination_aet: str,
    study_uid: str,
    series_uid: str | None = None,
    *,
    timeout: float = 600.0,
) -> MoveResult:
    """C-MOVE (Study Root) of a study, or of one of its series, to ``destination_aet``.

    The PACS looks ``destination_aet`` up in its own list of peers and connects to it, so it
    must know that AE title with our host and DICOM port (status 0xA801 otherwise), and the
    receiving node must accept the PACS's AE title as a caller. Returns once the PACS sends
    its final response: every sub-operation (C-STORE) has then been answered by the
    receiver. Success and warning (0xB000, some sub-operations failed) give a MoveResult
    with the counts; a failure status raises QRError. ``timeout`` is the longest wait
    between two responses from the PACS.
    """
    if not study_uid:
        raise ValueError("study_uid is required")
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    identifier.StudyInstanceUID = study_uid
    if series_uid:
        identifier.SeriesInstanceUID = series_uid
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    last: Dataset | None = None
    last_identifier: Dataset | None = None
    with _association(peer, calling_aet, StudyRootQueryRetrieveInformationModelMove, timeout) as a:
        started = time.monotonic()
        for status, ident in a.send_c_move(
            identifier, destination_aet, StudyRootQueryRetrieveInformationModelMove
        ):
            if not status:  # no response within the timeout, or the association was aborted
                raise QRError(_no_response(peer, a, f"the C-MOVE of {what}", started))
            last, last_identifier = status, ident
            code = int(status.Status)
            if code in PENDING:
                started = time.monotonic()  # the timeout is between two responses
                log.debug(
                    "C-MOVE pending: %s remaining, %s completed",
                    status.get("NumberOfRemainingSuboperations"),
                    status.get("NumberOfCompletedSuboperations"),
                )
    if last is None:
        raise QRError(f"{_name(peer)} sent no response to the C-MOVE of {what}")
    code = int(last.Status)
    result = MoveResult(
        status=code,
        completed=int(last.get("NumberOfCompletedSuboperations") or 0),
        failed=int(last.get("NumberOfFailedSuboperations") or 0),
        warning=int(last.get("NumberOfWarningSuboperations") or 0),
        failed_sop_instance_uids=_failed_uids(last_identifier),
    )
    if code in (SUCCESS, WARNING, CANCEL) or 0xB000 <= code <= 0xBFFF:
        return result
    counts = f"{result.completed} sent, {result.failed} failed"
    if code == MOVE_DESTINATION_UNKNOWN:
        raise QRError(
            f"{_name(peer)} does not know the move destination {destination_aet} (0xA801):"
            f" register AE title {destination_aet} with this node's host and DICOM port"
            f" on the PACS"
        )
    if result.failed:
        hint = (
            f"; is the node ({destination_aet}) running (`mriqa serve`), registered on the"
            f" PACS at the right host and port, and does it allow {peer.ae_title} as a caller?"
        )
    else:  # Orthanc answers 0xC000 alike for each of these, without an error comment
        hint = (
            f"; either the PACS holds nothing matching, or it does not know {destination_aet}"
            f" as a move destination (AE title, host and DICOM port of this node), or it"
            f" could not connect to it (is `mriqa serve` running?)"
        )
    raise QRError(
        f"{_name(peer)} failed the C-MOVE of {what}: status 0x{code:04X}"
        f" ({_describe(code, last)}), {counts}{hint}"
    )


# -- internals ------------------------------------------------------------------------------


@contextmanager
def _association(
    peer: RemoteAE, calling_aet: str, sop_class: str, timeout: float
) -> Iterator[Association]:
    """An established association to ``peer`` for one SOP class; released on a normal exit,
    aborted when the body raises (a request may still be in flight)."""
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(sop_class)
    ae.connection_timeout = 10
    ae.acse_timeout = 30
    ae.dimse_timeout = timeout
    ae.network_timeout = max(timeout, 60)
    context = _tls(peer) if peer.tls else None
    try:
        with association(ae, peer.host, peer.port, peer.ae_title, context) as assoc:
            yield assoc
    except NotAssociated as exc:
        raise QRError(_association_failure(peer, calling_aet, exc.assoc, context)) from None


def _c_find(
    peer: RemoteAE,
    assoc: Association,
    level: Level,
    keys: tuple[str, ...],
    filters: dict[str, str],
) -> list[dict[str, Any]]:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword in keys:
        setattr(identifier, keyword, "")  # a return key
    for keyword, value in filters.items():
        if value or keyword in keys:
            setattr(identifier, keyword, value)
    out: list[dict[str, Any]] = []
    started = time.monotonic()
    for status, ident in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
        if not status:
            raise QRError(_no_response(peer, assoc, f"the {level} C-FIND", started))
        code = int(status.Status)
        if code in PENDING:
            started = time.monotonic()
            if ident is not None:
                out.append({k: _value(ident, k) for k in keys})
        elif code in (SUCCESS, CANCEL):
            break
        else:
            raise QRError(
                f"{_name(peer)} failed the {level} C-FIND: status 0x{code:04X}"
                f" ({_describe(code, status)})"
            )
    return out


def _value(ds: Dataset, keyword: str) -> Any:
    value = ds[keyword].value if keyword in ds else None
    if keyword in _LIST_KEYS:
        if value in (None, ""):
            return []
        items = value if isinstance(value, MultiValue | list) else [value]
        return [str(v) for v in items if str(v)]
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    if keyword in _INTEGER_KEYS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    return str(value)


def _failed_uids(identifier: Dataset | None) -> list[str]:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return []
    value = identifier.FailedSOPInstanceUIDList
    items = value if isinstance(value, MultiValue | list) else [value]
    return [str(v) for v in items if v]


def _describe(code: int, status: Dataset) -> str:
    text = _FAILURES.get(code)
    if text is None:
        if 0xC000 <= code <= 0xCFFF:
            text = "unable to process"
        elif 0xA700 <= code <= 0xA7FF:
            text = "out of resources"
        else:
            text = "failure"
    comment = status.get("ErrorComment")
    return f"{text}: {comment}" if comment else text


def _name(peer: RemoteAE) -> str:
    return f"{peer.ae_title}@{peer.host}:{peer.port}"


def _no_response(peer: RemoteAE, assoc: Association, request: str, started: float) -> str:
    """No response: the peer closed the association early (a refusal), or it timed out."""
    calling = assoc.requestor.ae_title
    timeout = assoc.dimse_timeout or 0.0
    if assoc.acse.is_aborted() or time.monotonic() - started < 0.9 * timeout:
        return (
            f"{_name(peer)} aborted the association instead of answering {request}: many"
            f" PACS (Orthanc among them) refuse queries and retrieves from calling AE titles"
            f" they do not know; is {calling} registered on the PACS?"
        )
    return f"{_name(peer)} did not answer {request} in time"


def _association_failure(
    peer: RemoteAE, calling_aet: str, assoc: Association, context: ssl.SSLContext | None
) -> str:
    """Why no association: rejected (with the peer's reason), or no answer (a diagnosis)."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        reason = ""
        if rsp is not None:
            reason = f" ({rsp.result_str}, {rsp.source_str}: {rsp.reason_str})"
        return (
            f"{_name(peer)} rejected the association from {calling_aet}{reason}:"
            f" the PACS must know AE title {calling_aet}, and the called AE title"
            f" {peer.ae_title} must be right"
        )
    if assoc.acceptor.primitive is not None and not assoc.accepted_contexts:
        return f"{_name(peer)} accepted no Study Root query/retrieve presentation context"
    return f"cannot reach {_name(peer)}: {_diagnose(peer, context)}"


def _diagnose(peer: RemoteAE, context: ssl.SSLContext | None) -> str:
    """pynetdicom only logs why a connection failed: try again plainly to get the reason."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=5) as sock:
            if context is None:
                return (
                    "connected, but the peer closed the connection or did not answer the"
                    " association request (does it require TLS?)"
                )
            try:
                with context.wrap_socket(sock, server_hostname=peer.host):
                    return (
                        "TLS works, but the peer closed the connection or did not answer the"
                        " association request (does it require our certificate?)"
                    )
            except (ssl.SSLError, OSError) as exc:
                return f"TLS handshake failed: {exc}"
    except OSError as exc:
        return f"{exc.strerror or exc} (is the PACS running, and are host and port right?)"
