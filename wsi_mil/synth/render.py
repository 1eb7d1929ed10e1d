"""Level-0 pixels of any region of a synthetic slide, rendered on demand from its fields.

Colour is built in optical-density space (Beer-Lambert): each pixel holds a haematoxylin and an
eosin concentration, mixed with the stain vectors and exponentiated, so colour deconvolution
(``skimage.color.rgb2hed``) recovers the stains. Nuclei sit in a global grid of cells; each cell's
nuclei come from a hash of (seed, cell x, cell y, slot), so patterns continue across tile borders.
Tumour differs from normal tissue only by morphology: more, larger, darker, pleomorphic nuclei with
coarse chromatin, drawn with the same stains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from wsi_mil.synth.fields import SlideFields
from wsi_mil.synth.noise import (
    periodic_texture,
    sample_points,
    sample_texture,
    uniform,
    upsample,
    upsample_coarse,
)

_H = np.array([0.65, 0.70, 0.29], np.float32) / np.float32(np.linalg.norm([0.65, 0.70, 0.29]))
_E = np.array([0.16, 0.90, 0.42], np.float32) / np.float32(np.linalg.norm([0.16, 0.90, 0.42]))
_BACKGROUND_OD = np.array([0.030, 0.038, 0.026], np.float32)
SLOTS = 4  # nucleus slots per grid cell
_LUT_STEPS = 1024  # optical-density steps per unit
_OD_LUT = np.clip(255.0 * np.exp(-(np.arange(8 * _LUT_STEPS) + 0.5) / _LUT_STEPS) + 0.5, 0, 255).astype(np.uint8)


@dataclass
class _Textures:
    fibre_h: np.ndarray
    fibre_v: np.ndarray
    grain: np.ndarray
    chrom: np.ndarray
    scan: np.ndarray


def _textures(seed: int, mpp: float) -> _Textures:
    rng = np.random.default_rng([seed, 0x7E47])
    s = 0.25 / mpp
    return _Textures(
        fibre_h=periodic_texture(rng, (1.6 * s, 7.0 * s)),
        fibre_v=periodic_texture(rng, (7.0 * s, 1.6 * s)),
        grain=periodic_texture(rng, (1.5 * s, 1.5 * s)),
        chrom=periodic_texture(rng, (1.3 * s, 1.3 * s)),
        scan=periodic_texture(rng, (0.0, 0.0)),
    )


def _window(field: np.ndarray, x0: int, y0: int, w: int, h: int, ds: int, pad: int = 1) -> np.ndarray:
    """The low-resolution cells of ``field`` covering a level-0 region (plus ``pad`` cells)."""
    return field[max(0, y0 // ds - pad) : (y0 + h) // ds + 1 + pad, max(0, x0 // ds - pad) : (x0 + w) // ds + 1 + pad]


class Renderer:
    """Renders RGB uint8 level-0 regions of one slide; any region, any order, same pixels."""

    def __init__(self, fields: SlideFields) -> None:
        self.f = fields
        self.tex = _textures(fields.seed, fields.mpp)
        self.cell = max(6, round(12.0 / fields.mpp))  # nucleus grid cell, ~12 um
        self.margin = math.ceil(13.0 / fields.mpp)  # largest nucleus reach, ~13 um
        self.blur_sigma = 1.4 / fields.mpp  # out-of-focus blur, ~1.4 um
        self._bg_tile: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ public
    def region(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] of the level-0 region with top-left (x0, y0)."""
        f = self.f
        if _window(f.blur, x0, y0, w, h, f.ds).max(initial=0.0) <= 0.01:
            return self._rgb(x0, y0, w, h)
        m = int(4.0 * self.blur_sigma + 0.5) + 1  # beyond the filter's reach: same pixels however cut
        big = self._rgb(x0 - m, y0 - m, w + 2 * m, h + 2 * m).astype(np.float32)
        blurred = ndimage.gaussian_filter(big, (self.blur_sigma, self.blur_sigma, 0))[m:-m, m:-m]
        weight = upsample(f.blur, x0, y0, w, h, f.ds)[..., None]
        out = big[m:-m, m:-m] * (1 - weight) + blurred * weight
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------------------------------ pixels
    def _background(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Empty glass: a periodic tile of scanner noise, rendered once per slide."""
        if self._bg_tile is None:
            size = self.tex.scan.shape[0]
            self._bg_tile = self._rgb(0, 0, size, size, glass_only=True)
        size = self._bg_tile.shape[0]
        return self._bg_tile[ys[:, 0] % size][:, xs[0] % size]

    def _rgb(self, x0: int, y0: int, w: int, h: int, glass_only: bool = False) -> np.ndarray:
        f, tex = self.f, self.tex
        ys = np.arange(y0, y0 + h, dtype=np.int64)[:, None]
        xs = np.arange(x0, x0 + w, dtype=np.int64)[None, :]
        has_tissue = not glass_only and _window(f.tissue, x0, y0, w, h, f.ds).max(initial=0.0) > 0.05
        has_pen = not glass_only and _window(f.pen, x0, y0, w, h, f.ds).max(initial=0.0) > 0.01
        if not glass_only and not has_tissue and not has_pen:
            return self._background(ys, xs)
        od = np.empty((3, h, w), np.float32)  # channel-first: every operation below is contiguous
        for c in range(3):  # scanner noise, a little different per channel
            od[c] = sample_texture(tex.scan, ys + 311 * c, xs + 173 * c)
            od[c] *= np.float32(0.006)
            od[c] += _BACKGROUND_OD[c]
        if has_tissue:
            hem, eos = self._stains(x0, y0, w, h, ys, xs)
            for c in range(3):
                od[c] += hem * _H[c]
                od[c] += eos * _E[c]
        if has_pen:
            pen = upsample(f.pen, x0, y0, w, h, f.ds)
            pen *= 0.85 + 0.1 * sample_texture(tex.grain, ys, xs)
            for c in range(3):
                od[c] += pen * np.float32(f.pen_od[c])
        # optical density -> 8-bit intensity through a lookup table (exp, scale, round and clip at once)
        od *= np.float32(_LUT_STEPS)
        np.clip(od, 0, len(_OD_LUT) - 1, out=od)
        return np.take(_OD_LUT, od.astype(np.int32)).transpose(1, 2, 0).copy()

    def _stains(self, x0: int, y0: int, w: int, h: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Haematoxylin and eosin concentrations [h, w] inside the tissue (0 outside)."""
        f, tex, ds = self.f, self.tex, self.f.ds
        grain = sample_texture(tex.grain, ys, xs)
        t_alpha = upsample(f.tissue, x0, y0, w, h, ds)
        t_alpha += np.float32(0.05) * grain - np.float32(0.5)
        t_alpha *= np.float32(ds / 3.0)
        t_alpha += np.float32(0.5)
        np.clip(t_alpha, 0, 1, out=t_alpha)
        cel = upsample_coarse(f.cellular, x0, y0, w, h, ds)
        tum = np.clip((upsample_coarse(f.tumour, x0, y0, w, h, ds) - 0.5) * 4 + 0.5, 0, 1)
        ori = upsample_coarse(f.orient, x0, y0, w, h, ds)
        fy = ys + upsample_coarse(f.warp_y, x0, y0, w, h, ds).astype(np.int64)
        fx = xs + upsample_coarse(f.warp_x, x0, y0, w, h, ds).astype(np.int64)
        fib_v = sample_texture(tex.fibre_v, fy, fx)
        fib = sample_texture(tex.fibre_h, fy, fx)
        fib -= fib_v
        fib *= ori
        fib += fib_v
        # background between nuclei: fibrous pink stroma, paler cellular areas, tumour cytoplasm
        g = np.float32(0.06) * grain
        eos = np.clip(np.float32(0.2) * fib + np.float32(0.58), 0.08, None)
        eos += cel * (g + np.float32(0.34) - eos)
        hem = np.float32(0.05) + cel * (np.float32(0.5) * g + np.float32(0.08))
        eos += tum * (g + np.float32(0.38) - eos)
        hem += tum * (np.float32(0.5) * g + np.float32(0.11) - hem)
        nuc_h, nuc_a = self._nuclei(x0, y0, w, h, ys, xs)
        hem *= 1 - nuc_a
        hem += nuc_h
        eos *= 1 - np.float32(0.7) * nuc_a
        if _window(f.fat, x0, y0, w, h, ds).max(initial=0.0) > 0.3:
            fat_w = np.clip((upsample(f.fat, x0, y0, w, h, ds) - 0.5) * 10 + 0.5, 0, 1)
            membrane = self._adipocytes(ys, xs)
            hem = hem * (1 - fat_w) + 0.04 * membrane * fat_w
            eos = eos * (1 - fat_w) + 0.55 * membrane * fat_w
        if _window(f.fold, x0, y0, w, h, ds).max(initial=0.0) > 0.01:
            fold = upsample(f.fold, x0, y0, w, h, ds)
            hem *= 1 + 0.9 * fold
            eos *= 1 + 1.2 * fold
        hem *= t_alpha
        eos *= t_alpha
        return hem, eos

    def _adipocytes(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Membranes of a Voronoi pattern of fat cells (~70 um): 1 on membranes, 0 inside."""
        size = 70.0 / self.f.mpp
        gy, gx = np.floor(ys / size).astype(np.int64), np.floor(xs / size).astype(np.int64)
        ty = np.arange(gy.min() - 1, gy.max() + 2)  # the cells around the region, one point each
        tx = np.arange(gx.min() - 1, gx.max() + 2)
        cyy, cxx = np.meshgrid(ty, tx, indexing="ij")
        pts_y = (cyy + 0.15 + 0.7 * uniform(self.f.seed, cxx, cyy, 7, 0)) * size
        pts_x = (cxx + 0.15 + 0.7 * uniform(self.f.seed, cxx, cyy, 7, 1)) * size
        pts_y = pts_y.astype(np.float32)
        pts_x = pts_x.astype(np.float32)
        yf, xf = ys.astype(np.float32), xs.astype(np.float32)
        d1 = np.full(np.broadcast_shapes(ys.shape, xs.shape), np.inf, np.float32)  # squared distances
        d2 = d1.copy()
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                iy, ix = gy + oy - ty[0], gx + ox - tx[0]
                d = (yf - pts_y[iy, ix]) ** 2
                d += (xf - pts_x[iy, ix]) ** 2
                np.minimum(d2, np.maximum(d1, d), out=d2)
                np.minimum(d1, d, out=d1)
        gap = np.sqrt(d2) - np.sqrt(d1)
        return np.clip(1.0 - gap / np.float32(1.2 / self.f.mpp), 0, 1)

    # ------------------------------------------------------------------------------------------ nuclei
    def _nuclei(self, x0: int, y0: int, w: int, h: int, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Haematoxylin of nuclei and their coverage (alpha) on the region."""
        f, c, m = self.f, self.cell, self.margin
        nuc_h = np.zeros((h, w), np.float32)
        nuc_a = np.zeros((h, w), np.float32)
        cx = np.arange((x0 - m) // c, (x0 + w + m) // c + 1)
        cy = np.arange((y0 - m) // c, (y0 + h + m) // c + 1)
        gy, gx, slot = (a.ravel() for a in np.meshgrid(cy, cx, np.arange(SLOTS), indexing="ij"))

        def u(ch: int) -> np.ndarray:
            return uniform(f.seed, gx, gy, slot, ch).astype(np.float32)

        px, py = (gx + u(0)) * c, (gy + u(1)) * c
        tis = sample_points(f.tissue, px, py, f.ds)
        tum = np.clip((sample_points(f.tumour, px, py, f.ds) - 0.5) * 4 + 0.5, 0, 1)
        cel = sample_points(f.cellular, px, py, f.ds)
        fat = np.clip((sample_points(f.fat, px, py, f.ds) - 0.5) * 10 + 0.5, 0, 1)
        is_t = u(2) < tum
        is_l = ~is_t & (u(3) < cel)
        is_pale = is_l & (u(5) < 0.2)
        expected = np.where(is_t, 1.35, np.where(is_l, 2.6, 0.32)) * (1 - 0.97 * fat)
        keep = (tis > 0.5) & (u(4) < expected / SLOTS)
        if not keep.any():
            return nuc_h, nuc_a
        idx = np.nonzero(keep)[0]
        px, py, is_t, is_l, is_pale = px[idx], py[idx], is_t[idx], is_l[idx], is_pale[idx]
        gx, gy, slot = gx[idx], gy[idx], slot[idx]
        ori = sample_points(f.orient, px, py, f.ds)
        r6, r7, r8, r9, r13, r14, r15, r16 = (u(ch) for ch in (6, 7, 8, 9, 13, 14, 15, 16))
        z = (u(10) + u(11) + u(12)) * 2.0 - 3.0  # ~N(0, 1)
        # stroma: elongated fibroblasts along the fibres; lymphoid: small, round, dark; pale: larger, light
        a_um = np.where(is_l, 2.6 + 0.8 * r6, 3.5 + 2.5 * r6)
        b_um = np.where(is_l, a_um / (1 + 0.25 * r7), a_um / (2.5 + 1.5 * r7))
        a_um = np.where(is_pale, 3.4 + 1.2 * r6, a_um)
        b_um = np.where(is_pale, a_um / (1.1 + 0.4 * r7), b_um)
        angle = np.where(is_l, 2 * np.pi * r8, np.where(ori > 0.5, 0.0, np.pi / 2) + (r8 - 0.5) * 0.7)
        dark = np.where(is_l, 0.9 + 0.2 * r9, 0.6 + 0.2 * r9)
        dark = np.where(is_pale, 0.42 + 0.15 * r9, dark)
        # tumour: larger and pleomorphic (log-normal size), darker, irregular outline, coarse chromatin
        t_a = 4.8 * np.exp(0.22 * z)
        a_um = np.where(is_t, t_a, a_um)
        b_um = np.where(is_t, t_a / (1 + 0.55 * r7), b_um)
        angle = np.where(is_t, 2 * np.pi * r8, angle)
        dark = np.where(is_t, 0.95 + 0.3 * r9, dark)
        a_px, b_px = a_um / f.mpp, b_um / f.mpp
        irr = np.where(is_t, 0.08 + 0.17 * r13, 0.03 * r13)
        phase = r14 * 2 * np.pi
        nucleolus = is_t & (r15 < 0.7)
        chrom = sample_texture(self.tex.chrom, ys, xs)
        for i in range(len(idx)):
            reach = a_px[i] * (1 + irr[i]) + 1.5
            bx0, bx1 = max(int(px[i] - reach) - x0, 0), min(int(px[i] + reach) + 2 - x0, w)
            by0, by1 = max(int(py[i] - reach) - y0, 0), min(int(py[i] + reach) + 2 - y0, h)
            if bx0 >= bx1 or by0 >= by1:
                continue
            # offsets from the centre in global coordinates (float64 first): exact whatever the region
            dx = (np.arange(x0 + bx0, x0 + bx1) + (0.5 - float(px[i]))).astype(np.float32)[None, :]
            dy = (np.arange(y0 + by0, y0 + by1) + (0.5 - float(py[i]))).astype(np.float32)[:, None]
            cs, sn = np.float32(math.cos(angle[i])), np.float32(math.sin(angle[i]))
            uu, vv = dx * cs + dy * sn, dy * cs - dx * sn
            r2 = uu * uu + vv * vv + np.float32(1e-6)
            c2 = ((uu * uu - vv * vv) * np.float32(math.cos(phase[i])) - 2 * uu * vv * np.float32(math.sin(phase[i]))) / r2
            rho = np.sqrt((uu / np.float32(a_px[i])) ** 2 + (vv / np.float32(b_px[i])) ** 2)
            rho /= 1 + np.float32(irr[i]) * c2
            alpha = np.clip((1 - rho) * np.float32(b_px[i]) + np.float32(0.5), 0, 1)
            sl = (slice(by0, by1), slice(bx0, bx1))
            rim = np.minimum(rho, 1) ** 2
            if is_t[i]:  # coarse chromatin, membrane rim, often a nucleolus
                val = np.maximum(0.78 + 0.35 * rim + 0.3 * chrom[sl], 0.45) * alpha * np.float32(1.45 * dark[i])
                if nucleolus[i]:
                    ox, oy = (r16[i] - 0.5) * 0.6 * b_px[i], (r9[i] - 0.5) * 0.6 * b_px[i]
                    dn = np.sqrt((dx - ox) ** 2 + (dy - oy) ** 2)
                    val += np.clip(np.float32(0.9 / f.mpp + 0.5) - dn, 0, 1) * np.float32(0.8)
            else:
                val = (0.92 + 0.15 * rim + 0.1 * chrom[sl]) * alpha * np.float32(1.45 * dark[i])
            np.maximum(nuc_h[sl], val, out=nuc_h[sl])
            np.maximum(nuc_a[sl], alpha, out=nuc_a[sl])
        return nuc_h, nuc_a
