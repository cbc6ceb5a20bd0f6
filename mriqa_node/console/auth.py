"""Who is calling: a bearer token (scripts) or a signed session cookie (people), and what
their role lets them do.

Cookie-authenticated requests that change something must carry the session's CSRF token
(form field ``csrf_token`` or header ``X-CSRF-Token``); bearer requests carry no ambient
credentials and need none.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from mriqa_node.db.models import Role
from mriqa_node.services.users import Principal

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRequired(Exception):
    """No valid credentials: pages redirect to the login form, the API answers 401."""


def csrf_token(request: Request) -> str:
    """The session's CSRF token, created on first use."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


async def check_csrf(request: Request) -> None:
    expected = request.session.get("csrf", "")
    sent = request.headers.get("x-csrf-token", "")
    if not sent and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        sent = str((await request.form()).get("csrf_token", ""))
    if not expected or not hmac.compare_digest(expected, sent):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")


async def current_user(request: Request) -> Principal:
    users = request.app.state.ctx.users
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        user = users.for_token(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise LoginRequired()
        return user
    user_id = request.session.get("user_id")
    user = users.get(user_id) if isinstance(user_id, int) else None
    if user is None:
        raise LoginRequired()
    if request.method not in SAFE_METHODS:
        await check_csrf(request)
    return user


CurrentUser = Annotated[Principal, Depends(current_user)]


def require(*roles: Role):
    """A dependency that lets only these roles through (403 for the others)."""
    allowed = frozenset(roles)

    async def dependency(user: CurrentUser) -> Principal:
        if user.role not in allowed:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"role {user.role.value} may not do this (needs {', '.join(sorted(allowed))})",
            )
        return user

    return dependency
