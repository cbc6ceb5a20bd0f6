"""Axial T2 fast-spin-echo abdomen slices that look like MRI, not like geometry.

Each subject gets its own habitus (body size, subcutaneous and visceral fat, muscle), organ
shapes (harmonically perturbed outlines bent by a smooth displacement field), tissue signals and
textures. Slices are rendered at positions ``zeta`` along the body axis (0 about the iliac crest,
1 the liver dome): organ sizes and positions are smooth functions of ``zeta``, so liver and spleen
are large superiorly, kidneys come and go at mid levels, bowel loops dominate inferiorly, the
lung bases appear at the top, and vertebral discs pass by every few slices.

Signal scale (T2 FSE without fat suppression): subcutaneous fat 1, CSF and bile ~1.4, liver and
muscle dark (~0.3 / 0.2), spleen and kidneys intermediate, air, cortical bone and flowing blood
black: the reference look, which ``randomise`` changes per subject. Coil shading, acquisition
blur and Rician noise are added at acquisition (``acquire``).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from .organs import Frame, ribs, spine, viscera
from .shapes import REFERENCE_LOOK, Blob, Canvas, Look, Tex, smooth_field

__all__ = ["SliceAnatomy", "Subject", "coil_field", "draw_subject", "render_series"]


class Jitter:
    """Named, stable per-subject random numbers in [-1, 1].

    Keyed by name (not by draw order), so adding a structure does not reshuffle every other
    organ of every subject.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[str, np.ndarray] = {}

    def vec(self, name: str, n: int) -> np.ndarray:
        key = f"{name}#{n}"
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
            self._cache[key] = rng.uniform(-1.0, 1.0, n)
        return self._cache[key]

    def __call__(self, name: str) -> float:
        return float(self.vec(name, 1)[0])

    def u(self, name: str, lo: float, hi: float) -> float:
        return lo + (hi - lo) * 0.5 * (self(name) + 1.0)

    def sym(self, name: str, amp: float, kmax: int, zeta: float, box: float = 0.0):
        """Left-right symmetric harmonics (body outlines), amplitudes varying slowly with z;
        ``box`` adds a k=4 term that squares the outline off (a torso, not an ellipse)."""
        v = self.vec(name, 2 * (kmax - 1)).reshape(-1, 2)
        out = []
        for i in range(kmax - 1):
            k = i + 2
            a = amp * (v[i, 0] + 0.4 * np.sin(3.0 * zeta + 3.0 * v[i, 1])) / (1 + 0.5 * i)
            if k == 4:
                a += box
            out.append((a, 0.0 if k % 2 == 0 else np.pi / 2))
        return tuple(out)

    def harm(self, name: str, amp: float, kmax: int, zeta: float, drift: float = 1.5):
        """Radial harmonics k = 2..kmax whose phases drift with zeta (smooth change in z)."""
        v = self.vec(name, 3 * (kmax - 1)).reshape(-1, 3)
        return tuple(
            (amp * v[i, 0] / (1 + 0.5 * i), np.pi * v[i, 1] + drift * v[i, 2] * zeta * 4)
            for i in range(kmax - 1)
        )


@dataclass
class Subject:
    """Per-subject habitus and tissue signals (everything drawn once, before any slice)."""

    seed: int
    fov_mm: float
    obesity: float  # 0 slim .. 1 obese
    width_mm: float  # body half-width
    depth_ant_mm: float  # body half-depth in front of the centre line
    depth_post_mm: float
    anat_len_mm: float  # liver dome to iliac crest
    field_t: float  # 1.5 or 3 T (coil shading differs)
    sig: dict[str, float] = field(default_factory=dict)
    jit: Jitter = field(init=False)

    def __post_init__(self) -> None:
        self.jit = Jitter(self.seed)


def draw_subject(rng: np.random.Generator) -> Subject:
    """A random adult: habitus, field of view to fit, tissue signals with biological spread."""
    obesity = float(rng.beta(1.6, 2.2))
    width = float(rng.uniform(135.0, 160.0) + 25.0 * obesity)
    depth_ant = float(rng.uniform(90.0, 110.0) + 35.0 * obesity)
    depth_post = float(rng.uniform(88.0, 102.0) + 12.0 * obesity)
    fov = float(max(rng.uniform(360.0, 420.0), 2.0 * width + 30.0))

    def var(x: float, s: float = 0.08) -> float:
        return float(x * np.exp(s * rng.standard_normal()))

    sig = {
        "fat": var(1.0, 0.03),
        "vfat": var(0.86, 0.05),
        "muscle": var(0.19, 0.12),
        "liver": var(0.29, 0.12),
        "spleen": var(0.58, 0.1),
        "cortex": var(0.52, 0.1),
        "medulla": var(0.72, 0.1),
        "fluid": var(1.35, 0.05),
        "csf": var(1.45, 0.05),
        "bile": var(1.3, 0.08),
        "pancreas": var(0.42, 0.12),
        "marrow": var(0.6, 0.12),
        "disc": var(0.85, 0.15),
        "bone": 0.05,
        "void": var(0.05, 0.3),
        "ivc": var(0.22, 0.3),
        "air": 0.015,
        "stool": var(0.45, 0.2),
        "wall": var(0.24, 0.1),
        "cord": var(0.5, 0.1),
    }
    return Subject(
        seed=int(rng.integers(1 << 62)),
        fov_mm=fov,
        obesity=obesity,
        width_mm=width,
        depth_ant_mm=depth_ant,
        depth_post_mm=depth_post,
        anat_len_mm=float(rng.uniform(215.0, 250.0)),
        field_t=1.5 if rng.random() < 0.5 else 3.0,
        sig=sig,
    )


@dataclass
class SliceAnatomy:
    """Clean slice stack in signal units and the soft masks the motion model needs."""

    image: np.ndarray  # (n, size, size) float32
    cavity: np.ndarray  # (n, size, size) peritoneal + retroperitoneal cavity coverage 0..1
    body: np.ndarray  # (n, size, size) body coverage 0..1


class Fields:
    """Smooth random maps of one subject at one image size (textures, warps, bowel).

    Made once per subject; slices mix them with z-dependent weights, so texture and bowel
    change smoothly from slice to slice and nothing large is computed per slice.
    """

    def __init__(self, sub: Subject, size: int) -> None:
        rng = np.random.default_rng([sub.seed, 0xF1E1D, size])
        scale = sub.fov_mm / 400.0  # same anatomical texture scale whatever the field of view
        self.warp = [smooth_field(rng, size, 3.5) for _ in range(4)]
        self.coarse = [smooth_field(rng, size, 9.0 * scale) for _ in range(2)]
        self.fine = [smooth_field(rng, size, 70.0 * scale) for _ in range(3)]
        self.bowel = [smooth_field(rng, size, 30.0 * scale) for _ in range(3)]
        self.content = [smooth_field(rng, size, 9.0 * scale) for _ in range(2)]
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.x, self.y = np.meshgrid(c, c)

    @staticmethod
    def blend(
        fields: list[np.ndarray],
        angle: float,
        angle2: float = 0.0,
        box: tuple[slice, slice] = (slice(None), slice(None)),
    ) -> np.ndarray:
        """Unit-variance mix that rotates through the fields as the slice moves in z."""
        f = fields[0][box] * np.float32(np.cos(angle))
        f += fields[1][box] * np.float32(np.sin(angle))
        if len(fields) > 2:
            f *= np.float32(np.cos(angle2))
            f += fields[2][box] * np.float32(np.sin(angle2))
        return f


def render_series(
    sub: Subject, zetas: np.ndarray, size: int, look: Look = REFERENCE_LOOK
) -> SliceAnatomy:
    """Render every slice position of one subject (zeta: 0 inferior .. 1 liver dome)."""
    fields = Fields(sub, size)
    n = len(zetas)
    img = np.empty((n, size, size), np.float32)
    cav = np.empty_like(img)
    body = np.empty_like(img)
    for i, z in enumerate(zetas):
        img[i], cav[i], body[i] = _render_slice(sub, fields, float(z), look)
    return SliceAnatomy(img, cav, body)


def _render_slice(sub: Subject, f: Fields, z: float, look: Look):
    J, S = sub.jit, sub.sig
    mm = 2.0 / sub.fov_mm
    zmm = z * sub.anat_len_mm
    fine = f.blend(f.fine, zmm / 5.0, zmm / 13.0)
    coarse = f.blend(f.coarse, zmm / 60.0)

    # Smooth in-plane warp shared by every structure of the slice (soft-tissue deformation).
    warp = 6.0 * mm
    X = f.x + np.float32(warp) * f.blend(f.warp[:2], zmm / 90.0 + 3 * J("wx"))
    Y = f.y + np.float32(warp) * f.blend(f.warp[2:], zmm / 90.0 + 3 * J("wy"))
    main = Canvas(X, Y, 0.0, margin=warp * 2.5, fine=fine, coarse=coarse, look=look)

    # --- body wall: subcutaneous fat, muscle, cavity --------------------------------------
    ob = sub.obesity
    W = sub.width_mm * (1.0 + 0.04 * (z - 0.5) + 0.015 * np.sin(zmm / 40 + 3 * J("bw")))
    Da = sub.depth_ant_mm * (1.0 + 0.08 * ob * (0.55 - z) + 0.02 * np.sin(zmm / 50 + 3 * J("ba")))
    Dp = sub.depth_post_mm
    cy = (Da - Dp) * 0.5 * mm + 0.02 * J("cy")
    body_cov = np.zeros_like(X)
    body = Blob(
        0.01 * J("cx"),
        cy,
        W * mm,
        Da * mm,
        b_post=Dp * mm,
        harm=J.sym("body", 0.03, 5, z, box=-0.035),
    )
    main.paint(Tex(S["fat"], 0.025), body, keep=body_cov)

    f_ant = (8.0 + 38.0 * ob) * (1 + 0.15 * J("fa"))
    f_lat = (9.0 + 42.0 * ob) * (1 + 0.15 * J("fl"))
    f_post = (7.0 + 24.0 * ob) * (1 + 0.15 * J("fp"))
    m_ant, m_lat = 11.0 + 3 * J("ma"), 13.0 + 4 * J("ml")
    wall = Blob(
        body.cx,
        cy,
        (W - f_lat) * mm,
        (Da - f_ant) * mm,
        b_post=(Dp - f_post) * mm,
        harm=J.sym("wall", 0.03, 5, z, box=-0.03),
    )
    muscle = Tex(S["muscle"], 0.05, 0.03)
    main.paint(muscle, wall)
    lateral = np.clip((np.abs(X) - 0.55) / 0.15, 0.0, 1.0)
    main.paint(S["vfat"], wall.grown(-0.45 * m_lat * mm), within=lateral, opacity=0.5)
    main.paint(muscle, wall.grown(-(0.45 * m_lat + 1.0) * mm), within=lateral)
    # Linea alba: the recti part at the midline (a faint, fibrous, darker seam).
    main.paint(
        S["wall"] * 0.6,
        Blob(0.0, cy - (Da - f_ant - 0.5 * m_ant) * mm, 1.2 * mm, 0.6 * m_ant * mm, soft=1.5),
        opacity=0.6,
    )
    cavity = Blob(
        body.cx,
        cy,
        (W - f_lat - m_lat) * mm,
        (Da - f_ant - m_ant) * mm,
        b_post=(Dp - f_post - 11.0) * mm,
        harm=J.sym("cav", 0.03, 5, z, box=-0.03),
    )
    y_back = cy + (Dp - f_post) * mm
    y_vb = y_back - (66.0 + 4.0 * J("vb")) * mm
    fr = Frame(z, zmm, mm, cavity, y_vb, y_back)

    cav_cov = np.zeros_like(X)
    got = main.cover(cavity)
    if got is not None:
        cav_cov[got[1]] = got[0]
    cav_img = viscera(sub, f, fr, main)
    main.img += cav_cov * (cav_img - main.img)

    spine(main, sub, fr)
    ribs(main, sub, fr, wall, m_lat)
    return main.img, cav_cov, body_cov


def coil_field(sub: Subject, size: int) -> np.ndarray:
    """Receive-coil shading (size x size, ~1 in the body centre): brighter near the anterior
    and posterior arrays, a little left-right asymmetry, and at 3 T a central dielectric
    dip. Smooth and multiplicative, as on every phased-array body image."""
    J = sub.jit
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    x, y = c[None, :], c[:, None]
    s = 0.35 + 0.1 * J("coil_s")
    front = (0.35 + 0.15 * J("coil_a")) * np.exp(-(((y + 0.65) / s) ** 2))
    back = (0.3 + 0.15 * J("coil_p")) * np.exp(-(((y - 0.6) / s) ** 2))
    tilt = 0.08 * J("coil_lr") * x
    dip = (0.12 + 0.1 * J("coil_d")) * np.exp(-(x**2 + y**2) / 0.25) * (sub.field_t > 2.0)
    field_ = 0.85 + front + back + tilt - dip
    return (field_ / field_[size // 2, size // 2]).astype(np.float32)
