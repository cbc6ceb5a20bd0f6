"""Several training runs of one recipe as one model: the mean of their logits.

Runs that differ only in their seed rank a new subject's slices differently (the bundle
recipe's heavy-motion AUC moves by up to 0.04 between two seeds, docs/bundled-model/loso.md);
their mean is steadier than either. The members are merged into one ordinary Keras model, so
the node, its OOD guard and Grad-CAM need nothing new: each member's convolutions run side by
side, their last feature maps are concatenated (the one map the guard and Grad-CAM read), and
one dense head holds every member's weights divided by their count. For a global-average-pooled
head that is exactly the mean of the members' logits.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np

from training.calibration import softmax
from training.train import (
    CONFIG_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    SPLITS_FILE,
    TrainConfig,
    train,
)

ENSEMBLE_FILE = "ensemble.json"  # the member runs of a merged run


def merge_convnets(members: Sequence, name: str = "ensemble"):
    """One Keras model whose logits are the mean of ``members``' logits (GAP-head ConvNets of
    one input size and class count, each a plain chain of layers)."""
    import keras
    from keras import layers

    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    inputs = keras.Input(members[0].inputs[0].shape[1:], name="image")
    features, heads = [], []
    for i, member in enumerate(members, start=1):
        *body, gap, head = member.layers[1:]
        chained = all(b.input is a.output for a, b in pairwise(member.layers))
        if not (chained and isinstance(gap, layers.GlobalAveragePooling2D)
                and isinstance(head, layers.Dense)):  # fmt: skip
            raise ValueError(f"{member.name}: only GAP-head ConvNets (a chain of layers) merge")
        x = inputs
        for layer in body:
            clone = layer.__class__.from_config(
                {**layer.get_config(), "name": f"m{i}_{layer.name}"}
            )
            x = clone(x)
            clone.set_weights(layer.get_weights())
        features.append(x)
        heads.append(head.get_weights())
    x = layers.Concatenate(name="members")(features)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logits = layers.Dense(heads[0][1].shape[0], name="logits", dtype="float32")(x)
    model = keras.Model(inputs, logits, name=name)
    model.get_layer("logits").set_weights([
        np.concatenate([kernel for kernel, _ in heads]) / len(heads),
        np.mean([bias for _, bias in heads], axis=0),
    ])  # fmt: skip
    return model


def merge_runs(runs: Sequence[Path | str], out_dir: Path | str) -> Path:
    """A run directory for the merged model of finished ``runs`` of one recipe and one split:
    its model, the mean of the members' stored logits as its predictions (what the merged model
    computes), the first member's config, splits and history. ``export`` takes it as any run."""
    import keras

    runs = [Path(r) for r in runs]
    configs = [json.loads((r / CONFIG_FILE).read_text()) for r in runs]
    data = [c["manifest_sha256"] for c in configs]
    splits = [json.loads((r / SPLITS_FILE).read_text())["patients"] for r in runs]
    if any(d != data[0] for d in data):
        raise ValueError("ensemble members must be trained on the same manifest")
    if any(s != splits[0] for s in splits):
        raise ValueError("ensemble members must share their split")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    members = [keras.saving.load_model(r / MODEL_FILE, compile=False) for r in runs]
    merge_convnets(members).save(out / MODEL_FILE)
    preds = [dict(np.load(r / PREDICTIONS_FILE)) for r in runs]
    merged = dict(preds[0])
    for split in [k.removesuffix("_logits") for k in merged if k.endswith("_logits")]:
        sops = merged[f"{split}_sop_uids"]
        if any(not np.array_equal(p[f"{split}_sop_uids"], sops) for p in preds):
            raise ValueError(f"ensemble members scored other slices in {split}")
        merged[f"{split}_logits"] = np.mean([p[f"{split}_logits"] for p in preds], axis=0)
        merged[f"{split}_probs"] = softmax(merged[f"{split}_logits"]).astype(np.float32)
    np.savez(out / PREDICTIONS_FILE, **merged)
    for name in (CONFIG_FILE, SPLITS_FILE, "history.csv"):
        if (runs[0] / name).is_file():
            shutil.copyfile(runs[0] / name, out / name)
    members = {"members": [str(r) for r in runs], "seeds": [c["seed"] for c in configs]}
    (out / ENSEMBLE_FILE).write_text(json.dumps(members, indent=2))
    return out


def train_seeds(config: TrainConfig, seeds: int) -> tuple[list[Path], Path]:
    """Train ``config`` with seeds 0 to ``seeds`` - 1 (``out_dir``, then ``out_dir``-seed1, ...;
    finished runs are not trained again) and merge them into ``out_dir``-ensemble when there are
    several. Returns the member runs and the run to export or score."""
    out = Path(config.out_dir)
    dirs = [out, *(out.with_name(f"{out.name}-seed{seed}") for seed in range(1, seeds))]
    runs = [train(replace(config, out_dir=d, seed=seed)) for seed, d in enumerate(dirs)]
    if seeds == 1:
        return runs, runs[0]
    return runs, merge_runs(runs, out.with_name(f"{out.name}-ensemble"))
