"""Agreement between raters, and between a rater and the model: Cohen's kappa, Jaccard matrices.

Pure domain code (numpy only). Labels follow the paper: 0 non-diagnostic, 1 diagnostic,
2 excellent; the binary label space groups 1 and 2 into "diagnostic" (1). Negative labels mean
"not rated" and are ignored pairwise. ``training.evaluate`` re-exports the metric functions.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from itertools import combinations
from typing import Any

import numpy as np


def confusion_counts(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]; entries with a negative label on either side are ignored."""
    t = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(y_pred).astype(np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"length mismatch: {t.shape} vs {p.shape}")
    ok = (t >= 0) & (p >= 0) & (t < num_classes) & (p < num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t[ok], p[ok]), 1)
    return cm


def kappa_from_confusion(cm: Any) -> float | None:
    """Cohen's kappa from a square contingency table; None when undefined (chance agreement 1)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n <= 0:
        return None
    po = np.trace(cm) / n
    pe = float((cm.sum(axis=1) * cm.sum(axis=0)).sum()) / (n * n)
    if pe >= 1.0 - 1e-12:
        return None
    return float((po - pe) / (1.0 - pe))


def cohen_kappa(a: Any, b: Any, num_classes: int = 3) -> float | None:
    """Cohen's kappa between two label vectors (negative labels ignored pairwise)."""
    return kappa_from_confusion(confusion_counts(a, b, num_classes))


def jaccard_matrix(r1: Any, r2: Any, num_classes: int = 3) -> np.ndarray:
    """J[i, j] = |r1 == i AND r2 == j| / |r1 == i OR r2 == j| (the paper's Fig. 6).

    Pairs where either rating is missing (negative) are dropped first. A cell whose union is empty
    (neither rater used class i nor class j) is NaN.
    """
    a = np.asarray(r1).astype(np.int64).reshape(-1)
    b = np.asarray(r2).astype(np.int64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"rater vectors differ in length: {a.shape} vs {b.shape}")
    ok = (a >= 0) & (b >= 0)
    a, b = a[ok], b[ok]
    out = np.full((num_classes, num_classes), np.nan)
    for i in range(num_classes):
        for j in range(num_classes):
            inter = np.count_nonzero((a == i) & (b == j))
            union = np.count_nonzero((a == i) | (b == j))
            if union:
                out[i, j] = inter / union
    return out


def binarise(label: int) -> int:
    """3-class label -> binary: 0 stays non-diagnostic, 1 and 2 become diagnostic (1)."""
    return 0 if label == 0 else 1


def compare(
    a: Mapping[Hashable, int], b: Mapping[Hashable, int], num_classes: int
) -> dict[str, Any]:
    """Agreement of two labellings on the items both labelled (with a label in range).

    JSON-able: ``n``; ``kappa`` (None when undefined: no items, or chance agreement 1);
    ``agreement`` (fraction of equal labels, None without items); ``jaccard`` (rows: ``a``'s
    class, columns: ``b``'s; None where neither used the classes); ``confusion`` (counts,
    rows ``a``, columns ``b``).
    """

    def valid(v: int) -> bool:
        return 0 <= v < num_classes

    common = [k for k, v in a.items() if valid(v) and k in b and valid(b[k])]
    x = np.array([a[k] for k in common], dtype=np.int64)
    y = np.array([b[k] for k in common], dtype=np.int64)
    cm = confusion_counts(x, y, num_classes)
    jac = jaccard_matrix(x, y, num_classes)
    return {
        "n": len(common),
        "kappa": kappa_from_confusion(cm),
        "agreement": float(np.mean(x == y)) if common else None,
        "jaccard": [[None if math.isnan(c) else float(c) for c in row] for row in jac.tolist()],
        "confusion": cm.tolist(),
    }


def pairwise(labels: Mapping[str, Mapping[Hashable, int]], num_classes: int) -> list[dict]:
    """Every pair of raters (in the mapping's order), compared on the items both rated.

    Each entry: ``{"a", "b", "n", "kappa", "agreement", "jaccard", "confusion"}`` (see
    :func:`compare`; ``a`` indexes the Jaccard rows).
    """
    return [
        {"a": ra, "b": rb, **compare(labels[ra], labels[rb], num_classes)}
        for ra, rb in combinations(labels, 2)
    ]
