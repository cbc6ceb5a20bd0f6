"""Installed model artifacts, the pointer to the one in use, and a shadow candidate.

``mriqa model install PATH`` checks an artifact, copies it under ``<models dir>/installed/`` and
then atomically rewrites ``<models dir>/current``; a running node notices the new pointer, loads
and warms the new model beside the old one, and swaps it in between two batches (no downtime).
With ``--shadow`` the pointer written is ``shadow`` instead: the node scores every in-scope
slice with that candidate too and keeps its verdicts apart; it never alerts. ``promote`` makes
the shadow current, ``rollback`` returns to the model that was current before; every change of
the pointers is a line in ``history.jsonl`` (who, why, when, from what to what).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mriqa_node.ml.artifact import META_FILE, MODEL_FILE, OOD_FILE, ArtifactMeta, read_meta

POINTER = "current"
SHADOW = "shadow"
HISTORY = "history.jsonl"


class StoreError(RuntimeError):
    """A pointer change that cannot be made (nothing to promote, nothing to roll back to)."""


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def install(self, source: Path, shadow: bool = False, by: str | None = None,
                why: str | None = None) -> tuple[Path, ArtifactMeta]:  # fmt: skip
        """Validate (hash, preprocessing version, contract), copy, and make it current (or
        the shadow candidate)."""
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
        pointer = SHADOW if shadow else POINTER
        before = self._read(pointer)
        self._point(pointer, target.name)
        self._log("install-shadow" if shadow else "install", before, target.name, by, why)
        return target, meta

    def current(self) -> Path | None:
        return self._resolve(POINTER)

    def shadow(self) -> Path | None:
        return self._resolve(SHADOW)

    def promote(self, by: str | None = None, why: str | None = None) -> Path:
        """The shadow candidate becomes the current model (the guard is the caller's)."""
        candidate = self.shadow()
        if candidate is None:
            raise StoreError("no shadow model to promote (mriqa model install PATH --shadow)")
        before = self._read(POINTER)
        self._point(POINTER, candidate.name)
        (self.root / SHADOW).unlink()
        self._log("promote", before, candidate.name, by, why)
        return candidate

    def rollback(self, by: str | None = None, why: str | None = None) -> Path:
        """Back to the model that was current before the last install, promotion or
        rollback made another one current."""
        now = self._read(POINTER)
        for entry in reversed(self.history()):
            if entry["action"] in ("install", "promote", "rollback") and entry["to"] == now:
                previous = entry.get("from")
                target = self.root / "installed" / str(previous)
                if previous and (target / META_FILE).is_file():
                    self._point(POINTER, target.name)
                    self._log("rollback", now, target.name, by, why)
                    return target
                break
        raise StoreError("no earlier model to roll back to")

    def history(self) -> list[dict[str, Any]]:
        path = self.root / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _resolve(self, pointer: str) -> Path | None:
        name = self._read(pointer)
        if name is None:
            return None
        target = self.root / "installed" / name
        return target if (target / META_FILE).is_file() else None

    def _read(self, pointer: str) -> str | None:
        path = self.root / pointer
        return path.read_text().strip() or None if path.is_file() else None

    def _point(self, pointer: str, name: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{pointer}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / pointer)

    def _log(self, action: str, before: str | None, after: str, by: str | None,
             why: str | None) -> None:  # fmt: skip
        entry = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "action": action,
                 "from": before, "to": after, "by": by or _user(), "why": why}  # fmt: skip
        with (self.root / HISTORY).open("a") as fh:
            fh.write(json.dumps(entry) + "\n")


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # no passwd entry in a container
        return str(os.getuid())
