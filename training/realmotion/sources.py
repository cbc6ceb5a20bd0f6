"""Clean series to corrupt: every DICOM series and NIfTI volume under a folder.

A site's own folder of clean structural series works as it is: DICOM files are grouped by
SeriesInstanceUID (an Enhanced MR file is split into its frames), ordered along the slice
normal, and decoded with the modality LUT; NIfTI volumes (.nii, .nii.gz, with nibabel) are
reoriented to the closest canonical orientation and cut into axial slices. What is not a clean
magnitude structural image (phase, colour, localizer, diffusion, no pixels) is skipped with a
logged reason, so a mixed folder is fine.

The subject of a series (what the split and the per-source evaluation group by) is the
manufacturer and PatientID where the PatientID means something, else the series' folder: four
series of one volunteer stay one subject.
"""

from __future__ import annotations

import logging
import re
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.multival import MultiValue

log = logging.getLogger(__name__)

__all__ = ["SourceSeries", "find_series", "resliced"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_MEANINGLESS_IDS = {"", "anonymous", "anon", "none", "unknown", "0", "***"}
_COPIED = (
    "Manufacturer", "ManufacturerModelName", "MagneticFieldStrength", "ScanningSequence",
    "SequenceVariant", "MRAcquisitionType", "EchoTrainLength", "RepetitionTime", "EchoTime",
    "InversionTime", "FlipAngle", "BodyPartExamined", "SeriesDescription", "ProtocolName",
    "PixelSpacing", "SliceThickness", "ImageOrientationPatient", "InPlanePhaseEncodingDirection",
)  # fmt: skip


@dataclass
class SourceSeries:
    """One clean series: slices [n, rows, cols] float32 in stored order, and header facts."""

    name: str  # folder (and series number) it came from, for people
    subject: str  # the split and evaluation group
    slices: np.ndarray
    header: dict[str, Any] = field(default_factory=dict)  # _COPIED attributes found
    pe_axis: int = 0  # 0: PE along the columns of the image (rows vary), 1: along rows

    @property
    def etl(self) -> int | None:
        v = self.header.get("EchoTrainLength")
        return int(v) if v not in (None, "") else None

    @property
    def tr_ms(self) -> float | None:
        v = self.header.get("RepetitionTime")
        return float(v) if v not in (None, "") else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "series"


def _skip_reason(ds: pydicom.Dataset) -> str | None:
    """Why a DICOM image is not a clean magnitude structural slice (None: it is)."""
    if "PixelData" not in ds:
        return "no pixel data"
    if ds.get("Modality", "MR") != "MR":
        return f"modality {ds.get('Modality')}"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return "colour image"
    kinds = {str(v).upper() for v in ds.get("ImageType", [])}
    bad = kinds & {"P", "PHASE", "R", "REAL", "I", "IMAGINARY", "LOCALIZER", "ADC", "TRACE",
                   "FA", "DIFFUSION", "MOSAIC", "MAP"}  # fmt: skip
    if bad:
        return f"ImageType {'/'.join(sorted(bad))}"
    b = ds.get((0x0018, 0x9087)) or ds.get((0x0043, 0x1039))
    if b is not None and _first_float(b.value) > 0:
        return "diffusion-weighted"
    return None


def _first_float(value: Any) -> float:
    try:
        return float(value[0] if isinstance(value, list | tuple | MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return 0.0


def _frames(ds: pydicom.Dataset) -> np.ndarray:
    """Decoded frames [n, rows, cols] float32 with the modality LUT applied."""
    from pydicom.pixels import apply_rescale

    px = ds.pixel_array
    frames = px if int(ds.get("NumberOfFrames", 1) or 1) > 1 else px[None]
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        frames = apply_rescale(frames, ds)
    return np.asarray(frames, np.float32)


def _position(ds: pydicom.Dataset) -> float:
    """Position along the slice normal (else the instance number) for ordering."""
    try:
        o = np.asarray(ds.ImageOrientationPatient, float)
        return float(np.dot(np.cross(o[:3], o[3:]), np.asarray(ds.ImagePositionPatient, float)))
    except (AttributeError, ValueError, TypeError):
        return float(ds.get("InstanceNumber", 0) or 0)


def _subject(ds: pydicom.Dataset, folder: str) -> str:
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid.lower() in _MEANINGLESS_IDS or set(pid) <= {"*", "0", " "}:
        return _slug(folder)
    return _slug(f"{ds.get('Manufacturer', '') or 'unknown'}_{pid}")


def _dicom_series(root: Path, files: list[Path]) -> Iterator[SourceSeries]:
    groups: dict[str, list[tuple[float, pydicom.Dataset, Path]]] = defaultdict(list)
    seen: set[str] = set()  # one SOP instance once (the same image in several syntaxes)
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # not DICOM (licences, readmes): silently not a source
            continue
        reason = _skip_reason(ds) or ("duplicate" if ds.get("SOPInstanceUID") in seen else None)
        seen.add(ds.get("SOPInstanceUID"))
        if reason:
            log.info("skipping %s: %s", path, reason)
            continue
        groups[str(ds.get("SeriesInstanceUID", path.parent))].append((_position(ds), ds, path))
    for items in groups.values():
        items.sort(key=lambda item: (item[0], int(item[1].get("InstanceNumber", 0) or 0)))
        first, path0 = items[0][1], items[0][2]
        try:
            stacks = [_frames(ds) for _, ds, _ in items]
        except Exception as exc:
            log.warning("skipping series in %s: cannot decode (%s)", path0.parent, exc)
            continue
        shapes = {s.shape[1:] for s in stacks}
        if len(shapes) != 1:
            log.warning("skipping series in %s: mixed image sizes %s", path0.parent, shapes)
            continue
        folder = str(path0.parent.relative_to(root)) if path0.parent != root else root.name
        header = {k: first.get(k) for k in _COPIED if first.get(k) not in (None, "")}
        pe = str(first.get("InPlanePhaseEncodingDirection", "COL")).upper()
        # Enhanced MR keeps these in functional groups: the first frame's are good enough.
        yield SourceSeries(
            name=f"{folder}#{first.get('SeriesNumber', '')}",
            subject=_subject(first, folder if folder != "." else root.name),
            slices=np.concatenate(stacks),
            header=header,
            pe_axis=1 if pe == "ROW" else 0,
        )


def _nifti_series(root: Path, path: Path) -> SourceSeries | None:
    try:
        import nibabel as nib
    except ImportError:
        log.warning("skipping %s: NIfTI needs nibabel (pip install nibabel)", path)
        return None
    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(img.dataobj, np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    if data.ndim != 3:
        log.warning("skipping %s: %d-D image", path, data.ndim)
        return None
    # RAS+ canonical: axis 2 is inferior -> superior; show each axial slice as radiologists
    # do (anterior up, patient's right on the left): transpose and flip.
    slices = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, :])
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    folder = str(path.parent.relative_to(root)) if path.parent != root else root.name
    return SourceSeries(
        name=f"{folder}/{path.name}",
        subject=_slug(folder if folder != "." else path.name.split(".")[0]),
        slices=slices,
        header={"PixelSpacing": [zooms[1], zooms[0]], "SliceThickness": zooms[2]},
        pe_axis=zlib.crc32(path.name.encode()) % 2,  # not recorded in NIfTI: stable guess
    )


def _spacing(series: SourceSeries) -> tuple[float, float, float] | None:
    """(slice, row, column) spacing in mm where the header gives all three."""
    try:
        rows, cols = (float(v) for v in series.header["PixelSpacing"])
        return float(series.header["SliceThickness"]), rows, cols
    except (KeyError, TypeError, ValueError):
        return None


def resliced(series: SourceSeries, min_slices: int = 64, max_ratio: float = 2.0
             ) -> list[SourceSeries]:  # fmt: skip
    """The two other orthogonal planes of a 3-D volume (near-isotropic voxels, at least
    ``min_slices`` slices), resampled to square pixels: the same subject seen as a different
    anatomy, for training only. A 2-D multi-slice series (thick slices) gives none."""
    from scipy import ndimage

    spacing = _spacing(series)
    if series.header.get("MRAcquisitionType") == "2D" or spacing is None:
        return []
    if len(series.slices) < min_slices or max(spacing) / min(spacing) > max_ratio:
        return []
    out = []
    for axis, tag in ((1, "a"), (2, "b")):  # the plane that holds the slice axis and one other
        volume = np.moveaxis(series.slices, axis, 0)[:, ::-1]  # first slice on top
        keep = 2 if axis == 1 else 1  # the in-plane axis that stays
        zoom = (1.0, spacing[0] / spacing[keep], 1.0)
        if abs(zoom[1] - 1.0) > 0.05:
            volume = ndimage.zoom(volume, zoom, order=1)
        out.append(SourceSeries(
            name=f"{series.name}@{tag}", subject=series.subject,
            slices=np.ascontiguousarray(volume, np.float32),
            header={**series.header, "PixelSpacing": [spacing[keep]] * 2,
                    "SliceThickness": spacing[axis]},
            pe_axis=zlib.crc32(f"{series.name}@{tag}".encode()) % 2,
        ))  # fmt: skip
    return out


def find_series(*roots: Path | str, min_slices: int = 1) -> list[SourceSeries]:
    """Every usable clean series under the roots (files or folders), in a stable order."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # vendors' quirks, not our problem
    out: list[SourceSeries] = []
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        base = root.parent if root.is_file() else root
        by_dir: dict[Path, list[Path]] = defaultdict(list)
        for f in files:
            if f.name.endswith(NIFTI_SUFFIXES):
                series = _nifti_series(base, f)
                if series is not None:
                    out.append(series)
            else:
                by_dir[f.parent].append(f)
        for d in sorted(by_dir):
            out.extend(_dicom_series(base, by_dir[d]))
    kept = [s for s in out if len(s.slices) >= min_slices and min(s.slices.shape[1:]) >= 32]
    for s in out:
        if s not in kept:
            log.info("skipping %s: %d slices of %s", s.name, len(s.slices), s.slices.shape[1:])
    return kept
