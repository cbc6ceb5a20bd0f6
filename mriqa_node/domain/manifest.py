"""The training manifest's columns: the contract between the node (`mriqa ratings export`)
and the training package (training/manifest.py reads and writes it)."""

from __future__ import annotations

from collections.abc import Sequence

BASE_COLUMNS = ("path", "patient_id", "study_uid", "series_uid", "sop_instance_uid", "instance")
TAIL_COLUMNS = ("severity", "true_class")


def manifest_header(rater_columns: Sequence[str]) -> list[str]:
    """The header of a manifest: the base columns, any rater columns, then the tail."""
    return [*BASE_COLUMNS, *rater_columns, *TAIL_COLUMNS]
