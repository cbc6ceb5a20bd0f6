"""The paper's figures 3-7 for our runs, as PNG files (matplotlib, Agg canvas, no pyplot state).

Each ``fig*`` function writes one PNG and returns its path (``fig6_rater_jaccard`` also returns the
matrix). They take plain arrays, so they work the same for synthetic and real data.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, per figure
from matplotlib.figure import Figure

from training.evaluate import (
    class_names_for,
    cohen_kappa,
    jaccard_matrix,
    read_history,
    row_normalise,
)

DPI = 110
PRETTY_CLASS = {
    "non_diagnostic": "non-diagnostic",
    "diagnostic": "diagnostic",
    "excellent": "excellent",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    return out


def _pretty(name: str) -> str:
    return PRETTY_CLASS.get(name, name.replace("_", " "))


# --------------------------------------------------------------------------- Fig. 3


def load_model(path: str | Path) -> Any:
    """Load a model.keras for inference (training.models is imported first, if it exists, so any
    custom layers it registers can be deserialised)."""
    import importlib

    import keras

    with contextlib.suppress(ImportError):
        importlib.import_module("training.models")
    return keras.saving.load_model(Path(path), compile=False)


def conv_layers(model: Any) -> tuple[Any, Any]:
    """(first Conv2D, last Conv2D) of a functional/sequential Keras model, in graph order.

    The last one skips 1x1 convolutions (ResNet projection shortcuts), so for a ResNet it is the
    last 3x3 convolution of the last stage's main path. Convolutions inside nested sub-models are
    not reachable from the outer model's input and are not supported.
    """
    import keras

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        nested = [
            layer.name
            for layer in model.layers
            if hasattr(layer, "layers")
            and any(isinstance(sub, keras.layers.Conv2D) for sub in layer.layers)
        ]
        hint = f" (they sit inside nested sub-models {nested}; flatten the model)" if nested else ""
        raise ValueError(f"model {model.name!r} has no top-level Conv2D layer{hint}")
    spatial = [layer for layer in convs if tuple(layer.kernel_size) != (1, 1)] or convs
    return convs[0], spatial[-1]


def _model_input_size(model: Any) -> int | None:
    shape = model.inputs[0].shape
    return int(shape[1]) if shape[1] is not None else None


def _as_image(image: Any, size: int | None) -> np.ndarray:
    """[H, W] / [H, W, 1] / [1, H, W, 1] -> float32 [size, size] (bilinear resize if needed)."""
    a = np.asarray(image, dtype=np.float32)
    a = np.squeeze(a)
    if a.ndim != 2:
        raise ValueError(f"expected a single greyscale image, got shape {np.shape(image)}")
    if size is not None and a.shape != (size, size):
        from PIL import Image

        a = np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
    return a.astype(np.float32)


def activation_maps(model: Any, images: Sequence[Any]) -> dict[str, Any]:
    """Mean activation maps of the first and last conv layers for each image.

    Activation = ReLU of the Conv2D output, averaged over channels (the ConvNet applies ReLU right
    after each conv; for a ResNet this is the rectified pre-normalisation response). Returns
    {"first": [n, h1, w1], "last": [n, h2, w2], "first_layer", "last_layer", "inputs": [n, S, S]}.
    """
    import keras

    first, last = conv_layers(model)
    size = _model_input_size(model)
    x = np.stack([_as_image(im, size) for im in images])[..., None]
    extractor = keras.Model(model.inputs[0], [first.output, last.output])
    a1, a2 = extractor(x, training=False)
    a1 = np.maximum(keras.ops.convert_to_numpy(a1).astype(np.float32), 0.0).mean(axis=-1)
    a2 = np.maximum(keras.ops.convert_to_numpy(a2).astype(np.float32), 0.0).mean(axis=-1)
    return {
        "inputs": x[..., 0],
        "first": a1,
        "last": a2,
        "first_layer": first.name,
        "last_layer": last.name,
        "first_channels": int(first.filters),
        "last_channels": int(last.filters),
    }


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||a|| (0 when both are zero): how much a map changes under motion."""
    na = float(np.linalg.norm(a))
    d = float(np.linalg.norm(np.asarray(a) - np.asarray(b)))
    return d / na if na > 0 else (0.0 if d == 0 else float("inf"))


def motion_pair(image: Any, severity: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clean, motion-corrupted) copies of one 2-D image using the generator's k-space motion."""
    try:
        from training.synth import apply_motion
    except ImportError as exc:
        raise RuntimeError(
            "training.synth.apply_motion is not available (the synthetic generator is not "
            "installed or not written yet); pass clean and motion images to "
            f"fig3_activation_maps directly. ({exc})"
        ) from exc
    clean = _as_image(image, None)
    motion = np.asarray(apply_motion(clean.copy(), severity, np.random.default_rng(seed)))
    return clean, np.clip(_as_image(motion, clean.shape[0]), 0.0, 1.0)


def fig3_activation_maps(
    model: Any,
    clean_image: Any,
    motion_image: Any,
    out: str | Path,
    model_name: str,
) -> Path:
    """Fig. 3: input, first-layer and last-layer mean activation maps for a clean slice and the
    same slice with synthetic motion, plus the absolute difference (motion - clean) of each.

    ``model`` is a Keras model or a path to model.keras. Clean and motion maps of one layer share
    a colour scale, so what changes under motion is what differs between the two rows.
    """
    if isinstance(model, str | Path):
        model = load_model(model)
    return draw_activation_maps(
        activation_maps(model, [clean_image, motion_image]), out, model_name
    )


def draw_activation_maps(maps: Mapping[str, Any], out: str | Path, model_name: str) -> Path:
    """Draw Fig. 3 from ``activation_maps(model, [clean, motion])`` (see fig3_activation_maps)."""
    cols = [
        ("input", maps["inputs"], "gray", "input image"),
        ("first", maps["first"], "magma", f"first conv '{maps['first_layer']}'"),
        ("last", maps["last"], "magma", f"last conv '{maps['last_layer']}'"),
    ]
    fig = _figure(11.0, 10.5)
    axes = fig.subplots(3, 3)
    row_names = ["clean", "with synthetic motion", "|motion - clean|"]
    for j, (key, arr, cmap, label) in enumerate(cols):
        vmin, vmax = float(arr.min()), float(arr.max())
        if key == "input":
            vmin, vmax = 0.0, max(1.0, vmax)
        for i in range(2):
            im = axes[i, j].imshow(arr[i], cmap=cmap, vmin=vmin, vmax=vmax)
        fig.colorbar(im, ax=axes[:2, j], shrink=0.8, pad=0.02)
        diff = np.abs(arr[1] - arr[0])
        imd = axes[2, j].imshow(diff, cmap="viridis", vmin=0.0, vmax=max(float(diff.max()), 1e-12))
        fig.colorbar(imd, ax=axes[2, j], shrink=0.8, pad=0.02)
        rel = relative_difference(arr[0], arr[1])
        h, w = arr.shape[1:]
        chans = "" if key == "input" else f", mean of {maps[key + '_channels']} ch."
        axes[0, j].set_title(f"{label}\n{h}x{w}{chans}", fontsize=10)
        axes[2, j].set_title(f"relative change {rel:.2f}", fontsize=10)
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for i, name in enumerate(row_names):
        axes[i, 0].set_ylabel(name, fontsize=11)
    fig.suptitle(
        f"Fig. 3 - {model_name}: mean activation maps (ReLU of conv output), clean vs motion",
        fontsize=12,
    )
    return _save(fig, out)


# --------------------------------------------------------------------------- Fig. 4


def _ema(values: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(values)
    acc = np.nan
    for i, v in enumerate(values):
        acc = v if not np.isfinite(acc) else alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def fig4_accuracy_curves(
    histories: Mapping[str, Any], out: str | Path, title: str | None = None
) -> Path:
    """Fig. 4: training (left) and evaluation (right) accuracy against the step, one colour per run.

    ``histories`` maps a run label to history.csv (path), a list of row dicts or a dict of columns
    with step, train_acc, val_acc. Training accuracy is per batch, so it is drawn faintly with an
    exponential moving average on top.
    """
    fig = _figure(12.0, 4.8)
    ax_tr, ax_ev = fig.subplots(1, 2, sharey=True)
    colours = matplotlib.colormaps["tab10"].colors
    drawn = 0
    for k, (name, src) in enumerate(histories.items()):
        h = read_history(src)
        step = h.get("step")
        if step is None:
            n = len(next(iter(h.values()), []))
            step = np.arange(n, dtype=float)
        colour = colours[k % len(colours)]
        style = "--" if "resnet" in name.lower() else "-"
        tr = h.get("train_acc")
        if tr is not None and np.isfinite(tr).any():
            ok = np.isfinite(tr)
            s, v = step[ok], tr[ok]
            ax_tr.plot(s, v, color=colour, alpha=0.25, lw=0.8)
            alpha = min(1.0, 10.0 / max(len(v), 10))
            ax_tr.plot(s, _ema(v, alpha), color=colour, ls=style, lw=1.8, label=name)
            drawn += 1
        ev = h.get("val_acc")
        if ev is not None and np.isfinite(ev).any():
            ok = np.isfinite(ev)
            marker = "o" if ok.sum() <= 30 else None
            ax_ev.plot(
                step[ok], ev[ok], color=colour, ls=style, lw=1.8, marker=marker, ms=3, label=name
            )
            drawn += 1
    for ax, what in ((ax_tr, "training accuracy (per batch, smoothed)"), (ax_ev, "evaluation")):
        ax.set_xlabel("training step")
        ax.set_title(what)
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    ax_tr.set_ylabel("accuracy")
    if not drawn:
        ax_tr.text(0.5, 0.5, "no accuracy columns", ha="center", transform=ax_tr.transAxes)
    fig.suptitle(title or "Fig. 4 - training and evaluation accuracy", fontsize=12)
    return _save(fig, out)


# --------------------------------------------------------------------------- Fig. 5


def roc_inputs(
    probs: Any, labels: Any, prefix: str = "", class_names: Sequence[str] | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ROC inputs for fig5: binary -> {prefix: (P(non-diagnostic), label == 0)}; 3-class -> one
    entry per class (one-vs-rest). Unknown labels (negative) are dropped."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    keep = y >= 0
    p, y = p[keep], y[keep]
    names = list(class_names or class_names_for(p.shape[1]))
    sep = " - " if prefix else ""
    if p.shape[1] == 2:
        return {prefix or f"{_pretty(names[0])} positive": (p[:, 0], y == 0)}
    return {f"{prefix}{sep}{_pretty(nm)} vs rest": (p[:, k], y == k) for k, nm in enumerate(names)}


def _draw_roc(ax: Any, curves: Mapping[str, Any], title: str) -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    colours = matplotlib.colormaps["tab10"].colors
    styles = ("-", "--", ":", "-.")
    # "<run> - <class> vs rest" labels from several runs: colour by class, line style by run.
    parts = [lbl.rsplit(" - ", 1) if " - " in lbl else [lbl, ""] for lbl in curves]
    prefixes = list(dict.fromkeys(p[0] for p in parts))
    suffixes = list(dict.fromkeys(p[1] for p in parts))
    by_class = len(prefixes) > 1 and len(suffixes) > 1 and all(p[1] for p in parts)
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="chance (AUC 0.50)")
    for k, ((name, (scores, positives)), (pre, suf)) in enumerate(
        zip(curves.items(), parts, strict=True)
    ):
        if by_class:
            colour = colours[suffixes.index(suf) % 10]
            style = styles[prefixes.index(pre) % len(styles)]
        else:
            colour = colours[k % 10]
            style = "--" if "resnet" in name.lower() else "-"
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        pos = np.asarray(positives).astype(bool).reshape(-1)
        if pos.all() or not pos.any():
            ax.plot([], [], color=colour, ls=style, label=f"{name} (AUC undefined)")
            continue
        fpr, tpr, _ = roc_curve(pos, s)
        auc = roc_auc_score(pos, s)
        ax.plot(fpr, tpr, color=colour, ls=style, lw=1.8, label=f"{name} (AUC {auc:.2f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")


def fig5_roc_curves(curves: Mapping[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Fig. 5: ROC curves with the AUC in the legend.

    ``curves`` maps a label to (scores, positives): binary runs use P(non-diagnostic) with
    non-diagnostic as positive; 3-class runs one curve per class vs rest (see ``roc_inputs``).
    A dict of such dicts draws one panel per key (e.g. {"binary": {...}, "3-class": {...}}).
    """
    panels = (
        dict(curves)
        if curves and all(isinstance(v, Mapping) for v in curves.values())
        else {"": curves}
    )
    n = max(1, len(panels))
    fig = _figure(5.6 * n + 0.4, 5.8)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (name, group) in zip(axes, panels.items(), strict=True):
        _draw_roc(ax, group, name or "ROC")
    fig.suptitle(title or "Fig. 5 - ROC curves (positive: non-diagnostic / class vs rest)")
    return _save(fig, out)


# --------------------------------------------------------------------------- Fig. 6


def manifest_rows(path: str | Path) -> list[dict[str, str]]:
    """A manifest's rows as plain dicts (training.manifest.read_manifest gives Records)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def int_or_missing(v: Any) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return -1


def rater_vectors(manifest_or_labels: Any) -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """Two rater vectors from a manifest CSV path, a list of manifest rows, a mapping with
    rater1/rater2, a pair of vectors or an [N, 2] array. Missing ratings become -1."""
    src = manifest_or_labels
    names = ("rater 1", "rater 2")
    if isinstance(src, str | Path):
        src = manifest_rows(src)
    if isinstance(src, Mapping):
        return (
            np.asarray(src["rater1"]).astype(np.int64),
            np.asarray(src["rater2"]).astype(np.int64),
            names,
        )
    if isinstance(src, list) and src and isinstance(src[0], Mapping):
        r1 = np.array([int_or_missing(r.get("rater1")) for r in src], dtype=np.int64)
        r2 = np.array([int_or_missing(r.get("rater2")) for r in src], dtype=np.int64)
        return r1, r2, names
    if isinstance(src, np.ndarray) and src.ndim == 2:
        if src.shape[1] < 2:
            raise ValueError("Fig. 6 needs two raters")
        return src[:, 0].astype(np.int64), src[:, 1].astype(np.int64), names
    a, b = src
    return np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64), names


def fig6_rater_jaccard(
    manifest_or_labels: Any, out: str | Path, title: str | None = None
) -> tuple[Path, np.ndarray]:
    """Fig. 6: Jaccard index between the two raters' classes, J[i, j] = |r1==i AND r2==j| /
    |r1==i OR r2==j|, as an annotated heat map. Returns (path, J)."""
    r1, r2, (n1, n2) = rater_vectors(manifest_or_labels)
    ok = (r1 >= 0) & (r2 >= 0)
    r1, r2 = r1[ok], r2[ok]
    j = jaccard_matrix(r1, r2, 3)
    names = class_names_for(3)
    fig = _figure(6.6, 5.8)
    ax = fig.subplots()
    im = ax.imshow(np.nan_to_num(j, nan=0.0), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.85, label="Jaccard index")
    for a in range(3):
        for b in range(3):
            v = j[a, b]
            both = int(((r1 == a) & (r2 == b)).sum())
            text = "n/a" if np.isnan(v) else f"{v:.2f}\n({both})"
            colour = "white" if not np.isnan(v) and v > 0.5 else "black"
            ax.text(b, a, text, ha="center", va="center", color=colour, fontsize=11)
    ax.set_xticks(
        range(3),
        [f"{k} {_pretty(nm)}\n(n={(r2 == k).sum()})" for k, nm in enumerate(names)],
        fontsize=9,
    )
    ax.set_yticks(
        range(3),
        [f"{k} {_pretty(nm)}\n(n={(r1 == k).sum()})" for k, nm in enumerate(names)],
        fontsize=9,
    )
    ax.set_xlabel(f"{n2} class")
    ax.set_ylabel(f"{n1} class")
    kappa = cohen_kappa(r1, r2, 3)
    ktxt = "n/a" if kappa is None else f"{kappa:.2f}"
    agree = float((r1 == r2).mean()) if r1.size else float("nan")
    ax.set_title(
        (title or "Fig. 6 - Jaccard index between the raters' classes")
        + f"\n{r1.size} images; agreement {agree:.0%}; Cohen's kappa {ktxt}",
        fontsize=11,
    )
    return _save(fig, out), j


# --------------------------------------------------------------------------- Fig. 7


def fig7_confusion(
    cm_counts: Any,
    class_names: Sequence[str],
    out: str | Path,
    title: str,
    xlabel: str = "predicted class",
    ylabel: str = "reference class",
) -> Path:
    """Fig. 7: row-normalised confusion matrix (rows = reference) with percentages and counts."""
    cm = np.asarray(cm_counts, dtype=np.int64)
    norm = row_normalise(cm)
    c = cm.shape[0]
    side = 2.0 + 1.5 * c
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.85, label="fraction of the row")
    for a in range(c):
        for b in range(c):
            colour = "white" if norm[a, b] > 0.55 else "black"
            ax.text(
                b,
                a,
                f"{norm[a, b]:.1%}\n({cm[a, b]})",
                ha="center",
                va="center",
                color=colour,
                fontsize=11,
            )
    labels = [_pretty(n) for n in class_names]
    ax.set_xticks(range(c), labels, fontsize=9)
    ax.set_yticks(range(c), [f"{nm}\n(n={cm[k].sum()})" for k, nm in enumerate(labels)], fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    n = int(cm.sum())
    acc = np.trace(cm) / n if n else float("nan")
    ax.set_title(f"{title}\nn={n}, accuracy {acc:.1%}", fontsize=11)
    return _save(fig, out)


# --------------------------------------------------------------------------- calibration


def reliability_diagram(
    calibration: Mapping[str, Any], out: str | Path, title: str | None = None
) -> Path:
    """Observed frequency against mean predicted probability per bin, before and after the
    temperature, one panel per split, ECE in the legend (``training.calibration.calibrate``)."""
    splits = calibration["splits"]
    fig = _figure(5.4 * max(1, len(splits)) + 0.4, 5.6)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(splits))))
    t = calibration["temperature"]
    for ax, (name, s) in zip(axes, splits.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=1, label="perfect calibration")
        for key, colour, what in (
            ("before", "tab:red", "T = 1"),
            ("after", "tab:blue", f"T = {t:.2f}"),
        ):
            r = s[f"reliability_{key}"]
            keep = [i for i, n in enumerate(r["count"]) if n]
            conf = [r["confidence"][i] for i in keep]
            freq = [r["frequency"][i] for i in keep]
            sizes = [12 + 60 * r["count"][i] / max(1, s["n"]) for i in keep]
            ece = s[f"ece_{key}"]
            ax.plot(conf, freq, color=colour, lw=1.5)
            label = what if ece is None else f"{what}: ECE {ece:.3f}"
            ax.scatter(conf, freq, s=sizes, color=colour, zorder=3, label=label)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel(f"predicted probability ({calibration['ece_method']})", fontsize=8)
        ax.set_ylabel("observed frequency")
        ax.set_title(f"{name} ({s['n']} slices)", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title or f"Reliability diagram (temperature fitted on {calibration['fitted_on']})")
    return _save(fig, out)


def series_roc(
    curves: Mapping[str, tuple[Any, Any]],
    chosen: Mapping[str, Mapping[str, Any]],
    out: str | Path,
    targets: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """Series ROC: sensitivity to non-diagnostic series against the false-alert rate (share of
    diagnostic series flagged) over all series thresholds, one curve per split, the chosen
    threshold's point marked (``chosen[split]``: rates with sensitivity, false_alert_rate and
    counts), the targets (sensitivity, max false alerts) as dotted lines."""
    from sklearn.metrics import roc_curve

    fig = _figure(6.4, 6.0)
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"].colors
    if targets is not None:
        ax.axhline(
            targets[0], color="0.5", ls=":", lw=1, label=f"sensitivity target {targets[0]:.2f}"
        )
        ax.axvline(
            targets[1], color="0.3", ls="--", lw=1, label=f"false-alert cap {targets[1]:.2f}"
        )
    for k, (name, (scores, positive)) in enumerate(curves.items()):
        pos = np.asarray(positive, bool)
        colour = colours[k % 10]
        counts = f"{int(pos.sum())} non-diag. / {int((~pos).sum())} diag. series"
        if pos.all() or not pos.any():
            ax.plot([], [], color=colour, label=f"{name}: {counts} (no curve)")
        else:
            fpr, tpr, _ = roc_curve(pos, np.asarray(scores, np.float64), drop_intermediate=False)
            ax.plot(fpr, tpr, color=colour, lw=1.8, label=f"{name}: {counts}")
        c = chosen.get(name)
        if c and c.get("sensitivity") is not None and c.get("false_alert_rate") is not None:
            label = (
                f"{name} at the chosen threshold: {c['n_flagged_positive']}/{c['n_positive']}"
                f" flagged, {c['n_flagged_negative']}/{c['n_negative']} false alerts"
            )
            ax.scatter(
                [c["false_alert_rate"]],
                [c["sensitivity"]],
                s=80,
                facecolors="none",
                edgecolors=colour,
                linewidths=2,
                zorder=4,
                label=label,
            )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false-alert rate (diagnostic series flagged)")
    ax.set_ylabel("sensitivity (non-diagnostic series flagged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    ax.set_title(title or "Series ROC over the series threshold", fontsize=11)
    return _save(fig, out)
