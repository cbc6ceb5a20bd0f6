"""Offline scoring (`mriqa score`): DICOM files in, slice probabilities and verdicts out.

No server and no database: the same scope, preprocessing, model and policy as the node.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from mriqa_node.dicom.headers import image_facts
from mriqa_node.domain.scope import Scope
from mriqa_node.domain.verdict import SeriesPolicy, SliceResult, assess
from mriqa_node.ml.scorer import Scorer
from mriqa_node.preprocess import NO_ANATOMY, Unscorable, preprocess_frames, slice_positions


@dataclass
class SeriesReport:
    series_uid: str
    description: str | None
    slices: list[dict[str, Any]] = field(default_factory=list)
    unscorable: list[dict[str, str]] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    scope: dict[str, int] = field(default_factory=dict)  # the rule that decided -> instances


def score_files(
    files: list[Path],
    scorer: Scorer,
    policy: SeriesPolicy,
    batch: int = 16,
    scope: Scope | None = None,
    calling_aet: str | None = None,
) -> tuple[list[SeriesReport], list[dict[str, str]]]:
    """Returns per-series reports and the files that are not DICOM at all. ``scope`` defaults
    to the model's own (model.json) without site rules."""
    scope = scope or Scope.of(scorer.meta.scope)
    out_of_scope: dict[str, str] = {}
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
        decision = scope.decide(image_facts(ds), calling_aet)
        report.scope[decision.rule] = report.scope.get(decision.rule, 0) + 1
        if not decision.in_scope:  # not scored at all
            out_of_scope.setdefault(uid, decision.reason or "")
            continue
        try:
            prepared = preprocess_frames(
                ds, scorer.meta.input_size, scorer.meta.preprocessing_version
            )
        except Unscorable as exc:
            report.unscorable.append({"file": str(path), "reason": str(exc)})
            continue
        keep = prepared.anatomy
        if not len(keep):
            report.unscorable.append({"file": str(path), "reason": NO_ANATOMY})
            continue
        frames = prepared.images[keep]
        scored = [scorer.score(frames[i : i + batch]) for i in range(0, len(frames), batch)]
        probs = np.concatenate([c[0] for c in scored])
        dists = np.concatenate([c[1] for c in scored]) if scored[0][1] is not None else None
        number = ds.get("InstanceNumber")
        positions = slice_positions(ds)
        for k, (frame, p) in enumerate(zip(keep.tolist(), probs, strict=True)):
            pos = positions[frame]
            results[uid].append(
                SliceResult(
                    str(ds.SOPInstanceUID),
                    frame,
                    p.tolist(),
                    pos,
                    int(number) if number is not None else None,
                    None if dists is None else float(dists[k]),
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
                    "distance": None if dists is None else round(float(dists[k]), 3),
                }
            )
    for uid, report in reports.items():
        no_anatomy = [u for u in report.unscorable if u["reason"] == NO_ANATOMY]
        reason = out_of_scope.get(uid) or (no_anatomy[0]["reason"] if no_anatomy else None)
        v = assess(results[uid], policy, classes, scope, scorer.ood_threshold, reason)
        report.verdict = {
            "label": v.label,
            "score": v.score,
            "n_slices": v.n_slices,
            "n_flagged": v.n_flagged,
            "worst_slices": v.worst_slices,
            "reason": v.reason,
        }
    return list(reports.values()), unreadable
