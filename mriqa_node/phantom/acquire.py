"""One subject's axial T2 FSE series, acquired: the generator core of the demo scanner and of
the training set (``training.synth``), so the demo sends the kind of image the models learn on.

Per subject: habitus and anatomy, domain randomisation (``randomise``), an FSE acquisition
protocol, a breathing trace and possibly bulk motion over the real acquisition timeline (slices
interleaved within packages, so neighbouring slices see different breathing phases), k-space
corruption, windowing to the acquired matrix, complex noise, magnitude. On request the true
severity of every slice is measured against a steady reconstruction (``motion.steady``).

Every random choice comes from a named stream of a caller's key (``stream``), so a key gives the
same series in any process and each part (anatomy, protocol, motion, noise, randomisation) can
change without reshuffling the others.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .anatomy import SliceAnatomy, Subject, coil_field, draw_subject, render_series
from .motion import (
    Acquisition,
    Breathing,
    BulkMotion,
    SliceMotion,
    anterior_weight,
    fft2,
    ifft2,
    motion_kspace,
    severity_from_error,
    steady,
)
from .randomise import Randomisation

__all__ = ["MAX_VALUE", "MotionPlan", "Protocol", "Scan", "scan", "stream"]

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
SIGNAL_SCALE = 1400.0  # stored value of signal 1 (reference subcutaneous fat) at the coil centre
# Peak anterior-wall excursion at motion level 1 (deep breathing): non-diagnostic at every image
# size (a 64 px acquisition blurs ghosts that 20 mm makes plain at 512 px).
LEVEL_MAX_AMP_MM = 40.0


def stream(key: Sequence[int], name: str) -> np.random.Generator:
    """The random stream ``name`` of the series keyed by ``key`` (non-negative integers)."""
    return np.random.default_rng([*key, zlib.crc32(name.encode())])


@dataclass(frozen=True)
class MotionPlan:
    """What the subject does during the series: breathing excursion of the anterior wall
    (``amp_mm``), its period and irregularity, how far the organs slide through the slice
    relative to the wall (``si_ratio``), and ``events`` bulk rigid moves of up to about
    ``shift_mm`` and ``rot_deg``."""

    amp_mm: float = 0.0
    period_s: float = 4.5
    irregular: float = 0.2
    si_ratio: float = 1.5
    events: int = 0
    shift_mm: float = 2.0
    rot_deg: float = 1.5

    @classmethod
    def level(cls, motion: float) -> MotionPlan:
        """The demo's knob: 0 lies still (no ghost at all) .. 1 breathes deeply, freely; the
        excursion grows as motion ** 1.5, so low levels stay mild (0.2: ~3.6 mm). The
        breathing is irregular enough that no TR happens to sample it at one phase (which
        would hide the ghosts of a whole series)."""
        if not 0.0 <= motion <= 1.0:
            raise ValueError("motion must be within [0, 1]")
        return cls(amp_mm=LEVEL_MAX_AMP_MM * motion**1.5, period_s=4.0, irregular=0.35)


@dataclass(frozen=True)
class Protocol:
    """The acquisition of one series, as the DICOM header reports it."""

    n_slices: int
    thickness_mm: float
    spacing_mm: float
    acq: Acquisition
    te_s: float
    zeta_top: float  # slab position: top slice, in the anatomy's z (1: liver dome)
    gain: float  # stored value per unit signal
    snr: float  # signal 1 over the noise sigma


@dataclass
class Scan:
    """A subject's series as stored: pixels, display window, truth and what made them."""

    pixels: np.ndarray  # (n, size, size) uint16, instance 1 (index 0) the top slice
    window: tuple[float, float]  # centre, width
    severity: np.ndarray | None  # (n,) true motion severity 0..1, when measured
    subject: Subject
    protocol: Protocol


def scan(
    key: Sequence[int],
    n_slices: int,
    size: int,
    plan: MotionPlan,
    randomise: float = 0.0,
    severity: bool = False,
) -> Scan:
    """Acquire ``n_slices`` axial slices of ``size`` x ``size`` of the subject keyed by ``key``
    doing ``plan``, with domain randomisation of strength ``randomise`` (0 reference .. 1
    full); ``severity`` also measures each slice's true severity (twice the FFTs)."""
    if n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    if size < 32:
        raise ValueError("size must be >= 32")
    sub = draw_subject(stream(key, "anatomy"))
    rnd = Randomisation.draw(stream(key, "randomise"), randomise, list(sub.sig))
    sub.sig = rnd.tissue_signals(sub.sig)
    proto = draw_protocol(stream(key, "protocol"), n_slices, size, rnd)

    # One extra slice above the slab, for through-plane motion.
    zetas = proto.zeta_top - (np.arange(n_slices + 1) - 1) * proto.spacing_mm / sub.anat_len_mm
    anat = render_series(sub, zetas, size, rnd.look(proto.thickness_mm))
    anat.image *= coil_field(sub, size)[None] * rnd.bias_field(size)[None]
    motions = slice_motions(key, plan, proto, zetas, sub.fov_mm / size)
    images, sev = _acquire(anat, motions, proto, stream(key, "noise"), severity)

    gain = min(proto.gain, 0.85 * MAX_VALUE / max(float(anat.image[:, ::4, ::4].max()), 1e-6))
    pixels = np.clip(np.rint(images * gain), 0, MAX_VALUE).astype(np.uint16)
    return Scan(pixels, _window(pixels, anat.body[1:]), sev, sub, proto)


def draw_protocol(
    rng: np.random.Generator, n_slices: int, size: int, rnd: Randomisation
) -> Protocol:
    """An abdominal T2 FSE protocol as sites run it; randomisation widens matrix and slices."""
    thickness = round(rnd.blend(float(rng.choice([5.0, 6.0, 6.0, 7.0])), rnd.thickness_mm), 1)
    spacing = thickness + round(float(rng.uniform(0.5, 2.0)), 1)
    etl = max(2, min(int(rng.choice([12, 16, 16, 20])), size // 16))
    pe = rnd.blend(float(rng.choice([0.5, 0.5625, 0.625])), rnd.pe_fraction)
    ro = rnd.blend(float(rng.choice([0.625, 0.75])), rnd.ro_fraction)
    n_pe = min(size, max(etl * 2, etl * round(size * pe / etl)))
    n_ro = min(size, max(8, round(size * ro)))
    nex = int(rng.choice([1, 2, 2, 3]))
    te_s = float(rng.uniform(0.08, 0.105))  # effective TE: the k-space centre's echo
    acq = Acquisition(
        size=size,
        n_pe=n_pe,
        n_ro=n_ro,
        etl=etl,
        tr_s=float(rng.uniform(3.0, 5.0)),
        esp_s=te_s / max(etl // 2, 1),
        nex=nex,
    )
    return Protocol(
        n_slices=n_slices,
        thickness_mm=thickness,
        spacing_mm=spacing,
        acq=acq,
        te_s=te_s,
        zeta_top=float(rng.uniform(0.95, 1.06)),
        gain=SIGNAL_SCALE * float(rng.uniform(0.8, 1.2)),
        snr=rnd.blend(float(rng.uniform(22.0, 55.0)), rnd.snr),  # fat SNR 22..55
    )


def slice_motions(
    key: Sequence[int], plan: MotionPlan, proto: Protocol, zetas: np.ndarray, pixel_mm: float
) -> list[SliceMotion]:
    """What moves during each slice's acquisition, over the series' real timeline: slices are
    acquired in packages (as many per TR as fit), interleaved within a package."""
    acq, n = proto.acq, proto.n_slices
    per_tr = max(1, int(acq.tr_s / (acq.etl * acq.esp_s + 0.03)))
    packages = -(-n // per_tr)
    package_s = acq.shots * acq.nex * acq.tr_s
    duration = packages * package_s
    trace = Breathing.draw(duration, stream(key, "trace"), plan.period_s, plan.irregular)
    bulk = BulkMotion.draw(
        duration, stream(key, "bulk"), plan.events, plan.shift_mm / pixel_mm, plan.rot_deg
    )
    slice_gain = np.exp(0.25 * stream(key, "motion").standard_normal(n))
    per_package = -(-n // packages)
    motions = []
    for i in range(n):
        package, slot = i % packages, i // packages
        order = (slot // 2) if slot % 2 == 0 else (per_package + 1) // 2 + slot // 2
        times = acq.times(package * package_s + order * acq.tr_s / per_package)
        d = trace.at(times)
        depth = 0.6 + 0.5 * float(np.clip(zetas[i + 1], 0, 1))  # the upper abdomen moves most
        amp_px = plan.amp_mm / pixel_mm * depth * slice_gain[i]
        slide = plan.si_ratio * amp_px * pixel_mm * d / proto.spacing_mm
        motions.append(
            SliceMotion(
                wall_px=-amp_px * d,
                cav_px=-0.3 * amp_px * d,
                through=np.clip(slide, 0.0, 1.0),
                pose=bulk.index(times),
                bulk=bulk,
            )
        )
    return motions


def _acquire(
    anat: SliceAnatomy,
    motions: list[SliceMotion],
    proto: Protocol,
    rng: np.random.Generator,
    severity: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Magnitude images (n, size, size) of every slice (``anat`` has one extra slice on top)
    and, when asked, each slice's true severity from the noise-free image error."""
    acq, n, size = proto.acq, proto.n_slices, proto.acq.size
    wpe, wro = acq.window()
    window = wpe[:, None] * wro[None, :]
    acquired = window > 0
    # Unitary FFTs: image noise sigma = k-space sigma * rms of the window over all samples.
    noise_scale = size / (proto.snr * float(np.sqrt(np.sum(window**2))))
    images = np.empty((n, size, size), np.float32)
    sev = np.empty(n) if severity else None
    cav_above_k = _cavity_k(anat, 0)
    for i, motion in enumerate(motions):
        j = i + 1
        clean = anat.image[j]
        cav_k = _cavity_k(anat, j)
        clean_k = fft2(clean)
        ant = anterior_weight(anat.body[j])
        wall_k = fft2(clean * (anat.body[j] - anat.cavity[j]).clip(0, 1) * ant)
        k = motion_kspace(clean, clean_k, motion, wall_k, cav_k, cav_above_k)
        k *= window
        moved = ifft2(k)
        if sev is not None:
            still = motion_kspace(clean, clean_k, steady(motion, wpe), wall_k, cav_k, cav_above_k)
            ref = np.abs(ifft2(still * window))  # magnitude: Gibbs undershoots fold up too
            err = float(np.linalg.norm(np.abs(moved) - ref) / max(np.linalg.norm(ref), 1e-12))
            sev[i] = float(severity_from_error(err))
        cav_above_k = cav_k
        noise = np.zeros((size, size), np.complex64)
        draw = rng.standard_normal((2, int(np.count_nonzero(acquired))), dtype=np.float32)
        draw *= np.float32(noise_scale)
        noise[acquired] = (draw[0] + 1j * draw[1]) * window[acquired]
        moved += ifft2(noise)
        images[i] = np.abs(moved)
    return images, sev


def _cavity_k(anat: SliceAnatomy, j: int) -> np.ndarray:
    """Spectrum of slice ``j``'s moving abdominal contents (most mobile anteriorly)."""
    ant = anterior_weight(anat.body[j])
    return fft2(anat.image[j] * anat.cavity[j] * (0.3 + 0.7 * ant))


def _window(pixels: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    """Display window (centre, width) from robust percentiles of the body signal."""
    sample = pixels[:, ::4, ::4][body[:, ::4, ::4] > 0.5]
    lo, hi = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, MAX_VALUE)
    return float(lo + hi) / 2.0, max(float(hi - lo), 2.0)
