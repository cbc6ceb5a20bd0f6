"""SQL helpers the services share: the clock, and inserts that ignore a conflict on both
engines (so concurrent receivers and workers never collide)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def now_utc() -> datetime:
    return datetime.now(UTC)


def dialect(session: Session) -> Any:
    """The dialect module whose insert() has ON CONFLICT (both engines have it)."""
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


def insert_ignore(session: Session, model: type, **values: object) -> None:
    """INSERT ... ON CONFLICT DO NOTHING."""
    session.execute(dialect(session).insert(model).values(**values).on_conflict_do_nothing())
