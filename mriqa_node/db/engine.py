"""Engine and session set-up for SQLite (embedded default) and PostgreSQL (production)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker


def make_engine(url: str, readonly: bool = False) -> Engine:
    """SQLite gets WAL and synchronous=FULL, so a commit is on disk before we answer Success.

    SQLite write transactions take the write lock at BEGIN (IMMEDIATE), which avoids deadlocks
    between readers turned writers; a ``readonly`` engine begins DEFERRED instead, so reads run
    beside writes (WAL) instead of queueing behind them.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_size=8
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(
            engine, "begin", _sqlite_begin_deferred if readonly else _sqlite_begin_immediate
        )
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3, not psycopg2
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         connect_args=POSTGRES_CONNECT_ARGS)  # fmt: skip


# A host cut off from the server (a partition, not a reset) must not hold row locks or claims
# until TCP gives up hours later: the server ends a session idle inside a transaction after
# 60 s and probes silent clients after 10 s; the client probes the server likewise.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "options": "-c idle_in_transaction_session_timeout=60000 -c tcp_keepalives_idle=10"
               " -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3",
}  # fmt: skip


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy control transactions (pysqlite's implicit BEGIN would defeat IMMEDIATE).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    # Take the write lock up front: avoids SQLITE_BUSY deadlocks between reader-turned-writers.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"
