"""The synthetic data set: subjects in parallel, DICOM files, manifest.csv and summary.json.

Each subject is acquired by the phantom core (``mriqa_node.phantom.scan``, shared with the demo
scanner) from random streams keyed by (seed, subject index) only, so the result is identical
whatever the number of worker processes and whatever order they finish in. This module adds
what makes it a data set: how many slices and how much motion each subject gets, domain
randomisation at the configured strength, the true severity of every slice, the labels of two
simulated raters, the manifest and a summary.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mriqa_node.phantom import Header, MotionPlan, datasets, scan, stream, uid, write_series
from training.evaluate import cohen_kappa, jaccard_matrix
from training.manifest import BASE_COLUMNS, TAIL_COLUMNS

from .raters import TRUTH_THRESHOLDS, classify, rate

__all__ = ["MANIFEST_COLUMNS", "SynthConfig", "generate"]

MANIFEST_COLUMNS = (*BASE_COLUMNS, "rater1", "rater2", *TAIL_COLUMNS)  # the manifest contract
_STREAM_TAG = 0x53594E54  # "SYNT": separates these streams from any other use of the seed
# Median anterior-wall excursion of the free breathers. With full domain randomisation the moving
# wall is less often the brightest tissue (fainter ghosts): 7 mm puts the default set's class mix
# at the paper's (3.5 mm did so for the reference T2 look alone).
BREATHING_MEDIAN_MM = 7.0


@dataclass(frozen=True)
class SynthConfig:
    """Size and mix of the synthetic data set; the defaults mimic the paper's data."""

    subjects: int = 69
    slices_per_subject: tuple[int, int] = (26, 35)  # per-subject random count in this range
    size: int = 512
    seed: int = 0
    workers: int = 0  # 0: os.cpu_count()
    # Share of subjects who breathe freely with a visible excursion (the rest lie still or
    # were triggered well and show at most faint ghosts); with BREATHING_MEDIAN_MM tuned so
    # that the class mix is close to the paper's 518 / 1220 / 372 (non-diagnostic /
    # diagnostic / excellent) at the default randomise.
    motion_fraction: float = 0.9
    # Domain randomisation strength (mriqa_node.phantom.randomise): 0 every subject has the
    # reference T2 look, 1 tissue contrasts, textures, edges, resolution, bias field and noise
    # are fully random.
    randomise: float = 1.0


def generate(config: SynthConfig, out_dir: Path, progress: bool = True) -> Path:
    """Write out_dir/dicom/<patient_id>/<series_uid>/IM0001.dcm ..., out_dir/manifest.csv,
    out_dir/summary.json; return the manifest path."""
    lo, hi = config.slices_per_subject
    if config.subjects < 1 or lo < 1 or hi < lo:
        raise ValueError("need subjects >= 1 and 1 <= slices_per_subject[0] <= [1]")
    if config.size < 32:
        raise ValueError("size must be >= 32")
    if not 0.0 <= config.randomise <= 1.0:
        raise ValueError("randomise must be within [0, 1]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = config.workers or os.cpu_count() or 1
    workers = max(1, min(workers, config.subjects))
    start = time.perf_counter()
    results: list[list[dict] | None] = [None] * config.subjects
    bar = _bar(config.subjects, progress)
    if workers == 1:
        for i in range(config.subjects):
            results[i] = _subject(config, i, str(out_dir))
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
            futures = {
                pool.submit(_subject, config, i, str(out_dir)): i for i in range(config.subjects)
            }
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    bar.close()
    rows = [row for subject in results for row in (subject or [])]
    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    summary = _summary(config, rows, time.perf_counter() - start, workers)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return manifest


def _context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (POSIX, no other Python threads): fast, and callers need no
    ``if __name__ == "__main__"`` guard; spawn otherwise (no inherited threads or locks)."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="subject", desc="synth", disable=not enabled)


def _summary(config: SynthConfig, rows: list[dict], seconds: float, workers: int) -> dict:
    r1 = np.array([r["rater1"] for r in rows], np.int64)
    r2 = np.array([r["rater2"] for r in rows], np.int64)
    truth = np.array([r["true_class"] for r in rows], np.int64)
    sev = np.array([float(r["severity"]) for r in rows])
    mean = np.floor((r1 + r2) / 2.0 + 0.5).astype(np.int64)  # as training.manifest's "mean"

    def counts(labels: np.ndarray) -> dict[str, int]:
        return {str(c): int(np.count_nonzero(labels == c)) for c in (0, 1, 2)}

    return {
        "subjects": config.subjects,
        "slices": len(rows),
        "size": config.size,
        "seed": config.seed,
        "config": asdict(config),
        "workers": workers,
        "class_counts": {
            "rater1": counts(r1),
            "rater2": counts(r2),
            "rater_mean": counts(mean),
            "truth": counts(truth),
        },
        "kappa_rater1_rater2": _round(cohen_kappa(r1, r2)),
        "kappa_rater1_truth": _round(cohen_kappa(r1, truth)),
        "kappa_rater2_truth": _round(cohen_kappa(r2, truth)),
        "jaccard_rater1_rater2": np.round(np.nan_to_num(jaccard_matrix(r1, r2)), 3).tolist(),
        "truth_thresholds": list(TRUTH_THRESHOLDS),
        "severity_quantiles": {
            str(q): round(float(np.quantile(sev, q)), 4) for q in (0.1, 0.25, 0.5, 0.75, 0.9)
        }
        if len(sev)
        else {},
        "seconds": round(seconds, 2),
    }


def _threads_one():
    """Single-threaded BLAS inside a subject: bit-identical results in every process, and no
    oversubscription when several workers share the cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1)


def _subject(config: SynthConfig, index: int, out_dir: str) -> list[dict]:
    with _threads_one():
        return _subject_impl(config, index, Path(out_dir))


def _subject_impl(config: SynthConfig, index: int, out_dir: Path) -> list[dict]:
    """One subject end to end: slice count and motion plan, the acquisition with true
    severities, the DICOM series and its manifest rows."""
    key = (config.seed, index, _STREAM_TAG)
    lo, hi = config.slices_per_subject
    n = int(stream(key, "slices").integers(lo, hi + 1))
    plan = _motion_plan(stream(key, "plan"), config.motion_fraction)
    result = scan(key, n, config.size, plan, config.randomise, severity=True)
    pid = f"SYN{index + 1:04d}"
    header = Header(
        patient_id=pid,
        patient_name=f"SYNTHETIC^{pid}",
        study_uid=uid("synth-study", config.seed, index),
        series_uid=uid("synth-series", config.seed, index),
        frame_uid=uid("synth-frame-of-reference", config.seed, index),
        series_number=3,
        series_description="T2 FSE AX",
    )
    series = datasets(header, result)
    paths = write_series(series, out_dir / "dicom" / pid / header.series_uid)
    severity = result.severity
    raters = stream(key, "raters")
    r1, r2 = rate(severity, 1, raters), rate(severity, 2, raters)
    truth = classify(severity)
    return [
        {
            "path": path.relative_to(out_dir).as_posix(),
            "patient_id": pid,
            "study_uid": header.study_uid,
            "series_uid": header.series_uid,
            "sop_instance_uid": ds.SOPInstanceUID,
            "instance": i + 1,
            "rater1": int(r1[i]),
            "rater2": int(r2[i]),
            "severity": f"{severity[i]:.4f}",
            "true_class": int(truth[i]),
        }
        for i, (path, ds) in enumerate(zip(paths, series, strict=True))
    ]


def _motion_plan(rng: np.random.Generator, motion_fraction: float) -> MotionPlan:
    """How one subject of the data set moves: most breathe freely (log-normal excursion), the
    rest lie still or were triggered well; some are restless (bulk rigid moves)."""
    breather = rng.random() < motion_fraction
    if breather:
        amp_mm = float(np.clip(np.exp(rng.normal(np.log(BREATHING_MEDIAN_MM), 0.5)), 0.8, 25.0))
    else:
        amp_mm = float(rng.uniform(0.0, 1.5))
    restless = rng.random() < (0.3 if breather else 0.1)
    return MotionPlan(
        amp_mm=amp_mm,
        period_s=float(rng.uniform(3.2, 6.0)),
        irregular=float(rng.uniform(0.05, 0.35)),
        si_ratio=float(rng.uniform(1.0, 2.0)),  # organ SI excursion / anterior wall excursion
        events=1 + int(rng.poisson(0.8)) if restless else 0,
        shift_mm=float(rng.uniform(1.0, 4.0)),
        rot_deg=float(rng.uniform(0.5, 3.0)),
    )


def _round(value: float | None) -> float | None:
    """Kappa is undefined (None) when a rater used one class only."""
    return None if value is None else round(value, 4)
