"""Nuisances that are not motion: the same draw goes to the clean and the corrupted copies of a
series, and none of them changes a label. The model must learn motion, not a look.

Two kinds, applied where they arise:

* acquisition (k-space): acquired resolution (a smaller matrix zero-filled back, with the
  scanner's slight filter), partial Fourier (a fraction of one PE half never acquired), and
  thermal noise (complex Gaussian, so the magnitude is Rician);
* image: receive-coil bias field, contrast (gamma), field of view (zoom in or out), flips and
  90-degree rotations, and the vendor's intensity scale and window (applied when written).

A ``Nuisance`` is drawn once per output series (a series is one acquisition); noise
realisations differ per slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from training.realmotion.kspace import ifft2

__all__ = ["Nuisance", "acquire", "draw_nuisance", "finish"]


@dataclass(frozen=True)
class Nuisance:
    resolution: float = 1.0  # fraction of k-space acquired per axis (1: all)
    partial_fourier: float = 1.0  # fraction of PE lines acquired (0.5 .. 1)
    noise: float = 0.0  # noise sd relative to the mean of the object's signal
    bias: float = 0.0  # peak log-amplitude of the bias field
    bias_coeffs: tuple[float, ...] = (0.0,) * 6
    gamma: float = 1.0
    zoom: float = 1.0  # > 1 zooms in (smaller FOV), < 1 out
    flip_rows: bool = False
    flip_cols: bool = False
    rot90: int = 0
    max_value: int = 4095  # vendor scale: the brightest stored value
    window: bool = True  # write a VOI window (else the node's percentile window is used)
    # The window's (low, high) as fractions of the stored bright level: vendors' windows range
    # from tight (bright tissue saturates) to the full stored range (it shows at about half).
    window_range: tuple[float, float] = (0.0, 1.0)

    @property
    def identity(self) -> bool:
        return self == Nuisance(max_value=self.max_value, window=self.window,
                                window_range=self.window_range)  # fmt: skip


def draw_nuisance(rng: np.random.Generator, strength: float = 1.0) -> Nuisance:
    """A random nuisance; ``strength`` 0 gives the identity (with a random vendor scale)."""
    s = float(np.clip(strength, 0.0, 1.0))

    def maybe(p: float) -> bool:
        return bool(rng.random() < p * s)

    return Nuisance(
        resolution=float(rng.uniform(0.55, 1.0)) if maybe(0.5) else 1.0,
        partial_fourier=float(rng.uniform(0.6, 0.9)) if maybe(0.3) else 1.0,
        noise=float(np.exp(rng.uniform(np.log(0.01), np.log(0.12)))) if maybe(0.7) else 0.0,
        bias=float(rng.uniform(0.1, 0.6)) if maybe(0.6) else 0.0,
        bias_coeffs=tuple(float(c) for c in rng.standard_normal(6)),
        gamma=float(np.exp(rng.uniform(-0.4, 0.4))) if maybe(0.6) else 1.0,
        zoom=float(np.exp(rng.uniform(-0.3, 0.3))) if maybe(0.4) else 1.0,
        flip_rows=maybe(0.3),
        flip_cols=maybe(0.3),
        rot90=int(rng.integers(0, 4)) if maybe(0.4) else 0,
        max_value=int(rng.choice([1023, 4095, 4095, 32767, 65535])),
        window=bool(rng.random() < 0.7),
        window_range=_window_range(rng, s),
    )


def _window_range(rng: np.random.Generator, strength: float) -> tuple[float, float]:
    """A vendor-like window: at full strength the bright level lands anywhere from 0.4 (a
    window over the whole stored range, as GE and Siemens often send) to a little above 1
    (tissue saturates); weaker draws stay nearer 1."""
    low = strength * float(rng.uniform(-0.05, 0.08))
    bright = 1.0 + strength * (float(rng.uniform(0.4, 1.15)) - 1.0)  # where it lands on screen
    return low, low + (1.0 - low) / bright


def _band(n: int, fraction: float) -> np.ndarray:
    """Acquired band of ``fraction`` of n FFT bins, with a narrow raised-cosine edge."""
    if fraction >= 1.0:
        return np.ones(n, np.float32)
    k = np.abs(np.fft.fftfreq(n) * n)
    half = fraction * n / 2.0
    taper = max(2.0, 0.08 * half)
    w = np.clip((half - k) / taper, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)


def acquire(
    k: np.ndarray, nuisance: Nuisance, rng: np.random.Generator | None, signal: float
) -> np.ndarray:
    """Reconstruct a magnitude image from k-space (PE along axis 0) under the acquisition
    nuisances; ``rng`` None leaves the noise out (for measuring severity). ``signal`` is the
    mean of the object's signal, the noise's reference."""
    n_pe, n_ro = k.shape
    weight = _band(n_pe, nuisance.resolution)[:, None] * _band(n_ro, nuisance.resolution)[None, :]
    if nuisance.partial_fourier < 1.0:
        ky = np.fft.fftfreq(n_pe) * n_pe
        weight = weight * (ky >= -(nuisance.partial_fourier - 0.5) * n_pe)[:, None]
    out = k * weight if (weight != 1).any() else k
    if rng is not None and nuisance.noise > 0:
        sd = nuisance.noise * signal * np.sqrt(k.size)  # image-domain sd after the inverse FFT
        noise = rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)
        out = out + (sd / np.sqrt(2.0)) * noise.astype(np.complex64)
    return np.abs(ifft2(out)).astype(np.float32)


def _bias_field(shape: tuple[int, int], nuisance: Nuisance) -> np.ndarray:
    y = np.linspace(-1, 1, shape[0])[:, None]
    x = np.linspace(-1, 1, shape[1])[None, :]
    c = nuisance.bias_coeffs
    field = c[0] * y + c[1] * x + c[2] * y * x + c[3] * y**2 + c[4] * x**2 + c[5] * y * x**2
    field = field / max(float(np.abs(field).max()), 1e-6)
    return np.exp(nuisance.bias * field).astype(np.float32)


def _zoom(image: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom about the centre and keep the shape (a smaller or larger field of view)."""
    if abs(zoom - 1.0) < 1e-3:
        return image
    h, w = image.shape
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    matrix = np.eye(2) / zoom
    return ndimage.affine_transform(
        image, matrix, offset=centre - matrix @ centre, order=1, mode="constant"
    ).astype(np.float32)


def finish(image: np.ndarray, nuisance: Nuisance, reference: float) -> np.ndarray:
    """Image-domain nuisances on a magnitude image; ``reference`` is the clean series' bright
    level (99.5th percentile), the same for every slice and copy so the look stays consistent.
    Returns float32 in [0, 1]-ish (the writer applies the vendor scale)."""
    x = np.asarray(image, np.float32) / max(float(reference), 1e-6)
    if nuisance.bias > 0:
        x = x * _bias_field(x.shape, nuisance)
    if nuisance.gamma != 1.0:
        x = np.clip(x, 0.0, None) ** nuisance.gamma
    x = _zoom(x, nuisance.zoom)
    if nuisance.flip_rows:
        x = x[::-1]
    if nuisance.flip_cols:
        x = x[:, ::-1]
    return np.ascontiguousarray(np.rot90(x, nuisance.rot90), np.float32)
