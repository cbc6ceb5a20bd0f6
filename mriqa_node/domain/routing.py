"""Which PACS destinations get a received instance: rules on the sender and the series."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ForwardRule:
    """Forward to ``destination`` when every non-empty condition holds (empty: everything)."""

    destination: str
    calling_aets: frozenset[str] = field(default_factory=frozenset)
    modalities: frozenset[str] = field(default_factory=frozenset)
    series_description: str = ""  # a regular expression, searched case-insensitively
    # The destination's own AE title: what it sent us (a study pulled from the PACS) never
    # goes back to it.
    own_aet: str = ""

    def matches(
        self, calling_aet: str | None, modality: str | None, description: str | None
    ) -> bool:
        if self.own_aet and calling_aet == self.own_aet:
            return False
        if self.calling_aets and (calling_aet or "") not in self.calling_aets:
            return False
        if self.modalities and (modality or "").upper() not in self.modalities:
            return False
        return not self.series_description or bool(
            re.search(self.series_description, description or "", re.IGNORECASE)
        )


def destinations_for(
    rules: list[ForwardRule], calling_aet: str | None, modality: str | None, description: str | None
) -> list[str]:
    return [r.destination for r in rules if r.matches(calling_aet, modality, description)]
