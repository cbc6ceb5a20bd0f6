"""`mriqa-train` end to end on a tiny synthetic set: synth -> train -> report -> export, and the
exported artifact installs into the node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mriqa_node.ml.store import ModelStore
from training.cli import main

pytestmark = pytest.mark.slow


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_train_report_export(tmp_path: Path) -> None:
    data, runs = tmp_path / "synth", tmp_path / "run"
    run("synth", "--out", str(data), "--subjects", "6", "--size", "128", "--workers", "1")
    manifest = data / "manifest.csv"
    assert manifest.is_file() and (data / "summary.json").is_file()

    run("train", "--manifest", str(manifest), "--out", str(runs), "--steps", "4",
        "--batch", "8", "--widths", "4,8,8,16", "--eval-every", "2",
        "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    history = (runs / "history.csv").read_text().splitlines()
    assert history[0].startswith("step,") and history[-1].startswith("4,")

    run("report", str(runs), "--manifest", str(manifest))
    report = (runs / "report.md").read_text()
    assert "Fig. 7" in report and (runs / "metrics.json").is_file()

    out = tmp_path / "artifact"
    output = run("export", str(runs), "--out", str(out), "--version", "0.1.0",
                 "--sensitivity", "0.8", "--max-false-alerts", "0.1")  # fmt: skip
    assert "artifact:" in output and "temperature" in output
    meta = json.loads((out / "model.json").read_text())
    assert meta["name"] == "convnet-binary" and meta["trained"] is True
    assert meta["temperature"] > 0 and "ece_after" in meta["extra"]["calibration"]["splits"]["val"]
    op = meta["extra"]["operating_point"]
    assert (op["target_sensitivity"], op["max_false_alerts"]) == (0.8, 0.1)
    assert {"vs_labels", "vs_truth"} <= meta["test_metrics"].keys()
    assert meta["scope"]["min_slices"] == 3 and "SE" in meta["scope"]["sequences"]
    assert meta["ood"]["val_pass"] >= 0.99 and meta["ood"]["threshold"] > 0
    target, installed = ModelStore(tmp_path / "models").install(out)
    assert installed.sha256 == meta["sha256"] and (target / "model.keras").is_file()
    assert (target / "ood.npz").is_file() and installed.ood == meta["ood"]

    # What `mriqa demo` would show with this artifact: one verdict per phantom series and level.
    table = run("phantoms", str(out), "--seeds", "2", "--slices", "4", "--motions", "0,1")
    header, *rows = table[table.index("motion") :].strip().splitlines()  # after the progress bar
    labels = header.split()[1:]
    assert labels and set(labels) <= {"diagnostic", "non_diagnostic", "not_assessed"}
    assert [r.split()[0] for r in rows] == ["0.0", "1.0"]
    assert all(sum(map(int, r.split()[1:])) == 2 for r in rows)


@pytest.mark.parametrize(("args", "task", "width"), [
    ((), "binary", 0.1),
    (("--task", "3class"), "3class", 0.0),
    (("--soft-labels", "0"), "binary", 0.0),
])  # fmt: skip
def test_loso_trains_the_bundle_recipe_labels(tmp_path: Path, monkeypatch, args, task, width):
    """`loso` is the bundle recipe's figure, so it trains on the bundle's soft labels unless told
    otherwise, and on classes for 3-class (which soft labels do not support)."""
    import training.loso

    seen = {}

    def record(base, *args, **kwargs):
        seen["base"], seen["seeds"] = base, kwargs["seeds"]
        return {"per_source": {}}

    monkeypatch.setattr(training.loso, "run_loso", record)
    (tmp_path / "m.csv").write_text("")
    (tmp_path / "c.csv").write_text("")
    run("loso", "--manifest", str(tmp_path / "m.csv"), "--corruption", str(tmp_path / "c.csv"),
        "--out", str(tmp_path / "loso"), *args)  # fmt: skip
    assert (seen["base"].task, seen["base"].soft_labels) == (task, width)
    assert seen["seeds"] == 2  # as the bundle recipe
