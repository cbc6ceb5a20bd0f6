"""`mriqa serve` with a webhook configured: DCMTK storescu sends a series, the receiver (which
fails twice, then accepts) gets the verdict and the alert exactly once each, signed; the
process's console answers /healthz and, with a token, /metrics and the API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from mriqa_node.config import load_config
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.phantom import synth_series, write_series
from mriqa_node.services.users import UserService
from mriqa_node.services.webhooks import verify
from tests.conftest import storescu, write_config
from tests.peers import FlakyReceiver, NodeProcess, free_port, wait_for

pytestmark = pytest.mark.slow
SECRET = "e2e-secret"


def test_serve_delivers_signed_webhooks_and_serves_the_console(
    db_url: str, tmp_path: Path, model_dir: Path, receiver: FlakyReceiver
) -> None:
    port, console_port = free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml", port, db_url, model_dir,
        verdict={"series_threshold": 0.0},  # every series non-diagnostic: verdict + alert
        console={"port": console_port, "secret_file": str(tmp_path / "console.secret")},
        webhooks=[{"name": "ris", "url": f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                   "secret": SECRET, "backoff_seconds": 0.1}],
    )  # fmt: skip
    node = NodeProcess(config, port, tmp_path / "node.log").start()
    try:
        files = write_series(synth_series(4, seed=77), tmp_path / "s")
        storescu(port, files)

        def accepted() -> list[tuple[dict[str, str], bytes, int]]:
            return [r for r in receiver.requests if r[2] == 200]

        wait_for(lambda: len(accepted()) >= 2, 60)
        time.sleep(1.0)  # nothing more arrives later: each event exactly once
        ok = accepted()
        assert len(ok) == 2
        kinds = sorted(json.loads(body)["event"] for _, body, _ in ok)
        assert kinds == ["alert", "verdict"]
        for headers, body, _ in receiver.requests:
            assert verify(SECRET, headers["X-MRIQA-Timestamp"], body,
                          headers["X-MRIQA-Signature"])  # fmt: skip
        alert = next(json.loads(b) for _, b, _ in ok if json.loads(b)["event"] == "alert")
        assert alert["label"] == "non_diagnostic" and alert["n_slices"] == 4
        assert alert["console_url"] == (
            f"http://127.0.0.1:{console_port}/series/{alert['series_uid']}"
        )
        retried = {h["X-MRIQA-Delivery"] for h, _, status in receiver.requests if status == 500}
        assert retried <= {h["X-MRIQA-Delivery"] for h, _, _ in ok}  # retries of the same rows

        base = f"http://127.0.0.1:{console_port}"
        assert httpx.get(f"{base}/healthz").json()["status"] == "ok"
        assert httpx.get(f"{base}/metrics").status_code == 401
        engine = make_engine(load_config(config).storage.database_url)
        users = UserService(make_sessionmaker(engine))
        users.add("ops", "admin", "long enough password")
        token = users.create_token("ops", "prometheus")
        engine.dispose()
        auth = {"Authorization": f"Bearer {token}"}
        metrics = httpx.get(f"{base}/metrics", headers=auth).text
        assert "mriqa_instances_received_total 4.0" in metrics
        assert 'mriqa_webhook_deliveries{state="delivered"} 2.0' in metrics
        deliveries = httpx.get(f"{base}/api/webhooks/deliveries", headers=auth).json()
        assert sorted(d["attempts"] for d in deliveries) in ([1, 3], [2, 2])
        assert {d["state"] for d in deliveries} == {"delivered"}
    finally:
        node.stop()
