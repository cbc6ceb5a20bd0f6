"""Markdown sections of the reports made from metrics (tables and the sentences around them);
the templates place them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training import figures
from training.evaluate import CLASS_NAMES, SCALAR_KEYS
from training.report.text import num, pct, pp, pretty_class, run_label, signed, table


def splits_table(run_dir: Path) -> list[str]:
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
            parts[-1] = f"{last} {pretty_class(CLASS_NAMES['3class'][int(last)])}"
        elif last in figures.PRETTY_CLASS:
            parts[-1] = pretty_class(last)
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
    return table(["split"] + [col_name(c) for c in cols], rows)


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


def reference_rows(split: Mapping[str, Any], class0: str) -> list[list[str]]:
    def row(name: str, m: Mapping[str, Any] | None) -> list[str]:
        if not m:
            return [name, "—", "—", "—", "—", "—", "—", "—"]
        rec0 = (m.get("per_class", {}).get(class0) or {}).get("recall")
        return [
            name,
            str(m.get("n", "—")),
            pct(m.get("accuracy")),
            pct(m.get("balanced_accuracy")),
            num(m.get("auc")),
            num(m.get("kappa")),
            num(m.get("macro_f1")),
            pct(rec0),
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
                pct(mean.get("accuracy")),
                pct(mean.get("balanced_accuracy")),
                num(mean.get("auc")),
                num(mean.get("kappa")),
                num(mean.get("macro_f1")),
                "",
            ]
        )
    return rows


def confusion_md(m: Mapping[str, Any], names: Sequence[str]) -> list[str]:
    counts = m["confusion"]["counts"]
    norm = m["confusion"]["normalized"]
    header = ["reference \\ predicted"] + [pretty_class(n) for n in names]
    rows = [
        [pretty_class(names[i])]
        + [f"{counts[i][j]} ({pct(norm[i][j], 0)})" for j in range(len(names))]
        for i in range(len(names))
    ]
    return table(header, rows)


def label_noise_md(noise: Mapping[str, Any]) -> list[str]:
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
        fmt = pct if k in ("accuracy", "balanced_accuracy") else num
        dfmt = pp if k in ("accuracy", "balanced_accuracy") else signed
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
    lines += table(
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
        f"Training labels agree with the truth on {pct(q.get('accuracy_vs_truth'))} of these "
        f"images (κ {num(q.get('kappa_vs_truth'), 2)}).",
        "",
    ]
    if noise.get("raters"):
        rrows = []
        for name, r in noise["raters"].items():
            rrows.append(
                [
                    name,
                    pct(r.get("accuracy_vs_truth")),
                    num(r.get("kappa_vs_truth"), 2),
                    str(r.get("apparent_errors", "—")),
                    f"{r.get('apparent_errors_correct_vs_truth', '—')} "
                    f"({pct(r.get('apparent_errors_correct_fraction'), 0)})",
                ]
            )
        lines += table(
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


def rater_md(agreement: Mapping[str, Any] | None) -> list[str]:
    if not agreement or not agreement.get("pairs"):
        return ["_Fewer than two raters: no inter-rater agreement._", ""]
    lines = []
    for pair, a in agreement["pairs"].items():
        lines.append(
            f"- {pair.replace('~', ' vs ')}: {a['n']} images, agreement "
            f"{pct(a['agreement'])} (binary {pct(a['agreement_binary'])}), Cohen's κ "
            f"{num(a['kappa_3class'], 2)} (3-class), {num(a['kappa_binary'], 2)} (binary)"
        )
    return [*lines, ""]


def jaccard_md(j: Any) -> list[str]:
    j = np.asarray(j, dtype=float)
    names = [pretty_class(n) for n in CLASS_NAMES["3class"]]
    rows = [
        [f"rater 1: {names[i]}"] + ["n/a" if np.isnan(v) else f"{v:.2f}" for v in j[i]]
        for i in range(3)
    ]
    return table(["Jaccard"] + [f"rater 2: {n}" for n in names], rows)


def calibration_md(cal: Mapping[str, Any] | None) -> list[str]:
    if not cal:
        return ["_No val split: no temperature fitted._", ""]
    lines = [
        f"Temperature T = {num(cal['temperature'])}, fitted on the {cal['fitted_on']} split "
        f"(minimum NLL; logits: {cal['logits']}); the exported model divides its logits by T. "
        f"ECE: {cal['ece_method']}.",
        "",
    ]
    keys = ("ece_before", "ece_after", "nll_before", "nll_after")
    rows = [[name, s["n"], *(num(s[k]) for k in keys)] for name, s in cal["splits"].items()]
    return lines + table(["split", "n", "ECE before", "ECE after", "NLL before", "NLL after"], rows)


def operating_point_md(op: Mapping[str, Any] | None) -> list[str]:
    if not op:
        return ["_No series operating point: no series ids in predictions.npz, or see Notes._", ""]
    lines = [
        f"What `mriqa-train export` chooses with its defaults, on the calibrated val series: "
        f"sensitivity to non-diagnostic series >= {num(op['target_sensitivity'], 2)} with at "
        f"most {num(op['max_false_alerts'], 2)} of diagnostic series flagged. Slice threshold "
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
                    f"{num(r['sensitivity'])} ({r['n_flagged_positive']}/{r['n_positive']})",
                    f"{num(r['false_alert_rate'])} ({r['n_flagged_negative']}/{r['n_negative']})",
                ]
            )
    lines += table(["split", "series non-diag. / diag.", "sensitivity", "false-alert rate"], rows)
    return lines + [f"- {w}" for w in op["warnings"]] + ([""] if op["warnings"] else [])


def unseen_real_md(results: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]
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
        " clean series alerted | non-diagnostic series caught | heavy-level copies caught |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for n, per_source in rows.items():
        t = pooled(per_source)
        lines.append(
            f"| {labels[n]} | {len(per_source)} | {num(t['worst_auc_clean_vs_mild'], 3)} |"
            f" {num(t['worst_auc_clean_vs_heavy'], 3)} |"
            f" {t['clean_series_alerted']}/{t['clean_series']} |"
            f" {t['nondiag_series_caught']}/{t['nondiag_series']} |"
            f" {t['heavy_series_caught']}/{t['heavy_series']} |"
        )
    return lines


def noise_summary_md(summary: Mapping[str, Any], results: Mapping[str, Mapping[str, Any]]
                     ) -> list[str]:  # fmt: skip
    """The label-noise section of the summary (summary.noise_summary's numbers)."""
    if not summary.get("available"):
        return [
            "No run has ground truth (real data), so the cost of label noise cannot be "
            "measured; the inter-rater agreement above is the only handle on it.",
            "",
        ]
    per_run = {name: results[name]["label_noise"] for name in summary["runs"]}
    mean_cost = summary["mean_cost_vs_raters"]

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
            f"{pct(summary['mean_rater_accuracy_vs_truth'])} of test images on average"
            + (
                f", and {pct(summary['mean_apparent_errors_correct_fraction'], 0)} of the "
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
                pct(t["accuracy"]),
                pct(rm.get("accuracy")),
                pp(c["accuracy"]),
                num(t["auc"]),
                num(rm.get("auc")),
                signed(c["auc"]),
                num(t["kappa"]),
                num(rm.get("kappa")),
                signed(c["kappa"]),
            ]
        )
    lines += table(
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
    return lines
