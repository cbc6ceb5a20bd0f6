"""`mriqa`: the node's command line, for people and for scripts (`--json` where it matters)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import click

from mriqa_node.config import ConfigError, Settings, load_config, to_toml

log = logging.getLogger("mriqa_node")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs PDU and dataset dumps (patient data) at DEBUG: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _settings(ctx: click.Context) -> Settings:
    try:
        return load_config(ctx.obj["config"])
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $MRIQA_CONFIG, else built-in defaults).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """mriqa-node: scanner-side MRI quality node."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config


@main.command()
@click.option("--no-worker", is_flag=True, help="Receive only; scoring runs in `mriqa worker`.")
@click.option("--no-console", is_flag=True, help="Do not serve the web console.")
@click.pass_context
def serve(ctx: click.Context, no_worker: bool, no_console: bool) -> None:
    """Run the DICOM receiver, the series monitor, the console and (by default) the worker."""
    from mriqa_node.node import Node

    settings = _settings(ctx)
    setup_logging(settings.logging.level)
    node = Node(settings)
    _start(
        node,
        worker=settings.worker.enabled and not no_worker,
        console=settings.console.enabled and not no_console,
    )
    node.run_until_signalled()


@main.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a scoring worker alone (another host, same PostgreSQL)."""
    from mriqa_node.node import Node

    settings = _settings(ctx)
    setup_logging(settings.logging.level)
    node = Node(settings)
    _start(node, receiver=False, worker=True, monitor=True)
    node.run_until_signalled()


def _start(node, **parts: bool) -> None:
    """Start, turning the errors a person can fix into one clear line."""
    from mriqa_node.ml.artifact import ArtifactError

    try:
        node.start(**parts)
    except (ArtifactError, OSError) as exc:
        node.stop()
        raise click.ClickException(f"cannot start: {exc}") from exc


@main.command()
@click.option("--limit", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Recent series with their state and verdict."""
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.queries import recent_series
    from mriqa_node.services.scoring import WorkQueue

    settings = _settings(ctx)
    engine = make_engine(settings.storage.database_url, readonly=True)
    sessions = make_sessionmaker(engine)
    try:
        rows = recent_series(sessions, limit)
        depth = WorkQueue(sessions).depth()
    except Exception as exc:
        raise click.ClickException(f"cannot read the database: {exc}") from exc
    if as_json:
        click.echo(json.dumps({"queue_depth": depth, "series": rows}, indent=2))
        return
    click.echo(f"queue: {depth} instance(s) waiting for a score")
    header = (
        f"{'series':<40} {'description':<22} {'inst':>4} {'state':<9} {'verdict':<14} score  worst"
    )
    click.echo(header)
    for r in rows:
        score = f"{r['score']:.2f}" if r["score"] is not None else "  - "
        click.echo(
            f"{_ellipsis(r['series_uid'], 40):<40}"
            f" {_ellipsis(r['series_description'] or '-', 22):<22}"
            f" {r['instances']:>4} {r['state']:<9} {r['label'] or '-':<14} {score:>5}"
            f"  {','.join(map(str, r['worst_slices'])) or '-'}"
        )


def _ellipsis(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def score(ctx: click.Context, paths: tuple[Path, ...], as_json: bool) -> None:
    """Score DICOM files or folders offline (no server, no database)."""
    from mriqa_node.dicom.scu import dicom_files
    from mriqa_node.domain.verdict import SeriesPolicy
    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.node import resolve_model
    from mriqa_node.offline import score_files

    settings = _settings(ctx)
    setup_logging("WARNING")
    scorer = Scorer(resolve_model(settings))
    policy = SeriesPolicy.from_dict(scorer.meta.policy).overridden(**settings.verdict.model_dump())
    reports, unreadable = score_files(dicom_files(list(paths)), scorer, policy)
    if as_json:
        out = {
            "model": {"name": scorer.meta.name, "version": scorer.meta.version},
            "series": [r.__dict__ for r in reports],
            "unreadable": unreadable,
        }
        click.echo(json.dumps(out, indent=2))
        return
    for r in reports:
        v = r.verdict
        click.echo(
            f"series {r.series_uid} ({r.description or '-'}): {v['label']}"
            f" score={v['score']} slices={v['n_slices']} unscorable={len(r.unscorable)}"
        )
        for s in r.slices:
            probs = " ".join(f"{k}={p:.3f}" for k, p in s["probabilities"].items())
            click.echo(f"  {s['file']}[{s['frame']}] {probs}")
        for u in r.unscorable:
            click.echo(f"  {u['file']}: unscorable: {u['reason']}")
    for u in unreadable:
        click.echo(f"{u['file']}: {u['reason']}")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "dest", required=True, help="HOST:PORT of the receiver.")
@click.option("--aet", default="MRIQA", show_default=True, help="Called AE title.")
@click.option("--calling-aet", default="SCANNER1", show_default=True)
def send(paths: tuple[Path, ...], dest: str, aet: str, calling_aet: str) -> None:
    """Send DICOM files or folders with C-STORE (a small SCU for demos)."""
    from mriqa_node.dicom.scu import dicom_files, send_files

    host, _, port = dest.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--to")
    setup_logging("WARNING")
    files = dicom_files(list(paths))
    report = send_files(files, host, int(port), called_aet=aet, calling_aet=calling_aet)
    click.echo(f"sent {report.sent} of {len(files)} file(s)")
    if report.failed:
        raise SystemExit(1)


@main.group(name="config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.pass_context
def config_show(ctx: click.Context) -> None:
    """Print the effective configuration (file + environment + defaults) as TOML."""
    click.echo(to_toml(_settings(ctx)))


@main.group(name="db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the Alembic migrations (also done at every `mriqa serve` start)."""
    from mriqa_node.db import migrate
    from mriqa_node.db.engine import make_engine

    settings = _settings(ctx)
    setup_logging("WARNING")
    engine = make_engine(settings.storage.database_url)
    migrate.upgrade(engine)
    click.echo(f"database at revision {migrate.current(engine)}")


@main.group(name="model")
def model_group() -> None:
    """Model artifacts: install a new one (a running node picks it up), show the current one."""


@model_group.command("install")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.pass_context
def model_install(ctx: click.Context, path: Path) -> None:
    """Check an artifact (hash, preprocessing version) and make it the node's model."""
    from mriqa_node.ml.artifact import ArtifactError
    from mriqa_node.ml.store import ModelStore

    settings = _settings(ctx)
    try:
        target, meta = ModelStore(settings.model.dir).install(path)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"installed {meta.name} {meta.version} ({meta.task}) at {target}")
    if settings.model.path:
        click.echo(f"note: [model] path = {settings.model.path} is set and takes precedence")
    else:
        click.echo(f"a running node switches to it within {settings.model.reload_seconds:g} s")


@model_group.command("show")
@click.pass_context
def model_show(ctx: click.Context) -> None:
    """Print the model.json of the model the node would use now."""
    from mriqa_node.node import resolve_model

    settings = _settings(ctx)
    setup_logging("WARNING")
    path = resolve_model(settings)
    click.echo(f"# {path}")
    click.echo((path / "model.json").read_text())


def _users(settings: Settings):
    from mriqa_node.db import migrate
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.users import UserService

    engine = make_engine(settings.storage.database_url)
    migrate.upgrade(engine)
    return UserService(make_sessionmaker(engine))


@main.group(name="user")
def user_group() -> None:
    """Console users (roles: technologist, radiologist, admin)."""


@user_group.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["technologist", "radiologist", "admin"]), required=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin (scripts).")
@click.option("--replace", is_flag=True, help="Reset the password and role of an existing user.")
@click.pass_context
def user_add(ctx: click.Context, name: str, role: str, password_stdin: bool, replace: bool) -> None:
    """Add a console user; the password is prompted for (or read from stdin)."""
    from mriqa_node.services.users import UserError

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        user = _users(_settings(ctx)).add(name, role, password, replace=replace)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"user {user.name} ({user.role.value}) saved")


@user_group.command("list")
@click.pass_context
def user_list(ctx: click.Context) -> None:
    for u in _users(_settings(ctx)).list():
        state = "" if u["active"] else " (inactive)"
        click.echo(f"{u['name']:<24} {u['role']:<13} since {u['created_at']}{state}")


@main.group(name="token")
def token_group() -> None:
    """API bearer tokens (Authorization: Bearer <token>)."""


@token_group.command("create")
@click.option("--user", "name", required=True)
@click.option("--label", default=None, help="What the token is for, e.g. 'prometheus'.")
@click.pass_context
def token_create(ctx: click.Context, name: str, label: str | None) -> None:
    """Create a token and print it once (only its hash is kept)."""
    from mriqa_node.services.users import UserError

    try:
        click.echo(_users(_settings(ctx)).create_token(name, label))
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc


@token_group.command("revoke")
@click.option("--user", "name", required=True)
@click.pass_context
def token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke every token of a user."""
    from mriqa_node.services.users import UserError

    try:
        n = _users(_settings(ctx)).revoke_tokens(name)
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{n} token(s) revoked")


@main.group(name="ratings")
def ratings_group() -> None:
    """Ratings collected in the console (the labels for offline retraining)."""


@ratings_group.command("export")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.pass_context
def ratings_export(ctx: click.Context, out: Path) -> None:
    """Write the slice ratings as a training manifest (`mriqa-train train --manifest OUT`).

    Patient IDs become keyed pseudonyms (the key is the node's console secret)."""
    from mriqa_node.console.app import load_session_secret
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.ratings import RatingService

    settings = _settings(ctx)
    engine = make_engine(settings.storage.database_url, readonly=True)
    key = load_session_secret(settings.console.secret_file).encode()
    n = RatingService(make_sessionmaker(engine)).export_manifest(
        out, settings.storage.spool_dir, pseudonym_key=key
    )
    engine.dispose()
    click.echo(f"{n} rated slice(s) written to {out}")


@main.command()
@click.option("--series", "n_series", default=4, show_default=True, help="Series to send.")
@click.option("--slices", default=30, show_default=True)
@click.option(
    "--keep-running/--exit",
    default=True,
    show_default=True,
    help="Keep serving after the demo series are decided.",
)
@click.pass_context
def demo(ctx: click.Context, n_series: int, slices: int, keep_running: bool) -> None:
    """Run the node with embedded defaults and a demo scanner sending series to it."""
    from mriqa_node.demo import run_demo

    settings = _settings(ctx)
    setup_logging(settings.logging.level)
    run_demo(settings, n_series, slices, keep_running, threading.Event())


if __name__ == "__main__":
    main()
