"""The shared intake set (real scanner files from several vendors) through a running node.

Every file of ../shared/data/intake goes over DICOM to an in-process node (SQLite, the tiny
model, worker on). MR and Enhanced MR objects must be kept and end scored or unscorable with a
reason; other SOP classes are refused at negotiation; duplicate SOP Instance UIDs are kept once;
the deliberately truncated file breaks nothing; every series gets a verdict in bounded time.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context
from sqlalchemy import func, select

from mriqa_node.config import load_config
from mriqa_node.db.models import Instance, Series, SeriesVerdict, SliceScore
from mriqa_node.dicom.headers import STORAGE_SOP_CLASSES
from mriqa_node.dicom.scu import NOT_ACCEPTED, send_datasets
from mriqa_node.node import Node
from mriqa_node.phantom import synth_series
from mriqa_node.preprocess import preprocess_frames
from tests.peers import free_port

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "intake"
MANIFEST = SHARED / "MANIFEST.csv"
VERDICT_TIMEOUT = 120.0


@pytest.fixture(autouse=True)
def _no_mriqa_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """load_config(None, ...) also reads MRIQA_* variables: keep the caller's out."""
    for key in [k for k in os.environ if k.startswith("MRIQA_")]:
        monkeypatch.delenv(key)


def _manifest() -> list[dict[str, str]]:
    if not MANIFEST.is_file():
        pytest.skip(f"shared intake set not found ({MANIFEST}); it lives beside the checkout")
    with MANIFEST.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _read(path: Path) -> pydicom.Dataset | None:
    """The dataset, or None when it cannot be sent as a dataset (the truncated file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except Exception:
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        return None
    return ds if "SOPClassUID" in ds and "SOPInstanceUID" in ds else None


def _send_raw(path: Path, port: int) -> int:
    """Send a file's bytes as they are (pynetdicom does not decode them); the DIMSE status,
    -1 without a response, NOT_ACCEPTED without a usable context."""
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="SCANNER1")
    ae.requested_contexts = [build_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])]
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MRIQA")
        if not assoc.is_established:
            return -1
        try:
            status = assoc.send_c_store(path)
        except ValueError:
            return NOT_ACCEPTED
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    return int(status.Status) if status else -1


def test_shared_intake_set_through_a_running_node(tmp_path: Path, model_dir: Path) -> None:
    manifest = _manifest()
    port = free_port()
    settings = load_config(
        None,
        dicom={"port": port, "allowed_calling_aets": ["SCANNER1"]},
        storage={
            "spool_dir": str(tmp_path / "spool"),
            "database_url": f"sqlite:///{tmp_path / 'mriqa.db'}",
        },
        model={"path": str(model_dir)},
        series={"idle_seconds": 2.0, "release_grace_seconds": 0.5},
        worker={"poll_seconds": 0.1, "max_batch": 16},
    )
    node = Node(settings)
    node.start()
    started = time.monotonic()
    try:
        by_folder: dict[str, list[tuple[str, pydicom.Dataset]]] = defaultdict(list)
        unsendable: list[str] = []
        for row in manifest:
            ds = _read(SHARED / row["path"])
            if ds is None:
                unsendable.append(row["path"])
            else:
                by_folder[row["path"].split("/")[0]].append((row["path"], ds))
        assert unsendable == [r["path"] for r in manifest if "truncated" in r["note"].lower()], (
            "only the deliberately truncated file should be unreadable"
        )

        datasets = {name: ds for items in by_folder.values() for name, ds in items}
        mr = {n for n, ds in datasets.items() if ds.SOPClassUID in STORAGE_SOP_CLASSES}
        other = set(datasets) - mr
        assert mr and other

        status: dict[str, int] = {}
        for items in by_folder.values():  # one association per acquisition folder
            names = [name for name, _ in items if name in mr]
            if not names:
                continue
            batch = [datasets[name] for name in names]
            report = send_datasets(batch, "127.0.0.1", port, names=names)
            status |= dict.fromkeys(names, 0) | report.failed
        assert {n: status[n] for n in mr if status[n] != 0} == {}, "MR objects not accepted"

        # Other SOP classes, in one association with an MR instance (an association with
        # nothing acceptable in it is rejected as a whole): refused at negotiation.
        probe = synth_series(2, size=64, seed=51, announce_count=False)
        names = sorted(other)
        report = send_datasets(
            [probe[0], *(datasets[n] for n in names)], "127.0.0.1", port, names=["probe", *names]
        )
        assert report.sent == 1 and "probe" not in report.failed
        assert report.failed == dict.fromkeys(other, NOT_ACCEPTED)
        kinds = {str(datasets[n].SOPClassUID.name) for n in other}
        assert {"Enhanced SR Storage", "Raw Data Storage"} <= kinds

        # The truncated file: its bytes go over the wire as they are. Whatever the answer,
        # nothing may crash, and the receiver must keep serving.
        raw_status = {name: _send_raw(SHARED / name, port) for name in unsendable}
        assert send_datasets(probe[1:], "127.0.0.1", port).sent == 1

        sop_of = {n: str(datasets[n].SOPInstanceUID) for n in mr}
        expected_sops = set(sop_of.values()) | {str(ds.SOPInstanceUID) for ds in probe}
        assert len(expected_sops) < len(mr) + 2, "the set is expected to hold duplicate UIDs"

        deadline = started + VERDICT_TIMEOUT
        while True:
            with node.sessions() as s:
                open_work = s.scalar(
                    select(func.count(Instance.id)).where(
                        Instance.state.in_(["pending", "claimed"])
                    )
                )
                undecided = s.scalars(
                    select(Series.series_uid).where(Series.state != "decided")
                ).all()
            if not open_work and not undecided:
                break
            assert time.monotonic() < deadline, (
                f"no verdict within {VERDICT_TIMEOUT} s: {open_work} instance(s) waiting,"
                f" series not decided: {undecided}"
            )
            time.sleep(0.5)

        with node.sessions() as s:
            instances = s.scalars(select(Instance)).all()
            kept = {i.sop_instance_uid: i for i in instances}
            # Duplicates (same SOP Instance UID in several files) are kept once.
            assert len(instances) == len(kept)
            assert set(kept) == expected_sops
            scored_frames: dict[int, int] = defaultdict(int)
            for inst in instances:
                assert (tmp_path / "spool" / inst.spool_path).is_file()
                assert inst.state in ("scored", "unscorable", "out_of_scope"), inst.state
                n_scores = s.scalar(
                    select(func.count(SliceScore.id)).where(SliceScore.instance_id == inst.id)
                )
                if inst.state == "out_of_scope":  # DWI, EPI, phase, ASL...: never scored
                    assert inst.reason.startswith("not assessed: "), inst.sop_instance_uid
                    assert n_scores == 0
                elif inst.state == "unscorable":
                    assert inst.reason and inst.reason.strip(), inst.sop_instance_uid
                    assert n_scores == 0
                else:  # every frame that shows anatomy (phase maps hold noise frames)
                    stored = pydicom.dcmread(tmp_path / "spool" / inst.spool_path)
                    shows = len(preprocess_frames(stored).anatomy)
                    assert n_scores == shows >= 1, inst.sop_instance_uid
                    scored_frames[inst.series_id] += shows
            for series in s.scalars(select(Series)).all():
                verdict = s.scalars(
                    select(SeriesVerdict)
                    .where(SeriesVerdict.series_id == series.id)
                    .order_by(SeriesVerdict.id.desc())
                ).first()
                assert verdict is not None, series.series_uid
                assert verdict.n_slices == scored_frames[series.id], series.series_uid
                if scored_frames[series.id]:
                    assert verdict.label in ("diagnostic", "non_diagnostic")
                    assert 0.0 <= verdict.score <= 1.0
                elif verdict.label == "not_assessed":
                    assert verdict.reason.startswith("not assessed: ") and verdict.score is None
                else:
                    assert verdict.label == "unscorable" and verdict.score is None
        assert scored_frames, "nothing in the shared set was scored"
        for name, code in raw_status.items():
            assert code != -1, f"{name}: no answer from the receiver"
            if code == 0:  # acknowledged: then it must be a duplicate of a kept instance
                meta = pydicom.filereader.read_file_meta_info(SHARED / name)
                assert str(meta.MediaStorageSOPInstanceUID) in kept
    finally:
        node.stop()
