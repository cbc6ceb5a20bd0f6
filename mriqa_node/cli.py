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


CONFIG_HELP = "TOML config file (default: $MRIQA_CONFIG, else built-in defaults)."


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["config"] = value


class _Group(click.Group):
    """A group whose commands all take ``--config`` too, so ``mriqa serve --config FILE`` works
    as well as ``mriqa --config FILE serve`` (sub-groups are of this class as well)."""

    group_class = type

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group) and not any(p.name == "config" for p in cmd.params):
            cmd.params.append(click.Option(
                ["--config"], type=click.Path(dir_okay=False), expose_value=False,
                callback=_remember_config, help=CONFIG_HELP,
            ))  # fmt: skip
        super().add_command(cmd, name)


@click.group(cls=_Group)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help=CONFIG_HELP)  # fmt: skip
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
    from mriqa_node.services.forwarding import ForwardQueue
    from mriqa_node.services.queries import recent_series
    from mriqa_node.services.scoring import WorkQueue

    settings = _settings(ctx)
    engine = make_engine(settings.storage.database_url, readonly=True)
    sessions = make_sessionmaker(engine)
    try:
        rows = recent_series(sessions, limit)
        depth = WorkQueue(sessions).depth()
        forwarding = ForwardQueue(sessions).summary()
    except Exception as exc:
        raise click.ClickException(f"cannot read the database: {exc}") from exc
    if as_json:
        out = {"queue_depth": depth, "forwarding": forwarding, "series": rows}
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"queue: {depth} instance(s) waiting for a score")
    for f in forwarding:
        oldest = f" (oldest pending since {f['oldest_pending']})" if f["oldest_pending"] else ""
        error = f"; last error: {f['last_error']}" if f["last_error"] and f["pending"] else ""
        click.echo(f"forward to {f['destination']}: {f['pending']} pending{oldest}, "
                   f"{f['sent']} sent, {f['failed']} failed{error}")  # fmt: skip
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
            + (f"  {r['reason']}" if r["reason"] else "")
        )


@main.command()
@click.argument("series_uid")
@click.option("--by", default=None, help="Who rejects it (default: the login name).")
@click.pass_context
def reject(ctx: click.Context, series_uid: str, by: str | None) -> None:
    """Reject a series for quality reasons: an IOCM rejection note (KOS 113001) is queued for
    the PACS destinations; the running node sends it."""
    from mriqa_node.db import migrate
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.node import pacs_publisher
    from mriqa_node.services.pacs import NotRejectable
    from mriqa_node.spool import Spool

    settings = _settings(ctx)
    engine = make_engine(settings.storage.database_url)
    try:
        migrate.upgrade(engine)
        sessions = make_sessionmaker(engine)
        spool = Spool(settings.storage.spool_dir, fsync=settings.storage.fsync)
        kos = pacs_publisher(settings, sessions, sessions, spool).reject(
            series_uid, by or _login_name()
        )
    except NotRejectable as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        engine.dispose()
    if kos is None:
        click.echo(f"series {series_uid} was already rejected")
    elif settings.pacs.destinations:
        names = ", ".join(d.name for d in settings.pacs.destinations if d.send_kos)
        click.echo(f"series {series_uid} rejected; rejection note {kos} queued for {names}")
    else:
        click.echo(f"series {series_uid} rejected (no PACS destination configured)")


def _login_name() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except OSError:
        return "cli"


def _ellipsis(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--explain-scope", is_flag=True, help="Show which scope rule decided for each series."
)
@click.option("--calling-aet", default=None, help="As if sent by this AE (for site rules).")
@click.pass_context
def score(ctx: click.Context, paths: tuple[Path, ...], as_json: bool, explain_scope: bool,
          calling_aet: str | None) -> None:  # fmt: skip
    """Score DICOM files or folders offline (no server, no database), with the node's scope:
    the model's own and the config's [scope] rules."""
    from mriqa_node.dicom.scu import dicom_files
    from mriqa_node.domain.scope import Scope
    from mriqa_node.domain.verdict import SeriesPolicy
    from mriqa_node.ml.scorer import Scorer
    from mriqa_node.node import resolve_model, site_scope_rules
    from mriqa_node.offline import score_files

    settings = _settings(ctx)
    setup_logging("WARNING")
    scorer = Scorer(resolve_model(settings))
    policy = SeriesPolicy.from_dict(scorer.meta.policy).overridden(**settings.verdict.model_dump())
    scope = Scope.of(scorer.meta.scope, site_scope_rules(settings))
    reports, unreadable = score_files(dicom_files(list(paths)), scorer, policy, scope=scope,
                                      calling_aet=calling_aet)  # fmt: skip
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
            + (f" ({v['reason']})" if v["reason"] else "")
        )
        if explain_scope:
            for rule, n in r.scope.items():
                click.echo(f"  scope: {n} instance(s): {rule}")
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
    """Model artifacts: install one (a running node picks it up) or a shadow candidate,
    compare, promote under a guard, roll back, show, history."""


@model_group.command("install")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--shadow",
    is_flag=True,
    help="A candidate: scored beside the active model on every series, never alerting.",
)
@click.pass_context
def model_install(ctx: click.Context, path: Path, shadow: bool) -> None:
    """Check an artifact (hash, preprocessing version) and make it the node's model (or, with
    --shadow, the candidate `mriqa model compare` and `promote` judge)."""
    from mriqa_node.ml.artifact import ArtifactError
    from mriqa_node.ml.store import ModelStore

    settings = _settings(ctx)
    try:
        target, meta = ModelStore(settings.model.dir).install(path, shadow=shadow)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    role = "as the shadow candidate" if shadow else ""
    click.echo(f"installed {meta.name} {meta.version} ({meta.task}) {role} at {target}")
    if settings.model.path and not shadow:
        click.echo(f"note: [model] path = {settings.model.path} is set and takes precedence")
    else:
        click.echo(f"a running node switches to it within {settings.model.reload_seconds:g} s")


def _comparison(settings: Settings, min_labelled: int = 1):
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.ml.store import ModelStore
    from mriqa_node.node import resolve_model
    from mriqa_node.services.models import ModelOverview

    engine = make_engine(settings.storage.database_url, readonly=True)
    try:
        overview = ModelOverview(make_sessionmaker(engine), ModelStore(settings.model.dir),
                                 lambda: resolve_model(settings))  # fmt: skip
        compared = overview.compare(min_labelled)
    finally:
        engine.dispose()
    if compared is None:
        raise click.ClickException("no shadow model installed (mriqa model install PATH --shadow)")
    return compared


@model_group.command("compare")
@click.option("--json", "as_json", is_flag=True, help="The whole comparison as JSON.")
@click.pass_context
def model_compare(ctx: click.Context, as_json: bool) -> None:
    """The shadow candidate against the active model: where their verdicts differ, and both
    against the site's feedback (acknowledgements, series ratings)."""
    setup_logging("WARNING")
    c = _comparison(_settings(ctx))
    if as_json:
        click.echo(json.dumps(c.to_json(), indent=2))
        return
    click.echo(f"active    {_model_name(c.active)}\ncandidate {_model_name(c.candidate)}")
    click.echo(f"series with both verdicts: {c.series}; the same alert decision: {c.agree}")
    for (a, b), n in sorted(c.agreement.items()):
        click.echo(f"  active {a:<15} candidate {b:<15} {n}")
    for d in c.differing:
        click.echo(f"  differs: {d['series_uid']} {d['description'] or '-'} from"
                   f" {d['calling_aet'] or '-'}: active {d['active']}, candidate {d['candidate']},"
                   f" feedback {d['feedback'] or '-'}")  # fmt: skip
    click.echo(f"against feedback, active:    {c.active_rates.describe()}")
    click.echo(f"against feedback, candidate: {c.candidate_rates.describe()}")
    verdict = "may be promoted" if c.judgement.allowed else "would be refused: "
    click.echo(f"the candidate {verdict}{'; '.join(c.judgement.reasons)}")


def _model_name(model: dict) -> str:
    return f"{model.get('name', '?')} {model.get('version', model['sha256'][:12])}"


@model_group.command("promote")
@click.option("--why", required=True, help="Recorded with the promotion.")
@click.option("--by", "by", default=None, help="Who promotes (default: the login name).")
@click.option(
    "--min-labelled",
    default=10,
    show_default=True,
    help="Labelled series with verdicts of both models the guard needs.",
)
@click.option("--force", is_flag=True, help="Promote even if the guard refuses (recorded).")
@click.pass_context
def model_promote(ctx: click.Context, why: str, by: str | None, min_labelled: int,
                  force: bool) -> None:  # fmt: skip
    """Make the shadow candidate the node's model, if it does no worse than the active one on
    the node's labelled series (sensitivity, false alerts); a running node switches to it."""
    from mriqa_node.ml.store import ModelStore

    settings = _settings(ctx)
    setup_logging("WARNING")
    c = _comparison(settings, min_labelled)
    click.echo(f"active:    {c.active_rates.describe()}")
    click.echo(f"candidate: {c.candidate_rates.describe()}")
    if not c.judgement.allowed and not force:
        raise click.ClickException("refused: " + "; ".join(c.judgement.reasons)
                                   + " (--force to promote anyway)")  # fmt: skip
    reasons = "" if c.judgement.allowed else f" [forced past: {'; '.join(c.judgement.reasons)}]"
    target = ModelStore(settings.model.dir).promote(by=by, why=why + reasons)
    click.echo(f"promoted {target.name}; a running node switches to it within"
               f" {settings.model.reload_seconds:g} s")  # fmt: skip


@model_group.command("rollback")
@click.option("--why", required=True, help="Recorded with the rollback.")
@click.option("--by", "by", default=None, help="Who rolls back (default: the login name).")
@click.pass_context
def model_rollback(ctx: click.Context, why: str, by: str | None) -> None:
    """Return to the model that was current before (no restart)."""
    from mriqa_node.ml.store import ModelStore, StoreError

    settings = _settings(ctx)
    try:
        target = ModelStore(settings.model.dir).rollback(by=by, why=why)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"rolled back to {target.name}")


@model_group.command("history")
@click.pass_context
def model_history(ctx: click.Context) -> None:
    """Who installed, promoted and rolled back which model, when and why."""
    from mriqa_node.ml.store import ModelStore

    for e in ModelStore(_settings(ctx).model.dir).history():
        click.echo(f"{e['at']}  {e['action']:<15} {e.get('from') or '-'} -> {e['to']}"
                   f"  by {e.get('by') or '-'}: {e.get('why') or ''}")  # fmt: skip


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
@click.option(
    "--feedback",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the series-level labels (series ratings, alert acknowledgements)"
    " with their kind and rater, and the model's verdict, to this CSV.",
)
@click.pass_context
def ratings_export(ctx: click.Context, out: Path, feedback: Path | None) -> None:
    """Write the slice ratings as a training manifest (`mriqa-train train --manifest OUT`).

    Patient IDs become keyed pseudonyms (the key is the node's console secret)."""
    from mriqa_node.console.app import load_session_secret
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.ratings import RatingService

    settings = _settings(ctx)
    engine = make_engine(settings.storage.database_url, readonly=True)
    key = load_session_secret(settings.console.secret_file).encode()
    ratings = RatingService(make_sessionmaker(engine))
    n = ratings.export_manifest(out, settings.storage.spool_dir, pseudonym_key=key)
    click.echo(f"{n} rated slice(s) written to {out}")
    if feedback is not None:
        m = ratings.export_feedback(feedback, pseudonym_key=key)
        click.echo(f"{m} series label(s) (ratings, acknowledgements) written to {feedback}")
    engine.dispose()


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


# -- PACS query/retrieve ---------------------------------------------------------------------


@main.group(name="pacs")
def pacs_group() -> None:
    """Query the PACS ([pacs.query]) and pull studies into the node for retrospective QA.

    The PACS must know this node: its AE title ([dicom] ae_title), host and DICOM port, both
    to answer queries from it and to send it what `pacs pull` asks for. The node must allow
    the PACS's AE title as a caller ([dicom] allowed_calling_aets).
    """


def _pacs_setup(ctx: click.Context):
    """Settings and the query peer; a clear error when [pacs.query] is missing."""
    settings = _settings(ctx)
    setup_logging("WARNING")
    # pynetdicom logs connection failures (and TLS tracebacks) on its own; QRError says it all.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    peer = settings.pacs.query
    if peer is None:
        raise click.ClickException(
            "no PACS to query: add a [pacs.query] table (ae_title, host, port) to the"
            " configuration, and register this node's AE title"
            f" ({settings.dicom.ae_title}), host and DICOM port on that PACS"
        )
    return settings, peer


_DATE = click.DateTime(formats=["%Y-%m-%d"])


def _dicom_date(value: str | None) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if value and len(value) == 8 else value or "-"


@pacs_group.command("find")
@click.option(
    "--level",
    type=click.Choice(["study", "series"], case_sensitive=False),
    default="study",
    show_default=True,
)
@click.option("--from", "date_from", type=_DATE, default=None, help="Study date on or after.")
@click.option("--to", "date_to", type=_DATE, default=None, help="Study date on or before.")
@click.option(
    "--modality",
    default="MR",
    show_default=True,
    help="Modality (in study, or of the series); '*' for any.",
)
@click.option(
    "--description",
    default=None,
    help="Study (--level study) or series description; wildcards * and ?, case-sensitive.",
)
@click.option("--study", "study_uid", default=None, help="Study Instance UID.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def pacs_find(
    ctx: click.Context,
    level: str,
    date_from,
    date_to,
    modality: str,
    description: str | None,
    study_uid: str | None,
    as_json: bool,
) -> None:
    """Find studies or series on the PACS (C-FIND). No patient names or IDs are shown."""
    from mriqa_node.dicom.qr import QRError, find

    settings, peer = _pacs_setup(ctx)
    try:
        rows = find(
            peer,
            settings.dicom.ae_title,
            level.upper(),
            date_from=date_from.date() if date_from else None,
            date_to=date_to.date() if date_to else None,
            modality=None if modality in ("", "*") else modality,
            description=description or None,
            study_uid=study_uid,
        )
    except (QRError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if level.lower() == "study":
        click.echo(
            f"{'date':<10} {'time':<6} {'modalities':<10} {'ser':>3} {'inst':>5}"
            f" {'accession':<16} {'description':<24} study"
        )
        for r in rows:
            click.echo(
                f"{_dicom_date(r['StudyDate']):<10} {(r['StudyTime'] or '-')[:6]:<6}"
                f" {_ellipsis(','.join(r['ModalitiesInStudy']) or '-', 10):<10}"
                f" {_count(r['NumberOfStudyRelatedSeries']):>3}"
                f" {_count(r['NumberOfStudyRelatedInstances']):>5}"
                f" {_ellipsis(r['AccessionNumber'] or '-', 16):<16}"
                f" {_ellipsis(r['StudyDescription'] or '-', 24):<24} {r['StudyInstanceUID']}"
            )
    else:
        click.echo(f"{'study':<40} {'no':>4} {'mod':<4} {'inst':>5} {'description':<24} series")
        for r in rows:
            click.echo(
                f"{_ellipsis(r['StudyInstanceUID'] or '-', 40):<40}"
                f" {_count(r['SeriesNumber']):>4} {r['Modality'] or '-':<4}"
                f" {_count(r['NumberOfSeriesRelatedInstances']):>5}"
                f" {_ellipsis(r['SeriesDescription'] or '-', 24):<24} {r['SeriesInstanceUID']}"
            )
    click.echo(f"{len(rows)} {level.lower()} match(es)", err=True)


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


@pacs_group.command("pull")
@click.argument("study_uid")
@click.option("--series", "series_uid", default=None, help="Only this series of the study.")
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait until the node has decided every pulled series, and print the verdicts.",
)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait (--wait).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def pacs_pull(
    ctx: click.Context,
    study_uid: str,
    series_uid: str | None,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """C-MOVE a study (or one series) from the PACS to this node's AE title.

    The running node (`mriqa serve`) receives it like a scanner send and scores it; with
    --wait this polls the node's database until each pulled series has a verdict."""
    from mriqa_node.dicom.qr import PacsQR, QRError
    from mriqa_node.domain.retrieve import NothingToPull
    from mriqa_node.services import retrieve

    settings, peer = _pacs_setup(ctx)
    our_aet = settings.dicom.ae_title
    pacs = PacsQR(peer, our_aet)
    try:
        plan = retrieve.plan(pacs, study_uid, series_uid)
    except NothingToPull as exc:
        raise click.ClickException(str(exc)) from exc
    except QRError as exc:
        raise click.ClickException(str(exc)) from exc
    if not as_json:
        click.echo(
            f"pulling {len(plan.series)} series ({plan.expected_instances} instance(s)) of study"
            f" {study_uid} from {peer.ae_title} to {our_aet}"
        )
        for s in plan.skipped:
            click.echo(f"skipping {s['Modality'] or '?'} series {s['SeriesInstanceUID']}")
    try:
        result = retrieve.pull(pacs, study_uid, plan)
    except QRError as exc:
        raise click.ClickException(str(exc)) from exc
    if not as_json:
        click.echo(
            f"moved: {result.completed} completed, {result.failed} failed,"
            f" {result.warning} warning (status 0x{result.status:04X})"
        )
    if result.completed + result.warning == 0:
        raise click.ClickException(
            f"nothing was moved: {peer.ae_title} sent no instance of study {study_uid}"
        )
    rows: list[dict] = []
    if wait:
        rows = _wait_for_verdicts(settings, plan.series_uids, timeout)
    if as_json:
        out = {"study_uid": study_uid, "move": result.as_dict(), "series": rows}
        click.echo(json.dumps(out, indent=2))
    elif rows:
        click.echo(
            f"{'series':<40} {'description':<22} {'inst':>4} {'state':<12} {'verdict':<14} score"
        )
        for r in rows:
            score = f"{r['score']:.2f}" if r.get("score") is not None else "-"
            click.echo(
                f"{_ellipsis(r['series_uid'], 40):<40}"
                f" {_ellipsis(r.get('series_description') or '-', 22):<22}"
                f" {r.get('instances', 0):>4} {r['state']:<12} {r.get('label') or '-':<14}"
                f" {score}"
            )
    undecided = [r for r in rows if r["state"] != "decided"]
    if result.failed or undecided:
        problems = []
        if result.failed:
            problems.append(f"{result.failed} instance(s) failed to move")
        if undecided:
            problems.append(f"{len(undecided)} series without a verdict")
        raise click.ClickException("; ".join(problems))


def _wait_for_verdicts(settings: Settings, series_uids: list[str], timeout: float) -> list[dict]:
    from mriqa_node.db.engine import make_engine, make_sessionmaker
    from mriqa_node.services.retrieve import wait_for_verdicts

    engine = make_engine(settings.storage.database_url, readonly=True)
    try:
        return wait_for_verdicts(make_sessionmaker(engine), series_uids, timeout)
    except Exception as exc:
        raise click.ClickException(f"cannot read the node database: {exc}") from exc
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
