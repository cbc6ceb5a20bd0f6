"""Leave-one-source-out: the honest generalisation figure of a training recipe.

For each real source k: train the recipe on everything but k (phantoms included), fit the
temperature and choose the series operating point on the validation subjects (never k), then
evaluate on k alone with ``training.realeval``. One row per source; every source must hold, so
the table gives each, not a mean. On a CPU this runs at reduced size and steps (say so when
quoting it: the figures are a lower bound for the full-size recipe).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from training.export import plan_policy
from training.realeval import evaluate_real, pooled, read_corruption, table
from training.train import PREDICTIONS_FILE, TrainConfig

log = logging.getLogger(__name__)


def run_loso(
    base: TrainConfig,
    corruption: Sequence[Path | str],
    sources: Mapping[str, Sequence[str]],
    val_patients: Sequence[str],
    out_dir: Path | str,
    sensitivity: float = 0.90,
    max_false_alerts: float = 0.05,
    eval_data: Sequence[Path | str] = (),
    seeds: int = 1,
) -> dict[str, Any]:
    """Train one run per source (``sources``: name -> patient patterns held out as test) and
    write ``loso.json`` and ``loso.md`` under ``out_dir``. ``eval_data``: other `corrupt`
    output folders of the same subjects (another seed, more copies, paired looks): each fold is
    also scored on its held-out subjects there, a second table with less luck in it. ``seeds``
    above 1: each fold is that many runs (seeds 0 to seeds - 1) merged into one model, as the
    bundle recipe makes it (training.ensemble). Finished runs are not trained again, so a
    table can be extended afterwards (another data set, more seeds)."""
    from fnmatch import fnmatchcase

    from training.ensemble import train_seeds

    out = Path(out_dir)
    rows = read_corruption(corruption)
    per_source: dict[str, Any] = {}
    per_source_eval: dict[str, Any] = {}
    if eval_data:
        from training.manifest import read_manifest

        eval_records = [r for d in eval_data for r in read_manifest(Path(d) / "manifest.csv")]
        eval_rows = read_corruption([Path(d) / "corruption.csv" for d in eval_data])
    for name, patterns in sources.items():
        val = [v for v in val_patients if not any(fnmatchcase(v, p) for p in patterns)]
        config = replace(base, out_dir=out / name, test_patients=tuple(patterns),
                         val_patients=tuple(val), fractions=(1.0, 0.0, 0.0))  # fmt: skip
        _, run = train_seeds(config, seeds)
        preds = dict(np.load(run / PREDICTIONS_FILE))
        plan = plan_policy(preds, sensitivity, max_false_alerts)
        result = evaluate_real(preds, "test", rows, plan.policy,
                               plan.calibration["temperature"])  # fmt: skip
        for subject, figures in result.items():
            per_source[f"{name}: {subject}"] = figures
        log.info("LOSO %s: %s", name, result)
        if eval_data:
            again = _on_other_data(run, eval_records, eval_rows, patterns, plan)
            per_source_eval |= {f"{name}: {k}": v for k, v in again.items()}
    summary = {
        "recipe": base.to_json(),
        "seeds": seeds,
        "per_source": per_source,
        "pooled": pooled(per_source),
        "sensitivity_target": sensitivity,
        "max_false_alerts": max_false_alerts,
    }
    if eval_data:
        summary |= {"eval_data": [str(d) for d in eval_data], "per_source_eval": per_source_eval,
                    "pooled_eval": pooled(per_source_eval)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [
        "# Leave-one-source-out",
        "",
        f"Recipe: {base.model} widths {list(base.widths)}, downsample {base.downsample},"
        f" head {base.head}, {base.steps} steps at batch {base.batch}"
        + (f", {seeds} seeds merged" if seeds > 1 else "")
        + ". Each row: trained without that source, evaluated on it alone.",
        "",
        *table(per_source),
    ]
    if eval_data:
        lines += ["", f"The same folds on {', '.join(map(str, eval_data))} (their held-out"
                  " subjects only):", "", *table(per_source_eval)]  # fmt: skip
    (out / "loso.md").write_text("\n".join(lines) + "\n")
    return summary


def _on_other_data(run: Path, records: Sequence[Any], rows: Mapping[str, Mapping[str, str]],
                   patterns: Sequence[str], plan: Any) -> dict[str, Any]:  # fmt: skip
    """A fold's figures on its held-out subjects among other corrupted records."""
    from fnmatch import fnmatchcase

    from training.manifest import write_manifest
    from training.realeval import predict_real

    held_out = [r for r in records if any(fnmatchcase(r.patient_id, p) for p in patterns)]
    if not held_out:
        return {}
    manifest = write_manifest(held_out, run / "eval_data.csv")
    preds = dict(np.load(predict_real(run, manifest, progress=False)))
    return evaluate_real(preds, "real", rows, plan.policy, plan.calibration["temperature"])
