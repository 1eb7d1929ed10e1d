"""Tissue segmentation on a slide thumbnail, and the QC images that show it.

The mask comes from the HSV saturation of the thumbnail (stained tissue is coloured, glass is grey or
white): median blur, a per-slide Otsu threshold (scaled, floored by a minimum saturation), weak-pixel
hysteresis so faint tissue attached to clear tissue is kept, removal of marker ink of any usual colour
(red, blue, green, black) by hue/saturation/value rules, morphological closing, hole filling and
small-piece removal by physical area. Every size is given in microns and converted with the
thumbnail's resolution, so results do not depend on the scanner. An empty result comes with its
reason (dark fluorescence scan, only pieces below the minimum area, only ink, no stain at all).
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
QC_JPEG_QUALITY = 90  # thumbnail and grid QC images: JPEG encodes ~15x faster than PNG at a quarter of the size

PEN_MIN_AREA_UM2 = 2_500.0  # smaller ink-coloured pieces are not marker strokes (blood, debris)
PEN_GROUP_UM = 16.0  # ink fragments closer than this count as one stroke
DARK_BACKGROUND = 80  # median thumbnail brightness (0-255) below which a scan is dark-field / fluorescence
THUMBNAIL_MAX_PIXELS = 40_000_000  # segmentation thumbnails never exceed this (memory bound)


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
    """Resolution of the segmentation thumbnail (um/px).

    ``thumbnail_mpp``, finer for small slides (so the longer side has ``thumbnail_min_size`` px), never
    finer than level 0, and coarser where needed to stay under ``THUMBNAIL_MAX_PIXELS``.
    """
    fine_enough = max(width, height) * mpp0 / params.thumbnail_min_size
    bounded = mpp0 * float(np.sqrt(float(width) * float(height) / THUMBNAIL_MAX_PIXELS))
    return max(mpp0, min(params.thumbnail_mpp, fine_enough), bounded)


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value (both uint8, 0-255) of an RGB uint8 image."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = np.maximum(np.maximum(r, g), b)  # elementwise: several times faster than a reduction over a 3-axis
    cmin = np.minimum(np.minimum(r, g), b)
    delta = (cmax - cmin).astype(np.uint16)
    sat = (delta * 255 + cmax // 2) // np.maximum(cmax, 1)
    return sat.astype(np.uint8), cmax


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees (0-360) of RGB pixels [..., 3] (0 for greys)."""
    rgbf = rgb.astype(np.float32)
    r, g, b = rgbf[..., 0], rgbf[..., 1], rgbf[..., 2]
    cmax = np.maximum(np.maximum(r, g), b)
    delta = cmax - np.minimum(np.minimum(r, g), b)
    safe = np.maximum(delta, 1e-6)
    hue = np.select([cmax == r, cmax == g], [((g - b) / safe) % 6.0, (b - r) / safe + 2.0], default=(r - g) / safe + 4.0)
    return np.where(delta > 0, hue * 60.0, 0.0).astype(np.float32)


def pen_mask(rgb: np.ndarray, um_per_px: float | None = None, min_area_um2: float = PEN_MIN_AREA_UM2) -> np.ndarray:
    """Pixels of marker ink of any usual colour: red, blue, green or black.

    Each ink has a colour H&E never has: bright saturated blue (hematoxylin is purple, or blue only
    where dark), green, pure red far more saturated than eosin (whose hue sits at 300-340 degrees,
    pink), and dark pixels without stain colour (black). When ``um_per_px`` is given, groups of ink
    pixels smaller than ``min_area_um2`` are dropped: a marker stroke is large, while red blood cells
    or a dark nucleus cluster are not. Returns a boolean mask [h, w] of an RGB uint8 image [h, w, 3].
    """
    sat, val = saturation_value(rgb)
    black = (val < 50) | ((val < 110) & (sat < 60))
    candidates = (sat > 40) & ~black
    hue = hue_degrees(rgb[candidates])
    s, v = sat[candidates], val[candidates]
    blue = (hue >= 180) & (hue <= 238) & (s > 80) & (v >= 100)  # dark blue-grey is dense hematoxylin
    green = (hue >= 75) & (hue < 180)
    red = ((hue >= 345) | (hue <= 20)) & (s >= 150)
    ink = black.copy()
    ink[candidates] = blue | green | red
    if um_per_px is not None and ink.any():
        ink = _drop_small_groups(ink, min_area_um2 / (um_per_px * um_per_px), PEN_GROUP_UM / um_per_px)
    return ink


def _drop_small_groups(mask: np.ndarray, min_px: float, gap_px: float) -> np.ndarray:
    """``mask`` without the groups of pieces (pieces closer than ``gap_px`` form a group) under ``min_px`` pixels.

    A stroke crossing tissue breaks into fragments; grouping keeps them together while isolated
    specks of the same colour go.
    """
    groups, n = ndimage.label(ndimage.binary_dilation(mask, iterations=max(1, int(round(gap_px)))))
    area = np.bincount(groups[mask], minlength=n + 1)
    keep = area >= min_px
    keep[0] = False
    return mask & keep[groups]


def _disk_chords(radius: float) -> list[tuple[int, int]]:
    """Rows of the disk ``dx^2 + dy^2 <= radius^2``: (dy, half width) per row offset dy."""
    r = int(np.floor(radius))
    return [(dy, int(np.floor(np.sqrt(radius * radius - dy * dy)))) for dy in range(-r, r + 1)]


def _dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by the disk of ``radius`` pixels; pixels outside the image count as background.

    The disk is split into horizontal chords: one 1-D running maximum per distinct chord width, then
    each row offset ORs its shifted copy in (a few cheap passes instead of a 2-D structuring element).
    """
    h, w = mask.shape
    src = mask.view(np.uint8)
    wide = {}
    out = np.zeros((h, w), dtype=bool)
    for dy, half in _disk_chords(radius):
        if half not in wide:
            wide[half] = ndimage.maximum_filter1d(src, 2 * half + 1, axis=1, mode="constant", cval=0).view(bool)
        row = wide[half]
        if dy >= 0:
            out[: h - dy] |= row[dy:]
        else:
            out[-dy:] |= row[: h + dy]
    return out


def binary_closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with the disk ``dx^2 + dy^2 <= radius^2`` (``radius`` in pixels).

    Tissue touching the image border is not eroded away (the image is padded before dilating, and the
    erosion treats what lies outside as tissue).
    """
    if radius < 1 or not mask.any():
        return mask
    pad = int(np.ceil(radius)) + 1
    dilated = _dilate_disk(np.pad(mask, pad, mode="constant"), radius)
    closed = ~_dilate_disk(~dilated, radius)
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


@dataclass
class TissueResult:
    """A tissue mask and what segmentation saw, to explain an empty result.

    ``mask`` is boolean [h, w] on the thumbnail; areas are in um^2.
    """

    mask: np.ndarray
    um_per_px: float
    threshold: float
    brightness: float  # median thumbnail value (0-255)
    ink_fraction: float  # share of the thumbnail that is marker ink
    pieces_removed: int  # tissue pieces below min_tissue_area_um2
    largest_removed_um2: float
    max_saturation: float

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.um_per_px * self.um_per_px

    def empty_reason(self, params: TissueParams) -> str:
        """Why the mask is empty, in one clause ("" when it is not)."""
        if self.mask.any():
            return ""
        if self.brightness < DARK_BACKGROUND:
            return (f"the scan is dark (median brightness {self.brightness:.0f}/255): it looks like a fluorescence or "
                    "dark-field image, and tissue detection is made for brightfield stains (H&E, IHC), so no "
                    "tissue was found")
        if self.pieces_removed:
            return (f"only tissue pieces below tissue.min_tissue_area_um2={params.min_tissue_area_um2:g} um^2 were "
                    f"found ({self.pieces_removed} piece(s), the largest {self.largest_removed_um2:.0f} um^2); lower "
                    "that key if they are real tissue")
        if self.ink_fraction > 0.001:
            return f"only marker ink ({100 * self.ink_fraction:.1f}% of the thumbnail) and no stained tissue was found"
        return (f"no stained tissue found (highest saturation {self.max_saturation:.0f}/255 against a threshold of "
                f"{self.threshold:.0f}); check the qc/ images, or try tissue.preset=faint for pale stains")


def detect_tissue(rgb: np.ndarray, um_per_px: float, params: TissueParams) -> TissueResult:
    """Tissue of an RGB uint8 thumbnail [h, w, 3] whose pixels are ``um_per_px`` microns wide.

    HSV saturation, median blur, per-slide Otsu threshold (scaled, floored) with weak-pixel hysteresis,
    marker ink removed (:func:`pen_mask`), closing, hole filling and small-piece removal in microns.
    A dark scan (fluorescence) gives an empty mask with the reason in :meth:`TissueResult.empty_reason`.
    """
    sat, val = saturation_value(rgb)
    brightness = float(np.median(val)) if val.size else 255.0
    k = max(1, int(params.median_blur) | 1)
    if k > 1:
        sat = median(sat, footprint=np.ones((k, k), dtype=bool))
    empty = np.zeros(sat.shape, dtype=bool)
    if brightness < DARK_BACKGROUND:
        return TissueResult(empty, um_per_px, 255.0, brightness, 0.0, 0, 0.0, float(sat.max(initial=0)))
    pens = pen_mask(rgb, um_per_px) if params.remove_pen else empty
    ink_fraction = float(pens.mean()) if pens.size else 0.0
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
    kept = _remove_small(mask, int(np.ceil(params.min_tissue_area_um2 / px_area)))
    removed, n_removed = ndimage.label(mask & ~kept)
    largest = float(np.bincount(removed.ravel())[1:].max(initial=0)) * px_area if n_removed else 0.0
    log.debug("tissue: threshold %.1f (low %.1f), %.1f%% tissue", high, low, 100.0 * kept.mean())
    return TissueResult(kept, um_per_px, high, brightness, ink_fraction, int(n_removed), largest,
                        float(sat.max(initial=0)))


def segment_tissue(rgb: np.ndarray, um_per_px: float, params: TissueParams) -> np.ndarray:
    """Boolean tissue mask [h, w] of an RGB thumbnail whose pixels are ``um_per_px`` microns wide."""
    return detect_tissue(rgb, um_per_px, params).mask


# ---------------------------------------------------------------------------------------- QC images
def save_qc_images(
    paths: Mapping[str, Path],
    thumbnail: np.ndarray,
    mask: np.ndarray,
    boxes: np.ndarray | None = None,
) -> dict[str, Path]:
    """Write the thumbnail and the patch grid (boxes over the thumbnail) as JPEGs, the tissue mask as a PNG.

    ``paths`` maps ``thumb``, ``mask`` and ``grid`` to their files (:meth:`wsi_mil.layout.Layout.qc_images`);
    ``boxes`` are [N, 4] x0, y0, x1, y1 in thumbnail pixels.
    """
    paths = {kind: Path(paths[kind]) for kind in ("thumb", "mask", "grid")}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(thumbnail).save(paths["thumb"], quality=QC_JPEG_QUALITY)
    Image.fromarray(mask).save(paths["mask"])  # 1-bit PNG
    faded = (thumbnail.astype(np.uint16) * 141 + 255 * 115) >> 8  # 0.55 x pixel + 0.45 x white
    grid = np.where(mask[..., None], thumbnail, faded.astype(np.uint8))
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    if boxes is not None:
        for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64):
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(0, 160, 0))
    image.save(paths["grid"], quality=QC_JPEG_QUALITY, subsampling=0)  # 4:4:4 keeps the 1 px box lines green
    return paths
