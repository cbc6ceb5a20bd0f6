"""The one preprocessing function shared by the node and by training.

DICOM dataset -> float32 array [n_frames, 512, 512, 1] in [0, 1]. Training imports this module so
that the model sees exactly what the node will feed it; any change to the output must bump
PREPROCESSING_VERSION, because model artifacts record it: the node feeds each model the version
it was trained with (any of SUPPORTED_VERSIONS, so a site's older model keeps working) and
refuses others. Training always uses the current version.

Steps, per frame: modality LUT (rescale slope/intercept), VOI window (linear, from the header, else
a robust 0.5/99.5 % percentile window), MONOCHROME1 inverted, turned (transposed) so that the
phase-encoding direction runs down the columns, padded centred to a square with 0, resized with
Pillow (mode "F", bilinear). Version 1 is the same without the turn. The turn (version 2) is
there because motion ghosts and smearing lie along the phase-encoding direction: with it they
always lie along the model's vertical axis, and a bright object that fills the frame in both
directions no longer looks like them. Enhanced multi-frame objects may carry rescale and
window per frame (Philips mixes magnitude and phase frames with different rescales in one file),
so both are looked up per frame: per-frame functional group, then shared group, then top level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import pixel_array
from pydicom.uid import UID

PREPROCESSING_VERSION = "2"  # bump when output changes; model artifacts record it
SUPPORTED_VERSIONS = ("1", "2")  # what the node can still feed a model it is given
INPUT_SIZE = 512

MIN_SIZE = 8
# The most decoded pixel data one instance may claim (rows x columns x frames x bytes): 1,000
# frames of 512x512 16-bit fit; a damaged header declaring more can make a decoder allocate it
# before it finds the data short (the long fuzz run saw a worker peak at 1.3 GiB).
MAX_DECODED_BYTES = 512 * 2**20
PERCENTILES = (0.5, 99.5)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = (
    "RGB",
    "PALETTE COLOR",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
)


class Unscorable(ValueError):
    """The dataset holds nothing the model can score; str(exc) is a short human reason."""


def frame_count(ds: pydicom.Dataset) -> int:
    """NumberOfFrames or 1 (absent, empty or nonsense values count as one frame)."""
    n = _as_int(ds.get("NumberOfFrames"))
    return n if n is not None and n > 0 else 1


@dataclass(frozen=True)
class Frames:
    """The model's input and, per frame, how much the stored image shows anatomy."""

    images: np.ndarray  # [n, size, size, 1] float32 in [0, 1]
    structure: np.ndarray  # [n] correlation of pixels two apart on the stored grid

    @property
    def anatomy(self) -> np.ndarray:
        """Indices of the frames that show anatomy (the others are not assessed)."""
        return np.flatnonzero(self.structure >= MIN_STRUCTURE)


def preprocess(
    ds: pydicom.Dataset, size: int = INPUT_SIZE, version: str = PREPROCESSING_VERSION
) -> np.ndarray:
    """[n_frames, size, size, 1] float32 in [0, 1].

    Raises Unscorable (with a short reason) for objects without monochrome pixel data that can be
    decoded; a constant frame is not an error (it comes out as a constant, usually zeros).
    """
    return preprocess_frames(ds, size, version).images


def preprocess_frames(
    ds: pydicom.Dataset, size: int = INPUT_SIZE, version: str = PREPROCESSING_VERSION
) -> Frames:
    """``preprocess`` plus each frame's structure, measured on the stored pixel grid (after the
    window) where resampling has not yet smoothed the noise."""
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"preprocessing v{version} is not one of {SUPPORTED_VERSIONS}")
    frames = _decode(ds)
    n = len(frames)
    invert = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    out = np.empty((n, size, size, 1), dtype=np.float32)
    textures = np.zeros(n, dtype=np.float32)
    for i in range(n):
        pixels = frames[i].T if turned(ds, i, version) else frames[i]
        rows, cols = pixels.shape
        target = out[i, :, :, 0]
        # Work in place in the output slot when no geometry change is needed (saves a copy).
        buf = target if (rows == cols == size) else np.empty((rows, cols), dtype=np.float32)
        np.copyto(buf, pixels, casting="unsafe")
        if frames.dtype.kind == "f":
            np.nan_to_num(buf, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        slope, intercept = _rescale(ds, i)
        if slope != 1.0:
            buf *= slope
        if intercept != 0.0:
            buf += intercept
        window = _window(ds, i)
        if window is None:
            _apply_range(buf, *_percentile_range(frames[i], buf, slope, intercept))
        else:
            _apply_window(buf, *window)
        textures[i] = structure(buf)
        if invert:
            np.subtract(1.0, buf, out=buf)
        if buf is target:
            continue
        side = max(rows, cols)
        if rows != cols:
            square = np.zeros((side, side), dtype=np.float32)
            top, left = (side - rows) // 2, (side - cols) // 2
            square[top : top + rows, left : left + cols] = buf
            buf = square
        if side == size:
            target[...] = buf
        else:
            image = Image.fromarray(buf)  # float32 2-D -> mode "F"
            target[...] = np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))
    # Resampling weights are normalised in double precision; keep float rounding inside [0, 1].
    np.clip(out, 0.0, 1.0, out=out)
    return Frames(out, textures)


# Frames that show no anatomy (the air beyond the head at the ends of a sagittal series, a
# blank frame) are not assessed: the model was never trained on them and calls noise motion.
# Thermal noise is white: pixels two apart barely correlate (0.2-0.4 in real series, where the
# coil's sensitivity adds a slow shading), while anatomy correlates >= 0.67 in every real
# structural series of ../shared/data, heavy motion included.
NO_ANATOMY = "not assessed: no anatomy in the image (noise only)"
MIN_STRUCTURE = 0.5


def structure(image: np.ndarray, lag: int = 2) -> float:
    """Correlation of pixels ``lag`` apart, over rows and columns: ~1 for anatomy, ~0 for
    white noise, 0 for a constant image. About 1 ms for 512 x 512 (einsum: no copies)."""
    x = np.asarray(image, np.float32)
    lag = max(1, min(lag, min(x.shape) - 1))
    x = x - np.float32(x.mean(dtype=np.float64))
    energy = float(np.einsum("ij,ij->", x, x))
    if energy <= 0.0:
        return 0.0
    rows = float(np.einsum("ij,ij->", x[lag:], x[:-lag])) * x.shape[0] / (x.shape[0] - lag)
    cols = float(np.einsum("ij,ij->", x[:, lag:], x[:, :-lag])) * x.shape[1] / (x.shape[1] - lag)
    return (rows + cols) / (2.0 * energy)


def phase_encoding_along_rows(ds: pydicom.Dataset, index: int = 0) -> bool:
    """True when frame ``index`` is phase-encoded along its rows (InPlanePhaseEncodingDirection
    ROW; enhanced objects: MR FOV/Geometry macro, per frame, then shared). Unknown counts as COL,
    the common case and what the training data records where the source did not say."""
    for src in [*_group_items(ds, index, "MRFOVGeometrySequence"), ds]:
        value = src.get("InPlanePhaseEncodingDirection")
        if value:
            return str(value).strip().upper() == "ROW"
    return False


def turned(ds: pydicom.Dataset, index: int = 0, version: str = PREPROCESSING_VERSION) -> bool:
    """Whether preprocessing ``version`` transposes frame ``index`` (v2 and later: phase
    encoding along its rows); pictures for people turn such a frame back."""
    return version != "1" and phase_encoding_along_rows(ds, index)


def slice_positions(ds: pydicom.Dataset) -> list[float | None]:
    """Per frame: position along the slice normal (ImagePositionPatient . (row x col cosines)).

    Classic images use the top-level tags; enhanced multi-frame objects use
    PerFrameFunctionalGroupsSequence / SharedFunctionalGroupsSequence (PlanePositionSequence,
    PlaneOrientationSequence). A top-level ImagePositionPatient is only trusted for single-frame
    objects (for several frames it would describe the first one only). None where unknown.
    Length == frame_count(ds).
    """
    n = frame_count(ds)
    top_ipp = ds.get("ImagePositionPatient") if n == 1 else None
    top_iop = ds.get("ImageOrientationPatient")
    positions: list[float | None] = []
    for i in range(n):
        pos_item = _group_item(ds, i, "PlanePositionSequence")
        ori_item = _group_item(ds, i, "PlaneOrientationSequence")
        ipp = pos_item.get("ImagePositionPatient") if pos_item is not None else None
        iop = ori_item.get("ImageOrientationPatient") if ori_item is not None else None
        positions.append(_position(ipp if ipp is not None else top_ipp, iop or top_iop))
    return positions


# --- decoding -------------------------------------------------------------------------------


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    """Validate and decode all frames once -> [n, rows, cols] in the stored dtype."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None or ds[keyword].is_empty:
        raise Unscorable(f"no pixel data ({_sop_name(ds)})")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    samples = _as_int(ds.get("SamplesPerPixel"))
    if photometric in _COLOUR or (samples is not None and samples != 1):
        raise Unscorable(f"colour image ({photometric or f'{samples} samples per pixel'})")
    if photometric and photometric not in _MONOCHROME:
        raise Unscorable(f"unsupported photometric interpretation {photometric!r}")
    rows, cols = _as_int(ds.get("Rows")) or 0, _as_int(ds.get("Columns")) or 0
    if rows < MIN_SIZE or cols < MIN_SIZE:
        raise Unscorable(f"image too small ({rows}x{cols}, need at least {MIN_SIZE}x{MIN_SIZE})")
    n = frame_count(ds)
    ts = _transfer_syntax(ds)
    bits = _as_int(ds.get("BitsAllocated")) or 0
    if (claimed := rows * cols * n * max(bits, 8) // 8) > MAX_DECODED_BYTES:
        limit = MAX_DECODED_BYTES / 2**20
        raise Unscorable(f"image data too large to decode ({n} x {rows}x{cols} x {bits} bits:"
                         f" {claimed / 2**20:.0f} MiB > {limit:.0f} MiB)")  # fmt: skip
    if keyword == "PixelData" and ts is not None and not ts.is_compressed:
        expected = (rows * cols * n * bits + 7) // 8
        got = len(ds.PixelData)
        if got < expected:
            raise Unscorable(f"truncated pixel data ({got} of {expected} bytes)")
    try:
        # pydicom.pixels.pixel_array leaves ds untouched (ds.pixel_array would cache a copy on it).
        arr = pixel_array(ds)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        # Decoders raise anything from ValueError to RuntimeError; the Rust ones (pylibjpeg-rle)
        # a PanicException, a BaseException that went through every handler and stopped the
        # worker (found by fuzzing).
        name = ts.name if ts is not None else "unknown transfer syntax"
        detail = " ".join(str(exc).split())  # one line: decoder plugins report one per line
        raise Unscorable(f"cannot decode {name}: {type(exc).__name__}: {detail[:300]}") from exc
    if arr.size != n * rows * cols:
        raise Unscorable(f"decoded {arr.shape} does not match {n} frame(s) of {rows}x{cols}")
    return arr.reshape(n, rows, cols)


def _transfer_syntax(ds: pydicom.Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(uid)) if uid else None


def _sop_name(ds: pydicom.Dataset) -> str:
    """SOP class for a reason string; an empty dataset is what pydicom returns for many
    truncated files (it warns and drops everything read), so say so."""
    meta = getattr(ds, "file_meta", None)
    uid = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    name = UID(str(uid)).name if uid else "unknown SOP class"
    return name if len(ds) else f"{name}; empty dataset, truncated or unreadable file?"


# --- per-frame attributes -------------------------------------------------------------------


def _group_items(ds: pydicom.Dataset, index: int, keyword: str) -> list[pydicom.Dataset]:
    """Items of a functional-group macro for a frame, most specific first: per-frame, shared."""
    items = []
    for groups_kw, i in (
        ("PerFrameFunctionalGroupsSequence", index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_kw)
        if groups and len(groups) > i:
            seq = groups[i].get(keyword)
            if seq:
                items.append(seq[0])
    return items


def _group_item(ds: pydicom.Dataset, index: int, keyword: str) -> pydicom.Dataset | None:
    items = _group_items(ds, index, keyword)
    return items[0] if items else None


def _rescale(ds: pydicom.Dataset, index: int) -> tuple[float, float]:
    """Modality LUT as (slope, intercept) from the most specific level that has one.

    A missing or zero slope means 1, a missing intercept 0 (MR often omits both).
    """
    for src in [*_group_items(ds, index, "PixelValueTransformationSequence"), ds]:
        slope = _as_float(src.get("RescaleSlope"))
        intercept = _as_float(src.get("RescaleIntercept"))
        if slope is not None or intercept is not None:
            return (slope if slope else 1.0), (intercept or 0.0)
    return 1.0, 0.0


def _window(ds: pydicom.Dataset, index: int) -> tuple[float, float, str] | None:
    """(center, width, VOI LUT function) in rescaled units from the most specific level that has
    a complete window; None (-> percentile window) when there is none or its width is < 1."""
    for src in [*_group_items(ds, index, "FrameVOILUTSequence"), ds]:
        center = _as_float(src.get("WindowCenter"))
        width = _as_float(src.get("WindowWidth"))
        if center is None or width is None:
            continue
        if width < 1.0:
            return None
        function = str(_first(src.get("VOILUTFunction")) or "LINEAR").strip().upper()
        return center, width, function
    return None


def _apply_window(buf: np.ndarray, center: float, width: float, function: str) -> None:
    """Header VOI window in place (DICOM PS3.3 C.11.2.1.2 with output range [0, 1])."""
    if function == "SIGMOID":
        buf -= center
        buf *= -4.0 / width
        with np.errstate(over="ignore"):
            np.exp(buf, out=buf)  # overflow -> inf -> 1 / (1 + inf) = 0, as intended
        buf += 1.0
        np.reciprocal(buf, out=buf)
        return
    if function == "LINEAR_EXACT":
        lo, span = center - width / 2.0, width
    else:  # LINEAR (the default): y = (x - (c - 0.5 - (w - 1) / 2)) / (w - 1)
        lo, span = center - 0.5 - (width - 1.0) / 2.0, width - 1.0
    if span <= 0.0:  # LINEAR with width 1 is a threshold at c - 0.5
        np.greater(buf, center - 0.5, out=buf)
        return
    _apply_range(buf, lo, lo + span)


def _apply_range(buf: np.ndarray, lo: float, hi: float) -> None:
    """Linear map lo -> 0, hi -> 1, clipped, in place; an empty range gives zeros."""
    if not hi > lo:
        buf.fill(0.0)
        return
    buf -= lo
    buf *= 1.0 / (hi - lo)
    np.clip(buf, 0.0, 1.0, out=buf)


def _percentile_range(
    raw: np.ndarray, buf: np.ndarray, slope: float, intercept: float
) -> tuple[float, float]:
    """Robust window (0.5/99.5 %) in rescaled units for a frame without a header window.

    Falls back to min/max when the percentiles coincide (frames that are >99 % background).
    Integer frames of up to 16 bits use a histogram of the stored values (exact, and about ten
    times faster than np.percentile); the percentiles are then rescaled, which commutes with
    the linear interpolation np.percentile does.
    """
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:
        flat = raw.reshape(-1)
        shift = int(flat.min()) if raw.dtype.kind == "i" else 0
        counts = np.bincount(flat if shift == 0 else flat.astype(np.int32) - shift)
        cum = np.cumsum(counts)
        values = [_order_statistic_interp(cum, q) + shift for q in PERCENTILES]
        if not values[1] > values[0]:
            nonzero = np.flatnonzero(counts)
            values = [float(nonzero[0] + shift), float(nonzero[-1] + shift)]
        lo, hi = (v * slope + intercept for v in values)
        return (lo, hi) if lo <= hi else (hi, lo)
    lo, hi = (float(v) for v in np.percentile(buf, PERCENTILES))
    if not hi > lo:
        lo, hi = float(buf.min()), float(buf.max())
    return lo, hi


def _order_statistic_interp(cum: np.ndarray, q: float) -> float:
    """np.percentile(..., method="linear") from a cumulative histogram of bin values 0..k."""
    n = int(cum[-1])
    pos = q / 100.0 * (n - 1)
    k = math.floor(pos)
    a = int(np.searchsorted(cum, k, side="right"))
    b = int(np.searchsorted(cum, min(k + 1, n - 1), side="right"))
    return a + (pos - k) * (b - a)


def _position(ipp: Any, iop: Any) -> float | None:
    p, o = _floats(ipp, 3), _floats(iop, 6)
    if p is None or o is None:
        return None
    r, c = o[:3], o[3:]
    normal = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    if not any(normal):
        return None
    return p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2]


# --- tolerant value parsing (headers from the field are messy) -------------------------------


def _first(value: Any) -> Any:
    if isinstance(value, Iterable) and not isinstance(value, str | bytes):
        return next(iter(value), None)
    return value


def _as_float(value: Any) -> float | None:
    """First value of a (possibly multi-valued) DS/IS element as a finite float, else None."""
    value = _first(value)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return int(f) if f is not None else None


def _floats(value: Any, n: int) -> list[float] | None:
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None
