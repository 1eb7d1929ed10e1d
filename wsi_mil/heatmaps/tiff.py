"""Pyramidal TIFF heatmaps that slide viewers (OpenSlide, QuPath, ASAP) open as multi-level images.

Layout (OpenSlide's ``generic-tiff``): every level is a tiled page in the main IFD chain, level 0
first, each further level half the size of the one before (``subfiletype=1`` marks the reduced
ones) until the longest side fits in one tile. Resolution tags are in CENTIMETER so OpenSlide
reports ``openslide.mpp-x``/``mpp-y``. SubIFD pyramids are not used: OpenSlide does not see them
as levels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tifffile

from wsi_mil.stores import atomic_output

log = logging.getLogger(__name__)

__all__ = ["pyramid_levels", "write_pyramidal_tiff"]


def _half(image: np.ndarray) -> np.ndarray:
    """Downsample an [H, W, C] uint8 image by 2 with a 2x2 box filter (odd edges are repeated)."""
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    acc = image.astype(np.uint16)
    acc = acc[0::2, 0::2] + acc[1::2, 0::2] + acc[0::2, 1::2] + acc[1::2, 1::2]
    return ((acc + 2) // 4).astype(np.uint8)


def pyramid_levels(image: np.ndarray, tile: int) -> list[np.ndarray]:
    """Level 0 and successive halvings until the longest side fits in one ``tile``."""
    levels = [image]
    while max(levels[-1].shape[:2]) > tile and min(levels[-1].shape[:2]) > 1:
        levels.append(_half(levels[-1]))
    return levels


def write_pyramidal_tiff(
    path: Path,
    rgb: np.ndarray,
    *,
    mpp: float | None,
    tile: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    description: str = "",
) -> Path:
    """Write an RGB image as a tiled pyramidal TIFF, atomically.

    Parameters
    ----------
    path:
        Output file (``.tif``).
    rgb:
        uint8 [H, W, 3] image, e.g. a colour-mapped heatmap.
    mpp:
        Microns per pixel of ``rgb`` (level 0 of the TIFF); written as CENTIMETER resolution tags on
        every level (scaled by each level's true downsample). ``None`` writes no resolution.
    tile:
        Tile side in pixels (multiple of 16).
    compression:
        ``"jpeg"`` (lossy, small) or ``"deflate"`` (lossless).
    quality:
        JPEG quality.
    description:
        Text stored in the ImageDescription of level 0 (must not start like a vendor format).

    Returns
    -------
    Path
        ``path``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"write_pyramidal_tiff needs a uint8 [H, W, 3] image, got {rgb.dtype} {rgb.shape}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"write_pyramidal_tiff got an empty image {rgb.shape}")
    if tile % 16:
        raise ValueError(f"tile size must be a multiple of 16, got {tile}")
    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number or None, got {mpp!r}")
    levels = pyramid_levels(np.ascontiguousarray(rgb), tile)
    width0 = rgb.shape[1]
    path = Path(path)
    with atomic_output(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as writer:
        for index, level in enumerate(levels):
            kwargs: dict = {}
            if mpp is not None:
                level_mpp = mpp * width0 / level.shape[1]
                per_cm = 1e4 / level_mpp
                kwargs.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            if compression == "jpeg":
                kwargs["compressionargs"] = {"level": quality}
            writer.write(
                level,
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if index else 0,
                description=description if (index == 0 and description) else None,
                metadata=None,  # no tifffile JSON description: it would hide the pyramid from OpenSlide
                **kwargs,
            )
    log.debug("wrote %s: %d levels, level 0 %s", path, len(levels), rgb.shape[:2])
    return path
