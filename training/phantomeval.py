"""How a model artifact does on the demo scanner's phantoms: the series ``mriqa demo`` sends.

The node's verdict path (scope, OOD guard, series policy) over phantom series of several seeds
at each motion level, so a candidate bundled model can be checked against what the README
promises: the demo's clean series diagnostic, its motion series alerted.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mriqa_node.domain.verdict import SeriesPolicy
from mriqa_node.ml.scorer import Scorer
from mriqa_node.offline import score_files
from mriqa_node.phantom import synth_series


def phantom_verdicts(
    artifact: Path,
    seeds: Sequence[int],
    motions: Sequence[float],
    slices: int = 12,
    progress: bool = True,
) -> dict[float, Counter[str]]:
    """Counts of series verdicts per motion level, one series per seed and level, scored
    offline as ``mriqa score`` scores them."""
    scorer = Scorer(artifact)
    policy = SeriesPolicy.from_dict(scorer.meta.policy)
    counts: dict[float, Counter[str]] = {m: Counter() for m in motions}
    jobs = [(s, m) for s in seeds for m in motions]
    for seed, motion in tqdm(jobs, desc="phantoms", unit="series", disable=not progress):
        with tempfile.TemporaryDirectory() as tmp:
            files = []
            for i, ds in enumerate(synth_series(n_slices=slices, motion=motion, seed=seed)):
                files.append(Path(tmp) / f"{i:03d}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
            reports, _ = score_files(files, scorer, policy)
        counts[motion].update(r.verdict["label"] for r in reports)
    return counts
