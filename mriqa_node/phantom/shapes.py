"""Soft-edged random shapes and a painter for the synthetic anatomy.

Organs are not ellipses in a real abdomen, but an ellipse whose radius is perturbed by a few
low-order harmonics (and whose coordinates are bent by a smooth displacement field) already reads
as "organ" to the eye, costs a handful of vectorised numpy operations per structure and changes
smoothly when its parameters do, which is what neighbouring slices need.

Coordinates are normalised to [-1, 1] across the field of view: x to the image right (patient
left), y downwards (posterior). Every structure is evaluated only inside its bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

__all__ = ["REFERENCE_LOOK", "Blob", "Canvas", "Look", "Tex", "capsule", "smooth_field"]


def smooth_field(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (float32, size x size) with ~``cells`` blobs
    across the image.

    A small random grid upsampled with separable Gaussian weights: two small matrix products
    instead of a large convolution, and the result does not depend on ``size`` except for its
    sampling, so textures look alike at 64 and at 512 pixels.
    """
    n = max(int(np.ceil(cells)) + 4, 4)
    grid = rng.standard_normal((n, n))
    centres = (np.arange(n) - 2 + 0.5) / cells
    pos = (np.arange(size) + 0.5) / size
    weights = np.exp(-0.5 * ((pos[:, None] - centres[None, :]) * cells / 0.75) ** 2)
    weights /= weights.sum(axis=1, keepdims=True)
    field = weights @ grid @ weights.T
    field -= field.mean()
    field /= field.std() + 1e-9
    return field.astype(np.float32)


@dataclass(frozen=True)
class Blob:
    """A (super)ellipse with a harmonically perturbed radius and a soft (partial-volume) edge.

    ``b_post`` is the half-axis on the +v side (posterior for theta=0), so a body outline can be
    rounder in front than where it lies on the table. ``harm`` holds (amplitude, phase) of the
    radial harmonics k = 2, 3, ... relative to the mean radius.
    """

    cx: float
    cy: float
    a: float
    b: float
    theta: float = 0.0
    b_post: float | None = None
    power: float = 2.0
    harm: tuple[tuple[float, float], ...] = ()
    soft: float = 1.0  # edge width in pixels (partial volume; larger for oblique surfaces)

    def grown(self, d: float) -> Blob:
        """The same shape with every half-axis changed by ``d`` (a wall of thickness -d)."""
        bp = None if self.b_post is None else max(self.b_post + d, 1e-4)
        return replace(self, a=max(self.a + d, 1e-4), b=max(self.b + d, 1e-4), b_post=bp)

    def scaled(self, s: float) -> Blob:
        bp = None if self.b_post is None else self.b_post * s
        return replace(self, a=self.a * s, b=self.b * s, b_post=bp)

    def reach(self) -> float:
        """Upper bound of the distance from the centre to the outline."""
        r = max(self.a, self.b, self.b_post or 0.0)
        if self.power > 2.0:
            r *= 2.0 ** (0.5 - 1.0 / self.power)
        return r * (1.0 + sum(abs(amp) for amp, _ in self.harm))

    def point(self, phi: float, inset: float = 0.0) -> tuple[float, float]:
        """A point on the outline at polar angle ``phi`` (in the blob frame), moved inwards by
        ``inset``; used to place ribs and fascia on a body wall."""
        c, s = np.cos(phi), np.sin(phi)  # phi is the angle in the normalised (u/a, v/b) frame
        b = self.b_post if (self.b_post is not None and s > 0) else self.b
        p = self.power
        rho = (abs(c) ** p + abs(s) ** p) ** (1.0 / p)
        big_r = 1.0 + sum(amp * np.cos(k * phi + ph) for k, (amp, ph) in enumerate(self.harm, 2))
        u, v = self.a * big_r * c / rho, b * big_r * s / rho
        r = float(np.hypot(u, v))
        shrink = max(r - inset, 0.0) / max(r, 1e-9)
        u, v = u * shrink, v * shrink
        ct, st = np.cos(self.theta), np.sin(self.theta)
        return float(self.cx + u * ct - v * st), float(self.cy + u * st + v * ct)


def capsule(p0: tuple[float, float], p1: tuple[float, float], r: float, soft: float = 1.0) -> Blob:
    """A tube of radius ``r`` from p0 to p1 (vessels, bowel segments)."""
    (x0, y0), (x1, y1) = p0, p1
    half = 0.5 * float(np.hypot(x1 - x0, y1 - y0)) + r
    return Blob(
        0.5 * (x0 + x1),
        0.5 * (y0 + y1),
        half,
        r,
        float(np.arctan2(y1 - y0, x1 - x0)),
        power=2.0,
        soft=soft,
    )


@dataclass(frozen=True)
class Look:
    """How tissue is rendered; the defaults are the reference look, domain randomisation
    (``randomise``) changes them per subject."""

    texture: float = 1.0  # gain of every organ texture (``Tex``)
    grain: float = 0.0  # texture amplitude for tissues painted with a plain value
    edge: float = 1.0  # width of the partial-volume edge ramps, in multiples of one pixel


REFERENCE_LOOK = Look()


@dataclass(frozen=True)
class Tex:
    """A tissue signal with multiplicative texture: value * (1 + g * (fine * a + coarse * b)),
    ``g`` the canvas's texture gain; never below a tenth of the value (no negative tissue)."""

    value: float
    fine: float = 0.0
    coarse: float = 0.0

    def at(self, cv: Canvas, box: tuple[slice, slice]) -> np.ndarray:
        out = np.zeros(cv.X[box].shape, np.float32)
        if self.fine and cv.fine is not None:
            out += np.float32(self.fine) * cv.fine[box]
        if self.coarse and cv.coarse is not None:
            out += np.float32(self.coarse) * cv.coarse[box]
        out *= np.float32(cv.look.texture)
        out += np.float32(1.0)
        np.maximum(out, np.float32(0.1), out=out)
        out *= np.float32(self.value)
        return out

    @classmethod
    def grained(cls, value: float, grain: float) -> Tex:
        """A plain value with ``grain`` texture whose fine/coarse mix depends on the value, so
        neighbouring tissues do not share one pattern."""
        phase = 7.0 * value
        return cls(value, grain * float(np.cos(phase)), grain * float(np.sin(phase)))


class Canvas:
    """Paints blobs over an image in painter's order (later structures cover earlier ones).

    ``X``/``Y`` are the (possibly warped) normalised coordinates of every pixel; a smooth warp
    bends every structure of a slice consistently, so organs keep their neighbours.
    """

    def __init__(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        fill: float | np.ndarray = 0.0,
        margin: float = 0.0,
        fine: np.ndarray | None = None,
        coarse: np.ndarray | None = None,
        look: Look = REFERENCE_LOOK,
    ) -> None:
        self.X, self.Y = X, Y
        self.fine, self.coarse = fine, coarse
        self.look = look
        self.size = X.shape[0]
        self.margin = margin
        self.px = 2.0 / self.size
        if isinstance(fill, np.ndarray):
            self.img = fill.astype(np.float32, copy=True)
        else:
            self.img = np.full(X.shape, fill, dtype=np.float32)

    def box(self, blob: Blob) -> tuple[slice, slice] | None:
        reach = blob.reach() + self.margin + 3 * blob.soft * self.look.edge * self.px
        n = self.size

        def span(c: float) -> tuple[int, int]:
            lo = int(np.floor((c - reach + 1.0) / 2.0 * n))
            hi = int(np.ceil((c + reach + 1.0) / 2.0 * n))
            return max(lo, 0), min(hi, n)

        c0, c1 = span(blob.cx)
        r0, r1 = span(blob.cy)
        if c1 <= c0 or r1 <= r0 or blob.a <= 1e-4 or blob.b <= 1e-4:
            return None
        return slice(r0, r1), slice(c0, c1)

    def sdf(self, blob: Blob, box: tuple[slice, slice]) -> np.ndarray:
        """Approximate signed distance to the outline (normalised units, negative inside).

        Measured along the ray from the centre, which is exact for circles and close enough for
        the soft edge of everything else. The harmonics use cos/sin(k phi) by recurrence from
        the unit direction (no arctan2): this function is the generator's hot loop.
        """
        f32 = np.float32
        dx = self.X[box] - f32(blob.cx)
        dy = self.Y[box] - f32(blob.cy)
        if blob.theta:
            c, s = f32(np.cos(blob.theta)), f32(np.sin(blob.theta))
            u = dx * c
            u += dy * s
            v = dy * c
            v -= dx * s
        else:
            u, v = dx, dy
        un = u * f32(1.0 / blob.a)
        if blob.b_post is None:
            vn = v * f32(1.0 / blob.b)
        else:
            vn = v * np.where(v > 0, f32(1.0 / blob.b_post), f32(1.0 / blob.b))
        if blob.power == 2.0:
            rho = un * un
            rho += vn * vn
            np.sqrt(rho, out=rho)
        else:
            p = f32(blob.power)
            rho = np.abs(un) ** p
            rho += np.abs(vn) ** p
            rho **= f32(1.0 / blob.power)
        np.maximum(rho, f32(1e-6), out=rho)
        r = u * u
        r += v * v
        np.sqrt(r, out=r)
        scale = r / rho  # distance from the centre to the unperturbed outline along the ray
        if blob.harm:
            c1 = un / rho
            s1 = vn / rho
            ck, sk = c1, s1
            big_r = np.ones_like(r)
            for amp, ph in blob.harm:
                ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
                big_r += ck * f32(amp * np.cos(ph)) - sk * f32(amp * np.sin(ph))
            scale *= big_r
        r -= scale
        return r

    def cover(self, blob: Blob) -> tuple[np.ndarray, tuple[slice, slice]] | None:
        """Coverage 0..1 of the blob inside its box (a partial-volume ramp at the edge, ~1 px
        times the look's ``edge``)."""
        box = self.box(blob)
        if box is None:
            return None
        sd = self.sdf(blob, box)
        sd *= np.float32(-1.0 / (self.px * blob.soft * self.look.edge))
        sd += np.float32(0.5)
        return np.clip(sd, 0.0, 1.0, out=sd), box

    def full(self, blob: Blob) -> np.ndarray:
        """Coverage as a full-size map (to restrict later structures to this one)."""
        out = np.zeros(self.X.shape, np.float32)
        got = self.cover(blob)
        if got is not None:
            out[got[1]] = got[0]
        return out

    def paint(
        self,
        value: float | np.ndarray | Tex,
        blob: Blob,
        within: np.ndarray | None = None,
        opacity: float = 1.0,
        keep: np.ndarray | None = None,
    ) -> None:
        """Lay a structure of signal ``value`` over what is there.

        ``value`` is a scalar (given the look's grain), a full-size map or a ``Tex`` (evaluated
        inside the box only); ``within`` restricts the structure to another one's coverage;
        ``keep`` (a full-size array) receives the coverage, so a mask needed later costs no
        second evaluation.
        """
        got = self.cover(blob)
        if got is None:
            return
        m, box = got
        if keep is not None:
            np.maximum(keep[box], m, out=keep[box])
        if within is not None:
            m *= within[box]
        if opacity != 1.0:
            m *= np.float32(opacity)
        sub = self.img[box]
        if self.look.grain and not isinstance(value, Tex | np.ndarray):
            value = Tex.grained(float(value), self.look.grain)
        if isinstance(value, Tex):
            val = value.at(self, box)
        elif isinstance(value, np.ndarray):
            val = value[box]
        else:
            val = np.float32(value)
        sub += m * (val - sub)
