"""Temperature scaling and calibration error (Guo et al., 2017).

A network trained to low cross-entropy is often over-confident: its P(non-diagnostic) sits at 0
or 1, so thresholds land at values like 4e-11 and the probabilities the console shows mean
little. One temperature T > 0, fitted on the validation split's logits, divides the logits
before the softmax: the class ranking (accuracy, binary AUC) is unchanged, the probabilities
become honest. The node applies the same T (``model.json`` ``temperature``, see
``mriqa_node.ml.scorer``).

Expected calibration error (ECE, 15 equal-width bins): binary models are measured on
P(non-diagnostic) against "is non-diagnostic" (the number the node thresholds); 3-class models
on the top label (confidence = the largest probability, outcome = the prediction is right).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _softmax

ECE_BINS = 15
LOG_T_BOUNDS = (np.log(0.05), np.log(100.0))
_SPLITS = ("val", "test")


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of [n, classes] logits at a temperature (float64)."""
    return _softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def logits_of(preds: Mapping[str, np.ndarray], split: str) -> np.ndarray:
    """``{split}_logits``; runs written before logits were stored fall back to log(probs),
    which equals the logits up to a per-row constant that softmax ignores."""
    if f"{split}_logits" in preds:
        return np.asarray(preds[f"{split}_logits"], np.float64)
    probs = np.asarray(preds[f"{split}_probs"], np.float64)
    return np.log(np.clip(probs, 1e-300, None))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels at a temperature."""
    logp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels, np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 that minimises the NLL of the labels (searched on log T, bounded to
    [0.05, 100]); 1.0 when there is nothing to fit on."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0
    res = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def confidence_and_outcome(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What ECE measures: binary -> (P(non-diagnostic), label == 0); else the top label."""
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    if p.shape[1] == 2:
        return p[:, 0], y == 0
    return p.max(axis=1), p.argmax(axis=1) == y


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Per equal-width bin: count, mean confidence, observed frequency (None when empty)."""
    conf, hit = confidence_and_outcome(probs, labels)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=bins)
    hit_sum = np.bincount(idx, weights=hit.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, freq = conf_sum / count, hit_sum / count
    return {
        "edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": [float(v) if n else None for v, n in zip(mean_conf, count, strict=True)],
        "frequency": [float(v) if n else None for v, n in zip(freq, count, strict=True)],
    }


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float | None:
    """Sum over bins of (share of samples) x |observed frequency - mean confidence|."""
    r = reliability(probs, labels, bins)
    n = sum(r["count"])
    if n == 0:
        return None
    gaps = [
        c * abs(f - m)
        for c, f, m in zip(r["count"], r["frequency"], r["confidence"], strict=True)
        if c
    ]
    return float(sum(gaps) / n)


def calibrate(preds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Fit T on the val split and measure ECE and NLL before and after on val and test.

    Returns temperature, fitted_on, ece_method, and per split: n, ece_before, ece_after,
    nll_before, nll_after, reliability_before, reliability_after.
    """
    n_classes = logits_of(preds, "val").shape[1]
    temperature = fit_temperature(logits_of(preds, "val"), preds["val_labels"])
    out: dict[str, Any] = {
        "temperature": temperature,
        "fitted_on": "val",
        "logits": "stored" if "val_logits" in preds else "log(probs) (run without logits)",
        "ece_method": (
            f"{ECE_BINS} equal-width bins on "
            + ("P(non-diagnostic)" if n_classes == 2 else "the top label's probability")
        ),
        "splits": {},
    }
    for split in _SPLITS:
        if f"{split}_labels" not in preds or not len(preds[f"{split}_labels"]):
            continue
        z, y = logits_of(preds, split), np.asarray(preds[f"{split}_labels"])
        before, after = softmax(z), softmax(z, temperature)
        out["splits"][split] = {
            "n": len(y),
            "ece_before": expected_calibration_error(before, y),
            "ece_after": expected_calibration_error(after, y),
            "nll_before": nll(z, y),
            "nll_after": nll(z, y, temperature),
            "reliability_before": reliability(before, y),
            "reliability_after": reliability(after, y),
        }
    return out


def calibrated_predictions(
    preds: Mapping[str, np.ndarray], temperature: float
) -> dict[str, np.ndarray]:
    """A copy of predictions.npz whose val/test probs are softmax(logits / T): what the node
    will output for those slices."""
    out = dict(preds)
    for split in _SPLITS:
        if f"{split}_probs" in preds:
            out[f"{split}_probs"] = softmax(logits_of(preds, split), temperature)
    return out


def calibration_summary(cal: Mapping[str, Any]) -> dict[str, Any]:
    """``calibrate()``'s result without the reliability bins (for model.json)."""
    splits = {
        name: {k: v for k, v in split.items() if not k.startswith("reliability")}
        for name, split in cal["splits"].items()
    }
    return {**cal, "splits": splits}
