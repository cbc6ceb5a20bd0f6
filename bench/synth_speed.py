"""Synthetic data generator speed: slices/s at 512x512 for 1 and 2 worker processes.

Generates the same small data set (default 4 subjects, seed 0) once per worker count into a
temporary directory, DICOM writing included, and extrapolates the wall time of the paper-sized
data set (69 subjects, about 2,111 slices) from the measured rate. Worker start-up is included,
so the rate for few subjects is slightly pessimistic.
Run: .venv/bin/python bench/synth_speed.py [--subjects 4] [--workers 1 2] [--size 512]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import machine_line, table

from training.synth import SynthConfig, generate

PAPER_SUBJECTS = 69
PAPER_SLICES = 2111


def run(subjects: int, workers: int, size: int, seed: int) -> tuple[int, float]:
    """(slices written, wall seconds) of one generation."""
    out = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    try:
        start = time.perf_counter()
        manifest = generate(
            SynthConfig(subjects=subjects, size=size, seed=seed, workers=workers),
            out,
            progress=False,
        )
        seconds = time.perf_counter() - start
        with manifest.open(newline="") as fh:
            slices = sum(1 for _ in csv.DictReader(fh))
        return slices, seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    print(machine_line())
    rows = []
    for workers in args.workers:
        slices, seconds = run(args.subjects, workers, args.size, args.seed)
        rate = slices / seconds
        rows.append(
            [
                workers,
                args.subjects,
                slices,
                f"{args.size}x{args.size}",
                round(seconds, 1),
                round(rate, 2),
                f"{PAPER_SLICES / rate / 60:.1f} min",
            ]
        )
    print(
        table(
            [
                "workers",
                "subjects",
                "slices",
                "size",
                "seconds",
                "slices/s",
                f"paper size ({PAPER_SUBJECTS} subj., {PAPER_SLICES} slices)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
