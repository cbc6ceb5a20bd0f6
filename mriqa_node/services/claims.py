"""Claiming work rows so that several processes on one database never take the same row."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select, update
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


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_holders(
    holders: Iterable[str], hostname: str, alive: Callable[[int], bool] = process_alive
) -> list[str]:
    """Claim holders (``host:pid[:...]``) of this host whose process is gone (killed): their
    claims can be given back at once instead of when they expire."""
    dead = []
    for holder in holders:
        host, _, rest = holder.partition(":")
        pid = rest.split(":")[0]
        if host == hostname and pid.isdigit() and not alive(int(pid)):
            dead.append(holder)
    return dead


def release_dead_claims(
    session: Session,
    model: Any,
    claimed: Any,
    values: dict[str, Any],
    hostname: str,
    alive: Callable[[int], bool] = process_alive,
) -> int:
    """Apply ``values`` (the claim given back) to the rows matching ``claimed`` that a dead
    process of this host holds; returns how many."""
    holders = session.scalars(
        select(model.claimed_by).where(claimed, model.claimed_by.like(f"{hostname}:%")).distinct()
    ).all()
    dead = dead_holders(holders, hostname, alive)
    if not dead:
        return 0
    return session.execute(
        update(model).where(claimed, model.claimed_by.in_(dead)).values(**values)
    ).rowcount
