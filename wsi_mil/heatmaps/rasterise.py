"""Patch squares with their scores rasterised onto a thumbnail-sized grid.

Geometry (the one rule every raster of a heatmap follows): a patch at level-0 ``(x, y)`` with side ``s``
covers thumbnail pixels ``rows [floor(y/d), ceil((y+s)/d))`` and ``cols [floor(x/d), ceil((x+s)/d))``
for a thumbnail with downsample ``d`` (level-0 px per thumbnail px), clipped to the image. Start is
floored and end ceiled, so every patch covers at least one pixel and neighbouring patches whose borders
fall inside a thumbnail pixel share it; pixels covered by several patches show the mean of their
scores. A tolerance of 1e-6 px absorbs floating error so exact multiples of ``d`` are not widened.
"""

from __future__ import annotations

import math

import numpy as np

_EDGE_TOL = 1e-6


def check_coords(coords: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates as float64 [N, 2] and scores as float64 [N]; ValueError when they do not match."""
    coords = np.asarray(coords, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if coords.size == 0:
        coords = coords.reshape(0, 2)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be [N, 2] level-0 x, y; got shape {coords.shape}")
    if coords.shape[0] != scores.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates but {scores.shape[0]} scores; they must match one to one")
    return coords, scores


def patch_pixel_bounds(
    coords: np.ndarray, patch_size_level0: float, downsample: float, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thumbnail pixel bounds ``(row0, row1, col0, col1)`` of each patch (half-open, clipped).

    ``row0 = floor(y / d)``, ``row1 = ceil((y + s) / d)``, same for columns with x; clipped to
    ``[0, H]`` / ``[0, W]``. A patch entirely outside the image gets an empty range.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if not (downsample > 0 and math.isfinite(downsample)):
        raise ValueError(f"downsample must be a positive number, got {downsample!r}")
    if not (patch_size_level0 > 0 and math.isfinite(patch_size_level0)):
        raise ValueError(f"patch_size_level0 must be a positive number, got {patch_size_level0!r}")
    height, width = int(shape[0]), int(shape[1])
    x, y = coords[:, 0], coords[:, 1]
    col0 = np.floor(x / downsample + _EDGE_TOL)
    col1 = np.ceil((x + patch_size_level0) / downsample - _EDGE_TOL)
    row0 = np.floor(y / downsample + _EDGE_TOL)
    row1 = np.ceil((y + patch_size_level0) / downsample - _EDGE_TOL)
    col0 = np.clip(col0, 0, width).astype(np.int64)
    col1 = np.clip(col1, 0, width).astype(np.int64)
    row0 = np.clip(row0, 0, height).astype(np.int64)
    row1 = np.clip(row1, 0, height).astype(np.int64)
    return row0, row1, col0, col1


def score_grid(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    downsample: float,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise patch squares with their scores onto a thumbnail-sized grid.

    Parameters
    ----------
    coords:
        [N, 2] level-0 x, y of each patch's top-left corner.
    scores:
        [N] scores (normally normalised to [0, 1]); non-finite scores are skipped.
    patch_size_level0:
        Patch side in level-0 pixels.
    downsample:
        Level-0 pixels per grid pixel (the thumbnail's downsample).
    shape:
        (H, W) of the grid (the thumbnail's shape).

    Returns
    -------
    grid, coverage
        float32 [H, W] mean score of the patches covering each pixel (NaN where none), and bool
        [H, W] True where at least one scored patch lies. See the module docstring for the rounding.
    """
    coords, scores = check_coords(coords, scores)
    height, width = int(shape[0]), int(shape[1])
    if height < 0 or width < 0:
        raise ValueError(f"grid shape must be non-negative, got {shape}")
    row0, row1, col0, col1 = patch_pixel_bounds(coords, patch_size_level0, downsample, (height, width))
    keep = np.isfinite(scores) & (row1 > row0) & (col1 > col0)
    row0, row1, col0, col1, values = row0[keep], row1[keep], col0[keep], col1[keep], scores[keep]
    # 2-D difference arrays: +v at the top-left corner, -v right and below, +v diagonally; the cumulative
    # sums over both axes then give every pixel the sum (and count) of the rectangles covering it.
    cells = (height + 1) * (width + 1)
    total = np.zeros(cells, dtype=np.float64)
    count = np.zeros(cells, dtype=np.int64)
    for rows, cols, sign in ((row0, col0, 1), (row0, col1, -1), (row1, col0, -1), (row1, col1, 1)):
        flat = rows * (width + 1) + cols
        total += sign * np.bincount(flat, weights=values, minlength=cells)
        count += sign * np.bincount(flat, minlength=cells)
    total = total.reshape(height + 1, width + 1).cumsum(axis=0).cumsum(axis=1)[:height, :width]
    count = count.reshape(height + 1, width + 1).cumsum(axis=0).cumsum(axis=1)[:height, :width]
    coverage = count > 0
    grid = np.full((height, width), np.nan, dtype=np.float32)
    grid[coverage] = (total[coverage] / count[coverage]).astype(np.float32)
    return grid, coverage
