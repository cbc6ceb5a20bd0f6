"""Offline scoring (`mriqa score`): DICOM files in, slice probabilities and verdicts out.

No server and no database: the same preprocessing, model and policy as the node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from mriqa_node.domain.verdict import SeriesPolicy, SliceResult, decide
from mriqa_node.ml.scorer import Scorer
from mriqa_node.preprocess import NO_ANATOMY, Unscorable, preprocess_frames, slice_positions


@dataclass
class SeriesReport:
    series_uid: str
    description: str | None
    slices: list[dict[str, Any]] = field(default_factory=list)
    unscorable: list[dict[str, str]] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)


def score_files(
    files: list[Path], scorer: Scorer, policy: SeriesPolicy, batch: int = 16
) -> tuple[list[SeriesReport], list[dict[str, str]]]:
    """Returns per-series reports and the files that are not DICOM at all."""
    reports: dict[str, SeriesReport] = {}
    results: dict[str, list[SliceResult]] = defaultdict(list)
    unreadable: list[dict[str, str]] = []
    classes = scorer.meta.class_names
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, OSError, AttributeError, EOFError) as exc:
            unreadable.append({"file": str(path), "reason": f"not readable DICOM: {exc}"})
            continue
        report = reports.setdefault(uid, SeriesReport(uid, ds.get("SeriesDescription")))
        try:
            prepared = preprocess_frames(ds)
        except Unscorable as exc:
            report.unscorable.append({"file": str(path), "reason": str(exc)})
            continue
        keep = prepared.anatomy
        if not len(keep):
            report.unscorable.append({"file": str(path), "reason": NO_ANATOMY})
            continue
        frames = prepared.images[keep]
        probs = np.concatenate(
            [scorer.predict(frames[i : i + batch]) for i in range(0, len(frames), batch)]
        )
        number = ds.get("InstanceNumber")
        positions = slice_positions(ds)
        for frame, p in zip(keep.tolist(), probs, strict=True):
            pos = positions[frame]
            results[uid].append(
                SliceResult(
                    str(ds.SOPInstanceUID),
                    frame,
                    p.tolist(),
                    pos,
                    int(number) if number is not None else None,
                )
            )
            report.slices.append(
                {
                    "file": str(path),
                    "frame": frame,
                    "position": pos,
                    "probabilities": dict(
                        zip(classes, (round(float(x), 4) for x in p), strict=True)
                    ),
                }
            )
    for uid, report in reports.items():
        v = decide(results[uid], policy, classes)
        report.verdict = {
            "label": v.label,
            "score": v.score,
            "n_slices": v.n_slices,
            "n_flagged": v.n_flagged,
            "worst_slices": v.worst_slices,
        }
    return list(reports.values()), unreadable
