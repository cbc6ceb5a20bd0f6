"""PACS integration against a real Orthanc: forwarding through the durable outbox (also while
the PACS and the node are down), IOCM rejection notes (KOS 113001) and QA result SRs.

DCMTK storescu plays the scanner, `mriqa serve` the node, Orthanc (its own config, free ports,
stopped by its PID) the PACS; what Orthanc holds is checked through its REST API.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from sqlalchemy import select

from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import ForwardJob, Instance
from mriqa_node.phantom import synth_series, write_series
from mriqa_node.services.users import UserService
from tests.conftest import dcmtk, storescu, write_config
from tests.orthanc import Orthanc
from tests.peers import NodeProcess, free_port, wait_for
from tests.test_node_e2e import mriqa_cli

pytestmark = pytest.mark.slow


def node_config(
    tmp_path: Path, db_url: str, model_dir: Path, orthanc: Orthanc, destination: str = "", **extra
) -> Path:
    config = write_config(
        tmp_path / "node.toml", free_port(), db_url, model_dir,
        verdict={"series_threshold": 0.0},  # every series non-diagnostic: alert, then reject
        console={"port": free_port(), "secret_file": str(tmp_path / "console.secret")},
        **extra,
    )  # fmt: skip
    with config.open("a") as f:
        f.write(
            f'[[pacs.destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
            f"port = {orthanc.dicom_port}\nbackoff_seconds = 0.2\nbackoff_max_seconds = 1.0\n"
            + destination
        )
    return config


def dicom_port(config: Path) -> int:
    from mriqa_node.config import load_config

    return load_config(config).dicom.port


def send(node: NodeProcess, tmp_path: Path, name: str, n: int, seed: int) -> tuple[str, list[str]]:
    datasets = synth_series(n, size=64, seed=seed, series_description=f"T2 {name}")
    files = write_series(datasets, tmp_path / name)
    storescu(node.port, files)
    return str(datasets[0].SeriesInstanceUID), [str(ds.SOPInstanceUID) for ds in datasets]


def jobs(db_url: str) -> list[ForwardJob]:
    engine = make_engine(db_url, readonly=True)
    try:
        with make_sessionmaker(engine)() as s:
            return list(s.scalars(select(ForwardJob).order_by(ForwardJob.id)))
    finally:
        engine.dispose()


def new_instance_changes(orthanc: Orthanc) -> list[str]:
    """Orthanc's change log: one NewInstance per instance it stored the first time."""
    changes = orthanc.get("/changes?limit=10000")["Changes"]
    return [c["ID"] for c in changes if c["ChangeType"] == "NewInstance"]


def objects_of_modality(orthanc: Orthanc, modality: str) -> list[pydicom.Dataset]:
    query = {"Level": "Instance", "Query": {"Modality": modality}}
    found = httpx.post(f"{orthanc.url}/tools/find", json=query, timeout=30).json()
    return [pydicom.dcmread(io.BytesIO(httpx.get(f"{orthanc.url}/instances/{i}/file").content))
            for i in found]  # fmt: skip


def test_forwarding_survives_pacs_and_node_outages(
    db_url: str, tmp_path: Path, model_dir: Path, orthanc: Orthanc
) -> None:
    orthanc.start()
    config = node_config(tmp_path, db_url, model_dir, orthanc)
    node = NodeProcess(config, dicom_port(config), tmp_path / "node.log").start()
    try:
        first, first_sops = send(node, tmp_path, "first", 30, seed=1)
        wait_for(lambda: set(first_sops) <= set(orthanc.sop_instance_uids(first)), 60)
        # Byte for byte as the scanner sent it (no decode and re-encode on the way).
        sent_file = next((tmp_path / "first").glob("*.dcm"))
        held = pydicom.dcmread(io.BytesIO(orthanc.file(pydicom.dcmread(sent_file).SOPInstanceUID)))
        assert held.PixelData == pydicom.dcmread(sent_file).PixelData

        orthanc.stop()  # the PACS goes down; the scanner keeps sending
        second, second_sops = send(node, tmp_path, "second", 12, seed=2)
        wait_for(lambda: any(j.attempts >= 1 and j.state == "pending" for j in jobs(db_url)
                             if j.series_uid == second), 30)  # fmt: skip
        node.stop()  # ... and the node restarts while jobs are pending
        orthanc.start()
        node = NodeProcess(config, dicom_port(config), tmp_path / "node.log").start()
        wait_for(lambda: set(second_sops) <= set(orthanc.sop_instance_uids(second)), 60)
        wait_for(lambda: all(j.state == "sent" for j in jobs(db_url)), 60)
    finally:
        node.stop()
    instance_jobs = [j for j in jobs(db_url) if j.kind == "instance"]
    assert len(instance_jobs) == 42 and all(j.state == "sent" for j in instance_jobs)
    assert [j.sop_instance_uid for j in instance_jobs] == first_sops + second_sops  # in order
    assert max(j.attempts for j in instance_jobs if j.series_uid == second) >= 2  # retried
    # Nothing twice: every instance Orthanc holds arrived as new exactly once.
    received = set(orthanc.sop_instance_uids(first)) | set(orthanc.sop_instance_uids(second))
    assert received == set(first_sops) | set(second_sops)
    assert len(new_instance_changes(orthanc)) == orthanc.instance_count()


def test_rejection_note_and_qa_result_reach_the_pacs(
    db_url: str, tmp_path: Path, model_dir: Path, orthanc: Orthanc
) -> None:
    orthanc.start()
    config = node_config(tmp_path, db_url, model_dir, orthanc, "send_montage = true\n")
    node = NodeProcess(config, dicom_port(config), tmp_path / "node.log").start()
    try:
        by_console, sops_a = send(node, tmp_path, "a", 6, seed=3)
        by_cli, sops_b = send(node, tmp_path, "b", 5, seed=4)
        studies = {str(pydicom.dcmread(next((tmp_path / n).glob("*.dcm"))).StudyInstanceUID)
                   for n in ("a", "b")}  # fmt: skip
        # Each decided series gets a QA result SR in its study.
        srs = wait_for(lambda: (s := objects_of_modality(orthanc, "SR")) and len(s) == 2 and s, 60)

        # Rejection 1: the technologist acknowledges the alert with "rescanned".
        engine = make_engine(db_url)
        users = UserService(make_sessionmaker(engine))
        users.add("tech", "technologist", "technologist password")
        token = users.create_token("tech")
        engine.dispose()
        from mriqa_node.config import load_config

        base = load_config(config).console.url
        auth = {"Authorization": f"Bearer {token}"}
        alerts = httpx.get(f"{base}/api/alerts?state=open", headers=auth).json()
        alert = next(a for a in alerts if a["series_uid"] == by_console)
        r = httpx.post(f"{base}/api/alerts/{alert['id']}/ack", headers=auth,
                       json={"action": "rescanned"})  # fmt: skip
        assert r.status_code == 200
        # Rejection 2: from the command line.
        result = mriqa_cli(config, "reject", by_cli)
        assert result.returncode == 0, result.stderr
        again = mriqa_cli(config, "reject", by_cli)
        assert again.returncode == 0 and "already rejected" in again.stdout
        assert mriqa_cli(config, "reject", "1.2.3.4").returncode != 0

        kos = wait_for(lambda: (k := objects_of_modality(orthanc, "KO")) and len(k) == 2 and k, 60)
        montages = wait_for(lambda: (m := objects_of_modality(orthanc, "OT")) and len(m) == 2 and m,
                            60)  # fmt: skip
    finally:
        node.stop()
    notes = {}
    for ko in kos:
        assert ko.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
        concept = ko.ConceptNameCodeSequence[0]
        assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("113001", "DCM")
        (study_ref,) = ko.CurrentRequestedProcedureEvidenceSequence
        (series_ref,) = study_ref.ReferencedSeriesSequence
        refs = [r.ReferencedSOPInstanceUID for r in series_ref.ReferencedSOPSequence]
        notes[series_ref.SeriesInstanceUID] = sorted(refs)
        content = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                   for i in ko.ContentSequence if "ReferencedSOPSequence" in i]  # fmt: skip
        assert sorted(content) == sorted(refs)
        assert ko.StudyInstanceUID == study_ref.StudyInstanceUID
    assert notes == {by_console: sorted(sops_a), by_cli: sorted(sops_b)}

    assert {sr.StudyInstanceUID for sr in srs} == studies  # each in its series' study
    for sr in srs:
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
        path = tmp_path / f"{sr.SOPInstanceUID}.dcm"
        sr.save_as(path, enforce_file_format=True)
        dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "non_diagnostic" in dump.stdout.lower() or "non-diagnostic" in dump.stdout.lower()
    for sc in montages:  # a montage with the heat maps, for viewers that show no SR
        assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.StudyInstanceUID in studies
        assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3
    # The QA objects are the node's own: sent, and never taken in as received instances.
    assert all(j.state == "sent" for j in jobs(db_url))
    engine = make_engine(db_url, readonly=True)
    with make_sessionmaker(engine)() as s:
        assert set(s.scalars(select(Instance.sop_instance_uid))) == set(sops_a) | set(sops_b)
    engine.dispose()
