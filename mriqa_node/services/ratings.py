"""Ratings by radiologists and QA leads, agreement statistics, and the training-label export.

A rating is a rater's class for a slice (instance + frame) or for a whole series: 0
non-diagnostic, 1 diagnostic, 2 excellent. One rating per rater and item; rating again replaces
it. :meth:`RatingService.agreement` compares raters with each other (3 classes) and with the
model (live from the stored slice scores and series verdicts, the paper's Fig. 6 and kappa);
:meth:`RatingService.export_manifest` writes the ratings as a training manifest for offline
retraining.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
from collections import defaultdict
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from mriqa_node.db.models import (
    AckAction,
    Alert,
    Instance,
    ModelVersion,
    Rating,
    Series,
    SeriesVerdict,
    SliceScore,
    Study,
    User,
)
from mriqa_node.db.sql import now_utc
from mriqa_node.domain.agreement import binarise, compare, pairwise
from mriqa_node.domain.manifest import manifest_header
from mriqa_node.domain.verdict import DIAGNOSTIC, EXCELLENT, NON_DIAGNOSTIC, NOT_ASSESSED
from mriqa_node.services.users import RATE_ROLES, Principal

CLASS_NAMES = [NON_DIAGNOSTIC, DIAGNOSTIC, EXCELLENT]  # rating value = index
BINARY_CLASS_NAMES = CLASS_NAMES[:2]
LEVELS = ("slice", "series")
FEEDBACK_COLUMNS = (
    "series_uid",
    "study_uid",
    "patient_id",
    "calling_aet",
    "protocol",
    "series_description",
    "kind",
    "rater",
    "label",
    "model_verdict",
    "at",
)
# Default key of the patient pseudonym; a site should pass its own secret (see export_manifest).
_PSEUDONYM_KEY = b"mriqa-node patient pseudonym v1"


class RatingError(ValueError):
    """A rating request that cannot be done; the message says why."""


class NotFound(LookupError):
    """An unknown series or instance."""


class Forbidden(PermissionError):
    """The user's role may not rate."""


def patient_pseudonym(patient_id: str | None, study_uid: str, key: bytes | None = None) -> str:
    """A stable pseudonym for a patient (keyed SHA-256, never the raw ID). Without a patient ID
    the study stands in for the patient."""
    source = f"patient:{patient_id}" if patient_id else f"study:{study_uid}"
    digest = hmac.new(key or _PSEUDONYM_KEY, source.encode(), hashlib.sha256).hexdigest()
    return "P" + digest[:16]


def _iso(value: Any) -> str:
    return value.isoformat(timespec="seconds")


class RatingService:
    def __init__(
        self, sessions: sessionmaker[Session], reads: sessionmaker[Session] | None = None
    ) -> None:
        self.sessions = sessions
        self.reads = reads or sessions  # read-only queries (SQLite: without the write lock)

    # -- rating -----------------------------------------------------------------------------

    def rate(
        self,
        user: Principal,
        series_uid: str,
        value: int,
        sop_instance_uid: str | None = None,
        frame: int = 0,
    ) -> dict[str, Any]:
        """Record ``user``'s class for a slice (``sop_instance_uid`` + ``frame``) or, without
        an instance, for the whole series; replaces the user's earlier rating of the item."""
        if not user.may(RATE_ROLES):
            raise Forbidden(f"role {user.role.value!r} may not rate")
        if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1, 2):
            raise RatingError(
                f"rating must be 0 (non-diagnostic), 1 (diagnostic) or 2 (excellent), got {value!r}"
            )
        if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
            raise RatingError(f"frame must be an integer >= 0, got {frame!r}")
        if sop_instance_uid is None and frame != 0:
            raise RatingError("a series rating has no frame (frame must be 0)")
        now = now_utc()
        with self.sessions.begin() as session:
            # Locking the series row serialises ratings of one series (PostgreSQL; SQLite
            # writers are serial anyway), so the lookup-then-insert below cannot race, also
            # for series ratings, whose NULL instance the unique constraint does not cover.
            series = session.scalar(
                select(Series).where(Series.series_uid == series_uid).with_for_update()
            )
            if series is None:
                raise NotFound(f"no series {series_uid!r}")
            instance = None
            if sop_instance_uid is not None:
                instance = session.scalar(
                    select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
                )
                if instance is None:
                    raise NotFound(f"no instance {sop_instance_uid!r}")
                if instance.series_id != series.id:
                    raise RatingError(
                        f"instance {sop_instance_uid!r} is not in series {series_uid!r}"
                    )
                if frame >= instance.frames:
                    raise RatingError(
                        f"frame {frame} is out of range: instance {sop_instance_uid!r} has "
                        f"{instance.frames} frame(s)"
                    )
            instance_id = instance.id if instance is not None else None
            existing = session.scalar(
                select(Rating).where(
                    Rating.user_id == user.id,
                    Rating.series_id == series.id,
                    Rating.instance_id.is_(None)
                    if instance_id is None
                    else Rating.instance_id == instance_id,
                    Rating.frame == frame,
                )
            )
            previous = existing.value if existing is not None else None
            if existing is None:
                session.add(
                    Rating(user_id=user.id, series_id=series.id, instance_id=instance_id,
                           frame=frame, value=value, created_at=now)
                )  # fmt: skip
            else:
                existing.value, existing.created_at = value, now
        return {
            "rater": user.name,
            "series_uid": series_uid,
            "sop_instance_uid": sop_instance_uid,
            "frame": frame,
            "value": value,
            "label": CLASS_NAMES[value],
            "previous": previous,
            "created_at": _iso(now),
        }

    def for_series(self, series_uid: str) -> list[dict[str, Any]]:
        """The series' ratings: series ratings first, then slices in instance order."""
        with self.reads() as session:
            series_id = session.scalar(select(Series.id).where(Series.series_uid == series_uid))
            if series_id is None:
                raise NotFound(f"no series {series_uid!r}")
            rows = session.execute(
                select(
                    User.name,
                    Instance.sop_instance_uid,
                    Instance.instance_number,
                    Rating.frame,
                    Rating.value,
                    Rating.created_at,
                )
                .join(User, Rating.user_id == User.id)
                .outerjoin(Instance, Rating.instance_id == Instance.id)
                .where(Rating.series_id == series_id)
            ).all()
        rows = sorted(
            rows,
            key=lambda r: (
                r.sop_instance_uid is not None,
                r.instance_number if r.instance_number is not None else -1,
                r.sop_instance_uid or "",
                r.frame,
                r.name,
            ),
        )
        return [
            {"rater": r.name, "sop_instance_uid": r.sop_instance_uid,
             "instance_number": r.instance_number, "frame": r.frame, "value": r.value,
             "label": CLASS_NAMES[r.value], "created_at": _iso(r.created_at)}
            for r in rows
        ]  # fmt: skip

    # -- agreement --------------------------------------------------------------------------

    def agreement(self, level: str = "slice") -> dict[str, Any]:
        """Raters against each other (3 classes) and each rater against the model.

        ``level`` "slice": items are (instance, frame); the model's label of a slice comes from
        its newest score: argmax for a 3-class model, for a binary model non-diagnostic when
        P(non-diagnostic) >= the slice threshold of the series' latest verdict (argmax when the
        series has no verdict). "series": items are series; the model's label is the series'
        latest verdict (unscorable ones are left out). Where a binary model labelled any of
        the items, the comparison with the model is binary: the raters' 1 and 2 become 1.
        """
        if level not in LEVELS:
            raise RatingError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        slice_level = level == "slice"
        with self.reads() as session:
            labels = self._rater_labels(session, slice_level)
            scored = (self._slice_model_labels if slice_level else self._series_model_labels)(
                session
            )
        raters = sorted(labels)
        labels = {r: labels[r] for r in raters}
        rated = {k for v in labels.values() for k in v}
        scored = {k: v for k, v in scored.items() if k in rated}
        binary = any(from_binary for _, from_binary in scored.values())
        model = {k: binarise(label) if binary else label for k, (label, _) in scored.items()}
        model_rows = []
        for rater in raters:
            mine = labels[rater]
            if binary:
                mine = {k: binarise(v) for k, v in mine.items()}
            model_rows.append(
                {"rater": rater, **compare(mine, model, 2 if binary else 3),
                 "classes": BINARY_CLASS_NAMES if binary else CLASS_NAMES}
            )  # fmt: skip
        return {
            "level": level,
            "class_names": CLASS_NAMES,
            "raters": raters,
            "counts": {r: len(labels[r]) for r in raters},
            "items": len(rated),
            "pairs": pairwise(labels, 3),
            "model": model_rows,
            "scanners": self.feedback_by_scanner(),
        }

    def feedback(self, pseudonym_key: bytes | None = None) -> list[dict[str, Any]]:
        """Every label the site gave a series, one row each: ``kind`` "rating" (a rater's
        series class) or "ack:<action>" (the technologist's answer to an alert: rescanned
        means the alert was right, accepted or disagree that it was not), ``rater``, ``label``
        (0 non-diagnostic, 1 diagnostic, 2 excellent; an acknowledgement gives 0 or 1), and
        the model's verdict of the series at the time (the newest)."""
        newest = select(func.max(SeriesVerdict.id)).group_by(SeriesVerdict.series_id)
        with self.reads() as session:
            verdicts = dict(session.execute(
                select(SeriesVerdict.series_id, SeriesVerdict.label)
                .where(SeriesVerdict.id.in_(newest))).all())  # fmt: skip
            ratings = session.execute(
                select(Rating.series_id, User.name, Rating.value, Rating.created_at)
                .join(User, Rating.user_id == User.id).where(Rating.instance_id.is_(None))
            ).all()  # fmt: skip
            acks = session.execute(
                select(Alert.series_id, Alert.acknowledged_by, Alert.action,
                       Alert.acknowledged_at).where(Alert.action.is_not(None))
            ).all()  # fmt: skip
            ids = {r[0] for r in ratings} | {a[0] for a in acks}
            series = {s.id: s for s in session.scalars(
                select(Series).where(Series.id.in_(ids)))}  # fmt: skip
            studies = {
                st.id: st
                for st in session.scalars(
                    select(Study).where(Study.id.in_({s.study_id for s in series.values()}))
                )
            }
        rows = [(sid, "rating", name, value, at) for sid, name, value, at in ratings]
        rows += [(sid, f"ack:{action}", by, 0 if action == AckAction.rescanned.value else 1, at)
                 for sid, by, action, at in acks]  # fmt: skip
        out = []
        for sid, kind, rater, value, at in sorted(rows, key=lambda r: (r[0], str(r[4]))):
            s, study = series[sid], studies[series[sid].study_id]
            out.append({
                "series_uid": s.series_uid, "study_uid": study.study_uid,
                "patient_id": patient_pseudonym(study.patient_id, study.study_uid, pseudonym_key),
                "calling_aet": s.calling_aet or "", "protocol": s.protocol_name or "",
                "series_description": s.series_description or "", "kind": kind,
                "rater": rater or "", "label": value, "model_verdict": verdicts.get(sid, ""),
                "at": _iso(at) if at else "",
            })  # fmt: skip
        return out

    def feedback_by_scanner(self) -> list[dict[str, Any]]:
        """Per scanner (calling AE) and protocol: series decided, alerts, what the technologists
        answered, and the share of answered alerts that were right (rescanned)."""
        newest = select(func.max(SeriesVerdict.id)).group_by(SeriesVerdict.series_id)
        with self.reads() as session:
            decided = session.execute(
                select(Series.calling_aet, Series.protocol_name, SeriesVerdict.label,
                       func.count(SeriesVerdict.id))
                .join(Series, Series.id == SeriesVerdict.series_id)
                .where(SeriesVerdict.id.in_(newest))
                .group_by(Series.calling_aet, Series.protocol_name, SeriesVerdict.label)
            ).all()  # fmt: skip
            answered = session.execute(
                select(Series.calling_aet, Series.protocol_name, Alert.action, func.count(Alert.id))
                .join(Series, Series.id == Alert.series_id)
                .group_by(Series.calling_aet, Series.protocol_name, Alert.action)
            ).all()  # fmt: skip
        groups: dict[tuple, dict[str, Any]] = {}

        def group(aet: str | None, protocol: str | None) -> dict[str, Any]:
            return groups.setdefault((aet or "", protocol or ""), {
                "calling_aet": aet or "", "protocol": protocol or "", "series": 0, "alerts": 0,
                "not_assessed": 0, "answered": 0, **{a.value: 0 for a in AckAction}})  # fmt: skip

        for aet, protocol, label, n in decided:
            g = group(aet, protocol)
            g["series"] += n
            g["alerts"] += n if label == NON_DIAGNOSTIC else 0
            g["not_assessed"] += n if label == NOT_ASSESSED else 0
        for aet, protocol, action, n in answered:
            if action is not None:
                g = group(aet, protocol)
                g[action] += n
                g["answered"] += n
        for g in groups.values():
            g["alert_precision"] = g["rescanned"] / g["answered"] if g["answered"] else None
        return sorted(groups.values(), key=lambda g: (g["calling_aet"], g["protocol"]))

    def _rater_labels(self, session: Session, slice_level: bool) -> dict[str, dict[Hashable, int]]:
        item = Rating.instance_id.is_not(None) if slice_level else Rating.instance_id.is_(None)
        rows = session.execute(
            select(User.name, Rating.series_id, Rating.instance_id, Rating.frame, Rating.value)
            .join(User, Rating.user_id == User.id)
            .where(item)
        ).all()
        labels: dict[str, dict[Hashable, int]] = defaultdict(dict)
        for name, series_id, instance_id, frame, value in rows:
            key = (instance_id, frame) if slice_level else series_id
            labels[name][key] = value
        return labels

    def _slice_model_labels(self, session: Session) -> dict[Hashable, tuple[int, bool]]:
        """{(instance_id, frame): (class, by a binary model?)} for the scored slices of every
        instance with a slice rating, from each slice's newest score."""
        rated = select(Rating.instance_id).where(Rating.instance_id.is_not(None))
        newest = (
            select(func.max(SliceScore.id))
            .where(SliceScore.instance_id.in_(rated))
            .group_by(SliceScore.instance_id, SliceScore.frame)
        )
        rows = session.execute(
            select(
                SliceScore.instance_id,
                SliceScore.frame,
                SliceScore.probabilities,
                SliceScore.p_nondiagnostic,
                SliceScore.model_version_id,
                Instance.series_id,
            )
            .join(Instance, SliceScore.instance_id == Instance.id)
            .where(SliceScore.id.in_(newest))
        ).all()
        if not rows:
            return {}
        names = self._class_names(session, {r.model_version_id for r in rows})
        thresholds = self._slice_thresholds(session, rated)
        out: dict[Hashable, tuple[int, bool]] = {}
        for r in rows:
            classes = names[r.model_version_id]
            binary = EXCELLENT not in classes
            threshold = thresholds.get(r.series_id)
            if binary and threshold is not None:
                label: int | None = 0 if r.p_nondiagnostic >= threshold else 1
            else:
                label = _argmax_label(r.probabilities, classes)
            if label is not None:
                out[(r.instance_id, r.frame)] = (label, binary)
        return out

    def _series_model_labels(self, session: Session) -> dict[Hashable, tuple[int, bool]]:
        """{series_id: (class, by a binary model?)} from the latest verdict of every series
        with a series rating (unscorable verdicts left out)."""
        rated = select(Rating.series_id).where(Rating.instance_id.is_(None))
        latest = (
            select(func.max(SeriesVerdict.id))
            .where(SeriesVerdict.series_id.in_(rated))
            .group_by(SeriesVerdict.series_id)
        )
        rows = session.execute(
            select(SeriesVerdict.series_id, SeriesVerdict.label, SeriesVerdict.model_version_id)
            .where(SeriesVerdict.id.in_(latest))
        ).all()  # fmt: skip
        rows = [r for r in rows if r.label in CLASS_NAMES and r.model_version_id is not None]
        names = self._class_names(session, {r.model_version_id for r in rows})
        return {
            r.series_id: (CLASS_NAMES.index(r.label), EXCELLENT not in names[r.model_version_id])
            for r in rows
        }

    @staticmethod
    def _class_names(session: Session, model_ids: set[int]) -> dict[int, list[str]]:
        models = session.scalars(select(ModelVersion).where(ModelVersion.id.in_(model_ids))).all()
        out = {}
        for m in models:
            names = (m.meta or {}).get("class_names")
            if not names:
                names = BINARY_CLASS_NAMES if m.task == "binary" else CLASS_NAMES
            out[m.id] = list(names)
        return out

    @staticmethod
    def _slice_thresholds(session: Session, instance_ids: Select) -> dict[int, float]:
        """The slice threshold of the latest verdict of each series of these instances (where
        the series has a verdict)."""
        series_ids = select(Instance.series_id).where(Instance.id.in_(instance_ids))
        latest = (
            select(func.max(SeriesVerdict.id))
            .where(SeriesVerdict.series_id.in_(series_ids))
            .group_by(SeriesVerdict.series_id)
        )
        rows = session.execute(
            select(SeriesVerdict.series_id, SeriesVerdict.policy).where(
                SeriesVerdict.id.in_(latest)
            )
        ).all()
        return {
            sid: float(policy["slice_threshold"])
            for sid, policy in rows
            if policy and policy.get("slice_threshold") is not None
        }

    # -- export -----------------------------------------------------------------------------

    def export_feedback(self, out: Path, pseudonym_key: bytes | None = None) -> int:
        """Write :meth:`feedback` as CSV (the series-level labels: for choosing and checking a
        retrained model's series operating point, `mriqa model compare`); returns the rows."""
        rows = self.feedback(pseudonym_key)
        _write_csv(Path(out), FEEDBACK_COLUMNS, [{k: str(v) for k, v in r.items()} for r in rows])
        return len(rows)

    def export_manifest(
        self, out: Path, spool_dir: Path, pseudonym_key: bytes | None = None
    ) -> int:
        """Write the slice ratings as a training manifest (training/manifest.py's columns):
        one row per rated single-frame instance, ``path`` absolute in the spool, ``patient_id``
        a keyed-hash pseudonym (pass a site secret as ``pseudonym_key``; the default key is
        public, so short patient IDs could be guessed back), one ``rater1..raterN`` column per
        rater in the order the raters' accounts were created, ``severity`` and ``true_class``
        empty. Returns the number of rows written."""
        spool_dir = Path(spool_dir).resolve()
        with self.reads() as session:
            rows = session.execute(
                select(
                    Rating.user_id,
                    Rating.value,
                    Instance.id.label("instance_id"),
                    Instance.spool_path,
                    Instance.sop_instance_uid,
                    Instance.instance_number,
                    Series.id.label("series_id"),
                    Series.series_uid,
                    Study.study_uid,
                    Study.patient_id,
                )
                .join(Instance, Rating.instance_id == Instance.id)
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Rating.frame == 0, Instance.frames == 1)
            ).all()
        raters = sorted({r.user_id for r in rows})
        column = {uid: f"rater{i + 1}" for i, uid in enumerate(raters)}
        rater_cols = list(column.values()) or ["rater1"]  # the reader needs one
        files: dict[int, dict[str, Any]] = {}
        for r in rows:
            number = r.instance_number if r.instance_number is not None else -1
            entry = files.setdefault(
                r.instance_id,
                {
                    "order": (r.series_id, number, r.instance_id),
                    "cells": {
                        "path": str(spool_dir / r.spool_path),
                        "patient_id": patient_pseudonym(r.patient_id, r.study_uid, pseudonym_key),
                        "study_uid": r.study_uid,
                        "series_uid": r.series_uid,
                        "sop_instance_uid": r.sop_instance_uid,
                        "instance": "" if r.instance_number is None else str(r.instance_number),
                        "severity": "",
                        "true_class": "",
                    },
                },
            )  # fmt: skip
            entry["cells"][column[r.user_id]] = str(r.value)
        _write_csv(
            Path(out),
            manifest_header(rater_cols),
            [e["cells"] for e in sorted(files.values(), key=lambda e: e["order"])],
        )
        return len(files)


def _argmax_label(probabilities: Sequence[float], classes: Sequence[str]) -> int | None:
    """The model's most probable class as a rating value (None if the class has none)."""
    if not probabilities:
        return None
    best = max(range(len(probabilities)), key=lambda i: probabilities[i])
    name = classes[best] if best < len(classes) else None
    return CLASS_NAMES.index(name) if name in CLASS_NAMES else None


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(header), restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
