"""The README's run command: `mriqa demo` with embedded defaults shows verdicts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.services.users import UserService
from tests.peers import free_port

pytestmark = pytest.mark.slow


def test_demo_runs_with_defaults_and_prints_verdicts(tmp_path: Path) -> None:
    env = {**os.environ, "MRIQA_DICOM__PORT": str(free_port()),
           "MRIQA_CONSOLE__PORT": str(free_port()), "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    env.pop("MRIQA_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "mriqa_node.cli", "demo", "--series", "2", "--exit"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    decided = [line for line in result.stdout.splitlines() if " decided " in line]
    assert len(decided) == 2, result.stdout
    # The same phantoms every run, at the README's 30 slices: the clean one diagnostic, the one
    # with motion 0.8 alerted (on 6 or 12 of its slices 2.5.0's guard calls it not assessed).
    verdicts = dict(re.findall(r"demo (\d+) \(motion [\d.]+\)\s+decided\s+(\S+)", result.stdout))
    assert verdicts == {"1": "diagnostic", "2": "non_diagnostic"}, result.stdout
    # Embedded defaults: SQLite and spool under ./var, the bundled (trained) model.
    assert (tmp_path / "var" / "mriqa.db").is_file()
    assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 60
    assert "model convnet-binary-realmotion" in result.stderr
    assert "UNTRAINED" not in result.stderr
    # The console is up and the demo user can sign in with the printed password.
    login = re.search(r"console: (\S+)\s+user (\S+)\s+password (\S+)", result.stdout)
    assert login, result.stdout
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'mriqa.db'}")
    assert UserService(make_sessionmaker(engine)).authenticate(login[2], login[3]) is not None
    engine.dispose()
