"""Motion artefacts made where they arise: in k-space, line by line, at acquisition time.

A 2-D fast-spin-echo (FSE) slice is acquired in shots: every TR one excitation is followed by an
echo train of ETL echoes, each echo one phase-encoding (PE) line. With the usual segmented
ordering k-space is cut into ETL segments and shot ``s`` fills line ``s`` of every segment, so
the line index modulo the number of shots says *when* a line was acquired. Whatever the body was
doing at that time is frozen into that line:

* breathing (periodic, irregular): the anterior wall moves along the PE direction by the
  displacement of the breathing phase at the line's time; the abdominal contents move less in
  plane but slide through the slice (mixed with the slice above). Because the displacement is a
  (quasi-)periodic function of the line index, the image gets ghosts along the PE axis, spaced by
  FOV / shots, the familiar FSE respiratory ghosting;
* bulk motion of the kind TorchIO's ``RandomMotion`` makes (Shaw et al. 2019): at a few random
  times the body takes a different rigid pose; k-space is assembled from the spectra of the
  differently translated/rotated copies, each contributing the lines acquired while it held.

Averages (NEX) acquire every line several times at different breathing phases; their mean is
what is reconstructed, which is why averaging softens ghosts. Translations are exact phase ramps;
only rotations resample the image (Pillow, bilinear). All FFTs run on complex64 with NumPy's
unitary ("ortho") scaling: the node runs this without SciPy, and NumPy's unscaled forward
transform measured several times slower than its scaled one.

The true severity of a slice is measured, not assumed: the relative image-domain error between
the motion-corrupted reconstruction and a steady one (every part held at its mean position, see
``steady``; same k-space window, no noise), mapped to [0, 1] by ``severity_from_error``. A body
that merely lay a millimetre further forward is not an artefact; ghosts and smearing are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

__all__ = [
    "Acquisition",
    "Breathing",
    "BulkMotion",
    "SliceMotion",
    "apply_motion",
    "motion_kspace",
    "severity_from_error",
    "steady",
]

# Relative image error at which severity reaches 1 - 1/e; chosen so that the severities of the
# default data set spread over [0, 1] instead of crowding at one end.
ERROR_SCALE = 0.195
_TAU = np.float32(2.0 * np.pi)


def severity_from_error(error: float | np.ndarray) -> float | np.ndarray:
    """Monotone map from relative image error ||motion - clean|| / ||clean|| to [0, 1)."""
    return 1.0 - np.exp(-np.asarray(error, dtype=np.float64) / ERROR_SCALE)


@dataclass(frozen=True)
class Acquisition:
    """2-D FSE acquisition of one slice on a ``size`` x ``size`` reconstruction grid.

    ``n_pe`` x ``n_ro`` is the acquired matrix; the reconstruction zero-fills it to ``size``
    (as scanners interpolate to 512), which gives the slight blur and Gibbs ringing of real
    images. Row ``r`` of the FFT layout (PE along axis 0) holds line ky = fftfreq(size)[r] * size.
    """

    size: int
    n_pe: int
    n_ro: int
    etl: int = 16
    tr_s: float = 4.0
    esp_s: float = 0.01
    nex: int = 1

    @property
    def shots(self) -> int:
        return -(-self.n_pe // self.etl)

    def lines(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per FFT row: (acquired, shot index, echo index)."""
        ky = np.rint(np.fft.fftfreq(self.size) * self.size).astype(np.int64)
        order = ky + self.n_pe // 2
        acquired = (order >= 0) & (order < self.n_pe)
        order = np.where(acquired, order, 0)
        return acquired, order % self.shots, order // self.shots

    def times(self, start_s: float) -> np.ndarray:
        """(nex, size) acquisition time of every line of every average (NaN: not acquired)."""
        acquired, shot, echo = self.lines()
        avg = np.arange(self.nex)[:, None]
        t = start_s + (avg * self.shots + shot[None, :]) * self.tr_s + echo[None, :] * self.esp_s
        return np.where(acquired[None, :], t, np.nan)

    def window(self) -> tuple[np.ndarray, np.ndarray]:
        """Separable k-space weights (PE rows, RO columns): the acquired band with a narrow
        raised-cosine taper at its edges (scanners filter a little; a hard cut rings more)."""

        def band(n_acq: int) -> np.ndarray:
            k = np.abs(np.fft.fftfreq(self.size) * self.size)
            half = n_acq / 2.0
            taper = max(2.0, 0.08 * half)
            w = np.clip((half - k) / taper, 0.0, 1.0)
            return (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)

        return band(self.n_pe), band(self.n_ro)


@dataclass(frozen=True)
class Breathing:
    """A free-breathing trace: time grid (s) and displacement 0 (expiration) .. ~1 (inspiration).

    Quasi-periodic with cycle-to-cycle jitter of period and depth and an end-expiratory
    plateau (people rest after breathing out), which is what shapes the ghost pattern.
    """

    t: np.ndarray
    d: np.ndarray

    @classmethod
    def draw(
        cls, duration_s: float, rng: np.random.Generator, period_s: float, irregularity: float
    ) -> Breathing:
        dt = 0.05
        t = np.arange(0.0, duration_s + 10.0, dt)
        n_cycles = int(t[-1] / period_s) + 3
        periods = period_s * np.exp(irregularity * 0.5 * rng.standard_normal(n_cycles))
        depths = np.exp(irregularity * rng.standard_normal(n_cycles))
        edges = np.concatenate([[0.0], np.cumsum(periods)]) - rng.uniform(0.0, period_s)
        k = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, n_cycles - 1)
        phase = (t - edges[k]) / periods[k]
        plateau = rng.uniform(1.5, 3.0)
        d = (0.5 - 0.5 * np.cos(2.0 * np.pi * phase)) ** plateau * depths[k]
        return cls(t.astype(np.float64), d.astype(np.float32))

    def at(self, times: np.ndarray) -> np.ndarray:
        out = np.interp(np.nan_to_num(times, nan=0.0), self.t, self.d).astype(np.float32)
        return np.where(np.isnan(times), 0.0, out).astype(np.float32)


@dataclass(frozen=True)
class BulkMotion:
    """Piecewise-constant rigid poses: ``poses[i]`` = (dy px, dx px, rotation deg) from
    ``starts[i]`` (s) on; pose 0 (identity) holds before the first start. A transient event
    (a cough, a shift and back) is two starts, the second returning to the earlier pose."""

    starts: tuple[float, ...] = ()
    poses: tuple[tuple[float, float, float], ...] = ()

    @classmethod
    def draw(
        cls,
        duration_s: float,
        rng: np.random.Generator,
        events: int,
        shift_px: float,
        rot_deg: float,
    ) -> BulkMotion:
        starts: list[float] = []
        poses: list[tuple[float, float, float]] = []
        current = (0.0, 0.0, 0.0)
        for t0 in np.sort(rng.uniform(0.0, duration_s, events)):
            new = (
                current[0] + shift_px * rng.standard_normal(),
                current[1] + shift_px * rng.standard_normal(),
                current[2] + rot_deg * rng.standard_normal(),
            )
            starts.append(float(t0))
            poses.append(new)
            if rng.random() < 0.5:  # transient: back to where it was after a few seconds
                starts.append(float(t0 + rng.uniform(1.0, 8.0)))
                poses.append(current)
            else:
                current = new
        order = np.argsort(starts, kind="stable")
        return cls(tuple(starts[i] for i in order), tuple(poses[i] for i in order))

    def index(self, times: np.ndarray) -> np.ndarray:
        """Pose index per time (0: identity, i + 1: poses[i])."""
        if not self.starts:
            return np.zeros(times.shape, np.int64)
        return np.searchsorted(np.asarray(self.starts), np.nan_to_num(times), side="right")

    def pose(self, i: int) -> tuple[float, float, float]:
        return (0.0, 0.0, 0.0) if i == 0 else self.poses[i - 1]


@dataclass
class SliceMotion:
    """Everything that moves during one slice's acquisition, per line and average."""

    wall_px: np.ndarray  # (nex, size) PE displacement of the anterior wall band (px)
    cav_px: np.ndarray  # (nex, size) PE displacement of the cavity band (px)
    through: np.ndarray  # (nex, size) fraction of the slice above slid into the slice (0..1)
    pose: np.ndarray  # (nex, size) bulk pose index
    bulk: BulkMotion = field(default_factory=BulkMotion)


def steady(motion: SliceMotion, row_weight: np.ndarray) -> SliceMotion:
    """The same motion without its line-to-line variation: every band held at its mean
    position (and mean through-plane mix), the body in its dominant bulk pose.

    A reconstruction of this is what the slice would look like had the body merely been
    somewhere else, sharp and ghost-free; the difference from it is the artefact a reader
    sees, so severity is measured against it rather than against the clean image.
    ``row_weight`` (size,) weighs the phase-encoding lines (0 for lines not acquired).
    """
    w = np.broadcast_to(np.asarray(row_weight, np.float64)[None, :], motion.pose.shape)
    w = w / max(float(w.sum()), 1e-12)

    def flat(a: np.ndarray) -> np.ndarray:
        return np.full_like(a, float((a * w).sum()))

    values = np.unique(motion.pose)
    counts = [float(w[motion.pose == v].sum()) for v in values]
    return SliceMotion(
        wall_px=flat(motion.wall_px),
        cav_px=flat(motion.cav_px),
        through=flat(motion.through),
        pose=np.full_like(motion.pose, values[np.argmax(counts)]),
        bulk=motion.bulk,
    )


def fft2(x: np.ndarray) -> np.ndarray:
    """Unitary 2-D FFT (complex64); with ``ifft2`` an exact inverse pair."""
    return np.fft.fft2(np.asarray(x, np.complex64), norm="ortho").astype(np.complex64, copy=False)


def ifft2(x: np.ndarray) -> np.ndarray:
    return np.fft.ifft2(x, norm="ortho").astype(np.complex64, copy=False)


def _line_mean(phase_px: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Mean over averages of weight * exp(-2 pi i ky d) per FFT row, as a (size, 1) column."""
    size = phase_px.shape[1]
    ky = np.fft.fftfreq(size).astype(np.float32)[None, :]
    ph = -_TAU * ky * phase_px
    out = np.cos(ph) + 1j * np.sin(ph)
    if weight is not None:
        out = out * weight
    return out.mean(axis=0).astype(np.complex64)[:, None]


def _posed(spectrum: np.ndarray, image: np.ndarray, pose: tuple[float, float, float]) -> np.ndarray:
    """Spectrum of the image after a rigid move: rotation by resampling, shifts as ramps."""
    dy, dx, rot = pose
    if abs(rot) > 1e-3:
        pic = Image.fromarray(np.ascontiguousarray(image, np.float32))  # mode "F"
        spectrum = fft2(np.asarray(pic.rotate(rot, resample=Image.Resampling.BILINEAR)))
    f = np.fft.fftfreq(image.shape[0]).astype(np.float32)
    ry = np.exp(-1j * _TAU * f * np.float32(dy)).astype(np.complex64)
    rx = np.exp(-1j * _TAU * f * np.float32(dx)).astype(np.complex64)
    return spectrum * ry[:, None] * rx[None, :]


def motion_kspace(
    clean: np.ndarray,
    clean_k: np.ndarray,
    motion: SliceMotion,
    wall_k: np.ndarray | None = None,
    cav_k: np.ndarray | None = None,
    cav_above_k: np.ndarray | None = None,
) -> np.ndarray:
    """Full k-space (FFT layout, PE along axis 0) of a slice acquired during ``motion``.

    ``clean_k`` is fft2(clean); ``wall_k``/``cav_k`` are the spectra of the moving parts (clean
    times soft weights) of the anterior wall and of the abdominal cavity, ``cav_above_k`` that of
    the cavity band of the slice above (through-plane motion). By linearity each band only adds
    its difference from the static image, so the static remainder costs nothing.
    """
    poses = np.unique(motion.pose)
    if len(poses) == 1 and poses[0] == 0:
        k = clean_k.copy()
    else:
        k = np.zeros_like(clean_k)
        for p in poses:
            w = (motion.pose == p).mean(axis=0).astype(np.float32)[:, None]
            spec = clean_k if p == 0 else _posed(clean_k, clean, motion.bulk.pose(int(p)))
            k += spec * w
    if wall_k is not None and np.any(motion.wall_px):
        k += wall_k * (_line_mean(motion.wall_px) - 1)
    if cav_k is not None and (np.any(motion.cav_px) or np.any(motion.through)):
        k += cav_k * (_line_mean(motion.cav_px, 1.0 - motion.through) - 1)
        if cav_above_k is not None and np.any(motion.through):
            k += cav_above_k * _line_mean(motion.cav_px, motion.through)
    return k


def anterior_weight(image: np.ndarray) -> np.ndarray:
    """(size, 1) weight along the PE axis: 1 over the anterior part of the object, fading to 0
    behind its middle (the front of the abdomen moves with breathing, the back rests on the
    table). Derived from the object's extent, so it works on any image."""
    profile = image.sum(axis=1)
    rows = np.flatnonzero(profile > 0.05 * profile.max()) if profile.max() > 0 else []
    size = image.shape[0]
    top, bottom = (rows[0], rows[-1]) if len(rows) else (0, size - 1)
    mid = top + 0.45 * (bottom - top)
    width = max(0.12 * (bottom - top), 1.0)
    y = np.arange(size, dtype=np.float32)
    return (1.0 / (1.0 + np.exp((y - mid) / width))).astype(np.float32)[:, None]


def apply_motion(
    image: np.ndarray, severity: float, rng: np.random.Generator, pe_axis: int = 0
) -> np.ndarray:
    """2-D float image -> the same image with k-space motion of the given severity (0..1).

    Breathing (ghosts of the anterior part along ``pe_axis``) with a peak displacement of up to
    ~5 % of the field of view at severity 1, plus a bulk rigid shift/rotation part-way through
    the acquisition growing with severity. Severity 0 returns the image unchanged (within float
    rounding). The output is the magnitude of the reconstruction, float32, same shape.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"apply_motion needs a 2-D image, got shape {img.shape}")
    severity = float(np.clip(severity, 0.0, 1.0))
    work = np.moveaxis(img, pe_axis, 0)
    h, w = work.shape
    size = max(h, w)
    pad = np.zeros((size, size), np.float32)
    pad[:h, :w] = work
    acq = Acquisition(
        size=size,
        n_pe=size,
        n_ro=size,
        etl=min(16, max(size // 8, 1)),
        tr_s=rng.uniform(3.0, 5.0),
        nex=1,
    )
    duration = acq.shots * acq.tr_s
    times = acq.times(0.0)
    trace = Breathing.draw(duration, rng, rng.uniform(3.5, 5.5), 0.2)
    amp = severity * 0.05 * size
    bulk = BulkMotion.draw(
        duration, rng, 1 if severity > 0 else 0, 0.012 * size * severity, 2.0 * severity
    )
    motion = SliceMotion(
        wall_px=-amp * trace.at(times),
        cav_px=np.zeros_like(times, dtype=np.float32),
        through=np.zeros_like(times, dtype=np.float32),
        pose=bulk.index(times),
        bulk=bulk,
    )
    clean_k = fft2(pad)
    wall_k = fft2(pad * anterior_weight(pad)) if severity > 0 else None
    k = motion_kspace(pad, clean_k, motion, wall_k)
    out = np.abs(ifft2(k)).astype(np.float32)[:h, :w]
    return np.ascontiguousarray(np.moveaxis(out, 0, pe_axis))
