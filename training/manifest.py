"""Training manifests: one CSV row per DICOM file with its ratings, and the split by patient.

Columns (exactly these, plus any number of ``rater*`` columns)::

    path,patient_id,study_uid,series_uid,sop_instance_uid,instance,rater1,rater2,severity,true_class

``path`` is relative to the manifest's directory, or absolute. Ratings and ``true_class`` use the
paper's classes: 0 non-diagnostic, 1 diagnostic, 2 excellent; an empty cell is "not rated".
``severity`` (float) and ``true_class`` are known for synthetic data only and empty otherwise.

Slices of one patient are strongly correlated, so the split is by patient, never by image.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.domain.agreement import binarise
from mriqa_node.domain.manifest import BASE_COLUMNS, TAIL_COLUMNS, manifest_header
from training.files import replaced_atomically

SPLITS = ("train", "val", "test")
TASKS = ("binary", "3class")
NUM_CLASSES = {"binary": 2, "3class": 3}
AGGREGATES = ("mean", "worst", "truth")
_RATER = re.compile(r"^rater\d*$")


class ManifestError(ValueError):
    """The manifest cannot be used as it is; the message names the file, line and column."""


@dataclass
class Record:
    """One DICOM file of the manifest (a multi-frame file is still one record)."""

    path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    instance: int | None = None
    raters: dict[str, int | None] = field(default_factory=dict)  # column -> class or None
    severity: float | None = None
    true_class: int | None = None


def read_manifest(path: Path | str) -> list[Record]:
    path = Path(path)
    base = path.parent.resolve()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        missing = [c for c in (*BASE_COLUMNS, *TAIL_COLUMNS) if c not in columns]
        rater_cols = _sort_raters(c for c in columns if _RATER.match(c))
        if missing or not rater_cols:
            need = ", ".join(missing) if missing else "at least one rater* column"
            raise ManifestError(f"{path}: missing column(s) {need}")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                records.append(_record(row, base, rater_cols))
            except ValueError as exc:
                raise ManifestError(f"{path}:{line}: {exc}") from exc
    return records


def write_manifest(records: Iterable[Record], path: Path | str) -> Path:
    """Write records as a manifest; paths under the manifest's directory are made relative."""
    path = Path(path)
    records = list(records)
    base = path.parent.resolve()
    rater_cols = rater_columns(records) or ["rater1"]
    header = manifest_header(rater_cols)
    with replaced_atomically(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in records:
            writer.writerow(
                [
                    _relative(Path(r.path), base),
                    r.patient_id,
                    r.study_uid,
                    r.series_uid,
                    r.sop_instance_uid,
                    _cell(r.instance),
                    *(_cell(r.raters.get(c)) for c in rater_cols),
                    _cell(r.severity),
                    _cell(r.true_class),
                ]
            )
    return path


def manifest_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- labels ---------------------------------------------------------------------------------


def rater_columns(records: Iterable[Record]) -> list[str]:
    """The rater columns used by any of the records, in order (rater1, rater2, ..., rater10)."""
    return _sort_raters({n for r in records for n in r.raters})


def label_sources(records: Sequence[Record]) -> list[str]:
    """Valid ``source`` values for these records: each rater column, then the aggregates."""
    return [*rater_columns(records), *AGGREGATES]


def label_of(record: Record, source: str) -> int | None:
    """The 3-class label (0/1/2) of a record from one rater or an aggregate; None if unrated.

    mean: the raters' mean rounded half up (0 and 1 -> 1, 1 and 2 -> 2; 0 and 2 -> 1), over the
    raters who rated the image; worst: the lowest rating (the conservative choice); truth: the
    synthetic generator's true class.
    """
    if source == "truth":
        return record.true_class
    if source in ("mean", "worst"):
        given = [v for v in record.raters.values() if v is not None]
        if not given:
            return None
        if source == "worst":
            return min(given)
        return math.floor(sum(given) / len(given) + 0.5)
    if _RATER.match(source):
        return record.raters.get(source)
    raise ValueError(f"unknown label source {source!r} (rater columns, mean, worst or truth)")


def task_label(label3: Any, task: str) -> Any:
    """3-class label(s) -> task label(s). binary: 0 non-diagnostic vs 1 diagnostic or better.

    Accepts an int (None passes through) or an integer array (negative values, "unknown",
    pass through).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (binary or 3class)")
    if label3 is None or task == "3class":
        return label3
    if isinstance(label3, np.ndarray):
        return np.where(label3 > 0, 1, label3)  # binarise, element-wise (unknown stays < 0)
    return binarise(label3)


def labels_for(records: Sequence[Record], source: str, task: str) -> list[int | None]:
    return [task_label(label_of(r, source), task) for r in records]


# --- split by patient -----------------------------------------------------------------------


LabelsLike = Sequence[int | None] | Mapping[str, int | None] | Callable[[Record], int | None]


def split_by_patient(
    records: Sequence[Record],
    labels: LabelsLike,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split into train/val/test by patient, stratified, deterministic for a seed.

    ``labels`` are aligned with ``records`` (or a mapping by SOP instance UID, or a function of
    a record); class 0 is non-diagnostic. Patients are ordered by their share of non-diagnostic
    slices (random order among equal shares, from ``seed``) and dealt out one by one to the
    split furthest below its target share of slices, so every stretch of similar patients is
    divided in the stated fractions: each split gets about its fraction of the slices and the
    same mix of clean and corrupted patients. Every split with a positive fraction gets at least
    one patient when there are enough patients.
    """
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    targets = np.asarray(fractions, float) / float(sum(fractions))
    lookup = _labels(records, labels)
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    patients = sorted(by_patient)
    rng = np.random.default_rng(seed)
    tie = rng.permutation(len(patients))
    shares = [_nondiag_share([lookup(r) for r in by_patient[p]]) for p in patients]
    order = sorted(range(len(patients)), key=lambda i: (shares[i], tie[i]))

    assigned: dict[str, list[str]] = {s: [] for s in SPLITS}
    slices = np.zeros(len(SPLITS))
    for i in order:
        n = len(by_patient[patients[i]])
        deficit = targets * (slices.sum() + n) - slices
        k = int(np.argmax(deficit))  # ties go to the earlier split (train)
        assigned[SPLITS[k]].append(patients[i])
        slices[k] += n
    _fill_empty(assigned, targets, rng)
    return {s: [r for p in sorted(assigned[s]) for r in by_patient[p]] for s in SPLITS}


def assert_no_patient_leak(splits: Mapping[str, Sequence[Record]]) -> None:
    """Raise AssertionError naming the patients that appear in more than one split."""
    seen: dict[str, str] = {}
    leaks: dict[str, set[str]] = defaultdict(set)
    for name, recs in splits.items():
        for r in recs:
            first = seen.setdefault(r.patient_id, name)
            if first != name:
                leaks[r.patient_id].update((first, name))
    if leaks:
        detail = "; ".join(f"{p}: {', '.join(sorted(s))}" for p, s in sorted(leaks.items())[:10])
        raise AssertionError(f"{len(leaks)} patient(s) in more than one split: {detail}")


def split_report(
    splits: Mapping[str, Sequence[Record]], labels: LabelsLike | None = None
) -> dict[str, dict[str, Any]]:
    """Per split: patients, images and images per class; checks that no patient leaks.

    ``labels``: a mapping by SOP instance UID or a function of a record (None: no class counts).
    Class keys are strings ("0", "1", ...; "unlabelled" for None) so the report is JSON-ready.
    """
    assert_no_patient_leak(splits)
    out: dict[str, dict[str, Any]] = {}
    for name, recs in splits.items():
        entry: dict[str, Any] = {
            "patients": len({r.patient_id for r in recs}),
            "series": len({r.series_uid for r in recs}),
            "images": len(recs),
        }
        if labels is not None:
            lookup = _labels(recs, labels)
            counts = Counter(lookup(r) for r in recs)
            entry["classes"] = {
                ("unlabelled" if c is None else str(c)): n
                for c, n in sorted(counts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
            }
        out[name] = entry
    return out


# --- helpers --------------------------------------------------------------------------------


def _labels(records: Sequence[Record], labels: LabelsLike) -> Callable[[Record], int | None]:
    if callable(labels):
        return labels
    if isinstance(labels, Mapping):
        return lambda r: labels.get(r.sop_instance_uid)
    if len(labels) != len(records):
        raise ValueError(f"{len(labels)} labels for {len(records)} records")
    by_id = {id(r): lab for r, lab in zip(records, labels, strict=True)}
    return lambda r: by_id[id(r)]


def _nondiag_share(labels: list[int | None]) -> float:
    known = [v for v in labels if v is not None]
    return sum(v == 0 for v in known) / len(known) if known else 0.0


def _fill_empty(assigned: dict[str, list[str]], targets: np.ndarray, rng: np.random.Generator):
    """Give every split with a positive target at least one patient, taken from the largest."""
    for k, name in enumerate(SPLITS):
        if targets[k] > 0 and not assigned[name]:
            donor = max(SPLITS, key=lambda s: len(assigned[s]))
            if len(assigned[donor]) < 2:
                return
            moved = assigned[donor].pop(int(rng.integers(len(assigned[donor]))))
            assigned[name].append(moved)


def _sort_raters(names: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple[int, str]:
        digits = name[len("rater") :]
        return (int(digits) if digits else 0, name)

    return sorted(set(names), key=key)


def _record(row: dict[str, str], base: Path, rater_cols: list[str]) -> Record:
    raw = (row.get("path") or "").strip()
    if not raw:
        raise ValueError("empty path")
    p = Path(raw)
    sop = (row.get("sop_instance_uid") or "").strip()
    if not sop:
        raise ValueError("empty sop_instance_uid")
    return Record(
        path=p if p.is_absolute() else base / p,
        patient_id=(row.get("patient_id") or "").strip(),
        study_uid=(row.get("study_uid") or "").strip(),
        series_uid=(row.get("series_uid") or "").strip(),
        sop_instance_uid=sop,
        instance=_int(row.get("instance"), "instance", None),
        raters={c: _int(row.get(c), c, (0, 1, 2)) for c in rater_cols},
        severity=_float(row.get("severity"), "severity"),
        true_class=_int(row.get("true_class"), "true_class", (0, 1, 2)),
    )


def _int(value: str | None, column: str, allowed: tuple[int, ...] | None) -> int | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        f = float(value)
    except ValueError:
        raise ValueError(f"{column}: {value!r} is not a number") from None
    if not f.is_integer() or (allowed is not None and int(f) not in allowed):
        raise ValueError(f"{column}: {value!r} is not one of {allowed}")
    return int(f)


def _float(value: str | None, column: str) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{column}: {value!r} is not a number") from None


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base).as_posix()
    except ValueError:
        return str(path)
