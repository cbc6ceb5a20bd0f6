"""Console users, their roles and API tokens.

Passwords are hashed with Argon2id (argon2-cffi); API tokens are random, shown once, and only
their SHA-256 is stored, so a leaked database does not leak working credentials.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import ApiToken, Role, User
from mriqa_node.db.sql import now_utc

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_hex(16))
MIN_PASSWORD = 8

# What each role may do, beyond reading (every active user may read).
ACK_ROLES = frozenset({Role.technologist, Role.admin})
RATE_ROLES = frozenset({Role.radiologist, Role.admin})
ADMIN_ROLES = frozenset({Role.admin})


class UserError(ValueError):
    """A user or token request that cannot be done; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: what the web layer knows about an authenticated user."""

    id: int
    name: str
    role: Role

    def may(self, roles: frozenset[Role]) -> bool:
        return self.role in roles


def _principal(user: User) -> Principal:
    return Principal(user.id, user.name, user.role)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UserService:
    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions  # per-request lookups (SQLite: without the write lock)

    def add(self, name: str, role: Role | str, password: str, replace: bool = False) -> Principal:
        """Create a user (or, with ``replace``, reset an existing user's password and role)."""
        name = name.strip()
        if not name or len(name) > 64 or not name.isprintable():
            raise UserError("user name must be 1-64 printable characters")
        if len(password) < MIN_PASSWORD:
            raise UserError(f"password must be at least {MIN_PASSWORD} characters")
        try:
            role = Role(role)
        except ValueError:
            raise UserError(f"unknown role {role!r}: one of {', '.join(Role)}") from None
        with self.sessions.begin() as session:
            user = session.scalar(select(User).where(User.name == name))
            if user is not None and not replace:
                raise UserError(f"user {name!r} exists (use --replace to reset it)")
            if user is None:
                user = User(name=name, created_at=now_utc())
                session.add(user)
            user.role, user.password_hash, user.active = role, _hasher.hash(password), True
            session.flush()
            return _principal(user)

    def authenticate(self, name: str, password: str) -> Principal | None:
        with self.reads() as session:
            user = session.scalar(select(User).where(User.name == name, User.active))
            try:
                _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
            except (VerificationError, InvalidHashError):
                return None
            return _principal(user) if user else None

    def get(self, user_id: int) -> Principal | None:
        with self.reads() as session:
            user = session.get(User, user_id)
            return _principal(user) if user and user.active else None

    def list(self) -> list[dict]:
        with self.reads() as session:
            users = session.scalars(select(User).order_by(User.name)).all()
            return [
                {"name": u.name, "role": u.role.value, "active": u.active,
                 "created_at": u.created_at.isoformat(timespec="seconds")}
                for u in users
            ]  # fmt: skip

    def create_token(self, name: str, label: str | None = None) -> str:
        """A new bearer token for this user; the caller shows it once, we keep its digest."""
        token = "mriqa_" + secrets.token_urlsafe(32)
        with self.sessions.begin() as session:
            user = session.scalar(select(User).where(User.name == name, User.active))
            if user is None:
                raise UserError(f"no active user {name!r}")
            session.add(
                ApiToken(user_id=user.id, token_sha256=token_digest(token), name=label,
                         created_at=now_utc())
            )  # fmt: skip
        return token

    def revoke_tokens(self, name: str) -> int:
        with self.sessions.begin() as session:
            user_id = session.scalar(select(User.id).where(User.name == name))
            if user_id is None:
                raise UserError(f"no user {name!r}")
            result = session.execute(
                update(ApiToken)
                .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=now_utc())
            )
            return result.rowcount

    def for_token(self, token: str) -> Principal | None:
        with self.reads() as session:
            row = session.execute(
                select(ApiToken.id, ApiToken.last_used_at, User)
                .join(User, ApiToken.user_id == User.id)
                .where(
                    ApiToken.token_sha256 == token_digest(token),
                    ApiToken.revoked_at.is_(None),
                    User.active,
                )
            ).first()
            if row is None:
                return None
            token_id, last_used, user = row
            principal = _principal(user)
        now = now_utc()
        if last_used is None or (now - last_used).total_seconds() > 60:  # not a write per call
            with self.sessions.begin() as session:
                session.execute(
                    update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=now)
                )
        return principal
