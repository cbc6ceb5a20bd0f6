"""Receiver and worker as separate processes on one PostgreSQL database (the multi-host shape):
`mriqa serve --no-worker` receives, two `mriqa worker` processes share the scoring."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Instance, SliceScore
from mriqa_node.phantom import synth_series, write_series
from tests.conftest import storescu, write_config
from tests.peers import NodeProcess, free_port, wait_for
from tests.test_node_e2e import series_row

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_separate_receiver_and_two_workers(pg_url: str, tmp_path: Path, model_dir: Path) -> None:
    db_url = pg_url
    port = free_port()
    config = write_config(tmp_path / "node.toml", port, db_url, model_dir,
                          worker={"max_batch": 4})  # fmt: skip
    receiver = NodeProcess(config, port, tmp_path / "receiver.log")
    receiver.start_args = ["serve", "--no-worker"]
    receiver.start()
    env = {**os.environ, "MRIQA_CONFIG": str(config), "TF_CPP_MIN_LOG_LEVEL": "2"}
    workers = [
        subprocess.Popen([sys.executable, "-m", "mriqa_node.cli", "worker"], env=env,
                         stdout=(tmp_path / f"worker{i}.log").open("wb"), stderr=subprocess.STDOUT)
        for i in range(2)
    ]  # fmt: skip
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    try:
        # Both workers up (model loaded) before the scanner sends.
        def all_started() -> bool:
            for w, log in zip(workers, logs, strict=True):
                assert w.poll() is None, f"worker exited:\n{log.read_text()[-3000:]}"
            return all("started" in log.read_text() for log in logs)

        wait_for(all_started, 120)
        files = write_series(synth_series(24, seed=31), tmp_path / "s")
        storescu(port, files)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        wait_for(lambda: (s := series_row(db_url, uid)[0]) and s.state == "decided", 120)
        engine = make_engine(db_url)
        with make_sessionmaker(engine)() as s:
            assert s.scalar(select(func.count(SliceScore.id))) == 24  # each slice scored once
            assert set(s.scalars(select(Instance.state))) == {"scored"}
        engine.dispose()
    finally:
        for w in workers:
            w.terminate()
            w.wait(20)
        receiver.stop()
