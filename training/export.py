"""From a training run to the node's model artifact (DESIGN.md contract).

First a temperature is fitted on the validation split's logits (``training.calibration``), so
every threshold below, and every probability the node shows, is a calibrated one. Then the
series decision policy is chosen on the validation split: the slice threshold for the stated
sensitivity to non-diagnostic slices, and the series threshold for the stated sensitivity to
non-diagnostic series within a cap on false alerts (the share of diagnostic series flagged);
when both cannot be had, the cap wins and the shortfall is recorded. The series score is
computed by the node's own ``mriqa_node.domain.verdict.decide`` (mean P(non-diagnostic) over
the worst ``top_fraction`` of slices) and a series is truly non-diagnostic when at least
``top_fraction`` of its slices are class 0. The test split is only used to report metrics.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.errors import InvalidDicomError

from mriqa_node.domain.verdict import SeriesPolicy, SliceResult, decide
from mriqa_node.ml.artifact import (
    TASK_CLASSES,
    ArtifactError,
    ArtifactMeta,
    save_artifact,
    save_ood,
)
from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION
from training.calibration import calibrate, calibrated_predictions, calibration_summary
from training.train import CONFIG_FILE, MODEL_FILE, PREDICTIONS_FILE, SPLITS_FILE, read_history

log = logging.getLogger(__name__)

_BINARY = TASK_CLASSES["binary"]
_SCORE_STEP = 1e-4  # decide() rounds series scores to 4 decimals


def p_nondiagnostic(probs: np.ndarray) -> np.ndarray:
    """[n, classes] probabilities (class 0 non-diagnostic) or [n] P(non-diag) -> [n] float64."""
    probs = np.asarray(probs, np.float64)
    return probs[:, 0] if probs.ndim == 2 else probs


def threshold_for_sensitivity(positive_scores: np.ndarray, sensitivity: float) -> float:
    """Largest t with mean(positive_scores >= t) >= sensitivity (the most specific choice)."""
    scores = np.sort(np.asarray(positive_scores, np.float64))[::-1]
    if len(scores) == 0:
        raise ValueError("no positive examples")
    k = min(len(scores), max(1, math.ceil(sensitivity * len(scores) - 1e-9)))
    return float(scores[k - 1])


def series_groups(series_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Series id -> indices of its slices, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(series_ids):
        groups.setdefault(str(sid), []).append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def series_truth(labels_binary: np.ndarray, groups: dict[str, np.ndarray], top_fraction: float):
    """A series is non-diagnostic (True) when at least top_fraction of its slices are class 0."""
    y = np.asarray(labels_binary)
    return np.asarray([np.mean(y[idx] == 0) >= top_fraction - 1e-12 for idx in groups.values()])


def series_verdicts(
    p_nondiag: np.ndarray, groups: dict[str, np.ndarray], policy: SeriesPolicy
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, non-diagnostic flags) per series, from the node's decide()."""
    scores, flags = [], []
    for idx in groups.values():
        slices = [
            SliceResult(sop_instance_uid="", frame=j, probabilities=(float(p), 1.0 - float(p)))
            for j, p in enumerate(p_nondiag[idx])
        ]
        verdict = decide(slices, policy, _BINARY)
        scores.append(verdict.score)
        flags.append(verdict.non_diagnostic)
    return np.asarray(scores, np.float64), np.asarray(flags, bool)


def _rates(flagged: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    hits, false_alerts = int(flagged[positive].sum()), int(flagged[~positive].sum())
    return {
        "sensitivity": hits / n_pos if n_pos else None,
        "specificity": 1 - false_alerts / n_neg if n_neg else None,
        "false_alert_rate": false_alerts / n_neg if n_neg else None,
        "n_positive": n_pos,
        "n_negative": n_neg,
        "n_flagged_positive": hits,
        "n_flagged_negative": false_alerts,
    }


def _candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Half a rounding step below each distinct (rounded) series score, and one above them all
    (flag nothing), ascending: each flags exactly the series that score at least that much,
    whichever way decide() rounded."""
    cands = np.append(scores - _SCORE_STEP / 2, scores.max(initial=0.0) + _SCORE_STEP / 2)
    return np.unique(np.clip(np.round(cands, 6), 0.0, 1.0))


def series_threshold(
    scores: np.ndarray,
    positive: np.ndarray,
    sensitivity: float,
    max_false_alerts: float,
    floor: float = 0.0,
) -> float:
    """The series threshold under both targets, most specific first.

    The largest threshold that reaches ``sensitivity`` when its false-alert rate (share of
    diagnostic series flagged) is within ``max_false_alerts``; otherwise the cap wins (a node
    that cries wolf gets switched off) and the threshold with the highest sensitivity under it
    is taken, the fewest false alerts among equals. Without non-diagnostic series there is no
    sensitivity to aim at: ``floor`` (e.g. the slice threshold), raised as far as the cap needs.
    If no threshold honours the cap, the one with the fewest false alerts.
    """
    cands = _candidate_thresholds(scores)
    flags = scores[None, :] >= cands[:, None]  # [threshold, series]
    neg = ~positive
    fa = flags[:, neg].mean(axis=1) if neg.any() else np.zeros(len(cands))
    under_cap = fa <= max_false_alerts + 1e-12
    if not under_cap.any():
        return float(cands[fa == fa.min()].max())
    if not positive.any():
        return float(max(floor, cands[under_cap].min()))
    sens = flags[:, positive].mean(axis=1)
    both = under_cap & (sens >= sensitivity - 1e-12)
    if both.any():
        return float(cands[both].max())
    best = sens[under_cap].max()
    return float(cands[under_cap & (sens == best)].max())


def choose_operating_point(
    val_probs: np.ndarray,
    val_labels_binary: np.ndarray,
    series_ids: Sequence[str],
    sensitivity: float = 0.90,
    max_false_alerts: float = 0.05,
    top_fraction: float = 0.2,
    worst_count: int = 3,
) -> dict[str, Any]:
    """Slice and series thresholds chosen on val (pass calibrated probabilities).

    The slice threshold is the most specific one with the stated sensitivity to non-diagnostic
    slices (it marks slices for the technologist). The series threshold decides the alert: see
    ``series_threshold`` for how the sensitivity target and the false-alert cap are traded.
    Returns slice_threshold, series_threshold, top_fraction, worst_count (a SeriesPolicy's
    fields, also under "policy"), the targets, ``sensitivity_met`` and ``false_alert_cap_met``
    (None when val has no series to judge by), the achieved rates and counts under "slice" and
    "series" (the node's own decisions), and "warnings" that say plainly what was not met.
    """
    if not 0 < sensitivity <= 1:
        raise ValueError("sensitivity must lie in (0, 1]")
    if not 0 <= max_false_alerts <= 1:
        raise ValueError("max_false_alerts must lie in [0, 1]")
    p = p_nondiagnostic(val_probs)
    y = np.asarray(val_labels_binary)
    if len(p) != len(y) or len(y) != len(series_ids):
        raise ValueError("probabilities, labels and series ids must be aligned")
    warnings = []
    positive = y == 0
    if positive.any():
        slice_t = threshold_for_sensitivity(p[positive], sensitivity)
    else:
        slice_t = 0.5
        warnings.append("no non-diagnostic slice in val: slice threshold left at 0.5")

    groups = series_groups(series_ids)
    truth = series_truth(y, groups, top_fraction)
    scores, _ = series_verdicts(p, groups, SeriesPolicy(slice_t, 0.5, top_fraction, worst_count))
    series_t = series_threshold(scores, truth, sensitivity, max_false_alerts, floor=slice_t)
    policy = SeriesPolicy(slice_t, series_t, top_fraction, worst_count)
    _, flags = series_verdicts(p, groups, policy)
    achieved = _rates(flags, truth)
    met = _targets_met(achieved, sensitivity, max_false_alerts)
    warnings += _target_warnings(achieved, sensitivity, max_false_alerts)
    return {
        **policy.as_dict(),
        "policy": policy.as_dict(),
        "target_sensitivity": sensitivity,
        "max_false_alerts": max_false_alerts,
        **met,
        "chosen_on": "val",
        "slice": _rates(p >= policy.slice_threshold, positive),
        "series": achieved,
        "warnings": warnings,
    }


def _targets_met(rates: dict[str, Any], sensitivity: float, cap: float) -> dict[str, bool | None]:
    sens, fa = rates["sensitivity"], rates["false_alert_rate"]
    return {
        "sensitivity_met": None if sens is None else bool(sens >= sensitivity - 1e-12),
        "false_alert_cap_met": None if fa is None else bool(fa <= cap + 1e-12),
    }


def _target_warnings(rates: dict[str, Any], sensitivity: float, cap: float) -> list[str]:
    """Plain sentences for each target the chosen series threshold misses on val."""
    met = _targets_met(rates, sensitivity, cap)
    got = (
        f"val series: sensitivity {_fmt(rates['sensitivity'])} ({rates['n_flagged_positive']}"
        f"/{rates['n_positive']} non-diagnostic series flagged), false-alert rate"
        f" {_fmt(rates['false_alert_rate'])} ({rates['n_flagged_negative']}/{rates['n_negative']}"
        " diagnostic series flagged)"
    )
    out = []
    if met["sensitivity_met"] is None:
        out.append(f"no non-diagnostic series in val: sensitivity cannot be checked; {got}")
    elif not met["sensitivity_met"]:
        out.append(
            f"sensitivity target {sensitivity:.2f} NOT MET: kept the false-alert cap {cap:.2f}"
            f" and took the highest sensitivity under it; {got}"
        )
    if met["false_alert_cap_met"] is None:
        out.append(f"no diagnostic series in val: false alerts cannot be checked; {got}")
    elif not met["false_alert_cap_met"]:
        out.append(f"false-alert cap {cap:.2f} NOT MET by any threshold; {got}")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def split_series(preds: Any, split: str, policy: SeriesPolicy) -> tuple[np.ndarray, np.ndarray]:
    """(series scores, truly non-diagnostic) of one split of predictions.npz: the series ROC."""
    groups = series_groups(preds[f"{split}_series_uids"])
    scores, _ = series_verdicts(p_nondiagnostic(preds[f"{split}_probs"]), groups, policy)
    return scores, series_truth(preds[f"{split}_labels"], groups, policy.top_fraction)


def evaluate_predictions(preds: Any, split: str, policy: SeriesPolicy) -> dict[str, Any]:
    """Slice and series metrics of one split of predictions.npz under a policy."""
    probs = np.asarray(preds[f"{split}_probs"], np.float64)
    y = np.asarray(preds[f"{split}_labels"])
    out: dict[str, Any] = {"split": split, "n_slices": len(y)}
    if len(y) == 0:
        return out
    num_classes = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y, pred), 1)
    recall = [float(cm[c, c] / cm[c].sum()) if cm[c].sum() else None for c in range(num_classes)]
    out["accuracy"] = float((pred == y).mean())
    given = [r for r in recall if r is not None]
    out["balanced_accuracy"] = float(np.mean(given)) if given else None
    out["recall_per_class"] = recall
    out["confusion_matrix"] = cm.tolist()  # rows: true class, columns: predicted
    out["auc"] = _auc(y, probs)
    p = p_nondiagnostic(probs)
    groups = series_groups(preds[f"{split}_series_uids"])
    _, flags = series_verdicts(p, groups, policy)
    truth = series_truth(y, groups, policy.top_fraction)
    out["slice_at_threshold"] = _rates(p >= policy.slice_threshold, y == 0)
    out["series"] = {**_rates(flags, truth), "n_series": len(groups)}
    return out


@dataclass(frozen=True)
class PolicyPlan:
    """What export decides for a run: the temperature, the operating point, and its metrics."""

    calibration: dict[str, Any]  # training.calibration.calibrate(): T, ECE before/after
    operating_point: dict[str, Any]  # choose_operating_point() on calibrated val series
    test: dict[str, Any]  # evaluate_predictions() on the calibrated test split
    predictions: dict[str, np.ndarray]  # predictions.npz with calibrated val/test probs

    @property
    def policy(self) -> SeriesPolicy:
        return SeriesPolicy.from_dict(self.operating_point["policy"])


def plan_policy(
    preds: dict[str, np.ndarray], sensitivity: float = 0.90, max_false_alerts: float = 0.05
) -> PolicyPlan:
    """Fit the temperature on val, then choose the operating point on val's calibrated series
    (the probabilities the node will show) and measure it on test."""
    cal = calibrate(preds)
    calibrated = calibrated_predictions(preds, cal["temperature"])
    default = SeriesPolicy()
    op = choose_operating_point(
        calibrated["val_probs"],
        (preds["val_labels"] != 0).astype(np.int64),
        preds["val_series_uids"],
        sensitivity=sensitivity,
        max_false_alerts=max_false_alerts,
        top_fraction=default.top_fraction,
        worst_count=default.worst_count,
    )
    test = evaluate_predictions(calibrated, "test", SeriesPolicy.from_dict(op["policy"]))
    return PolicyPlan(cal, op, test, calibrated)


def scope_of_training(manifest: Path | str, min_slices: int = 3) -> dict[str, Any]:
    """The model's scope (domain.scope.ModelScope) from the headers of what it was trained on:
    the sequence families and in-plane sizes seen (one file per series), the fixed exclusions
    (localizers, phase, diffusion, perfusion, derived, echo planar), and ``min_slices``: a
    series score over fewer slices was not validated. Body parts and orientations are left
    open: the training data covers several of each and rarely states BodyPartExamined."""
    import pydicom

    from mriqa_node.dicom.headers import image_facts
    from mriqa_node.domain.scope import ModelScope
    from training.manifest import read_manifest

    path = Path(manifest)
    if not path.is_file():
        return ModelScope(min_slices=min_slices).as_dict()
    first: dict[str, str] = {}
    for r in read_manifest(path):
        first.setdefault(r.series_uid, r.path)
    sequences: set[str] = set()
    sizes: list[int] = []
    for file in first.values():
        try:
            f = image_facts(pydicom.dcmread(file, stop_before_pixels=True))
        except Exception:  # arrays and images without a DICOM header: no facts
            continue
        sequences |= set(f.scanning_sequence) - {"EP"}
        sizes += [s for s in (f.rows, f.columns) if s]
    return ModelScope(
        sequences=tuple(sorted(sequences)) or None,
        min_size=min(sizes, default=32),
        max_size=max(sizes, default=2048),
        min_slices=min_slices,
    ).as_dict()


def export_artifact(
    run_dir: Path | str,
    out_dir: Path | str,
    name: str,
    version: str,
    sensitivity: float = 0.90,
    test_metrics: dict[str, Any] | None = None,
    max_false_alerts: float = 0.05,
    ood: bool = True,
) -> ArtifactMeta:
    """Write the node's artifact (model.keras + model.json) for a finished run; ``test_metrics``
    are added to the test split's policy metrics (e.g. the report's metrics against truth)."""
    import keras

    run = Path(run_dir)
    cfg = json.loads((run / CONFIG_FILE).read_text())
    if int(cfg["input_size"]) != INPUT_SIZE:
        raise ArtifactError(
            f"{run}: trained at {cfg['input_size']} px, the node scores {INPUT_SIZE} px images"
        )
    if str(cfg.get("preprocessing_version")) != PREPROCESSING_VERSION:
        raise ArtifactError(
            f"{run}: trained with preprocessing v{cfg.get('preprocessing_version')}, this node"
            f" has v{PREPROCESSING_VERSION}: retrain"
        )
    task = cfg["task"]
    splits = json.loads((run / SPLITS_FILE).read_text())
    history = read_history(run)
    with np.load(run / PREDICTIONS_FILE) as npz:
        preds = {k: npz[k] for k in npz.files}
    plan = plan_policy(preds, sensitivity, max_false_alerts)
    op = plan.operating_point
    test_metrics = {**plan.test, **(test_metrics or {})}
    last = history[-1] if history else {}
    meta = ArtifactMeta(
        name=name,
        version=version,
        task=task,
        class_names=list(TASK_CLASSES[task]),
        input_size=INPUT_SIZE,
        preprocessing_version=PREPROCESSING_VERSION,
        sha256="",
        policy=plan.policy.as_dict(),
        output="logits",
        temperature=plan.calibration["temperature"],
        trained=True,
        training_data={
            "manifest_sha256": cfg["manifest_sha256"],
            "manifest": Path(cfg["manifest"]).name,
            "label_source": cfg["label"],
            "task": task,
            "split_fractions": cfg["fractions"],
            "split_seed": cfg["seed"],
            "counts": splits["counts"],
        },
        test_metrics=_jsonable(test_metrics),
        scope=scope_of_training(cfg["manifest"]),
        extra=_jsonable(
            {
                "architecture": {"model": cfg["model"], **_arch(cfg)},
                "training": {
                    "steps": int(last.get("step", 0)),
                    "batch": cfg["batch"],
                    "lr": cfg["lr"],
                    "class_weights": cfg["class_weights"],
                    "seconds": last.get("seconds"),
                    "final_val_acc": last.get("val_acc"),
                    "runtime": cfg.get("runtime"),
                    "versions": cfg.get("versions"),
                },
                "operating_point": {k: op[k] for k in op if k != "policy"},
                "calibration": calibration_summary(plan.calibration),
            }
        ),
    )
    model = keras.saving.load_model(run / MODEL_FILE, compile=False)
    meta = save_artifact(model, Path(out_dir), meta)
    if ood:
        from training.ood import fit_guard

        try:
            g = fit_guard(run, cfg["manifest"])
        except (OSError, ValueError, KeyError, InvalidDicomError) as exc:
            log.warning("no OOD guard in the artifact: %s", exc)
        else:
            meta = save_ood(Path(out_dir), meta, g["mean"], g["precision"], g["threshold"],
                            g["figures"])  # fmt: skip
    return meta


def _arch(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"widths": cfg["widths"]} if cfg["model"] == "convnet" else {"width": cfg["width"]}


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, score))


def _auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUC of P(non-diagnostic) for class 0 (not of P(diagnostic): a confident model's
    P(diagnostic) rounds to 1.0 in float32 and ties); 3-class: macro one-vs-rest AUC."""
    if probs.shape[1] == 2:
        return _binary_auc(y == 0, probs[:, 0])
    if len(np.unique(y)) < probs.shape[1]:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
