"""Model scope: which images the model is made for, decided from the header before any GPU time.

A scanner sends everything an exam makes: localizers, DWI with its maps, phase and perfusion
images, reformats, and the structural series the model is for. Only the last may raise a rescan
alert; the rest are "not assessed", with the rule that said so. Three layers, in this order:

1. hard limits: an image the node cannot score at all (not MR image storage, colour);
2. the site's rules (``[scope]`` in the TOML config): ``exclude`` rules narrow the scope,
   ``include`` rules widen it past the model's own (a site that validated its HASTE series);
3. the model's scope (``model.json`` ``scope``, written by the training package from what the
   model was trained and validated on): modality, ImageType, diffusion, sequence families,
   in-plane size, and, where the training data says so, body parts and orientations.

Series-level rules (too few slices) apply when the series is decided. Pure domain code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
IMAGE_SOP_CLASSES = {MR_IMAGE_STORAGE: "MR Image", ENHANCED_MR_IMAGE_STORAGE: "Enhanced MR Image"}

# ImageType values of images that are not a magnitude structural acquisition.
EXCLUDED_IMAGE_TYPES = (
    "LOCALIZER", "DERIVED", "SECONDARY", "P", "PHASE", "R", "REAL", "I", "IMAGINARY", "MIXED",
    "ADC", "TRACE", "FA", "DIFFUSION", "PERFUSION", "ASL", "MOSAIC", "MAP", "MIP", "MPR",
    "PROJECTION IMAGE", "SUBTRACTION",
)  # fmt: skip

Field = Literal["description", "protocol", "calling_aet", "body_part", "sequence", "orientation"]
FIELDS: tuple[str, ...] = Field.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ImageFacts:
    """What scope rules read from one instance's header."""

    sop_class_uid: str
    modality: str | None = None
    image_type: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()  # SE, GR, IR, EP, RM (Enhanced: from EchoPulse)
    sequence_variant: tuple[str, ...] = ()
    b_value: float | None = None  # the largest diffusion b-value the header states
    rows: int | None = None
    columns: int | None = None
    samples_per_pixel: int = 1
    body_part: str | None = None
    orientation: str | None = None  # AX, SAG, COR or OBL from ImageOrientationPatient
    series_description: str | None = None
    protocol_name: str | None = None

    def value(self, name: str, calling_aet: str | None = None) -> str:
        """The text a site rule on ``name`` matches against ("" when absent)."""
        values = {
            "description": self.series_description,
            "protocol": self.protocol_name,
            "calling_aet": calling_aet,
            "body_part": self.body_part,
            "sequence": "\\".join(self.scanning_sequence + self.sequence_variant),
            "orientation": self.orientation,
        }
        return values[name] or ""


@dataclass(frozen=True)
class ModelScope:
    """What the model was trained and validated on (``model.json`` ``scope``)."""

    modalities: tuple[str, ...] = ("MR",)
    excluded_image_types: tuple[str, ...] = EXCLUDED_IMAGE_TYPES
    excluded_sequences: tuple[str, ...] = ("EP",)  # echo planar: DWI, fMRI, perfusion
    sequences: tuple[str, ...] | None = None  # ScanningSequence families seen (None: any)
    diffusion: bool = False  # b > 0 allowed
    min_slices: int = 1  # the training package writes what the model was validated on
    min_size: int = 32  # in-plane rows and columns
    max_size: int = 2048
    body_parts: tuple[str, ...] | None = None  # None: not restricted
    orientations: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ModelScope:
        known = {}
        for k, v in (data or {}).items():
            if k in cls.__dataclass_fields__:
                known[k] = tuple(v) if isinstance(v, list) else v
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class SiteRule:
    """``include`` or ``exclude`` images whose ``field`` matches ``pattern`` (a regular
    expression, searched case-insensitively)."""

    action: Literal["include", "exclude"]
    field: str
    pattern: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.action not in ("include", "exclude"):
            raise ValueError(f"scope rule action must be include or exclude, not {self.action!r}")
        if self.field not in FIELDS:
            raise ValueError(f"scope rule field {self.field!r} is not one of {', '.join(FIELDS)}")
        object.__setattr__(self, "_regex", re.compile(self.pattern, re.IGNORECASE))

    def matches(self, facts: ImageFacts, calling_aet: str | None) -> bool:
        return self._regex.search(facts.value(self.field, calling_aet)) is not None

    def __str__(self) -> str:
        return f"site {self.action} {self.field} ~ /{self.pattern}/"


@dataclass(frozen=True)
class ScopeDecision:
    in_scope: bool
    rule: str  # the rule that decided, for people ("model: ImageType LOCALIZER")

    @property
    def reason(self) -> str | None:
        return None if self.in_scope else f"not assessed: {self.rule}"


@dataclass(frozen=True)
class Scope:
    """The model's scope with the site's rules on top."""

    model: ModelScope = ModelScope()
    rules: tuple[SiteRule, ...] = ()

    @classmethod
    def of(cls, model_scope: Mapping[str, Any] | None, rules: Iterable[SiteRule] = ()) -> Scope:
        return cls(ModelScope.from_dict(model_scope), tuple(rules))

    def decide(self, facts: ImageFacts, calling_aet: str | None = None) -> ScopeDecision:
        hard = _hard_limit(facts)
        if hard:
            return ScopeDecision(False, hard)
        for wanted in ("exclude", "include"):  # exclude wins over include
            for rule in self.rules:
                if rule.action == wanted and rule.matches(facts, calling_aet):
                    return ScopeDecision(wanted == "include", str(rule))
        why = _outside_model(facts, self.model)
        return ScopeDecision(why is None, f"model: {why}" if why else "model scope")

    def too_few_slices(self, n_slices: int) -> str | None:
        """The series-level rule: the reason, or None when the series is long enough."""
        m = self.model.min_slices
        if 0 < n_slices < m:
            return f"not assessed: model: {n_slices} slice(s), fewer than {m}"
        return None


def _hard_limit(f: ImageFacts) -> str | None:
    if f.sop_class_uid not in IMAGE_SOP_CLASSES:
        return f"not an MR image (SOP class {f.sop_class_uid})"
    if f.samples_per_pixel != 1:
        return "colour image"
    return None


def _outside_model(f: ImageFacts, m: ModelScope) -> str | None:
    """Why the image is outside the model's scope, or None."""
    if m.modalities and (f.modality or "").upper() not in m.modalities:
        return f"modality {f.modality or 'unknown'}"
    kinds = [t.upper() for t in f.image_type]
    bad = [t for t in kinds if t in m.excluded_image_types]
    if bad:
        return f"ImageType {'/'.join(bad)}"
    if not m.diffusion and f.b_value is not None and f.b_value > 0:
        return f"diffusion-weighted (b = {f.b_value:g})"
    seq = [s.upper() for s in f.scanning_sequence]
    bad = [s for s in seq if s in m.excluded_sequences]
    if bad:
        return f"sequence {'/'.join(bad)} (echo planar)" if bad == ["EP"] else f"sequence {bad}"
    if m.sequences is not None and seq and not set(seq) & set(m.sequences):
        return f"sequence {'/'.join(seq)} not in the training data ({'/'.join(m.sequences)})"
    for size in (f.rows, f.columns):
        if size is not None and not m.min_size <= size <= m.max_size:
            return f"{f.rows}x{f.columns} pixels outside {m.min_size}-{m.max_size}"
    if m.body_parts is not None and f.body_part and f.body_part.upper() not in m.body_parts:
        return f"body part {f.body_part}"
    if m.orientations is not None and f.orientation and f.orientation not in m.orientations:
        return f"orientation {f.orientation}"
    return None


def site_rules(include: Sequence[Mapping[str, str]], exclude: Sequence[Mapping[str, str]]):
    """SiteRule objects from the config's ``[scope]`` tables (exclude first)."""
    return tuple(
        SiteRule(action, r["field"], r["pattern"])
        for action, rules in (("exclude", exclude), ("include", include))
        for r in rules
    )


def orientation_of(iop: Sequence[float] | None) -> str | None:
    """AX / SAG / COR from the row and column direction cosines (OBL when no axis is within
    about 30 degrees of the slice normal)."""
    if iop is None or len(iop) != 6:
        return None
    r, c = iop[:3], iop[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    axis = max(range(3), key=lambda i: abs(normal[i]))
    if abs(normal[axis]) < 0.85:
        return "OBL"
    return ("SAG", "COR", "AX")[axis]
