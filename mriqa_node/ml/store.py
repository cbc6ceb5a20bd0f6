"""Installed model artifacts and the pointer to the one in use.

``mriqa model install PATH`` checks an artifact, copies it under ``<models dir>/installed/`` and
then atomically rewrites ``<models dir>/current``; a running node notices the new pointer, loads
and warms the new model beside the old one, and swaps it in between two batches (no downtime).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mriqa_node.ml.artifact import META_FILE, MODEL_FILE, OOD_FILE, ArtifactMeta, read_meta

POINTER = "current"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def install(self, source: Path) -> tuple[Path, ArtifactMeta]:
        """Validate (hash, preprocessing version, contract), copy, and make it current."""
        meta = read_meta(source)
        target = self.root / "installed" / f"{meta.name}-{meta.version}-{meta.sha256[:12]}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".installing-"))
            for name in (MODEL_FILE, META_FILE, OOD_FILE, "MODEL_CARD.md"):
                if (Path(source) / name).is_file():
                    shutil.copy2(Path(source) / name, staging / name)
            read_meta(staging)  # the copy is intact too
            os.replace(staging, target)
        self._point_to(target)
        return target, meta

    def current(self) -> Path | None:
        pointer = self.root / POINTER
        if not pointer.is_file():
            return None
        target = self.root / "installed" / pointer.read_text().strip()
        return target if (target / "model.json").is_file() else None

    def _point_to(self, target: Path) -> None:
        tmp = self.root / f".{POINTER}.tmp"
        tmp.write_text(target.name + "\n")
        os.replace(tmp, self.root / POINTER)
