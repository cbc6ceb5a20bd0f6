"""DICOM TLS on the receiver: encrypted associations work, plain ones do not, and with a CA
configured a client without a certificate is refused."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from sqlalchemy import text

from mriqa_node.config import load_config
from mriqa_node.dicom.scu import send_datasets
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from tests.conftest import self_signed
from tests.peers import free_port


@pytest.fixture
def tls_node(tmp_path: Path, model_dir: Path):
    key, cert = self_signed(tmp_path, "server")
    ckey, ccert = self_signed(tmp_path, "client")
    port = free_port()
    settings = load_config(
        None,
        dicom={"port": port, "tls_cert": str(cert), "tls_key": str(key), "tls_ca": str(ccert)},
        storage={"spool_dir": str(tmp_path / "spool"),
                 "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        model={"path": str(model_dir)},
    )  # fmt: skip
    node = Node(settings)
    node.start(worker=False)
    yield node, port, cert, ckey, ccert
    node.stop()


def _client_context(server_cert: Path, key: Path | None, cert: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def test_tls_with_client_certificate(tls_node) -> None:
    _, port, cert, ckey, ccert = tls_node
    series = synth_series(3, size=64, seed=21)
    report = send_datasets(series, "127.0.0.1", port, tls=_client_context(cert, ckey, ccert))
    assert report.sent == 3 and not report.failed


def test_tls_refuses_plain_and_anonymous_clients(tls_node) -> None:
    node, port, cert, _, _ = tls_node
    series = synth_series(1, size=64, seed=22)
    assert send_datasets(series, "127.0.0.1", port).sent == 0  # plain TCP
    anonymous = send_datasets(series, "127.0.0.1", port, tls=_client_context(cert, None, None))
    assert anonymous.sent == 0  # no client certificate, but the node requires one
    with node.sessions() as s:
        assert s.execute(text("select count(*) from instance")).scalar() == 0
