"""The synthetic data set: subjects in parallel, DICOM files, manifest.csv and summary.json.

Each subject is computed from its own random streams, seeded from (seed, subject index) only,
so the result is identical whatever the number of worker processes and whatever order they
finish in. Per subject: habitus and anatomy, an FSE acquisition protocol, a breathing trace
and possibly bulk motion over the real acquisition timeline (slices interleaved within
packages, so neighbouring slices see different breathing phases), k-space corruption, noise,
true severity from the image error, and the labels of two simulated raters.
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

from training.evaluate import cohen_kappa, jaccard_matrix
from training.manifest import BASE_COLUMNS, TAIL_COLUMNS

from .anatomy import coil_field, draw_subject, render_series
from .dicom import MAX_VALUE, SeriesInfo, uids, write_series
from .motion import (
    Acquisition,
    Breathing,
    BulkMotion,
    SliceMotion,
    anterior_weight,
    fft2,
    ifft2,
    motion_kspace,
    severity_from_error,
    steady,
)
from .raters import TRUTH_THRESHOLDS, classify, rate

__all__ = ["MANIFEST_COLUMNS", "SynthConfig", "generate"]

MANIFEST_COLUMNS = (*BASE_COLUMNS, "rater1", "rater2", *TAIL_COLUMNS)  # the manifest contract
SIGNAL_SCALE = 1400.0  # stored value of subcutaneous fat at the coil-field centre
_STREAM_TAG = 0x53594E54  # "SYNT": separates these streams from any other use of the seed


@dataclass(frozen=True)
class SynthConfig:
    """Size and mix of the synthetic data set; the defaults mimic the paper's data."""

    subjects: int = 69
    slices_per_subject: tuple[int, int] = (26, 35)  # per-subject random count in this range
    size: int = 512
    seed: int = 0
    workers: int = 0  # 0: os.cpu_count()
    # Share of subjects who breathe freely with a visible excursion (the rest lie still or
    # were triggered well and show at most faint ghosts); tuned so that the class mix is
    # close to the paper's 518 / 1220 / 372 (non-diagnostic / diagnostic / excellent).
    motion_fraction: float = 0.9


def generate(config: SynthConfig, out_dir: Path, progress: bool = True) -> Path:
    """Write out_dir/dicom/<patient_id>/<series_uid>/IM0001.dcm ..., out_dir/manifest.csv,
    out_dir/summary.json; return the manifest path."""
    lo, hi = config.slices_per_subject
    if config.subjects < 1 or lo < 1 or hi < lo:
        raise ValueError("need subjects >= 1 and 1 <= slices_per_subject[0] <= [1]")
    if config.size < 32:
        raise ValueError("size must be >= 32")
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
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety, never a reason to fail
        return _NoBar()
    return tqdm(total=total, unit="subject", desc="synth")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


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
    """One subject end to end: protocol, anatomy, motion over the acquisition timeline,
    k-space acquisition of every slice (noise-free for the severity, noisy for the file),
    DICOM series and manifest rows. Five independent random streams (anatomy, protocol,
    motion, noise, raters) keep e.g. the anatomy unchanged when the motion model changes."""
    streams = np.random.SeedSequence([config.seed, index, _STREAM_TAG]).spawn(5)
    r_anat, r_acq, r_mot, r_noise, r_rate = (np.random.default_rng(s) for s in streams)
    size = config.size
    sub = draw_subject(r_anat)

    # --- protocol --------------------------------------------------------------------------
    lo, hi = config.slices_per_subject
    n = int(r_acq.integers(lo, hi + 1))
    thickness = float(r_acq.choice([5.0, 6.0, 6.0, 7.0]))
    spacing = thickness + round(float(r_acq.uniform(0.5, 2.0)), 1)
    etl = int(r_acq.choice([12, 16, 16, 20]))
    etl = max(2, min(etl, size // 16))
    n_pe = max(etl * 2, etl * round(size * float(r_acq.choice([0.5, 0.5625, 0.625])) / etl))
    n_ro = round(size * float(r_acq.choice([0.625, 0.75])))
    nex = int(r_acq.choice([1, 2, 2, 3]))
    te_s = float(r_acq.uniform(0.08, 0.105))  # effective TE: the k-space centre's echo
    acq = Acquisition(
        size=size,
        n_pe=n_pe,
        n_ro=n_ro,
        etl=etl,
        tr_s=float(r_acq.uniform(3.0, 5.0)),
        esp_s=te_s / max(etl // 2, 1),
        nex=nex,
    )
    pixel_mm = sub.fov_mm / size

    # --- anatomy: one extra slice above the slab, for through-plane motion -----------------
    zeta_top = float(r_acq.uniform(0.95, 1.06))
    zetas = zeta_top - (np.arange(n + 1) - 1) * spacing / sub.anat_len_mm
    anat = render_series(sub, zetas, size)
    anat.image *= coil_field(sub, size)[None]

    # --- motion over the acquisition timeline ------------------------------------------------
    per_tr = max(1, int(acq.tr_s / (etl * acq.esp_s + 0.03)))
    packages = -(-n // per_tr)
    package_s = acq.shots * nex * acq.tr_s
    duration = packages * package_s
    # Scalars first, then the trace and the events from their own streams, so that no motion
    # parameter depends on how many random numbers the trace of this protocol needed.
    trace_ss, bulk_ss = np.random.SeedSequence([config.seed, index, _STREAM_TAG, 1]).spawn(2)
    breather = r_mot.random() < config.motion_fraction
    if breather:
        amp_mm = float(np.clip(np.exp(r_mot.normal(np.log(3.5), 0.5)), 0.8, 25.0))
    else:
        amp_mm = float(r_mot.uniform(0.0, 1.5))
    period, irregular = float(r_mot.uniform(3.2, 6.0)), float(r_mot.uniform(0.05, 0.35))
    restless = r_mot.random() < (0.3 if breather else 0.1)
    events = 1 + int(r_mot.poisson(0.8)) if restless else 0
    shift_mm, rot_deg = float(r_mot.uniform(1.0, 4.0)), float(r_mot.uniform(0.5, 3.0))
    si_ratio = float(r_mot.uniform(1.0, 2.0))  # organ SI excursion / anterior wall excursion
    trace = Breathing.draw(duration, np.random.default_rng(trace_ss), period, irregular)
    bulk = BulkMotion.draw(
        duration, np.random.default_rng(bulk_ss), events, shift_mm / pixel_mm, rot_deg
    )
    slice_gain = np.exp(0.25 * r_mot.standard_normal(n))
    noise_sigma = 1.0 / float(r_noise.uniform(22.0, 55.0))  # fat SNR 22..55
    wpe, wro = acq.window()
    window = wpe[:, None] * wro[None, :]
    noise_scale = noise_sigma * size * size / float(np.sqrt(np.sum(window**2)))
    acquired = window > 0

    per_package = -(-n // packages)
    images = np.empty((n, size, size), np.float32)
    severity = np.empty(n)
    cav_above_k = None
    for j in range(n + 1):
        clean = anat.image[j]
        ant = anterior_weight(anat.body[j])
        cav_w = anat.cavity[j] * (0.3 + 0.7 * ant)
        cav_k = fft2(clean * cav_w)
        if j == 0:  # the slice above the slab only lends its content
            cav_above_k = cav_k
            continue
        i = j - 1
        package, slot = i % packages, i // packages
        order = (slot // 2) if slot % 2 == 0 else (per_package + 1) // 2 + slot // 2  # interleaved
        times = acq.times(package * package_s + order * acq.tr_s / per_package)
        d = trace.at(times)
        amp_px = amp_mm / pixel_mm * (0.6 + 0.5 * float(np.clip(zetas[j], 0, 1))) * slice_gain[i]
        motion = SliceMotion(
            wall_px=-amp_px * d,
            cav_px=-0.3 * amp_px * d,
            through=np.clip(si_ratio * amp_px * pixel_mm * d / spacing, 0.0, 1.0),
            pose=bulk.index(times),
            bulk=bulk,
        )
        clean_k = fft2(clean)
        wall_k = fft2(clean * (anat.body[j] - anat.cavity[j]).clip(0, 1) * ant)
        k = motion_kspace(clean, clean_k, motion, wall_k, cav_k, cav_above_k)
        still = motion_kspace(clean, clean_k, steady(motion, wpe), wall_k, cav_k, cav_above_k)
        cav_above_k = cav_k
        ref = np.abs(ifft2(still * window))  # magnitude: Gibbs undershoots fold up too
        k *= window
        moved = ifft2(k)
        err = float(np.linalg.norm(np.abs(moved) - ref) / max(np.linalg.norm(ref), 1e-12))
        severity[i] = float(severity_from_error(err))
        noise = np.zeros((size, size), np.complex64)
        count = int(np.count_nonzero(acquired))
        draw = r_noise.standard_normal((2, count), dtype=np.float32) * np.float32(noise_scale)
        noise[acquired] = (draw[0] + 1j * draw[1]) * window[acquired]
        moved += ifft2(noise)
        images[i] = np.abs(moved)

    # --- store ------------------------------------------------------------------------------
    gain = SIGNAL_SCALE * float(r_acq.uniform(0.8, 1.2))
    pixels = np.clip(np.rint(images * gain), 0, MAX_VALUE).astype(np.uint16)
    body = anat.body[1:, ::4, ::4] > 0.5
    sample = pixels[:, ::4, ::4][body]
    lo_v, hi_v = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, MAX_VALUE)
    window_cw = ((lo_v + hi_v) / 2.0, max(hi_v - lo_v, 2.0))
    pid = f"SYN{index + 1:04d}"
    study_uid, series_uid, _ = uids(config.seed, index)
    male = r_acq.random() < 0.5
    info = SeriesInfo(
        seed=config.seed,
        index=index,
        patient_id=pid,
        sex="M" if male else "F",
        age_years=int(r_acq.integers(19, 76)),
        weight_kg=55.0 + 55.0 * sub.obesity + (10.0 if male else 0.0),
        height_m=float(r_acq.uniform(1.58, 1.9) + (0.06 if male else 0.0)),
        fov_mm=sub.fov_mm,
        thickness_mm=thickness,
        spacing_mm=spacing,
        n_pe=n_pe,
        n_ro=n_ro,
        etl=etl,
        tr_ms=acq.tr_s * 1000.0,
        te_ms=te_s * 1000.0,
        nex=nex,
        field_t=sub.field_t,
    )
    series_dir = out_dir / "dicom" / pid / series_uid
    written = write_series(info, pixels, series_dir, window_cw)
    r1 = rate(severity, 1, r_rate)
    r2 = rate(severity, 2, r_rate)
    truth = classify(severity)
    return [
        {
            "path": path.relative_to(out_dir).as_posix(),
            "patient_id": pid,
            "study_uid": study_uid,
            "series_uid": series_uid,
            "sop_instance_uid": sop,
            "instance": i + 1,
            "rater1": int(r1[i]),
            "rater2": int(r2[i]),
            "severity": f"{severity[i]:.4f}",
            "true_class": int(truth[i]),
        }
        for i, (path, sop) in enumerate(written)
    ]


def _round(value: float | None) -> float | None:
    """Kappa is undefined (None) when a rater used one class only."""
    return None if value is None else round(value, 4)
