"""Heatmap images: the colour-mapped score grid blended over the slide thumbnail, saved as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from wsi_mil.errors import WsiMilError
from wsi_mil.stores import atomic_output


def _colour_lut(cmap: str) -> np.ndarray:
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise WsiMilError(f"unknown colour map {cmap!r}; set heatmap.colormap to a matplotlib name (jet, viridis...).")\
            from None
    return (colormap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def overlay_rgb(thumbnail: np.ndarray, grid: np.ndarray, *, cmap: str, alpha: float) -> np.ndarray:
    """Blend the colour-mapped grid (values in [0, 1]) over the thumbnail where the grid is not NaN.

    Returns a uint8 [H, W, 3] image; uncovered pixels keep the thumbnail unchanged.
    """
    thumbnail = as_rgb(thumbnail)
    grid = np.asarray(grid)
    if grid.shape != thumbnail.shape[:2]:
        raise ValueError(f"grid shape {grid.shape} differs from the thumbnail's {thumbnail.shape[:2]}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    covered = np.isfinite(grid)
    index = (np.clip(np.nan_to_num(grid, nan=0.0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    colours = _colour_lut(cmap)[index]
    weight = (covered * np.float32(alpha))[..., None]
    blended = thumbnail.astype(np.float32)
    blended += (colours.astype(np.float32) - blended) * weight
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An image as uint8 [H, W, 3] RGB (grey is repeated, alpha dropped, values clipped)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be [H, W, 3] RGB, got shape {image.shape}")
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def _resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array to ``shape`` (pixel centres mapped)."""
    mask = np.asarray(mask)
    if mask.shape == tuple(shape):
        return mask
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0]).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1]).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _save_png_array(image: np.ndarray, out_png: Path) -> Path:
    from PIL import Image

    with atomic_output(Path(out_png)) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return Path(out_png)


def render_overlay(
    thumbnail: np.ndarray,
    grid: np.ndarray,
    *,
    tissue_mask: np.ndarray | None = None,
    cmap: str = "jet",
    alpha: float = 0.45,
    title: str = "",
    out_png: Path,
    score_label: str = "score",
    value_range: tuple[float, float] | None = None,
    bare: bool = False,
) -> Path:
    """Draw the heatmap over the slide thumbnail and save it as a PNG (atomically).

    Parameters
    ----------
    thumbnail:
        uint8 [H, W, 3] slide thumbnail.
    grid:
        float [H, W] scores in [0, 1] from :func:`score_grid`; NaN pixels stay uncoloured.
    tissue_mask:
        Optional bool mask (any size; resized to the thumbnail) outlined in black.
    cmap, alpha:
        Matplotlib colour map and opacity of the colour over covered pixels.
    title:
        Figure title.
    out_png:
        Output path.
    score_label:
        Colour bar label.
    value_range:
        Values shown at the colour bar's ends (default 0..1; e.g. the raw score range for 'raw').
    bare:
        Write only the blended image at exactly the thumbnail's resolution (no title, colour bar or
        outline): pixel (r, c) of the PNG is thumbnail pixel (r, c).

    Returns
    -------
    Path
        ``out_png``.
    """
    image = overlay_rgb(thumbnail, grid, cmap=cmap, alpha=alpha)
    if bare:
        return _save_png_array(image, out_png)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    longest = max(height, width, 1)
    shown = min(max(longest, 480), 1400)  # displayed size of the longest side, in figure pixels
    dpi = 100.0
    scale = shown / longest
    fig = Figure(figsize=(width * scale / dpi + 1.6, height * scale / dpi + (0.6 if title else 0.2)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, interpolation="nearest")
    if tissue_mask is not None:
        mask = _resize_nearest(np.asarray(tissue_mask).astype(bool), (height, width))
        if mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors="black", linewidths=0.8)
    ax.set_axis_off()
    lo, hi = value_range if value_range is not None else (0.0, 1.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        lo, hi = (lo, lo + 1.0) if math.isfinite(lo) else (0.0, 1.0)
    mappable = ScalarMappable(norm=Normalize(vmin=lo, vmax=hi), cmap=cmap)
    colorbar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02)
    colorbar.set_label(score_label)
    if title:
        ax.set_title(title, fontsize=10)
    with atomic_output(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return Path(out_png)
