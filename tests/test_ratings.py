"""Ratings, agreement statistics and the training-manifest export, on both databases.

Agreement numbers are checked against kappa and Jaccard values computed by hand (in the
comments) on small known sets.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from mriqa_node.db.models import Instance, Rating, SliceScore
from mriqa_node.domain.agreement import compare, pairwise
from mriqa_node.domain.records import InstanceHeader
from mriqa_node.domain.verdict import SeriesPolicy
from mriqa_node.services.ratings import (
    Forbidden,
    NotFound,
    RatingError,
    RatingService,
    patient_pseudonym,
)
from mriqa_node.services.scoring import InstanceResult
from mriqa_node.services.users import Principal, UserService
from tests.conftest import Env
from training.manifest import read_manifest

BINARY = {
    "name": "binary-model",
    "version": "1",
    "sha256": "b1" * 32,
    "task": "binary",
    "class_names": ["non_diagnostic", "diagnostic"],
    # 0.4, not argmax's 0.5: a slice with P(non-diagnostic) 0.45 tells which one was used
    "policy": SeriesPolicy(slice_threshold=0.4, series_threshold=0.5).as_dict(),
}
THREE_CLASS = {
    **BINARY,
    "name": "3class-model",
    "sha256": "c3" * 32,
    "task": "3class",
    "class_names": ["non_diagnostic", "diagnostic", "excellent"],
}
PATIENT = "PAT-SECRET-4711"


# -- helpers -------------------------------------------------------------------------------------


def add_series(
    env: Env,
    n: int,
    frames: Sequence[int] | None = None,
    patient_id: str | None = PATIENT,
    study_uid: str | None = None,
    announce: bool = True,
) -> tuple[str, list[str]]:
    """A series of n instances (rows only, no files); complete once all arrived if announced."""
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    frames = list(frames or [1] * n)
    sops = []
    for i, f in enumerate(frames):
        h = InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            sop_instance_uid=generate_uid(),
            series_uid=series_uid,
            study_uid=study_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            instance_number=i + 1,
            frames=f,
            expected_slices=sum(frames) if announce else None,
            patient_id=patient_id,
        )
        relpath = env.spool.relpath(study_uid, series_uid, h.sop_instance_uid)
        env.intake.register(h, relpath, 10, "SCANNER1")
        sops.append(h.sop_instance_uid)
    return series_uid, sops


def score(env: Env, meta: dict, probs: dict[str, list[float]]) -> None:
    """Score the pending instances with ``meta``'s model: probabilities by SOP Instance UID
    (one slice each)."""
    model_id = env.queue.model_version_id(meta)
    claims = env.queue.claim("host:1:a", 1000)
    results = [InstanceResult(c, [probs[c.sop_instance_uid]], [0.0]) for c in claims]
    env.queue.record("host:1:a", model_id, results)


def rescore(env: Env, meta: dict, probs: dict[str, list[float]]) -> None:
    """Scores of a newer model for instances scored before (as a re-scoring job leaves them)."""
    model_id = env.queue.model_version_id(meta)
    with env.sessions.begin() as s:
        for sop, p in probs.items():
            inst_id = s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop))
            s.add(SliceScore(instance_id=inst_id, frame=0, probabilities=p,
                             p_nondiagnostic=p[0], model_version_id=model_id))  # fmt: skip


def binary_probs(sops: list[str], p_nd: list[float]) -> dict[str, list[float]]:
    return {sop: [p, 1.0 - p] for sop, p in zip(sops, p_nd, strict=True)}


@pytest.fixture
def raters(env: Env) -> dict[str, Principal]:
    users = UserService(env.sessions)
    return {
        name: users.add(name, role, "correct horse")
        for name, role in (("alice", "radiologist"), ("bob", "admin"), ("tom", "technologist"))
    }


@pytest.fixture
def service(env: Env) -> RatingService:
    return RatingService(env.sessions)


def rate_all(service: RatingService, user: Principal, series_uid: str, sops, values) -> None:
    for sop, v in zip(sops, values, strict=True):
        service.rate(user, series_uid, v, sop)


def assert_matrix(got: list[list[float | None]], expected: list[list[float]]) -> None:
    np.testing.assert_allclose(np.array(got, dtype=float), np.array(expected), atol=1e-12)


def rating_rows(env: Env) -> int:
    with env.session() as s:
        return s.scalar(select(func.count(Rating.id)))


# -- pure agreement ------------------------------------------------------------------------------


def test_pairwise_uses_the_items_both_rated() -> None:
    labels = {
        "a": {1: 0, 2: 1, 3: 2, 4: 2},
        "b": {1: 0, 2: 1, 3: 1, 5: 0},
        "c": {9: 1},
    }
    ab, ac, bc = pairwise(labels, 3)
    assert (ab["a"], ab["b"], ac["b"], bc["a"]) == ("a", "b", "c", "b")
    # items 1, 2, 3: confusion [[1,0,0],[0,1,0],[0,1,0]]; po 2/3, pe (1*1 + 1*2 + 1*0)/9 = 1/3
    assert ab["n"] == 3 and ab["agreement"] == pytest.approx(2 / 3)
    assert ab["kappa"] == pytest.approx((2 / 3 - 1 / 3) / (2 / 3))
    assert ab["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    # J[2,1] = |{3}| / |{3} | {2,3}| = 1/2; nobody used class 2 on b's side: J[0,2] = 0/1
    assert ab["jaccard"][2][1] == pytest.approx(0.5) and ab["jaccard"][0][2] == 0.0
    assert ac == {"a": "a", "b": "c", "n": 0, "kappa": None, "agreement": None,
                  "jaccard": [[None] * 3] * 3, "confusion": [[0] * 3] * 3}  # fmt: skip
    same = compare({1: 1, 2: 1}, {1: 1, 2: 1}, 3)
    assert same["kappa"] is None and same["agreement"] == 1.0  # chance agreement is 1
    assert same["jaccard"][1][1] == 1.0 and same["jaccard"][0][0] is None


# -- rating --------------------------------------------------------------------------------------


def test_rating_again_replaces_the_rating(env: Env, raters, service: RatingService) -> None:
    uid, sops = add_series(env, 2)
    alice, bob = raters["alice"], raters["bob"]
    first = service.rate(alice, uid, 0, sops[0])
    assert first["previous"] is None and first["value"] == 0 and first["rater"] == "alice"
    again = service.rate(alice, uid, 2, sops[0])
    assert again["previous"] == 0 and again["label"] == "excellent"
    service.rate(bob, uid, 1, sops[0])
    service.rate(alice, uid, 1)  # the whole series
    assert service.rate(alice, uid, 0)["previous"] == 1  # NULL instance: still replaced
    assert rating_rows(env) == 3

    rows = service.for_series(uid)
    assert [(r["rater"], r["sop_instance_uid"], r["frame"], r["value"]) for r in rows] == [
        ("alice", None, 0, 0),
        ("alice", sops[0], 0, 2),
        ("bob", sops[0], 0, 1),
    ]
    assert rows[1]["instance_number"] == 1 and rows[1]["created_at"].startswith("20")
    other, _ = add_series(env, 1)
    assert service.for_series(other) == []


def test_rating_validation(env: Env, raters, service: RatingService) -> None:
    uid, sops = add_series(env, 2, frames=[1, 3])
    other, other_sops = add_series(env, 1)
    alice = raters["alice"]
    for bad in (3, -1, True, "1", 1.0, None):
        with pytest.raises(RatingError, match=r"0 \(non-diagnostic\)"):
            service.rate(alice, uid, bad, sops[0])  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="no series"):
        service.rate(alice, "1.2.3.999", 1)
    with pytest.raises(NotFound, match="no instance"):
        service.rate(alice, uid, 1, "1.2.3.999")
    with pytest.raises(RatingError, match="not in series"):
        service.rate(alice, uid, 1, other_sops[0])
    with pytest.raises(RatingError, match=r"out of range: .* has 3 frame"):
        service.rate(alice, uid, 1, sops[1], frame=3)
    with pytest.raises(RatingError, match=r"out of range: .* has 1 frame"):
        service.rate(alice, uid, 1, sops[0], frame=1)
    with pytest.raises(RatingError, match="frame must be"):
        service.rate(alice, uid, 1, sops[1], frame=-1)
    with pytest.raises(RatingError, match="series rating has no frame"):
        service.rate(alice, uid, 1, frame=1)
    with pytest.raises(Forbidden):
        service.rate(raters["tom"], uid, 1, sops[0])
    with pytest.raises(NotFound):
        service.for_series("1.2.3.999")
    with pytest.raises(RatingError, match="level"):
        service.agreement("study")
    assert rating_rows(env) == 0
    assert service.rate(alice, uid, 1, sops[1], frame=2)["frame"] == 2
    assert service.rate(alice, other, 1, other_sops[0])["value"] == 1
    assert issubclass(RatingError, ValueError) and issubclass(NotFound, LookupError)


# -- agreement -----------------------------------------------------------------------------------


def test_slice_agreement_with_a_binary_model(env: Env, raters, service: RatingService) -> None:
    uid, sops = add_series(env, 6)
    alice, bob = raters["alice"], raters["bob"]
    rate_all(service, alice, uid, sops, [0, 0, 1, 1, 2, 2])
    rate_all(service, bob, uid, sops, [0, 1, 1, 1, 2, 0])
    # slice threshold 0.4 (the verdict's policy): model labels 0 0 1 1 1 0 (argmax: 0 1 1 1 1 0)
    score(env, BINARY, binary_probs(sops, [0.9, 0.45, 0.3, 0.1, 0.05, 0.6]))
    assert env.series.tick() == [uid]

    got = service.agreement()
    assert got["level"] == "slice" and got["raters"] == ["alice", "bob"]
    assert got["class_names"] == ["non_diagnostic", "diagnostic", "excellent"]
    assert got["counts"] == {"alice": 6, "bob": 6} and got["items"] == 6
    (pair,) = got["pairs"]
    # rows alice, columns bob: [[1,1,0],[0,2,0],[1,0,1]]; po 4/6; row sums 2 2 2, column sums
    # 2 3 1: pe 12/36 = 1/3; kappa (2/3 - 1/3) / (2/3) = 0.5
    assert pair["n"] == 6 and pair["agreement"] == pytest.approx(4 / 6)
    assert pair["kappa"] == pytest.approx(0.5)
    assert pair["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert_matrix(pair["jaccard"], [[1 / 3, 1 / 4, 0], [0, 2 / 3, 0], [1 / 3, 0, 1 / 2]])
    m_alice, m_bob = got["model"]
    assert (m_alice["rater"], m_bob["rater"]) == ("alice", "bob")
    assert m_alice["classes"] == ["non_diagnostic", "diagnostic"]
    # alice binarised 0 0 1 1 1 1 vs model 0 0 1 1 1 0: [[2,0],[1,3]]; po 5/6, pe (2*3+4*3)/36
    # = 1/2; kappa (5/6 - 1/2) / (1/2) = 2/3. J: [[2/3, 0/5], [1/6, 3/4]]
    assert m_alice["n"] == 6 and m_alice["confusion"] == [[2, 0], [1, 3]]
    assert m_alice["kappa"] == pytest.approx(2 / 3)
    assert m_alice["agreement"] == pytest.approx(5 / 6)
    assert_matrix(m_alice["jaccard"], [[2 / 3, 0], [1 / 6, 3 / 4]])
    # bob binarised 0 1 1 1 1 0: the same table
    assert m_bob["confusion"] == [[2, 0], [1, 3]] and m_bob["kappa"] == pytest.approx(2 / 3)

    # A series without a verdict falls back to argmax: P 0.45 is diagnostic there.
    uid2, sops2 = add_series(env, 1, announce=False)
    service.rate(alice, uid2, 0, sops2[0])
    score(env, BINARY, binary_probs(sops2, [0.45]))
    m_alice = service.agreement()["model"][0]
    assert m_alice["n"] == 7 and m_alice["confusion"] == [[2, 1], [1, 3]]


def test_slice_agreement_with_a_three_class_model_uses_the_newest_score(
    env: Env, raters, service: RatingService
) -> None:
    uid, sops = add_series(env, 4, frames=[1, 1, 1, 1])
    multi, (multi_sop,) = add_series(env, 1, frames=[2], announce=False)
    alice, bob = raters["alice"], raters["bob"]
    rate_all(service, alice, uid, sops, [0, 2, 2, 1])
    service.rate(alice, multi, 1, multi_sop, frame=1)  # no score for frame 1: not compared
    service.rate(bob, uid, 2, sops[1])
    score(env, BINARY, binary_probs(sops, [0.1, 0.1, 0.1, 0.1]) | {multi_sop: [0.2, 0.8]})
    assert service.agreement()["model"][0]["classes"] == ["non_diagnostic", "diagnostic"]

    # argmax 0 2 1 0 (the second model is newer: its scores count)
    rescore(env, THREE_CLASS, {sops[0]: [0.7, 0.2, 0.1], sops[1]: [0.1, 0.3, 0.6],
                               sops[2]: [0.2, 0.5, 0.3], sops[3]: [0.45, 0.3, 0.25]})  # fmt: skip
    got = service.agreement("slice")
    assert got["counts"] == {"alice": 5, "bob": 1} and got["items"] == 5
    m_alice, m_bob = got["model"]
    assert m_alice["classes"] == ["non_diagnostic", "diagnostic", "excellent"]
    # alice 0 2 2 1 vs model 0 2 1 0: [[1,0,0],[1,0,0],[0,1,1]]; po 2/4; row sums 1 1 2,
    # column sums 2 1 1: pe 5/16; kappa (1/2 - 5/16) / (11/16) = 3/11
    assert m_alice["n"] == 4 and m_alice["confusion"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m_alice["kappa"] == pytest.approx(3 / 11)
    assert m_alice["jaccard"][2] == pytest.approx([0, 1 / 2, 1 / 2])  # {3}/{2,3}, {2}/{2,3}
    assert m_bob["n"] == 1 and m_bob["kappa"] is None and m_bob["agreement"] == 1.0
    (pair,) = got["pairs"]
    assert pair["n"] == 1 and pair["agreement"] == 1.0


def test_series_agreement(env: Env, raters, service: RatingService) -> None:
    alice, bob = raters["alice"], raters["bob"]
    uids = []
    for p in (0.9, 0.1, 0.1):  # verdicts: non-diagnostic, diagnostic, diagnostic
        uid, sops = add_series(env, 2)
        score(env, BINARY, binary_probs(sops, [p, p]))
        uids.append(uid)
    assert sorted(env.series.tick()) == sorted(uids)
    undecided, undecided_sops = add_series(env, 1, announce=False)
    for uid, a, b in zip(uids, [0, 2, 1], [1, 1, 0], strict=True):
        service.rate(alice, uid, a)
        service.rate(bob, uid, b)
    service.rate(alice, undecided, 2)  # no verdict: not compared with the model
    service.rate(alice, undecided, 0, undecided_sops[0])  # a slice rating: not a series one

    got = service.agreement("series")
    assert got["level"] == "series" and got["counts"] == {"alice": 4, "bob": 3}
    (pair,) = got["pairs"]
    # alice 0 2 1 vs bob 1 1 0: [[0,1,0],[1,0,0],[0,1,0]]; po 0; pe (1*1+1*2+1*0)/9 = 1/3;
    # kappa -1/3 / (2/3) = -0.5
    assert pair["n"] == 3 and pair["agreement"] == 0.0 and pair["kappa"] == pytest.approx(-0.5)
    m_alice, m_bob = got["model"]
    assert m_alice["classes"] == ["non_diagnostic", "diagnostic"]
    # binary model: alice 0 1 1 vs verdicts 0 1 1; bob 1 1 0: [[0,1],[1,1]], po 1/3,
    # pe (1*1+2*2)/9 = 5/9, kappa (1/3 - 5/9) / (4/9) = -0.5
    assert m_alice["n"] == 3 and m_alice["kappa"] == pytest.approx(1.0)
    assert m_bob["confusion"] == [[0, 1], [1, 1]] and m_bob["kappa"] == pytest.approx(-0.5)
    assert service.agreement("slice")["counts"] == {"alice": 1}


def test_agreement_without_ratings(env: Env, service: RatingService) -> None:
    for level in ("slice", "series"):
        got = service.agreement(level)
        assert got["raters"] == [] and got["pairs"] == [] and got["model"] == []
        assert got["counts"] == {} and got["items"] == 0


# -- export --------------------------------------------------------------------------------------


def test_export_manifest_round_trip(
    env: Env, raters, service: RatingService, tmp_path: Path
) -> None:
    alice, bob = raters["alice"], raters["bob"]
    out = tmp_path / "export" / "ratings.csv"
    assert service.export_manifest(out, env.spool.root) == 0
    assert read_manifest(out) == []  # still a valid manifest

    uid, sops = add_series(env, 5, frames=[1, 1, 1, 2, 1])
    other, (other_sop,) = add_series(env, 1, patient_id=None)
    service.rate(bob, uid, 2, sops[1])  # bob rates first; alice's account is older
    service.rate(alice, uid, 0, sops[0])
    service.rate(alice, uid, 1, sops[1])
    service.rate(alice, uid, 1, sops[1])  # re-rated: still one cell
    service.rate(bob, uid, 0, sops[2])
    service.rate(alice, uid, 1, sops[3], frame=1)  # multi-frame: not a manifest row
    service.rate(alice, uid, 0)  # series rating: not a manifest row
    service.rate(bob, other, 1, other_sop)

    assert service.export_manifest(out, env.spool.root) == 4
    with out.open(newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["path", "patient_id", "study_uid", "series_uid", "sop_instance_uid",
                      "instance", "rater1", "rater2", "severity", "true_class"]  # fmt: skip
    assert PATIENT not in out.read_text()

    records = read_manifest(out)
    assert [r.sop_instance_uid for r in records] == [*sops[:3], other_sop]
    assert [r.raters for r in records] == [
        {"rater1": 0, "rater2": None},
        {"rater1": 1, "rater2": 2},
        {"rater1": None, "rater2": 0},
        {"rater1": None, "rater2": 1},
    ]  # rater1 alice, rater2 bob
    assert [r.instance for r in records] == [1, 2, 3, 1]
    for r in records[:3]:
        assert r.series_uid == uid and r.severity is None and r.true_class is None
        assert r.path.is_absolute()
        assert r.path == env.spool.path(env.spool.relpath(r.study_uid, uid, r.sop_instance_uid))
    pseudonyms = {r.patient_id for r in records}
    assert len(pseudonyms) == 2  # one patient, and a study without a patient ID
    assert records[0].patient_id == patient_pseudonym(PATIENT, records[0].study_uid)
    assert records[0].patient_id != PATIENT and PATIENT not in records[0].patient_id
    # stable across exports; a site key gives other pseudonyms
    again = tmp_path / "again.csv"
    service.export_manifest(again, env.spool.root)
    assert [r.patient_id for r in read_manifest(again)] == [r.patient_id for r in records]
    service.export_manifest(again, env.spool.root, pseudonym_key=b"site secret")
    keyed = read_manifest(again)[0].patient_id
    assert keyed != records[0].patient_id and keyed.startswith("P")
