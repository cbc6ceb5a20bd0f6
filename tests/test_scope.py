"""Model scope: only the series the model is made for are scored; the rest are "not assessed"
with the rule that decided, and never raise an alert."""

from __future__ import annotations

import csv
import dataclasses
import json
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from mriqa_node.db.models import Alert, Event, Instance, Series, SeriesVerdict
from mriqa_node.dicom.headers import image_facts
from mriqa_node.domain.completion import CompletionRule
from mriqa_node.domain.scope import (
    MR_IMAGE_STORAGE,
    ImageFacts,
    ModelScope,
    Scope,
    SiteRule,
    orientation_of,
)
from mriqa_node.phantom import synth_series
from mriqa_node.services.intake import Intake, StoreOutcome
from mriqa_node.services.series import SeriesService
from tests.conftest import GRACE, IDLE, Env, storescu
from tests.peers import wait_for
from tests.test_services import MODEL_META

INTAKE = Path(__file__).resolve().parents[2] / "shared" / "data" / "intake"
needs_intake = pytest.mark.skipif(
    not (INTAKE / "MANIFEST.csv").is_file(), reason=f"real test data not found: {INTAKE}"
)

T2 = ImageFacts(
    sop_class_uid=MR_IMAGE_STORAGE, modality="MR", image_type=("ORIGINAL", "PRIMARY", "M"),
    scanning_sequence=("SE",), rows=512, columns=512, series_description="T2 FSE AX",
    protocol_name="t2_tse_tra", orientation="AX", body_part="ABDOMEN",
)  # fmt: skip


def facts(**changes) -> ImageFacts:
    return dataclasses.replace(T2, **changes)


# --- the rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "model: ImageType LOCALIZER"),
        ({"image_type": ("DERIVED", "SECONDARY", "MPR")}, "model: ImageType DERIVED/SECONDARY/MPR"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "P")}, "model: ImageType P"),
        ({"b_value": 1000.0}, "model: diffusion-weighted (b = 1000)"),
        ({"scanning_sequence": ("SE", "EP")}, "model: sequence EP (echo planar)"),
        ({"modality": "CT"}, "model: modality CT"),
        ({"rows": 16}, "model: 16x512 pixels outside 32-2048"),
        ({"samples_per_pixel": 3}, "colour image"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.22"}, "not an MR image"),
    ],
)
def test_model_scope_says_why_an_image_is_out(changes: dict, rule: str) -> None:
    decision = Scope().decide(facts(**changes))
    assert not decision.in_scope
    assert decision.rule.startswith(rule)
    assert decision.reason == f"not assessed: {decision.rule}"


def test_a_structural_magnitude_image_is_in_scope() -> None:
    decision = Scope().decide(T2)
    assert decision.in_scope and decision.rule == "model scope" and decision.reason is None
    assert Scope().decide(facts(b_value=0.0)).in_scope  # b = 0 is not diffusion weighting


def test_the_model_scope_from_its_training_data() -> None:
    scope = Scope.of({"sequences": ["SE", "GR"], "body_parts": ["HEAD"], "min_slices": 5})
    assert scope.model == ModelScope(sequences=("SE", "GR"), body_parts=("HEAD",), min_slices=5)
    assert scope.decide(facts(body_part="HEAD")).in_scope
    assert scope.decide(T2).rule == "model: body part ABDOMEN"
    assert (
        "not in the training data"
        in scope.decide(facts(scanning_sequence=("RM",), body_part="HEAD")).rule
    )
    assert scope.too_few_slices(4) == "not assessed: model: 4 slice(s), fewer than 5"
    assert scope.too_few_slices(5) is None
    assert Scope.of(scope.model.as_dict()) == Scope(scope.model)


def test_site_rules_narrow_and_widen_the_model_scope() -> None:
    haste = facts(
        scanning_sequence=("SE", "EP"),
        protocol_name="haste_abdomen",
        series_description="HASTE COR",
    )
    rules = (
        SiteRule("include", "protocol", "haste"),
        SiteRule("exclude", "calling_aet", "^OLDSCANNER$"),
        SiteRule("exclude", "description", "fse ax"),
    )
    scope = Scope(rules=rules)
    assert scope.decide(haste, "SCANNER1") == scope.decide(haste)  # included past the model
    assert (
        scope.decide(haste).in_scope
        and scope.decide(haste).rule == "site include protocol ~ /haste/"
    )
    assert not scope.decide(T2).in_scope  # excluded although the model would take it
    assert scope.decide(T2).rule == "site exclude description ~ /fse ax/"
    # exclude wins over include
    assert scope.decide(haste, "OLDSCANNER").rule == "site exclude calling_aet ~ /^OLDSCANNER$/"
    # ... but no site rule makes an SR or a colour image scorable
    sr = facts(sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22", protocol_name="haste")
    assert not scope.decide(sr).in_scope
    with pytest.raises(ValueError, match="not one of"):
        SiteRule("include", "colour", "x")
    with pytest.raises(ValueError, match="include or exclude"):
        SiteRule("allow", "protocol", "x")  # type: ignore[arg-type]


def test_orientation_from_direction_cosines() -> None:
    assert orientation_of([1, 0, 0, 0, 1, 0]) == "AX"
    assert orientation_of([0, 1, 0, 0, 0, -1]) == "SAG"
    assert orientation_of([1, 0, 0, 0, 0, -1]) == "COR"
    assert orientation_of([1, 0, 0, 0, 0.7071, 0.7071]) == "OBL"
    assert orientation_of(None) is None


@needs_intake
def test_every_intake_file_gets_a_decision_with_a_reason() -> None:
    """The DWI, ASL, fMRI/EPI, phase, colour FA, SR and raw-data files out; the structural
    series in."""
    structural = {
        "siemens_xa30_enh_t1",
        "philips_elition_classic_mprage",
        "pydicom_mr2_philips_shoulder",
        "pydicom_emri_small",
        "pydicom_broken",
    }
    decided: dict[str, set[bool]] = {}
    with (INTAKE / "MANIFEST.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            path = INTAKE / row["path"]
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # the truncated files: the receiver refuses them before scope
                continue
            decision = Scope().decide(image_facts(ds))
            assert decision.rule, path
            if not decision.in_scope:
                assert decision.reason.startswith("not assessed: "), path
            decided.setdefault(row["path"].split("/")[0], set()).add(decision.in_scope)
    assert {k for k, v in decided.items() if True in v} == structural
    assert all(v == {False} for k, v in decided.items() if k not in structural)
    for out in ("ge_pioneer_dwi", "siemens_xa30_enh_asl_multifile", "ge_architect_fmri_multiphase",
                "siemens_xa30_enh_phase", "siemens_xa30_enh_colorFA", "siemens_xa30_sr",
                "philips_elition_rawdata", "siemens_trio_mosaic_sag"):  # fmt: skip
        assert decided[out] == {False}, out


# --- the node -----------------------------------------------------------------------------------


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _store(intake: Intake, ds: pydicom.Dataset, aet: str = "SCANNER1") -> StoreOutcome:
    from mriqa_node.dicom.headers import parse_header

    data = _encode(ds)
    parsed = pydicom.dcmread(BytesIO(data))
    return intake.store(parse_header(parsed, parsed.file_meta.TransferSyntaxUID), data, aet)


def _localizer(n: int = 3, seed: int = 5) -> list[pydicom.Dataset]:
    series = synth_series(n, size=64, seed=seed, series_description="head overview")
    uid = generate_uid()
    for ds in series:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = uid
    return series


def test_an_out_of_scope_series_is_kept_not_scored_and_not_assessed(env: Env) -> None:
    series = _localizer()
    assert [_store(env.intake, ds) for ds in series] == [StoreOutcome.out_of_scope] * 3
    with env.session() as s:
        rows = s.scalars(select(Instance)).all()
        assert {r.state for r in rows} == {"out_of_scope"}
        assert {r.reason for r in rows} == {"not assessed: model: ImageType LOCALIZER"}
    assert env.queue.claim("host:1:a", 10) == []  # no GPU time for it
    assert env.series.tick() == [series[0].SeriesInstanceUID]  # announced count reached
    with env.session() as s:
        (v,) = s.scalars(select(SeriesVerdict)).all()
        assert v.label == "not_assessed" and v.score is None
        assert v.reason == "not assessed: model: ImageType LOCALIZER"
        assert s.scalar(select(func.count(Alert.id))) == 0
        event = s.scalar(select(Event).where(Event.kind == "verdict"))
        assert event.payload["label"] == "not_assessed"
        assert event.payload["reason"] == v.reason
        assert len(list(env.spool.root.rglob("*.dcm"))) == 3  # kept all the same


def test_site_rules_reach_intake(env: Env) -> None:
    scope = Scope(rules=(SiteRule("exclude", "calling_aet", "^OLD"),))
    intake = Intake(env.sessions, env.spool, scope=lambda: scope)
    a, b = synth_series(2, size=64, seed=6), synth_series(2, size=64, seed=7)
    assert {_store(intake, ds, "OLDMR") for ds in a} == {StoreOutcome.out_of_scope}
    assert {_store(intake, ds, "NEWMR") for ds in b} == {StoreOutcome.stored}
    with env.session() as s:
        reasons = s.scalars(select(Instance.reason).join(Series).where(
            Series.series_uid == a[0].SeriesInstanceUID)).all()  # fmt: skip
        assert set(reasons) == {"not assessed: site exclude calling_aet ~ /^OLD/"}


def test_too_few_slices_for_the_model_is_not_assessed(env: Env) -> None:
    from mriqa_node.services.scoring import InstanceResult

    series = SeriesService(env.sessions, CompletionRule(IDLE, GRACE))
    datasets = synth_series(2, size=64, seed=8)
    for ds in datasets:
        _store(env.intake, ds)
    meta = {**MODEL_META, "sha256": "5c" * 32, "scope": {"min_slices": 3}}
    model_id = env.queue.model_version_id(meta)
    claims = env.queue.claim("host:1:a", 10)
    env.queue.record(
        "host:1:a", model_id, [InstanceResult(c, [[0.99, 0.01]], [0.0]) for c in claims]
    )
    assert series.tick() == [datasets[0].SeriesInstanceUID]
    with env.session() as s:
        (v,) = s.scalars(select(SeriesVerdict)).all()
        assert v.label == "not_assessed" and v.n_slices == 2
        assert v.reason == "not assessed: model: 2 slice(s), fewer than 3"
        assert s.scalar(select(func.count(Alert.id))) == 0  # 0.99, and still no alert


@pytest.mark.slow
@needs_intake
def test_storescu_localizer_and_dwi_raise_no_alert_the_motion_series_does(
    db_url: str, node_factory, tmp_path: Path
) -> None:
    """A scanner's exam: a localizer, a real GE DWI series, then a structural series. With
    the series threshold at 0 every scored series alerts, so only scope keeps the first two
    quiet."""
    from mriqa_node.phantom import write_series

    node = node_factory(db_url, verdict={"series_threshold": 0.0})
    localizer = write_series(_localizer(3, seed=9), tmp_path / "loc")
    dwi = sorted((INTAKE / "ge_pioneer_dwi").iterdir())
    motion = write_series(synth_series(8, size=128, motion=1.0, seed=10), tmp_path / "t2")
    for files in (localizer, dwi, motion):
        storescu(node.port, files)
    uids = {
        name: str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        for name, files in (("localizer", localizer), ("dwi", dwi), ("motion", motion))
    }

    def decided():
        from mriqa_node.db.engine import make_engine, make_sessionmaker

        engine = make_engine(db_url)
        try:
            with make_sessionmaker(engine)() as s:
                rows = s.execute(
                    select(Series.series_uid, SeriesVerdict.label, SeriesVerdict.reason).join(
                        SeriesVerdict
                    )
                ).all()
                alerts = s.scalars(select(Series.series_uid).join(Alert)).all()
            labels = {uid: (label, reason) for uid, label, reason in rows}
            return (labels, alerts) if set(uids.values()) <= set(labels) else None
        finally:
            engine.dispose()

    labels, alerts = wait_for(decided, timeout=120, what="three verdicts")
    assert labels[uids["localizer"]] == ("not_assessed", "not assessed: model: ImageType LOCALIZER")
    assert labels[uids["dwi"]] == ("not_assessed", "not assessed: model: sequence EP (echo planar)")
    assert labels[uids["motion"]][0] == "non_diagnostic"
    assert alerts == [uids["motion"]]

    from tests.test_node_e2e import mriqa_cli

    status = mriqa_cli(node.config, "status", "--json")
    rows = {r["series_uid"]: r for r in json.loads(status.stdout)["series"]}
    assert rows[uids["dwi"]]["label"] == "not_assessed"
    assert rows[uids["dwi"]]["reason"] == "not assessed: model: sequence EP (echo planar)"
    text = mriqa_cli(node.config, "status").stdout
    assert "not assessed: model: ImageType LOCALIZER" in text
    shown = mriqa_cli(node.config, "config", "show").stdout
    assert "[[scope.exclude]]" in shown and 'field = "description"' in shown
    explained = mriqa_cli(node.config, "score", "--explain-scope", str(INTAKE / "ge_pioneer_dwi"),
                          str(motion[0].parent))  # fmt: skip
    assert explained.returncode == 0, explained.stderr
    assert "not_assessed" in explained.stdout
    assert "scope: 12 instance(s): model: diffusion-weighted (b = 1000)" in explained.stdout
    assert "scope: 8 instance(s): model scope" in explained.stdout


# --- the OOD guard ------------------------------------------------------------------------------


def _slices(distances: list[float | None]) -> list:
    from mriqa_node.domain.verdict import SliceResult

    return [SliceResult(f"1.2.{i}", 0, [0.9, 0.1], float(i), i, d) for i, d in enumerate(distances)]


def test_the_guard_leaves_out_unlike_slices_and_a_mostly_unlike_series() -> None:
    from mriqa_node.domain.verdict import guard

    kept, verdict = guard(_slices([1.0, 2.0, 9.0, None]), threshold=5.0)
    assert verdict is None and [s.distance for s in kept] == [1.0, 2.0, None]
    kept, verdict = guard(_slices([9.0, 8.0, 1.0, 7.0]), threshold=5.0)
    assert kept == [] and verdict.label == "not_assessed" and verdict.score is None
    assert verdict.reason == "not assessed: unlike the training data (3 of 4 slices)"
    assert guard(_slices([9.0, 9.0]), threshold=None)[1] is None  # no guard in the artifact


def test_a_scorer_with_a_guard_gives_distances_and_checks_its_file(tmp_path: Path) -> None:
    import json

    import numpy as np

    from mriqa_node.ml.architectures import convnet
    from mriqa_node.ml.artifact import (
        ArtifactError,
        read_meta,
        save_artifact,
        save_ood,
        untrained_convnet_artifact,
    )
    from mriqa_node.ml.scorer import Scorer

    art = tmp_path / "m"
    meta = untrained_convnet_artifact(art, widths=(4, 4, 4, 4))
    meta = save_artifact(convnet(512, 2, (4, 4, 4, 4), head="gap"), art, meta)  # 4 features
    save_ood(art, meta, np.zeros(4), np.eye(4), threshold=0.5, figures={"val_pass": 0.99})
    scorer = Scorer(art)
    probs, dist = scorer.score(np.zeros((3, 512, 512, 1), np.float32))
    assert probs.shape == (3, 2) and dist.shape == (3,) and np.all(dist >= 0)
    assert scorer.ood_threshold == 0.5
    assert np.array_equal(scorer.predict(np.zeros((1, 512, 512, 1), np.float32)), probs[:1])
    np.savez(art / "ood.npz", mean=np.ones(4), precision=np.eye(4))  # changed behind its back
    with pytest.raises(ArtifactError, match="ood"):
        read_meta(art)
    data = json.loads((art / "model.json").read_text())
    data.pop("ood")
    (art / "model.json").write_text(json.dumps(data))
    assert Scorer(art).score(np.zeros((1, 512, 512, 1), np.float32))[1] is None


def test_scope_config_is_checked_and_reaches_the_rules() -> None:
    from mriqa_node.config import ConfigError, load_config
    from mriqa_node.node import site_scope_rules

    settings = load_config(None, scope={"include": [{"field": "protocol", "pattern": "^haste"}]})
    rules = site_scope_rules(settings)
    assert [str(r) for r in rules][-1] == "site include protocol ~ /^haste/"
    assert str(rules[0]).startswith("site exclude description ~ /localizer")  # the default
    for bad in ({"field": "description", "pattern": "(unclosed"},
                {"field": "colour", "pattern": "x"}):  # fmt: skip
        with pytest.raises(ConfigError):
            load_config(None, scope={"exclude": [bad]})
