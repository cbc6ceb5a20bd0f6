"""Pictures of slices for people: thumbnails from the spooled DICOM, and Grad-CAM heat maps
showing where the model saw the artifact. Rendered on first request, then cached on disk
(spooled files never change; heat maps are keyed by the model's weights hash).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import Instance, Series, SliceScore
from mriqa_node.imaging import heatmap_png, montage_png, thumbnail_png
from mriqa_node.preprocess import (
    PREPROCESSING_VERSION,
    Unscorable,
    preprocess,
    turned,
)
from mriqa_node.spool import Spool

SIZES = (128, 192, 256, 512)


class SliceNotFound(LookupError):
    pass


class SliceImages:
    def __init__(
        self,
        reads: sessionmaker[Session],
        spool: Spool,
        cache_dir: Path,
        model_dir: Callable[[], Path],
    ) -> None:
        self.reads = reads
        self.spool = spool
        self.cache_dir = Path(cache_dir)
        self.model_dir = model_dir  # the artifact to explain with (the node's current model)
        self._mapper = None
        self._mapper_lock = threading.Lock()

    def _slice(self, series_uid: str, instance_id: int, frame: int,
               version: str = PREPROCESSING_VERSION) -> tuple[np.ndarray, bool]:  # fmt: skip
        """The preprocessed slice [512, 512] in [0, 1], exactly what a model of preprocessing
        ``version`` sees, and whether that turned it (phase encoding along its rows): pictures
        turn it back, so they look the same whatever the version."""
        with self.reads() as session:
            path = session.scalar(
                select(Instance.spool_path)
                .join(Series, Instance.series_id == Series.id)
                .where(Instance.id == instance_id, Series.series_uid == series_uid)
            )
        if path is None:
            raise SliceNotFound(f"no instance {instance_id} in series {series_uid}")
        ds = pydicom.dcmread(self.spool.path(path))
        frames = preprocess(ds, version=version)
        if not 0 <= frame < len(frames):
            raise SliceNotFound(f"instance {instance_id} has no frame {frame}")
        return frames[frame, ..., 0], turned(ds, frame, version)

    def thumbnail(self, series_uid: str, instance_id: int, frame: int, size: int) -> bytes:
        size = _size(size)
        return self._cached(
            self.cache_dir / "thumbs" / f"{instance_id}_{frame}_{size}.png",
            lambda: thumbnail_png(_as_stored(*self._slice(series_uid, instance_id, frame)), size),
        )

    def heat_map(self, series_uid: str, instance_id: int, frame: int, size: int) -> bytes:
        """Grad-CAM of the non-diagnostic class, faded by the slice's P(non-diagnostic): each
        map is scaled to its own peak, so a clean slice would otherwise glow as much."""
        size = _size(size)
        mapper = self._heat_mapper()

        def render() -> bytes:
            version = mapper.meta.preprocessing_version
            image, turned = self._slice(series_uid, instance_id, frame, version)
            heat = mapper.heat_maps(image[None, ..., None])[0]
            faded = heat * self._p_nondiagnostic(instance_id, frame)
            return heatmap_png(_as_stored(faded, turned), size)

        return self._cached(
            self.cache_dir / "heat" / mapper.sha256[:16] / f"{instance_id}_{frame}_{size}.png",
            render,
        )

    def montage(self, series_uid: str, columns: int = 6, tile: int = 256, limit: int = 36) -> bytes:
        """The series' slices in anatomical order with their heat maps, as one PNG (for a
        Secondary Capture that viewers without SR support can show)."""
        from mriqa_node.services.queries import series_detail

        scored = [s for s in series_detail(self.reads, series_uid)["slice_list"]
                  if s["p_nondiagnostic"] is not None][:limit]  # fmt: skip
        if not scored:
            raise SliceNotFound(f"series {series_uid} has no scored slice")
        mapper = self._heat_mapper()
        version = mapper.meta.preprocessing_version
        slices = [self._slice(series_uid, s["instance_id"], s["frame"], version) for s in scored]
        heats = mapper.heat_maps(np.stack([image for image, _ in slices])[..., None])
        tiles = [_as_stored(image, turned) for image, turned in slices]
        faded = [_as_stored(h * s["p_nondiagnostic"], turned)
                 for h, s, (_, turned) in zip(heats, scored, slices, strict=True)]  # fmt: skip
        return montage_png(tiles, faded, columns, tile)

    def _p_nondiagnostic(self, instance_id: int, frame: int) -> float:
        with self.reads() as session:
            p = session.scalar(
                select(SliceScore.p_nondiagnostic)
                .where(SliceScore.instance_id == instance_id, SliceScore.frame == frame)
                .order_by(SliceScore.id.desc())
                .limit(1)
            )
        return 1.0 if p is None else float(p)

    def _heat_mapper(self):
        """The Grad-CAM model for the current artifact, rebuilt when the artifact changes."""
        from mriqa_node.ml.explain import HeatMapper

        path = self.model_dir()
        sha = json.loads((path / "model.json").read_text()).get("sha256")
        with self._mapper_lock:
            if self._mapper is None or self._mapper.sha256 != sha:
                mapper = HeatMapper(path)
                size = mapper.meta.input_size  # trace once here, not in each waiting request
                mapper.heat_maps(np.zeros((1, size, size, 1), np.float32))
                self._mapper = mapper
            return self._mapper

    @staticmethod
    def _cached(path: Path, render: Callable[[], bytes]) -> bytes:
        if path.is_file():
            return path.read_bytes()
        try:
            data = render()
        except (Unscorable, pydicom.errors.InvalidDicomError, OSError) as exc:
            raise SliceNotFound(f"cannot render this slice: {exc}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data


def _as_stored(image: np.ndarray, turned: bool) -> np.ndarray:
    """A model-input picture (or its heat map) in the stored image's orientation."""
    return image.T if turned else image


def _size(size: int) -> int:
    """Snap to a few sizes, so the cache stays small and a client cannot ask for huge images."""
    return min(SIZES, key=lambda s: (s < size, abs(s - size)))
