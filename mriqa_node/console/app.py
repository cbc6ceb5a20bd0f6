"""The console's ASGI app: pages for people, a JSON API for scripts, live push, health, metrics.

Every route but ``/healthz``, ``/login`` and the static files needs an authenticated user;
changes need the right role (and, from a browser session, the CSRF token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from mriqa_node.config import Settings
from mriqa_node.console.auth import CurrentUser, LoginRequired, check_csrf, csrf_token, require
from mriqa_node.console.live import LiveFeed
from mriqa_node.console.metrics import registry_for
from mriqa_node.db.models import AckAction
from mriqa_node.domain.throttle import LoginThrottle, ThrottlePolicy
from mriqa_node.services import queries
from mriqa_node.services.alerts import AlertConflict, AlertNotFound, AlertService
from mriqa_node.services.drift import DriftMonitor
from mriqa_node.services.forwarding import ForwardQueue
from mriqa_node.services.images import SliceImages, SliceNotFound
from mriqa_node.services.models import ModelOverview
from mriqa_node.services.ratings import Forbidden, NotFound, RatingError, RatingService
from mriqa_node.services.receiving import JournaledIntake
from mriqa_node.services.users import ACK_ROLES, ADMIN_ROLES, RATE_ROLES, Principal, UserService
from mriqa_node.spool import Spool

HERE = Path(__file__).parent
log = logging.getLogger(__name__)
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["add_one"] = lambda i: i + 1  # 0-based slice indexes, 1-based for people
templates.env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M:%S") if t else ""


@dataclass
class ConsoleContext:
    """The services the console adapts; built once by the node."""

    settings: Settings
    reads: sessionmaker[Session]
    users: UserService
    alerts: AlertService
    ratings: RatingService
    images: SliceImages
    spool: Spool | None = None  # for the free-space watermark in /healthz and /metrics
    outbox: Any = None  # WebhookOutbox when webhooks are configured
    forwarding: ForwardQueue | None = None  # the PACS forwarding outbox, when configured
    receiving: JournaledIntake | None = None  # the receive journal, in a receiving process
    models: ModelOverview | None = None  # the active model, a shadow candidate, the comparison
    drift: DriftMonitor | None = None  # each scanner and protocol against its own past


def _ctx(request: Request) -> ConsoleContext:
    return request.app.state.ctx


Ctx = Annotated[ConsoleContext, Depends(_ctx)]
Acker = Annotated[Principal, Depends(require(*ACK_ROLES))]
Rater = Annotated[Principal, Depends(require(*RATE_ROLES))]
Admin = Annotated[Principal, Depends(require(*ADMIN_ROLES))]
# Numbers from outside are bounded before they reach the database (PostgreSQL's integer) or
# the image renderer; an unbounded one was a 500 (OverflowError), a huge size a memory bomb.
MAX_DB_INT = 2**31 - 1
RowId = Annotated[int, PathParam(ge=0, le=MAX_DB_INT)]
ThumbSize = Annotated[int, Query(ge=16, le=1024)]


class AckRequest(BaseModel):
    action: AckAction
    comment: str | None = Field(None, max_length=2000)


class RatingRequest(BaseModel):
    series_uid: str
    value: int = Field(ge=0, le=2, description="0 non-diagnostic, 1 diagnostic, 2 excellent")
    sop_instance_uid: str | None = Field(None, description="omit to rate the whole series")
    frame: int = Field(0, ge=0, le=MAX_DB_INT)


# -- JSON API ------------------------------------------------------------------------------------

api = APIRouter(prefix="/api", tags=["api"])


@api.get("/me")
def me(user: CurrentUser) -> dict[str, str]:
    return {"name": user.name, "role": user.role.value}


@api.get("/series")
def list_series(
    ctx: Ctx,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_DB_INT)] = 0,
) -> dict[str, Any]:
    """Newest series first, with state, verdict and any open alert."""
    return {
        "total": queries.count_series(ctx.reads),
        "items": queries.recent_series(ctx.reads, limit, offset),
    }


@api.get("/series/{series_uid}")
def get_series(series_uid: str, ctx: Ctx, user: CurrentUser) -> dict[str, Any]:
    """One series: slices in anatomical order with their probabilities, verdict history."""
    try:
        return queries.series_detail(ctx.reads, series_uid)
    except queries.SeriesNotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@api.get("/series/{series_uid}/slices/{instance_id}/{frame}/image.png")
def slice_image(
    series_uid: str,
    instance_id: RowId,
    frame: RowId,
    ctx: Ctx,
    user: CurrentUser,
    size: ThumbSize = 192,
) -> Response:
    """The slice as the model saw it (windowed), as a PNG."""
    return _png(lambda: ctx.images.thumbnail(series_uid, instance_id, frame, size))


@api.get("/series/{series_uid}/slices/{instance_id}/{frame}/heatmap.png")
def slice_heat_map(
    series_uid: str,
    instance_id: RowId,
    frame: RowId,
    ctx: Ctx,
    user: CurrentUser,
    size: ThumbSize = 192,
) -> Response:
    """Grad-CAM overlay (RGBA PNG): where the model saw the artifact."""
    return _png(lambda: ctx.images.heat_map(series_uid, instance_id, frame, size))


def _png(render) -> Response:
    try:
        data = render()
    except SliceNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip


@api.get("/alerts")
def list_alerts(
    ctx: Ctx,
    user: CurrentUser,
    state: Literal["open", "acknowledged"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    return ctx.alerts.list(state=state, limit=limit)


@api.post("/alerts/{alert_id}/ack")
def acknowledge(alert_id: RowId, body: AckRequest, ctx: Ctx, user: Acker) -> dict[str, Any]:
    """Acknowledge an open alert: rescanned, accepted (anyway) or disagree."""
    try:
        return ctx.alerts.acknowledge(alert_id, user, body.action, body.comment)
    except AlertNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except AlertConflict as exc:
        raise HTTPException(409, str(exc)) from exc


@api.get("/series/{series_uid}/ratings")
def series_ratings(series_uid: str, ctx: Ctx, user: CurrentUser) -> list[dict[str, Any]]:
    try:
        return ctx.ratings.for_series(series_uid)
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc


@api.post("/ratings")
def rate(body: RatingRequest, ctx: Ctx, user: Rater) -> dict[str, Any]:
    """Rate a slice (sop_instance_uid + frame) or a whole series; rating again replaces."""
    try:
        return ctx.ratings.rate(user, body.series_uid, body.value, body.sop_instance_uid,
                                body.frame)  # fmt: skip
    except NotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from exc
    except RatingError as exc:
        raise HTTPException(422, str(exc)) from exc


@api.get("/agreement")
def agreement(
    ctx: Ctx, user: CurrentUser, level: Literal["slice", "series"] = "slice"
) -> dict[str, Any]:
    """Cohen's kappa and Jaccard index matrices between raters and between raters and model."""
    return ctx.ratings.agreement(level)


@api.get("/models")
def models(ctx: Ctx, user: CurrentUser) -> dict[str, Any]:
    """The active model, the shadow candidate, where their verdicts differ and both against
    the site's feedback (what `mriqa model promote` judges), and the model history."""
    if ctx.models is None:
        raise HTTPException(404, "no model overview in this process")
    return ctx.models.report()


@api.get("/drift")
def drift(ctx: Ctx, user: CurrentUser) -> list[dict[str, Any]]:
    """Per scanner (calling AE) and protocol: alert, not-assessed and score quartiles over
    time, its baseline and recent windows, whether it departs from its own past, and why."""
    return _drift(ctx).report()


def _drift(ctx: ConsoleContext) -> DriftMonitor:
    return ctx.drift or DriftMonitor(ctx.reads, ctx.reads, ctx.settings.drift.rule())


@api.get("/webhooks/deliveries")
def webhook_deliveries(
    ctx: Ctx, user: Admin, state: Literal["pending", "delivered", "failed"] | None = None
) -> list[dict[str, Any]]:
    return ctx.outbox.deliveries(state=state) if ctx.outbox else []


@api.get("/forwarding")
def forwarding(
    ctx: Ctx,
    user: Admin,
    state: Literal["pending", "sent", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """PACS forwarding: per destination counts and the newest jobs (instances, QA objects)."""
    if ctx.forwarding is None:
        return {"destinations": [], "jobs": []}
    return {"destinations": ctx.forwarding.summary(),
            "jobs": ctx.forwarding.jobs(limit=limit, state=state)}  # fmt: skip


@api.get("/events", response_class=EventSourceResponse)
async def events(
    request: Request,
    user: CurrentUser,
    after: Annotated[int | None, Query(ge=0, le=MAX_DB_INT)] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Live feed (server-sent events): verdict, alert, alert_acknowledged, series_complete,
    progress. Reconnects resume after Last-Event-ID."""
    resume = request.headers.get("last-event-id")
    start = int(resume) if resume and resume.isdigit() and int(resume) <= MAX_DB_INT else after
    async for message in request.app.state.live.subscribe(start):
        ident = message.get("id")
        yield ServerSentEvent(data=message, event=message["kind"],
                              id=str(ident) if ident is not None else None)  # fmt: skip


@api.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, user: CurrentUser) -> dict[str, Any]:
    return request.app.openapi()


# -- pages ---------------------------------------------------------------------------------------

pages = APIRouter(include_in_schema=False)


def _live(ctx: ConsoleContext) -> dict[str, Any]:
    """What every signed-in page needs for the live feed. The feed position is read first:
    an alert committed after it is then replayed to the page, never lost between the two."""
    last = queries.last_event_id(ctx.reads)
    return {"last_event_id": last, "alerts": ctx.alerts.list(state="open")}


def _page(request: Request, name: str, user: Principal | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request,
        name,
        {"user": user, "csrf": csrf_token(request), "may_ack": bool(user and user.may(ACK_ROLES)),
         "may_rate": bool(user and user.may(RATE_ROLES)),
         "is_admin": bool(user and user.may(ADMIN_ROLES)), **context},
    )  # fmt: skip


@pages.get("/login")
def login_form(request: Request, next: str = "/", error: str | None = None) -> HTMLResponse:
    return _page(request, "login.html", None, next=_local(next), error=error)


@pages.post("/login")
async def login(
    request: Request,
    ctx: Ctx,
    username: Annotated[str, Form()],
    password: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/",
) -> Response:
    await check_csrf(request)
    throttle: LoginThrottle = request.app.state.throttle
    address = request.client.host if request.client else "unknown"
    name = username.strip()[:64]
    decision = throttle.check(name, address)
    if decision.refused:
        minutes = max(1, math.ceil(decision.refused_for / 60))
        log.warning("sign-in refused for user %r from %s: %s (%d s left)",
                    name, address, decision.reason, decision.refused_for)  # fmt: skip
        error = f"Too many failed sign-ins. Try again in {minutes} min."
        response = _page(request, "login.html", None, next=_local(next), error=error)
        response.status_code = status.HTTP_429_TOO_MANY_REQUESTS
        response.headers["Retry-After"] = str(math.ceil(decision.refused_for))
        return response
    if decision.delay:
        await asyncio.sleep(decision.delay)
    user = await asyncio.to_thread(ctx.users.authenticate, name, password)
    if user is None:
        locked = throttle.failed(name, address)
        log.warning("failed sign-in for user %r from %s%s", name, address,
                    f"; {' and '.join(locked)} refused for a while" if locked else "")  # fmt: skip
        return _page(request, "login.html", None, next=_local(next),
                     error="Wrong user name or password.")  # fmt: skip
    throttle.succeeded(name)
    request.session.clear()  # a fresh session (and CSRF token) for the signed-in user
    request.session.update(user_id=user.id, csrf=secrets.token_urlsafe(32))
    return RedirectResponse(_local(next), status_code=303)


@pages.post("/logout")
async def logout(request: Request, user: CurrentUser) -> Response:
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


@pages.get("/")
def live_page(request: Request, ctx: Ctx, user: CurrentUser) -> HTMLResponse:
    live = _live(ctx)
    return _page(request, "live.html", user, series=queries.recent_series(ctx.reads, 100),
                 total=queries.count_series(ctx.reads), **live)  # fmt: skip


@pages.get("/series/{series_uid}")
def series_page(series_uid: str, request: Request, ctx: Ctx, user: CurrentUser) -> HTMLResponse:
    live = _live(ctx)
    try:
        series = queries.series_detail(ctx.reads, series_uid)
    except queries.SeriesNotFound as exc:
        raise HTTPException(404, str(exc)) from exc
    ratings = ctx.ratings.for_series(series_uid)
    mine = {(r["sop_instance_uid"], r["frame"]): r["value"] for r in ratings
            if r["rater"] == user.name}  # fmt: skip
    return _page(
        request,
        "series.html",
        user,
        s=series,
        ratings=ratings,
        my_ratings=mine,
        history=ctx.alerts.list(series_uid=series_uid),
        **live,
    )


@pages.get("/alerts")
def alerts_page(request: Request, ctx: Ctx, user: CurrentUser) -> HTMLResponse:
    live = _live(ctx)
    return _page(request, "alerts.html", user, history=ctx.alerts.list(limit=500), **live)


@pages.get("/agreement")
def agreement_page(
    request: Request, ctx: Ctx, user: CurrentUser, level: Literal["slice", "series"] = "slice"
) -> HTMLResponse:
    live = _live(ctx)
    return _page(request, "agreement.html", user, report=ctx.ratings.agreement(level),
                 level=level, **live)  # fmt: skip


@pages.get("/models")
def models_page(request: Request, ctx: Ctx, user: CurrentUser) -> HTMLResponse:
    live = _live(ctx)
    report = ctx.models.report() if ctx.models is not None else None
    return _page(request, "models.html", user, report=report, **live)


@pages.get("/scanners")
def scanners_page(request: Request, ctx: Ctx, user: CurrentUser) -> HTMLResponse:
    live = _live(ctx)
    return _page(request, "scanners.html", user, groups=_drift(ctx).report(),
                 rule=ctx.settings.drift, **live)  # fmt: skip


@pages.get("/admin/webhooks")
def webhooks_page(request: Request, ctx: Ctx, user: Admin) -> HTMLResponse:
    live = _live(ctx)
    return _page(request, "webhooks.html", user,
                 deliveries=ctx.outbox.deliveries() if ctx.outbox else [],
                 webhooks=ctx.settings.webhooks, **live)  # fmt: skip


@pages.get("/admin/forwarding")
def forwarding_page(request: Request, ctx: Ctx, user: Admin) -> HTMLResponse:
    live = _live(ctx)
    data = forwarding(ctx, user, state=None, limit=200)
    return _page(request, "forwarding.html", user, destinations=ctx.settings.pacs.destinations,
                 summary=data["destinations"], jobs=data["jobs"], **live)  # fmt: skip


def _local(target: str) -> str:
    """Only redirect within the console (no open redirect through ?next=)."""
    return target if target.startswith("/") and not target.startswith("//") else "/"


# -- the app -------------------------------------------------------------------------------------


def create_app(ctx: ConsoleContext, session_secret: str) -> FastAPI:
    live = LiveFeed(ctx.reads)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(live.start_at_latest)
        task = asyncio.create_task(live.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(
        title="mriqa-node console API",
        version="1",
        description="Series verdicts, rescan alerts, ratings. Authenticate with "
        "`Authorization: Bearer <token>` (`mriqa token create --user NAME`).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served behind authentication at /api/openapi.json
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.live = live
    console = ctx.settings.console
    app.state.throttle = LoginThrottle(ThrottlePolicy(
        slow_after=console.login_slow_after,
        lock_after=console.login_lock_after,
        lock_after_per_address=console.login_lock_after_per_address,
        lockout_seconds=console.login_lockout_minutes * 60,
        window_seconds=console.login_lockout_minutes * 60,
    ))  # fmt: skip
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret,
        session_cookie="mriqa_session",
        max_age=int(console.session_hours * 3600),
        same_site="strict",
        https_only=bool(console.tls_cert),
    )
    app.include_router(api)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    registry = registry_for(ctx.reads, _drift(ctx), ctx.spool)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> JSONResponse:
        """Liveness, database reachability and spool space, without authentication (for load
        balancers): 503 while the node cannot take instances."""
        body: dict[str, Any] = {"status": "ok", "database": "ok"}
        try:
            with ctx.reads() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            body.update(status="error", database=str(exc)[:200])
        if ctx.spool is not None:
            space = ctx.spool.space()
            body["disk"] = {**space, "status": "low" if space["low"] else "ok"}
            if space["low"]:
                body["status"] = "error"
        if ctx.receiving is not None:
            backlog = ctx.receiving.backlog()
            body["journal"] = {**backlog, "status": "error" if backlog["failing"] else "ok"}
            if backlog["failing"]:
                body["status"] = "error"
        return JSONResponse(body, 503 if body["status"] != "ok" else 200)

    @app.get("/metrics", include_in_schema=False)
    def metrics(user: CurrentUser) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(DataError)
    async def data_error(request: Request, exc: DataError) -> Response:
        # A value the database cannot store or compare (PostgreSQL: a NUL byte in text),
        # from a path, query or body: the request's fault, not the server's.
        return JSONResponse({"detail": "a value the database cannot hold"}, 422)

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
        if wants_page and not request.url.path.startswith("/api/"):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
        return JSONResponse({"detail": "authentication required"}, 401,
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    return app


def load_session_secret(path: Path) -> str:
    """The cookie-signing key: kept in a file readable by the node only, made on first start."""
    path = Path(path)
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_urlsafe(48).encode())
        finally:
            os.close(fd)
    return path.read_text().strip()
