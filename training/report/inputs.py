"""What the reports read besides a run's metrics: the manifest, a clean slice for Fig. 3, the
raters' labels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training import figures


def manifest_path(manifest: Any, config: Mapping[str, Any]) -> Path | None:
    cand = manifest if manifest is not None else config.get("manifest")
    if cand is None:
        return None
    p = Path(cand)
    return p if p.is_file() else None


def load_slice(path: str | Path, size: int = 512, frame: int = 0) -> np.ndarray:
    """One 2-D image in [0, 1]: .npy/.npz arrays, PNG/JPEG, else DICOM via the node's
    preprocessing (the same function training uses)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float32)
    elif suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("F"), dtype=np.float32)
        arr = arr / max(float(arr.max()), 1.0)
    else:
        import pydicom

        from mriqa_node.preprocess import preprocess

        arr = preprocess(pydicom.dcmread(path), size=size)
        arr = arr[min(frame, arr.shape[0] - 1)]
    arr = np.squeeze(arr)
    if arr.ndim == 3:  # a stack: take the requested frame
        arr = arr[min(frame, arr.shape[0] - 1)]
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def clean_slice_from_manifest(manifest: str | Path) -> tuple[np.ndarray, dict[str, str]]:
    """The cleanest slice of a manifest: true class 2 with the lowest severity if the truth is
    known, else one both raters call excellent, else the first row."""
    rows = figures.manifest_rows(manifest)
    if not rows:
        raise ValueError(f"{manifest} lists no images")

    def key(r: Mapping[str, str]) -> tuple[float, float, float]:
        true_cls = figures.int_or_missing(r.get("true_class"))
        r1 = figures.int_or_missing(r.get("rater1"))
        r2 = figures.int_or_missing(r.get("rater2"))
        try:
            sev = float(r.get("severity") or "inf")
        except ValueError:
            sev = float("inf")
        return (-(true_cls == 2), -(r1 == 2 and r2 == 2), sev)

    row = min(rows, key=key)
    p = Path(row["path"])
    if not p.is_absolute():
        p = Path(manifest).parent / p
    frame = figures.int_or_missing(row.get("frame"))
    return load_slice(p, frame=max(frame, 0)), row


def fig3_images(manifest: Any, config: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(clean, motion) for Fig. 3: the manifest's cleanest slice and the generator's motion."""
    path = manifest_path(manifest, config)
    if path is None:
        raise RuntimeError("no manifest to take a clean slice from (pass manifest= or images=)")
    clean, _ = clean_slice_from_manifest(path)
    return figures.motion_pair(clean, severity=0.8, seed=0)


def raters_all_splits(preds: Mapping[str, np.ndarray]) -> np.ndarray | None:
    parts = [preds[f"{s}_raters"] for s in ("val", "test") if f"{s}_raters" in preds]
    parts = [np.asarray(p).reshape(len(p), -1) for p in parts if len(p)]
    if not parts or min(p.shape[1] for p in parts) < 2:
        return None
    return np.concatenate([p[:, :2] for p in parts]).astype(np.int64)


def rater_columns(preds: Mapping[str, np.ndarray]) -> int:
    for s in ("test", "val"):
        r = preds.get(f"{s}_raters")
        if r is not None and len(r):
            return int(np.asarray(r).reshape(len(r), -1).shape[1])
    return 0
