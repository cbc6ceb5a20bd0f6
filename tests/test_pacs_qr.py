"""Query/retrieve against a real PACS (Orthanc): C-FIND filters, `mriqa pacs find`, and
`mriqa pacs pull` C-MOVEing a study into a running node (`mriqa serve`) that scores it.

One Orthanc and one node for the module (SQLite). Orthanc answers C-FIND and C-MOVE only for
calling AE titles listed in its DicomModalities, and resolves the C-MOVE destination there too:
the node is registered as ("MRIQA", 127.0.0.1, node port), and the node allows ORTHANC in.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import select

from mriqa_node.config import RemoteAE
from mriqa_node.db.engine import make_engine, make_sessionmaker
from mriqa_node.db.models import Instance, Series, Study
from mriqa_node.dicom.qr import QRError, find, move
from mriqa_node.phantom import synth_series, write_series
from tests.conftest import self_signed, write_config
from tests.orthanc import ORTHANC, Orthanc
from tests.peers import NodeProcess, free_port
from tests.test_node_e2e import mriqa_cli, series_row

pytestmark = pytest.mark.slow

SECRET_NAME = "SECRETARY^PRIVATE"  # patient data that must never be printed
SECRET_ID = "PID-99173"


@dataclass
class StudyInfo:
    uid: str
    date: str
    series: dict[str, str]  # series UID -> description
    sop_uids: set[str]


@dataclass
class Pacs:
    orthanc: Orthanc
    node: NodeProcess
    peer: RemoteAE
    db_url: str
    a: StudyInfo  # 2024-01-05, MR ABDOMEN: T2 FSE AX + T1 VIBE AX
    b: StudyInfo  # 2024-03-20, MR LIVER: DWI AX (MR) + one CT image


def _study(tmp: Path, name: str, study_date: str, study_desc: str,
           series: list[tuple[str, float]]) -> tuple[StudyInfo, list[Path]]:  # fmt: skip
    study_uid = pydicom.uid.generate_uid()
    info = StudyInfo(study_uid, study_date, {}, set())
    files: list[Path] = []
    for number, (description, motion) in enumerate(series, start=1):
        datasets = synth_series(5, size=64, motion=motion, seed=number, study_uid=study_uid,
                                series_description=description, series_number=number)  # fmt: skip
        for ds in datasets:
            ds.StudyDate = ds.SeriesDate = study_date
            ds.StudyDescription = study_desc
            ds.PatientName, ds.PatientID = SECRET_NAME, SECRET_ID
            info.sop_uids.add(str(ds.SOPInstanceUID))
        info.series[str(datasets[0].SeriesInstanceUID)] = description
        files += write_series(datasets, tmp / name / str(number))
    return info, files


def _ct_image(tmp: Path, study: StudyInfo) -> Path:
    """A CT image in the study: the node accepts MR only, so `pacs pull` must skip it."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.StudyDate = study.uid, study.date
    ds.StudyDescription = "MR LIVER"
    ds.PatientName, ds.PatientID = SECRET_NAME, SECRET_ID
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesDescription, ds.SeriesNumber = "CT SCOUT", 9
    path = tmp / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _query_table(port: int) -> str:
    return f'\n[pacs.query]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = {port}\n'


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, model_dir: Path):
    if not Path(ORTHANC).is_file():
        pytest.skip(f"{ORTHANC} missing: apt-get install orthanc")
    tmp = tmp_path_factory.mktemp("pacs")
    node_port = free_port()
    orthanc = Orthanc(tmp / "orthanc", free_port(), free_port(),
                      modalities={"mriqa": ("MRIQA", "127.0.0.1", node_port)})  # fmt: skip
    a, files_a = _study(tmp, "a", "20240105", "MR ABDOMEN",
                        [("T2 FSE AX", 0.8), ("T1 VIBE AX", 0.0)])  # fmt: skip
    b, files_b = _study(tmp, "b", "20240320", "MR LIVER", [("DWI AX", 0.0)])
    ct = _ct_image(tmp, b)
    db_url = f"sqlite:///{tmp / 'node' / 'mriqa.db'}"
    (tmp / "node").mkdir()
    config = write_config(tmp / "node" / "node.toml", node_port, db_url, model_dir,
                          dicom={"allowed_calling_aets": ["SCANNER1", "STORESCU", "ORTHANC"]},
                          series={"idle_seconds": 3.0, "release_grace_seconds": 0.5})  # fmt: skip
    orthanc.start()
    node = NodeProcess(config, node_port, tmp / "node" / "node.log")
    try:
        for f in [*files_a, *files_b, ct]:
            orthanc.upload(f)
        assert orthanc.instance_count() == 16
        with config.open("a") as fh:
            fh.write(_query_table(orthanc.dicom_port))
        node.start()
        peer = RemoteAE(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
        yield Pacs(orthanc, node, peer, db_url, a, b)
    finally:
        if node.proc is not None:
            node.stop()
        orthanc.stop()


def _no_patient_data(text: str) -> None:
    for secret in (SECRET_NAME, SECRET_ID, "SECRETARY", "PRIVATE"):
        assert secret not in text


# -- C-FIND -------------------------------------------------------------------------------------


def test_find_studies_with_filters(pacs: Pacs) -> None:
    studies = find(pacs.peer, "MRIQA", "STUDY")  # modality MR by default: both
    assert [s["StudyInstanceUID"] for s in studies] == [pacs.b.uid, pacs.a.uid]  # newest first
    by_uid = {s["StudyInstanceUID"]: s for s in studies}
    a, b = by_uid[pacs.a.uid], by_uid[pacs.b.uid]
    assert a["StudyDate"] == "20240105" and a["StudyDescription"] == "MR ABDOMEN"
    assert a["ModalitiesInStudy"] == ["MR"]
    assert a["NumberOfStudyRelatedSeries"] == 2 and a["NumberOfStudyRelatedInstances"] == 10
    assert sorted(b["ModalitiesInStudy"]) == ["CT", "MR"]
    assert b["NumberOfStudyRelatedSeries"] == 2 and b["NumberOfStudyRelatedInstances"] == 6
    assert set(a) == {
        "StudyInstanceUID", "StudyDate", "StudyTime", "StudyDescription", "AccessionNumber",
        "ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    }  # fmt: skip
    _no_patient_data(json.dumps(studies))

    def uids(**kw) -> list[str]:
        return [s["StudyInstanceUID"] for s in find(pacs.peer, "MRIQA", "STUDY", **kw)]

    assert uids(date_from=date(2024, 3, 1)) == [pacs.b.uid]
    assert uids(date_to=date(2024, 1, 31)) == [pacs.a.uid]
    assert uids(date_from=date(2024, 1, 5), date_to=date(2024, 1, 5)) == [pacs.a.uid]
    assert uids(date_from=date(2024, 1, 1), date_to=date(2024, 12, 31)) == [pacs.b.uid, pacs.a.uid]
    assert uids(date_from=date(2023, 1, 1), date_to=date(2023, 12, 31)) == []
    assert uids(modality="CT") == [pacs.b.uid]
    assert uids(modality="US") == []
    assert uids(description="*LIVER*") == [pacs.b.uid]
    assert uids(description="MR ABD*") == [pacs.a.uid]
    assert uids(study_uid=pacs.a.uid) == [pacs.a.uid]
    assert uids(patient_id=SECRET_ID) == [pacs.b.uid, pacs.a.uid]
    assert uids(patient_id="SOMEONE-ELSE") == []


def test_find_series_with_filters(pacs: Pacs) -> None:
    series = find(pacs.peer, "MRIQA", "SERIES")
    mr = {**pacs.a.series, **pacs.b.series}
    assert {s["SeriesInstanceUID"]: s["SeriesDescription"] for s in series} == mr
    assert all(s["Modality"] == "MR" and s["NumberOfSeriesRelatedInstances"] == 5 for s in series)
    t2 = next(s for s in series if s["SeriesDescription"] == "T2 FSE AX")
    assert t2["StudyInstanceUID"] == pacs.a.uid and t2["SeriesNumber"] == 1
    assert set(t2) == {"SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality",
                       "NumberOfSeriesRelatedInstances", "StudyInstanceUID"}  # fmt: skip
    _no_patient_data(json.dumps(series))

    def descriptions(**kw) -> list[str]:
        return [s["SeriesDescription"] for s in find(pacs.peer, "MRIQA", "SERIES", **kw)]

    assert descriptions(description="*T2*") == ["T2 FSE AX"]
    assert descriptions(description="*AX") == ["DWI AX", "T2 FSE AX", "T1 VIBE AX"]
    assert descriptions(date_from=date(2024, 3, 1)) == ["DWI AX"]  # the study's date
    assert descriptions(date_to=date(2024, 2, 1), description="T1*") == ["T1 VIBE AX"]
    assert descriptions(modality="CT") == ["CT SCOUT"]
    assert descriptions(modality=None, study_uid=pacs.b.uid) == ["DWI AX", "CT SCOUT"]
    assert descriptions(study_uid=pacs.a.uid) == ["T2 FSE AX", "T1 VIBE AX"]


def test_cli_find(pacs: Pacs) -> None:
    out = mriqa_cli(pacs.node.config, "pacs", "find", "--json", "--level", "series",
                    "--from", "2024-01-01", "--to", "2024-01-31")  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["SeriesInstanceUID"] for r in rows} == set(pacs.a.series)
    _no_patient_data(out.stdout + out.stderr)

    out = mriqa_cli(pacs.node.config, "pacs", "find", "--json", "--description", "*LIVER*")
    assert out.returncode == 0, out.stderr
    assert [r["StudyInstanceUID"] for r in json.loads(out.stdout)] == [pacs.b.uid]

    table = mriqa_cli(pacs.node.config, "pacs", "find", "--modality", "*")
    assert table.returncode == 0, table.stderr
    assert pacs.a.uid in table.stdout and pacs.b.uid in table.stdout
    assert "2024-01-05" in table.stdout and "MR ABDOMEN" in table.stdout
    _no_patient_data(table.stdout + table.stderr)
    series_table = mriqa_cli(pacs.node.config, "pacs", "find", "--level", "series")
    assert series_table.returncode == 0 and "T2 FSE AX" in series_table.stdout
    _no_patient_data(series_table.stdout + series_table.stderr)


# -- C-MOVE into the running node -------------------------------------------------------------


def _node_instances(db_url: str, study_uid: str) -> set[str]:
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as s:
            return set(
                s.scalars(
                    select(Instance.sop_instance_uid)
                    .join(Series, Instance.series_id == Series.id)
                    .join(Study, Series.study_id == Study.id)
                    .where(Study.study_uid == study_uid)
                )
            )
    finally:
        engine.dispose()


def test_pull_study_gets_verdicts(pacs: Pacs) -> None:
    assert _node_instances(pacs.db_url, pacs.a.uid) == set()
    out = mriqa_cli(pacs.node.config, "pacs", "pull", pacs.a.uid, "--wait", "--json",
                    "--timeout", "60")  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["move"] == {"status": "0x0000", "completed": 10, "failed": 0, "warning": 0,
                              "failed_sop_instance_uids": []}  # fmt: skip
    assert {r["series_uid"] for r in report["series"]} == set(pacs.a.series)
    for row in report["series"]:
        assert row["state"] == "decided" and row["instances"] == 5
        assert row["label"] in {"diagnostic", "non_diagnostic"}
    _no_patient_data(out.stdout + out.stderr)

    # The node holds every instance of the study, received from the PACS, each series decided.
    assert _node_instances(pacs.db_url, pacs.a.uid) == pacs.a.sop_uids
    for uid in pacs.a.series:
        series, verdicts = series_row(pacs.db_url, uid)
        assert series is not None and series.calling_aet == "ORTHANC"
        assert series.state == "decided" and len(verdicts) == 1 and verdicts[0].n_slices == 5
    assert _node_instances(pacs.db_url, pacs.b.uid) == set()  # the other study stays put

    # The table output of a second pull: duplicates are Success, the verdicts are unchanged.
    again = mriqa_cli(pacs.node.config, "pacs", "pull", pacs.a.uid)
    assert again.returncode == 0, again.stderr
    assert "moved: 10 completed, 0 failed" in again.stdout and "decided" in again.stdout
    for uid in pacs.a.series:
        assert len(series_row(pacs.db_url, uid)[1]) == 1


def test_pull_mixed_study_skips_non_mr(pacs: Pacs) -> None:
    (dwi,) = pacs.b.series
    out = mriqa_cli(pacs.node.config, "pacs", "pull", pacs.b.uid, "--timeout", "60")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "skipping CT series" in out.stdout
    assert "moved: 5 completed, 0 failed" in out.stdout
    assert dwi[-20:] in out.stdout and "decided" in out.stdout
    assert _node_instances(pacs.db_url, pacs.b.uid) == pacs.b.sop_uids  # MR only, no CT


def test_pull_one_series_no_wait(pacs: Pacs) -> None:
    study = pacs.a.uid
    (t2,) = [u for u, d in pacs.a.series.items() if d == "T2 FSE AX"]
    out = mriqa_cli(pacs.node.config, "pacs", "pull", study, "--series", t2, "--no-wait")
    assert out.returncode == 0, out.stderr
    assert "pulling 1 series (5 instance(s))" in out.stdout and "moved: 5 completed" in out.stdout

    missing = mriqa_cli(pacs.node.config, "pacs", "pull", study, "--series", "1.2.3.999")
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr


# -- errors ----------------------------------------------------------------------------------


def test_unknown_study_moves_nothing(pacs: Pacs) -> None:
    out = mriqa_cli(pacs.node.config, "pacs", "pull", "1.2.826.0.1.3680043.99.1")
    assert out.returncode == 1
    assert "study 1.2.826.0.1.3680043.99.1 not found on ORTHANC" in out.stderr
    assert "Traceback" not in out.stderr
    # Straight to C-MOVE, skipping the C-FIND the CLI does first: Orthanc fails it (0xC000).
    with pytest.raises(QRError, match=r"0xC000.*holds nothing matching"):
        move(pacs.peer, "MRIQA", "MRIQA", "1.2.826.0.1.3680043.99.1")
    assert _node_instances(pacs.db_url, "1.2.826.0.1.3680043.99.1") == set()


def test_peer_refusals(pacs: Pacs) -> None:
    # A calling AE title Orthanc does not know: it aborts instead of answering.
    with pytest.raises(QRError, match="is STRANGER registered on the PACS"):
        find(pacs.peer, "STRANGER", "STUDY")
    # A move destination Orthanc does not know.
    with pytest.raises(QRError, match="does not know NOBODY as a move destination"):
        move(pacs.peer, "MRIQA", "NOBODY", pacs.a.uid)
    # The PACS still answers after all that.
    assert len(find(pacs.peer, "MRIQA", "STUDY")) == 2


def test_unreachable_pacs(pacs: Pacs, tmp_path: Path) -> None:
    closed = RemoteAE(ae_title="ORTHANC", host="127.0.0.1", port=free_port())
    with pytest.raises(QRError, match=r"cannot reach ORTHANC@127\.0\.0\.1:\d+: .*refused"):
        find(closed, "MRIQA", "STUDY")
    with pytest.raises(QRError, match="cannot reach"):
        move(closed, "MRIQA", "MRIQA", pacs.a.uid)

    text = pacs.node.config.read_text()
    config = tmp_path / "down.toml"
    config.write_text(
        text.replace(_query_table(pacs.orthanc.dicom_port), _query_table(closed.port))
    )
    for args in (["find"], ["pull", pacs.a.uid]):
        out = mriqa_cli(config, "pacs", *args)
        assert out.returncode == 1, out.stdout
        assert "cannot reach ORTHANC" in out.stderr and "Connection refused" in out.stderr
        assert "Traceback" not in out.stderr

    unconfigured = tmp_path / "none.toml"
    unconfigured.write_text(text.replace(_query_table(pacs.orthanc.dicom_port), ""))
    out = mriqa_cli(unconfigured, "pacs", "find")
    assert out.returncode == 1 and "[pacs.query]" in out.stderr
    assert "Traceback" not in out.stderr


# -- TLS (a small pynetdicom Q/R SCP: the Orthanc helper has no TLS switch) --------------------


def test_find_over_tls(tmp_path: Path) -> None:
    skey, scert = self_signed(tmp_path, "pacs")
    ckey, ccert = self_signed(tmp_path, "node")
    callers: list[str] = []

    def on_find(event):
        callers.append(event.assoc.requestor.ae_title)
        match = Dataset()
        match.QueryRetrieveLevel = "STUDY"
        match.StudyInstanceUID = "1.2.3.4"
        match.StudyDate = "20240105"
        match.ModalitiesInStudy = ["MR", "SR"]
        match.NumberOfStudyRelatedInstances = "12"
        yield 0xFF00, match

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(scert), str(skey))
    server_tls.verify_mode = ssl.CERT_REQUIRED  # the PACS wants our certificate
    server_tls.load_verify_locations(cafile=str(ccert))
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_tls,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])  # fmt: skip
    try:
        peer = RemoteAE(ae_title="TLSPACS", host="127.0.0.1", port=port, tls=True,
                        tls_ca=str(scert), tls_cert=str(ccert), tls_key=str(ckey))  # fmt: skip
        (study,) = find(peer, "MRIQA", "STUDY", date_from=date(2024, 1, 1))
        assert study["StudyInstanceUID"] == "1.2.3.4" and study["ModalitiesInStudy"] == ["MR", "SR"]
        assert study["NumberOfStudyRelatedInstances"] == 12 and study["StudyDescription"] is None
        assert callers == ["MRIQA"]

        plain = peer.model_copy(update={"tls": False})
        with pytest.raises(QRError, match=r"cannot reach TLSPACS.*does it require TLS\?"):
            find(plain, "MRIQA", "STUDY")
        untrusted = peer.model_copy(update={"tls_ca": str(ccert)})  # not the PACS's certificate
        with pytest.raises(QRError, match=r"TLS handshake failed: .*certificate verify failed"):
            find(untrusted, "MRIQA", "STUDY")
        missing = peer.model_copy(update={"tls_cert": str(tmp_path / "nope.crt")})
        with pytest.raises(QRError, match="cannot load the TLS files"):
            find(missing, "MRIQA", "STUDY")
        assert callers == ["MRIQA"]
    finally:
        server.shutdown()


def test_rejected_association() -> None:
    ae = AE(ae_title="PICKY")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.require_calling_aet = ["SOMEONE"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        peer = RemoteAE(ae_title="PICKY", host="127.0.0.1", port=port)
        reason = r"rejected the association from MRIQA \(.*Calling AE title not recognised\)"
        with pytest.raises(QRError, match=reason):
            find(peer, "MRIQA", "STUDY")
    finally:
        server.shutdown()
