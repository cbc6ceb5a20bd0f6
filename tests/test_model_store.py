"""`mriqa model install` and promotion of a new model in a running node, without a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from mriqa_node.cli import main
from mriqa_node.config import load_config
from mriqa_node.db.models import ModelVersion, Series, SeriesVerdict
from mriqa_node.dicom.scu import send_datasets
from mriqa_node.ml.artifact import untrained_convnet_artifact
from mriqa_node.ml.store import ModelStore
from mriqa_node.node import Node, resolve_model
from mriqa_node.phantom import synth_series
from tests.conftest import TINY_WIDTHS
from tests.peers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("a", 1), ("b", 2)):
        untrained_convnet_artifact(root / name, seed=seed, widths=TINY_WIDTHS)
    return root / "a", root / "b"


def verdict_model(node: Node, series_uid: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with node.sessions() as s:
            row = s.execute(
                select(ModelVersion.version)
                .join(SeriesVerdict, SeriesVerdict.model_version_id == ModelVersion.id)
                .join(Series, Series.id == SeriesVerdict.series_id)
                .where(Series.series_uid == series_uid)
            ).first()
        if row:
            return row[0]
        time.sleep(0.1)
    raise AssertionError("no verdict")


def test_install_promotes_without_restart(tmp_path: Path, two_models) -> None:
    a, b = two_models
    port = free_port()
    settings = load_config(
        None,
        dicom={"port": port},
        storage={"spool_dir": str(tmp_path / "spool"),
                 "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        model={"dir": str(tmp_path / "models"), "reload_seconds": 0.3},
    )  # fmt: skip
    store = ModelStore(settings.model.dir)
    store.install(a)
    node = Node(settings)
    node.start()
    try:
        first = synth_series(4, seed=41)
        assert send_datasets(first, "127.0.0.1", port).sent == 4
        assert verdict_model(node, first[0].SeriesInstanceUID) == "0.0.0+seed1"

        store.install(b)  # what `mriqa model install` does
        deadline = time.monotonic() + 30
        while node.worker.scorer.meta.version != "0.0.0+seed2" and time.monotonic() < deadline:
            time.sleep(0.1)
        second = synth_series(4, seed=42)
        assert send_datasets(second, "127.0.0.1", port).sent == 4
        assert verdict_model(node, second[0].SeriesInstanceUID) == "0.0.0+seed2"
        assert node.scp is not None  # the receiver never stopped

        # A damaged artifact cannot even be installed; the node keeps its model.
        bad = tmp_path / "bad"
        bad.mkdir()
        for name in ("model.keras", "model.json"):
            (bad / name).write_bytes((b / name).read_bytes())
        meta = json.loads((bad / "model.json").read_text())
        meta["version"] = "9.9.9"
        meta["sha256"] = "0" * 64
        (bad / "model.json").write_text(json.dumps(meta))
        result = CliRunner().invoke(main, ["model", "install", str(bad)],
                                    env={"MRIQA_MODEL__DIR": str(tmp_path / "models")})  # fmt: skip
        assert result.exit_code != 0 and "sha256" in result.output
        assert resolve_model(settings).name.startswith("convnet-untrained-0.0.0+seed2")
    finally:
        node.stop()


def test_cli_install_and_show(tmp_path: Path, two_models) -> None:
    a, _ = two_models
    env = {"MRIQA_MODEL__DIR": str(tmp_path / "models")}
    result = CliRunner().invoke(main, ["model", "install", str(a)], env=env)
    assert result.exit_code == 0, result.output
    assert "installed convnet-untrained 0.0.0+seed1" in result.output
    shown = CliRunner().invoke(main, ["model", "show"], env=env)
    assert shown.exit_code == 0 and '"version": "0.0.0+seed1"' in shown.output
