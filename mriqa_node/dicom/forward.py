"""C-STORE SCU for the forwarding outbox: a batch of spooled files in one association.

Files go out as they were received (pynetdicom streams the encoded dataset from the file, no
decode and re-encode) when the destination accepts their transfer syntax; otherwise they are
decoded and sent uncompressed (Explicit, else Implicit VR Little Endian), which every
Storage SCP must accept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from mriqa_node.config import DestinationConfig
from mriqa_node.dicom.client import open_association, tls_context
from mriqa_node.services.forwarding import Job, Outcome
from mriqa_node.spool import Spool

log = logging.getLogger(__name__)

# Send a file path as its encoded bytes (pynetdicom reads it in chunks) instead of decoding it.
_config.STORE_SEND_CHUNKED_DATASET = True
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128


class StoreSender:
    """The forwarder's ``send``: (destination, jobs) -> outcome per job id."""

    def __init__(self, spool: Spool, calling_aet: str) -> None:
        self.spool = spool
        self.calling_aet = calling_aet

    def __call__(self, dest: DestinationConfig, jobs: Sequence[Job]) -> dict[int, Outcome]:
        files: dict[int, tuple[Path, str]] = {}
        outcomes: dict[int, Outcome] = {}
        for job in jobs:
            path = self.spool.path(job.spool_path)
            try:
                meta = pydicom.filereader.read_file_meta_info(path)
                files[job.id] = (path, str(meta.TransferSyntaxUID))
            except (OSError, pydicom.errors.InvalidDicomError, AttributeError) as exc:
                outcomes[job.id] = Outcome(0xC000, f"cannot read the spooled file: {exc}")
        if not files:
            return outcomes
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        # One context per (SOP class, original syntax), one uncompressed fallback per SOP class.
        by_class: dict[str, set[str]] = {}
        for job in jobs:
            if job.id in files:
                by_class.setdefault(job.sop_class_uid, set()).add(files[job.id][1])
        contexts = [build_context(sop, ts) for sop, tss in sorted(by_class.items())
                    for ts in sorted(tss) if ts not in UNCOMPRESSED]  # fmt: skip
        contexts += [build_context(sop, list(UNCOMPRESSED)) for sop in sorted(by_class)]
        ae.requested_contexts = contexts[:MAX_CONTEXTS]
        try:
            tls = tls_context(dest) if dest.tls else None
            assoc = open_association(ae, dest.host, dest.port, dest.ae_title, tls)
        except Exception as exc:  # TLS files or handshake, DNS: the destination is unreachable
            assoc, error = None, str(exc)
        else:
            error = "association rejected, aborted or not answered"
        if assoc is None or not assoc.is_established:
            where = f"{dest.ae_title}@{dest.host}:{dest.port}"
            log.warning("forward to %s (%s): %s", dest.name, where, error)
            return outcomes | {i: Outcome(None, f"{where}: {error}") for i in files}
        try:
            accepted = {(c.abstract_syntax, c.transfer_syntax[0])
                        for c in assoc.accepted_contexts}  # fmt: skip
            for job in jobs:
                if job.id not in files:
                    continue
                if not assoc.is_established:
                    outcomes[job.id] = Outcome(None, "association lost")
                    continue
                outcomes[job.id] = self._store(assoc, job, *files[job.id], accepted)
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    @staticmethod
    def _store(assoc, job: Job, path: Path, syntax: str, accepted: set) -> Outcome:
        try:
            if (job.sop_class_uid, syntax) in accepted:
                status = assoc.send_c_store(path)  # as received, byte for byte
            elif any((job.sop_class_uid, ts) in accepted for ts in UNCOMPRESSED):
                ds = pydicom.dcmread(path)
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress(generate_instance_uid=False)  # the same instance
                status = assoc.send_c_store(ds)
            else:
                return Outcome(0x0122, "the destination accepts no transfer syntax for this "
                                       "SOP class")  # fmt: skip
        except (ValueError, AttributeError, OSError, RuntimeError) as exc:
            return Outcome(0xC000, f"not sent: {exc}")
        if not status or "Status" not in status:
            return Outcome(None, "no response (timeout or connection lost)")
        code = int(status.Status)
        return Outcome(code, None if code == 0 else f"status 0x{code:04X}")
