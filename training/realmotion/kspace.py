"""Motion made in k-space on real magnitude slices, line by line in the acquisition's order.

A 2-D acquisition fills k-space one phase-encoding (PE) line at a time. With an echo train of
ETL echoes per excitation (FSE/TSE; ETL 1 for GRE and conventional SE) k-space is cut into ETL
segments and shot ``s`` fills line ``s`` of every segment, so a line's index says *when* it was
acquired (``LineOrder``). Whatever the body did at that time is frozen into that line:

* rigid in-plane moves at random k-space times (translation and rotation, TorchIO's
  ``RandomMotion`` after Shaw et al. 2019): k-space is assembled from the spectra of the moved
  copies, each contributing the lines acquired while it held;
* periodic motion along the PE axis (breathing, pulsation) of a part of the image: a
  quasi-periodic displacement over the line times gives ghosts spaced along the PE axis;
* through-plane motion, approximated by mixing a neighbouring slice's k-space into the lines
  acquired while the body had slid along the slice normal.

The severity is measured on the image, not read off the motion parameters: the relative error
between the corrupted reconstruction and the *frozen* one (every part held where it was when the
centre of k-space was acquired, which fixes where the reader sees the anatomy), mapped to
[0, 1) by ``severity_from_error``. A head that lay a millimetre to the left is not an artefact;
ghosts and smearing are. Motion patterns are drawn as unit patterns and scaled by the
amplitude, so for one seed the artefact grows with the amplitude and amplitude 0 is the image
itself, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

__all__ = [
    "LineOrder",
    "MotionDraw",
    "draw_motion",
    "line_order_for",
    "motion_kspace",
    "severity_from_error",
]

# Relative image error at which severity reaches 1 - 1/e. With the raters' boundaries (0.2 and
# 0.5 on the severity scale) an error of ~4 % reads as excellent, ~13 % as non-diagnostic:
# chosen by looking at corrupted real slices (the montage.png that `corrupt` writes).
ERROR_SCALE = 0.15
_TAU = 2.0 * np.pi

# Per unit amplitude: rigid translation (fraction of the matrix, sd), rotation (deg, sd),
# periodic displacement (fraction of the matrix, peak) and through-plane mix (peak weight).
SHIFT_FRACTION = 0.05
ROTATION_DEG = 8.0
PERIODIC_FRACTION = 0.08
THROUGH_PLANE = 0.6


def severity_from_error(error: float | np.ndarray) -> float | np.ndarray:
    """Monotone map from relative image error ||moved - frozen|| / ||frozen|| to [0, 1)."""
    return 1.0 - np.exp(-np.asarray(error, dtype=np.float64) / ERROR_SCALE)


@dataclass(frozen=True)
class LineOrder:
    """When each PE line is acquired: ``n_pe`` lines, ``etl`` echoes per shot, ``tr_s`` between
    shots, ``esp_s`` between echoes (segmented ordering, centre of k-space at the middle echo).
    """

    n_pe: int
    etl: int = 1
    tr_s: float = 0.5
    esp_s: float = 0.01

    @property
    def shots(self) -> int:
        return -(-self.n_pe // max(1, self.etl))

    @property
    def duration_s(self) -> float:
        return self.shots * self.tr_s

    def times(self) -> np.ndarray:
        """(n_pe,) acquisition time per FFT row (row r holds ky = fftfreq(n_pe)[r] * n_pe)."""
        ky = np.rint(np.fft.fftfreq(self.n_pe) * self.n_pe).astype(np.int64)
        order = ky + self.n_pe // 2  # 0 .. n_pe - 1 from the most negative ky
        return (order % self.shots) * self.tr_s + (order // self.shots) * self.esp_s


def line_order_for(
    n_pe: int, etl: int | None, tr_ms: float | None, rng: np.random.Generator
) -> LineOrder:
    """The line order of a series from its header (EchoTrainLength, RepetitionTime), with
    plausible random values where the header is silent (NIfTI, anonymised files)."""
    etl = int(etl) if etl and etl > 0 else int(rng.choice([1, 1, 4, 8, 16, 24]))
    etl = max(1, min(etl, n_pe))
    tr = float(tr_ms) / 1000.0 if tr_ms and tr_ms > 0 else float(rng.uniform(0.3, 4.0))
    # A gradient echo's TR is milliseconds: what matters for motion is the time per line.
    tr = max(tr, 0.005)
    return LineOrder(n_pe=n_pe, etl=etl, tr_s=tr, esp_s=min(0.012, tr / (etl + 1)))


@dataclass(frozen=True)
class MotionDraw:
    """A unit motion pattern; ``motion_kspace`` scales it by the amplitude."""

    event_fractions: np.ndarray  # (e,) times of rigid moves, fraction of the acquisition
    poses: np.ndarray  # (e, 3) cumulative unit poses (dy, dx, rotation) after each move
    periodic: bool
    period_fraction: float  # breathing period as a fraction of the acquisition
    phase: float
    region: np.ndarray  # (2,) centre (fractions) of the moving region
    region_width: float
    through: bool
    through_period_fraction: float
    through_phase: float


def draw_motion(rng: np.random.Generator, rigid: float = 0.7, periodic: float = 0.6,
                through: float = 0.4) -> MotionDraw:  # fmt: skip
    """Draw which kinds of motion happen (with the given probabilities, at least one) and
    their unit patterns."""
    kinds = rng.random(3) < np.array([rigid, periodic, through])
    if not kinds.any():
        kinds[rng.integers(3)] = True
    n_events = int(rng.integers(1, 4)) if kinds[0] else 0
    events = np.sort(rng.uniform(0.05, 0.95, n_events))
    steps = rng.standard_normal((n_events, 3))
    transient = rng.random(n_events) < 0.4  # a cough: a move and back
    poses = np.cumsum(steps, axis=0)
    for i in np.flatnonzero(transient):
        if i + 1 < n_events:
            poses[i + 1 :] -= steps[i]
    return MotionDraw(
        event_fractions=events,
        poses=poses.reshape(n_events, 3),
        periodic=bool(kinds[1]),
        period_fraction=float(rng.uniform(0.03, 0.25)),
        phase=float(rng.uniform(0, _TAU)),
        region=rng.uniform(0.2, 0.8, 2),
        region_width=float(rng.uniform(0.15, 0.5)),
        through=bool(kinds[2]),
        through_period_fraction=float(rng.uniform(0.05, 0.4)),
        through_phase=float(rng.uniform(0, _TAU)),
    )


def fft2(x: np.ndarray) -> np.ndarray:
    return sfft.fft2(np.asarray(x, np.complex64))


def ifft2(k: np.ndarray) -> np.ndarray:
    return sfft.ifft2(k)


def _ramp(n: int, shift_px: np.ndarray | float) -> np.ndarray:
    """exp(-2 pi i f d): a shift by ``shift_px`` along an axis of length n, per FFT bin."""
    f = np.fft.fftfreq(n).astype(np.float64)
    return np.exp(-1j * _TAU * np.multiply.outer(np.asarray(shift_px, np.float64), f))


def _posed(image: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Spectrum of the image after a rigid move: rotation by resampling, shifts as ramps."""
    dy, dx, rot = (float(v) for v in pose)
    moved = image
    if abs(rot) > 1e-3:
        moved = ndimage.rotate(image, rot, reshape=False, order=1, mode="constant")
    k = fft2(moved)
    return (k * _ramp(image.shape[0], dy)[:, None] * _ramp(image.shape[1], dx)[None, :]).astype(
        np.complex64
    )


def _region(shape: tuple[int, int], centre: np.ndarray, width: float) -> np.ndarray:
    """Smooth weight of the moving part (a soft Gaussian blob over a fraction of the image)."""
    y = np.linspace(0, 1, shape[0])[:, None]
    x = np.linspace(0, 1, shape[1])[None, :]
    r2 = (y - centre[0]) ** 2 + (x - centre[1]) ** 2
    return np.exp(-r2 / (2 * width**2)).astype(np.float32)


def _wave(t: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Breathing-like waveform in [0, 1] with a rest after expiration."""
    return ((0.5 - 0.5 * np.cos(_TAU * t / period + phase)) ** 2).astype(np.float64)


def motion_kspace(
    image: np.ndarray,
    amplitude: float,
    order: LineOrder,
    draw: MotionDraw,
    neighbour: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(moved, frozen) k-spaces of a 2-D slice, PE along axis 0, FFT layout.

    ``moved`` is what the scanner acquired during the drawn motion at ``amplitude`` (0: none,
    1: heavy); ``frozen`` holds every part where it was at the centre line's time, the image a
    reader takes the anatomy from (severity is the difference of the two).
    """
    img = np.asarray(image, np.float32)
    n_pe, n_ro = img.shape
    if order.n_pe != n_pe:
        raise ValueError(f"line order has {order.n_pe} PE lines, the image {n_pe} rows")
    clean = fft2(img)
    if amplitude <= 0:
        return clean, clean.copy()
    t = order.times()
    centre = 0  # FFT row 0 is ky = 0
    size = float(max(n_pe, n_ro))
    moved = np.zeros_like(clean)
    frozen = clean
    if len(draw.event_fractions):
        index = np.searchsorted(draw.event_fractions * order.duration_s, t, side="right")
        scale = amplitude * np.array([SHIFT_FRACTION * size, SHIFT_FRACTION * size, ROTATION_DEG])
        spectra = {}
        for p in np.unique(np.append(index, index[centre])):
            pose = np.zeros(3) if p == 0 else draw.poses[p - 1] * scale
            spectra[p] = clean if p == 0 else _posed(img, pose)
            rows = index == p
            moved[rows] = spectra[p][rows]
        frozen = spectra[index[centre]]
    else:
        moved = clean.copy()
    if draw.periodic:
        part = fft2(img * _region(img.shape, draw.region, draw.region_width))
        d = amplitude * PERIODIC_FRACTION * size
        disp = d * _wave(t, draw.period_fraction * order.duration_s, draw.phase)
        ky_ramp = np.exp(-1j * _TAU * np.fft.fftfreq(n_pe) * disp)  # one shift per row
        moved = moved + part * (ky_ramp - 1)[:, None]
        frozen = frozen + part * (_ramp(n_pe, disp[centre]) - 1)[:, None]
    if draw.through and neighbour is not None:
        other = fft2(np.asarray(neighbour, np.float32)) - clean
        w = (
            amplitude
            * THROUGH_PLANE
            * _wave(t, draw.through_period_fraction * order.duration_s, draw.through_phase)
        )
        moved = moved + other * w[:, None]
        frozen = frozen + other * w[centre]
    return moved.astype(np.complex64), np.asarray(frozen, np.complex64)
