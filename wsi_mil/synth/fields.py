"""Low-resolution fields that define one synthetic slide (1 field px = ``ds`` level-0 px).

All fields derive deterministically from the slide seed. The truth masks are exactly the binary
fields the renderer uses, so ground truth and pixels agree by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage import draw, morphology

from wsi_mil.synth.noise import smooth_noise

TUMOUR_KINDS = ("micro", "small", "large")
ARTEFACTS = ("pen", "blur", "fold")
# optical density (natural log) per R, G, B channel of the marker inks: blue, red, green, black
PEN_INKS = ((1.05, 0.62, 0.12), (0.08, 1.9, 1.6), (0.95, 0.22, 0.80), (2.5, 2.5, 2.3))


def mask_downsample(width: int, height: int) -> int:
    """Level-0 px per field px: a power of two in [8, 64] keeping fields near 2048 px or less."""
    ds = 8
    while ds < 64 and max(width, height) / ds > 2048:
        ds *= 2
    return ds


@dataclass
class SlideFields:
    """Everything the renderer needs about one slide, at ``ds`` resolution (float32 in [0, 1] unless noted)."""

    width: int
    height: int
    mpp: float
    ds: int
    seed: int
    tissue_mask: np.ndarray  # bool truth
    tumour_mask: np.ndarray  # bool truth
    tissue: np.ndarray  # smoothed tissue pieces, fat included (render threshold 0.5)
    tumour: np.ndarray  # smoothed tumour_mask (nucleus type probability)
    cellular: np.ndarray  # 0 stroma .. 1 lymphoid/cellular
    fat: np.ndarray  # adipose regions
    orient: np.ndarray  # weight of horizontal vs vertical fibres
    warp_x: np.ndarray  # level-0 px displacement of the fibre texture
    warp_y: np.ndarray
    pen: np.ndarray
    blur: np.ndarray
    fold: np.ndarray
    pen_od: tuple[float, float, float] = (0.0, 0.0, 0.0)
    artefacts: tuple[str, ...] = ()
    extras: dict[str, float] = field(default_factory=dict)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def _tissue(rng: np.random.Generator, mh: int, mw: int) -> np.ndarray:
    """Several irregular tissue pieces with a few holes (lumens), as a bool mask."""
    m = min(mh, mw)
    yy, xx = np.mgrid[0:mh, 0:mw].astype(np.float32)
    coarse = smooth_noise(rng, (mh, mw), 0.08 * m)
    fine = smooth_noise(rng, (mh, mw), 0.015 * m)
    tissue = np.zeros((mh, mw), bool)
    n = int(rng.integers(1, 5))
    rows, cols = {1: (1, 1), 2: (1, 2), 3: (2, 2), 4: (2, 2)}[n]
    if rng.random() < 0.5:
        rows, cols = cols, rows
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    for k in rng.permutation(len(cells))[:n]:  # one piece per layout cell, jittered, irregular
        r, c = cells[k]
        ch, cw = mh / rows, mw / cols
        cy, cx = (r + rng.uniform(0.4, 0.6)) * ch, (c + rng.uniform(0.4, 0.6)) * cw
        a, b = rng.uniform(0.30, 0.42) * cw, rng.uniform(0.30, 0.42) * ch
        th = rng.uniform(-0.4, 0.4)
        u = ((xx - cx) * math.cos(th) + (yy - cy) * math.sin(th)) / a
        v = (-(xx - cx) * math.sin(th) + (yy - cy) * math.cos(th)) / b
        piece = np.sqrt(u * u + v * v) + 0.22 * coarse + 0.06 * fine < 1.0
        for _ in range(int(rng.integers(0, 3))):
            ys, xs = np.nonzero(piece)
            if len(ys) == 0:
                break
            i = int(rng.integers(len(ys)))
            r = rng.uniform(0.012, 0.035) * m
            rr, cc = draw.ellipse(ys[i], xs[i], r, r * rng.uniform(0.6, 1.4), shape=(mh, mw),
                                  rotation=rng.uniform(0, math.pi))
            piece[rr, cc] = False
        tissue |= piece
    tissue = morphology.remove_small_objects(tissue, max_size=max(4, int(0.002 * mh * mw)))
    if tissue.mean() < 0.05:  # rare: pieces fell mostly outside; fall back to one central piece
        tissue |= ((xx - mw / 2) / (0.3 * mw)) ** 2 + ((yy - mh / 2) / (0.3 * mh)) ** 2 + 0.1 * coarse < 1
    return tissue


def _tumour(rng: np.random.Generator, tissue: np.ndarray, kind: str, mpp: float, ds: int) -> np.ndarray:
    """Tumour blobs inside ``tissue`` whose total area hits the fraction range of ``kind``."""
    area = float(tissue.sum())
    n = int(rng.integers(1, 4))
    if kind == "micro":  # 1-3 foci of 300-600 um, but never more than ~0.8% of the tissue
        px_um = mpp * ds
        phys = sum(math.pi * (rng.uniform(300, 600) / px_um / 2) ** 2 for _ in range(n))
        target = min(phys, rng.uniform(0.003, 0.008) * area)
    elif kind == "small":
        target = rng.uniform(0.02, 0.05) * area
    elif kind == "large":
        target = rng.uniform(0.20, 0.40) * area
    else:
        raise ValueError(f"unknown tumour kind {kind!r}; expected one of {TUMOUR_KINDS}")
    target = max(target, 4.0)
    depth = ndimage.distance_transform_edt(tissue)
    ys, xs = np.nonzero(tissue)
    weights = depth[ys, xs] ** 2
    centres = rng.choice(len(ys), size=n, replace=False, p=weights / weights.sum())
    radius = math.sqrt(target / (n * math.pi))
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    score = np.full(tissue.shape, -np.inf, np.float32)
    for i in centres:
        scale = radius * rng.uniform(0.7, 1.3)
        aspect, th = rng.uniform(0.6, 1.0), rng.uniform(0, math.pi)
        du, dv = xx - xs[i], yy - ys[i]
        u = (du * math.cos(th) + dv * math.sin(th)) / scale
        v = (-du * math.sin(th) + dv * math.cos(th)) / (scale * aspect)
        score = np.maximum(score, -np.sqrt(u * u + v * v))
    score += 0.35 * smooth_noise(rng, tissue.shape, max(1.0, radius / 3))
    inside = score[tissue]
    k = int(min(len(inside) - 1, round(target)))
    thresh = np.partition(inside, len(inside) - 1 - k)[len(inside) - 1 - k]
    return (score >= thresh) & tissue


def _pen(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A thick, curved marker stroke that may leave the tissue (float 0..1)."""
    mh, mw = shape
    m = min(mh, mw)
    out = np.zeros(shape, bool)
    y, x = rng.uniform(0.1, 0.9) * mh, rng.uniform(0.1, 0.9) * mw
    heading = rng.uniform(0, 2 * math.pi)
    width = max(1.5, rng.uniform(0.008, 0.018) * m)
    for _ in range(int(rng.uniform(0.3, 0.6) * m / max(width / 2, 1))):
        rr, cc = draw.disk((y, x), width, shape=shape)
        out[rr, cc] = True
        heading += rng.normal(0, 0.12)
        y, x = y + math.sin(heading) * width / 2, x + math.cos(heading) * width / 2
    return ndimage.gaussian_filter(out.astype(np.float32), 0.7) * np.float32(rng.uniform(0.7, 1.0))


def _blur(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """A soft elliptical out-of-focus region centred in the tissue."""
    ys, xs = np.nonzero(tissue)
    i = int(rng.integers(len(ys)))
    m = min(tissue.shape)
    rr, cc = draw.ellipse(ys[i], xs[i], rng.uniform(0.05, 0.12) * m, rng.uniform(0.05, 0.12) * m,
                          shape=tissue.shape, rotation=rng.uniform(0, math.pi))
    out = np.zeros(tissue.shape, np.float32)
    out[rr, cc] = 1.0
    return np.clip(ndimage.gaussian_filter(out, 0.02 * m + 0.5) * 1.5, 0, 1)


def _fold(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """A band of doubled-over tissue across one piece (float 0..1)."""
    ys, xs = np.nonzero(tissue)
    i = int(rng.integers(len(ys)))
    m = min(tissue.shape)
    th = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0 : tissue.shape[0], 0 : tissue.shape[1]].astype(np.float32)
    d = np.abs((xx - xs[i]) * math.sin(th) - (yy - ys[i]) * math.cos(th))
    d += 0.01 * m * smooth_noise(rng, tissue.shape, 0.03 * m)
    half = max(1.0, rng.uniform(0.008, 0.025) * m)
    band = np.clip(half + 0.5 - d, 0, 1) * tissue
    return ndimage.gaussian_filter(band.astype(np.float32), 0.6)


def make_fields(width: int, height: int, seed: int, mpp: float, tumour: str | None,
                artefacts: Sequence[str] = ()) -> SlideFields:
    """Draw all low-resolution fields of one slide from its seed."""
    ds = mask_downsample(width, height)
    mh, mw = math.ceil(height / ds), math.ceil(width / ds)
    rng = np.random.default_rng([int(seed), 0x5EED])
    m = min(mh, mw)
    pieces = _tissue(rng, mh, mw)
    px_um = mpp * ds  # microns per field px
    region = float(np.clip(450.0 / px_um, 1.5, m / 6))
    cellular = _sigmoid(4.0 * (smooth_noise(rng, (mh, mw), region) + 0.1))
    fat = _sigmoid(7.0 * (smooth_noise(rng, (mh, mw), region) - 1.1))
    # truth tissue: stained tissue; the white interior of fat lobules counts as background, like holes
    tissue_mask = pieces & (fat <= 0.5)
    tissue_mask = morphology.remove_small_objects(tissue_mask, max_size=4)
    tumour_mask = _tumour(rng, tissue_mask, tumour, mpp, ds) if tumour else np.zeros_like(tissue_mask)
    orient = _sigmoid(2.0 * smooth_noise(rng, (mh, mw), region * 1.5))
    amp = 25.0 / mpp  # fibre waviness, level-0 px
    wsig = float(np.clip(200.0 / px_um, 1.0, m / 8))
    warp_x = smooth_noise(rng, (mh, mw), wsig) * np.float32(amp)
    warp_y = smooth_noise(rng, (mh, mw), wsig) * np.float32(amp)
    zeros = np.zeros((mh, mw), np.float32)
    art_rng = np.random.default_rng([int(seed), 0xA27E])
    pen = _pen(art_rng, (mh, mw)) if "pen" in artefacts else zeros
    pen_od = PEN_INKS[min(len(PEN_INKS) - 1, int(art_rng.random() * len(PEN_INKS)))]
    blur = _blur(art_rng, tissue_mask) if "blur" in artefacts else zeros
    fold = _fold(art_rng, tissue_mask) if "fold" in artefacts else zeros
    return SlideFields(
        width=width, height=height, mpp=mpp, ds=ds, seed=int(seed),
        tissue_mask=tissue_mask, tumour_mask=tumour_mask,
        tissue=ndimage.gaussian_filter(pieces.astype(np.float32), 0.6),
        tumour=ndimage.gaussian_filter(tumour_mask.astype(np.float32), 0.5),
        cellular=cellular, fat=fat, orient=orient, warp_x=warp_x, warp_y=warp_y,
        pen=pen, blur=blur, fold=fold, pen_od=pen_od, artefacts=tuple(a for a in ARTEFACTS if a in artefacts),
    )
