"""Tissue segmentation on a slide thumbnail, and the QC images that show it.

The mask comes from the HSV saturation of the thumbnail (stained tissue is coloured, glass is grey or
white): median blur, a per-slide Otsu threshold (scaled, floored by a minimum saturation), weak-pixel
hysteresis so faint tissue attached to clear tissue is kept, pen-mark removal by hue/value rules,
morphological closing, hole filling and small-piece removal by physical area. Every size is given in
microns and converted with the thumbnail's resolution, so results do not depend on the scanner.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.filters.rank import median

from wsi_mil.config import TissueConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueParams:
    """Effective segmentation parameters (a preset with explicit keys laid over it)."""

    thumbnail_mpp: float
    thumbnail_min_size: int
    median_blur: int
    saturation_threshold: float | None
    otsu_scale: float
    min_saturation: float
    remove_pen: bool
    closing_um: float
    min_tissue_area_um2: float
    max_hole_area_um2: float

    @classmethod
    def from_config(cls, cfg: TissueConfig) -> TissueParams:
        values = cfg.resolved()
        values.pop("preset")
        return cls(**values)


def thumbnail_mpp(width: int, height: int, mpp0: float, params: TissueParams) -> float:
    """Resolution of the segmentation thumbnail: ``thumbnail_mpp``, finer for small slides, never finer than level 0."""
    fine_enough = max(width, height) * mpp0 / params.thumbnail_min_size
    return max(mpp0, min(params.thumbnail_mpp, fine_enough))


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (both uint8, 0-255) of an RGB uint8 image."""
    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    delta = (cmax - cmin).astype(np.uint16)
    sat = (delta * 255 + cmax // 2) // np.maximum(cmax, 1)
    return sat.astype(np.uint8), cmax


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees (0-360) of RGB pixels [..., 3] (0 for greys)."""
    rgbf = rgb.astype(np.float32)
    r, g, b = rgbf[..., 0], rgbf[..., 1], rgbf[..., 2]
    cmax = rgbf.max(axis=-1)
    delta = cmax - rgbf.min(axis=-1)
    safe = np.maximum(delta, 1e-6)
    hue = np.select([cmax == r, cmax == g], [((g - b) / safe) % 6.0, (b - r) / safe + 2.0], default=(r - g) / safe + 4.0)
    return np.where(delta > 0, hue * 60.0, 0.0).astype(np.float32)


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of blue, green or black marker ink (hues and darkness H&E stain never has)."""
    sat, val = saturation_value(rgb)
    black = val < 45
    candidates = (sat > 40) & ~black
    hue = hue_degrees(rgb[candidates])
    s = sat[candidates]
    blue = (hue >= 180) & (hue <= 238) & (s > 80)  # blue with green >= red: hematoxylin has red >= green
    green = (hue >= 75) & (hue < 180)
    ink = black.copy()
    ink[candidates] = blue | green
    return ink


def binary_closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with a disk of ``radius`` pixels (Euclidean distance transforms: cost independent of radius).

    The image is padded first so tissue touching the border is not eroded away.
    """
    if radius < 1 or not mask.any():
        return mask
    pad = int(np.ceil(radius)) + 1
    padded = np.pad(mask, pad, mode="constant")
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad] | mask


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    if min_px <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_px
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    if max_px <= 0 or mask.all():
        return mask
    labels, n = ndimage.label(~mask)
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = areas < max_px
    fill[0] = False
    fill[border] = False
    return mask | fill[labels]


def segment_tissue(rgb: np.ndarray, um_per_px: float, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail whose pixels are ``um_per_px`` microns wide."""
    sat, _ = saturation_value(rgb)
    k = max(1, int(params.median_blur) | 1)
    if k > 1:
        sat = median(sat, footprint=np.ones((k, k), dtype=bool))
    pens = pen_mask(rgb) if params.remove_pen else np.zeros(sat.shape, dtype=bool)
    if params.remove_pen and pens.any():
        pens = ndimage.binary_dilation(pens, iterations=2)
    if params.saturation_threshold is not None:
        high = float(params.saturation_threshold)
    else:
        values = sat[~pens]
        otsu = float(threshold_otsu(values)) if values.size and values.max() > values.min() else 255.0
        high = max(params.min_saturation, otsu * params.otsu_scale)
    low = max(params.min_saturation, 0.5 * high)
    if low < high:
        mask = apply_hysteresis_threshold(sat, low, high)
    else:
        mask = sat > high
    mask &= ~pens
    mask = binary_closing(mask, params.closing_um / um_per_px)
    px_area = um_per_px * um_per_px
    mask = _fill_holes(mask, int(params.max_hole_area_um2 / px_area))
    mask = _remove_small(mask, int(np.ceil(params.min_tissue_area_um2 / px_area)))
    log.debug("tissue: threshold %.1f (low %.1f), %.1f%% tissue", high, low, 100.0 * mask.mean())
    return mask


# ---------------------------------------------------------------------------------------- QC images
def save_qc_images(
    paths: Mapping[str, Path],
    thumbnail: np.ndarray,
    mask: np.ndarray,
    boxes: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write the thumbnail, the tissue mask and the patch grid (boxes over the thumbnail) as PNGs.

    ``paths`` maps ``thumb``, ``mask`` and ``grid`` to their files (:meth:`wsi_mil.layout.Layout.qc_images`);
    ``boxes`` are [N, 4] x0, y0, x1, y1 in thumbnail pixels.
    """
    paths = {kind: Path(paths[kind]) for kind in ("thumb", "mask", "grid")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(thumbnail).save(paths["thumb"])
    Image.fromarray(mask.astype(np.uint8) * 255).save(paths["mask"])
    grid = thumbnail.astype(np.float32)
    outside = ~mask
    grid[outside] = grid[outside] * 0.55 + 255 * 0.45  # fade non-tissue
    image = Image.fromarray(grid.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64):
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 160, 0))
    image.save(paths["grid"])
    return paths
