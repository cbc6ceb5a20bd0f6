"""Domain randomisation of the phantom, in the manner of SynthSeg (Billot et al., Medical Image
Analysis 86, 2023): a model that has seen every contrast, texture, resolution, bias field and
noise level during training learns the motion artefact, not one look of the anatomy.

The anatomy (label layout) stays as drawn; what randomisation changes, per subject:

* tissue contrast: each tissue gets a mean signal drawn independently of the others, around a
  per-subject centre with a per-subject spread, so the contrast is T2-like, T1-like, inverted or
  nearly flat by chance (air and cortical bone stay dark: they give no signal in any sequence);
* texture: the gain of the organ textures, and texture for tissues that have none in the
  reference (smooth random fields multiplied in);
* partial volume: wider edge ramps between tissues, more so for thick slices;
* resolution: acquired matrix and slice thickness;
* a smooth multiplicative bias field on top of the coil shading;
* the noise level.

Strength ``r`` in [0, 1] blends every value linearly between its reference (``r = 0``: the T2
FSE look with biological spread only) and its random counterpart (``r = 1``). All random values
are drawn whatever ``r`` is, from a stream of their own, so one seed gives the same anatomy,
protocol and motion at every strength.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import Look, smooth_field

__all__ = ["DARK_TISSUES", "Randomisation"]

DARK_TISSUES = frozenset({"air", "bone"})
_SIGNAL_RANGE = (0.02, 1.45)  # random tissue means stay within the reference's range
_THICKNESS_MM = (3.0, 9.0)
_PE_FRACTION = (0.3, 1.0)  # acquired phase-encoding lines / reconstructed rows
_RO_FRACTION = (0.4, 1.0)
_SNR = (8.0, 120.0)  # log-uniform, signal 1 over the noise sigma


@dataclass(frozen=True)
class Randomisation:
    """One subject's random draws at strength ``r``; ``blend`` moves a reference value
    toward its random counterpart."""

    r: float
    signals: dict[str, float]
    texture: float
    grain: float
    edge: float
    bias_amplitude: float
    bias_cells: float
    bias_seed: int
    thickness_mm: float
    pe_fraction: float
    ro_fraction: float
    snr: float

    @classmethod
    def draw(cls, rng: np.random.Generator, r: float, tissues: list[str]) -> Randomisation:
        """The random counterparts of a subject's tissues (``tissues``: the signal names)."""
        if not 0.0 <= r <= 1.0:
            raise ValueError("randomise must be within [0, 1]")
        centre = rng.uniform(0.3, 1.0)
        spread = rng.uniform(0.05, 0.8)
        signals = {
            name: float(np.clip(centre * (1.0 + spread * rng.uniform(-1.0, 1.0)), *_SIGNAL_RANGE))
            for name in sorted(tissues)
        }
        return cls(
            r=float(r),
            signals=signals,
            texture=float(rng.uniform(0.3, 3.0)),
            grain=float(rng.uniform(0.0, 0.12)),
            edge=float(rng.uniform(1.0, 2.5)),
            bias_amplitude=float(rng.uniform(0.0, 0.3)),
            bias_cells=float(rng.uniform(1.5, 4.0)),
            bias_seed=int(rng.integers(1 << 62)),
            thickness_mm=float(rng.uniform(*_THICKNESS_MM)),
            pe_fraction=float(rng.uniform(*_PE_FRACTION)),
            ro_fraction=float(rng.uniform(*_RO_FRACTION)),
            snr=float(np.exp(rng.uniform(*np.log(_SNR)))),
        )

    def blend(self, reference: float, random: float) -> float:
        return float(reference + self.r * (random - reference))

    def tissue_signals(self, reference: dict[str, float]) -> dict[str, float]:
        """Each tissue's mean signal; the dark tissues keep theirs."""
        return {
            name: value if name in DARK_TISSUES else self.blend(value, self.signals[name])
            for name, value in reference.items()
        }

    def look(self, thickness_mm: float) -> Look:
        """Texture and partial volume; edges widen with the slice thickness (an oblique
        surface crosses more of a thick slice)."""
        return Look(
            texture=self.blend(1.0, self.texture),
            grain=self.r * self.grain,
            edge=self.blend(1.0, self.edge * max(thickness_mm / 6.0, 0.5)),
        )

    def bias_field(self, size: int) -> np.ndarray:
        """Smooth multiplicative field (size x size, geometric mean 1); all ones at r = 0."""
        rng = np.random.default_rng(self.bias_seed)
        field = smooth_field(rng, size, self.bias_cells)
        return np.exp(np.float32(self.r * self.bias_amplitude) * field).astype(np.float32)
