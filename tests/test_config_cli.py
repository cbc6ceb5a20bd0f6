"""Configuration loading (TOML, environment, validation) and the `mriqa` command line."""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect

from mriqa_node.cli import main
from mriqa_node.config import ConfigError, Settings, load_config, to_toml
from mriqa_node.db.migrate import MIGRATIONS_DIR
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series, write_series
from tests.peers import free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No MRIQA_* variable of the caller's shell may leak into these tests."""
    for key in list(os.environ):
        if key.startswith("MRIQA_"):
            monkeypatch.delenv(key)
    yield


def toml_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASIC = """
[dicom]
port = 12000
ae_title = "NODE1"
allowed_calling_aets = ["CT1", "MR7"]

[storage]
database_url = "sqlite:////tmp/x.db"
spool_dir = "/data/spool"

[series]
idle_seconds = 3.5

[verdict]
series_threshold = 0.3
"""


# -- load_config -----------------------------------------------------------------------------


def test_load_from_toml_with_defaults_for_the_rest(tmp_path: Path) -> None:
    s = load_config(toml_file(tmp_path / "node.toml", BASIC))
    assert s.dicom.port == 12000 and s.dicom.ae_title == "NODE1"
    assert s.dicom.allowed_calling_aets == ["CT1", "MR7"]
    assert s.storage.database_url == "sqlite:////tmp/x.db"
    assert s.storage.spool_dir == Path("/data/spool")
    assert s.series.idle_seconds == 3.5
    assert s.series.release_grace_seconds == Settings().series.release_grace_seconds
    assert s.verdict.series_threshold == 0.3 and s.verdict.slice_threshold is None
    assert s.worker.max_batch == 16 and s.storage.fsync is True


def test_the_deploy_example_is_a_valid_config_with_every_section() -> None:
    """deploy/node.toml is what a site copies: it must load, and show each section."""
    example = Path(__file__).resolve().parents[1] / "deploy" / "node.toml"
    settings = load_config(example)
    sections = set(tomllib.loads(example.read_text()))
    assert sections >= set(Settings.model_fields) - {"webhooks", "scope"}
    assert settings.drift.rule().recent == 20


def test_environment_overrides_the_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = toml_file(tmp_path / "node.toml", BASIC)
    monkeypatch.setenv("MRIQA_DICOM__PORT", "12001")
    monkeypatch.setenv("MRIQA_SERIES__RELEASE_GRACE_SECONDS", "0.25")
    monkeypatch.setenv("MRIQA_DICOM__ALLOWED_CALLING_AETS", '["ONLY"]')
    s = load_config(path)
    assert s.dicom.port == 12001
    assert s.dicom.ae_title == "NODE1"  # the rest of [dicom] still comes from the file
    assert s.dicom.allowed_calling_aets == ["ONLY"]
    assert s.series.idle_seconds == 3.5 and s.series.release_grace_seconds == 0.25
    # Explicit overrides (how tests and embedding code configure a node) win over both.
    s = load_config(path, dicom={"port": 13000})
    assert s.dicom.port == 13000 and s.dicom.ae_title == "NODE1"


def test_config_path_from_mriqa_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRIQA_CONFIG", str(toml_file(tmp_path / "node.toml", BASIC)))
    assert load_config().dicom.port == 12000
    monkeypatch.delenv("MRIQA_CONFIG")
    assert load_config().dicom.port == Settings().dicom.port == 11112


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[dicom]\nport = 0\n", "dicom.port"),
        ('[dicom]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\n', "dicom.ae_title"),
        ('[dicom]\nae_title = "A\\\\B"\n', "dicom.ae_title"),
        ("[series]\nidle_seconds = 0\n", "series.idle_seconds"),
        ("[verdict]\nseries_threshold = 1.5\n", "verdict.series_threshold"),
        ("[verdict]\ntop_fraction = 0\n", "verdict.top_fraction"),
        ('[worker]\nmax_batch = "many"\n', "worker.max_batch"),
        ('[storage]\nfsync = "sometimes"\n', "storage.fsync"),
        ("[drift]\nrecent = 1\n", "drift.recent"),
        ("[drift]\nks_alpha = 1.5\n", "drift.ks_alpha"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = toml_file(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert key in message and str(path) in message


def test_invalid_environment_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MRIQA_DICOM__PORT", "eleven")
    with pytest.raises(ConfigError, match=r"dicom\.port"):
        load_config()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dicom]\nprot = 11113\n", "dicom.prot"),
        ("[dicomm]\nport = 11113\n", "dicomm"),
        ('[storage]\ndatabase = "sqlite:///x.db"\n', "storage.database"),
        ("top_level = 1\n", "top_level"),
    ],
)
def test_unknown_keys_are_rejected(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(toml_file(tmp_path / "typo.toml", text))
    assert key in str(err.value)


def test_unknown_environment_key_in_a_section_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MRIQA_DICOM__PROT", "11113")
    with pytest.raises(ConfigError, match=r"dicom\.prot"):
        load_config()


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml_file(tmp_path / "broken.toml", "[dicom\nport = 1\n"))


def test_to_toml_round_trips(tmp_path: Path) -> None:
    original = load_config(toml_file(tmp_path / "node.toml", BASIC))
    text = to_toml(original)
    assert "# slice_threshold = (from model)" in text
    assert tomllib.loads(text)["dicom"]["allowed_calling_aets"] == ["CT1", "MR7"]
    again = load_config(toml_file(tmp_path / "shown.toml", text))
    assert again.model_dump() == original.model_dump()


# -- CLI -------------------------------------------------------------------------------------


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def node_config(tmp_path: Path, model_dir: Path | None = None, extra: str = "") -> Path:
    model = f'[model]\npath = "{model_dir}"\n' if model_dir else ""
    return toml_file(
        tmp_path / "node.toml",
        f'[dicom]\nae_title = "FROMFILE"\n\n[storage]\n'
        f'database_url = "sqlite:///{tmp_path / "cli.db"}"\nspool_dir = "{tmp_path / "spool"}"\n'
        f"{model}{extra}",
    )


def test_cli_config_show_prints_the_effective_toml(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    result = invoke("--config", str(cfg), "config", "show", env={"MRIQA_DICOM__PORT": "11999"})
    assert result.exit_code == 0, result.output
    assert "port = 11999" in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["dicom"]["port"] == 11999 and shown["dicom"]["ae_title"] == "FROMFILE"
    assert shown["storage"]["database_url"] == f"sqlite:///{tmp_path / 'cli.db'}"


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path: Path) -> None:
    cfg = toml_file(tmp_path / "bad.toml", "[dicom]\nport = 99999\n")
    result = invoke("--config", str(cfg), "config", "show")
    assert result.exit_code == 1
    assert "dicom.port" in result.output and "Traceback" not in result.output


def test_cli_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    result = invoke("--config", str(cfg), "db", "upgrade")
    assert result.exit_code == 0, result.output
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert f"database at revision {head}" in result.stdout
    engine = create_engine(f"sqlite:///{tmp_path / 'cli.db'}")
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"study", "series", "instance", "slice_score", "series_verdict", "alert",
            "app_user", "api_token", "rating", "webhook_delivery"} <= tables  # fmt: skip
    assert invoke("--config", str(cfg), "db", "upgrade").exit_code == 0  # idempotent


def test_cli_status_json_on_an_empty_database(tmp_path: Path) -> None:
    cfg = node_config(tmp_path)
    assert invoke("--config", str(cfg), "db", "upgrade").exit_code == 0
    result = invoke("--config", str(cfg), "status", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"queue_depth": 0, "forwarding": [], "series": []}
    text = invoke("--config", str(cfg), "status")
    assert text.exit_code == 0 and "queue: 0 instance(s)" in text.stdout


def test_cli_status_without_schema_fails_cleanly(tmp_path: Path) -> None:
    result = invoke("--config", str(node_config(tmp_path)), "status", "--json")
    assert result.exit_code == 1
    assert "cannot read the database" in result.output and "Traceback" not in result.output


def test_cli_score_folder_as_json(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "series"
    files = write_series(synth_series(4, size=64, seed=61), folder)
    (folder / "notes.txt").write_text("not DICOM")
    cfg = node_config(tmp_path, model_dir, "\n[verdict]\nseries_threshold = 0.0\n")
    result = invoke("--config", str(cfg), "score", "--json", str(folder))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"]["name"] == "convnet-untrained"
    (series,) = out["series"]
    assert series["series_uid"] == pydicom.dcmread(files[0]).SeriesInstanceUID
    assert len(series["slices"]) == 4 and series["unscorable"] == []
    for s in series["slices"]:
        assert set(s["probabilities"]) == {"non_diagnostic", "diagnostic"}
        assert sum(s["probabilities"].values()) == pytest.approx(1.0, abs=2e-4)
        assert all(0.0 <= p <= 1.0 for p in s["probabilities"].values())
    assert sorted(s["position"] for s in series["slices"]) == pytest.approx(
        sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files)
    )
    assert series["verdict"]["n_slices"] == 4
    assert series["verdict"]["label"] == "non_diagnostic"  # series_threshold 0 from the config
    assert [u["file"] for u in out["unreadable"]] == [str(folder / "notes.txt")]


def test_cli_send_to_a_closed_port_fails(tmp_path: Path) -> None:
    files = write_series(synth_series(1, size=32, seed=62), tmp_path / "s")
    result = invoke("send", str(files[0]), "--to", f"127.0.0.1:{free_port()}")
    assert result.exit_code != 0
    assert "sent 0 of 1" in result.stdout
    bad = invoke("send", str(files[0]), "--to", "nowhere")
    assert bad.exit_code == 2 and "HOST:PORT" in bad.output


def test_cli_send_to_a_running_node(tmp_path: Path, model_dir: Path) -> None:
    folder = tmp_path / "s"
    write_series(synth_series(3, size=32, seed=63), folder)
    port = free_port()
    node = Node(
        load_config(
            None,
            dicom={"port": port},
            storage={
                "spool_dir": str(tmp_path / "spool"),
                "database_url": f"sqlite:///{tmp_path / 'send.db'}",
                "fsync": False,
            },
            model={"path": str(model_dir)},
        )
    )
    node.start(worker=False, monitor=False)
    try:
        result = invoke("send", str(folder), "--to", f"127.0.0.1:{port}")
        assert result.exit_code == 0, result.output
        assert "sent 3 of 3" in result.stdout
        refused = invoke("send", str(folder), "--to", f"127.0.0.1:{port}",
                         "--calling-aet", "INTRUDER")  # fmt: skip
        assert refused.exit_code == 1 and "sent 0 of 3" in refused.stdout
    finally:
        node.stop()
    assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 3


def test_migrations_match_the_models(db_url: str) -> None:
    """Every model change has its migration: autogenerate finds nothing left to do."""
    from alembic import command
    from alembic.config import Config

    from mriqa_node.db import migrate
    from mriqa_node.db.engine import make_engine

    engine = make_engine(db_url)
    migrate.upgrade(engine)
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.check(cfg)  # raises when the models and the schema differ
    engine.dispose()


def test_webhooks_config_and_secrets_masked_in_config_show(tmp_path: Path) -> None:
    cfg = toml_file(tmp_path / "hooks.toml", """
[[webhooks]]
name = "ris"
url = "https://ris.example/hooks/mriqa"
secret = "do-not-print"
events = ["alert"]
""")  # fmt: skip
    settings = load_config(cfg)
    assert settings.webhooks[0].events == ["alert"] and settings.webhooks[0].max_attempts == 12
    shown = invoke("--config", str(cfg), "config", "show").stdout
    assert "do-not-print" not in shown
    assert tomllib.loads(shown)["webhooks"][0]["url"] == "https://ris.example/hooks/mriqa"
    dup = toml_file(tmp_path / "dup.toml", '[[webhooks]]\nname = "a"\nurl = "http://x"\n' * 2)
    with pytest.raises(ConfigError, match="unique"):
        load_config(dup)
    bad = toml_file(tmp_path / "bad.toml", '[[webhooks]]\nname = "a"\nurl = "ftp://x"\n')
    with pytest.raises(ConfigError, match="webhooks"):
        load_config(bad)
