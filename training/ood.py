"""The out-of-distribution guard: "unlike anything the model was trained on".

The model's features (mriqa_node.ml.ood: the spatial mean of its last convolutional block) of
the training slices
are summarised by their mean and a Ledoit-Wolf shrunk covariance; a slice's score is its
Mahalanobis distance to them. The threshold is the 99th percentile of the distances of the
held-out in-scope slices (the validation split), so >= 99 % of such slices pass by
construction; the test split's pass rate is reported beside it, with the rates for blank,
noise and photograph-like images. Written to the artifact as ``ood.npz``; the node computes
the same distance with numpy (mriqa_node.ml.scorer) and never alerts on a series whose slices
fail it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.ml.ood import distances, feature_model

OOD_QUANTILE = 0.99
MAX_FIT_SLICES = 1500  # training slices used for the fit (a stratified subsample)


def features_of(paths: Sequence[str], model: Any, size: int, batch: int = 16) -> np.ndarray:
    """Penultimate features of the first frame of each DICOM file."""
    import pydicom
    from tqdm.auto import tqdm

    from mriqa_node.preprocess import preprocess

    fmodel = feature_model(model)
    out = []
    for i in tqdm(range(0, len(paths), batch), desc="ood features", leave=False):
        x = np.concatenate([preprocess(pydicom.dcmread(p), size)[:1] for p in paths[i : i + batch]])
        out.append(np.asarray(fmodel(x, training=False)[1], np.float64))
    return np.concatenate(out) if out else np.zeros((0, 0))


def fit(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of training features, covariance shrunk (Ledoit-Wolf)."""
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(train)
    return lw.location_.astype(np.float32), lw.precision_.astype(np.float32)


def probe_images(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """What must fail the guard: a blank image, pure noise, a photograph-like scene (smooth
    colour gradients and hard-edged shapes, as an RGB photo turned grey)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    photo = 0.4 * x + 0.3 * np.sin(6 * y) ** 2
    for _ in range(12):
        cy, cx, r = rng.uniform(0, 1, 3)
        photo = np.where((y - cy) ** 2 + (x - cx) ** 2 < (0.2 * r) ** 2, rng.uniform(), photo)
    photo[int(0.7 * size) :] = 0.9  # a bright "sky" or "floor" band
    return {
        "blank": np.zeros((size, size), np.float32),
        "noise": rng.uniform(0, 1, (size, size)).astype(np.float32),
        "photo": np.clip(photo, 0, 1).astype(np.float32),
    }


def fit_guard(run_dir: Path | str, manifest: Path | str | None = None) -> dict[str, Any]:
    """Fit the guard for a finished run; returns the arrays and figures for the artifact."""
    import keras

    from training.manifest import read_manifest
    from training.train import MODEL_FILE, PREDICTIONS_FILE

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    size = int(cfg.get("input_size", 512))
    records = read_manifest(manifest or cfg["manifest"])
    path_of = {r.sop_instance_uid: r.path for r in records}
    preds = dict(np.load(run / PREDICTIONS_FILE))
    held = {s: set(np.asarray(preds[f"{s}_sop_uids"]).astype(str)) for s in ("val", "test")}
    held_out = held["val"] | held["test"]
    train = [r.path for r in records if r.sop_instance_uid not in held_out]
    rng = np.random.default_rng(0)
    if len(train) > MAX_FIT_SLICES:
        train = [train[i] for i in sorted(rng.choice(len(train), MAX_FIT_SLICES, replace=False))]
    model = keras.saving.load_model(run / MODEL_FILE, compile=False)
    mean, precision = fit(features_of(train, model, size))
    split = {s: distances(features_of([path_of[u] for u in sorted(held[s]) if u in path_of],
                                      model, size), mean, precision)
             for s in ("val", "test")}  # fmt: skip
    threshold = float(np.quantile(split["val"], OOD_QUANTILE, method="higher"))
    probes = probe_images(size)
    fmodel = feature_model(model)
    probe_x = np.stack(list(probes.values()))[..., None]
    probe_d = distances(np.asarray(fmodel(probe_x, training=False)[1]), mean, precision)
    probe = dict(zip(probes, (float(d) for d in probe_d), strict=True))
    test = split["test"]
    return {
        "mean": mean,
        "precision": precision,
        "threshold": threshold,
        "figures": {
            "quantile": OOD_QUANTILE,
            "fit_slices": len(train),
            "val_pass": float(np.mean(split["val"] <= threshold)),
            "test_pass": float(np.mean(test <= threshold)) if len(test) else None,
            "val_slices": len(split["val"]),
            "test_slices": len(test),
            "probes": {k: round(d, 2) for k, d in probe.items()},
            "probes_stopped": {k: d > threshold for k, d in probe.items()},
        },
    }
