"""Pure domain rules: the series verdict policy and the series completion rule (no I/O)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from mriqa_node.domain.completion import CompletionRule
from mriqa_node.domain.throttle import MAX_KEYS, Decision, LoginThrottle, ThrottlePolicy
from mriqa_node.domain.verdict import (
    DIAGNOSTIC,
    EXCELLENT,
    NON_DIAGNOSTIC,
    UNSCORABLE,
    SeriesPolicy,
    SliceResult,
    decide,
    order_slices,
)

BINARY = [NON_DIAGNOSTIC, DIAGNOSTIC]
THREE = [NON_DIAGNOSTIC, DIAGNOSTIC, EXCELLENT]
T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def binary_slices(
    ps: list[float], positions: list[float | None] | None = None
) -> list[SliceResult]:
    positions = positions if positions is not None else [float(i) for i in range(len(ps))]
    return [
        SliceResult(f"1.2.3.{i + 1}", 0, [p, 1.0 - p], positions[i], i + 1)
        for i, p in enumerate(ps)
    ]


# -- SeriesPolicy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slice_threshold": 1.01},
        {"slice_threshold": -0.1},
        {"series_threshold": 1.5},
        {"series_threshold": -0.01},
        {"top_fraction": 0.0},
        {"top_fraction": 1.2},
        {"worst_count": 0},
    ],
)
def test_policy_rejects_out_of_range_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SeriesPolicy(**kwargs)


def test_policy_accepts_boundaries() -> None:
    p = SeriesPolicy(slice_threshold=0, series_threshold=1, top_fraction=1, worst_count=1)
    assert (p.slice_threshold, p.series_threshold, p.top_fraction, p.worst_count) == (0, 1, 1, 1)


def test_policy_overrides_none_keeps_the_models_value() -> None:
    model = SeriesPolicy.from_dict(
        {"slice_threshold": 0.3, "series_threshold": 0.7, "top_fraction": 0.1, "worst_count": 5}
    )
    same = model.overridden(
        slice_threshold=None, series_threshold=None, top_fraction=None, worst_count=None
    )
    assert same == model
    changed = model.overridden(series_threshold=0.2, worst_count=None, top_fraction=None)
    assert changed.series_threshold == 0.2
    assert (changed.slice_threshold, changed.top_fraction, changed.worst_count) == (0.3, 0.1, 5)
    # Overrides are validated like the model's own values.
    with pytest.raises(ValueError):
        model.overridden(top_fraction=0.0)


def test_policy_from_dict_ignores_unknown_keys_and_defaults_missing_ones() -> None:
    p = SeriesPolicy.from_dict({"series_threshold": 0.8, "future_knob": 3})
    assert p.series_threshold == 0.8 and p.slice_threshold == SeriesPolicy().slice_threshold
    assert SeriesPolicy.from_dict(None) == SeriesPolicy()
    assert SeriesPolicy.from_dict(p.as_dict()) == p


# -- decide --------------------------------------------------------------------------------------


def test_empty_series_is_unscorable() -> None:
    v = decide([], SeriesPolicy(), BINARY)
    assert v.label == UNSCORABLE and v.score is None
    assert v.worst_slices == [] and v.n_slices == 0 and v.n_flagged == 0
    assert not v.non_diagnostic


def test_a_few_bad_slices_condemn_the_series_when_top_fraction_covers_them() -> None:
    ps = [0.02] * 36 + [0.97] * 4  # 4 of 40 slices badly corrupted
    random.Random(1).shuffle(ps)
    slices = binary_slices(ps)
    # top 10 %: exactly the four bad slices are averaged
    v = decide(slices, SeriesPolicy(top_fraction=0.1, series_threshold=0.5), BINARY)
    assert v.label == NON_DIAGNOSTIC and v.non_diagnostic
    assert v.score == pytest.approx(0.97)
    assert v.n_flagged == 4 and v.n_slices == 40
    # the same slices averaged over the worst 50 %: diluted below the threshold
    v = decide(slices, SeriesPolicy(top_fraction=0.5, series_threshold=0.5), BINARY)
    assert v.label == DIAGNOSTIC
    assert v.score == pytest.approx((4 * 0.97 + 16 * 0.02) / 20, abs=1e-4)
    assert v.n_flagged == 4  # flagging does not depend on top_fraction


def test_one_bad_slice_in_forty_does_not_condemn_the_series() -> None:
    ps = [0.05] * 39 + [0.99]
    v = decide(binary_slices(ps), SeriesPolicy(), BINARY)  # default top 20 %: k = 8
    assert v.label == DIAGNOSTIC
    assert v.score == pytest.approx((0.99 + 7 * 0.05) / 8, abs=1e-4)
    assert v.n_flagged == 1
    assert v.worst_slices[0]["p_nondiagnostic"] == pytest.approx(0.99)
    assert v.worst_slices[0]["flagged"] is True
    assert all(w["flagged"] is False for w in v.worst_slices[1:])


def test_top_fraction_uses_at_least_one_slice() -> None:
    v = decide(binary_slices([0.9, 0.1, 0.1]), SeriesPolicy(top_fraction=0.01), BINARY)
    assert v.score == pytest.approx(0.9) and v.label == NON_DIAGNOSTIC


def test_thresholds_are_inclusive() -> None:
    policy = SeriesPolicy(slice_threshold=0.5, series_threshold=0.5, top_fraction=1.0)
    v = decide(binary_slices([0.5, 0.5]), policy, BINARY)
    assert v.label == NON_DIAGNOSTIC and v.n_flagged == 2


def test_worst_slices_by_p_with_anatomical_index_from_positions() -> None:
    # Arrival order differs from anatomy; positions run from foot (-) to head (+).
    positions = [30.0, -10.0, 10.0, 0.0, 20.0, -20.0]
    ps = [0.1, 0.8, 0.3, 0.9, 0.2, 0.05]
    slices = binary_slices(ps, positions)
    random.Random(3).shuffle(slices)
    v = decide(slices, SeriesPolicy(worst_count=3), BINARY)
    anatomical = sorted(positions)  # slice_index i is the i-th position in this order
    assert [w["p_nondiagnostic"] for w in v.worst_slices] == [0.9, 0.8, 0.3]
    for w in v.worst_slices:
        assert anatomical[w["slice_index"]] == w["position"]
    assert [w["slice_index"] for w in v.worst_slices] == [2, 1, 3]
    assert [w["instance_number"] for w in v.worst_slices] == [4, 2, 3]


def test_anatomical_order_falls_back_to_instance_number_then_frame() -> None:
    s = [
        SliceResult("1.9", 1, [0.7, 0.3], None, 2),
        SliceResult("1.9", 0, [0.6, 0.4], None, 2),
        SliceResult("1.8", 0, [0.1, 0.9], None, 1),
        SliceResult("1.7", 0, [0.95, 0.05], None, 3),
    ]
    assert [(x.sop_instance_uid, x.frame) for x in order_slices(s)] == [
        ("1.8", 0), ("1.9", 0), ("1.9", 1), ("1.7", 0),
    ]  # fmt: skip
    v = decide(s, SeriesPolicy(worst_count=2), BINARY)
    assert [(w["sop_instance_uid"], w["slice_index"]) for w in v.worst_slices] == [
        ("1.7", 3),
        ("1.9", 2),
    ]


def test_slices_with_a_position_come_before_those_without() -> None:
    s = [
        SliceResult("1.1", 0, [0.2, 0.8], None, 1),
        SliceResult("1.2", 0, [0.2, 0.8], 5.0, 2),
        SliceResult("1.3", 0, [0.2, 0.8], -5.0, 3),
    ]
    assert [x.sop_instance_uid for x in order_slices(s)] == ["1.3", "1.2", "1.1"]


def test_worst_count_limits_the_list() -> None:
    v = decide(binary_slices([0.1] * 10), SeriesPolicy(worst_count=4), BINARY)
    assert len(v.worst_slices) == 4
    # fewer slices than worst_count: all of them, worst first
    v = decide(binary_slices([0.1, 0.2]), SeriesPolicy(worst_count=4), BINARY)
    assert [w["p_nondiagnostic"] for w in v.worst_slices] == [0.2, 0.1]


def _three(probs: list[list[float]]) -> list[SliceResult]:
    return [SliceResult(f"1.5.{i}", 0, p, float(i), i + 1) for i, p in enumerate(probs)]


def test_three_class_excellent_versus_diagnostic() -> None:
    excellent = _three([[0.05, 0.25, 0.70], [0.05, 0.35, 0.60], [0.1, 0.3, 0.6]])
    assert decide(excellent, SeriesPolicy(), THREE).label == EXCELLENT
    diagnostic = _three([[0.05, 0.70, 0.25], [0.05, 0.55, 0.40], [0.1, 0.6, 0.3]])
    assert decide(diagnostic, SeriesPolicy(), THREE).label == DIAGNOSTIC
    # Class order comes from the model: excellent may be listed before diagnostic.
    swapped = [NON_DIAGNOSTIC, EXCELLENT, DIAGNOSTIC]
    assert decide(diagnostic, SeriesPolicy(), swapped).label == EXCELLENT
    # Non-diagnostic wins over the excellent/diagnostic comparison.
    bad = _three([[0.9, 0.0, 0.1], [0.8, 0.05, 0.15], [0.85, 0.05, 0.1]])
    assert decide(bad, SeriesPolicy(), THREE).label == NON_DIAGNOSTIC


def test_class_zero_must_be_non_diagnostic() -> None:
    with pytest.raises(ValueError, match="class 0"):
        decide(binary_slices([0.1]), SeriesPolicy(), [DIAGNOSTIC, NON_DIAGNOSTIC])


# -- CompletionRule ----------------------------------------------------------------------------


RULE = CompletionRule(idle_seconds=5.0, release_grace_seconds=1.0)


def test_count_reached() -> None:
    assert RULE.count_reached(3, 3) and RULE.count_reached(3, 4)
    assert not RULE.count_reached(3, 2)
    assert RULE.is_complete(3, 3, T0, None, T0)  # at once, no waiting


@pytest.mark.parametrize("expected", [0, None])
def test_zero_or_none_expected_means_no_count(expected: int | None) -> None:
    assert not RULE.count_reached(expected, 0)
    assert not RULE.count_reached(expected, 100)
    assert not RULE.is_complete(expected, 100, T0, None, T0 + timedelta(seconds=4.9))
    assert RULE.is_complete(expected, 100, T0, None, T0 + timedelta(seconds=5))


def test_idle_deadline() -> None:
    assert RULE.deadline(T0, None) == T0 + timedelta(seconds=5)
    assert not RULE.is_complete(None, 3, T0, None, T0 + timedelta(seconds=4.999))
    assert RULE.is_complete(None, 3, T0, None, T0 + timedelta(seconds=5))


def test_release_grace_only_when_released_after_the_last_instance() -> None:
    after = T0 + timedelta(seconds=0.2)
    assert RULE.deadline(T0, after) == T0 + timedelta(seconds=1)
    assert RULE.deadline(T0, T0) == T0 + timedelta(seconds=1)  # released at the same instant
    assert RULE.is_complete(None, 3, T0, after, T0 + timedelta(seconds=1.0))
    # A release that happened before the last instance arrived (an earlier association) is
    # stale: the series is still being sent, so the full idle time applies.
    before = T0 - timedelta(seconds=0.5)
    assert RULE.deadline(T0, before) == T0 + timedelta(seconds=5)
    assert not RULE.is_complete(None, 3, T0, before, T0 + timedelta(seconds=2))


def test_release_grace_never_extends_the_idle_time() -> None:
    rule = CompletionRule(idle_seconds=2.0, release_grace_seconds=10.0)
    assert rule.deadline(T0, T0 + timedelta(seconds=1)) == T0 + timedelta(seconds=2)


def test_backoff_doubles_is_capped_and_never_overflows() -> None:
    from mriqa_node.config import DestinationConfig
    from mriqa_node.domain.retry import backoff
    from mriqa_node.services import forwarding

    assert [backoff(n, 1.0, 60.0) for n in (0, 1, 2, 3, 7, 8)] == [1, 1, 2, 4, 60, 60]
    # A week-long PACS outage at one retry a minute: about 10,000 failures (the old forwarder
    # raised OverflowError after 1,025).
    assert backoff(10_080, 1.0, 60.0) == 60.0 and backoff(10**9, 0.5, 30.0) == 30.0
    dest = DestinationConfig(name="p", ae_title="P", host="h", port=104, backoff_seconds=2,
                             backoff_max_seconds=300)  # fmt: skip
    assert forwarding.backoff(dest, 2000) == 300.0


def test_qa_object_uids_are_derived_valid_and_distinct() -> None:
    from pydicom.uid import UID

    from mriqa_node.domain.qa import ObjectUids

    kos = ObjectUids.derived("1.2.840.1", "kos")
    assert kos == ObjectUids.derived("1.2.840.1", "kos")  # made again: the same object
    others = {ObjectUids.derived("1.2.840.1", "sr-1"), ObjectUids.derived("1.2.840.2", "kos")}
    assert kos not in others and kos.series != kos.instance
    for uid in (kos.series, kos.instance):
        assert uid.startswith("2.25.") and UID(uid).is_valid


def test_services_and_domain_never_import_the_dicom_layer() -> None:
    """The layering rule (DESIGN.md): services and the domain are adapters' clients, not the
    other way round; the DICOM encoders are given to them."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "mriqa_node"
    offenders = []
    for layer in ("services", "domain"):
        for path in (root / layer).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{layer}/{path.name}: {n}" for n in names
                              if n.startswith(("mriqa_node.dicom", "pynetdicom"))]  # fmt: skip
    assert offenders == []


def test_pull_plan_keeps_mr_and_moves_a_mixed_study_series_by_series() -> None:
    from mriqa_node.domain.retrieve import MoveResult, NothingToPull, plan_pull

    def row(uid: str, modality: str, n: int) -> dict:
        return {"SeriesInstanceUID": uid, "Modality": modality,
                "NumberOfSeriesRelatedInstances": n}  # fmt: skip

    mr_only = plan_pull([row("1", "MR", 3), row("2", "MR", 4)], "S")
    assert mr_only.moves == [None] and mr_only.expected_instances == 7  # the study in one move
    mixed = plan_pull([row("1", "MR", 3), row("2", "SR", 1), row("3", "MR", None)], "S")
    assert mixed.moves == ["1", "3"] and [s["Modality"] for s in mixed.skipped] == ["SR"]
    assert plan_pull([row("2", "SR", 1), row("3", "MR", 2)], "S", "2").moves == ["2"]
    with pytest.raises(NothingToPull, match="not found on PACS1"):
        plan_pull([row("1", "MR", 3)], "S", "9", where="PACS1")
    with pytest.raises(NothingToPull, match="no MR series"):
        plan_pull([row("2", "SR", 1)], "S")

    merged = MoveResult.merged([MoveResult(0, 3), MoveResult(0xB000, 1, 2, 0, ["x", "y"])])
    assert (merged.status, merged.completed, merged.failed) == (0xB000, 4, 2)
    assert merged.failed_sop_instance_uids == ["x", "y"] and not merged.ok
    assert MoveResult.merged([MoveResult(0, 2), MoveResult(0, 5)]).ok


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_throttle_slows_then_locks_a_user_name_and_forgets_after_the_lockout() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(ThrottlePolicy(slow_after=2, lock_after=5, lockout_seconds=600,
                                            window_seconds=600), clock)  # fmt: skip
    delays = []
    for _ in range(5):
        decision = throttle.check("Alice", "10.0.0.1")
        assert not decision.refused
        delays.append(decision.delay)
        locked = throttle.failed("Alice", "10.0.0.1")
    assert delays == [0, 0, 1, 2, 4] and locked == ["user name"]
    refused = throttle.check(" alice ", "10.0.0.2")  # the name, from any address
    assert refused.refused and refused.refused_for == 600 and "user name" in refused.reason
    assert not throttle.check("bob", "10.0.0.1").refused  # other names are not locked
    clock.now += 601
    assert throttle.check("alice", "10.0.0.1") == Decision()  # counted afresh


def test_login_throttle_locks_an_address_trying_many_names_and_success_keeps_its_count() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(ThrottlePolicy(slow_after=100, lock_after=3,
                                            lock_after_per_address=4), clock)  # fmt: skip
    for name in ("a", "b", "c"):
        throttle.failed(name, "10.0.0.9")
    throttle.succeeded("a")  # the attacker's own account: clears "a", not the address
    assert throttle.failed("d", "10.0.0.9") == ["address"]
    assert throttle.check("e", "10.0.0.9").refused
    assert not throttle.check("e", "10.0.0.8").refused


def test_login_throttle_forgets_old_failures_and_bounds_its_memory() -> None:
    clock = FakeClock()
    throttle = LoginThrottle(ThrottlePolicy(slow_after=1, window_seconds=60), clock)
    throttle.failed("a", "x")
    assert throttle.check("a", "x").delay == 1
    clock.now += 61
    assert throttle.check("a", "y").delay == 0
    for i in range(MAX_KEYS + 10):  # random names cannot grow it without bound
        throttle.failed(f"user{i}", "x")
    assert len(throttle._failures) <= MAX_KEYS + 1
