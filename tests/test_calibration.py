"""Calibrated scores and the series operating point: temperature scaling recovers a known
temperature, ECE tells calibrated from over-confident, the series threshold honours the
false-alert cap (and says when the sensitivity target has to give), and the node's scorer
divides the logits by the artifact's temperature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.calibration import (
    calibrate,
    calibrated_predictions,
    expected_calibration_error,
    fit_temperature,
    softmax,
)
from training.export import choose_operating_point, series_groups, series_verdicts

# Keras' own model.save under numpy 2 (not ours): "__array__ implementation doesn't accept a copy"
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def calibrated_binary(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class probability (labels drawn from it)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(z))).astype(np.int64)  # P(class 0) = softmax
    return np.stack([z, np.zeros(n)], axis=1), labels


def test_temperature_recovers_a_known_scale_and_unsticks_probabilities() -> None:
    logits, labels = calibrated_binary(8000)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.08)
    t = fit_temperature(5 * logits, labels)  # an over-confident model: logits 5x too large
    assert t == pytest.approx(5.0, rel=0.08)
    raw, cal = softmax(5 * logits)[:, 0], softmax(5 * logits, t)[:, 0]

    def unsure(p: np.ndarray) -> float:
        return float(np.mean(np.abs(p - 0.5) < 0.45))

    assert unsure(raw) < 0.4  # most raw probabilities sit at 0 or 1 ...
    assert unsure(cal) > 0.8  # ... the calibrated ones do not
    np.testing.assert_array_equal(raw > 0.5, cal > 0.5)  # the ranking is kept


def test_ece_small_when_calibrated_large_when_over_confident() -> None:
    logits, labels = calibrated_binary(20000, seed=1)
    assert expected_calibration_error(softmax(logits), labels) < 0.02
    assert expected_calibration_error(softmax(6 * logits), labels) > 0.15
    # 3-class: top label; a model that says 0.99 and is right half the time is off by ~0.49
    probs = np.tile([0.99, 0.005, 0.005], (1000, 1))
    half = np.arange(1000) % 2
    assert expected_calibration_error(probs, half) == pytest.approx(0.49, abs=1e-6)


def test_calibrate_on_val_and_fallback_without_logits() -> None:
    val_z, val_y = calibrated_binary(3000, seed=2)
    test_z, test_y = calibrated_binary(3000, seed=3)
    preds = {
        "val_logits": 4 * val_z, "val_probs": softmax(4 * val_z), "val_labels": val_y,
        "test_logits": 4 * test_z, "test_probs": softmax(4 * test_z), "test_labels": test_y,
    }  # fmt: skip
    cal = calibrate(preds)
    assert cal["temperature"] == pytest.approx(4.0, rel=0.1) and cal["logits"] == "stored"
    for split in ("val", "test"):
        s = cal["splits"][split]
        assert s["ece_after"] < 0.5 * s["ece_before"] and s["nll_after"] < s["nll_before"]
    old = {k: v for k, v in preds.items() if not k.endswith("_logits")}  # an older run
    old_cal = calibrate(old)
    assert old_cal["temperature"] == pytest.approx(cal["temperature"], rel=1e-3)
    assert old_cal["logits"].startswith("log(probs)")
    np.testing.assert_allclose(
        calibrated_predictions(old, old_cal["temperature"])["test_probs"],
        softmax(4 * test_z, cal["temperature"]),
        atol=1e-4,
    )


def series_case() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """30 series of 5 slices, each slice of a series with the same P(non-diagnostic): 10
    non-diagnostic series (7 score 0.9, 3 look clean at 0.2) and 20 diagnostic ones (18 at
    0.1, one at 0.25, one at 0.3). 90 % sensitivity needs a threshold <= 0.2, which flags 2 of
    20 diagnostic series (10 % false alerts)."""
    scores = [0.9] * 7 + [0.2] * 3 + [0.1] * 18 + [0.25, 0.3]
    p = np.repeat(scores, 5)
    labels = np.repeat([0] * 10 + [1] * 20, 5)
    series = [f"S{i}" for i in range(30) for _ in range(5)]
    return np.stack([p, 1 - p], axis=1), labels, series


def node_flags(probs: np.ndarray, series: list[str], op: dict) -> np.ndarray:
    from mriqa_node.domain.verdict import SeriesPolicy

    return series_verdicts(probs[:, 0], series_groups(series), SeriesPolicy(**op["policy"]))[1]


def test_operating_point_keeps_the_false_alert_cap_and_says_so() -> None:
    probs, labels, series = series_case()
    op = choose_operating_point(probs, labels, series, sensitivity=0.9, max_false_alerts=0.05)
    s = op["series"]
    assert op["sensitivity_met"] is False and op["false_alert_cap_met"] is True
    assert s["false_alert_rate"] <= 0.05 and s["sensitivity"] == pytest.approx(0.7)
    assert (s["n_positive"], s["n_negative"], s["n_flagged_positive"]) == (10, 20, 7)
    assert 0.3 < op["series_threshold"] <= 0.9  # the fewest false alerts at that sensitivity
    assert any("NOT MET" in w and "7/10" in w for w in op["warnings"])
    flags = node_flags(probs, series, op)
    assert flags[:10].sum() == 7 and flags[10:].sum() == 0  # the node decides the same


def test_operating_point_meets_both_targets_when_it_can() -> None:
    probs, labels, series = series_case()
    op = choose_operating_point(probs, labels, series, sensitivity=0.9, max_false_alerts=0.15)
    s = op["series"]
    assert op["sensitivity_met"] is True and op["false_alert_cap_met"] is True
    assert s["sensitivity"] == 1.0 and s["false_alert_rate"] == pytest.approx(0.1)
    assert 0.1 < op["series_threshold"] <= 0.2  # the most specific one with the sensitivity
    assert not op["warnings"]
    assert node_flags(probs, series, op).sum() == 12


def test_scorer_divides_logits_by_the_temperature(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from mriqa_node.ml.artifact import (
        META_FILE,
        TASK_CLASSES,
        ArtifactError,
        ArtifactMeta,
        read_meta,
        save_artifact,
    )
    from mriqa_node.ml.scorer import Device, Scorer
    from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION

    keras.utils.set_random_seed(0)
    inp = keras.Input((INPUT_SIZE, INPUT_SIZE, 1))
    x = keras.layers.AveragePooling2D(64)(inp)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    meta = ArtifactMeta(
        name="tiny", version="0", task="binary", class_names=TASK_CLASSES["binary"],
        input_size=INPUT_SIZE, preprocessing_version=PREPROCESSING_VERSION, sha256="",
        temperature=2.0,
    )  # fmt: skip
    save_artifact(model, tmp_path / "a", meta)
    assert read_meta(tmp_path / "a").temperature == 2.0
    images = np.random.default_rng(0).random((3, INPUT_SIZE, INPUT_SIZE, 1), np.float32)
    logits = keras.ops.convert_to_numpy(model(images))
    assert np.abs(logits[:, 0] - logits[:, 1]).max() > 0.1  # T makes a visible difference
    probs = Scorer(tmp_path / "a", Device("/CPU:0", False, "CPU")).predict(images)
    np.testing.assert_allclose(probs, softmax(logits, 2.0), atol=1e-5)
    assert not np.allclose(probs, softmax(logits), atol=1e-3)

    path = tmp_path / "a" / META_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "temperature"}))
    assert read_meta(tmp_path / "a").temperature == 1.0  # artifacts from before calibration
    path.write_text(json.dumps({**data, "temperature": 0}))
    with pytest.raises(ArtifactError, match="temperature"):
        read_meta(tmp_path / "a")
