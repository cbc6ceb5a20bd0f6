"""A small C-STORE SCU for demos and tests: `mriqa send PATH --to HOST:PORT`."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import build_context

from mriqa_node.dicom.client import NotAssociated, association

log = logging.getLogger(__name__)


NOT_ACCEPTED = -2  # no presentation context accepted for the SOP class / transfer syntax


@dataclass
class SendReport:
    sent: int = 0
    # name -> DIMSE status, -1 (no association or no response) or NOT_ACCEPTED
    failed: dict[str, int] = field(default_factory=dict)


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Files under the given paths, in name order (folders are walked)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            out.append(path)
    return out


def send_datasets(
    datasets: list[pydicom.Dataset],
    host: str,
    port: int,
    called_aet: str = "MRIQA",
    calling_aet: str = "SCANNER1",
    names: list[str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> SendReport:
    """One association for all datasets, with a context per (SOP class, transfer syntax)."""
    ae = AE(ae_title=calling_aet)
    pairs = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in sorted(pairs)][:128]
    report = SendReport()
    names = names or [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        with association(ae, host, port, called_aet, tls) as assoc:
            for name, ds in zip(names, datasets, strict=True):
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # the receiver accepted no context for this SOP class
                    log.warning("%s: not sent: %s", name, exc)
                    report.failed[name] = NOT_ACCEPTED
                    continue
                code = int(status.Status) if status else -1
                if code == 0:
                    report.sent += 1
                else:
                    report.failed[name] = code
                    log.warning("%s: status 0x%04X", name, code & 0xFFFF)
    except NotAssociated:
        report.failed = dict.fromkeys(names, -1)
        log.error("association to %s@%s:%d refused or failed", called_aet, host, port)
    return report


def send_files(paths: list[Path], host: str, port: int, **kw) -> SendReport:
    datasets = [pydicom.dcmread(p) for p in paths]
    return send_datasets(datasets, host, port, names=[str(p) for p in paths], **kw)
