"""Patient names and IDs must never reach a log. After the whole suite, conftest scans every log
the node wrote during it (its in-process records and the log of each `mriqa` child process)
for the patient names and IDs of the test data, and fails the run on a hit."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The tests' own patients (phantoms, constructed datasets).
TEST_PATIENTS = ("DEMO^PHANTOM", "DEMO0001", "DOE^JANE", "SECRETARY^PRIVATE", "PID-99173",
                 "Łukasz^Żółć", "REALMOTION^", "SYNTHETIC^")  # fmt: skip
MIN_LENGTH = 5  # shorter values ("HFS", "***", "fMRI" in the shared data) are not identifying


@dataclass(frozen=True)
class Finding:
    log: Path
    line: int
    identifier: str


def _sample_files() -> Iterable[Path]:
    """The first DICOM file of every series folder of the shared data, pydicom's MR files."""
    for root in (SHARED_DATA / "intake", SHARED_DATA / "anatomy"):
        if root.is_dir():
            folders = {p.parent for p in root.rglob("*") if p.is_file()}
            for folder in sorted(folders):
                yield from sorted(f for f in folder.iterdir() if f.is_file())[:1]
    from pydicom.data import get_testdata_file

    for name in ("MR_small.dcm", "MR2_UNCR.dcm", "emri_small.dcm"):
        if path := get_testdata_file(name):
            yield Path(path)


def identifiers() -> set[str]:
    """Patient names and IDs of the test data that could identify someone: with a digit or a
    name separator, or 8 characters or more. A value that is part of a data file's path (a
    public dataset's folder name such as "dicom2nifti") is left out: a log may name a file."""
    found, paths = set(TEST_PATIENTS), []
    for path in _sample_files():
        paths.append(str(path).casefold())
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["PatientName", "PatientID"])  # fmt: skip
        except Exception:
            continue
        found |= {str(ds.get(k, "")).strip() for k in ("PatientName", "PatientID")}
    return {v for v in found if len(v) >= MIN_LENGTH and _identifying(v)
            and not any(v.casefold() in p for p in paths)}  # fmt: skip


def _identifying(value: str) -> bool:
    return len(value) >= 8 or "^" in value or any(c.isdigit() for c in value)


def scan(logs: Iterable[Path], secrets: set[str]) -> list[Finding]:
    findings = []
    lowered = {s: s.casefold() for s in secrets}
    for log in logs:
        if not log.is_file():
            continue
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), 1):
            folded = line.casefold()
            findings += [Finding(log, number, s) for s, low in lowered.items() if low in folded]
    return findings
