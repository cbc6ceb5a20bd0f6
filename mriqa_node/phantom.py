"""Small, fast, deterministic MR-like axial abdomen series written as real DICOM.

Used by the demo scanner (``mriqa demo``), by tests and by benchmarks, so it must be cheap (a
30 x 512 x 512 series in well under a second or two on a small CPU), fully deterministic for a
given seed, and produce headers that real DICOM tooling accepts. It is deliberately simple:
anatomy is a handful of soft-edged ellipses on a T2 fast-spin-echo-like intensity scale.

Motion is simulated where it physically happens, in k-space: a respiratory-like displacement
of the moving (anterior) part of the body, varying from one phase-encoding line to the next,
becomes a per-line phase ramp. After the inverse FFT this gives the familiar ghosts replicated
along the phase-encoding direction (``InPlanePhaseEncodingDirection = COL``: vertical).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import DSfloat

__all__ = ["synth_series", "write_series"]

FOV_MM = 380.0
SLICE_THICKNESS_MM = 6.0
SLICE_GAP_MM = 1.0
BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
# Stored value of signal 1.0 (subcutaneous fat). A fixed scale, not a per-image max, so clean
# and moving series of one seed are directly comparable; the brightest fluid times the coil
# gain still fits in 12 bits.
SIGNAL_SCALE = 2300.0
NOISE_SIGMA = 0.012  # per channel, in signal units (fat SNR ~ 80)
# Peak respiratory displacement of the anterior wall at motion=1 (about 20 px at 512).
MAX_SHIFT_MM_AT_FULL_MOTION = 15.0
IMPLEMENTATION_VERSION = "MRIQA_PHANTOM_1"
_UID_TAG = "mriqa-node-phantom-v1"

# T2 FSE-like relative signal (fat bright, liver and muscle dark, fluid brightest).
_FAT = 1.0
_MUSCLE = 0.2
_LIVER = 0.3
_SPLEEN = 0.55
_KIDNEY_CORTEX = 0.55
_KIDNEY_MEDULLA = 0.75
_FLUID = 1.35
_MARROW = 0.55
_CORTICAL_BONE = 0.06
_FLOW_VOID = 0.04
_IVC = 0.18


# --------------------------------------------------------------------------------------------
# anatomy


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (float32, size x size) for texture.

    A small random grid upsampled with a separable Gaussian kernel: two small matrix products
    instead of a large convolution, so texture costs next to nothing.
    """
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    centres = (np.arange(cells, dtype=np.float32) + 0.5) / cells
    pos = (np.arange(size, dtype=np.float32) + 0.5) / size
    width = 0.75 / cells
    weights = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) / width) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    field = weights @ grid @ weights.T
    field -= field.mean()
    field /= field.std() + 1e-6
    return field.astype(np.float32)


class _Painter:
    """Paints soft-edged (anti-aliased, partial-volume-like) ellipses into a slice stack.

    Parameters are per-slice arrays, so one numpy expression paints a structure into every
    slice at once, restricted to the union bounding box of that structure.
    """

    def __init__(self, n: int, size: int) -> None:
        self.n = n
        self.size = size
        self.coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.edge = np.float32(2.4 / size)  # ~1.2 px transition
        self.img = np.zeros((n, size, size), dtype=np.float32)

    def mask(
        self,
        cx: np.ndarray,
        cy: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        theta: np.ndarray | float = 0.0,
    ) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Coverage (0..1) of an ellipse per slice within its bounding box, and that box."""
        n = self.n
        cx, cy, a, b = (np.broadcast_to(np.asarray(v, np.float32), (n,)) for v in (cx, cy, a, b))
        th = np.broadcast_to(np.asarray(theta, np.float32), (n,))
        present = (a > 1e-3) & (b > 1e-3)
        if not present.any():
            return np.zeros((n, 0, 0), np.float32), (slice(0, 0), slice(0, 0))
        reach = np.maximum(a, b)[present] + 2 * self.edge
        x0, x1 = float((cx[present] - reach).min()), float((cx[present] + reach).max())
        y0, y1 = float((cy[present] - reach).min()), float((cy[present] + reach).max())
        size = self.size
        c0 = int(np.clip(np.floor((x0 + 1) / 2 * size), 0, size))
        c1 = int(np.clip(np.ceil((x1 + 1) / 2 * size), 0, size))
        r0 = int(np.clip(np.floor((y0 + 1) / 2 * size), 0, size))
        r1 = int(np.clip(np.ceil((y1 + 1) / 2 * size), 0, size))
        xs = self.coords[c0:c1][None, None, :] - cx[:, None, None]
        ys = self.coords[r0:r1][None, :, None] - cy[:, None, None]
        # Quadratic form q = (u/a)^2 + (v/b)^2 of the rotated ellipse, expanded so that only
        # the cross term and the sums touch full 3-D arrays (this is the hot loop).
        cos, sin = np.cos(th), np.sin(th)
        ia2 = 1.0 / np.maximum(a, 1e-3) ** 2
        ib2 = 1.0 / np.maximum(b, 1e-3) ** 2
        qa = (cos * cos * ia2 + sin * sin * ib2)[:, None, None]
        qb = (sin * sin * ia2 + cos * cos * ib2)[:, None, None]
        q = (xs * xs * qa) + (ys * ys * qb)
        if np.any(th):
            qc = (2.0 * cos * sin * (ia2 - ib2))[:, None, None]
            q += (xs * qc) * ys
        # Soft edge ~1 px wide: near the boundary (1 - q) / 2 ~ (1 - r), times the
        # geometric-mean radius gives the signed distance; clipping makes it a coverage.
        half_scale = (0.5 * np.sqrt(np.maximum(a, 1e-3) * np.maximum(b, 1e-3)) / self.edge)[
            :, None, None
        ]
        q -= 1.0
        q *= -half_scale
        q += 0.5
        m = np.clip(q, 0.0, 1.0, out=q)
        if not present.all():
            m *= present[:, None, None]
        return m.astype(np.float32, copy=False), (slice(r0, r1), slice(c0, c1))

    def composite(
        self,
        under: np.ndarray,
        cx: np.ndarray | float,
        cy: np.ndarray | float,
        a: np.ndarray | float,
        b: np.ndarray | float,
    ) -> None:
        """Keep what was painted only inside an ellipse; elsewhere restore ``under``.

        Lets organs be drawn generously and then be clipped by the body cavity.
        """
        m, (rs, cs) = self.mask(cx, cy, a, b)
        sub = under[:, rs, cs]
        sub += m * (self.img[:, rs, cs] - sub)
        self.img = under

    def paint(
        self,
        value: float | np.ndarray,
        cx: np.ndarray | float,
        cy: np.ndarray | float,
        a: np.ndarray | float,
        b: np.ndarray | float,
        theta: np.ndarray | float = 0.0,
    ) -> None:
        """Lay a structure of signal ``value`` (scalar or full-size map) over what is there."""
        m, (rs, cs) = self.mask(cx, cy, a, b, theta)
        if m.size == 0:
            return
        sub = self.img[:, rs, cs]
        if isinstance(value, np.ndarray):
            val = value[..., rs, cs]
            sub += m * (val - sub)
        else:
            sub += m * (np.float32(value) - sub)


def _bump(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smooth 0..1..0 presence profile over the slab fraction ``z`` (organ coverage in z)."""
    t = np.clip((z - lo) / (hi - lo), 0.0, 1.0)
    return np.sqrt(np.clip(np.sin(np.pi * t), 0.0, 1.0))


def _anatomy(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Clean magnitude images (signal units) and the body mask, both (n, size, size).

    Coordinates are normalised to [-1, 1] over the FOV, x to the image right (patient left),
    y downwards (posterior). ``z`` runs 0 (inferior, first instance) .. 1 (superior). Sizes
    and positions are smooth functions of ``z`` plus per-seed offsets, so neighbouring slices
    look like neighbouring slices.
    """
    z = np.linspace(0.0, 1.0, n, dtype=np.float32) if n > 1 else np.full(1, 0.5, np.float32)
    jit = rng.uniform(-1.0, 1.0, size=40).astype(np.float32)  # per-seed anatomy variation
    wob = rng.uniform(0.0, 2 * np.pi, size=8).astype(np.float32)  # slow in-z wobble phases

    def wobble(k: int, amp: float, freq: float = 1.3) -> np.ndarray:
        return np.float32(amp) * np.sin(np.float32(2 * np.pi * freq) * z + wob[k])

    p = _Painter(n, size)

    # Texture maps: smooth random fields, blended along z so texture changes smoothly.
    tex_rng = np.random.default_rng(rng.integers(1 << 63))
    coarse = [_smooth_field(tex_rng, size, 14) for _ in range(2)]
    medium = [_smooth_field(tex_rng, size, 34) for _ in range(2)]
    fine = _smooth_field(tex_rng, size, 64)
    ang = (z * np.float32(1.6) + np.float32(jit[0]))[:, None, None]
    cos, sin = np.cos(ang), np.sin(ang)
    bowel = 0.6 * (cos * coarse[0] + sin * coarse[1]) + 0.8 * (cos * medium[0] + sin * medium[1])

    # Body outline (skin): wider than deep, a little bigger in the upper abdomen.
    bx = np.float32(0.78 + 0.03 * jit[1]) + wobble(0, 0.012) + 0.03 * z
    by = np.float32(0.52 + 0.03 * jit[2]) + wobble(1, 0.01) + 0.02 * z
    bcy = np.float32(0.04 + 0.02 * jit[3])
    p.paint((_FAT * (1.0 + 0.03 * fine)).astype(np.float32), 0.0, bcy, bx, by)
    body = p.img > 0.5

    # Abdominal wall muscle (thicker laterally), under a subcutaneous fat layer.
    fat_x = np.float32(0.095 + 0.025 * jit[4])
    fat_y = np.float32(0.075 + 0.02 * jit[5])
    wx, wy, wcy = bx - fat_x, by - fat_y, bcy + 0.01
    p.paint(_MUSCLE, 0.0, wcy, wx, wy)
    cx_, cy_ = wx - 0.04, wy - 0.028  # peritoneal cavity, inside the muscle wall
    outer = p.img.copy()

    # Intraperitoneal content: mesenteric fat mottled with bowel, then the organs.
    visceral = (0.55 + 0.38 * np.tanh(1.8 * (bowel - 0.15)) + 0.04 * fine).astype(np.float32)
    p.paint(visceral, 0.0, wcy, cx_, cy_)
    sp_y = bcy + np.float32(0.17 + 0.02 * jit[6])  # vertebral body centre

    # Liver (patient right = image left): big in the upper slices, tapering inferiorly;
    # clipped by the cavity so its lateral edge follows the body wall.
    liver = _bump(z, -0.45, 1.3)
    liver_map = (_LIVER * (1.0 + 0.05 * fine)).astype(np.float32)
    lcx = np.float32(-0.36 + 0.03 * jit[7]) + wobble(2, 0.01)
    la = (0.42 + 0.03 * jit[8]) * liver
    p.paint(liver_map, lcx, -0.04 + 0.04 * (1 - z), la, 0.4 * liver, 0.3)
    p.paint(liver_map, lcx + 0.28, -0.2, 0.22 * liver * z, 0.14 * liver * z, -0.35)  # left lobe
    for k, (vx, vy) in enumerate(((-0.4, -0.12), (-0.27, 0.04), (-0.5, 0.06), (-0.2, -0.2))):
        r = 0.016 * liver * (z > 0.3)  # hepatic / portal vessels: flow voids
        p.paint(_FLOW_VOID * 2, vx + 0.02 * jit[9 + k], vy, r, r * 1.2, 0.0)
    cyst = 0.04 * _bump(z, 0.45 + 0.1 * jit[13], 0.8 + 0.1 * jit[13])
    p.paint(_FLUID * 1.05, -0.47 + 0.04 * jit[14], -0.14, cyst, cyst)

    # Gallbladder: bright fluid under the liver in the mid slices.
    gb = _bump(z, 0.2, 0.6 + 0.1 * jit[15])
    p.paint(_FLUID, -0.14 + 0.03 * jit[16], 0.0, 0.075 * gb, 0.045 * gb, 0.6)

    # Spleen (posterior, image right), upper slices.
    spl = _bump(z, 0.4, 1.3)
    p.paint(_SPLEEN, 0.5 + 0.03 * jit[17], 0.12, 0.14 * spl, 0.24 * spl, -0.5)

    # Stomach: wall and fluid content (anterior, image right), upper slices.
    st = _bump(z, 0.5, 1.25)
    scx = 0.28 + 0.03 * jit[18]
    p.paint(_MUSCLE * 1.6, scx, -0.2, 0.21 * st, 0.13 * st, -0.25)
    p.paint(_FLUID * 0.92, scx, -0.19, 0.175 * st, 0.1 * st, -0.25)

    # A few fluid-filled bowel loops (bright blobs), mostly in the lower slices.
    for k in range(4):
        pres = _bump(z, -0.3 + 0.15 * k + 0.05 * jit[19 + k], 0.55 + 0.12 * k)
        bx_k = -0.3 + 0.2 * k + 0.05 * jit[23 + k] + wobble(3 + k % 4, 0.03, 0.8)
        by_k = -0.25 + 0.12 * (k % 2) + 0.03 * jit[27 + k]
        p.paint(_FLUID * (0.85 + 0.05 * k), bx_k, by_k, 0.055 * pres, 0.035 * pres, 0.4 * k)

    # Retroperitoneum: kidneys (cortex, brighter medulla, bright pelvis), psoas, vessels.
    for side, k in ((-1.0, 0), (1.0, 1)):
        pres = _bump(z, 0.0 + 0.06 * k + 0.05 * jit[31 + k], 0.72 + 0.06 * k)
        kx = side * (0.32 + 0.02 * jit[33 + k])
        ky = sp_y + 0.03
        th = side * -0.55
        p.paint(_FAT * 0.9, kx, ky, 0.13 * pres, 0.17 * pres, th)  # perirenal fat
        p.paint(_KIDNEY_CORTEX, kx, ky, 0.1 * pres, 0.14 * pres, th)
        p.paint(_KIDNEY_MEDULLA, kx, ky, 0.065 * pres, 0.1 * pres, th)
        p.paint(_FLUID * 0.9, kx - side * 0.035, ky - 0.01, 0.028 * pres, 0.04 * pres, th)
        psoas = 0.035 + 0.045 * (1 - z)
        p.paint(_MUSCLE, side * 0.15, sp_y + 0.01, psoas, 0.06 + 0.01 * (1 - z), side * 0.3)
    p.paint(_FLOW_VOID, 0.05, sp_y - 0.14, 0.034, 0.034)  # aorta
    p.paint(_IVC, -0.1, sp_y - 0.14, 0.048, 0.032, 0.2)
    p.composite(outer, 0.0, wcy, cx_, cy_)

    # Posterior wall: paraspinal muscles and quadratus lumborum, over the cavity edge.
    for side in (-1.0, 1.0):
        p.paint(_MUSCLE * 1.1, side * 0.13, sp_y + 0.21, 0.11, 0.12, side * 0.15)
        p.paint(_MUSCLE, side * 0.29, sp_y + 0.15, 0.075, 0.045, side * -0.5)
    # Vertebra: dark cortex, fatty marrow, posterior arch and spinous process, CSF canal.
    marrow = (_MARROW * (1.0 + 0.07 * fine)).astype(np.float32)
    p.paint(_CORTICAL_BONE, 0.0, sp_y, 0.1, 0.085)
    p.paint(marrow, 0.0, sp_y, 0.088, 0.073)
    p.paint(_CORTICAL_BONE, 0.0, sp_y + 0.14, 0.075, 0.05)
    p.paint(_CORTICAL_BONE, 0.0, sp_y + 0.25, 0.018, 0.07)
    p.paint(_FLUID, 0.0, sp_y + 0.125, 0.034, 0.028)
    return p.img, body


def _coil_field(size: int, body_cy: float = 0.04) -> np.ndarray:
    """Smooth multiplicative receive-coil shading: brighter near anterior/posterior arrays."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    x, y = c[None, :], c[:, None]
    near = np.exp(-(((y - body_cy + 0.6) / 0.35) ** 2)) + 0.8 * np.exp(
        -(((y - body_cy - 0.6) / 0.35) ** 2)
    )
    lateral = 0.12 * np.exp(-((np.abs(x) - 0.8) ** 2) / 0.05)
    field = 0.78 + 0.32 * near + lateral
    return (field / field.max() * 1.15).astype(np.float32)


# --------------------------------------------------------------------------------------------
# motion


def _respiratory_displacement(n_slices: int, n_lines: int, rng: np.random.Generator) -> np.ndarray:
    """Per-slice, per-phase-encoding-line displacement in [0, 1] (fraction of the amplitude).

    Breathing modelled as a quasi-periodic waveform with an end-expiration plateau: roughly
    half of the lines are acquired at rest (displacement 0), the others during inspiration.
    The cycle length is given in phase-encoding lines (a few per shot train), so the ghost
    spacing is size / period pixels, as on a real scanner.
    """
    t = np.arange(n_lines, dtype=np.float32)[None, :]
    period = rng.uniform(7.0, 14.0, size=(n_slices, 1)).astype(np.float32)
    phase = rng.uniform(0.0, 2 * np.pi, size=(n_slices, 1)).astype(np.float32)
    # Slight cycle-to-cycle variation of rate and depth, as in free breathing.
    drift = 0.02 * np.sin(2 * np.pi * t / (period * 5.3) + phase)
    cyc = np.sin(2 * np.pi * t / period * (1 + drift) + phase)
    depth = 1.0 + 0.15 * np.sin(2 * np.pi * t / (period * 3.7) - phase)
    wave = np.clip(cyc, 0.0, None) ** 1.5 * depth
    return (wave / wave.max(axis=1, keepdims=True)).astype(np.float32)


def _apply_motion(
    clean: np.ndarray, motion: float, body_cy: float, rng: np.random.Generator
) -> np.ndarray:
    """Complex images after k-space motion corruption (batch FFT over all slices).

    Only the moving part of the body (weighted from the anterior wall, most mobile, to the
    spine, nearly still) is displaced; the static remainder is added back unchanged, which is
    exact by linearity of the Fourier transform. The displacement of each phase-encoding line
    (a row of k-space along axis -2, since phase encoding is along columns) becomes a phase
    ramp; an additional small left-right translation rides along with the breathing.
    """
    n, size, _ = clean.shape
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    # 1 at the anterior body wall, ~0.25 at the spine, smooth.
    w = 0.25 + 0.75 / (1.0 + np.exp((c - (body_cy - 0.05)) / 0.12))
    w = w.astype(np.float32)[None, :, None]
    moving = clean * w
    static = clean - moving

    disp = _respiratory_displacement(n, size, rng)  # (n, ky)
    max_px = MAX_SHIFT_MM_AT_FULL_MOTION / (FOV_MM / size)
    amp = np.float32(max_px * motion) * rng.uniform(0.85, 1.15, size=(n, 1))
    dy = disp * amp.astype(np.float32)  # pixels, along the phase-encoding (vertical) axis
    dx = dy * np.float32(0.12) * rng.choice([-1.0, 1.0], size=(n, 1)).astype(np.float32)

    k = np.fft.fftfreq(size).astype(np.float32)  # cycles/pixel, in FFT order
    # k-space row i (axis -2) is phase-encoding line ky = k[i]; the line acquired i-th in
    # time is the i-th from the k-space edge (sequential ordering).
    order = np.argsort(np.argsort(k))
    dy_line = dy[:, order]  # displacement of the line stored at each FFT row
    dx_line = dx[:, order]
    # Phase of the combined translation per (slice, ky, kx); cos/sin in float32 is several
    # times cheaper than a complex exp over the whole stack.
    phase = dx_line[:, :, None] * k[None, None, :]
    phase += k[None, :, None] * dy_line[:, :, None]
    phase *= np.float32(-2.0 * np.pi)
    kspace = np.fft.fft2(moving, axes=(-2, -1))
    ramp = np.empty_like(kspace)
    np.cos(phase, out=ramp.real)
    np.sin(phase, out=ramp.imag)
    kspace *= ramp
    del ramp, phase
    out = np.fft.ifft2(kspace, axes=(-2, -1))
    out += static
    return out.astype(np.complex64, copy=False)


# --------------------------------------------------------------------------------------------
# DICOM


def _ds(value: float) -> DSfloat:
    """Decimal String that always fits the 16-character limit."""
    return DSfloat(float(value), auto_format=True)


def _key(text: str) -> int:
    """Stable integer from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _study_datetime(study_uid: str) -> _dt.datetime:
    """Deterministic, plausible study date/time (no wall clock: files must be stable).

    Derived from the study UID so that every series of a reused study agrees on it.
    """
    k = _key(study_uid)
    base = _dt.datetime(2024, 1, 8, 8, 0, 0)
    return base + _dt.timedelta(days=k % 365, minutes=(k >> 16) % 540)


def synth_series(
    n_slices: int = 30,
    size: int = 512,
    motion: float = 0.0,
    seed: int = 0,
    announce_count: bool = True,
    series_description: str = "T2 FSE AX ABDOMEN",
    study_uid: str | None = None,
    patient_id: str = "DEMO0001",
    series_number: int = 1,
) -> list[pydicom.Dataset]:
    """Datasets with file_meta set (Explicit VR Little Endian), ready to save or send.

    ``motion`` (0 clean .. 1 severe) scales the respiratory displacement (about 20 px at 1)
    that is applied in k-space; 0 gives an image free of any ghosting. The same arguments
    always give identical pixels and UIDs; anatomy and noise depend on ``seed`` only, so
    series differing only in ``motion`` differ only by the motion artefact.
    """
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32")
    if not 0.0 <= motion <= 1.0:
        raise ValueError("motion must be within [0, 1]")

    root = np.random.SeedSequence([abs(seed), int(seed < 0), 0x4D524951])
    anat_ss, noise_ss, motion_ss = root.spawn(3)
    clean, body = _anatomy(n_slices, size, np.random.default_rng(anat_ss))
    body_cy = 0.04  # body centre used for coil and motion weighting (anatomy jitter is small)
    clean *= _coil_field(size, body_cy)[None]

    # Rician magnitude: |signal + complex Gaussian noise|, computed in place (large arrays).
    noise = np.random.default_rng(noise_ss).standard_normal((2, *clean.shape), dtype=np.float32)
    noise *= np.float32(NOISE_SIGMA)
    re, im = noise[0], noise[1]
    if motion > 0.0:
        cplx = _apply_motion(clean, motion, body_cy, np.random.default_rng(motion_ss))
        re += cplx.real
        im += cplx.imag
        del cplx
    else:
        re += clean
    del clean
    np.square(re, out=re)
    np.square(im, out=im)
    re += im
    mag = np.sqrt(re, out=re)
    mag *= np.float32(SIGNAL_SCALE)
    np.rint(mag, out=mag)
    pixels = np.clip(mag, 0, MAX_VALUE, out=mag).astype(np.uint16)

    # Display window from the body signal (robust percentiles), shared by the series.
    sample = pixels[:, ::4, ::4][body[:, ::4, ::4]]
    lo, hi = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, MAX_VALUE)
    center, width = round(float(lo + hi) / 2), max(round(float(hi - lo)), 2)

    if study_uid is None:
        study_uid = generate_uid(entropy_srcs=[_UID_TAG, "study", str(seed), patient_id])
    # Study- and patient-level attributes come from the study UID and patient ID, not the
    # seed, so several series sent into one study (or for one patient) stay consistent.
    when = _study_datetime(study_uid)
    accession = f"DEMO{_key(study_uid) % 10**8:08d}"
    pkey = _key(patient_id)
    birth = _dt.date(1940 + pkey % 50, 1 + (pkey >> 8) % 12, 1 + (pkey >> 16) % 28)
    age = when.year - birth.year - ((when.month, when.day) < (birth.month, birth.day))
    series_uid = generate_uid(
        entropy_srcs=[
            _UID_TAG,
            "series",
            study_uid,
            str(seed),
            str(series_number),
            series_description,
            repr(float(motion)),
            str(n_slices),
            str(size),
            str(announce_count),
        ]
    )
    for_uid = generate_uid(entropy_srcs=[_UID_TAG, "frame-of-reference", study_uid])
    series_time = when + _dt.timedelta(minutes=4 * series_number)

    pixel_mm = FOV_MM / size
    step = SLICE_THICKNESS_MM + SLICE_GAP_MM
    z0 = -step * (n_slices - 1) / 2.0
    xy0 = -FOV_MM / 2.0 + pixel_mm / 2.0

    datasets: list[pydicom.Dataset] = []
    for i in range(n_slices):
        sop_uid = generate_uid(entropy_srcs=[_UID_TAG, "instance", series_uid, str(i + 1)])
        acq_time = series_time + _dt.timedelta(seconds=i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = IMPLEMENTATION_VERSION

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceCreationDate = when.strftime("%Y%m%d")
        ds.InstanceCreationTime = series_time.strftime("%H%M%S")
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = when.strftime("%Y%m%d")
        ds.SeriesDate = series_time.strftime("%Y%m%d")
        ds.AcquisitionDate = acq_time.strftime("%Y%m%d")
        ds.ContentDate = acq_time.strftime("%Y%m%d")
        ds.StudyTime = when.strftime("%H%M%S")
        ds.SeriesTime = series_time.strftime("%H%M%S")
        ds.AcquisitionTime = acq_time.strftime("%H%M%S.%f")[:13]
        ds.ContentTime = acq_time.strftime("%H%M%S.%f")[:13]
        ds.AccessionNumber = accession
        ds.Modality = "MR"
        ds.Manufacturer = "mriqa-node demo"
        ds.InstitutionName = "mriqa-node demo site"
        ds.ReferringPhysicianName = ""
        ds.StationName = "MRIQADEMO"
        ds.StudyDescription = "MR ABDOMEN"
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = "phantom"
        ds.PatientName = "DEMO^PHANTOM"
        ds.PatientID = patient_id
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = "FM"[(pkey >> 24) % 2]
        ds.PatientAge = f"{age:03d}Y"
        ds.BodyPartExamined = "ABDOMEN"
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "OSP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "tse2d1_16"
        ds.SliceThickness = _ds(SLICE_THICKNESS_MM)
        ds.RepetitionTime = _ds(3500.0)
        ds.EchoTime = _ds(90.0)
        ds.NumberOfAverages = _ds(1.0)
        ds.ImagingFrequency = _ds(63.87)
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = _ds(1.5)
        ds.SpacingBetweenSlices = _ds(step)
        ds.EchoTrainLength = 16
        ds.PercentSampling = _ds(100.0)
        ds.PercentPhaseFieldOfView = _ds(100.0)
        ds.PixelBandwidth = _ds(260.0)
        ds.DeviceSerialNumber = "0000"
        ds.SoftwareVersions = IMPLEMENTATION_VERSION
        ds.ProtocolName = series_description
        ds.ReceiveCoilName = "BODY ARRAY"
        ds.AcquisitionMatrix = [size, 0, 0, size]
        ds.InPlanePhaseEncodingDirection = "COL"
        ds.FlipAngle = _ds(90.0)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z = z0 + i * step
        ds.ImagePositionPatient = [_ds(xy0), _ds(xy0), _ds(z)]
        ds.ImageOrientationPatient = [_ds(v) for v in (1, 0, 0, 0, 1, 0)]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        if announce_count:
            ds.ImagesInAcquisition = n_slices
        ds.SliceLocation = _ds(z)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.PixelSpacing = [_ds(pixel_mm), _ds(pixel_mm)]
        ds.BitsAllocated = 16
        ds.BitsStored = BITS_STORED
        ds.HighBit = BITS_STORED - 1
        ds.PixelRepresentation = 0
        ds.WindowCenter = str(center)
        ds.WindowWidth = str(width)
        ds.PixelData = pixels[i].tobytes()
        ds["PixelData"].VR = "OW"
        datasets.append(ds)
    return datasets


def write_series(datasets: list[pydicom.Dataset], out_dir: Path) -> list[Path]:
    """Save as out_dir/IM0001.dcm ... (enforce_file_format=True); return the paths.

    Files are written with the preamble and file meta so any DICOM reader accepts them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, ds in enumerate(datasets, start=1):
        path = out_dir / f"IM{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
