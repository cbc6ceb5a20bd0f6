"""Markdown reports: one per training run, and the cross-run summary beside the paper's numbers.

``write_run_report(run_dir)`` writes ``run_dir/report.md`` with ``run_dir/figures/*.png``;
``write_summary(run_dirs, out_dir)`` writes ``out_dir/report.md``, ``out_dir/figures/*.png`` and
``out_dir/metrics.json`` (every run's metrics, the table, the rater agreement and the label-noise
numbers). Figures that cannot be drawn (no model file, no manifest to take a slice from, no motion
generator) are left out with the reason written in the report; the report only links to files
that exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training import figures
from training.evaluate import (
    CLASS_NAMES,
    SCALAR_KEYS,
    evaluate_run,
    load_predictions,
    main_split,
    rater_agreement,
    rater_names_of,
    to_task_labels,
    truth_of,
)
from training.export import PolicyPlan, plan_policy, split_series
from training.files import write_json
from training.realeval import real_anatomy_md, real_eval_of_manifest, real_eval_unseen

MODEL_LABEL = {"convnet": "ConvNet", "resnet10": "ResNet-10"}
TASK_LABEL = {"binary": "binary", "3class": "3-class"}
MODEL_ORDER = ("convnet", "resnet10")
TASK_ORDER = ("binary", "3class")

# The paper's numbers, as its text gives them. It states no number for ResNet-10 (only that it
# does worse than the ConvNet on both tasks, Figs. 4-5, with a smaller gap on the 3-class task)
# and none for the 3-class AUC (drawn in Fig. 5 only): those cells are None and print as "—".
PAPER: dict[tuple[str, str], dict[str, Any]] = {
    ("convnet", "binary"): {
        "accuracy": 0.84,
        "auc": 0.79,
        "source": "§3.2 (84% accuracy) and §5 (84% accuracy, AUC-ROC 0.79)",
    },
    ("convnet", "3class"): {
        "accuracy": 0.65,
        "auc": None,
        "source": "§3.2 and §5 (65% accuracy); the AUC is only drawn in Fig. 5",
    },
    ("resnet10", "binary"): {
        "accuracy": None,
        "auc": None,
        "source": "§3.2: the ConvNet's 84% is 'much better than that of ResNet-10'; "
        "Figs. 4-5 only, no number in the text",
    },
    ("resnet10", "3class"): {
        "accuracy": None,
        "auc": None,
        "source": "§3.2: below the ConvNet, the gap 'much smaller' than in the binary task; "
        "no number in the text",
    },
}


# --------------------------------------------------------------------------- formatting


def _pct(x: Any, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * float(x):.{digits}f}%"


def _num(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{float(x):.{digits}f}"


def _pp(x: Any) -> str:
    """A difference of fractions in percentage points, signed."""
    return "—" if x is None else f"{100 * float(x):+.1f} pp"


def _signed(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{float(x):+.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _rel(target: Path, base_dir: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(base_dir).resolve())).as_posix()


def _image(lines: list[str], path: Path | None, alt: str, base_dir: Path) -> None:
    if path is not None and Path(path).is_file():
        lines += [f"![{alt}]({_rel(path, base_dir)})", ""]


def _pretty_class(name: str) -> str:
    return figures.PRETTY_CLASS.get(name, name.replace("_", " "))


def model_label(model: str) -> str:
    return MODEL_LABEL.get(model, model)


def run_label(result: Mapping[str, Any]) -> str:
    return f"{model_label(result['model'])} {TASK_LABEL.get(result['task'], result['task'])}"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text).strip("_") or "run"


# --------------------------------------------------------------------------- inputs


def _manifest_path(manifest: Any, config: Mapping[str, Any]) -> Path | None:
    cand = manifest if manifest is not None else config.get("manifest")
    if cand is None:
        return None
    p = Path(cand)
    return p if p.is_file() else None


def load_slice(path: str | Path, size: int = 512, frame: int = 0) -> np.ndarray:
    """One 2-D image in [0, 1]: .npy/.npz arrays, PNG/JPEG, else DICOM via the node's
    preprocessing (the same function training uses)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float32)
    elif suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
        arr = arr / max(float(arr.max()), 1.0)
    else:
        import pydicom

        from mriqa_node.preprocess import preprocess

        arr = preprocess(pydicom.dcmread(path), size=size)
        arr = arr[min(frame, arr.shape[0] - 1)]
    arr = np.squeeze(arr)
    if arr.ndim == 3:  # a stack: take the requested frame
        arr = arr[min(frame, arr.shape[0] - 1)]
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def clean_slice_from_manifest(manifest: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """The cleanest slice of a manifest: true class 2 with the lowest severity if the truth is
    known, else one both raters call excellent, else the first row."""
    rows = figures.manifest_rows(manifest)
    if not rows:
        raise ValueError(f"{manifest} lists no images")

    def key(r: Mapping[str, str]) -> tuple[float, float, float]:
        true_cls = figures._int_or_missing(r.get("true_class"))
        r1 = figures._int_or_missing(r.get("rater1"))
        r2 = figures._int_or_missing(r.get("rater2"))
        try:
            sev = float(r.get("severity") or "inf")
        except ValueError:
            sev = float("inf")
        return (-(true_cls == 2), -(r1 == 2 and r2 == 2), sev)

    row = min(rows, key=key)
    p = Path(row["path"])
    if not p.is_absolute():
        p = Path(manifest).parent / p
    frame = figures._int_or_missing(row.get("frame"))
    return load_slice(p, frame=max(frame, 0)), row


def fig3_images(manifest: Any, config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(clean, motion) for Fig. 3: the manifest's cleanest slice and the generator's motion."""
    path = _manifest_path(manifest, config)
    if path is None:
        raise RuntimeError("no manifest to take a clean slice from (pass manifest= or images=)")
    clean, _ = clean_slice_from_manifest(path)
    return figures.motion_pair(clean, severity=0.8, seed=0)


def _splits_table(run_dir: Path) -> list[str]:
    """class counts per split from splits.json, tolerant of its exact shape."""
    path = run_dir / "splits.json"
    if not path.is_file():
        return ["_No splits.json in the run directory._", ""]
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"_splits.json could not be read: {exc}_", ""]
    if not isinstance(data, Mapping):
        return ["_splits.json is not an object of splits._", ""]

    def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(d, Mapping):
            for k, v in d.items():
                out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(d, int | float | str | bool) or d is None:
            out[prefix[:-1] or "value"] = d
        elif isinstance(d, list):
            out[prefix[:-1] or "value"] = len(d)
        return out

    def col_name(k: str) -> str:
        parts = k.split(".")
        last = parts[-1]
        if last.isdigit() and int(last) < 3:
            parts[-1] = f"{last} {_pretty_class(CLASS_NAMES['3class'][int(last)])}"
        elif last in figures.PRETTY_CLASS:
            parts[-1] = _pretty_class(last)
        return " / ".join(parts)

    if isinstance(data.get("counts"), Mapping):  # training.train nests them under "counts"
        data = data["counts"]
    order = ["train", "val", "test"]
    splits = [s for s in order if s in data]
    splits += [s for s in data if s not in order and isinstance(data[s], Mapping)]
    if not splits:
        return ["_splits.json holds no per-split counts._", ""]
    flat = {s: flatten(data[s]) for s in splits}
    cols: list[str] = []
    for s in splits:
        cols.extend(k for k in flat[s] if k not in cols)
    if not cols:
        return ["_splits.json holds no counts._", ""]
    rows = [[s] + [flat[s].get(c, "—") for c in cols] for s in splits]
    return _table(["split"] + [col_name(c) for c in cols], rows)


# --------------------------------------------------------------------------- metric tables


def _reference_rows(split: Mapping[str, Any], class0: str) -> list[list[str]]:
    def row(name: str, m: Mapping[str, Any] | None) -> list[str]:
        if not m:
            return [name, "—", "—", "—", "—", "—", "—", "—"]
        rec0 = (m.get("per_class", {}).get(class0) or {}).get("recall")
        return [
            name,
            str(m.get("n", "—")),
            _pct(m.get("accuracy")),
            _pct(m.get("balanced_accuracy")),
            _num(m.get("auc")),
            _num(m.get("kappa")),
            _num(m.get("macro_f1")),
            _pct(rec0),
        ]

    rows = [row("training labels", split["vs_labels"])]
    if split.get("vs_truth"):
        rows.append(row("truth (synthetic)", split["vs_truth"]))
    for name, m in split.get("vs_raters", {}).items():
        rows.append(row(name if name.lower().startswith("rater") else f"rater {name}", m))
    mean = split.get("vs_raters_mean") or {}
    if len(split.get("vs_raters", {})) > 1:
        rows.append(
            [
                "raters (mean)",
                "",
                _pct(mean.get("accuracy")),
                _pct(mean.get("balanced_accuracy")),
                _num(mean.get("auc")),
                _num(mean.get("kappa")),
                _num(mean.get("macro_f1")),
                "",
            ]
        )
    return rows


METRIC_HEADER = [
    "reference",
    "n",
    "accuracy",
    "balanced acc.",
    "AUC",
    "Cohen's κ",
    "macro F1",
    "recall non-diag.",
]


def _confusion_md(m: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    counts = m["confusion"]["counts"]
    norm = m["confusion"]["normalized"]
    header = ["reference \\ predicted"] + [_pretty_class(n) for n in names]
    rows = [
        [_pretty_class(names[i])]
        + [f"{counts[i][j]} ({_pct(norm[i][j], 0)})" for j in range(len(names))]
        for i in range(len(names))
    ]
    return _table(header, rows)


def _label_noise_md(noise: Mapping[str, Any]) -> list[str]:
    if not noise.get("available"):
        return [f"_Not available: {noise.get('reason', 'no ground truth')}._", ""]
    lines = [
        f"Measured on the {noise['n']} test images whose true class is known. *Cost* = metric "
        "against the truth minus the same metric against the raters: how much the noisy "
        "references understate (positive) or overstate (negative) the model.",
        "",
    ]
    rows = []
    truth = noise["vs_truth"]
    labels = noise["vs_labels"]
    raters = noise.get("vs_raters_mean") or {}
    cost_r = noise.get("cost_vs_raters") or {}
    cost_l = noise.get("cost_vs_labels") or {}
    for k in SCALAR_KEYS:
        fmt = _pct if k in ("accuracy", "balanced_accuracy") else _num
        dfmt = _pp if k in ("accuracy", "balanced_accuracy") else _signed
        rows.append(
            [
                k.replace("_", " "),
                fmt(truth.get(k)),
                fmt(labels.get(k)),
                fmt(raters.get(k)),
                dfmt(cost_r.get(k)),
                dfmt(cost_l.get(k)),
            ]
        )
    lines += _table(
        [
            "metric",
            "vs truth",
            "vs training labels",
            "vs raters (mean)",
            "cost vs raters",
            "cost vs training labels",
        ],
        rows,
    )
    q = noise.get("labels_vs_truth") or {}
    lines += [
        f"Training labels agree with the truth on {_pct(q.get('accuracy_vs_truth'))} of these "
        f"images (κ {_num(q.get('kappa_vs_truth'), 2)}).",
        "",
    ]
    if noise.get("raters"):
        rrows = []
        for name, r in noise["raters"].items():
            rrows.append(
                [
                    name,
                    _pct(r.get("accuracy_vs_truth")),
                    _num(r.get("kappa_vs_truth"), 2),
                    str(r.get("apparent_errors", "—")),
                    f"{r.get('apparent_errors_correct_vs_truth', '—')} "
                    f"({_pct(r.get('apparent_errors_correct_fraction'), 0)})",
                ]
            )
        lines += _table(
            [
                "rater",
                "rater accuracy vs truth",
                "rater κ vs truth",
                "model 'errors' vs this rater",
                "of which correct vs truth",
            ],
            rrows,
        )
    return lines


def _rater_md(agreement: Mapping[str, Any] | None) -> list[str]:
    if not agreement or not agreement.get("pairs"):
        return ["_Fewer than two raters: no inter-rater agreement._", ""]
    lines = []
    for pair, a in agreement["pairs"].items():
        lines.append(
            f"- {pair.replace('~', ' vs ')}: {a['n']} images, agreement "
            f"{_pct(a['agreement'])} (binary {_pct(a['agreement_binary'])}), Cohen's κ "
            f"{_num(a['kappa_3class'], 2)} (3-class), {_num(a['kappa_binary'], 2)} (binary)"
        )
    return [*lines, ""]


def _jaccard_md(j: Any) -> list[str]:
    j = np.asarray(j, dtype=float)
    names = [_pretty_class(n) for n in CLASS_NAMES["3class"]]
    rows = [
        [f"rater 1: {names[i]}"] + ["n/a" if np.isnan(v) else f"{v:.2f}" for v in j[i]]
        for i in range(3)
    ]
    return _table(["Jaccard"] + [f"rater 2: {n}" for n in names], rows)


# --------------------------------------------------------------------------- one run


def _safe(notes: list[str], what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a figure function; on failure record why and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a figure must never sink the report
        notes.append(f"{what} not drawn: {type(exc).__name__}: {exc}")
        return None


def _rater_columns(preds: Mapping[str, np.ndarray]) -> int:
    for s in ("test", "val"):
        r = preds.get(f"{s}_raters")
        if r is not None and len(r):
            return int(np.asarray(r).reshape(len(r), -1).shape[1])
    return 0


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _raters_all_splits(preds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    parts = [preds[f"{s}_raters"] for s in ("val", "test") if f"{s}_raters" in preds]
    parts = [np.asarray(p).reshape(len(p), -1) for p in parts if len(p)]
    if not parts or min(p.shape[1] for p in parts) < 2:
        return None
    return np.concatenate([p[:, :2] for p in parts]).astype(np.int64)


def _run_report(
    run_dir: Path,
    manifest: Any = None,
    out: Path | None = None,
    images: tuple[Any, Any] | None = None,
    model: Any = None,
) -> tuple[Path, dict[str, Any], dict[str, Path]]:
    run_dir = Path(run_dir)
    result = evaluate_run(run_dir)
    preds = load_predictions(run_dir)
    out = Path(out) if out is not None else run_dir / "report.md"
    base = out.parent
    figdir = base / "figures"
    notes: list[str] = []
    figs: dict[str, Path] = {}
    task = result["task"]
    names = result["class_names"]
    label = run_label(result)
    split_name, split = main_split(result)
    cfg = result["config"]

    hist = run_dir / "history.csv"
    if hist.is_file():
        figs["fig4"] = _safe(
            notes,
            "Fig. 4",
            figures.fig4_accuracy_curves,
            {label: hist},
            figdir / "fig4_accuracy.png",
            title=f"Fig. 4 - {label}: training and evaluation accuracy",
        )
    else:
        notes.append("Fig. 4 not drawn: no history.csv")

    probs = preds.get(f"{split_name}_probs")
    panels: dict[str, Any] = {}
    if probs is not None:
        panels[f"{split_name}: vs training labels"] = figures.roc_inputs(
            probs, preds[f"{split_name}_labels"], label, names
        )
        truth3 = truth_of(preds, split_name)
        if truth3 is not None and (np.asarray(truth3) >= 0).any():
            panels[f"{split_name}: vs truth"] = figures.roc_inputs(
                probs, to_task_labels(truth3, task), label, names
            )
        figs["fig5"] = _safe(
            notes,
            "Fig. 5",
            figures.fig5_roc_curves,
            panels,
            figdir / "fig5_roc.png",
            title=f"Fig. 5 - {label}: ROC on the {split_name} split",
        )

    if result.get("calibration"):
        figs["reliability"] = _safe(
            notes,
            "Reliability diagram",
            figures.reliability_diagram,
            result["calibration"],
            figdir / "reliability.png",
            title=f"{label}: reliability before and after temperature scaling",
        )
    result["operating_point"] = None
    plan = None
    if {"val_series_uids", "val_probs"} <= preds.keys():
        plan = _safe(notes, "Series operating point", plan_policy, preds)
        if plan is not None:
            result["operating_point"] = {**plan.operating_point, "test": plan.test["series"]}
            figs["series_roc"] = _safe(
                notes, "Series ROC", _draw_series_roc, plan, figdir / "series_roc.png", label
            )
    result["real_anatomy"] = None
    mpath_real = _manifest_path(manifest, cfg)
    if plan is not None and mpath_real is not None:
        result["real_anatomy"] = _safe(
            notes, "Real anatomy", real_eval_of_manifest, preds, mpath_real, plan
        )
    result["real_anatomy_unseen"] = None
    if plan is not None:
        result["real_anatomy_unseen"] = _safe(
            notes, "Real anatomy (unseen set)", real_eval_unseen, run_dir, plan
        )

    mpath = _manifest_path(manifest, cfg)
    if mpath is not None:
        src6: Any = mpath
        fig6_source = f"manifest `{mpath.name}` (all images)"
    else:
        src6 = _raters_all_splits(preds)
        fig6_source = "the raters' labels of the val and test splits (no manifest given)"
    jac = None
    if src6 is not None:
        r6 = _safe(notes, "Fig. 6", figures.fig6_rater_jaccard, src6, figdir / "fig6_jaccard.png")
        if r6 is not None:
            figs["fig6"], jac = r6
    else:
        notes.append("Fig. 6 not drawn: fewer than two raters and no manifest")

    for ref in ("labels", "truth"):
        m = split.get(f"vs_{ref}")
        if not m or not m["n"]:
            continue
        what = "training labels" if ref == "labels" else "truth"
        figs[f"fig7_{ref}"] = _safe(
            notes,
            f"Fig. 7 ({what})",
            figures.fig7_confusion,
            m["confusion"]["counts"],
            names,
            figdir / f"fig7_confusion_{ref}.png",
            f"Fig. 7 - {label}, {split_name} vs {what}",
            ylabel=f"{what} class",
        )

    fig3_change = None
    model_file = run_dir / "model.keras"
    if model is None and model_file.is_file():
        model = _safe(notes, "Fig. 3", figures._load_model, model_file)
    elif model is None:
        notes.append("Fig. 3 not drawn: no model.keras in the run directory")
    if model is not None:
        pair = images if images is not None else _safe(notes, "Fig. 3", fig3_images, manifest, cfg)
        if pair is not None:
            maps = _safe(notes, "Fig. 3", figures.activation_maps, model, list(pair))
            if maps is not None:
                figs["fig3"] = _safe(
                    notes,
                    "Fig. 3",
                    figures.draw_activation_maps,
                    maps,
                    figdir / "fig3_activations.png",
                    label,
                )
                fig3_change = activation_change_of(maps)
    figs = {k: v for k, v in figs.items() if v is not None}
    result["figures"] = {k: _rel(v, run_dir) for k, v in figs.items()}
    result["activation_change"] = fig3_change
    if jac is not None:
        result["jaccard"] = {"source": fig6_source, "matrix": jac}
    write_json(run_dir / "metrics.json", result)

    lines = _run_markdown(run_dir, base, result, figs, notes, fig6_source, jac)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out, result, figs


def _draw_series_roc(plan: PolicyPlan, out: Path, label: str) -> Path:
    """The series ROC of val and test (calibrated) with the chosen threshold marked."""
    op = plan.operating_point
    splits = [s for s in ("val", "test") if f"{s}_series_uids" in plan.predictions]
    curves = {s: split_series(plan.predictions, s, plan.policy) for s in splits}
    chosen = {"val": op["series"], "test": plan.test.get("series")}
    return figures.series_roc(
        curves,
        chosen,
        out,
        targets=(op["target_sensitivity"], op["max_false_alerts"]),
        title=f"{label}: series ROC, threshold {op['series_threshold']:.4g} chosen on val",
    )


def _calibration_md(cal: Mapping[str, Any] | None) -> list[str]:
    if not cal:
        return ["_No val split: no temperature fitted._", ""]
    lines = [
        f"Temperature T = {_num(cal['temperature'])}, fitted on the {cal['fitted_on']} split "
        f"(minimum NLL; logits: {cal['logits']}); the exported model divides its logits by T. "
        f"ECE: {cal['ece_method']}.",
        "",
    ]
    keys = ("ece_before", "ece_after", "nll_before", "nll_after")
    rows = [[name, s["n"], *(_num(s[k]) for k in keys)] for name, s in cal["splits"].items()]
    return lines + _table(
        ["split", "n", "ECE before", "ECE after", "NLL before", "NLL after"], rows
    )


def _operating_point_md(op: Mapping[str, Any] | None) -> list[str]:
    if not op:
        return ["_No series operating point: no series ids in predictions.npz, or see Notes._", ""]
    lines = [
        f"What `mriqa-train export` chooses with its defaults, on the calibrated val series: "
        f"sensitivity to non-diagnostic series >= {_num(op['target_sensitivity'], 2)} with at "
        f"most {_num(op['max_false_alerts'], 2)} of diagnostic series flagged. Slice threshold "
        f"{op['slice_threshold']:.4g}, series threshold {op['series_threshold']:.4g} "
        f"(top fraction {op['top_fraction']}).",
        "",
    ]
    if op["sensitivity_met"] is False:
        lines += ["**The sensitivity target is not met** under the false-alert cap.", ""]
    rows = []
    for name, r in (("val", op["series"]), ("test", op.get("test"))):
        if r:
            rows.append(
                [
                    name,
                    f"{r['n_positive']} / {r['n_negative']}",
                    f"{_num(r['sensitivity'])} ({r['n_flagged_positive']}/{r['n_positive']})",
                    f"{_num(r['false_alert_rate'])} ({r['n_flagged_negative']}/{r['n_negative']})",
                ]
            )
    lines += _table(["split", "series non-diag. / diag.", "sensitivity", "false-alert rate"], rows)
    return lines + [f"- {w}" for w in op["warnings"]] + ([""] if op["warnings"] else [])


def activation_change_of(maps: Mapping[str, Any]) -> dict[str, Any]:
    """Relative change of the input and of the first/last conv mean activation map between the
    clean (index 0) and the motion (index 1) image of ``figures.activation_maps`` (Fig. 3)."""
    return {
        "first_layer": maps["first_layer"],
        "last_layer": maps["last_layer"],
        "first": figures.relative_difference(maps["first"][0], maps["first"][1]),
        "last": figures.relative_difference(maps["last"][0], maps["last"][1]),
        "input": figures.relative_difference(maps["inputs"][0], maps["inputs"][1]),
    }


def activation_change(model: Any, clean: Any, motion: Any) -> dict[str, Any]:
    """``activation_change_of`` for a model and a (clean, motion) pair."""
    return activation_change_of(figures.activation_maps(model, [clean, motion]))


def _run_markdown(
    run_dir: Path,
    base: Path,
    result: Mapping[str, Any],
    figs: Mapping[str, Path],
    notes: Sequence[str],
    fig6_source: str,
    jac: Any,
) -> list[str]:
    cfg = result["config"]
    names = result["class_names"]
    label = run_label(result)
    classes = ", ".join(f"{k} {_pretty_class(n)}" for k, n in enumerate(names))
    facts = [
        f"model **{model_label(result['model'])}**",
        f"task **{TASK_LABEL.get(result['task'], result['task'])}** ({classes})",
        f"labels: {result.get('label') or '—'}",
    ]
    facts += [f"{k}: {cfg[k]}" for k in ("steps", "batch", "input_size") if k in cfg]
    lines = [
        f"# Run report: {result['run']} — {label}",
        "",
        " · ".join(facts),
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')}; all numbers are in "
        f"[metrics.json]({_rel(run_dir / 'metrics.json', base)}).",
        "",
        "## Data",
        "",
        "Class counts per split (splits.json):",
        "",
    ]
    lines += _splits_table(run_dir)
    for s, sp in result["splits"].items():
        counts = ", ".join(f"{_pretty_class(k)} {v}" for k, v in sp["label_counts"].items())
        lines.append(f"- {s}: {sp['n']} images; training labels: {counts}")
    lines.append("")
    for s, sp in result["splits"].items():
        lines += [f"## Metrics on the {s} split", ""]
        lines += _table(METRIC_HEADER, _reference_rows(sp, names[0]))
        if s == next(iter(result["splits"])):
            lines += [f"AUC: {sp['vs_labels']['auc_method']}.", ""]
    split_name, split = main_split(result)
    m = split["vs_labels"]
    lines += [f"### Per class ({split_name}, vs training labels)", ""]
    lines += _table(
        ["class", "precision", "recall", "F1", "support"],
        [
            [_pretty_class(n), _pct(v["precision"]), _pct(v["recall"]), _num(v["f1"]), v["support"]]
            for n, v in m["per_class"].items()
        ],
    )
    lines += [
        f"## Confusion matrices ({split_name}; Fig. 7)",
        "",
        "Against the training labels:",
        "",
    ]
    lines += _confusion_md(m, names)
    _image(lines, figs.get("fig7_labels"), "Fig. 7 confusion vs training labels", base)
    if split.get("vs_truth") and split["vs_truth"]["n"]:
        lines += ["Against the truth:", ""]
        lines += _confusion_md(split["vs_truth"], names)
        _image(lines, figs.get("fig7_truth"), "Fig. 7 confusion vs truth", base)
    h = result.get("history") or {}
    lines += ["## Training curves (Fig. 4)", ""]
    if h:
        lines += [
            f"Final step {_num(h.get('final_step'), 0)}: train accuracy "
            f"{_pct(h.get('final_train_acc'))}, eval accuracy {_pct(h.get('final_val_acc'))}; "
            f"best eval accuracy {_pct(h.get('best_val_acc'))} at step "
            f"{_num(h.get('best_val_step'), 0)}; {_num(h.get('final_seconds'), 0)} s.",
            "",
        ]
    _image(lines, figs.get("fig4"), "Fig. 4 accuracy curves", base)
    lines += ["## ROC (Fig. 5)", ""]
    _image(lines, figs.get("fig5"), "Fig. 5 ROC curves", base)
    lines += ["## Calibration", ""]
    lines += _calibration_md(result.get("calibration"))
    _image(lines, figs.get("reliability"), "Reliability diagram", base)
    lines += ["## Series operating point", ""]
    lines += _operating_point_md(result.get("operating_point"))
    _image(lines, figs.get("series_roc"), "Series ROC", base)
    lines += ["## Real anatomy never seen in training (test split, per source)", ""]
    lines += real_anatomy_md(result.get("real_anatomy"))
    if result.get("real_anatomy_unseen") is not None:
        lines += ["### A real-anatomy set outside this run's data (every source unseen)", ""]
        lines += real_anatomy_md(result["real_anatomy_unseen"])
    lines += ["## Raters (Fig. 6)", ""]
    lines += _rater_md(split.get("raters"))
    if jac is not None:
        lines += [f"Jaccard index between the two raters' classes, from {fig6_source}:", ""]
        lines += _jaccard_md(jac)
    _image(lines, figs.get("fig6"), "Fig. 6 rater Jaccard indices", base)
    lines += ["## Label noise (paper §4.3)", ""]
    lines += _label_noise_md(result["label_noise"])
    lines += ["## Activation maps (Fig. 3)", ""]
    ch = result.get("activation_change")
    if ch:
        lines += [
            f"Relative change of the mean activation map under synthetic motion: input "
            f"{_num(ch['input'], 2)}, first conv `{ch['first_layer']}` {_num(ch['first'], 2)}, "
            f"last conv `{ch['last_layer']}` {_num(ch['last'], 2)}.",
            "",
        ]
    _image(lines, figs.get("fig3"), "Fig. 3 activation maps", base)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return lines


def write_run_report(
    run_dir: str | Path,
    manifest: str | Path | None = None,
    out: str | Path | None = None,
    images: tuple[Any, Any] | None = None,
) -> Path:
    """Write the markdown report of one run (default ``run_dir/report.md``) and its figures (in
    ``figures/`` beside the report); also (re)writes ``run_dir/metrics.json``.

    ``manifest`` (the manifest CSV) feeds Fig. 6 and the clean slice of Fig. 3; ``images`` =
    (clean, motion) 2-D arrays overrides the Fig. 3 pair. Returns the report's path.
    """
    path, _, _ = _run_report(Path(run_dir), manifest, None if out is None else Path(out), images)
    return path


# --------------------------------------------------------------------------- summary


def _summary_rows(
    results: Mapping[str, Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """One row per run, plus a row for each paper configuration that has no run."""
    data: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()

    def key(item: tuple[str, Mapping[str, Any]]) -> tuple[int, int, str]:
        r = item[1]
        mi = MODEL_ORDER.index(r["model"]) if r["model"] in MODEL_ORDER else 99
        ti = TASK_ORDER.index(r["task"]) if r["task"] in TASK_ORDER else 99
        return (mi, ti, item[0])

    for name, r in sorted(results.items(), key=key):
        _, split = main_split(r)
        paper = PAPER.get((r["model"], r["task"]), {})
        seen.add((r["model"], r["task"]))
        data.append(
            {
                "run": name,
                "model": r["model"],
                "task": r["task"],
                "label": r.get("label"),
                "n_test": split["n"],
                "vs_labels": {k: split["vs_labels"].get(k) for k in SCALAR_KEYS},
                "vs_raters_mean": split.get("vs_raters_mean"),
                "vs_truth": None
                if not split.get("vs_truth")
                else {k: split["vs_truth"].get(k) for k in SCALAR_KEYS},
                "paper": {"accuracy": paper.get("accuracy"), "auc": paper.get("auc")},
            }
        )
    for model in MODEL_ORDER:
        for task in TASK_ORDER:
            if (model, task) not in seen:
                p = PAPER[(model, task)]
                data.append(
                    {
                        "run": None,
                        "model": model,
                        "task": task,
                        "paper": {"accuracy": p["accuracy"], "auc": p["auc"]},
                    }
                )
    md = []
    for d in data:
        head = [model_label(d["model"]), TASK_LABEL.get(d["task"], d["task"])]
        paper = [_pct(d["paper"]["accuracy"], 0), _num(d["paper"]["auc"], 2)]
        if d["run"] is None:
            md.append(head + ["_no run_"] + ["—"] * 8 + paper)
            continue
        v, t, rm = d["vs_labels"], d["vs_truth"] or {}, d["vs_raters_mean"] or {}
        md.append(
            [
                *head,
                f"{d['run']} ({d['label'] or '—'})",
                str(d["n_test"]),
                _pct(v["accuracy"]),
                _pct(v["balanced_accuracy"]),
                _num(v["auc"]),
                _num(rm.get("kappa")),
                _num(t.get("kappa")),
                _pct(t.get("accuracy")),
                _num(t.get("auc")),
                *paper,
            ]
        )
    return data, md


SUMMARY_HEADER = [
    "model",
    "task",
    "run (labels)",
    "n test",
    "accuracy",
    "balanced acc.",
    "AUC",
    "κ vs raters",
    "κ vs truth",
    "accuracy vs truth",
    "AUC vs truth",
    "paper accuracy",
    "paper AUC",
]


def _noise_summary(results: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    per_run = {}
    for name, r in results.items():
        noise = r.get("label_noise") or {}
        if noise.get("available") and noise.get("cost_vs_raters"):
            per_run[name] = noise
    if not per_run:
        return (
            {"available": False},
            [
                "No run has ground truth (real data), so the cost of label noise cannot be "
                "measured; the inter-rater agreement above is the only handle on it.",
                "",
            ],
        )
    mean_cost = {}
    for k in SCALAR_KEYS:
        vals = [
            n["cost_vs_raters"][k] for n in per_run.values() if n["cost_vs_raters"][k] is not None
        ]
        mean_cost[k] = float(np.mean(vals)) if vals else None
    rater_acc = [
        q["accuracy_vs_truth"]
        for n in per_run.values()
        for q in n.get("raters", {}).values()
        if q.get("accuracy_vs_truth") is not None
    ]
    frac = [
        q["apparent_errors_correct_fraction"]
        for n in per_run.values()
        for q in n.get("raters", {}).values()
        if q.get("apparent_errors_correct_fraction") is not None
    ]
    summary = {
        "available": True,
        "runs": list(per_run),
        "mean_cost_vs_raters": mean_cost,
        "mean_rater_accuracy_vs_truth": float(np.mean(rater_acc)) if rater_acc else None,
        "mean_apparent_errors_correct_fraction": float(np.mean(frac)) if frac else None,
    }

    def word(x: float | None, unit: str, scale: float = 1.0, digits: int = 1) -> str:
        if x is None:
            return "— (undefined)"
        direction = "lower" if x > 0 else "higher"
        return f"{abs(x) * scale:.{digits}f} {unit} {direction}"

    lines = [
        "The paper (§4.3) argues that unreliable labels hurt not only training but also the "
        "measurement of performance. With synthetic data the true class is known, so the same "
        "test predictions can be scored against the truth and against each rater. Mean over "
        f"{len(per_run)} run(s), scored against a single rater instead of the truth:",
        "",
        f"- accuracy reads {word(mean_cost['accuracy'], 'percentage points', 100)},",
        f"- balanced accuracy {word(mean_cost['balanced_accuracy'], 'percentage points', 100)},",
        f"- AUC {word(mean_cost['auc'], '', 1, 3).replace('  ', ' ')},",
        f"- Cohen's κ {word(mean_cost['kappa'], '', 1, 3).replace('  ', ' ')}.",
        "",
    ]
    if summary["mean_rater_accuracy_vs_truth"] is not None:
        lines += [
            f"The raters themselves agree with the truth on "
            f"{_pct(summary['mean_rater_accuracy_vs_truth'])} of test images on average"
            + (
                f", and {_pct(summary['mean_apparent_errors_correct_fraction'], 0)} of the "
                "model's apparent errors against a rater are correct predictions of the true "
                "class."
                if summary["mean_apparent_errors_correct_fraction"] is not None
                else "."
            ),
            "",
        ]
    rows = []
    for name, n in per_run.items():
        r = results[name]
        t, rm, c = n["vs_truth"], n["vs_raters_mean"] or {}, n["cost_vs_raters"]
        rows.append(
            [
                run_label(r),
                name,
                _pct(t["accuracy"]),
                _pct(rm.get("accuracy")),
                _pp(c["accuracy"]),
                _num(t["auc"]),
                _num(rm.get("auc")),
                _signed(c["auc"]),
                _num(t["kappa"]),
                _num(rm.get("kappa")),
                _signed(c["kappa"]),
            ]
        )
    lines += _table(
        [
            "model / task",
            "run",
            "acc. vs truth",
            "acc. vs raters",
            "cost",
            "AUC vs truth",
            "AUC vs raters",
            "cost",
            "κ vs truth",
            "κ vs raters",
            "cost",
        ],
        rows,
    )
    return summary, lines


def _unseen_real_md(results: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
                    ) -> list[str]:  # fmt: skip
    """Each run on the real anatomy it never saw: the worst source and the series totals."""
    from training.realeval import pooled

    rows = {n: r["real_anatomy_unseen"] for n, r in results.items()
            if r.get("real_anatomy_unseen")}  # fmt: skip
    if not rows:
        return []
    lines = [
        "", "## On real anatomy (trained on phantoms only)", "",
        "The corrupted real series of `mriqa-train corrupt`, none of them in these runs' data;"
        " each run's per-source table is in its own report. Worst source AUCs; series totals"
        " at each run's own operating point.", "",
        "| run | sources | worst AUC clean vs mild | worst AUC clean vs heavy |"
        " clean series alerted | heavy series caught |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for n, per_source in rows.items():
        t = pooled(per_source)
        lines.append(
            f"| {labels[n]} | {len(per_source)} | {_num(t['worst_auc_clean_vs_mild'], 3)} |"
            f" {_num(t['worst_auc_clean_vs_heavy'], 3)} |"
            f" {t['clean_series_alerted']}/{t['clean_series']} |"
            f" {t['heavy_series_caught']}/{t['heavy_series']} |"
        )
    return lines


def write_summary(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    manifest: str | Path | None = None,
    images: tuple[Any, Any] | None = None,
) -> Path:
    """The cross-run report ``out_dir/report.md`` (+ ``figures/``, ``metrics.json``).

    Writes each run's own report (``run_dir/report.md``) on the way. ``manifest`` feeds Fig. 6
    and the clean slice of Fig. 3; ``images`` = (clean, motion) overrides that pair.
    """
    out_dir = Path(out_dir)
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "report.md"
    notes: list[str] = []
    if not run_dirs:
        raise ValueError("write_summary needs at least one run directory")

    pair = images
    if pair is None:
        cfg0 = (
            json.loads((Path(run_dirs[0]) / "config.json").read_text())
            if (Path(run_dirs[0]) / "config.json").is_file()
            else {}
        )
        pair = _safe(notes, "Fig. 3", fig3_images, manifest, cfg0)

    results: dict[str, dict[str, Any]] = {}
    reports: dict[str, Path] = {}
    run_figs: dict[str, dict[str, Path]] = {}
    for rd in map(Path, run_dirs):
        try:
            path, result, rfigs = _run_report(rd, manifest, None, pair)
        except (OSError, ValueError, KeyError) as exc:  # a broken run must not sink the others
            notes.append(f"run {rd} left out: {type(exc).__name__}: {exc}")
            continue
        name = rd.name
        i = 2
        while name in results:
            name, i = f"{rd.name}-{i}", i + 1
        results[name] = result
        reports[name] = path
        run_figs[name] = rfigs
    if not results:
        raise ValueError("no run could be evaluated: " + "; ".join(notes))
    labels = {name: run_label(r) for name, r in results.items()}
    counts: dict[str, int] = {}
    for v in labels.values():
        counts[v] = counts.get(v, 0) + 1
    labels = {n: (v if counts[v] == 1 else f"{v} [{n}]") for n, v in labels.items()}

    figs: dict[str, Path] = {}
    hists = {labels[n]: Path(r["run_dir"]) / "history.csv" for n, r in results.items()}
    hists = {k: v for k, v in hists.items() if v.is_file()}
    if hists:
        figs["fig4"] = _safe(
            notes,
            "Fig. 4",
            figures.fig4_accuracy_curves,
            hists,
            figdir / "fig4_accuracy.png",
            title="Fig. 4 - training and evaluation accuracy, all runs",
        )
    panels: dict[str, dict[str, Any]] = {}
    for n, r in results.items():
        preds = load_predictions(Path(r["run_dir"]))
        split_name, _ = main_split(r)
        group = panels.setdefault(
            f"{TASK_LABEL.get(r['task'], r['task'])} ({split_name}, vs training labels)", {}
        )
        group.update(
            figures.roc_inputs(
                preds[f"{split_name}_probs"],
                preds[f"{split_name}_labels"],
                labels[n],
                r["class_names"],
            )
        )
    figs["fig5"] = _safe(
        notes,
        "Fig. 5",
        figures.fig5_roc_curves,
        panels,
        figdir / "fig5_roc.png",
        title="Fig. 5 - ROC curves (binary: non-diagnostic positive; 3-class: one vs rest)",
    )

    first = next(iter(results.values()))
    mpath = _manifest_path(manifest, first["config"])
    agreement = None
    jac = None
    if mpath is not None:
        src6: Any = mpath
        fig6_source = f"manifest `{mpath.name}` (all images)"
        r1, r2, _ = figures.rater_vectors(mpath)
        agreement = rater_agreement(np.stack([r1, r2], axis=1), ["rater1", "rater2"])
    else:
        preds = load_predictions(Path(first["run_dir"]))
        src6 = _raters_all_splits(preds)
        fig6_source = f"the raters' labels of run {first['run']} (val + test; no manifest)"
        if src6 is not None:
            agreement = rater_agreement(src6, rater_names_of(preds, _rater_columns(preds))[:2])
    if src6 is not None:
        r6 = _safe(notes, "Fig. 6", figures.fig6_rater_jaccard, src6, figdir / "fig6_jaccard.png")
        if r6 is not None:
            figs["fig6"], jac = r6

    for n in results:  # the run reports drew them: copy, do not redraw
        src = run_figs[n].get("fig7_labels")
        if src is not None:
            figs[f"fig7_{n}"] = _copy(src, figdir / f"fig7_{_slug(n)}.png")

    fig3_numbers: dict[str, Any] = {}
    chosen: dict[str, str] = {}
    for n, r in results.items():  # one run per model, preferring the binary task
        if "fig3" not in run_figs[n]:
            continue
        cur = chosen.get(r["model"])
        if cur is None or (results[cur]["task"] != "binary" and r["task"] == "binary"):
            chosen[r["model"]] = n
    for model_key, n in chosen.items():
        figs[f"fig3_{model_key}"] = _copy(
            run_figs[n]["fig3"], figdir / f"fig3_{_slug(model_key)}.png"
        )
        fig3_numbers[model_key] = results[n].get("activation_change")
    figs = {k: v for k, v in figs.items() if v is not None}

    table_data, table_md = _summary_rows(results)
    noise, noise_md = _noise_summary(results)

    lines = [
        "# Training report: ConvNet vs ResNet-10, binary vs 3-class",
        "",
        f"Generated {datetime.now(UTC).isoformat(timespec='seconds')} from {len(results)} "
        "run(s); all numbers are in [metrics.json](metrics.json).",
        "",
        "## Results beside the paper",
        "",
        "Test split, scored against the training labels unless stated; κ vs raters is the mean "
        "of the model's Cohen's κ against each rater; truth columns need synthetic data. AUC: "
        "binary = P(non-diagnostic) with non-diagnostic as the positive class; 3-class = "
        "one-vs-rest macro average. The paper scored its model against its raters' labels, so "
        "its numbers compare with the accuracy and AUC columns, not with the truth columns.",
        "",
    ]
    lines += _table(SUMMARY_HEADER, table_md)
    lines += ["Paper numbers and where they come from:", ""]
    for (model, task), p in PAPER.items():
        lines.append(
            f"- {model_label(model)} {TASK_LABEL[task]}: accuracy {_pct(p['accuracy'], 0)}, "
            f"AUC {_num(p['auc'], 2)} ({p['source']})."
        )
    lines += ["", "Per-run reports:", ""]
    lines += [f"- [{labels[n]} ({n})]({_rel(p, out_dir)})" for n, p in reports.items()]
    lines += _unseen_real_md(results, labels)
    lines += ["", "## Accuracy curves (Fig. 4)", ""]
    _image(lines, figs.get("fig4"), "Fig. 4 accuracy curves", out_dir)
    lines += ["## ROC curves (Fig. 5)", ""]
    _image(lines, figs.get("fig5"), "Fig. 5 ROC curves", out_dir)
    lines += ["## Inter-rater agreement (Fig. 6)", ""]
    lines += _rater_md(agreement)
    if jac is not None:
        lines += [f"Jaccard index between the two raters' classes, from {fig6_source}:", ""]
        lines += _jaccard_md(jac)
    _image(lines, figs.get("fig6"), "Fig. 6 rater Jaccard indices", out_dir)
    lines += ["## Confusion matrices (Fig. 7)", ""]
    for n in results:
        lines += [f"### {labels[n]}", ""]
        _image(lines, figs.get(f"fig7_{n}"), f"Fig. 7 {labels[n]}", out_dir)
    lines += ["## Activation maps (Fig. 3)", ""]
    if fig3_numbers:
        rows = [
            [
                model_label(k),
                _num(v and v.get("input"), 2),
                _num(v and v.get("first"), 2),
                _num(v and v.get("last"), 2),
            ]
            for k, v in fig3_numbers.items()
        ]
        lines += [
            "Relative change ||motion - clean|| / ||clean|| of the mean activation map; the "
            "paper's claim is that the ResNet-10's last layer changes little (does not "
            "discriminate) while the ConvNet's does.",
            "",
        ]
        lines += _table(["model", "input", "first conv", "last conv"], rows)
    for k in fig3_numbers:
        _image(lines, figs.get(f"fig3_{k}"), f"Fig. 3 {model_label(k)}", out_dir)
    lines += ["## Label noise (paper §4.3, quantified)", ""]
    lines += noise_md
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    out.write_text("\n".join(lines))

    write_json(
        out_dir / "metrics.json",
        {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "runs": results,
            "table": table_data,
            "paper": {f"{m}/{t}": p for (m, t), p in PAPER.items()},
            "rater_agreement": agreement,
            "jaccard": None if jac is None else {"source": fig6_source, "matrix": jac},
            "activation_change": fig3_numbers,
            "label_noise": noise,
            "figures": {k: _rel(v, out_dir) for k, v in figs.items()},
            "reports": {n: _rel(p, out_dir) for n, p in reports.items()},
            "notes": notes,
        },
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.report RUN_DIR [RUN_DIR ...] [--out DIR] [--manifest CSV]``: one run
    and no --out writes its run report; otherwise the summary in --out (default: report/)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.report", description=main.__doc__)
    ap.add_argument("runs", nargs="+", type=Path, help="training run directories")
    ap.add_argument("--out", type=Path, help="summary directory (default ./report)")
    ap.add_argument("--manifest", type=Path, help="manifest CSV (Fig. 6, Fig. 3 slice)")
    args = ap.parse_args(argv)
    if len(args.runs) == 1 and args.out is None:
        print(write_run_report(args.runs[0], manifest=args.manifest))
    else:
        print(write_summary(args.runs, args.out or Path("report"), manifest=args.manifest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
