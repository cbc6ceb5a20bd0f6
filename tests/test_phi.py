"""The suite's patient-data scan of the node's logs can fail: it finds what it looks for."""

from __future__ import annotations

from pathlib import Path

from tests import phi


def test_the_log_scan_finds_a_patient_name_or_id_and_only_those(tmp_path: Path) -> None:
    secrets = phi.identifiers()
    assert {"DEMO^PHANTOM", "DEMO0001"} <= secrets
    assert all(len(s) >= phi.MIN_LENGTH for s in secrets)
    log = tmp_path / "node.log"
    log.write_text("INFO stored instance 1.2.3 from SCANNER1\n"
                   "WARNING refused instance for demo^phantom: no pixel data\n")  # fmt: skip
    findings = phi.scan([log, tmp_path / "missing.log"], secrets)
    assert [(f.line, f.identifier) for f in findings] == [(2, "DEMO^PHANTOM")]
