"""SQLAlchemy 2 models. The database is the single source of truth for work state.

Instances without a score are the worker's queue (``instance.state``); series move
receiving -> complete -> decided; alerts and events are what the console and notifiers consume.
Schema changes go through Alembic migrations in ``db/versions``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, also on SQLite (which stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(), dict[str, Any]: JSON}


class InstanceState(enum.StrEnum):
    pending = "pending"  # in the spool, waiting for the worker
    claimed = "claimed"  # a worker is scoring it (claim expires at claim_expires_at)
    scored = "scored"
    unscorable = "unscorable"  # kept, but nothing to score: reason says why
    out_of_scope = "out_of_scope"  # kept, not for this model (scope rule in reason): not scored


class SeriesState(enum.StrEnum):
    receiving = "receiving"
    complete = "complete"  # no more instances expected; waiting for the last scores
    decided = "decided"


class AlertState(enum.StrEnum):
    open = "open"
    acknowledged = "acknowledged"


class AckAction(enum.StrEnum):
    """What the technologist did about a non-diagnostic series."""

    rescanned = "rescanned"
    accepted = "accepted"  # accepted anyway
    disagree = "disagree"  # the series is fine: the model was wrong


class Role(enum.StrEnum):
    technologist = "technologist"
    radiologist = "radiologist"
    admin = "admin"


class ForwardState(enum.StrEnum):
    pending = "pending"
    sent = "sent"
    failed = "failed"  # the destination refused it for good (or the last retry passed)


class DeliveryState(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # gave up after the last retry


def _enum(e: type[enum.Enum]) -> Enum:
    return Enum(e, native_enum=False, length=16, validate_strings=True)


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(200))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime]

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"))
    calling_aet: Mapped[str | None] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None]
    series_description: Mapped[str | None] = mapped_column(String(200))
    protocol_name: Mapped[str | None] = mapped_column(String(200))
    # Slices (frames) the headers announce for the series; None: nothing says; 0: proved wrong.
    expected_slices: Mapped[int | None]
    received_instances: Mapped[int] = mapped_column(default=0)
    received_slices: Mapped[int] = mapped_column(default=0)
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.receiving)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]
    released_at: Mapped[datetime | None]  # the sending association ended (a completion hint)
    completed_at: Mapped[datetime | None]
    decided_at: Mapped[datetime | None]
    # Rejected for quality reasons (an IOCM rejection note went to the PACS destinations).
    rejected_at: Mapped[datetime | None]
    rejected_by: Mapped[str | None] = mapped_column(String(100))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    verdicts: Mapped[list[SeriesVerdict]] = relationship(
        back_populates="series", order_by="SeriesVerdict.id"
    )

    __table_args__ = (Index("ix_series_state", "state"),)


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None]
    frames: Mapped[int] = mapped_column(default=1)
    spool_path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime]
    state: Mapped[InstanceState] = mapped_column(
        _enum(InstanceState), default=InstanceState.pending
    )
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claim_expires_at: Mapped[datetime | None]
    scored_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)  # why it is unscorable

    series: Mapped[Series] = relationship(back_populates="instances")
    slices: Mapped[list[SliceScore]] = relationship(
        back_populates="instance", order_by="SliceScore.frame"
    )

    __table_args__ = (Index("ix_instance_state", "state"), Index("ix_instance_series", "series_id"))


class ModelVersion(Base):
    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(50))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(String(16))
    meta: Mapped[dict[str, Any]]  # model.json as loaded
    first_used_at: Mapped[datetime]


class SliceScore(Base):
    __tablename__ = "slice_score"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    frame: Mapped[int] = mapped_column(default=0)
    position: Mapped[float | None] = mapped_column(Float)  # along the slice normal, mm
    probabilities: Mapped[list[float]] = mapped_column(JSON)  # per class, model.json order
    p_nondiagnostic: Mapped[float] = mapped_column(Float)
    # Mahalanobis distance of the slice's features to the training data (None: no guard).
    distance: Mapped[float | None] = mapped_column(Float)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))

    instance: Mapped[Instance] = relationship(back_populates="slices")

    __table_args__ = (UniqueConstraint("instance_id", "frame", "model_version_id"),)


class SeriesVerdict(Base):
    __tablename__ = "series_verdict"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    # None when nothing in the series could be scored.
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id"))
    label: Mapped[str] = mapped_column(String(32))
    score: Mapped[float | None] = mapped_column(Float)  # estimated P(non-diagnostic) for the series
    worst_slices: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    n_slices: Mapped[int]
    n_unscorable: Mapped[int]
    reason: Mapped[str | None] = mapped_column(Text)  # why not assessed (the scope rule)
    policy: Mapped[dict[str, Any]]
    decided_at: Mapped[datetime]
    # Seconds from the series' last instance to this verdict (the time-to-verdict metric).
    seconds_after_last: Mapped[float | None] = mapped_column(Float)

    series: Mapped[Series] = relationship(back_populates="verdicts")


class ShadowScore(Base):
    """A shadow candidate's score of a slice (`mriqa model install --shadow`): kept apart from
    SliceScore, so nothing the node decides or shows reads it."""

    __tablename__ = "shadow_score"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    frame: Mapped[int] = mapped_column(default=0)
    position: Mapped[float | None] = mapped_column(Float)
    probabilities: Mapped[list[float]] = mapped_column(JSON)
    p_nondiagnostic: Mapped[float] = mapped_column(Float)
    distance: Mapped[float | None] = mapped_column(Float)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))

    __table_args__ = (UniqueConstraint("instance_id", "frame", "model_version_id"),)


class ShadowVerdict(Base):
    """What the shadow candidate would have said of a series, decided beside the active
    model's verdict; it never raises an alert."""

    __tablename__ = "shadow_verdict"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id"))
    label: Mapped[str] = mapped_column(String(32))
    score: Mapped[float | None] = mapped_column(Float)
    n_slices: Mapped[int]
    decided_at: Mapped[datetime]

    __table_args__ = (Index("ix_shadow_verdict_series", "series_id"),)


class Alert(Base):
    __tablename__ = "alert"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    verdict_id: Mapped[int] = mapped_column(ForeignKey("series_verdict.id"))
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[AlertState] = mapped_column(_enum(AlertState), default=AlertState.open)
    created_at: Mapped[datetime]
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(100))
    action: Mapped[str | None] = mapped_column(String(32))
    comment: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_alert_state", "state"),)


class Event(Base):
    """Append-only feed for the console and notifiers: consumers remember the last id they saw."""

    __tablename__ = "event"

    id: Mapped[int] = mapped_column(
        Integer().with_variant(BigInteger, "postgresql"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    series_uid: Mapped[str | None] = mapped_column(UID)
    payload: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class User(Base):
    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[Role] = mapped_column(_enum(Role))
    password_hash: Mapped[str] = mapped_column(String(200))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime]


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored, the token itself is shown once."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship()


class Rating(Base):
    """A rater's class for a slice (instance + frame) or for a whole series (instance None):
    0 non-diagnostic, 1 diagnostic, 2 excellent. One rating per rater and item; rating again
    replaces it. These are the labels offline retraining exports."""

    __tablename__ = "rating"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    frame: Mapped[int] = mapped_column(default=0)
    value: Mapped[int]
    created_at: Mapped[datetime]

    user: Mapped[User] = relationship()

    __table_args__ = (
        UniqueConstraint("user_id", "series_id", "instance_id", "frame", name="uq_rating_item"),
        Index("ix_rating_series", "series_id"),
    )


class WebhookDelivery(Base):
    """Outbox: one row per (webhook, event), sent until a 2xx or the last retry."""

    __tablename__ = "webhook_delivery"

    id: Mapped[int] = mapped_column(primary_key=True)
    webhook: Mapped[str] = mapped_column(String(100))  # the configured webhook's name
    event_id: Mapped[int] = mapped_column(
        Integer().with_variant(BigInteger, "postgresql"), ForeignKey("event.id")
    )
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState), default=DeliveryState.pending
    )
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claim_expires_at: Mapped[datetime | None]
    last_status: Mapped[int | None]  # HTTP status of the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]

    event: Mapped[Event] = relationship()

    __table_args__ = (
        UniqueConstraint("webhook", "event_id", name="uq_delivery_webhook_event"),
        Index("ix_delivery_state", "state", "next_attempt_at"),
    )


class Cursor(Base):
    """How far a feed consumer (e.g. the webhook fan-out) has read the event table."""

    __tablename__ = "feed_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(BigInteger, default=0)


class ForwardJob(Base):
    """Outbox for C-STOREs to a PACS destination: a received instance or a QA object the node
    made (rejection note, SR, montage). One row per (destination, SOP instance); sent in id
    order per destination, retried until sent."""

    __tablename__ = "forward_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # instance, kos, sr, montage
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    series_uid: Mapped[str] = mapped_column(UID)
    spool_path: Mapped[str] = mapped_column(Text)  # relative to the spool directory
    state: Mapped[ForwardState] = mapped_column(_enum(ForwardState), default=ForwardState.pending)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(100))
    claim_expires_at: Mapped[datetime | None]
    last_status: Mapped[int | None]  # DIMSE status of the last attempt
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid", name="uq_forward_destination_sop"),
        Index("ix_forward_due", "destination", "state", "id"),
    )
