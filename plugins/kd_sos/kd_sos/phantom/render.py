"""Drawing one phantom slice: the anatomy, the synchondrosis, the decoys and the acquisition
(see :mod:`kd_sos.phantom` for what is drawn)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from kd_sos.phantom.difficulty import CUE_AMOUNT, CUE_NOISE, CUES, STAGES, Difficulty
from kd_sos.phantom.draw import (
    AIR,
    BONE,
    BRAIN,
    CORTEX,
    CSF,
    SOFT,
    TOOTH,
    TRABECULAR,
    Canvas,
    band_noise,
    bone_bar,
    draw_pattern,
    frame_box,
    frame_corners,
    local,
    pattern_params,
    rot,
    sdf_capsule,
    sdf_ellipse,
    sdf_rbox,
    smooth_noise,
)
from kdtoolkit.errors import KdError

GENERATOR_VERSION = 2
"""Bumped whenever the drawing changes, so cached phantoms are regenerated."""

BASE_ZOOM = 0.92  # mean pose scale: the head fills the image with a small margin


@dataclass(frozen=True)
class PhantomSample:
    """One drawn slice: 8-bit image, its stage (0-based), ROI box and angle (degrees)."""

    image: np.ndarray
    stage: int
    box: tuple[float, float, float, float]
    angle: float
    decoys: list[tuple[float, float, float, float, float, int]] = field(default_factory=list)
    """Decoy ROIs as ``(x0, y0, x1, y1, angle, pattern_stage)``."""
    cues: dict[str, float] = field(default_factory=dict)
    """Maturity behind each global cue (0 ≈ stage 1, 1 ≈ stage 5); empty without cues."""


def _maturity(rng: np.random.Generator, stage: int, d: Difficulty) -> dict[str, float]:
    """Maturity behind each cue: the slice's maturity, ``(stage + N(0, age_spread)) / 4``, plus
    a little independent variation per cue (0 ≈ stage 1, 1 ≈ stage 5)."""
    m = (stage + rng.normal(0.0, d.age_spread)) / (len(STAGES) - 1)
    return {c: float(m + rng.normal(0.0, CUE_NOISE)) for c in CUES}


def _pose(rng: np.random.Generator, d: Difficulty) -> tuple[float, float, tuple[float, float]]:
    rotation = rng.uniform(-d.max_rotation, d.max_rotation)
    scale = rng.uniform(1 - d.scale_jitter, 1 + d.scale_jitter) * BASE_ZOOM
    # canonical units: the image is 2 wide, so ±2·max_shift is ±max_shift of the image
    shift = (2 * d.max_shift * rng.uniform(-1, 1), 2 * d.max_shift * rng.uniform(-1, 1))
    return rotation, scale, shift


def render(
    rng: np.random.Generator, stage: int, size: int = 256, difficulty: Difficulty | None = None
) -> PhantomSample:
    """Draw one slice of 0-based ``stage`` with the random generator ``rng``."""
    d = difficulty or Difficulty()
    age = _maturity(rng, stage, d) if d.age_cues > 0 else {}

    def j(spread: float) -> float:  # symmetric jitter
        return rng.uniform(-spread, spread)

    def grow(cue: str, least: float = 0.0) -> float:  # 1 ± amount/2, immature to mature
        if not age:
            return 1.0
        m = min(max(age[cue], -0.1), 1.1)
        return max(1 + d.age_cues * CUE_AMOUNT[cue] * (m - 0.5), least)

    dense = grow("density", 0.8) - 1  # added to the bone level outside the clivus

    # anatomy (canonical units)
    width = 2 * d.band_width / BASE_ZOOM  # ROI width; the image is 2 canonical units wide
    height = width / 2
    bone = 0.8 * height  # clivus thickness; the ROI keeps a margin above and below
    cc = (-0.12 + j(0.03), -0.22 + j(0.03))
    ax, ay = 0.80 * (1 + j(0.04)), 0.64 * (1 + j(0.04))
    vault_t = 0.07 * (1 + j(0.15)) * grow("vault", 0.4)
    sph = (0.15 + j(0.02), 0.10 + j(0.02))
    sph_angle = -8 + j(6)
    clivus_angle = 57 + j(6)  # ROI angle of the band: its long axis points to the sphenoid
    ca, sa = rot(clivus_angle)
    p_top = (0.06 + j(0.015), 0.10 + j(0.015))
    clivus_len = max(0.48 * (1 + j(0.05)), 2.1 * width)
    basion = (p_top[0] - ca * clivus_len, p_top[1] + sa * clivus_len)
    frac = 0.45 + j(0.04)
    band_c = (p_top[0] - ca * clivus_len * frac, p_top[1] + sa * clivus_len * frac)
    opisthion = (basion[0] - 0.20 + j(0.03), basion[1] + j(0.03))
    spine_x = basion[0] + 0.05 + j(0.02)

    # pose: the whole ROI must lie inside the image
    for _ in range(100):
        rotation, scale, shift = _pose(rng, d)
        scale *= grow("skull")
        cv = Canvas(size, rotation, scale, shift)
        angle = clivus_angle + rotation
        corners = frame_corners(cv, band_c, clivus_angle, width, height)
        if corners.min() >= 1 and corners.max() <= size - 1:
            break
    else:  # pragma: no cover - only with extreme difficulty settings
        raise KdError("phantom: could not place the ROI inside the image; lower max_shift")

    s256 = size / 256
    tex = band_noise(rng, (size, size), 0.7 * s256, 2.2 * s256)
    x, y = cv.x, cv.y
    full = (slice(None), slice(None))

    # soft tissue: scalp, face, neck
    head = np.minimum.reduce(
        [
            sdf_ellipse(x, y, cc[0], cc[1], ax + 0.05, ay + 0.05),
            sdf_ellipse(x, y, 0.30 + j(0.03), 0.42, 0.42, 0.55),
            sdf_rbox(x + 0.18, y - 1.1, 0.42 + j(0.03), 0.8, 0.1),
        ]
    )
    cv.paint(full, head, SOFT + 0.02 * tex)

    # brain: inside the vault, above the cranial base
    base_x = [-2.0, cc[0] - ax, -0.58, opisthion[0], basion[0], p_top[0], 0.2, cc[0] + ax, 2.0]
    base_y = [0.25, 0.25, 0.30, opisthion[1], basion[1], p_top[1] - 0.04, 0.03, 0.0, 0.0]
    base = np.interp(x, base_x, base_y).astype(np.float32)
    inner = sdf_ellipse(x, y, cc[0], cc[1], ax - vault_t, ay - vault_t)
    gyri = smooth_noise(rng, size, 12)
    cv.paint(full, np.maximum(inner, y - base), BRAIN + 0.025 * gyri)
    cv.paint(full, np.maximum(-inner - 0.012, np.maximum(inner, y - base)), CSF + 0.03)

    # vault ring (outer table, diploe, inner table), open over the face and the skull base
    outer = sdf_ellipse(x, y, cc[0], cc[1], ax, ay)
    psi = np.degrees(np.arctan2((y - cc[1]) / ay, (x - cc[0]) / ax)) % 360
    sector = np.where((psi > 22) & (psi < 128), 1.0, -1.0)
    ring = np.maximum(np.maximum(outer, -inner), sector * 0.2)
    cv.paint(full, ring, CORTEX)
    cv.paint(full, ring + vault_t * 0.3, BONE - 0.1 + dense + TRABECULAR * tex)
    occ_top = (cc[0] + ax * math.cos(math.radians(128)), cc[1] + ay * math.sin(math.radians(128)))
    win = cv.window(*opisthion, 0.5)
    if win is not None:
        occ = sdf_capsule(cv.x[win], cv.y[win], occ_top, opisthion, vault_t / 2)
        cv.paint(win, occ, CORTEX)
        cv.paint(win, occ + vault_t * 0.3, BONE - 0.1 + dense + TRABECULAR * tex[win])

    # airway: nasal cavity, nasopharynx, oropharynx
    naso = (sph[0] + 0.02 + j(0.02), sph[1] + 0.21 + j(0.02))
    airway = np.minimum.reduce(
        [
            sdf_capsule(x, y, (0.52, 0.20), (naso[0] + 0.05, naso[1] - 0.04), 0.055 + j(0.01)),
            sdf_capsule(x, y, naso, (spine_x + 0.20, basion[1] + 0.10), 0.045 + j(0.01)),
            sdf_capsule(x, y, (spine_x + 0.20, basion[1] + 0.10), (spine_x + 0.18, 1.6), 0.04),
        ]
    )
    cv.paint(full, airway, AIR + 0.02)
    for k in range(3):  # turbinates
        cv.paint(
            full,
            sdf_ellipse(x, y, 0.42 - 0.09 * k + j(0.01), 0.17 + 0.035 * k, 0.06, 0.012),
            SOFT + 0.05,
        )

    # face bones: anterior cranial floor, palate, teeth, chin
    floor = sdf_capsule(x, y, (cc[0] + ax - 0.04, 0.0), (sph[0] + 0.04, sph[1] - 0.1), 0.018)
    cv.paint(full, floor, CORTEX - 0.05)
    palate_y = 0.33 + j(0.02)
    cv.paint(full, sdf_capsule(x, y, (0.58, palate_y), (0.2, palate_y), 0.026), CORTEX - 0.04)
    for k in range(2):
        ty = palate_y + 0.07 + 0.11 * k
        cv.paint(full, sdf_ellipse(x, y, 0.57 + j(0.01), ty, 0.03, 0.05), TOOTH)
    if age:  # unerupted permanent teeth in the alveolar bone, fewer as the dentition matures
        buds = int(np.clip(round(d.age_cues * CUE_AMOUNT["teeth"] * (0.8 - age["teeth"])), 0, 3))
        for k in range(buds):
            bx, by = 0.48 - 0.08 * k + j(0.01), palate_y + (0.06 if k % 2 else 0.2) + j(0.01)
            cv.paint(full, sdf_ellipse(x, y, bx, by, 0.04, 0.045), SOFT + 0.04)
            cv.paint(full, sdf_ellipse(x, y, bx, by, 0.028, 0.033), TOOTH)
    face = grow("face")
    chin = sdf_ellipse(
        x, y, 0.52 + j(0.02), 0.70 + j(0.02) + (face - 1) / 2, 0.07 * face, 0.11 * face
    )
    cv.paint(full, chin, CORTEX)
    cv.paint(full, chin + 0.02, BONE - 0.05 + dense + TRABECULAR * tex)

    # cervical spine: anterior arch of the atlas, dens + C2, C3, C4; canal and cord behind
    canal = sdf_rbox(x - (spine_x - 0.17), y - 1.0, 0.06, 0.55, 0.05)
    cv.paint(full, canal, CSF)
    cv.paint(full, canal + 0.025, SOFT + 0.03)
    cv.paint(full, sdf_ellipse(x, y, spine_x + 0.09, basion[1] + 0.07, 0.035, 0.03), CORTEX)
    vert = grow("spine")  # vertebral bodies deepen with maturation
    for top_y, bottom_y in ((basion[1] + 0.03, basion[1] + 0.33), (basion[1] + 0.37, 1.02)):
        mid = (top_y + bottom_y) / 2
        bone_bar(cv, tex, spine_x, mid, 90, bottom_y - top_y, 0.16 * vert, BONE - 0.05 + dense)
    bone_bar(cv, tex, spine_x, 1.2, 90, 0.13, 0.16, BONE - 0.05)

    # sphenoid body with its sinus and the sella; the clivus down to the basion
    win = cv.window(*sph, 0.3)
    if win is not None:
        u, v = local(cv.x[win], cv.y[win], sph[0], sph[1], sph_angle)
        body = sdf_rbox(u, v, 0.13, 0.09, 0.04)
        cv.paint(win, body, CORTEX)
        cv.paint(win, body + 0.012, BONE + TRABECULAR * tex[win])
        pneu = min(grow("sinus", 0.3), 1.5)
        sinus = sdf_ellipse(
            u, v, 0.03 + j(0.01), 0.01, (0.07 + j(0.01)) * pneu, (0.05 + j(0.01)) * pneu
        )
        cv.paint(win, sinus, AIR + 0.03)
        sella = sdf_ellipse(cv.x[win], cv.y[win], sph[0] - 0.05, sph[1] - 0.09, 0.045, 0.04)
        cv.paint(win, sella, SOFT + 0.06)
    bone_bar(
        cv,
        tex,
        (p_top[0] + basion[0]) / 2,
        (p_top[1] + basion[1]) / 2,
        clivus_angle,
        clivus_len + bone,
        bone,
        BONE,
    )
    dorsum = sdf_capsule(x, y, p_top, (p_top[0] - 0.05, p_top[1] - 0.09), 0.018)
    cv.paint(full, dorsum, CORTEX)

    # the synchondrosis
    win = cv.window(*band_c, width)
    u, v = local(cv.x[win], cv.y[win], band_c[0], band_c[1], clivus_angle)
    draw_pattern(cv, win, u, v, width, bone, pattern_params(rng, stage, d.pattern_contrast))

    # decoys
    decoys = []
    wanted = int(rng.integers(d.min_decoys, d.max_decoys + 1))
    sites = _decoy_sites(rng, cc, ax, ay, vault_t, spine_x, basion, occ_top, opisthion, palate_y)
    taken = [band_c]
    for cx, cy, dangle in sites:
        if len(decoys) == wanted:
            break
        if any(math.hypot(cx - px, cy - py) < 1.5 * width for px, py in taken):
            continue
        dc = frame_corners(cv, (cx, cy), dangle, 1.7 * width, height)
        if dc.min() < 1 or dc.max() > size - 1:
            continue
        taken.append((cx, cy))
        bone_bar(cv, tex, cx, cy, dangle, 1.7 * width, bone, BONE)
        win = cv.window(cx, cy, width)
        u, v = local(cv.x[win], cv.y[win], cx, cy, dangle)
        pattern = int(rng.integers(0, len(STAGES)))
        draw_pattern(cv, win, u, v, width, bone, pattern_params(rng, pattern, d.pattern_contrast))
        decoys.append((*frame_box(cv, (cx, cy), width, height), dangle + rotation, pattern))

    # acquisition: blur, bias field, contrast, noise
    img = ndimage.gaussian_filter(cv.img, 0.5 * s256)
    img *= 1 + 0.06 * smooth_noise(rng, size, 4)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.05)
    img += d.noise * rng.standard_normal(img.shape).astype(np.float32)
    img8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return PhantomSample(img8, stage, frame_box(cv, band_c, width, height), angle, decoys, age)


def _decoy_sites(rng, cc, ax, ay, vault_t, spine_x, basion, occ_top, opisthion, palate_y):
    """Candidate decoy centres and angles, in random order (vault, spine, occiput, palate)."""
    sites = []
    for _ in range(24):
        kind = rng.choice(4, p=[0.55, 0.2, 0.1, 0.15])
        flip = 180.0 * int(rng.integers(0, 2))
        if kind == 0:  # on the vault, along it
            psi = math.radians(rng.uniform(128, 382))
            x = cc[0] + (ax - vault_t / 2) * math.cos(psi)
            y = cc[1] + (ay - vault_t / 2) * math.sin(psi)
            tx, ty = -ax * math.sin(psi), ay * math.cos(psi)
            sites.append((x, y, math.degrees(math.atan2(-ty, tx)) + flip))
        elif kind == 1:  # in the cervical spine, along it
            y = basion[1] + rng.uniform(0.2, 0.7)
            sites.append((spine_x + rng.uniform(-0.02, 0.02), y, 90 + rng.uniform(-10, 10) + flip))
        elif kind == 2:  # on the occipital squama
            t = rng.uniform(0.2, 0.8)
            x = occ_top[0] + t * (opisthion[0] - occ_top[0])
            y = occ_top[1] + t * (opisthion[1] - occ_top[1])
            a = math.degrees(math.atan2(-(opisthion[1] - occ_top[1]), opisthion[0] - occ_top[0]))
            sites.append((x, y, a + rng.uniform(-8, 8) + flip))
        else:  # along the palate / nasal floor
            sites.append((rng.uniform(0.25, 0.5), palate_y, rng.uniform(-10, 10) + flip))
    return sites
