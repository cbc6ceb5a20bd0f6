"""The report of one training run: its figures, its operating point and real-anatomy results
(added to its metrics.json), and run.md.j2 rendered with them."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training import figures
from training.evaluate import evaluate_run, load_predictions, main_split, to_task_labels, truth_of
from training.export import PolicyPlan, plan_policy, split_series
from training.files import write_json
from training.realeval import real_anatomy_md, real_eval_of_manifest, real_eval_unseen
from training.report.inputs import fig3_images, manifest_path, raters_all_splits
from training.report.sections import (
    METRIC_HEADER,
    calibration_md,
    confusion_md,
    jaccard_md,
    label_noise_md,
    operating_point_md,
    rater_md,
    reference_rows,
    splits_table,
)
from training.report.text import (
    TASK_LABEL,
    image,
    model_label,
    num,
    pct,
    pretty_class,
    rel,
    render,
    run_label,
    table,
)


def attempt(notes: list[str], what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a figure function; on failure record why and return None."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # a figure must never sink the report
        notes.append(f"{what} not drawn: {type(exc).__name__}: {exc}")
        return None


def draw_roc(notes: list[str], panels: Mapping[str, Any], figdir: Path, title: str) -> Path | None:
    """Fig. 5 (ROC curves, one panel per reference or task) into figdir, or a note why not."""
    return attempt(notes, "Fig. 5", figures.fig5_roc_curves, panels, figdir / "fig5_roc.png",
                   title=title)  # fmt: skip


def build_run_report(
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
        figs["fig4"] = attempt(
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
        figs["fig5"] = draw_roc(notes, panels, figdir,
                                f"Fig. 5 - {label}: ROC on the {split_name} split")  # fmt: skip

    if result.get("calibration"):
        figs["reliability"] = attempt(
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
        plan = attempt(notes, "Series operating point", plan_policy, preds)
        if plan is not None:
            result["operating_point"] = {**plan.operating_point, "test": plan.test["series"]}
            figs["series_roc"] = attempt(
                notes, "Series ROC", draw_series_roc, plan, figdir / "series_roc.png", label
            )
    result["real_anatomy"] = None
    mpath_real = manifest_path(manifest, cfg)
    if plan is not None and mpath_real is not None:
        result["real_anatomy"] = attempt(
            notes, "Real anatomy", real_eval_of_manifest, preds, mpath_real, plan
        )
    result["real_anatomy_unseen"] = None
    if plan is not None:
        result["real_anatomy_unseen"] = attempt(
            notes, "Real anatomy (unseen set)", real_eval_unseen, run_dir, plan
        )

    mpath = manifest_path(manifest, cfg)
    if mpath is not None:
        src6: Any = mpath
        fig6_source = f"manifest `{mpath.name}` (all images)"
    else:
        src6 = raters_all_splits(preds)
        fig6_source = "the raters' labels of the val and test splits (no manifest given)"
    jac = None
    if src6 is not None:
        r6 = attempt(notes, "Fig. 6", figures.fig6_rater_jaccard, src6, figdir / "fig6_jaccard.png")
        if r6 is not None:
            figs["fig6"], jac = r6
    else:
        notes.append("Fig. 6 not drawn: fewer than two raters and no manifest")

    for ref in ("labels", "truth"):
        m = split.get(f"vs_{ref}")
        if not m or not m["n"]:
            continue
        what = "training labels" if ref == "labels" else "truth"
        figs[f"fig7_{ref}"] = attempt(
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
        model = attempt(notes, "Fig. 3", figures.load_model, model_file)
    elif model is None:
        notes.append("Fig. 3 not drawn: no model.keras in the run directory")
    if model is not None:
        pair = images
        if pair is None:
            pair = attempt(notes, "Fig. 3", fig3_images, manifest, cfg)
        if pair is not None:
            maps = attempt(notes, "Fig. 3", figures.activation_maps, model, list(pair))
            if maps is not None:
                figs["fig3"] = attempt(
                    notes,
                    "Fig. 3",
                    figures.draw_activation_maps,
                    maps,
                    figdir / "fig3_activations.png",
                    label,
                )
                fig3_change = activation_change_of(maps)
    figs = {k: v for k, v in figs.items() if v is not None}
    result["figures"] = {k: rel(v, run_dir) for k, v in figs.items()}
    result["activation_change"] = fig3_change
    if jac is not None:
        result["jaccard"] = {"source": fig6_source, "matrix": jac}
    write_json(run_dir / "metrics.json", result)

    text = _run_markdown(run_dir, base, result, figs, notes, fig6_source, jac)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out, result, figs


def draw_series_roc(plan: PolicyPlan, out: Path, label: str) -> Path:
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


def _run_markdown(run_dir: Path, base: Path, result: Mapping[str, Any], figs: Mapping[str, Path],
                  notes: list[str], fig6_source: str, jac: Any) -> str:  # fmt: skip
    """run.md.j2 with the run's sections."""
    cfg = result["config"]
    names = result["class_names"]
    classes = ", ".join(f"{k} {pretty_class(n)}" for k, n in enumerate(names))
    facts = [
        f"model **{model_label(result['model'])}**",
        f"task **{TASK_LABEL.get(result['task'], result['task'])}** ({classes})",
        f"labels: {result.get('label') or '—'}",
    ]
    facts += [f"{k}: {cfg[k]}" for k in ("steps", "batch", "input_size") if k in cfg]
    split_name, split = main_split(result)
    m = split["vs_labels"]
    per_class = [
        [pretty_class(n), pct(v["precision"]), pct(v["recall"]), num(v["f1"]), v["support"]]
        for n, v in m["per_class"].items()
    ]
    truth = split.get("vs_truth")
    alt = {
        "fig7_labels": "Fig. 7 confusion vs training labels",
        "fig7_truth": "Fig. 7 confusion vs truth",
        "fig4": "Fig. 4 accuracy curves", "fig5": "Fig. 5 ROC curves",
        "reliability": "Reliability diagram", "series_roc": "Series ROC",
        "fig6": "Fig. 6 rater Jaccard indices", "fig3": "Fig. 3 activation maps",
    }  # fmt: skip
    return render(
        "run.md.j2",
        result=result,
        label=run_label(result),
        facts=facts,
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        metrics_link=rel(run_dir / "metrics.json", base),
        splits=splits_table(run_dir),
        label_counts={
            s: ", ".join(f"{pretty_class(k)} {v}" for k, v in sp["label_counts"].items())
            for s, sp in result["splits"].items()
        },
        metric_tables={
            s: table(METRIC_HEADER, reference_rows(sp, names[0]))
            for s, sp in result["splits"].items()
        },
        split_name=split_name,
        per_class=table(["class", "precision", "recall", "F1", "support"], per_class),
        confusion_labels=confusion_md(m, names),
        confusion_truth=confusion_md(truth, names) if truth and truth["n"] else None,
        history=result.get("history") or {},
        calibration=calibration_md(result.get("calibration")),
        operating_point=operating_point_md(result.get("operating_point")),
        real_anatomy=real_anatomy_md(result.get("real_anatomy")),
        real_anatomy_unseen=(
            None
            if result.get("real_anatomy_unseen") is None
            else real_anatomy_md(result["real_anatomy_unseen"])
        ),
        raters=rater_md(split.get("raters")),
        jaccard=jaccard_md(jac) if jac is not None else None,
        fig6_source=fig6_source,
        label_noise=label_noise_md(result["label_noise"]),
        change=result.get("activation_change"),
        images={k: image(figs.get(k), a, base) for k, a in alt.items()},
        notes=notes,
    )


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
    out = None if out is None else Path(out)
    path, _, _ = build_run_report(Path(run_dir), manifest, out, images)
    return path
