"""Decoded-image cache and the tf.data input pipeline.

Every DICOM file is decoded and preprocessed once, with the node's own ``preprocess`` (so the
model sees exactly what the node will feed it), into an on-disk array: ``images.bin`` holds
rows of [size, size, 1] (float16 by default, or uint8), ``index.json`` maps each SOP instance
UID to its first row and frame count. The cache directory is named after the preprocessing
version, the size and the dtype, so a change of any of them starts a fresh cache and a second
run over the same files decodes nothing. Multi-frame files contribute one row per frame.

Images come out of the cache as float32 in [0, 1]: the paper divides 8-bit pixels by 255 to get
there; ``preprocess`` already windows to [0, 1], so no further scaling is applied (a uint8 cache
is divided by 255 on the way out, which undoes its own quantisation, nothing more).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mriqa_node.preprocess import INPUT_SIZE, PREPROCESSING_VERSION
from training.files import write_json
from training.manifest import Record

log = logging.getLogger(__name__)

DATA_FILE = "images.bin"
INDEX_FILE = "index.json"
DTYPES = {"float16": np.float16, "uint8": np.uint8}
# Fewer files than this are decoded in-process: starting workers costs ~1.5 s, about 500
# synthetic 512 px files' worth of serial decoding.
_SERIAL_BELOW = 256


def default_cache_dir() -> Path:
    """$MRIQA_CACHE_DIR, else $XDG_CACHE_HOME/mriqa/images, else ~/.cache/mriqa/images."""
    if os.environ.get("MRIQA_CACHE_DIR"):
        return Path(os.environ["MRIQA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mriqa" / "images"


@dataclass
class Samples:
    """Cache rows for a list of records: one entry per frame, aligned arrays."""

    rows: np.ndarray  # int64 row in the cache
    record: np.ndarray  # int64 index into the record list
    frame: np.ndarray  # int32 frame within the file (0 for single-frame files)

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class BuildStats:
    decoded: int  # files decoded in this call
    reused: int  # files already in the cache
    failed: int  # files that could not be decoded (now or before)
    rows: int  # rows in the cache after the call


class ImageCache:
    """On-disk cache of preprocessed images, keyed by SOP instance UID.

    ``directory`` is a root shared by any number of runs; the data lives in a subdirectory per
    (preprocessing version, size, dtype). ``build`` adds what is missing (parallel, with a
    progress bar) under a file lock, so two processes may share a root.
    """

    def __init__(
        self, directory: Path | str, size: int = INPUT_SIZE, dtype: str = "float16"
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.root = Path(directory)
        self.size = int(size)
        self.dtype = dtype
        self.directory = self.root / f"pp{PREPROCESSING_VERSION}-{self.size}px-{dtype}"
        self._index = self._read_index()
        self._data: np.memmap | None = None
        self._transient: set[str] = set()  # failed in this process, tried again next run

    # -- building --------------------------------------------------------------------------

    def build(
        self, records: Sequence[Record], workers: int | None = None, progress: bool = True
    ) -> BuildStats:
        """Decode every record not yet in the cache; failures are remembered and logged.

        Large jobs use ``workers`` processes (default: one per CPU), started with "spawn": a
        script that calls this must guard its entry point with ``if __name__ == "__main__"``.
        """
        if multiprocessing.parent_process() is not None and _in_spawn_bootstrap():
            raise RuntimeError(
                "ImageCache.build called while a decode worker imports the main script:"
                " guard the script's entry point with if __name__ == '__main__'"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._index = self._read_index()  # another process may have added rows
            entries, failed = self._index["entries"], self._index["failed"]
            todo, seen = [], set()
            uids = {r.sop_instance_uid for r in records}
            reused = sum(u in entries for u in uids)
            for r in records:
                uid = r.sop_instance_uid
                if uid not in entries and uid not in failed and uid not in seen:
                    seen.add(uid)
                    todo.append(r)
            decoded = 0
            if todo:
                decoded = self._decode_into(todo, workers, progress)
        n_failed = sum(u in self._index["failed"] or u in self._transient for u in uids)
        self._data = None  # reopen at the new length
        return BuildStats(decoded, reused, n_failed, self._index["count"])

    def _decode_into(self, todo: list[Record], workers: int | None, progress: bool) -> int:
        from tqdm.auto import tqdm

        workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        jobs = [(str(r.path), self.size, self.dtype) for r in todo]
        data_path = self.directory / DATA_FILE
        row_bytes = self.size * self.size * np.dtype(DTYPES[self.dtype]).itemsize
        count = self._index["count"]
        decoded = 0
        with (
            contextlib.ExitStack() as stack,
            data_path.open("r+b" if data_path.exists() else "w+b") as fh,
        ):
            # Drop any tail written by a run that died before updating the index.
            fh.truncate(count * row_bytes)
            fh.seek(count * row_bytes)
            if workers > 1 and len(jobs) >= _SERIAL_BELOW:
                # spawn, not fork: the parent may hold TensorFlow's threads and locks.
                ctx = multiprocessing.get_context("spawn")
                pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=ctx))
                results = pool.map(_decode_file, jobs, chunksize=4)
            else:
                results = map(_decode_file, jobs)
            bar = tqdm(total=len(jobs), desc="decode", unit="file", disable=not progress)
            for r, (pixels, reason, permanent) in zip(todo, results, strict=True):
                bar.update()
                if pixels is None:
                    log.warning("skipping %s: %s", r.path, reason)
                    if permanent:  # the content is unusable; I/O errors are retried next time
                        self._index["failed"][r.sop_instance_uid] = reason
                    else:
                        self._transient.add(r.sop_instance_uid)
                    continue
                fh.write(pixels.tobytes())
                self._index["entries"][r.sop_instance_uid] = [count, len(pixels)]
                count += len(pixels)
                decoded += 1
            bar.close()
            fh.flush()
            os.fsync(fh.fileno())
        self._index["count"] = count
        self._write_index()
        return decoded

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._index["count"])

    def __contains__(self, sop_instance_uid: str) -> bool:
        return sop_instance_uid in self._index["entries"]

    @property
    def data(self) -> np.ndarray:
        """All rows, [N, size, size, 1] in the cache dtype (read-only memory map)."""
        if self._data is None or len(self._data) != len(self):
            if len(self) == 0:
                return np.zeros((0, self.size, self.size, 1), DTYPES[self.dtype])
            self._data = np.memmap(
                self.directory / DATA_FILE,
                dtype=DTYPES[self.dtype],
                mode="r",
                shape=(len(self), self.size, self.size, 1),
            )
        return self._data

    def rows(self, record: Record) -> range:
        """Cache rows of a record, one per frame (empty if it is not cached or failed)."""
        entry = self._index["entries"].get(record.sop_instance_uid)
        return range(entry[0], entry[0] + entry[1]) if entry else range(0)

    def failure(self, record: Record) -> str | None:
        return self._index["failed"].get(record.sop_instance_uid)

    def samples(self, records: Sequence[Record]) -> Samples:
        """Rows of all frames of the records that are in the cache, in record order."""
        rows, rec, frame = [], [], []
        for i, r in enumerate(records):
            span = self.rows(r)
            rows.extend(span)
            rec.extend([i] * len(span))
            frame.extend(range(len(span)))
        return Samples(
            np.asarray(rows, np.int64), np.asarray(rec, np.int64), np.asarray(frame, np.int32)
        )

    def gather(self, rows: np.ndarray, dtype: str = "float32") -> np.ndarray:
        """Rows in [0, 1] as ``dtype`` (float32, or float16: no conversion from a float16
        cache); read in sorted order, returned in the given order."""
        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), self.size, self.size, 1), np.dtype(dtype))
        out[order] = self.data[rows[order]]
        if self.dtype == "uint8":
            out *= out.dtype.type(1.0 / 255.0)
        return out

    # -- index -----------------------------------------------------------------------------

    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX_FILE
        fresh = {
            "preprocessing_version": PREPROCESSING_VERSION,
            "size": self.size,
            "dtype": self.dtype,
            "count": 0,
            "entries": {},
            "failed": {},
        }
        if not path.is_file():
            return fresh
        index = json.loads(path.read_text())
        key = (index.get("preprocessing_version"), index.get("size"), index.get("dtype"))
        if key != (PREPROCESSING_VERSION, self.size, self.dtype):
            log.warning("%s belongs to another preprocessing/size/dtype; rebuilding", path)
            return fresh
        return index

    def _write_index(self) -> None:
        write_json(self.directory / INDEX_FILE, self._index, compact=True)

    @contextlib.contextmanager
    def _lock(self):
        with (self.directory / "lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _in_spawn_bootstrap() -> bool:
    """True in a spawned child that is still importing the parent's __main__."""
    process = multiprocessing.current_process()
    return bool(getattr(process, "_inheriting", False))


def _decode_file(job: tuple[str, int, str]) -> tuple[np.ndarray | None, str | None, bool]:
    """Worker: read and preprocess one file -> ([frames, size, size, 1] in dtype, None, _) or
    (None, reason, permanent); permanent is False for I/O errors (missing file, permissions),
    which are worth another try. Runs in a spawned process: imports no TensorFlow."""
    import pydicom

    from mriqa_node.preprocess import Unscorable, preprocess

    path, size, dtype = job
    try:
        ds = pydicom.dcmread(path)
        x = preprocess(ds, size)
    except Unscorable as exc:
        return None, str(exc), True
    except OSError as exc:
        return None, f"{type(exc).__name__}: {exc}", False
    except Exception as exc:  # not DICOM, or broken beyond decoding: keep going, report it
        return None, f"{type(exc).__name__}: {exc}", True
    if dtype == "uint8":
        return np.rint(x * 255.0).astype(np.uint8), None, True
    return x.astype(np.float16), None, True


def make_dataset(
    cache: ImageCache,
    indices: Sequence[int] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    batch: int,
    shuffle: bool = False,
    repeat: bool = False,
    seed: int = 0,
    drop_remainder: bool | None = None,
    dtype: str = "float32",
    augment: bool = False,
):
    """tf.data.Dataset of (float32 [b, size, size, 1] images in [0, 1], int32 [b] labels).

    ``indices`` are cache rows and ``labels`` their labels (aligned): class indices, or soft
    targets [n, classes] (float32 [b, classes] batches then). Images are already in
    [0, 1] from ``preprocess``: unlike the paper (which divides raw pixels by 255), nothing is
    rescaled here. Shuffling (a full permutation, redrawn each epoch) is deterministic for a
    seed. Batches are gathered from the memory-mapped cache in parallel and prefetched, so the
    pipeline stays well ahead of the model. ``drop_remainder`` defaults to ``repeat`` (fixed
    shapes while training, every sample once when evaluating).

    ``augment`` adds the label-preserving flips and intensity changes of ``_augment``
    (training batches only).

    ``dtype="float16"`` hands a float16 cache's rows over unconverted (the float16 -> float32
    conversion is most of the pipeline's CPU time): for mixed-precision training on a GPU,
    where the model casts its input on the device anyway, to the same values.
    """
    import tensorflow as tf

    indices = np.asarray(indices, np.int64)
    labels = np.asarray(labels)
    labels = labels.astype(np.float32 if labels.ndim == 2 else np.int32)  # soft targets: [n, c]
    if indices.shape != labels.shape[:1]:
        raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
    size = cache.size
    cache.data  # noqa: B018  (open the memory map once, before the pipeline's threads use it)

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    tf_dtype = tf.float16 if dtype == "float16" else tf.float32

    def gather(rows: np.ndarray) -> np.ndarray:
        return cache.gather(rows, dtype)

    def load(rows: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.numpy_function(gather, [rows], tf_dtype, stateful=False)
        x.set_shape([None, size, size, 1])
        return x, y

    ds = tf.data.Dataset.from_tensor_slices((indices, labels))
    if shuffle:
        ds = ds.shuffle(max(1, len(indices)), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch, drop_remainder=repeat if drop_remainder is None else drop_remainder)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if augment:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.counter())).map(
            lambda xy, i: (_augment(xy[0], tf.stack([tf.cast(seed, tf.int64), i])), xy[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def _augment(x, seed):
    """Per image, on the fly: up-down and left-right flips and a mild gamma and gain.

    No transposes: preprocessing turns every frame so that its phase-encoding direction, along
    which motion ghosts lie, runs down the columns, and a transpose would undo that. None of
    them is motion, so none changes a label; they keep a handful of real subjects from
    being learnt by heart (the offline nuisances of ``training.realmotion`` vary the rest).
    Stateless random numbers from (seed, batch counter): the same seed, the same batches.
    """
    import tensorflow as tf

    b = tf.shape(x)[0]
    u = tf.random.stateless_uniform([4, b, 1, 1, 1], seed=seed)
    x = tf.where(u[0] < 0.5, tf.reverse(x, [2]), x)
    x = tf.where(u[1] < 0.5, tf.reverse(x, [1]), x)
    gamma = tf.cast(tf.exp(0.6 * u[2] - 0.3), x.dtype)
    gain = tf.cast(0.85 + 0.3 * u[3], x.dtype)
    return tf.clip_by_value(tf.clip_by_value(x, 0, 1) ** gamma * gain, 0, 1)
