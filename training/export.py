"""From a training run to the node's model artifact (DESIGN.md contract).

The series decision policy is chosen on the validation split: the slice threshold for the
stated sensitivity to non-diagnostic slices, the series threshold for the stated sensitivity to
non-diagnostic series, where the series score is computed by the node's own
``mriqa_node.domain.verdict.decide`` (mean P(non-diagnostic) over the worst ``top_fraction`` of
slices) and a series is truly non-diagnostic when at least ``top_fraction`` of its slices are
class 0. The test split is only used to report metrics.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.domain.verdict import SeriesPolicy, SliceResult, decide
from mriqa_node.ml.artifact import TASK_CLASSES, ArtifactError, ArtifactMeta, save_artifact
from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION
from training.train import CONFIG_FILE, MODEL_FILE, PREDICTIONS_FILE, SPLITS_FILE, read_history

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
    return {
        "sensitivity": float(flagged[positive].mean()) if n_pos else None,
        "specificity": float((~flagged[~positive]).mean()) if n_neg else None,
        "n_positive": n_pos,
        "n_negative": n_neg,
    }


def choose_operating_point(
    val_probs: np.ndarray,
    val_labels_binary: np.ndarray,
    series_ids: Sequence[str],
    sensitivity: float = 0.90,
    top_fraction: float = 0.2,
    worst_count: int = 3,
) -> dict[str, Any]:
    """Thresholds for the stated sensitivity to non-diagnostic slices and series (on val).

    Returns slice_threshold, series_threshold, top_fraction, worst_count (a SeriesPolicy's
    fields, also under "policy"), target_sensitivity, and the achieved sensitivity/specificity
    at slice and series level under "slice" and "series". Without any non-diagnostic slice
    (or series) in val a threshold cannot be chosen: the slice threshold falls back to 0.5 and
    the series threshold to the slice threshold, and "warnings" says so.
    """
    if not 0 < sensitivity <= 1:
        raise ValueError("sensitivity must lie in (0, 1]")
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
    policy = SeriesPolicy(slice_t, 0.5, top_fraction, worst_count)
    scores, _ = series_verdicts(p, groups, policy)
    if truth.any():
        series_t = threshold_for_sensitivity(scores[truth], sensitivity)
        policy = SeriesPolicy(slice_t, series_t, top_fraction, worst_count)
        _, flags = series_verdicts(p, groups, policy)
        if flags[truth].mean() < sensitivity:  # the score was rounded up past the threshold
            policy = SeriesPolicy(slice_t, max(0.0, series_t - _SCORE_STEP), top_fraction,
                                  worst_count)  # fmt: skip
    else:
        policy = SeriesPolicy(slice_t, slice_t, top_fraction, worst_count)
        warnings.append("no non-diagnostic series in val: series threshold = slice threshold")
    _, flags = series_verdicts(p, groups, policy)
    return {
        **policy.as_dict(),
        "policy": policy.as_dict(),
        "target_sensitivity": sensitivity,
        "chosen_on": "val",
        "slice": _rates(p >= policy.slice_threshold, positive),
        "series": _rates(flags, truth),
        "warnings": warnings,
    }


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


def export_artifact(
    run_dir: Path | str,
    out_dir: Path | str,
    name: str,
    version: str,
    sensitivity: float = 0.90,
    test_metrics: dict[str, Any] | None = None,
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
    val_binary = (preds["val_labels"] != 0).astype(np.int64)
    default = SeriesPolicy()
    op = choose_operating_point(
        preds["val_probs"], val_binary, preds["val_series_uids"], sensitivity,
        default.top_fraction, default.worst_count,
    )  # fmt: skip
    policy = SeriesPolicy.from_dict(op["policy"])
    test_metrics = {**evaluate_predictions(preds, "test", policy), **(test_metrics or {})}
    last = history[-1] if history else {}
    meta = ArtifactMeta(
        name=name,
        version=version,
        task=task,
        class_names=list(TASK_CLASSES[task]),
        input_size=INPUT_SIZE,
        preprocessing_version=PREPROCESSING_VERSION,
        sha256="",
        policy=policy.as_dict(),
        output="logits",
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
            }
        ),
    )
    model = keras.saving.load_model(run / MODEL_FILE, compile=False)
    return save_artifact(model, Path(out_dir), meta)


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
