"""The scoring worker: claim instances, preprocess, run the model, record, decide.

Decoding and preprocessing of the next batch run in a helper thread while the model scores the
current one, so the model (the expensive part) is kept busy. Batches are dynamic: whatever is
waiting, up to ``max_batch`` slices, after at most ``max_wait_ms`` for a batch to fill.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO

import numpy as np
import pydicom

from mriqa_node.ml.scorer import Scorer
from mriqa_node.preprocess import (
    NO_ANATOMY,
    PREPROCESSING_VERSION,
    Unscorable,
    preprocess_frames,
    slice_positions,
)
from mriqa_node.services.claims import process_alive
from mriqa_node.services.scoring import Claim, InstanceResult, WorkQueue
from mriqa_node.services.series import SeriesService
from mriqa_node.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    claim: Claim
    frames: np.ndarray | None  # [n, size, size, 1], the frames that show anatomy
    positions: list[float | None]
    reason: str | None = None
    frame_numbers: list[int] | None = None  # of those frames in the instance (None: 0..n-1)


def prepare(
    spool: Spool, claim: Claim, size: int, version: str = PREPROCESSING_VERSION
) -> Prepared:
    """Read and preprocess one instance (see prepare_data)."""
    try:
        data = spool.read(claim.spool_path)
    except FileNotFoundError:
        return Prepared(claim, None, [], "file missing from the spool")
    return prepare_data(claim, data, size, version)


def prepare_data(
    claim: Claim, data: bytes, size: int, version: str = PREPROCESSING_VERSION
) -> Prepared:
    """Preprocess one instance's file; every failure becomes a stored reason, never an
    exception (one that escaped would send the claim round the worker loop for ever). Frames
    without anatomy are left out (all of them: the instance is not assessed)."""
    try:
        ds = pydicom.dcmread(BytesIO(data))
        prepared = preprocess_frames(ds, size, version)
        keep = prepared.anatomy
        if not len(keep):
            return Prepared(claim, None, [], NO_ANATOMY)
        positions = slice_positions(ds)
        if len(keep) == len(positions):
            return Prepared(claim, prepared.images, positions)
        return Prepared(claim, prepared.images[keep], [positions[i] for i in keep],
                        frame_numbers=[int(i) for i in keep])  # fmt: skip
    except Unscorable as exc:
        return Prepared(claim, None, [], str(exc))
    except Exception as exc:  # pydicom raises OSError, EOFError, ValueError, KeyError... on a
        # damaged file: any of them is this instance's reason (found by fuzzing: OSError)
        detail = " ".join(str(exc).split())[:300]
        return Prepared(claim, None, [], f"cannot read dataset: {type(exc).__name__}: {detail}")


class Worker:
    def __init__(
        self,
        queue: WorkQueue,
        series: SeriesService,
        spool: Spool,
        scorer: Scorer,
        max_batch: int = 16,
        max_wait_ms: float = 20.0,
        poll_seconds: float = 0.2,
        wake: threading.Event | None = None,
    ) -> None:
        self.queue = queue
        self.series = series
        self.spool = spool
        self.scorer = scorer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.poll_seconds = poll_seconds
        self.wake = wake or threading.Event()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        released = queue.release_dead_claims(socket.gethostname(), process_alive)
        if released:
            log.info("took back %d claim(s) of a worker that died on this host", released)
        self.model_version_id = queue.model_version_id(scorer.meta.to_json())
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="preprocess")
        self._next_scorer: Scorer | None = None
        self._swap_lock = threading.Lock()
        self.scored_slices = 0
        # A shadow candidate scores the same frames; its scores and verdicts are kept apart.
        self.shadow: Scorer | None = None
        self.shadow_version_id: int | None = None
        self.shadow_seconds = 0.0  # the candidate's model time, for what shadowing costs

    def promote(self, scorer: Scorer) -> None:
        """Use this (loaded, warmed-up) scorer from the next batch on."""
        with self._swap_lock:
            self._next_scorer = scorer

    def set_shadow(self, scorer: Scorer | None) -> None:
        """Score with this candidate too from the next batch on (None: stop shadowing)."""
        version = None if scorer is None else self.queue.model_version_id(scorer.meta.to_json())
        with self._swap_lock:
            self.shadow, self.shadow_version_id = scorer, version
        if scorer is not None and not self._same_input(scorer):
            log.warning("shadow model: %s %s takes other input (size %s, preprocessing v%s) than"
                        " the active model (%s, v%s): it is not shadowed", scorer.meta.name,
                        scorer.meta.version, scorer.meta.input_size,
                        scorer.meta.preprocessing_version, self.scorer.meta.input_size,
                        self.scorer.meta.preprocessing_version)  # fmt: skip
        elif scorer is not None:
            log.warning("shadow model: %s %s scores beside the active model, never alerting",
                        scorer.meta.name, scorer.meta.version)  # fmt: skip

    def _same_input(self, other: Scorer) -> bool:
        """Whether ``other`` can score the frames prepared for the active model."""
        mine, theirs = self.scorer.meta, other.meta
        return (mine.input_size, mine.preprocessing_version) == (
            theirs.input_size, theirs.preprocessing_version)  # fmt: skip

    def _swap_if_promoted(self) -> None:
        with self._swap_lock:
            scorer, self._next_scorer = self._next_scorer, None
        if scorer is not None:
            self.model_version_id = self.queue.model_version_id(scorer.meta.to_json())
            old, self.scorer = self.scorer, scorer
            log.warning("model promoted: %s %s -> %s %s", old.meta.name, old.meta.version,
                        scorer.meta.name, scorer.meta.version)  # fmt: skip

    def run(self, stop: threading.Event) -> None:
        log.info("worker %s started", self.worker_id)
        while not stop.is_set():
            try:
                if not self.drain(stop):
                    self.wake.wait(self.poll_seconds)
                    self.wake.clear()
            except Exception:  # a database hiccup must not kill the worker; claims expire
                log.exception("worker loop error; retrying in 1 s")
                stop.wait(1.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def drain(self, stop: threading.Event | None = None) -> int:
        """Score until the queue is empty; returns the number of instances handled."""
        handled = 0
        self._swap_if_promoted()
        pending = self._claim_batch()
        future = self._submit(pending)
        while future is not None and not (stop and stop.is_set()):
            prepared = future.result()
            nxt = self._claim_batch(wait=False)
            future = self._submit(nxt)
            self._score_and_record(prepared)
            handled += len(prepared)
        return handled

    def _claim_batch(self, wait: bool = True) -> list[Claim]:
        claims = self.queue.claim(self.worker_id, self.max_batch)
        if claims and wait and len(claims) < self.max_batch and self.max_wait > 0:
            time.sleep(self.max_wait)  # let a streaming series fill the batch
            claims += self.queue.claim(self.worker_id, self.max_batch - len(claims))
        return claims

    def _submit(self, claims: list[Claim]) -> Future[list[Prepared]] | None:
        if not claims:
            return None
        size, version = self.scorer.meta.input_size, self.scorer.meta.preprocessing_version
        return self._pool.submit(lambda: [prepare(self.spool, c, size, version) for c in claims])

    def _score_and_record(self, prepared: list[Prepared]) -> None:
        # Frames as views, stacked one model batch at a time: a 200-frame enhanced object
        # must not be copied whole.
        frames = [f for p in prepared if p.frames is not None for f in p.frames]
        batch = self.max_batch
        chunks = [self.scorer.score(np.stack(frames[i : i + batch]))
                  for i in range(0, len(frames), batch)]  # fmt: skip
        all_probs = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros((0, 0))
        guarded = chunks and chunks[0][1] is not None
        all_dist = np.concatenate([c[1] for c in chunks]) if guarded else None
        results, offset = [], 0
        for p in prepared:
            if p.frames is None:
                log.info("instance %s unscorable: %s", p.claim.sop_instance_uid, p.reason)
                results.append(InstanceResult(p.claim, reason=p.reason))
                continue
            n = len(p.frames)
            dist = all_dist[offset : offset + n] if all_dist is not None else None
            results.append(InstanceResult(p.claim, all_probs[offset : offset + n], p.positions,
                                          frames=p.frame_numbers, distances=dist))  # fmt: skip
            offset += n
        self.scored_slices += offset
        with self._swap_lock:
            shadow, shadow_id = self.shadow, self.shadow_version_id
        if shadow is not None and shadow_id is not None:
            self._score_shadow(shadow, shadow_id, frames, results)
        for series_id in self.queue.record(self.worker_id, self.model_version_id, results):
            self.series.try_decide(series_id)  # the shadow's verdict is decided with it

    def _score_shadow(self, shadow: Scorer, version_id: int, frames: list[np.ndarray],
                      results: list[InstanceResult]) -> None:  # fmt: skip
        """The candidate's scores of the same frames (same preprocessing), stored before the
        active model's, so a series decided on those has the shadow's scores too."""
        if not frames or not self._same_input(shadow):
            return
        started = time.perf_counter()
        batch = self.max_batch
        chunks = [shadow.score(np.stack(frames[i : i + batch]))
                  for i in range(0, len(frames), batch)]  # fmt: skip
        self.shadow_seconds += time.perf_counter() - started
        probs = np.concatenate([c[0] for c in chunks])
        guarded = chunks[0][1] is not None
        dist = np.concatenate([c[1] for c in chunks]) if guarded else None
        shadowed, offset = [], 0
        for r in results:
            if r.reason:
                continue
            n = len(r.probabilities)
            shadowed.append(InstanceResult(r.claim, probs[offset : offset + n], r.positions,
                                           frames=r.frames, distances=None if dist is None
                                           else dist[offset : offset + n]))  # fmt: skip
            offset += n
        self.queue.record_shadow(version_id, shadowed)
