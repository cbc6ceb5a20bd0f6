"""Writing run files so that a crash or a kill never leaves half of one (runs are resumable)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix: NumPy's savez keeps it); once the
    block has written it, it replaces ``path`` in one step (and is removed if the block fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def to_jsonable(obj: Any) -> Any:
    """numpy types -> Python, NaN/inf -> None, Paths -> str (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any, compact: bool = False) -> Path:
    """Strict JSON (see to_jsonable), indented unless ``compact``, written atomically."""
    layout = {"separators": (",", ":")} if compact else {"indent": 2}
    with replaced_atomically(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(data), allow_nan=False, **layout) + "\n")
    return Path(path)
