"""A montage of generated slices per true class, so a person can judge realism at a glance.

Images are shown exactly as the model sees them: read from the DICOM files and passed through
the node's ``preprocess`` (header window, [0, 1]). Titles give the true severity and both
simulated raters' labels.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom

from mriqa_node.preprocess import preprocess

__all__ = ["montage"]

CLASS_NAMES = {0: "non-diagnostic", 1: "diagnostic", 2: "excellent"}


def montage(
    manifest: Path, out_png: Path, per_class: int = 4, seed: int = 0, display_size: int = 256
) -> Path:
    """Save a (3 classes x ``per_class``) grid of examples by true class as a PNG.

    Examples span each class's severity range (mildest left, worst right) and come from
    different subjects where possible; the choice is deterministic for a given ``seed``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = Path(manifest)
    with manifest.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(3, per_class, figsize=(2.6 * per_class, 2.9 * 3), squeeze=False)
    for r, cls in enumerate((0, 1, 2)):
        pool = [row for row in rows if int(row["true_class"]) == cls]
        picked = _spread(pool, per_class, rng)
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picked):
                ax.set_axis_off()
                continue
            row = picked[c]
            ds = pydicom.dcmread(manifest.parent / row["path"])
            img = preprocess(ds, size=display_size)[0, :, :, 0]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="lanczos")
            ax.set_title(
                f"{row['patient_id']} #{row['instance']}  sev {float(row['severity']):.2f}\n"
                f"truth {cls}  rater1 {row['rater1']}  rater2 {row['rater2']}",
                fontsize=8,
            )
            if c == 0:
                ax.set_ylabel(f"{cls}: {CLASS_NAMES[cls]}", fontsize=10)
    fig.suptitle(
        "Synthetic axial FSE abdomen (domain-randomised) by true class (phase encoding vertical)",
        fontsize=11,
    )
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _spread(pool: list[dict], k: int, rng: np.random.Generator) -> list[dict]:
    """Up to k rows spanning the class's severity range (one per severity quantile bin), from
    different patients where possible, so the montage shows the class's mildest and worst."""
    rows = sorted(pool, key=lambda r: float(r["severity"]))
    picked: list[dict] = []
    used: set[str] = set()
    for b in range(min(k, len(rows))):
        part = rows[b * len(rows) // k : max((b + 1) * len(rows) // k, b * len(rows) // k + 1)]
        fresh = [r for r in part if r["patient_id"] not in used] or part
        row = fresh[int(rng.integers(len(fresh)))]
        picked.append(row)
        used.add(row["patient_id"])
    return picked
