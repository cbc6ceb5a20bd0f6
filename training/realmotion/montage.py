"""A picture of a corrupted real-anatomy set: per subject one slice at each motion level, with
its measured severity and true class, as a reader would look at them (the node's own
preprocessing and window)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw

from mriqa_node.preprocess import preprocess

LEVEL_ORDER = ("clean", "mild", "moderate", "heavy")
CLASS_NAMES = {0: "non-diag", 1: "diagnostic", 2: "excellent"}


def write_montage(data_dir: Path | str, out: Path | str, tile: int = 160, rows: int = 8) -> Path:
    """PNG of up to ``rows`` subjects x the motion levels, from ``corruption.csv``."""
    data = Path(data_dir)
    with (data / "corruption.csv").open(newline="") as fh:
        table = list(csv.DictReader(fh))
    by_source: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in table:
        by_source[(row["subject"], row["source"])].append(row)
    picks: dict[str, dict[str, dict]] = {}
    for (subject, _), rows_ in by_source.items():
        if subject in picks:
            continue  # one series per subject
        slices = sorted({int(r["slice"]) for r in rows_})
        middle = slices[len(slices) // 2]
        picks[subject] = {}
        for r in rows_:
            if int(r["slice"]) == middle:
                picks[subject].setdefault(r["level"], r)
    subjects = [s for s in sorted(picks) if sum(lv in picks[s] for lv in LEVEL_ORDER) >= 2]
    subjects = subjects[:rows]
    canvas = Image.new("L", (tile * len(LEVEL_ORDER), tile * max(1, len(subjects))), 0)
    draw = ImageDraw.Draw(canvas)
    for i, subject in enumerate(subjects):
        for j, level in enumerate(LEVEL_ORDER):
            row = picks[subject].get(level)
            if row is None:
                continue
            x = preprocess(pydicom.dcmread(data / row["path"]), tile)[0, ..., 0]
            canvas.paste(Image.fromarray(np.uint8(np.clip(x, 0, 1) * 255)), (j * tile, i * tile))
            label = f"{level} s={float(row['severity']):.2f} {CLASS_NAMES[int(row['true_class'])]}"
            draw.text((j * tile + 3, i * tile + 2), label, fill=255)
        draw.text((3, i * tile + tile - 12), subject[:28], fill=200)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
