"""The PACS publisher on real databases: which events make which QA objects, once each."""

from __future__ import annotations

import pydicom
import pytest
from sqlalchemy import select, update

from mriqa_node.config import DestinationConfig
from mriqa_node.db.models import AckAction, Cursor, Event, ForwardJob, Role, Series
from mriqa_node.dicom.objects import QaEncoder
from mriqa_node.services.alerts import AlertService
from mriqa_node.services.pacs import NotRejectable, PacsPublisher
from mriqa_node.services.users import Principal
from tests.conftest import Env
from tests.test_console_api import decided_series


def publisher(env: Env, auto: bool = False, **dest) -> PacsPublisher:
    d = DestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, **dest)
    return PacsPublisher(env.sessions, env.sessions, env.spool, [d], QaEncoder("MRIQA"), auto)


def queued(env: Env, kind: str | None = None) -> list[ForwardJob]:
    with env.session() as s:
        q = select(ForwardJob).order_by(ForwardJob.id)
        return list(s.scalars(q.where(ForwardJob.kind == kind) if kind else q))


def test_each_verdict_gets_one_sr_and_a_rescan_one_rejection_note(env: Env) -> None:
    pub = publisher(env)
    pub.step()  # starts at the newest event: history is not replayed
    bad = decided_series(env, 0.9, seed=1)
    good = decided_series(env, 0.1, seed=2)
    assert pub.step() >= 2
    srs = queued(env, "sr")
    assert sorted(j.series_uid for j in srs) == sorted([bad, good])
    sr = pydicom.dcmread(env.spool.path(srs[0].spool_path))
    assert sr.Modality == "SR" and srs[0].spool_path.startswith("qa/")
    assert queued(env, "kos") == []  # nobody confirmed a rejection yet

    (alert,) = AlertService(env.sessions).list(state="open")
    tech = Principal(1, "tina", Role.technologist)
    AlertService(env.sessions).acknowledge(alert["id"], tech, AckAction.rescanned)
    pub.step()
    (kos_job,) = queued(env, "kos")
    kos = pydicom.dcmread(env.spool.path(kos_job.spool_path))
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113001"
    refs = {r.ReferencedSOPInstanceUID for r in kos.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0].ReferencedSOPSequence}  # fmt: skip
    with env.session() as s:
        series = s.scalar(select(Series).where(Series.series_uid == bad))
        assert series.rejected_by == "tina" and series.rejected_at is not None
        assert refs == {i.sop_instance_uid for i in series.instances}
        assert s.scalar(select(Event.kind).where(Event.kind == "series_rejected")) is not None

    # Again, by hand or by a replayed event: the series is rejected once, one note queued.
    assert pub.reject(bad, "someone") is None
    pub._cursor = None  # a restart re-reads from the stored cursor ...
    with env.sessions.begin() as s:  # ... rewound: every event is handled a second time
        s.execute(update(Cursor).values(last_event_id=0))
    pub.step()
    assert len(queued(env, "kos")) == 1 and len(queued(env, "sr")) == 2
    with pytest.raises(NotRejectable):
        pub.reject("1.2.3.4", "someone")


def test_automatic_rejection_and_destinations_that_want_nothing(env: Env) -> None:
    pub = publisher(env, auto=True, send_sr=False)
    pub.step()
    bad = decided_series(env, 0.9, seed=3)
    decided_series(env, 0.1, seed=4)
    pub.step()
    assert [j.series_uid for j in queued(env)] == [bad]  # the note only: no SR wanted
    assert queued(env)[0].kind == "kos"


def test_a_not_assessed_series_gets_no_sr(env: Env) -> None:
    """A localizer is not assessed: the radiologist's PACS gets no QA result for it."""
    from tests.test_scope import _localizer, _store

    pub = publisher(env)
    pub.step()
    localizer = _localizer(seed=12)
    for ds in localizer:
        _store(env.intake, ds)
    assert env.series.tick() == [localizer[0].SeriesInstanceUID]
    good = decided_series(env, 0.1, seed=13)
    assert pub.step() >= 2  # both verdicts handled
    assert [j.series_uid for j in queued(env, "sr")] == [good]
