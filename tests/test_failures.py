"""Failure modes: database away, disk full, garbage on the wire, a damaged model artifact.

The rule under test everywhere: Success is answered only for an instance that is durable (file
complete in the spool and row committed); otherwise the scanner gets a failure status and
retries, and the receiver keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import psycopg
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from sqlalchemy import select

from mriqa_node.config import load_config
from mriqa_node.db.models import Instance
from mriqa_node.dicom.scp import CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES
from mriqa_node.dicom.scu import send_datasets
from mriqa_node.ml.artifact import META_FILE, MODEL_FILE, ArtifactError, read_meta
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from mriqa_node.spool import TMP_SUFFIX
from tests.conftest import postgres_database
from tests.peers import PG_ADMIN, free_port


@pytest.fixture(autouse=True)
def _no_mriqa_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config(None, ...) also reads MRIQA_* variables: keep the caller's out."""
    for key in [k for k in os.environ if k.startswith("MRIQA_")]:
        monkeypatch.delenv(key)


def start_node(tmp_path: Path, db_url: str, model_dir: Path, spool: Path | None = None,
               min_free_mb: float = 0.0, **dicom: object) -> Node:  # fmt: skip
    settings = load_config(
        None,
        dicom={"port": free_port(), "allowed_calling_aets": ["SCANNER1"], **dicom},
        storage={
            "spool_dir": str(spool or tmp_path / "spool"),
            "database_url": db_url,
            "fsync": True,
            "min_free_mb": min_free_mb,
        },
        model={"path": str(model_dir)},
        series={"idle_seconds": 60.0, "release_grace_seconds": 60.0},
    )
    node = Node(settings)
    node.start(worker=False)
    return node


def send(node: Node, datasets: list[pydicom.Dataset]):
    return send_datasets(datasets, "127.0.0.1", node.settings.dicom.port)


def rows(node: Node) -> dict[str, Instance]:
    with node.sessions() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance))}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TMP_SUFFIX)]


# -- (1) the database goes away -----------------------------------------------------------------


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The name of a fresh PostgreSQL database (the tests switch its connections off and on)."""
    with postgres_database() as url:
        yield url.rsplit("/", 1)[1]


def _pg_admin(*statements: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql)


@pytest.mark.postgres
def test_database_away_answers_out_of_resources(
    pg_database: str, tmp_path: Path, model_dir: Path
) -> None:
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{pg_database}"
    node = start_node(tmp_path, url, model_dir)
    try:
        datasets = synth_series(6, size=64, seed=41)
        assert send(node, datasets[:1]).sent == 1  # healthy: pool connections exist
        assert node.receiving.drain()

        _pg_admin(
            f'ALTER DATABASE "{pg_database}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{pg_database}'",
        )
        # The first instance after the cut may still get Success: its record is synced in the
        # receive journal, so it is kept, and its row follows when the database returns. Once
        # the node has noticed, everything gets 0xA700 until the database is back.
        first = send(node, datasets[1:2])
        assert set(first.failed.values()) <= {OUT_OF_RESOURCES}, first.failed
        assert wait_for(lambda: node.receiving.failing is not None)
        report = send(node, datasets[2:])
        assert report.sent == 0
        assert set(report.failed.values()) == {OUT_OF_RESOURCES}, report.failed
        assert len(report.failed) == 4
        spool = tmp_path / "spool"
        for ds in datasets[2:]:  # nothing kept of what was refused
            assert not list(spool.rglob(f"{ds.SOPInstanceUID}.dcm"))
        assert leftovers(spool) == []

        _pg_admin(f'ALTER DATABASE "{pg_database}" ALLOW_CONNECTIONS true')
        assert wait_for(lambda: node.receiving.failing is None)  # by itself, within a second
        retry = [
            ds for ds in datasets[1:] if str(ds.SOPInstanceUID) in first.failed | report.failed
        ]
        report = send(node, retry)  # the scanner retries what was refused
        assert report.sent == len(retry) and report.failed == {}
        assert node.receiving.drain()
        kept = rows(node)
        assert set(kept) == {str(ds.SOPInstanceUID) for ds in datasets}
        assert all((spool / r.spool_path).is_file() for r in kept.values())
        with node.sessions() as s:
            series = s.get(Instance, kept[str(datasets[2].SOPInstanceUID)].id).series
            assert series.received_instances == 6 and series.received_slices == 6
    finally:
        node.stop()


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


# -- (2) the disk is full -------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to create a small tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs (not permitted here?): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_disk_full_answers_out_of_resources_and_never_lies(
    tiny_disk: Path, tmp_path: Path, model_dir: Path
) -> None:
    spool = tiny_disk / "spool"
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir, spool)
    try:
        datasets = synth_series(24, size=256, seed=42)  # ~130 KiB each: ~15 fit into 2 MiB
        names = [str(ds.SOPInstanceUID) for ds in datasets]
        report = send(node, datasets)
        ok = [n for n in names if n not in report.failed]
        assert report.sent == len(ok)
        assert 0 < len(ok) < len(names), "the disk should fill part way"
        assert set(report.failed.values()) == {OUT_OF_RESOURCES}, report.failed
        # Success was answered only for what is complete on disk and in the database.
        kept = rows(node)
        assert set(kept) == set(ok)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        for uid in ok:
            path = spool / kept[uid].spool_path
            assert path.stat().st_size == kept[uid].size_bytes
            back = pydicom.dcmread(path)
            assert back.SOPInstanceUID == uid
            assert back.PixelData == by_uid[uid].PixelData
        for uid in report.failed:
            assert not list(spool.rglob(f"{uid}.dcm"))
        assert leftovers(spool) == []
        # Still receiving: a tiny instance that fits is accepted.
        small = synth_series(1, size=32, seed=43)
        assert send(node, small).sent == 1
    finally:
        node.stop()


def test_free_space_watermark_refuses_before_the_disk_is_full_and_lifts(
    tiny_disk: Path, tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Below [storage] min_free_mb the scanner is told 0xA700 (it keeps its images and retries)
    while the disk still has room; once space returns the same series is taken."""
    spool = tiny_disk / "spool"
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir, spool,
                      min_free_mb=1.0)  # fmt: skip
    filler = tiny_disk / "filler"
    try:
        datasets = synth_series(4, size=32, seed=45)
        filler.write_bytes(b"\0" * (shutil.disk_usage(tiny_disk).free - 900 * 1024))
        assert node.spool.space()["low"]
        report = send(node, datasets)
        assert report.sent == 0
        assert set(report.failed.values()) == {OUT_OF_RESOURCES}, report.failed
        assert rows(node) == {} and leftovers(spool) == [] and not list(spool.rglob("*.dcm"))
        assert shutil.disk_usage(tiny_disk).free > 800 * 1024  # refused, not filled up
        assert "below the watermark" in caplog.text
        filler.unlink()  # an administrator makes room
        assert not node.spool.space()["low"]
        assert send(node, datasets).sent == len(datasets)
        assert len(rows(node)) == len(datasets)
    finally:
        node.stop()


# -- (3) garbage over the wire -----------------------------------------------------------------


def _meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def raw_file(path: Path, sop_class: str, sop_uid: str, body: bytes) -> Path:
    """A Part 10 file with a valid file meta and ``body`` as the dataset bytes."""
    head = Dataset()
    head.file_meta = _meta(sop_class, sop_uid)
    buf = BytesIO()
    head.save_as(buf, enforce_file_format=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def encoded_body(ds: pydicom.Dataset) -> bytes:
    """The dataset alone, explicit VR little endian (no preamble, no file meta)."""
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def test_garbage_and_mismatched_datasets_are_refused_and_the_scp_keeps_serving(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom then sends the bytes after the file meta as they are, without decoding them.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir)
    try:
        good = synth_series(2, size=64, seed=44)
        garbage_uid = generate_uid()
        garbage = raw_file(
            tmp_path / "garbage.dcm",
            MRImageStorage,
            garbage_uid,
            random.Random(7).randbytes(3000),
        )
        no_uid = pydicom.dcmread(BytesIO(_part10(good[0])))
        del no_uid.SOPInstanceUID
        missing = raw_file(tmp_path / "missing.dcm", MRImageStorage, generate_uid(),
                           encoded_body(no_uid))  # fmt: skip
        enhanced = pydicom.dcmread(BytesIO(_part10(good[1])))
        enhanced.SOPClassUID = EnhancedMRImageStorage
        enhanced.SOPInstanceUID = generate_uid()
        mismatch = raw_file(tmp_path / "mismatch.dcm", MRImageStorage,
                            enhanced.SOPInstanceUID, encoded_body(enhanced))  # fmt: skip

        ae = AE(ae_title="SCANNER1")
        ae.requested_contexts = [
            build_context(MRImageStorage, [ExplicitVRLittleEndian]),
            build_context(EnhancedMRImageStorage, [ExplicitVRLittleEndian]),
        ]
        assoc = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title="MRIQA")
        assert assoc.is_established
        try:
            statuses = {
                name: int(assoc.send_c_store(path).Status)
                for name, path in [
                    ("garbage", garbage),
                    ("missing", missing),
                    ("mismatch", mismatch),
                ]
            }
            assert assoc.is_established  # the receiver did not drop the association
            assert int(assoc.send_c_store(_write(tmp_path / "good0.dcm", good[0])).Status) == 0
        finally:
            assoc.release()

        assert statuses["garbage"] in (DATASET_MISMATCH, CANNOT_UNDERSTAND)
        assert statuses["missing"] == DATASET_MISMATCH
        assert statuses["mismatch"] == DATASET_MISMATCH

        # Still serving, in a new association too; only the good instances were kept.
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", False)
        assert send(node, good[1:]).sent == 1
        assert set(rows(node)) == {str(ds.SOPInstanceUID) for ds in good}
    finally:
        node.stop()


def test_idle_connections_never_lock_out_a_scanner(
    tmp_path: Path, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty connections that send nothing, from one address (127.0.0.2): three are let in
    ([dicom] max_associations_per_peer), the rest closed at once with the reason logged; the
    scanner, from 127.0.0.1, is served meanwhile; the silent ones are dropped after
    acse_timeout_seconds."""
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir,
                      max_associations=6, max_associations_per_peer=3,
                      acse_timeout_seconds=8.0)  # fmt: skip
    port = node.settings.dicom.port
    idle = []
    try:
        for _ in range(20):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        datasets = synth_series(3, size=32, seed=46)
        assert send(node, datasets).sent == 3  # while all twenty are connected
        assert set(rows(node)) == {str(ds.SOPInstanceUID) for ds in datasets}
        assert caplog.text.count("refused connection from 127.0.0.2: 3 connections") == 17
        for sock in idle:  # every one closed by the node: refused, or silent too long
            sock.settimeout(20)
            with contextlib.suppress(ConnectionResetError):  # reset or closed: both are fine
                assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
        node.stop()


def test_truncated_dataset_is_not_acknowledged(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = start_node(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", model_dir)
    try:
        ds = synth_series(1, size=64, seed=45)[0]
        body = encoded_body(ds)[:-5000]  # the stream ends inside the 8192-byte pixel data
        path = raw_file(tmp_path / "trunc.dcm", MRImageStorage, ds.SOPInstanceUID, body)
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.settings.dicom.port, ae_title="MRIQA")
        assert assoc.is_established
        try:
            status = int(assoc.send_c_store(path).Status)
        finally:
            assoc.release()
        assert rows(node) == {}, "a truncated instance was kept"
        assert status in (DATASET_MISMATCH, CANNOT_UNDERSTAND)
    finally:
        node.stop()


def _part10(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _write(path: Path, ds: pydicom.Dataset) -> Path:
    path.write_bytes(_part10(ds))
    return path


# -- (4) a damaged model artifact ------------------------------------------------------------


@pytest.fixture
def artifact(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(model_dir, copy)
    read_meta(copy)  # intact copy is accepted
    return copy


def _edit_meta(directory: Path, **changes) -> None:
    meta = json.loads((directory / META_FILE).read_text())
    meta.update(changes)
    (directory / META_FILE).write_text(json.dumps(meta))


def test_tampered_weights_are_refused(artifact: Path) -> None:
    with (artifact / MODEL_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        read_meta(artifact)


def test_other_preprocessing_version_is_refused(artifact: Path) -> None:
    _edit_meta(artifact, preprocessing_version="999")
    with pytest.raises(ArtifactError, match="preprocessing"):
        read_meta(artifact)


def test_a_model_of_an_earlier_preprocessing_version_still_loads(artifact: Path) -> None:
    _edit_meta(artifact, preprocessing_version="1")
    assert read_meta(artifact).preprocessing_version == "1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"class_names": ["diagnostic", "non_diagnostic"]}, "class 0"),
        ({"input_size": 256}, "input size"),
        ({"policy": {"series_threshold": 2.0}}, "thresholds"),
    ],
)
def test_inconsistent_model_json_is_refused(artifact: Path, changes: dict, message: str) -> None:
    _edit_meta(artifact, **changes)
    with pytest.raises((ArtifactError, ValueError), match=message):
        read_meta(artifact)


def test_missing_fields_and_files_are_refused(artifact: Path) -> None:
    meta = json.loads((artifact / META_FILE).read_text())
    del meta["sha256"]
    (artifact / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="sha256"):
        read_meta(artifact)
    (artifact / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match="not a model artifact"):
        read_meta(artifact)


def test_node_with_a_tampered_model_does_not_start_receiving(
    artifact: Path, tmp_path: Path
) -> None:
    with (artifact / MODEL_FILE).open("ab") as fh:
        fh.write(b"\0")
    port = free_port()
    settings = load_config(
        None,
        dicom={"port": port},
        storage={"spool_dir": str(tmp_path / "spool"),
                 "database_url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        model={"path": str(artifact)},
    )  # fmt: skip
    node = Node(settings)
    try:
        with pytest.raises(ArtifactError, match="sha256"):
            node.start()
        with socket.socket() as s:  # never told the scanner "Success" with a bad model
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        node.stop()
