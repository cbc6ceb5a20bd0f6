"""Wiring: build the services from the config and run receiver, worker and series monitor."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from mriqa_node.config import Settings
from mriqa_node.db import migrate
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Instance
from mriqa_node.dicom.headers import InvalidInstance, parse_header
from mriqa_node.dicom.scp import StoreSCP
from mriqa_node.domain.completion import CompletionRule
from mriqa_node.domain.routing import ForwardRule
from mriqa_node.domain.scope import Scope, SiteRule, site_rules
from mriqa_node.journal import Journal
from mriqa_node.ml.artifact import untrained_convnet_artifact
from mriqa_node.ml.store import ModelStore
from mriqa_node.services.intake import Intake
from mriqa_node.services.receiving import JournaledIntake, replay
from mriqa_node.services.scoring import WorkQueue
from mriqa_node.services.series import SeriesService
from mriqa_node.spool import Spool

log = logging.getLogger(__name__)

BUNDLED_MODEL = Path(__file__).parent / "models" / "bundled"
MONITOR_INTERVAL = 0.1  # seconds between completion checks


def resolve_model(settings: Settings) -> Path:
    """The configured artifact, else the installed one, else the bundled one, else a loudly
    announced untrained ConvNet."""
    if settings.model.path:
        return Path(settings.model.path)
    installed = ModelStore(settings.model.dir).current()
    if installed is not None:
        return installed
    if (BUNDLED_MODEL / "model.json").is_file():
        return BUNDLED_MODEL
    fallback = Path(settings.model.dir) / "convnet-untrained"
    if not (fallback / "model.json").is_file():
        untrained_convnet_artifact(fallback)
    return fallback


def site_scope_rules(settings: Settings) -> tuple[SiteRule, ...]:
    sc = settings.scope
    return site_rules([r.model_dump() for r in sc.include], [r.model_dump() for r in sc.exclude])


class ScopeSource:
    """The active model's scope (model.json) with the site's rules; re-read when another
    model is installed (checked at most every ``recheck_seconds``, so intake pays nothing)."""

    def __init__(self, settings: Settings, recheck_seconds: float = 5.0) -> None:
        self.settings = settings
        self.rules = site_scope_rules(settings)
        self.recheck_seconds = recheck_seconds
        self._scope = Scope(rules=self.rules)
        self._key: tuple[str, float] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> Scope:
        now = time.monotonic()
        if now >= self._next_check:
            with self._lock:
                self._next_check = now + self.recheck_seconds
                self._reload()
        return self._scope

    def _reload(self) -> None:
        try:
            meta = resolve_model(self.settings) / "model.json"
            key = (str(meta), meta.stat().st_mtime)
            if key != self._key:
                self._scope = Scope.of(json.loads(meta.read_text()).get("scope"), self.rules)
                self._key = key
        except (OSError, ValueError) as exc:  # keep the last scope; the worker reports models
            log.warning("model scope not read, keeping the last one: %s", exc)


def forward_rules(settings: Settings) -> list[ForwardRule]:
    """The forwarding rules of the destinations that get received instances."""
    return [
        ForwardRule(d.name, frozenset(d.calling_aets), frozenset(m.upper() for m in d.modalities),
                    d.series_description, own_aet=d.ae_title)
        for d in settings.pacs.destinations if d.forward
    ]  # fmt: skip


def pacs_publisher(settings: Settings, sessions, reads, spool: Spool, montage=None,
                   on_queued=lambda: None):  # fmt: skip
    """The PACS publisher with the DICOM encoders (also used alone, by `mriqa reject`)."""
    from mriqa_node.dicom.objects import QaEncoder
    from mriqa_node.services.pacs import PacsPublisher

    pacs = settings.pacs
    return PacsPublisher(sessions, reads, spool, pacs.destinations,
                         QaEncoder(settings.dicom.ae_title), pacs.reject_on_non_diagnostic,
                         montage, on_queued=on_queued)  # fmt: skip


class Node:
    """One process of the node: any of receiver, worker and monitor, on one database."""

    def __init__(self, settings: Settings, slot: int = 0) -> None:
        self.settings = settings
        self.slot = slot  # 0: the main process; k > 0: receiver process k alone
        self.engine = make_engine(settings.storage.database_url)
        self.sessions = make_sessionmaker(self.engine)
        self.read_engine = make_engine(settings.storage.database_url, readonly=True)
        self.reads = make_sessionmaker(self.read_engine)
        self.spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync,
                           min_free_bytes=int(settings.storage.min_free_mb * 2**20))  # fmt: skip
        self.work_available = threading.Event()
        self.forward_available = threading.Event()
        self.intake = Intake(
            self.sessions,
            self.spool,
            on_work=self.work_available.set,
            routes=forward_rules(settings),
            on_forward=self.forward_available.set,
            scope=ScopeSource(settings),
        )
        self.series = SeriesService(
            self.sessions,
            CompletionRule(settings.series.idle_seconds, settings.series.release_grace_seconds),
            settings.verdict.model_dump(),
            reads=self.reads,
        )
        self.queue = WorkQueue(self.sessions, settings.worker.claim_seconds)
        self.journal_dir = self.spool.root / ".journal"
        self.receiving: JournaledIntake | None = None
        self._receiving_stop = threading.Event()
        self.receivers = None  # ReceiverProcesses, when [dicom] receivers > 1
        self.scp: StoreSCP | None = None
        self.console = None
        self.worker = None
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def upgrade_db(self) -> None:
        migrate.upgrade(self.engine)

    def recover_spool(self) -> int:
        """Register whole spool files that have no row and no journal record (written, then
        not acknowledged); one cut short is left unregistered, with the reason logged."""
        with self.sessions() as session:
            known = set(session.scalars(select(Instance.spool_path)))
        recovered = 0
        for relpath in self.spool.files():
            if relpath in known:
                continue
            try:
                # Read whole: the receiver writes a file before it is acknowledged, unsynced,
                # so one without a row may be cut short by a power cut (never acknowledged).
                ds = pydicom.dcmread(self.spool.path(relpath))
                header = parse_header(ds, ds.file_meta.TransferSyntaxUID)
                self.intake.register(header, relpath, self.spool.path(relpath).stat().st_size, None)
                recovered += 1
            except (
                InvalidInstance,
                pydicom.errors.InvalidDicomError,
                OSError,
                AttributeError,
            ) as e:
                log.error("spool file %s cannot be re-ingested: %s", relpath, e)
        if recovered:
            log.info("recovered %d spool file(s) without a database row", recovered)
            self.work_available.set()
        return recovered

    def start(
        self,
        receiver: bool = True,
        worker: bool = True,
        monitor: bool = True,
        console: bool = False,
    ) -> None:
        self.upgrade_db()
        if receiver:
            self.start_receiving()  # first: the journal rewrites files a crash left unsynced
            if self.slot == 0:  # receiver processes start after it, journals applied
                self.recover_spool()
        if worker:
            self.worker = self._make_worker()
            self._spawn("worker", lambda: self.worker.run(self.stopping))
            self._spawn("model-watcher", self._watch_model)
        if monitor:
            self._spawn("series-monitor", self._monitor)
            if self.settings.webhooks:
                self._spawn("webhooks", lambda: self._webhook_outbox().run(self.stopping))
            if self.settings.pacs.destinations:
                self._spawn("forwarder", lambda: self._forwarder().run(self.stopping))
                self._spawn("pacs-publisher", lambda: self.pacs_publisher().run(self.stopping))
        if console:
            self.console = self._make_console()
            self.console.start()
        if receiver:
            self.scp = StoreSCP(self.settings.dicom, self.receiving)
            self.scp.start()
            if self.slot == 0 and self.settings.dicom.receivers > 1:
                self._start_receiver_processes()

    def start_receiving(self) -> None:
        """Apply what receive journals hold from before (a crash: the main process takes
        every one, a receiver process its own), then open this process's journal and the
        thread that applies it."""
        own = self.journal_dir / f"receiver-{self.slot}"
        dirs = sorted(p for p in self.journal_dir.glob("receiver-*") if p.is_dir())
        if n := replay(self.intake, dirs if self.slot == 0 else [own]):
            self.work_available.set()
            log.info("recovered %d instance(s) from the receive journal", n)
        st = self.settings.storage
        journal = Journal(own, int(st.journal_segment_mb * 2**20), st.fsync)
        self.receiving = JournaledIntake(self.intake, journal)
        thread = threading.Thread(target=self.receiving.run, args=(self._receiving_stop,),
                                  name="journal-applier", daemon=True)  # fmt: skip
        thread.start()
        self._receiving_thread = thread

    def _start_receiver_processes(self) -> None:
        from mriqa_node.receivers import ReceiverProcesses, WakeListener

        wake = WakeListener(self.work_available.set, self.forward_available.set)
        self.receivers = ReceiverProcesses(self.settings, wake.port)
        self.receivers.start()
        self._spawn("receiver-wake", lambda: wake.run(self.stopping))
        self._spawn("receiver-supervisor", lambda: self.receivers.supervise(self.stopping))

    def _webhook_outbox(self):
        from mriqa_node.services.webhooks import WebhookOutbox

        process = f"{socket.gethostname()}:{os.getpid()}"
        s = self.settings
        return WebhookOutbox(self.sessions, self.reads, s.webhooks, s.console.url, process)

    def _forwarder(self):
        from mriqa_node.dicom.forward import StoreSender
        from mriqa_node.services.forwarding import Forwarder, ForwardQueue

        queue = ForwardQueue(self.sessions, self.reads)
        try:
            if released := queue.release_dead_claims(socket.gethostname()):
                log.info("took back %d forward job(s) claimed by a process that died", released)
        except SQLAlchemyError as exc:  # the claims then expire instead
            log.warning("could not take back dead processes' forward claims: %s", exc)
        return Forwarder(
            queue,
            self.settings.pacs.destinations,
            StoreSender(self.spool, self.settings.dicom.ae_title),
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            wake=self.forward_available,
        )

    def pacs_publisher(self):
        """Rejection notes and QA results for the PACS destinations, from the event feed."""
        montage = None
        if any(d.send_montage for d in self.settings.pacs.destinations):
            montage = self.slice_images.montage
        return pacs_publisher(self.settings, self.sessions, self.reads, self.spool, montage,
                              on_queued=self.forward_available.set)  # fmt: skip

    @functools.cached_property
    def slice_images(self):
        """Thumbnails and heat maps, shared by the console and the PACS montage (one
        Grad-CAM model in memory)."""
        from mriqa_node.services.images import SliceImages

        return SliceImages(self.reads, self.spool, self.settings.console.cache_dir,
                           lambda: resolve_model(self.settings))  # fmt: skip

    def _make_console(self):
        from mriqa_node.console.app import ConsoleContext, create_app, load_session_secret
        from mriqa_node.console.server import ConsoleServer
        from mriqa_node.services.alerts import AlertService
        from mriqa_node.services.forwarding import ForwardQueue
        from mriqa_node.services.models import ModelOverview
        from mriqa_node.services.ratings import RatingService
        from mriqa_node.services.users import UserService

        cfg = self.settings.console
        ctx = ConsoleContext(
            settings=self.settings,
            reads=self.reads,
            models=ModelOverview(
                self.reads,
                ModelStore(self.settings.model.dir),
                lambda: resolve_model(self.settings),
            ),
            users=UserService(self.sessions, self.reads),
            alerts=AlertService(self.sessions, self.reads),
            ratings=RatingService(self.sessions, self.reads),
            images=self.slice_images,
            spool=self.spool,
            receiving=self.receiving,
            drift=self._drift_monitor(),
            outbox=self._webhook_outbox() if self.settings.webhooks else None,
            forwarding=ForwardQueue(self.sessions, self.reads)
            if self.settings.pacs.destinations
            else None,
        )
        return ConsoleServer(create_app(ctx, load_session_secret(cfg.secret_file)), cfg)

    def _make_worker(self):
        from mriqa_node.ml.scorer import Scorer
        from mriqa_node.worker import Worker

        scorer = Scorer(resolve_model(self.settings))
        scorer.warm_up()
        w = self.settings.worker
        return Worker(
            self.queue,
            self.series,
            self.spool,
            scorer,
            w.max_batch,
            w.max_wait_ms,
            w.poll_seconds,
            wake=self.work_available,
        )

    def _watch_model(self) -> None:
        """Load a newly installed model beside the running one, then hand it to the worker."""
        from mriqa_node.ml.artifact import ArtifactError, read_meta
        from mriqa_node.ml.scorer import Scorer

        refused: set[str] = set()
        while not self.stopping.wait(self.settings.model.reload_seconds):
            path, sha = None, ""
            try:
                path = resolve_model(self.settings)
                sha = json.loads((path / "model.json").read_text()).get("sha256", "")
                if sha == self.worker.scorer.meta.sha256 or sha in refused:
                    continue
                read_meta(path)  # hash and contract, before any TensorFlow work
                scorer = Scorer(path, self.worker.scorer.device)
                scorer.warm_up()
                self.worker.promote(scorer)
            except (ArtifactError, OSError, ValueError) as exc:
                refused.add(sha)
                log.error("new model at %s refused, keeping the current one: %s", path, exc)
            except Exception:
                log.exception("model watcher error")
            finally:
                self._watch_shadow(refused)

    def _watch_shadow(self, refused: set[str]) -> None:
        """Start, change or stop the shadow candidate as `mriqa model install --shadow`,
        `promote` and `rollback` leave the store's shadow pointer."""
        from mriqa_node.ml.artifact import ArtifactError, read_meta
        from mriqa_node.ml.scorer import Scorer

        path = ModelStore(self.settings.model.dir).shadow()
        running, sha = self.worker.shadow, ""
        try:
            if path is None:
                if running is not None:
                    self.worker.set_shadow(None)
                return
            sha = json.loads((path / "model.json").read_text()).get("sha256", "")
            if sha in refused or (running is not None and running.meta.sha256 == sha):
                return
            read_meta(path)
            scorer = Scorer(path, self.worker.scorer.device)
            scorer.warm_up()
            self.worker.set_shadow(scorer)
        except (ArtifactError, OSError, ValueError) as exc:
            refused.add(sha)
            log.error("shadow model at %s refused: %s", path, exc)

    def _drift_monitor(self):
        from mriqa_node.services.drift import DriftMonitor

        return DriftMonitor(self.sessions, self.reads, self.settings.drift.rule())

    def _monitor(self) -> None:
        drift, next_drift = self._drift_monitor(), 0.0
        while not self.stopping.wait(MONITOR_INTERVAL):
            try:
                self.series.tick()
                if time.monotonic() >= next_drift:
                    next_drift = time.monotonic() + self.settings.drift.check_seconds
                    drift.check()
            except Exception:  # database away: keep trying, state is in the database
                log.exception("series monitor error")
                self.stopping.wait(1.0)

    def _spawn(self, name: str, target) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        self.work_available.set()
        if self.scp is not None:
            self.scp.stop()
        if self.receivers is not None:
            self.receivers.stop()
        if self.receiving is not None:  # after the receiver: apply what it took, then stop
            self._receiving_stop.set()
            self._receiving_thread.join(timeout=30)
            self.receiving.journal.close()
        if self.console is not None:
            self.console.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.engine.dispose()
        self.read_engine.dispose()

    def run_until_signalled(self) -> None:
        """Block until SIGINT/SIGTERM, then stop cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
        log.info("stopping")
        self.stop()
