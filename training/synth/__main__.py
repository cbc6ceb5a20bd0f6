"""python -m training.synth OUT_DIR [options]: generate the synthetic data set (and a montage).

A thin convenience entry point; the project CLI (mriqa-train) may wrap ``generate`` as well.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .generate import SynthConfig, generate


def main(argv: list[str] | None = None) -> None:
    defaults = SynthConfig()
    ap = argparse.ArgumentParser(prog="python -m training.synth", description=__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--subjects", type=int, default=defaults.subjects)
    ap.add_argument(
        "--slices",
        type=int,
        nargs=2,
        default=list(defaults.slices_per_subject),
        metavar=("MIN", "MAX"),
    )
    ap.add_argument("--size", type=int, default=defaults.size)
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--workers", type=int, default=defaults.workers, help="0: all CPUs")
    ap.add_argument("--motion-fraction", type=float, default=defaults.motion_fraction)
    ap.add_argument(
        "--randomise",
        type=float,
        default=defaults.randomise,
        help="domain randomisation strength, 0 (reference T2 look) .. 1 (full)",
    )
    ap.add_argument("--montage", type=Path, help="also save a PNG montage of examples per class")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    config = SynthConfig(
        subjects=args.subjects,
        slices_per_subject=(args.slices[0], args.slices[1]),
        size=args.size,
        seed=args.seed,
        workers=args.workers,
        motion_fraction=args.motion_fraction,
        randomise=args.randomise,
    )
    manifest = generate(config, args.out_dir, progress=not args.quiet)
    summary = json.loads((manifest.parent / "summary.json").read_text())
    print(
        f"{manifest}: {summary['slices']} slices of {summary['subjects']} subjects in "
        f"{summary['seconds']:.0f} s; classes (0/1/2) truth {summary['class_counts']['truth']}, "
        f"kappa(rater1, rater2) {summary['kappa_rater1_rater2']:.2f}"
    )
    if args.montage:
        from .montage import montage

        print(montage(manifest, args.montage))


if __name__ == "__main__":
    main()
