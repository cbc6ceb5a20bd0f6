"""What the node tells the PACS about a series it assessed, as plain data.

The service layer fills these from the database; the DICOM layer (dicom/objects.py) encodes
them as a rejection note, a QA structured report or a montage. UIDs are chosen here, not by
the encoder: an object made twice for the same reason (an event handled again after a
restart) must be the same object, so that the PACS stores it once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

# Name-based UUIDs (RFC 4122 version 5) under a namespace of our own, as UIDs "2.25.<int>"
# (PS3.5 B.2): deterministic, unique, no registered root needed.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:mriqa-node:qa-objects")


def derived_uid(*parts: str) -> str:
    """The UID named by ``parts``, the same on every node and run."""
    return f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}"


@dataclass(frozen=True)
class ObjectUids:
    """Series and SOP Instance UID of a new object."""

    series: str
    instance: str

    @classmethod
    def derived(cls, about_series: str, what: str) -> ObjectUids:
        """The UIDs of the object ``what`` (e.g. "kos", "sr-12") about one series."""
        return cls(derived_uid(about_series, what, "series"),
                   derived_uid(about_series, what, "instance"))  # fmt: skip


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    sha256: str | None = None
    task: str | None = None


@dataclass(frozen=True)
class ReportedSlice:
    """One slice as the report shows it: ``frame`` and ``index`` (anatomical order) 0-based;
    no probability where the slice could not be scored."""

    sop_instance_uid: str
    frame: int
    index: int
    p_nondiagnostic: float | None


@dataclass(frozen=True)
class QaResult:
    """A series verdict with the slices it was decided from."""

    label: str
    score: float | None
    n_slices: int
    n_unscorable: int
    model: ModelIdentity
    slices: tuple[ReportedSlice, ...] = ()
    worst: tuple[ReportedSlice, ...] = ()
    n_flagged: int | None = None
    decided_at: datetime | None = None


@dataclass(frozen=True)
class EncodedObject:
    """A finished DICOM object: its identity and its bytes (a Part 10 file)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    data: bytes
