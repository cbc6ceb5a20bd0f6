"""The model life cycle at the site: a shadow candidate scored beside the active model, compared
on the node's series and feedback, promoted only past the guard, rolled back."""

from __future__ import annotations

import csv
import json
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import tomli_w
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from mriqa_node.cli import main
from mriqa_node.config import load_config
from mriqa_node.console.app import ConsoleContext, create_app
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Alert, Series, ShadowScore, ShadowVerdict, SliceScore
from mriqa_node.dicom.scu import send_datasets
from mriqa_node.domain.evaluation import Rates, judge_promotion, wilson
from mriqa_node.ml.artifact import untrained_convnet_artifact
from mriqa_node.ml.store import ModelStore, StoreError
from mriqa_node.node import Node, resolve_model
from mriqa_node.phantom import synth_series, write_series
from mriqa_node.services.alerts import AlertService
from mriqa_node.services.models import ModelComparisons, ModelOverview
from mriqa_node.services.ratings import RatingService
from mriqa_node.services.users import UserService
from tests.conftest import TINY_WIDTHS, storescu, write_config
from tests.peers import NodeProcess, free_port, wait_for
from tests.test_node_e2e import mriqa_cli


def _artifact(directory: Path, seed: int, series_threshold: float) -> Path:
    """A tiny untrained model whose series threshold makes its alerts certain: 0 alerts on
    every series, 1 on none (an untrained model is never that sure)."""
    untrained_convnet_artifact(directory, seed=seed, widths=TINY_WIDTHS)
    meta = json.loads((directory / "model.json").read_text())
    meta["policy"] = {**meta.get("policy", {}), "series_threshold": series_threshold,
                      "slice_threshold": 0.5}  # fmt: skip
    (directory / "model.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lifecycle-models")
    return _artifact(root / "alerts", 1, 0.0), _artifact(root / "quiet", 2, 1.0)


def test_store_shadow_promote_rollback_and_history(tmp_path: Path, models) -> None:
    loud, quiet = models
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match="no shadow"):
        store.promote(by="ml", why="nothing there")
    store.install(loud, by="ml", why="first")
    store.install(quiet, shadow=True, by="ml", why="candidate")
    assert store.current().name.startswith("convnet-untrained-0.0.0+seed1")
    assert store.shadow().name.startswith("convnet-untrained-0.0.0+seed2")
    promoted = store.promote(by="ml", why="better on 40 series")
    assert store.current() == promoted and store.shadow() is None
    assert store.rollback(by="ml", why="alerts at night").name.startswith(
        "convnet-untrained-0.0.0+seed1"
    )
    assert [e["action"] for e in store.history()] == ["install", "install-shadow", "promote",
                                                       "rollback"]  # fmt: skip
    assert store.history()[2]["why"] == "better on 40 series"
    with pytest.raises(StoreError, match="no earlier model"):
        ModelStore(tmp_path / "empty").rollback()


def test_the_guard_refuses_a_worse_candidate_and_says_why() -> None:
    active = Rates.of([(True, True)] * 9 + [(True, False)] + [(False, False)] * 19 +
                      [(False, True)])  # fmt: skip
    fewer = Rates.of([(True, True)] * 8 + [(True, False)] * 2 + [(False, False)] * 20)
    judged = judge_promotion(active, fewer)
    assert not judged.allowed and "catches fewer" in judged.reasons[0]
    louder = Rates.of([(True, True)] * 10 + [(False, False)] * 17 + [(False, True)] * 3)
    assert "more false alerts" in judge_promotion(active, louder).reasons[0]
    better = Rates.of([(True, True)] * 10 + [(False, False)] * 20)
    assert judge_promotion(active, better).allowed
    assert not judge_promotion(active, better, min_labelled=50).allowed
    lo, hi = wilson(9, 10)
    assert 0.59 < lo < 0.60 and 0.98 < hi < 0.99  # the textbook interval for 9 of 10
    assert wilson(0, 0) == (0.0, 1.0)


def _node_settings(tmp_path: Path):
    """A node on SQLite with models installed (not pinned), and the same settings as the
    environment the CLI commands read: (DICOM port, settings, environment)."""
    port = free_port()
    settings = load_config(
        None,
        dicom={"port": port},
        storage={"spool_dir": str(tmp_path / "spool"),
                 "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        model={"dir": str(tmp_path / "models"), "reload_seconds": 0.2},
    )  # fmt: skip
    env = {"MRIQA_MODEL__DIR": str(settings.model.dir),
           "MRIQA_STORAGE__DATABASE_URL": settings.storage.database_url,
           "MRIQA_STORAGE__SPOOL_DIR": str(settings.storage.spool_dir),
           "MRIQA_CONSOLE__SECRET_FILE": str(tmp_path / "console.secret")}  # fmt: skip
    return port, settings, env


def _wait(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_shadow_scores_beside_the_active_model_and_is_promoted_past_the_guard(
    tmp_path: Path, models
) -> None:
    loud, quiet = models
    port, settings, env = _node_settings(tmp_path)
    store = ModelStore(settings.model.dir)
    store.install(loud)
    node = Node(settings)
    node.start()
    try:
        installed = CliRunner().invoke(main, ["model", "install", str(quiet), "--shadow"], env=env)
        assert installed.exit_code == 0 and "as the shadow candidate" in installed.output
        _wait(lambda: node.worker.shadow is not None, what="the shadow model loaded")
        sent = [synth_series(4, size=64, seed=60 + k) for k in range(3)]
        for datasets in sent:
            assert send_datasets(datasets, "127.0.0.1", port).sent == 4
        uids = [d[0].SeriesInstanceUID for d in sent]

        def shadow_verdicts() -> bool:
            with node.sessions() as s:
                return s.query(ShadowVerdict).count() >= 3

        _wait(shadow_verdicts, what="three shadow verdicts")
        with node.sessions() as s:
            # Both models scored every slice; only the active one's scores are SliceScores,
            # and only the active one alerted (on all three, the candidate on none).
            assert s.query(SliceScore).count() == s.query(ShadowScore).count() == 12
            alerts = s.scalars(select(Alert)).all()
            assert {s.get(Series, a.series_id).series_uid for a in alerts} == set(uids)
            assert {v.label for v in s.scalars(select(ShadowVerdict))} == {"diagnostic"}
        assert node.worker.shadow_seconds > 0

        compared = CliRunner().invoke(main, ["model", "compare", "--json"], env=env)
        assert compared.exit_code == 0, compared.output
        report = json.loads(compared.output)
        assert report["series"] == 3 and report["agree"] == 0
        assert {d["series_uid"] for d in report["differing"]} == set(uids)

        # Feedback: the technologist rescanned two of them, so the alerts were right; the
        # candidate would have missed both, and the guard refuses it.
        users = UserService(node.sessions)
        tech = users.add("tech", "technologist", "pw-tech-123456")
        acks = AlertService(node.sessions)
        for alert in alerts[:2]:
            acks.acknowledge(alert.id, tech, "rescanned")
        refused = CliRunner().invoke(main, ["model", "promote", "--why", "try",
                                            "--min-labelled", "2"], env=env)  # fmt: skip
        assert refused.exit_code != 0 and "catches fewer non-diagnostic series" in refused.output
        assert store.shadow() is not None and resolve_model(settings) == store.current()

        # Two radiologists rate all three series diagnostic (ratings outweigh the
        # acknowledgements): the active model's alerts were all false, the candidate's
        # silence right; the guard lets it through.
        ratings = RatingService(node.sessions)
        for name in ("rad1", "rad2"):
            rad = users.add(name, "radiologist", f"pw-{name}-123456")
            for uid in uids:
                ratings.rate(rad, uid, 1)
        # The feedback as labels: the series-level export (kind, rater, label, verdict) and
        # the Agreement page's summary per scanner and protocol.
        feedback = tmp_path / "feedback.csv"
        exported = CliRunner().invoke(main, ["ratings", "export", str(tmp_path / "slices.csv"),
                                             "--feedback", str(feedback)], env=env)  # fmt: skip
        assert exported.exit_code == 0, exported.output
        with feedback.open() as fh:
            rows = list(csv.DictReader(fh))
        kinds = sorted((r["kind"], r["rater"], r["label"]) for r in rows)
        assert kinds == [("ack:rescanned", "tech", "0")] * 2 + [
            ("rating", rater, "1") for rater in ("rad1", "rad1", "rad1", "rad2", "rad2", "rad2")
        ]
        assert {r["model_verdict"] for r in rows} == {"non_diagnostic"}
        assert all(r["patient_id"].startswith("P") for r in rows)  # pseudonyms, never the ID
        (scanner,) = ratings.feedback_by_scanner()
        assert (scanner["calling_aet"], scanner["series"], scanner["alerts"]) == ("SCANNER1", 3, 3)
        assert (scanner["answered"], scanner["rescanned"], scanner["alert_precision"]) == (
            2,
            2,
            1.0,
        )

        # The console's Models page and API show the same comparison, linked to the series.
        admin_token = users.create_token(users.add("admin", "admin", "pw-admin-123456").name)
        ctx = ConsoleContext(
            settings=settings, reads=node.reads, users=users, alerts=acks, ratings=ratings,
            images=node.slice_images,
            models=ModelOverview(node.reads, store, lambda: resolve_model(settings)),
        )  # fmt: skip
        with TestClient(create_app(ctx, "test-secret")) as client:
            auth = {"Authorization": f"Bearer {admin_token}"}
            report = client.get("/api/models", headers=auth).json()
            assert report["candidate"]["version"] == "0.0.0+seed2"
            assert report["comparison"]["series"] == 3
            page = client.get("/models", headers=auth)
            assert page.status_code == 200 and "Series where they differ" in page.text
            assert all(f'href="/series/{uid}"' in page.text for uid in uids)

        c = ModelComparisons(node.sessions).compare(
            node.worker.scorer.meta.sha256, node.worker.shadow.meta.sha256, min_labelled=3
        )
        assert (c.active_rates.false_alerts, c.candidate_rates.false_alerts) == (3, 0)
        promoted = CliRunner().invoke(
            main,
            ["model", "promote", "--why", "no false alerts", "--by", "ml", "--min-labelled", "3"],
            env=env,
        )
        assert promoted.exit_code == 0, promoted.output
        _wait(lambda: node.worker.scorer.meta.version == "0.0.0+seed2", what="the promotion")
        _wait(lambda: node.worker.shadow is None, what="the shadow to stop")

        rolled = CliRunner().invoke(main, ["model", "rollback", "--why", "test"], env=env)
        assert rolled.exit_code == 0, rolled.output
        _wait(lambda: node.worker.scorer.meta.version == "0.0.0+seed1", what="the rollback")
        history = CliRunner().invoke(main, ["model", "history"], env=env)
        assert "promote" in history.output and "by ml: no false alerts" in history.output
    finally:
        node.stop()


@pytest.mark.slow
def test_retraining_from_the_nodes_own_ratings_end_to_end(tmp_path: Path, models) -> None:
    """`mriqa serve`, storescu as the scanner: slices rated through the console API, exported,
    a model fine-tuned from the node's own on that export, exported with its operating point,
    installed as the shadow of the running node and compared with the active one."""
    from training.cli import main as train_main

    loud, _ = models
    config, console, cli = _served(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}")
    cli("model", "install", str(loud))
    port = tomllib.loads(config.read_text())["dicom"]["port"]
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        # Three subjects, a clean and a moving series each: a train, a val and a test one.
        sent = [
            synth_series(
                4, size=64, seed=80 + k, motion=1.0 if k % 2 else 0.0, patient_id=f"SUBJ{k // 2}"
            )
            for k in range(6)
        ]
        for k, datasets in enumerate(sent):
            storescu(port, write_series(datasets, tmp_path / f"s{k}"))
        auth = _token(config, "rad", "radiologist")

        def decided() -> bool:
            rows = httpx.get(f"{console}/api/series", headers=auth).json()["items"]
            return sum(r["state"] == "decided" for r in rows) == 6

        wait_for(decided, 60, what="six verdicts")
        for k, datasets in enumerate(sent):
            for ds in datasets:
                r = httpx.post(f"{console}/api/ratings", headers=auth, json={
                    "series_uid": ds.SeriesInstanceUID, "sop_instance_uid": ds.SOPInstanceUID,
                    "value": 0 if k % 2 else 2})  # fmt: skip
                assert r.status_code == 200, r.text
        manifest = tmp_path / "slices.csv"
        assert "24 rated slice(s)" in cli("ratings", "export", str(manifest))

        run, artifact = tmp_path / "run", tmp_path / "retrained"
        for args in (
            ["train", "--manifest", str(manifest), "--out", str(run), "--label", "rater1",
             "--steps", "4", "--batch", "4", "--widths", ",".join(map(str, TINY_WIDTHS)),
             "--eval-every", "2", "--fractions", "0.34,0.33,0.33", "--init-from", str(loud),
             "--cache-dir", str(tmp_path / "cache")],
            ["export", str(run), "--out", str(artifact), "--version", "0.1.0"],
        ):  # fmt: skip
            result = CliRunner().invoke(train_main, args, catch_exceptions=False)
            assert result.exit_code == 0, result.output
        assert json.loads((run / "config.json").read_text())["init_from"] == str(loud)
        assert "as the shadow candidate" in cli("model", "install", str(artifact), "--shadow")
        wait_for(lambda: "shadow model:" in node.log(), 60, what="the retrained shadow loaded")
        storescu(port, write_series(synth_series(4, size=64, seed=99), tmp_path / "after"))

        def compared() -> dict | None:
            done = mriqa_cli(config, "model", "compare", "--json")
            assert done.returncode == 0, done.stderr
            c = json.loads(done.stdout)
            return c if c["series"] == 1 else None

        report = wait_for(compared, 60, what="the candidate's verdict beside the active one")
        assert "0.1.0" in json.dumps(report["candidate"]), report["candidate"]
    finally:
        node.stop()


def _served(tmp_path: Path, db_url: str):
    """A `mriqa serve` config with models installed (not pinned): (config, console URL, a
    function that runs the `mriqa` command line on it and returns its output)."""
    port, console_port = free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml", port, db_url, tmp_path,
        console={"port": console_port, "secret_file": str(tmp_path / "console.secret")},
    )  # fmt: skip
    settings = tomllib.loads(config.read_text())
    settings["model"] = {"dir": str(tmp_path / "models"), "reload_seconds": 0.3}
    config.write_text(tomli_w.dumps(settings))

    def cli(*args: str, ok: bool = True) -> str:
        done = mriqa_cli(config, *args)
        assert (done.returncode == 0) == ok, done.stdout + done.stderr
        return done.stdout + done.stderr

    return config, f"http://127.0.0.1:{console_port}", cli


def _token(config: Path, name: str, role: str) -> dict[str, str]:
    """A user of the node's database and its bearer header."""
    engine = make_engine(tomllib.loads(config.read_text())["storage"]["database_url"])
    users = UserService(make_sessionmaker(engine))
    users.add(name, role, f"pw-{name}-123456")
    header = {"Authorization": f"Bearer {users.create_token(name)}"}
    engine.dispose()
    return header


@pytest.mark.slow
@pytest.mark.postgres
def test_the_life_cycle_against_a_real_serve_on_postgresql(pg_url: str, tmp_path: Path,
                                                           models) -> None:  # fmt: skip
    """`mriqa serve` on PostgreSQL, DCMTK storescu as the scanner, feedback through the
    console API, the model commands as a site's ML engineer types them."""
    loud, quiet = models
    config, base, cli = _served(tmp_path, pg_url)
    port = tomllib.loads(config.read_text())["dicom"]["port"]
    cli("model", "install", str(loud))
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        cli("model", "install", str(quiet), "--shadow")
        wait_for(lambda: "shadow model: convnet-untrained 0.0.0+seed2" in node.log(), 60)
        series = [write_series(synth_series(4, size=64, seed=90 + k), tmp_path / f"s{k}")
                  for k in range(2)]  # fmt: skip
        for files in series:
            storescu(port, files)
        tokens = {name: _token(config, name, role)
                  for name, role in (("tech", "technologist"), ("rad1", "radiologist"),
                                     ("rad2", "radiologist"), ("ops", "admin"))}  # fmt: skip

        def compared() -> dict | None:
            r = httpx.get(f"{base}/api/models", headers=tokens["ops"])
            assert r.status_code == 200, r.text
            report = r.json()
            c = report["comparison"]
            return report if c and c["series"] == 2 else None

        report = wait_for(compared, 60)
        assert report["comparison"]["agree"] == 0 and len(report["comparison"]["differing"]) == 2
        alerts = httpx.get(f"{base}/api/alerts?state=open", headers=tokens["ops"]).json()
        assert len(alerts) == 2  # the active model's; the candidate alerted on none
        for alert in alerts:
            r = httpx.post(f"{base}/api/alerts/{alert['id']}/ack", json={"action": "rescanned"},
                           headers=tokens["tech"])  # fmt: skip
            assert r.status_code == 200
        out = cli("model", "promote", "--why", "try", "--min-labelled", "2", ok=False)
        assert "catches fewer non-diagnostic series: 0 against 2 of 2" in out

        for rater in ("rad1", "rad2"):
            for alert in alerts:
                r = httpx.post(f"{base}/api/ratings", json={"series_uid": alert["series_uid"],
                               "value": 2}, headers=tokens[rater])  # fmt: skip
                assert r.status_code == 200
        assert "may be promoted" in cli("model", "compare")
        cli("model", "promote", "--why", "no false alerts", "--min-labelled", "2")

        def active() -> str:
            return httpx.get(f"{base}/api/models", headers=tokens["ops"]).json()["active"][
                "version"
            ]

        wait_for(lambda: "model promoted" in node.log(), 60)
        assert active() == "0.0.0+seed2"
        cli("model", "rollback", "--why", "back")
        wait_for(lambda: node.log().count("model promoted") >= 2, 60)
        assert active() == "0.0.0+seed1"
        assert [e["action"] for e in httpx.get(f"{base}/api/models",
                headers=tokens["ops"]).json()["history"]] == [
            "rollback", "promote", "install-shadow", "install"]  # fmt: skip
    finally:
        node.stop()
