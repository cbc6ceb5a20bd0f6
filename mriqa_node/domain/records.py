"""Plain records passed between the DICOM adapter, the services and the worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mriqa_node.domain.scope import ImageFacts


@dataclass(frozen=True)
class InstanceHeader:
    """What the node needs from one instance's header, parsed once at receipt."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    instance_number: int | None = None
    frames: int = 1
    expected_slices: int | None = None  # announced size of the series, when the header says
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    facts: ImageFacts | None = None  # what the scope rules read

    def to_json(self) -> dict[str, Any]:
        """Every field, the facts as a dict of theirs; shallow (all are plain values), which
        is 20x cheaper than dataclasses.asdict on the receive path."""
        data = dict(vars(self))
        if self.facts is not None:
            data["facts"] = dict(vars(self.facts))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceHeader:
        """The inverse of :meth:`to_json` (JSON has lists where the facts have tuples)."""
        facts = data.get("facts")
        if facts is not None:
            facts = ImageFacts(**{k: tuple(v) if isinstance(v, list) else v
                                  for k, v in facts.items()})  # fmt: skip
        return cls(**{**data, "facts": facts})
