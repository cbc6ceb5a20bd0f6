"""Motion-corrupted copies of clean real series, written as DICOM with a training manifest.

Each clean source series becomes ``copies`` output series, each one acquisition with its own
motion level (clean, mild, moderate or heavy), a nuisance draw (the same for every slice of the
copy, see ``nuisance``; shared by copies 2k and 2k + 1, which differ in motion) and its own
line order. Per slice the motion amplitude varies a
little around the copy's level (people do not move the same during every slice), the motion is
made in k-space (``kspace``), and the severity is *measured* on the image; the two simulated
raters and the truth then read that severity exactly as for the synthetic phantoms, so real
and synthetic data share one label scale and one manifest format.

Outputs, under ``out_dir``: ``<subject>/<copy series>/IM0001.dcm ...``, ``manifest.csv`` (the
training manifest: patient_id is the source subject, so splits never cut a subject),
``corruption.csv`` (per slice: source, level, amplitude, motion kinds, error, severity),
``summary.json`` and ``montage.png`` (one slice per subject and level, to look at).
Deterministic for a seed: the same sources give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from training.manifest import Record, write_manifest
from training.realmotion.kspace import (
    LineOrder,
    MotionDraw,
    draw_motion,
    line_order_for,
    motion_kspace,
    severity_from_error,
)
from training.realmotion.montage import write_montage
from training.realmotion.nuisance import Nuisance, acquire, draw_nuisance, finish
from training.realmotion.sources import SourceSeries, find_series, resliced
from training.synth.raters import classify, rate

log = logging.getLogger(__name__)

__all__ = ["LEVELS", "CorruptConfig", "corrupt_slice", "corrupt_sources", "write_corrupted"]

# Motion amplitude ranges of the copy levels (0: none, 1: heavy).
LEVELS = {"clean": (0.0, 0.0), "mild": (0.03, 0.12), "moderate": (0.12, 0.35), "heavy": (0.35, 1.2)}
DEFAULT_LEVELS = ("clean", "heavy", "mild", "clean", "moderate", "heavy")
_UID_TAG = "mriqa-node-training-realmotion-v1"
MIN_OBJECT = 0.08  # share of a slice that must be object for it to be used


@dataclass(frozen=True)
class CorruptConfig:
    copies: int = 6  # output series per source series
    levels: tuple[str, ...] = DEFAULT_LEVELS  # cycled over the copies
    max_slices: int = 32  # per source series, evenly over the slices that show anatomy
    nuisance: float = 1.0  # strength of the nuisances (0: none)
    reslice: bool = True  # also corrupt the other two planes of 3-D volumes
    # Copies 2k and 2k + 1 share one nuisance draw (window, noise level, zoom, flips...) at
    # different motion levels: no look then goes with one label only, so the look cannot
    # stand in for the motion in a small set of subjects.
    paired: bool = False
    seed: int = 0


def _signal(image: np.ndarray) -> float:
    """Mean of the object's signal (pixels above a tenth of the bright level)."""
    bright = float(np.percentile(image, 99.5))
    obj = image[image > 0.1 * bright]
    return float(obj.mean()) if obj.size else max(bright, 1e-6)


def corrupt_slice(
    image: np.ndarray,
    amplitude: float,
    order: LineOrder,
    draw: MotionDraw,
    nuisance: Nuisance,
    rng: np.random.Generator,
    neighbour: np.ndarray | None = None,
    pe_axis: int = 0,
) -> tuple[np.ndarray, float]:
    """(corrupted magnitude image, relative error against the frozen image) of one 2-D slice.

    Amplitude 0 with the identity nuisance returns the input itself, bit for bit. The error is
    measured without noise (noise is a nuisance, not an artefact)."""
    img = np.asarray(image, np.float32)
    if amplitude <= 0 and nuisance.identity:
        return img.copy(), 0.0
    work = np.moveaxis(img, pe_axis, 0)
    other = None if neighbour is None else np.moveaxis(np.asarray(neighbour), pe_axis, 0)
    moved_k, frozen_k = motion_kspace(work, amplitude, order, draw, other)
    signal = _signal(work)
    moved = acquire(moved_k, nuisance, None, signal)
    frozen = acquire(frozen_k, nuisance, None, signal)
    error = float(np.linalg.norm(moved - frozen) / max(np.linalg.norm(frozen), 1e-12))
    out = acquire(moved_k, nuisance, rng, signal) if nuisance.noise > 0 else moved
    return np.ascontiguousarray(np.moveaxis(out, 0, pe_axis)), error


def _pick(slices: np.ndarray, most: int) -> np.ndarray:
    """Up to ``most`` slice indices, evenly spread over the slices that show anatomy: at least
    ``MIN_OBJECT`` of the image above a sixth of the series' bright level (the edge slices of a
    volume are air and noise, where "motion" has nothing to move)."""
    bright = float(np.percentile(slices, 99.5)) or 1.0
    share = (slices > bright / 6.0).mean(axis=(1, 2))
    useful = np.flatnonzero(share >= MIN_OBJECT)
    if len(useful) <= most:
        return useful
    return useful[np.unique(np.linspace(0, len(useful) - 1, most).round().astype(int))]


def _seed(*parts: object) -> int:
    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def corrupt_sources(
    sources: Sequence[SourceSeries], out_dir: Path | str, config: CorruptConfig = CorruptConfig(),
    progress: bool = True,
) -> Path:  # fmt: skip
    """Write the corrupted copies of every source series; returns the manifest path."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: list[Record] = []
    rows: list[dict] = []
    total = sum(len(_pick(s.slices, config.max_slices)) for s in sources) * config.copies
    bar = tqdm(total=total, desc="corrupt", unit="slice", disable=not progress)
    for src in sources:
        for copy in range(config.copies):
            level = config.levels[copy % len(config.levels)]
            recs, info = _copy(src, copy, level, config, out)
            records.extend(recs)
            rows.extend(info)
            bar.update(len(recs))
    bar.close()
    manifest = write_manifest(records, out / "manifest.csv")
    with (out / "corruption.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(_summary(config, sources, records), indent=2))
    write_montage(out, out / "montage.png")
    return manifest


def write_corrupted(
    inputs: Sequence[Path | str], out_dir: Path | str, config: CorruptConfig = CorruptConfig(),
    progress: bool = True,
) -> Path:  # fmt: skip
    """``mriqa-train corrupt``: find the clean series under ``inputs`` and corrupt them."""
    sources = find_series(*inputs)
    if config.reslice:
        sources += [view for s in sources for view in resliced(s)]
    if not sources:
        raise ValueError(f"no usable clean series under {', '.join(map(str, inputs))}")
    log.info("%d clean series of %d subjects", len(sources), len({s.subject for s in sources}))
    return corrupt_sources(sources, out_dir, config, progress)


def _copy(
    src: SourceSeries, copy: int, level: str, config: CorruptConfig, out: Path
) -> tuple[list[Record], list[dict]]:
    rng = np.random.default_rng(_seed(config.seed, src.name, src.subject, copy))
    picks = _pick(src.slices, config.max_slices)
    if config.paired:
        look = np.random.default_rng(_seed(config.seed, src.name, src.subject, copy // 2, "look"))
        nuisance = draw_nuisance(look, config.nuisance)
    else:
        nuisance = draw_nuisance(rng, config.nuisance)
    lo, hi = LEVELS[level]
    base = float(rng.uniform(lo, hi))
    n_pe = src.slices.shape[1 + src.pe_axis]
    order = line_order_for(n_pe, src.etl, src.tr_ms, rng)
    reference = float(np.percentile(src.slices[picks], 99.5)) or 1.0
    images, errors, amps, kinds = [], [], [], []
    for i in picks:
        amp = base * float(rng.uniform(0.7, 1.3)) if base > 0 else 0.0
        j = i + (1 if rng.random() < 0.5 else -1)
        neighbour = src.slices[j] if 0 <= j < len(src.slices) else None
        draw = draw_motion(rng, through=0.4 if neighbour is not None else 0.0)
        img, err = corrupt_slice(src.slices[i], amp, order, draw, nuisance, rng, neighbour,
                                 src.pe_axis)  # fmt: skip
        images.append(finish(img, nuisance, reference))
        errors.append(err)
        amps.append(amp)
        kinds.append(_kinds(draw, neighbour is not None) if amp > 0 else "")
    severity = severity_from_error(np.asarray(errors))
    labels = {r: rate(severity, r, rng) for r in (1, 2)}
    truth = classify(severity)
    series_dir = out / src.subject / f"{_slug(src.name)}-c{copy}"
    written = _write_series(src, copy, level, nuisance, order, np.stack(images), series_dir,
                            config.seed)  # fmt: skip
    records, info = [], []
    for k, (path, uids) in enumerate(written):
        records.append(
            Record(
                path=path, patient_id=src.subject, study_uid=uids[0], series_uid=uids[1],
                sop_instance_uid=uids[2], instance=k + 1,
                raters={"rater1": int(labels[1][k]), "rater2": int(labels[2][k])},
                severity=round(float(severity[k]), 4), true_class=int(truth[k]),
            )
        )  # fmt: skip
        info.append({
            "path": str(path.relative_to(out)), "sop_instance_uid": uids[2],
            "source": src.name, "subject": src.subject, "copy": copy, "level": level,
            "slice": int(picks[k]), "amplitude": round(amps[k], 4), "motion": kinds[k],
            "error": round(errors[k], 5), "severity": round(float(severity[k]), 4),
            "true_class": int(truth[k]),
            "nuisance": json.dumps(asdict(nuisance), separators=(",", ":")),
        })  # fmt: skip
    return records, info


def _kinds(draw: MotionDraw, has_neighbour: bool) -> str:
    parts = ["rigid"] if len(draw.event_fractions) else []
    parts += ["periodic"] if draw.periodic else []
    parts += ["through-plane"] if draw.through and has_neighbour else []
    return "+".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("_")


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _write_series(
    src: SourceSeries, copy: int, level: str, nuisance: Nuisance, order: LineOrder,
    images: np.ndarray, series_dir: Path, seed: int,
) -> list[tuple[Path, tuple[str, str, str]]]:  # fmt: skip
    """Write one copy as MR Image Storage: the source's acquisition attributes, our own
    subject and UIDs (no patient data of the source), the vendor scale and window of the
    nuisance draw."""
    key = [_UID_TAG, str(seed), src.name, src.subject]
    study_uid = generate_uid(entropy_srcs=[*key, "study"])
    series_uid = generate_uid(entropy_srcs=[*key, "series", str(copy)])
    top = 0.8 * nuisance.max_value
    pixels = np.clip(np.rint(images * top), 0, nuisance.max_value).astype(np.uint16)
    bits = int(nuisance.max_value).bit_length()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MRIQA_MOTION_SIM"]
    ds.SOPClassUID = MRImageStorage
    when = dt.datetime(2024, 1, 1) + dt.timedelta(minutes=_seed(*key) % 500_000)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.Modality = "MR"
    ds.PatientName = f"REALMOTION^{src.subject}"[:64]
    ds.PatientID = src.subject[:64]
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 100 + copy
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    for name, value in src.header.items():
        setattr(ds, name, value)
    if "SeriesDescription" in ds:
        ds.SeriesDescription = f"{ds.SeriesDescription} [{level}]"[:64]
    else:
        ds.SeriesDescription = f"real anatomy [{level}]"
    pe = src.pe_axis if nuisance.rot90 % 2 == 0 else 1 - src.pe_axis
    ds.InPlanePhaseEncodingDirection = "ROW" if pe == 1 else "COL"
    ds.EchoTrainLength = order.etl
    ds.ImagesInAcquisition = len(images)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = images.shape[1:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if nuisance.window:
        low, high = nuisance.window_range
        ds.WindowCenter = _ds(round((low + high) / 2 * top, 1))
        ds.WindowWidth = _ds(round(max((high - low) * top, 2.0), 1))
    series_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, plane in enumerate(pixels):
        # The pixels are part of the UID: caches keyed by SOP UID (training.data) must never
        # serve an older corruption of the same slice.
        digest = hashlib.sha256(plane.tobytes()).hexdigest()
        sop_uid = generate_uid(entropy_srcs=[*key, "instance", str(copy), str(i), digest])
        meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = i + 1
        ds.PixelData = np.ascontiguousarray(plane, "<u2").tobytes()
        ds["PixelData"].VR = "OW"
        path = series_dir / f"IM{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append((path, (study_uid, series_uid, sop_uid)))
    return written


def _summary(config: CorruptConfig, sources: Sequence[SourceSeries], records: list[Record]):
    truth = np.asarray([r.true_class for r in records])
    per_subject: dict[str, dict] = {}
    for s in sources:
        entry = per_subject.setdefault(s.subject, {"series": [], "clean_slices": 0})
        entry["series"].append(s.name)
        entry["clean_slices"] += len(_pick(s.slices, config.max_slices))
    return {
        "config": asdict(config),
        "sources": per_subject,
        "slices": len(records),
        "truth": {str(c): int((truth == c).sum()) for c in (0, 1, 2)},
    }
