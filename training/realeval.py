"""The verdict on real anatomy the model never saw, per source (held-out subject).

A run's predictions (val or test split) are joined, by SOP instance UID, with the
``corruption.csv`` of ``mriqa-train corrupt`` (the copy's motion level, amplitude and measured
severity of every slice). Per source, with counts:

* slice AUC of P(non-diagnostic), clean slices (no motion) against mild motion (measured
  severity 0.2 .. 0.5: visible, still diagnostic) and against heavy motion (>= 0.5);
* the share of clean series (copies without motion) that raise a rescan alert, and of the
  non-diagnostic series that do, with the node's own series policy. A series is
  non-diagnostic as the operating point counts it (``export.series_truth``): at least the
  policy's top fraction of its slices measured non-diagnostic. That is what a reader sees;
  the copy's motion level is not (a heavy-level copy whose moves fell where they leave little
  trace reads as diagnostic), so the level's count is kept beside it only for comparison;
* the expected calibration error of the calibrated probabilities.

Synthetic phantoms in the same split are left out: a figure on our own phantoms is never the
headline.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.domain.verdict import SeriesPolicy
from training.calibration import expected_calibration_error, logits_of, softmax
from training.export import series_groups, series_truth, series_verdicts

MILD = (0.2, 0.5)  # measured severity of "mild" motion: visible, diagnostic
REAL_PREDICTIONS_FILE = "real_predictions.npz"  # a run's scores of real anatomy it never saw


def read_corruption(paths: Sequence[Path | str]) -> dict[str, dict[str, str]]:
    """SOP instance UID -> its corruption.csv row, over several data sets."""
    out: dict[str, dict[str, str]] = {}
    for path in map(Path, paths):
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                out[row["sop_instance_uid"]] = row
    return out


def _auc(negative: np.ndarray, positive: np.ndarray) -> float | None:
    if len(negative) == 0 or len(positive) == 0:
        return None
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    return float(roc_auc_score(y, np.r_[negative, positive]))


def evaluate_real(
    preds: Mapping[str, np.ndarray],
    split: str,
    corruption: Mapping[str, Mapping[str, str]],
    policy: SeriesPolicy,
    temperature: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Per source (patient id) of the split that has corruption rows: the figures above."""
    sops = np.asarray(preds[f"{split}_sop_uids"]).astype(str)
    known = np.asarray([s in corruption for s in sops])
    if not known.any():
        return {}
    probs = softmax(logits_of(preds, split), temperature)
    p = probs[:, 0]
    labels = np.asarray(preds[f"{split}_labels"])
    series = np.asarray(preds[f"{split}_series_uids"]).astype(str)
    subjects = np.asarray(preds[f"{split}_patient_ids"]).astype(str)
    out: dict[str, dict[str, Any]] = {}
    for subject in sorted(set(subjects[known])):
        idx = np.flatnonzero(known & (subjects == subject))
        rows = [corruption[s] for s in sops[idx]]
        amp = np.asarray([float(r["amplitude"]) for r in rows])
        sev = np.asarray([float(r["severity"]) for r in rows])
        clean, heavy = amp == 0, sev >= MILD[1]
        mild = (amp > 0) & (sev >= MILD[0]) & (sev < MILD[1])
        groups = series_groups(series[idx])
        _, flagged = series_verdicts(p[idx], groups, policy)
        level = {sid: corruption[sops[idx][g[0]]]["level"] for sid, g in groups.items()}
        levels = np.asarray(list(level.values()))
        truth = np.asarray([int(r["true_class"]) for r in rows])
        nondiag = series_truth(np.where(truth == 0, 0, 1), groups, policy.top_fraction)
        out[subject] = {
            "source": rows[0]["source"],
            "slices": {
                "clean": int(clean.sum()),
                "mild": int(mild.sum()),
                "heavy": int(heavy.sum()),
            },
            "auc_clean_vs_mild": _auc(p[idx][clean], p[idx][mild]),
            "auc_clean_vs_heavy": _auc(p[idx][clean], p[idx][heavy]),
            "clean_series": int((levels == "clean").sum()),
            "clean_series_alerted": int(flagged[levels == "clean"].sum()),
            "nondiag_series": int(nondiag.sum()),
            "nondiag_series_caught": int(flagged[nondiag].sum()),
            "heavy_series": int((levels == "heavy").sum()),
            "heavy_series_caught": int(flagged[levels == "heavy"].sum()),
            "ece": expected_calibration_error(probs[idx], labels[idx]),
        }
    return out


def pooled(per_source: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Totals over sources (series counts) and the worst source's AUCs: each source must hold."""
    total: dict[str, Any] = defaultdict(int)
    for row in per_source.values():
        for key in ("clean_series", "clean_series_alerted", "nondiag_series",
                    "nondiag_series_caught", "heavy_series", "heavy_series_caught"):  # fmt: skip
            total[key] += row[key]
    for key in ("auc_clean_vs_mild", "auc_clean_vs_heavy"):
        values = [r[key] for r in per_source.values() if r[key] is not None]
        total[f"worst_{key}"] = min(values) if values else None
    return dict(total)


def table(per_source: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown table, one row per source."""

    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    lines = [
        "| source | slices clean/mild/heavy | AUC clean vs mild | AUC clean vs heavy |"
        " clean series alerted | non-diagnostic series caught | heavy-level copies caught |"
        " ECE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in per_source.items():
        s = r["slices"]
        lines.append(
            f"| {name} | {s['clean']}/{s['mild']}/{s['heavy']} | {f(r['auc_clean_vs_mild'])} |"
            f" {f(r['auc_clean_vs_heavy'])} | {r['clean_series_alerted']}/{r['clean_series']} |"
            f" {r['nondiag_series_caught']}/{r['nondiag_series']} |"
            f" {r['heavy_series_caught']}/{r['heavy_series']} | {f(r['ece'])} |"
        )
    return lines


def real_eval_of_run(
    run_dir: Path | str,
    corruption: Sequence[Path | str],
    policy: Mapping[str, Any],
    temperature: float,
    split: str = "test",
) -> dict[str, dict[str, Any]]:
    """``evaluate_real`` of a run directory's predictions with an exported policy."""
    from training.train import PREDICTIONS_FILE

    preds = dict(np.load(Path(run_dir) / PREDICTIONS_FILE))
    rows = read_corruption([c for c in corruption if Path(c).is_file()])
    return evaluate_real(preds, split, rows, SeriesPolicy.from_dict(dict(policy)), temperature)


def corruption_files(manifest: Path | str) -> list[Path]:
    """The ``corruption.csv`` of every corrupted data set a manifest draws on (found beside the
    manifest or up to three folders above its files)."""
    from training.manifest import read_manifest

    found: set[Path] = set()
    dirs = {Path(r.path).resolve().parent for r in read_manifest(manifest)}
    dirs.add(Path(manifest).resolve().parent)
    for d in dirs:
        for parent in [d, *list(d.parents)[:3]]:
            if (parent / "corruption.csv").is_file():
                found.add(parent / "corruption.csv")
                break
    return sorted(found)


def real_eval_of_manifest(preds: Mapping[str, np.ndarray], manifest: Path | str, plan: Any):
    """Per-source figures of a run's test split under its planned policy (see export)."""
    files = corruption_files(manifest)
    if not files:
        return {}
    rows = read_corruption(files)
    return evaluate_real(preds, "test", rows, plan.policy, plan.calibration["temperature"])


def predict_real(run_dir: Path | str, manifest: Path | str, batch: int = 16,
                 progress: bool = True) -> Path:  # fmt: skip
    """Score every slice of a corrupted real-anatomy manifest (``mriqa-train corrupt``) with a
    run's model, for a run trained without it (``reproduce``: the paper's configurations on
    phantoms). Writes ``real_predictions.npz`` in the run, in the split layout under the split
    name ``real`` plus the manifest's path, which the run report reads."""
    import keras

    from training.manifest import labels_for, read_manifest
    from training.train import MODEL_FILE

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    records = [r for r in read_manifest(manifest) if r.true_class is not None]
    labels = labels_for(records, "truth", cfg["task"])
    model = keras.saving.load_model(run / MODEL_FILE, compile=False)
    size, version = int(cfg.get("input_size", 512)), str(cfg.get("preprocessing_version", "1"))
    images = _batches(records, size, version, batch, f"real {run.name}", progress)
    logits = [np.asarray(model(x, training=False), np.float32) for x in images]
    out = run / REAL_PREDICTIONS_FILE
    np.savez(
        out,
        manifest=np.str_(str(Path(manifest).resolve())),
        real_logits=np.concatenate(logits) if logits else np.zeros((0, 2), np.float32),
        real_labels=np.asarray(labels, np.int32),
        real_patient_ids=np.asarray([r.patient_id for r in records], dtype=str),
        real_series_uids=np.asarray([r.series_uid for r in records], dtype=str),
        real_sop_uids=np.asarray([r.sop_instance_uid for r in records], dtype=str),
    )
    return out


def real_eval_unseen(run_dir: Path | str, plan: Any) -> dict[str, dict[str, Any]] | None:
    """Per-source figures of ``real_predictions.npz`` under the run's planned policy (None when
    the run has no such file)."""
    path = Path(run_dir) / REAL_PREDICTIONS_FILE
    if not path.is_file():
        return None
    preds = dict(np.load(path))
    rows = read_corruption(corruption_files(str(preds["manifest"])))
    return evaluate_real(preds, "real", rows, plan.policy, plan.calibration["temperature"])


def real_anatomy_md(per_source: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    if not per_source:
        return ["_No real-anatomy slices with known corruption in the test split._", ""]
    return [
        "Per held-out real source, calibrated, at the operating point above (mild: measured"
        " severity 0.2-0.5; heavy: >= 0.5; a series is non-diagnostic when at least the"
        " policy's top fraction of its slices measure non-diagnostic; the heavy-level copies"
        " are counted beside it for comparison, some of them read as diagnostic):",
        "",
        *table(per_source),
        "",
    ]


def evaluate_artifact(
    artifact: Path | str,
    data_dirs: Sequence[Path | str],
    sources: Sequence[str] = (),
    batch: int = 16,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """The per-source figures of an exported model (calibrated, its own series policy, as the
    node scores) on corrupted real series (``mriqa-train corrupt`` output folders), optionally
    only the subjects in ``sources``: how a model does on a site's data or on subjects it
    never saw. Pass only subjects outside the model's training data for an honest figure."""
    from mriqa_node.ml.scorer import Scorer
    from training.manifest import labels_for, read_manifest

    scorer = Scorer(Path(artifact))
    size, version = scorer.meta.input_size, scorer.meta.preprocessing_version
    wanted = set(sources)
    records = [r for d in data_dirs for r in read_manifest(Path(d) / "manifest.csv")
               if r.true_class is not None and (not wanted or r.patient_id in wanted)]  # fmt: skip
    probs = [scorer.score(x)[0][:, 0]
             for x in _batches(records, size, version, batch, "score", progress)]  # fmt: skip
    p = np.clip(np.concatenate(probs) if probs else np.zeros(0), 1e-7, 1 - 1e-7)
    preds = {
        "artifact_logits": np.log(np.stack([p, 1 - p], axis=1)),  # already calibrated: T = 1
        "artifact_labels": np.asarray(labels_for(records, "truth", "binary"), np.int32),
        "artifact_patient_ids": np.asarray([r.patient_id for r in records], dtype=str),
        "artifact_series_uids": np.asarray([r.series_uid for r in records], dtype=str),
        "artifact_sop_uids": np.asarray([r.sop_instance_uid for r in records], dtype=str),
    }
    rows = read_corruption([Path(d) / "corruption.csv" for d in data_dirs])
    return evaluate_real(preds, "artifact", rows, SeriesPolicy.from_dict(scorer.meta.policy))


def _batches(records: Sequence[Any], size: int, version: str, batch: int, desc: str,
             progress: bool):  # fmt: skip
    """The records' images as the node preprocesses them for a model of preprocessing
    ``version``, ``batch`` at a time."""
    import pydicom
    from tqdm.auto import tqdm

    from mriqa_node.preprocess import preprocess

    for i in tqdm(range(0, len(records), batch), desc=desc, disable=not progress):
        yield np.concatenate([preprocess(pydicom.dcmread(r.path), size, version)[:1]
                              for r in records[i : i + batch]])  # fmt: skip
