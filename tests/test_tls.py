"""DICOM TLS on the receiver: encrypted associations work, plain ones do not, and with a CA
configured (mutual authentication) a client without a certificate, with an expired one or one
from another CA is refused, with the reason logged; DCMTK's storescu plays the scanner."""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import text

from mriqa_node.dicom.scu import send_datasets
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from tests.conftest import self_signed
from tests.peers import DCMTK_ENV, dcmtk_tool
from tests.test_failures import start_node


@pytest.fixture
def tls_node(tmp_path: Path, model_dir: Path):
    key, cert = self_signed(tmp_path, "server")
    ckey, ccert = self_signed(tmp_path, "client")
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir,
                      tls_cert=str(cert), tls_key=str(key), tls_ca=str(ccert))  # fmt: skip
    yield node, node.settings.dicom.port, cert, ckey, ccert
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


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(directory: Path, name: str, ca: tuple[Path, Path], days: int) -> tuple[Path, Path]:
    """A key and a certificate signed by ``ca``; ``days`` < 0 gives one that has expired."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        str(key),
        "-out",
        str(csr),
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[1]),
        "-CAkey",
        str(ca[0]),
        "-CAcreateserial",
        "-copy_extensions",
        "copy",
        "-days",
        str(days),
        "-out",
        str(cert),
    )
    return key, cert  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """A site CA with a server and a scanner certificate, an expired scanner certificate, and
    a scanner certificate from another CA."""
    ca, other_ca = self_signed(tmp_path, "site-ca"), self_signed(tmp_path, "other-ca")
    return {"ca": ca, "server": _signed(tmp_path, "server", ca, 1),
            "scanner": _signed(tmp_path, "scanner", ca, 1),
            "expired": _signed(tmp_path, "expired", ca, -1),
            "foreign": _signed(tmp_path, "foreign", other_ca, 1)}  # fmt: skip


@pytest.fixture
def mutual_tls_node(tmp_path: Path, model_dir: Path, pki):
    if dcmtk_tool("storescu") is None:
        pytest.skip("DCMTK (storescu) is not installed")
    (key, cert), (_, ca) = pki["server"], pki["ca"]
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir,
                      tls_cert=str(cert), tls_key=str(key), tls_ca=str(ca),
                      max_associations_per_peer=3, acse_timeout_seconds=2)  # fmt: skip
    yield node, node.settings.dicom.port
    node.stop()


def _storescu(port: int, pki, files: list[Path], client: str | None) -> subprocess.CompletedProcess:
    identity = ["+tls", *map(str, pki[client])] if client else ["+tla"]
    return subprocess.run(
        ["storescu", "-aet", "SCANNER1", "-aec", "MRIQA", "-to", "10", "-ta", "10", *identity,
         "+cf", str(pki["ca"][1]), "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60, env=DCMTK_ENV,
    )  # fmt: skip


def _instances(node: Node) -> int:
    with node.sessions() as s:
        return s.execute(text("select count(*) from instance")).scalar()


def test_storescu_over_mutual_tls_and_refused_certificates(
    mutual_tls_node, pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node, port = mutual_tls_node
    files = []
    for i, ds in enumerate(synth_series(3, size=64, seed=23)):
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    caplog.set_level(logging.WARNING, logger="mriqa_node.dicom.scp")

    for client in ("expired", "foreign", None, "expired", "foreign", None):  # > 3 per peer
        result = _storescu(port, pki, files[:1], client)
        assert result.returncode != 0, (client, result.stderr)
    assert _instances(node) == 0
    refusals = [r.getMessage() for r in caplog.records if "refused TLS connection" in r.message]
    assert len(refusals) == 6
    assert sum("certificate has expired" in m for m in refusals) == 2
    assert sum("certificate verify failed" in m for m in refusals) == 4  # foreign CA, none

    # A silent TCP client holds only its own connection: the handshake is not done in the
    # listening thread (pynetdicom's default), and failed handshakes freed their slots.
    with socket.create_connection(("127.0.0.1", port)):
        result = _storescu(port, pki, files, "scanner")
    assert result.returncode == 0, result.stderr
    assert _instances(node) == 3
