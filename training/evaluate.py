"""Evaluation of a training run: metrics against the training labels, the truth and each rater.

The synthetic generator knows the true quality class of every image (from the motion severity it
applied); the two simulated raters and the training labels derived from them are noisy versions
of it. Measuring the same predictions against the truth and against each rater turns the paper's
section 4.3 ("unreliable labels ... also affect the performance measurement") into numbers: the
*cost of label noise* is a metric measured against the truth minus the same metric measured
against the raters. On real data the truth is unknown (``truth3 == -1``) and those parts are
skipped.

Class indices follow the paper: 0 non-diagnostic, 1 diagnostic, 2 excellent; the binary task
groups 1 and 2 into "diagnostic" (1).

Inputs (one run directory, written by ``training.train``): ``config.json``, ``history.csv``,
``predictions.npz`` (see ``evaluate_run``); output: ``metrics.json`` beside them.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from mriqa_node.domain.agreement import jaccard_matrix  # the paper's Fig. 6; re-exported
from training.calibration import calibrate
from training.files import write_json
from training.manifest import task_label

CLASS_NAMES: dict[str, list[str]] = {
    "binary": ["non_diagnostic", "diagnostic"],
    "3class": ["non_diagnostic", "diagnostic", "excellent"],
}
SPLITS = ("test", "val")
# Scalar metrics compared across references (truth / raters / labels) and across runs.
SCALAR_KEYS = ("accuracy", "balanced_accuracy", "auc", "kappa", "macro_f1")
METRICS_FILE = "metrics.json"


# --------------------------------------------------------------------------- label spaces


def task_of(num_classes: int) -> str:
    return "binary" if num_classes == 2 else "3class"


def num_classes_of(task: str) -> int:
    if task not in CLASS_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(CLASS_NAMES)}")
    return len(CLASS_NAMES[task])


def class_names_for(num_classes: int) -> list[str]:
    if num_classes in (2, 3):
        return list(CLASS_NAMES[task_of(num_classes)])
    return [f"class_{i}" for i in range(num_classes)]


def to_task_labels(labels3: Any, task: str) -> np.ndarray:
    """3-class labels (0/1/2, -1 unknown) -> the task's label space (binary: 0 if 0 else 1).

    Unknown (negative) labels stay -1.
    """
    y = np.asarray(labels3).astype(np.int64).reshape(-1)
    out = np.asarray(task_label(y.copy(), task), np.int64)
    return np.where(out < 0, -1, out)


# --------------------------------------------------------------------------- metric helpers


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def row_normalise(cm: Any) -> np.ndarray:
    """Each row divided by its sum (rows without samples stay 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def cohen_kappa(a: Any, b: Any, num_classes: int = 3) -> float | None:
    """Cohen's kappa between two label vectors (pairs with a negative label left out); None
    where undefined (no pairs, or one class only)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    keep = (a >= 0) & (b >= 0)
    if not keep.any():
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite_or_none(cohen_kappa_score(a[keep], b[keep], labels=list(range(num_classes))))


def _auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    positives = positives.astype(bool)
    if positives.all() or not positives.any():
        return None  # undefined with a single class present
    return float(roc_auc_score(positives, scores))


def _as_probs(probs: Any, num_classes: int | None) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:  # a single score column: P(class 1) of a binary model
        p = np.stack([1.0 - p, p], axis=1)
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, C], got shape {p.shape}")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"probs have {p.shape[1]} columns but num_classes={num_classes}")
    return p


# --------------------------------------------------------------------------- metrics


def metrics(
    probs: Any,
    labels: Any,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classification metrics of softmax probabilities ``probs`` [N, C] against ``labels`` [N].

    Samples with a negative label (unknown) are left out and counted in ``n_unknown``. Returns:
    n, accuracy, balanced_accuracy (mean recall over the classes present), per_class
    {name: precision, recall, f1, support}, macro_f1, kappa (Cohen's, prediction vs reference),
    auc, auc_per_class, auc_positive, auc_method, confusion {counts, normalized} with rows = the
    reference and columns = the prediction. Undefined values are None (e.g. AUC with one class).

    AUC: binary tasks score each image with P(non-diagnostic) and take non-diagnostic (class 0) as
    the positive class (the class the node must catch); 3-class tasks average the one-vs-rest AUC
    of every class present (macro).
    """
    p = _as_probs(probs, num_classes)
    c = p.shape[1]
    names = list(class_names) if class_names is not None else class_names_for(c)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} probability rows but {y.shape[0]} labels")
    if (y >= c).any():
        raise ValueError(f"labels contain class {int(y.max())} but there are only {c} classes")
    keep = y >= 0
    p, y = p[keep], y[keep]
    n = int(y.shape[0])
    if c == 2:
        auc_positive = f"0 ({names[0]})"
        auc_method = f"binary ROC: score P({names[0]}), positive class 0 ({names[0]})"
    else:
        auc_positive = "each class vs rest"
        auc_method = "one-vs-rest ROC per class, macro average over the classes present"
    out: dict[str, Any] = {
        "n": n,
        "n_unknown": int((~keep).sum()),
        "num_classes": c,
        "class_names": names,
        "accuracy": None,
        "balanced_accuracy": None,
        "macro_f1": None,
        "kappa": None,
        "auc": None,
        "auc_per_class": dict.fromkeys(names),
        "auc_positive": auc_positive,
        "auc_method": auc_method,
        "per_class": {
            name: {"precision": None, "recall": None, "f1": None, "support": 0} for name in names
        },
        "confusion": {
            "rows": "reference",
            "columns": "predicted",
            "counts": np.zeros((c, c), dtype=int).tolist(),
            "normalized": np.zeros((c, c)).tolist(),
        },
    }
    if n == 0:
        return out
    pred = p.argmax(axis=1)
    every = list(range(c))
    cm = confusion_matrix(y, pred, labels=every)
    precision, recall, f1, support = precision_recall_fscore_support(
        y, pred, labels=every, zero_division=0
    )
    predicted = cm.sum(axis=0)
    present = [k for k in every if support[k] > 0]
    out["accuracy"] = float(accuracy_score(y, pred))
    out["balanced_accuracy"] = float(recall[present].mean())  # over the classes present
    out["macro_f1"] = float(f1[present].mean())
    out["kappa"] = cohen_kappa(y, pred, c)
    for k, name in enumerate(names):
        out["per_class"][name] = {
            "precision": float(precision[k]) if predicted[k] > 0 else None,
            "recall": float(recall[k]) if support[k] > 0 else None,
            "f1": float(f1[k]) if support[k] > 0 else None,
            "support": int(support[k]),
        }
    if c == 2:
        auc = _auc(p[:, 0], y == 0)
        out["auc"] = auc
        out["auc_per_class"] = {names[0]: auc, names[1]: auc}
    else:
        per = {name: _auc(p[:, k], y == k) for k, name in enumerate(names)}
        out["auc_per_class"] = per
        defined = [v for v in per.values() if v is not None]
        out["auc"] = float(np.mean(defined)) if defined else None
    out["confusion"]["counts"] = cm.tolist()
    out["confusion"]["normalized"] = row_normalise(cm).tolist()
    return out


def scalars(m: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The scalar metrics of a ``metrics`` dict (None entries when absent)."""
    if not m:
        return dict.fromkeys(SCALAR_KEYS)
    return {k: _finite_or_none(m.get(k)) for k in SCALAR_KEYS}


def _mean_scalars(items: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for k in SCALAR_KEYS:
        vals = [v for v in (scalars(m)[k] for m in items) if v is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float | None]:
    return {
        k: (a[k] - b[k]) if a.get(k) is not None and b.get(k) is not None else None
        for k in SCALAR_KEYS
    }


# --------------------------------------------------------------------------- inputs


def read_history(source: Any) -> dict[str, np.ndarray]:
    """history.csv (a path), a list of row dicts, or a dict of columns -> {column: float array}.

    Empty cells become NaN (evaluation is usually logged less often than training).
    """
    if isinstance(source, str | Path):
        with open(source, newline="") as f:
            rows = list(csv.DictReader(f))
    elif isinstance(source, Mapping):
        return {str(k): _float_array(v) for k, v in source.items()}
    else:
        rows = [dict(r) for r in source]
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k is not None and k not in keys)
    return {k: _float_array([r.get(k) for r in rows]) for k in keys}


def _float_array(values: Any) -> np.ndarray:
    out = []
    for v in np.asarray(values, dtype=object).reshape(-1):
        try:
            out.append(float(v) if v not in (None, "") else math.nan)
        except (TypeError, ValueError):
            out.append(math.nan)
    return np.asarray(out, dtype=np.float64)


def history_summary(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    h = read_history(path)
    out: dict[str, Any] = {"rows": len(next(iter(h.values()), []))}

    def last(col: str) -> float | None:
        v = h.get(col)
        if v is None:
            return None
        v = v[np.isfinite(v)]
        return float(v[-1]) if v.size else None

    for col in ("step", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"):
        out[f"final_{col}"] = last(col)
    va = h.get("val_acc")
    if va is not None and np.isfinite(va).any():
        i = int(np.nanargmax(va))
        out["best_val_acc"] = float(va[i])
        out["best_val_step"] = float(h["step"][i]) if "step" in h else None
    return out


def load_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def load_predictions(run_dir: Path) -> dict[str, np.ndarray]:
    """predictions.npz as a plain dict. String arrays must be fixed-width (numpy ``<U``): object
    arrays need pickle and are refused (they are then left out, with a default for rater_names)."""
    path = Path(run_dir) / "predictions.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run has not written its predictions")
    out: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            try:
                out[key] = z[key]
            except ValueError:  # object array: needs pickle; we do not unpickle
                continue
    return out


def rater_names_of(preds: Mapping[str, np.ndarray], n_raters: int) -> list[str]:
    names = preds.get("rater_names")
    if names is not None and len(names) == n_raters:
        return [str(x) for x in np.asarray(names).reshape(-1)]
    return [f"rater{i + 1}" for i in range(n_raters)]


# --------------------------------------------------------------------------- one split


def evaluate_split(
    probs: Any,
    labels: Any,
    task: str,
    raters: Any = None,
    truth3: Any = None,
    rater_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of one split against the training labels, the truth (when known) and each rater.

    ``raters`` [N, R] and ``truth3`` [N] are 3-class labels (-1 unknown); they are mapped to the
    task's label space. ``label_noise`` compares references on the images whose truth is known.
    """
    c = num_classes_of(task)
    names = CLASS_NAMES[task]
    p = _as_probs(probs, c)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    n = int(p.shape[0])
    pred = p.argmax(axis=1)
    out: dict[str, Any] = {
        "n": n,
        "label_counts": {nm: int((y == k).sum()) for k, nm in enumerate(names)},
        "prediction_counts": {nm: int((pred == k).sum()) for k, nm in enumerate(names)},
        "vs_labels": metrics(p, y, c, names),
        "vs_truth": None,
        "vs_raters": {},
        "vs_raters_mean": dict.fromkeys(SCALAR_KEYS),
        "raters": None,
        "label_noise": {"available": False, "reason": "no ground truth (truth3 is -1)"},
    }
    r = None if raters is None else np.asarray(raters).astype(np.int64)
    if r is not None and r.ndim == 1:
        r = r[:, None]
    if r is not None and (r.shape[0] != n or r.shape[1] == 0):
        r = None
    rnames = list(rater_names or [])
    if r is not None and len(rnames) != r.shape[1]:
        rnames = [f"rater{i + 1}" for i in range(r.shape[1])]
    r_task = None if r is None else np.stack([to_task_labels(col, task) for col in r.T], axis=1)
    if r_task is not None:
        for i, nm in enumerate(rnames):
            out["vs_raters"][nm] = metrics(p, r_task[:, i], c, names)
        out["vs_raters_mean"] = _mean_scalars(list(out["vs_raters"].values()))
        out["raters"] = rater_agreement(r, rnames)

    t = None if truth3 is None else to_task_labels(truth3, task)
    if t is None or t.shape[0] != n or not (t >= 0).any():
        if t is None:
            out["label_noise"]["reason"] = "no truth3 array"
        return out
    known = t >= 0
    out["vs_truth"] = metrics(p, t, c, names)
    truth_s = scalars(out["vs_truth"])
    noise: dict[str, Any] = {
        "available": True,
        "n": int(known.sum()),
        "vs_truth": truth_s,
        # References measured on the same images (those with known truth).
        "vs_labels": scalars(metrics(p[known], y[known], c, names)),
        "cost_vs_labels": None,
        "vs_raters_mean": None,
        "cost_vs_raters": None,
        "labels_vs_truth": _reference_quality(y[known], t[known], c),
        "raters": {},
    }
    noise["cost_vs_labels"] = _diff(truth_s, noise["vs_labels"])
    if r_task is not None:
        per = []
        for i, nm in enumerate(rnames):
            rk = r_task[known, i]
            m = metrics(p[known], rk, c, names)
            per.append(m)
            q = _reference_quality(rk, t[known], c)
            # Apparent errors: the model disagrees with the rater. How many are correct per truth?
            valid = rk >= 0
            apparent = valid & (pred[known] != rk)
            correct_anyway = apparent & (pred[known] == t[known])
            q.update(
                {
                    "vs_rater": scalars(m),
                    "cost": _diff(truth_s, scalars(m)),
                    "apparent_errors": int(apparent.sum()),
                    "apparent_errors_correct_vs_truth": int(correct_anyway.sum()),
                    "apparent_errors_correct_fraction": (
                        float(correct_anyway.sum() / apparent.sum()) if apparent.any() else None
                    ),
                }
            )
            noise["raters"][nm] = q
        noise["vs_raters_mean"] = _mean_scalars(per)
        noise["cost_vs_raters"] = _diff(truth_s, noise["vs_raters_mean"])
    out["label_noise"] = noise
    return out


def _reference_quality(ref: np.ndarray, truth: np.ndarray, c: int) -> dict[str, Any]:
    """How well a reference (rater / training labels) agrees with the truth."""
    ok = (ref >= 0) & (truth >= 0)
    if not ok.any():
        return {"n": 0, "accuracy_vs_truth": None, "kappa_vs_truth": None}
    return {
        "n": int(ok.sum()),
        "accuracy_vs_truth": float((ref[ok] == truth[ok]).mean()),
        "kappa_vs_truth": cohen_kappa(ref[ok], truth[ok], c),
    }


def rater_agreement(raters: Any, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Pairwise agreement of 3-class raters [N, R]: percent agreement, Cohen's kappa (3-class and
    binarised), Jaccard matrix."""
    r = np.asarray(raters).astype(np.int64)
    if r.ndim == 1:
        r = r[:, None]
    names = list(names or [f"rater{i + 1}" for i in range(r.shape[1])])
    counts = {
        nm: {cn: int((r[:, i] == k).sum()) for k, cn in enumerate(CLASS_NAMES["3class"])}
        for i, nm in enumerate(names)
    }
    pairs = {}
    for i in range(r.shape[1]):
        for j in range(i + 1, r.shape[1]):
            a, b = r[:, i], r[:, j]
            ok = (a >= 0) & (b >= 0)
            ab, bb = to_task_labels(a, "binary"), to_task_labels(b, "binary")
            pairs[f"{names[i]}~{names[j]}"] = {
                "n": int(ok.sum()),
                "agreement": float((a[ok] == b[ok]).mean()) if ok.any() else None,
                "kappa_3class": cohen_kappa(a, b, 3),
                "kappa_binary": cohen_kappa(ab, bb, 2),
                "agreement_binary": float((ab[ok] == bb[ok]).mean()) if ok.any() else None,
                "jaccard": jaccard_matrix(a, b, 3).tolist(),
            }
    return {"names": names, "class_counts": counts, "pairs": pairs}


# --------------------------------------------------------------------------- one run


def truth_of(preds: Mapping[str, np.ndarray], split: str) -> np.ndarray | None:
    """The split's true 3-class labels: ``{split}_truth3`` (the contract) or ``{split}_truth``
    (what training.train writes); None when neither is there."""
    for key in (f"{split}_truth3", f"{split}_truth"):
        if key in preds:
            return np.asarray(preds[key]).reshape(-1)
    return None


def run_task(config: Mapping[str, Any], preds: Mapping[str, np.ndarray]) -> str:
    """config.json's task, else predictions.npz's ``task``, else from the number of columns."""
    for task in (config.get("task"), preds.get("task")):
        if task is not None and str(np.asarray(task).reshape(-1)[0]) in CLASS_NAMES:
            return str(np.asarray(task).reshape(-1)[0])
    for split in SPLITS:
        if f"{split}_probs" in preds:
            return task_of(int(preds[f"{split}_probs"].shape[1]))
    raise ValueError("cannot tell the task: config.json has no task and there are no probs")


def evaluate_run(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """Evaluate one run directory; writes ``run_dir/metrics.json`` (unless write=False).

    Result: run, run_dir, model, task, label, num_classes, class_names, config, history (summary of
    history.csv), splits {test, val: evaluate_split(...)}, label_noise (of the test split, or the
    first split present), calibration (``training.calibration.calibrate``: the temperature fitted
    on val, ECE and NLL before and after it; None without a val split), created.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    preds = load_predictions(run_dir)
    task = run_task(cfg, preds)
    c = num_classes_of(task)
    result: dict[str, Any] = {
        "run": run_dir.name,
        "run_dir": str(run_dir),
        "model": str(cfg.get("model", "unknown")),
        "task": task,
        "label": cfg.get("label"),
        "num_classes": c,
        "class_names": CLASS_NAMES[task],
        "config": cfg,
        "history": history_summary(run_dir / "history.csv"),
        "splits": {},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for split in SPLITS:
        probs = preds.get(f"{split}_probs")
        labels = preds.get(f"{split}_labels")
        if probs is None or labels is None:
            continue
        raters = preds.get(f"{split}_raters")
        result["splits"][split] = evaluate_split(
            probs,
            labels,
            task,
            raters=raters,
            truth3=truth_of(preds, split),
            rater_names=None
            if raters is None
            else rater_names_of(preds, np.asarray(raters).reshape(len(labels), -1).shape[1]),
        )
    if not result["splits"]:
        raise ValueError(f"{run_dir}/predictions.npz holds no val_/test_ probs and labels")
    main = result["splits"].get("test") or next(iter(result["splits"].values()))
    result["label_noise"] = main["label_noise"]
    result["calibration"] = calibrate(preds) if "val" in result["splits"] else None
    if write:
        write_json(run_dir / METRICS_FILE, result)
    return result


def main_split(result: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """("test", split dict), or the first split present."""
    splits = result["splits"]
    name = "test" if "test" in splits else next(iter(splits))
    return name, splits[name]
