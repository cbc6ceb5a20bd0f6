"""Claiming work rows so that several processes on one database never take the same row."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session


def lock_oldest(session: Session, id_column: Any, where: Any, limit: int) -> list[int]:
    """Ids of up to ``limit`` rows matching ``where``, oldest first, locked for this
    transaction; rows another transaction holds are skipped (PostgreSQL ``SKIP LOCKED``;
    SQLite has one writer and ignores the clause). The caller then updates them by id: as a
    subquery of the UPDATE, PostgreSQL may re-run the locking SELECT per row and ignore its
    LIMIT (seen on a fresh table)."""
    return list(
        session.scalars(
            select(id_column)
            .where(where)
            .order_by(id_column)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
