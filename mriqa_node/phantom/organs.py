"""Organs of the synthetic abdomen, painted slice by slice in anatomical order.

Everything here is a function of the slice position ``z`` (0 about the iliac crest, 1 the liver
dome) and of named per-subject random numbers (``Subject.jit``), so an organ grows, shrinks,
drifts and changes outline smoothly from slice to slice, and differs from subject to subject.
Positions inside the abdominal cavity are given in cavity units (``Frame.P``), so organs follow
the subject's habitus; sizes are in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .shapes import Blob, Canvas, Tex, capsule

if TYPE_CHECKING:
    from .anatomy import Fields, Subject

__all__ = ["Frame", "bump", "ramp", "ribs", "spine", "viscera"]


def ramp(z: float, lo: float, hi: float) -> float:
    """0 below lo, 1 above hi, smooth in between (organ appearing along z)."""
    t = min(max((z - lo) / (hi - lo), 0.0), 1.0)
    return t * t * (3.0 - 2.0 * t)


def bump(z: float, lo: float, hi: float) -> float:
    """Size profile of an organ spanning lo..hi in z: 0 outside, ~1 in its middle."""
    t = (z - lo) / (hi - lo)
    return float(np.sqrt(max(np.sin(np.pi * t), 0.0))) if 0.0 < t < 1.0 else 0.0


@dataclass
class Frame:
    """Geometry of one slice shared by the structure painters."""

    z: float
    zmm: float
    mm: float  # normalised units per millimetre
    cavity: Blob
    y_vb: float  # vertebral body centre
    y_back: float  # posterior muscle surface at the midline

    def P(self, ux: float, uy: float) -> tuple[float, float]:
        """A point in cavity units (-1..1 across the cavity, y positive posterior)."""
        c = self.cavity
        return c.cx + ux * c.a, c.cy + uy * ((c.b_post or c.b) if uy > 0 else c.b)


def viscera(sub: Subject, f: Fields, fr: Frame, main: Canvas) -> np.ndarray:
    """Content of the abdominal cavity: bowel and mesentery, then the organs over it, on a
    canvas of its own with the coordinates, textures and look of ``main``."""
    J, S, z, zmm, mm, P = sub.jit, sub.sig, fr.z, fr.zmm, fr.mm, fr.P
    cavity, y_vb = fr.cavity, fr.y_vb
    X, Y = main.X, main.Y
    ha = J.harm
    cv = Canvas(X, Y, 0.0, main.margin, main.fine, main.coarse, main.look)

    # Small bowel and mesenteric fat: loops where a smooth field exceeds a threshold that falls
    # inferiorly (more loops low in the abdomen), dark walls at the loop borders.
    box = cv.box(cavity)
    if box is not None:
        fb = f.blend(f.bowel, zmm / 12.0 + 5 * J("bz"), zmm / 31.0, box=box)
        fc = f.blend(f.content, zmm / 25.0, box=box)
        thr = np.float32(0.9 + 0.9 * z + 0.25 * J("bthr"))
        d = fb - thr
        lumen = np.clip(d * np.float32(8.0) + np.float32(0.5), 0.0, 1.0)
        wall = np.clip(1.0 - np.abs(d) * np.float32(12.0), 0.0, 1.0)
        content = np.clip(0.55 + 0.8 * fc, 0.0, 1.0) * np.float32(S["fluid"] * 0.95 - 0.3)
        content += np.float32(0.3)
        fat = Tex(S["vfat"], 0.05, 0.03).at(cv, box)
        fat += lumen * (content - fat)
        fat += wall * np.float32(0.75) * (np.float32(S["wall"]) - fat)
        cv.img[box] = fat

    _loops(cv, sub, fr)

    # Colon: gas anteriorly (non-dependent), stool or fluid below, dark wall.
    def colon(name: str, blob: Blob) -> None:
        if blob.a <= 1e-3:
            return
        cv.paint(S["wall"], blob)
        inner = blob.grown(-2.5 * mm)
        level = blob.cy - (0.3 + 0.9 * J.u(name + "lv", 0.0, 1.0)) * blob.b
        bx = cv.box(inner)
        if bx is None:
            return
        content = np.full(X.shape, S["stool"], np.float32)
        content[bx] = Tex(S["stool"], 0.35, 0.2).at(cv, bx)
        content[bx] = np.where(Y[bx] < level, S["air"], content[bx])
        cv.paint(content, inner)

    cb = bump(z, -0.8, 0.62)
    colon(
        "asc",
        Blob(
            *P(-0.8 + 0.05 * J("ac"), 0.1 + 0.1 * J("acy")),
            24 * mm * cb,
            22 * mm * cb,
            harm=ha("asc", 0.08, 7, z),
        ),
    )
    cb = bump(z, -0.8, 0.78)
    colon(
        "desc",
        Blob(
            *P(0.84, 0.3 + 0.1 * J("dcy")), 15 * mm * cb, 14 * mm * cb, harm=ha("desc", 0.08, 6, z)
        ),
    )
    tz = bump(z, 0.4 + 0.06 * J("tz"), 0.6 + 0.06 * J("tz"))
    colon(
        "trans",
        Blob(
            *P(0.05 * J("tx"), -0.72),
            0.4 * cavity.a * tz,
            14 * mm * tz,
            0.08 * J("tr"),
            harm=ha("trans", 0.06, 9, z),
        ),
    )
    cb = bump(z, 0.5, 0.68)
    colon("hep", Blob(*P(-0.6, -0.4), 22 * mm * cb, 18 * mm * cb, harm=ha("hep", 0.08, 6, z)))
    cb = bump(z, 0.6, 0.82)
    colon("spl", Blob(*P(0.75, -0.2), 18 * mm * cb, 16 * mm * cb, harm=ha("splf", 0.08, 6, z)))

    # Retroperitoneal fat (kidneys, great vessels and psoas sit in it).
    cv.paint(
        Tex(S["vfat"], 0.04),
        Blob(0.0, y_vb + 5 * mm, 0.7 * cavity.a, 42 * mm, soft=8, harm=ha("rp", 0.05, 4, z)),
    )

    # Stomach (upper left): wall, fluid or food, an air cap anteriorly in some subjects.
    st = bump(z, 0.55 + 0.05 * J("stz"), 1.4)
    if st > 0:
        sb = Blob(
            *P(0.4 + 0.06 * J("stx"), -0.35 + 0.1 * J("sty")),
            0.27 * cavity.a * st,
            0.4 * cavity.b * st,
            0.5 + 0.2 * J("stth"),
            harm=ha("stom", 0.08, 6, z),
        )
        cv.paint(S["wall"], sb)
        inner = sb.grown(-3.5 * mm)
        bx = cv.box(inner)
        if bx is not None:
            food = J("food") > 0.2
            tex = Tex(S["pancreas"] * 1.4, 0.3, 0.25) if food else Tex(S["fluid"] * 0.9, 0.02)
            fill = np.zeros(X.shape, np.float32)
            fill[bx] = tex.at(cv, bx)
            level = sb.cy - sb.b * (0.5 + 0.5 * J.u("stair", 0.0, 1.0))
            fill[bx] = np.where(Y[bx] < level, S["air"], fill[bx])
            cv.paint(fill, inner)

    # Spleen (posterolateral left, upper slices), clipped by the cavity outline later.
    sp = bump(z, 0.5 + 0.06 * J("spz"), 1.12)
    if sp > 0:
        cv.paint(
            Tex(S["spleen"], 0.03, 0.04),
            Blob(
                *P(0.72 + 0.05 * J("spx"), 0.45),
                0.16 * cavity.a * sp,
                62 * mm * sp * (1 + 0.15 * J("sps")),
                -0.55,
                harm=ha("spl", 0.1, 5, z),
            ),
        )

    # Pancreas (head to tail, rising to the left) with the splenic vein behind it.
    pan = Tex(S["pancreas"], 0.12, 0.05)
    pts = [(-0.12, -0.05), (0.05, -0.18), (0.25, -0.1), (0.45, 0.05)]
    for k, (ux, uy) in enumerate(pts):
        present = bump(z, 0.42 + 0.06 * k + 0.04 * J("pz"), 0.66 + 0.03 * k + 0.04 * J("pz"))
        if present > 0:
            cv.paint(
                pan,
                Blob(
                    *P(ux, uy + 0.05 * J(f"py{k}")),
                    24 * mm * present,
                    11 * mm * present,
                    0.3 * (k - 1.5),
                    harm=ha(f"pan{k}", 0.12, 6, z),
                ),
            )
    if bump(z, 0.5, 0.7) > 0.5:
        cv.paint(S["void"], capsule(P(0.05, -0.05), P(0.45, 0.15), 3.5 * mm))

    # Liver: right lobe large superiorly, tapering inferiorly; left lobe across the midline in
    # the upper slices; hepatic and portal veins as flow voids; gallbladder beneath.
    lr = ramp(z, 0.12 + 0.12 * J("ltip"), 0.75) ** 0.6
    if lr > 0:
        _liver(cv, sub, fr, lr)
    gz = bump(z, 0.3 + 0.06 * J("gbz"), 0.58 + 0.06 * J("gbz"))
    if gz > 0 and J("gb") > -0.8:
        gb = Blob(
            *P(-0.2 + 0.08 * J("gbx"), -0.45 + 0.15 * J("gby")),
            22 * mm * gz,
            14 * mm * gz,
            0.9 + 0.4 * J("gbt"),
            harm=ha("gbh", 0.06, 4, z),
        )
        cv.paint(S["wall"], gb)
        cv.paint(S["bile"], gb.grown(-1.8 * mm))

    _kidneys(cv, sub, fr)

    # Great vessels, crura, psoas and quadratus lumborum.
    pso = ramp(0.72 - z, 0.0, 0.55)
    for side in (-1.0, 1.0):
        if pso > 0:
            r = (7 + 12 * pso) * mm
            cv.paint(
                Tex(S["muscle"], 0.05),
                Blob(
                    side * (20 + r / mm) * mm,
                    y_vb + 3 * mm,
                    r,
                    r * 1.25,
                    side * 0.5,
                    harm=((0.06, 0.0), (0.05, side)),
                ),
            )
        ql = ramp(0.62 - z, 0.0, 0.3)
        if ql > 0:
            cv.paint(
                S["muscle"],
                Blob(
                    side * (62 + 8 * (1 - z)) * mm,
                    y_vb + 40 * mm,
                    26 * mm * ql,
                    12 * mm * ql,
                    side * 0.35,
                ),
            )
        cr = ramp(z, 0.55, 0.75)
        if cr > 0:
            cv.paint(
                S["muscle"],
                Blob(side * 16 * mm, y_vb - 24 * mm, 4 * mm * cr, 18 * mm * cr, side * 0.35),
            )
    ao = (12 * mm, y_vb - 33 * mm)
    cv.paint(S["void"], Blob(*ao, 11 * mm, 11 * mm))
    iv = (-24 * mm, y_vb - 32 * mm - 6 * mm * ramp(z, 0.6, 1.0))
    cv.paint(S["ivc"], Blob(*iv, 13 * mm, 8 * mm, 0.2 + 0.2 * J("ivt"), harm=ha("ivc", 0.1, 3, z)))
    if bump(z, 0.3, 0.62) > 0:
        c = (ao[0] - 2 * mm, ao[1] - 24 * mm)
        cv.paint(S["vfat"], Blob(*c, 8 * mm, 8 * mm))
        cv.paint(S["void"], Blob(*c, 3.5 * mm, 3.5 * mm))
    rv = bump(z, 0.36, 0.46)
    if rv > 0:
        cv.paint(S["ivc"], capsule((65 * mm, y_vb - 8 * mm), iv, 4.0 * mm * rv))

    # Lung bases (posterior costophrenic recesses) replace the liver/spleen dome at the top.
    lu = ramp(z, 0.84 + 0.06 * J("lu"), 1.15)
    for side in (-1.0, 1.0):
        if lu > 0:
            cv.paint(
                S["air"],
                Blob(
                    *P(side * 0.66, 0.85),
                    0.34 * cavity.a * lu,
                    0.4 * cavity.b * lu,
                    side * 0.6,
                    harm=ha(f"lung{side}", 0.08, 4, z),
                ),
            )
    return cv.img


def _loops(cv: Canvas, sub: Subject, fr: Frame) -> None:
    """Small-bowel loops: round and tubular cross-sections, 1.5-3 cm, mostly in the lower
    abdomen, each present over a short stretch of z and drifting as the bowel winds; fluid
    (bright), chyme (intermediate), collapsed (dark) or gas content inside a dark wall."""
    J, S, z, mm, P = sub.jit, sub.sig, fr.z, fr.mm, fr.P
    fluid, wall = S["fluid"], S["wall"]
    for k, v in enumerate(J.vec("loops", 8 * 110).reshape(110, 8)):
        zc = -0.15 + 0.75 * (0.5 * (v[0] + 1.0)) ** 1.3
        ext = 0.05 + 0.04 * (v[1] + 1.0)
        t = (z - zc) / ext
        if abs(t) >= 1.0:
            continue
        pres = float(np.sqrt(1.0 - t * t))
        ux = 0.7 * v[2] + 0.25 * t * v[3]
        uy = -0.1 + 0.55 * v[4] - 0.2 * t * v[5]
        r = (9.0 + 4.0 * (v[6] + 1.0)) * mm * (0.6 + 0.4 * pres)
        length = max(0.0, 18.0 * v[7]) * mm
        ang = 3.0 * v[5] + 2.0 * t
        cx, cy = P(ux, uy)
        dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang)
        loop = capsule((cx - dx, cy - dy), (cx + dx, cy + dy), r, soft=1.3)
        kind = (k * 7919 + int(sub.seed % 997)) % 20
        if kind < 9:
            content = fluid * (0.8 + 0.12 * (v[3] + 1.0))
        elif kind < 16:
            content = 0.45 + 0.2 * (v[1] + 1.0)
        elif kind < 19:
            content = S["stool"]
        else:
            content = S["air"] if uy < 0.1 else fluid
        cv.paint(wall, loop)
        cv.paint(content, loop.grown(-2.0 * mm))


def _liver(cv: Canvas, sub: Subject, fr: Frame, lr: float) -> None:
    J, S, z, mm, P, cavity = sub.jit, sub.sig, fr.z, fr.mm, fr.P, fr.cavity
    ha = J.harm
    liver_cov = np.zeros_like(cv.X)
    val = Tex(S["liver"], 0.04, 0.05)
    rl = Blob(
        *P(-0.42 - 0.25 * (1 - lr), 0.08),
        0.68 * cavity.a * lr,
        1.0 * cavity.b * (0.5 + 0.5 * lr),
        0.15 * J("lth"),
        b_post=(cavity.b_post or cavity.b) * (0.4 + 0.6 * lr),
        harm=ha("liver", 0.07, 5, z, 0.8),
    )
    cv.paint(val, rl, keep=liver_cov)
    ll = ramp(z, 0.55 + 0.1 * J("llz"), 0.85)
    if ll > 0:
        cv.paint(
            val,
            Blob(
                *P(0.05 + 0.1 * J("llx"), -0.55),
                0.5 * cavity.a * ll,
                0.34 * cavity.b * ll,
                -0.2,
                harm=ha("lliver", 0.08, 5, z),
            ),
            keep=liver_cov,
        )
    cz = bump(z, 0.6, 0.9)
    if cz > 0:  # caudate lobe beside the IVC
        cv.paint(val, Blob(*P(-0.15, 0.2), 28 * mm * cz, 20 * mm * cz, 0.5), keep=liver_cov)
    if ll > 0.3:  # fissure of the ligamentum teres
        cv.paint(S["vfat"], capsule(P(-0.05, -0.9), P(-0.1, -0.55), 2.2 * mm), liver_cov)
    hv = ramp(z, 0.75, 0.95)
    if hv > 0:  # hepatic veins converging on the IVC, tapering outwards
        hub = (-24 * mm, fr.y_vb - 40 * mm)
        for k, tgt in enumerate(((-0.8, -0.1), (-0.45, -0.7), (0.1, -0.75))):
            end = P(*tgt)
            prev = hub
            for seg in range(3):
                t = hv * (seg + 1) / 3.0 * 0.85
                nxt = (hub[0] + (end[0] - hub[0]) * t, hub[1] + (end[1] - hub[1]) * t)
                r = (3.2 - 0.8 * seg - 0.4 * k) * mm
                cv.paint(S["void"] * 2, capsule(prev, nxt, r, soft=1.5), liver_cov)
                prev = nxt
    pv = bump(z, 0.5, 0.76)
    if pv > 0:  # portal vein into the right lobe
        a = P(-0.1, 0.0)
        b = P(-0.35, -0.1 + 0.1 * J("pvy"))
        cv.paint(S["void"] * 1.5, capsule(a, b, 6.0 * mm * pv), liver_cov)
        cv.paint(S["void"] * 1.5, capsule(b, P(-0.6, 0.1), 3.5 * mm * pv), liver_cov)
    dots = J.vec("vessels", 60).reshape(20, 3)
    for k, (vx, vy, vz) in enumerate(dots):
        pres = bump(z, 0.3 + 0.45 * vz, 0.5 + 0.45 * vz)
        if pres > 0:
            c = P(-0.6 + 0.35 * vx, 0.5 * vy)
            r = (1.5 + 1.3 * (k % 3)) * mm * pres
            cv.paint(S["void"] * 1.5, Blob(*c, r * (1 + 0.8 * (k % 2)), r, vz * 3), liver_cov)


def _kidneys(cv: Canvas, sub: Subject, fr: Frame) -> None:
    """Kidneys in perirenal fat: cortex, slightly brighter medulla, sinus fat, pelvis."""
    J, S, z, mm = sub.jit, sub.sig, fr.z, fr.mm
    for side, name in ((-1.0, "rk"), (1.0, "lk")):
        lo = (0.14 if side < 0 else 0.22) + 0.05 * J(name + "z")
        kz = bump(z, lo, lo + 0.45)
        if kz <= 0:
            continue
        kx = side * (68 + 6 * J(name + "x")) * mm
        ky = fr.y_vb + (4 + 6 * J(name + "y")) * mm
        th = -side * (0.55 + 0.15 * J(name + "t"))
        kb = Blob(kx, ky, 24 * mm * kz, 36 * mm * kz, th, harm=J.harm(name, 0.05, 4, z))
        cv.paint(Tex(S["vfat"] * 1.03, 0.04), kb.grown(8 * mm * kz))
        cv.paint(Tex(S["cortex"], 0.03), kb)
        hil = bump(z, lo + 0.1, lo + 0.35)
        ct, st = np.cos(th), np.sin(th)
        med = kb.grown(-6 * mm * kz)
        cv.paint(Tex(S["medulla"], 0.06), med, opacity=0.7)
        sx = kx + side * ct * kb.a * (0.2 + 0.55 * hil)
        sy = ky + side * st * kb.a * (0.2 + 0.55 * hil)
        sinus = Blob(sx, sy, kb.a * (0.25 + 0.4 * hil), kb.b * 0.55, th)
        cv.paint(S["vfat"], sinus)
        if hil > 0.3:
            cv.paint(S["fluid"], sinus.scaled(0.5 * hil))


def spine(cv: Canvas, sub: Subject, fr: Frame) -> None:
    """Paraspinal muscles, vertebral body or disc, canal with CSF (cord superiorly), arch."""
    J, S, z, zmm, mm, y_vb = sub.jit, sub.sig, fr.z, fr.zmm, fr.mm, fr.y_vb
    b = 16.0 * mm
    y_c = y_vb + b + 9 * mm
    para = Blob(
        0.0,
        0.5 * (y_c + fr.y_back) - 2 * mm,
        50 * mm,
        0.5 * (fr.y_back - y_c) + 8 * mm,
        harm=((0.0, 0.0), (-0.05, 0.0)),
    )
    cv.paint(Tex(S["muscle"] * 1.1, 0.06, 0.03), para)
    for side in (-1.0, 1.0):  # fat plane between multifidus and longissimus
        cv.paint(
            S["vfat"],
            Blob(
                side * 24 * mm,
                0.5 * (y_c + fr.y_back) + 6 * mm,
                1.0 * mm,
                0.3 * (fr.y_back - y_c),
                side * 0.25,
                soft=2.0,
            ),
            opacity=0.35,
        )
    thoracic = ramp(z, 0.75, 1.0)
    a = (22 - 4 * thoracic) * mm
    pitch = 34.0 + 3.0 * J("pitch")
    phase = ((zmm + 40.0 * J("vphase")) % pitch) / pitch
    disc = float(np.clip(1.0 - abs(phase - 0.1) / 0.12, 0.0, 1.0))  # partial-volume weight
    marrow = Tex(S["marrow"], 0.12)
    body = Blob(0.0, y_vb, a, b, harm=((0.0, 0.0), (-0.03, np.pi / 2), (0.02, 0.0)))
    cv.paint(S["bone"], body)
    cv.paint(marrow, body.grown(-1.6 * mm))
    cv.paint(S["ivc"] * 2, Blob(0.0, y_vb + b - 4 * mm, 3 * mm, 1.5 * mm))  # basivertebral vein
    if disc > 0:
        cv.paint(S["wall"], body.grown(0.5 * mm), opacity=disc)
        cv.paint(S["disc"], body.scaled(0.55), opacity=disc)
    # Neural arch: pedicles and laminae around the canal, spinous process.
    cv.paint(S["bone"], Blob(0.0, y_c + 1 * mm, 18 * mm, 13 * mm))
    cv.paint(Tex(S["marrow"] * 0.75, 0.1), Blob(0.0, y_c + 1 * mm, 16 * mm, 11 * mm))
    cv.paint(S["bone"], capsule((0.0, y_c + 8 * mm), (0.0, y_c + 40 * mm), 3.0 * mm))
    cv.paint(S["vfat"], Blob(0.0, y_c, 11.0 * mm, 8.5 * mm))  # epidural fat
    cv.paint(S["csf"], Blob(0.0, y_c, 9 * mm, 7.0 * mm))
    cord = ramp(z, 0.6, 0.75)
    if cord > 0:
        cv.paint(S["cord"], Blob(0.0, y_c - 0.5 * mm, 4.5 * mm * cord, 3.6 * mm * cord))
    else:
        for k in range(5):
            cv.paint(
                S["cord"],
                Blob((k - 2) * 2.5 * mm, y_c + 3.0 * mm - abs(k - 2) * mm, 0.9 * mm, 0.9 * mm),
            )


def ribs(cv: Canvas, sub: Subject, fr: Frame, wall: Blob, m_lat: float) -> None:
    """Rib cross-sections within the lateral wall of the upper slices."""
    J, S, z, mm = sub.jit, sub.sig, fr.z, fr.mm
    ribs = ramp(z, 0.45, 0.7)
    if ribs <= 0:
        return
    for k, (p0, p1, p2) in enumerate(J.vec("ribs", 30).reshape(10, 3)):
        if np.sin(z * (18 + 4 * p1) + 3 * p2) < -0.3:
            continue
        phi = 0.42 * np.pi * (-0.85 + 0.42 * (k // 2) + 0.1 * p0)
        if k % 2:
            phi = np.pi - phi
        x, y = wall.point(float(phi), inset=0.5 * m_lat * mm)
        rib = Blob(x, y, 7 * mm * ribs, 4.5 * mm * ribs, float(phi) + np.pi / 2)
        cv.paint(S["bone"], rib)
        cv.paint(S["marrow"] * 0.7, rib.grown(-1.3 * mm))
