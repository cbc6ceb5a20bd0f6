"""The cross-run report beside the paper's numbers (summary.md.j2), with its metrics.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from training import figures
from training.evaluate import (
    SCALAR_KEYS,
    load_predictions,
    main_split,
    rater_agreement,
    rater_names_of,
)
from training.files import write_json
from training.report.inputs import fig3_images, manifest_path, rater_columns, raters_all_splits
from training.report.run import attempt, build_run_report, draw_roc
from training.report.sections import jaccard_md, noise_summary_md, rater_md, unseen_real_md
from training.report.text import (
    MODEL_ORDER,
    TASK_LABEL,
    TASK_ORDER,
    image,
    model_label,
    num,
    pct,
    rel,
    render,
    run_label,
    slug,
    table,
)

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


def summary_rows(
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
        paper = [pct(d["paper"]["accuracy"], 0), num(d["paper"]["auc"], 2)]
        if d["run"] is None:
            md.append(head + ["_no run_"] + ["—"] * 8 + paper)
            continue
        v, t, rm = d["vs_labels"], d["vs_truth"] or {}, d["vs_raters_mean"] or {}
        md.append(
            [
                *head,
                f"{d['run']} ({d['label'] or '—'})",
                str(d["n_test"]),
                pct(v["accuracy"]),
                pct(v["balanced_accuracy"]),
                num(v["auc"]),
                num(rm.get("kappa")),
                num(t.get("kappa")),
                pct(t.get("accuracy")),
                num(t.get("auc")),
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


def noise_summary(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The cost of label noise over the runs that know the truth (paper §4.3, quantified):
    metrics against one rater minus against the truth, and the raters' own accuracy."""
    per_run = {}
    for name, r in results.items():
        noise = r.get("label_noise") or {}
        if noise.get("available") and noise.get("cost_vs_raters"):
            per_run[name] = noise
    if not per_run:
        return {"available": False}
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
    return summary


def copy_file(src: Path, dst: Path) -> Path:

    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


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
        pair = attempt(notes, "Fig. 3", fig3_images, manifest, cfg0)

    results: dict[str, dict[str, Any]] = {}
    reports: dict[str, Path] = {}
    run_figs: dict[str, dict[str, Path]] = {}
    for rd in map(Path, run_dirs):
        try:
            path, result, rfigs = build_run_report(rd, manifest, None, pair)
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
        figs["fig4"] = attempt(
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
    figs["fig5"] = draw_roc(
        notes, panels, figdir,
        "Fig. 5 - ROC curves (binary: non-diagnostic positive; 3-class: one vs rest)",
    )  # fmt: skip

    first = next(iter(results.values()))
    mpath = manifest_path(manifest, first["config"])
    agreement = None
    jac = None
    if mpath is not None:
        src6: Any = mpath
        fig6_source = f"manifest `{mpath.name}` (all images)"
        r1, r2, _ = figures.rater_vectors(mpath)
        agreement = rater_agreement(np.stack([r1, r2], axis=1), ["rater1", "rater2"])
    else:
        preds = load_predictions(Path(first["run_dir"]))
        src6 = raters_all_splits(preds)
        fig6_source = f"the raters' labels of run {first['run']} (val + test; no manifest)"
        if src6 is not None:
            agreement = rater_agreement(src6, rater_names_of(preds, rater_columns(preds))[:2])
    if src6 is not None:
        r6 = attempt(notes, "Fig. 6", figures.fig6_rater_jaccard, src6, figdir / "fig6_jaccard.png")
        if r6 is not None:
            figs["fig6"], jac = r6

    for n in results:  # the run reports drew them: copy, do not redraw
        src = run_figs[n].get("fig7_labels")
        if src is not None:
            figs[f"fig7_{n}"] = copy_file(src, figdir / f"fig7_{slug(n)}.png")

    fig3_numbers: dict[str, Any] = {}
    chosen: dict[str, str] = {}
    for n, r in results.items():  # one run per model, preferring the binary task
        if "fig3" not in run_figs[n]:
            continue
        cur = chosen.get(r["model"])
        if cur is None or (results[cur]["task"] != "binary" and r["task"] == "binary"):
            chosen[r["model"]] = n
    for model_key, n in chosen.items():
        figs[f"fig3_{model_key}"] = copy_file(
            run_figs[n]["fig3"], figdir / f"fig3_{slug(model_key)}.png"
        )
        fig3_numbers[model_key] = results[n].get("activation_change")
    figs = {k: v for k, v in figs.items() if v is not None}

    table_data, table_md = summary_rows(results)
    noise = noise_summary(results)
    activation_rows = [
        [model_label(k), num(v and v.get("input"), 2), num(v and v.get("first"), 2),
         num(v and v.get("last"), 2)]
        for k, v in fig3_numbers.items()
    ]  # fmt: skip
    out.write_text(render(
        "summary.md.j2",
        generated=datetime.now(UTC).isoformat(timespec="seconds"),
        n_runs=len(results),
        results_table=table(SUMMARY_HEADER, table_md),
        paper=[{"model": m, "task": TASK_LABEL[t], **p} for (m, t), p in PAPER.items()],
        reports=[{"label": labels[n], "name": n, "link": rel(p, out_dir)}
                 for n, p in reports.items()],
        unseen_real=unseen_real_md(results, labels),
        raters=rater_md(agreement),
        jaccard=jaccard_md(jac) if jac is not None else None,
        fig6_source=fig6_source,
        confusions=[{"label": labels[n], "image": image(figs.get(f"fig7_{n}"),
                                                         f"Fig. 7 {labels[n]}", out_dir)}
                    for n in results],
        activation_table=(table(["model", "input", "first conv", "last conv"], activation_rows)
                          if activation_rows else None),
        activation_images=[image(figs.get(f"fig3_{k}"), f"Fig. 3 {model_label(k)}", out_dir)
                           for k in fig3_numbers],
        label_noise=noise_summary_md(noise, results),
        notes=notes,
        images={k: image(figs.get(k), a, out_dir) for k, a in (
            ("fig4", "Fig. 4 accuracy curves"), ("fig5", "Fig. 5 ROC curves"),
            ("fig6", "Fig. 6 rater Jaccard indices"))},
    ))  # fmt: skip

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
            "figures": {k: rel(v, out_dir) for k, v in figs.items()},
            "reports": {n: rel(p, out_dir) for n, p in reports.items()},
            "notes": notes,
        },
    )
    return out
