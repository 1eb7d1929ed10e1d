"""Per-slide heatmaps from per-patch scores and level-0 coordinates (pure rendering, no model code).

Inputs are what the earlier stages already saved: patch coordinates (level-0 x, y of each patch's
top-left corner), ``patch_size_level0`` and one score per patch (attention, instance probability...).
Nothing here re-extracts features.

Outputs per slide (:func:`render_slide_heatmap`):

``<id>.png``          overlay on the slide thumbnail: colour map over the scored patches only, tissue
                      outline, colour bar with its label;
``<id>.geojson``      one Polygon per patch in level-0 pixels with its score; QuPath imports it
                      (File > Import objects) and colours it with Measure > Show measurement maps;
``<id>_topk.png``     montage of the k highest-scoring patches, read from the patch store;
``<id>_heatmap.tif``  optional tiled pyramidal TIFF for slide viewers (see :mod:`wsi_mil.heatmap_tiff`).

Geometry (the one rule every raster here follows): a patch at level-0 ``(x, y)`` with side ``s`` covers
thumbnail pixels ``rows [floor(y/d), ceil((y+s)/d))`` and ``cols [floor(x/d), ceil((x+s)/d))`` for a
thumbnail with downsample ``d`` (level-0 px per thumbnail px), clipped to the image. Start is floored
and end ceiled, so every patch covers at least one pixel and neighbouring patches whose borders fall
inside a thumbnail pixel share it; pixels covered by several patches show the mean of their scores.
A tolerance of 1e-6 px absorbs floating error so exact multiples of ``d`` are not widened.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.config import HeatmapConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.heatmap_tiff import write_pyramidal_tiff
from wsi_mil.slides import slide_thumbnail  # re-exported: thumbnails through any slide reader
from wsi_mil.stores import atomic_output

log = logging.getLogger(__name__)

__all__ = [
    "SlideHeatmap",
    "localisation_auc",
    "normalize_scores",
    "overlay_rgb",
    "render_overlay",
    "render_slide_heatmap",
    "score_grid",
    "scores_geojson",
    "slide_thumbnail",
    "top_k_indices",
    "top_k_montage",
    "write_geojson",
    "write_pyramidal_tiff",
]

NORMALIZE_METHODS = ("raw", "rank", "percentile")
_EDGE_TOL = 1e-6


# ------------------------------------------------------------------------------------ normalisation
def _minmax(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] ignoring NaN; a constant (or single) input maps to 0.5."""
    out = np.full(values.shape, np.nan, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    lo = float(values[finite].min())
    hi = float(values[finite].max())
    if not hi > lo:  # constant or single value: never divide by zero
        out[finite] = 0.5
        return out
    kept = values[finite]
    if math.isfinite(hi - lo):
        out[finite] = np.clip((kept - lo) / (hi - lo), 0.0, 1.0)
    else:  # range beyond the float maximum: halve everything first
        out[finite] = np.clip((kept / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0), 0.0, 1.0)
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks / (n - 1) over the finite values, ties averaged; one value (or all tied) -> 0.5."""
    from scipy.stats import rankdata

    out = np.full(values.shape, np.nan, dtype=np.float64)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return out
    if n == 1:
        out[finite] = 0.5
        return out
    out[finite] = (rankdata(values[finite], method="average") - 1.0) / (n - 1)
    return out


def normalize_scores(
    scores: np.ndarray, method: str, *, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Map per-patch scores to [0, 1] for colouring.

    Parameters
    ----------
    scores:
        Per-patch scores (any shape; flattened to [N]).
    method:
        ``"raw"``: min-max to [0, 1]; ``"rank"``: rank / (N - 1), ties averaged (uniform over patches,
        so a map is never 'cold' everywhere); ``"percentile"``: clip to the ``percentiles`` (1st..99th
        by default) then min-max.
    percentiles:
        Lower and upper clip percentiles for ``"percentile"``.

    Returns
    -------
    np.ndarray
        float64 [N] in [0, 1]. Non-finite inputs (NaN, inf) stay NaN (and are left out of the
        statistics); a constant or single-value input gives 0.5; an empty input gives an empty array.
        Never divides by zero.
    """
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"unknown score normalisation {method!r}; use one of {', '.join(NORMALIZE_METHODS)}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        return values.copy()
    bad = ~np.isfinite(values)
    if bad.any():
        log.warning("%d of %d scores are not finite (NaN/inf); they are left out of the heatmap", int(bad.sum()),
                    values.size)
        values = np.where(bad, np.nan, values)
    if method == "raw":
        return _minmax(values)
    if method == "rank":
        return _ranks(values)
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if bad.all():
        return values
    lo, hi = np.nanpercentile(values, [lo_pct, hi_pct])
    return _minmax(np.clip(values, lo, hi))


# ------------------------------------------------------------------------------------------- raster
def _check_coords(coords: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    coords, scores = _check_coords(coords, scores)
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


# ---------------------------------------------------------------------------------------- overlays
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
    thumbnail = _as_rgb(thumbnail)
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


def _as_rgb(image: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------------------------------------ GeoJSON
@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many small acyclic containers."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _numbers(values: np.ndarray) -> list[int] | list[float]:
    """Plain Python numbers for JSON: ints when every value is integral, floats otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and np.all(values == np.round(values)) and np.all(np.abs(values) < 2**53):
        return values.astype(np.int64).tolist()
    return values.tolist()


def scores_geojson(
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    *,
    properties: Mapping[str, Any] | None = None,
    slide_id: str = "",
    measurements: Mapping[str, np.ndarray] | None = None,
    object_type: str = "tile",
    classification: str = "score",
    color: tuple[int, int, int] = (255, 0, 0),
) -> dict[str, Any]:
    """Patch polygons with their scores as a QuPath-importable GeoJSON FeatureCollection.

    Each feature is a Polygon with one closed ring of five points in level-0 pixels, ``(x, y)``,
    ``(x+s, y)``, ``(x+s, y+s)``, ``(x, y+s)``, ``(x, y)``. Its properties hold QuPath's keys
    (``objectType``, ``classification`` {name, color}, ``measurements`` as a name -> value dict, which
    QuPath 0.4+ reads; 0.2/0.3 read a list) plus plain ``score`` and ``patch_index``. Feature ids are
    UUID-shaped: a prefix derived from the slide id, then the patch index in hex (last 12 digits), so
    reruns give identical files.

    Parameters
    ----------
    coords, scores, patch_size_level0:
        [N, 2] level-0 x, y; [N] scores (written as ``score`` and ``measurements.score``); patch side.
        Patches with a non-finite score are left out (JSON has no NaN).
    properties:
        Collection-level metadata (run id, model, normalisation...) stored under the collection's
        ``properties`` member together with ``slide_id``; GeoJSON readers ignore it.
    slide_id:
        Slide id recorded in the collection and used for the feature ids.
    measurements:
        Further per-patch arrays [N] added to each feature's ``measurements`` (e.g. normalised score).
    object_type:
        QuPath object type: ``tile`` (default; a detection kind shown by measurement maps),
        ``detection`` or ``annotation``.
    classification, color:
        Name and RGB colour of the QuPath class given to every polygon.
    """
    coords, scores = _check_coords(coords, scores)
    size = float(patch_size_level0)
    if not (size > 0 and math.isfinite(size)):
        raise ValueError(f"patch_size_level0 must be a positive number, got {patch_size_level0!r}")
    extra: dict[str, np.ndarray] = {}
    for name, values in (measurements or {}).items():
        arr = np.asarray(values, dtype=np.float64).ravel()
        if arr.shape[0] != scores.shape[0]:
            raise ValueError(f"measurement {name!r} has {arr.shape[0]} values for {scores.shape[0]} patches")
        extra[name] = arr
    finite = np.isfinite(scores)
    if not finite.all():
        log.warning("%s: %d patches with a non-finite score left out of the GeoJSON", slide_id or "slide",
                    int((~finite).sum()))
    id_prefix = str(uuid.uuid5(uuid.NAMESPACE_URL, f"wsi-mil/{slide_id}"))[:24]  # 8-4-4-4- of a UUID
    keep = np.flatnonzero(finite)
    x0, y0 = _numbers(coords[keep, 0]), _numbers(coords[keep, 1])
    x1, y1 = _numbers(coords[keep, 0] + size), _numbers(coords[keep, 1] + size)
    score_list = scores[keep].tolist()
    extra_lists = {name: arr[keep].tolist() for name, arr in extra.items()}
    class_props = {"name": classification, "color": [int(c) for c in color]}
    features: list[dict[str, Any]] = []
    with _gc_paused():  # ~10 small containers per patch: the cyclic GC would rescan them over and over
        for j, i in enumerate(keep.tolist()):
            values = {"score": score_list[j]}
            for name, column in extra_lists.items():
                if math.isfinite(column[j]):
                    values[name] = column[j]
            features.append({
                "type": "Feature",
                "id": f"{id_prefix}{i:012x}",
                "geometry": {"type": "Polygon", "coordinates": [
                    [[x0[j], y0[j]], [x1[j], y0[j]], [x1[j], y1[j]], [x0[j], y1[j]], [x0[j], y0[j]]]]},
                "properties": {
                    "objectType": object_type,
                    "classification": dict(class_props),
                    "isLocked": False,
                    "score": score_list[j],
                    "patch_index": i,
                    "measurements": values,
                },
            })
    meta = {"slide_id": slide_id, "coordinates": "level-0 pixels, origin top-left",
            "patch_size_level0": size}
    meta.update(dict(properties or {}))
    return {"type": "FeatureCollection", "properties": meta, "features": features}


def write_geojson(path: Path, collection: Mapping[str, Any]) -> Path:
    """Write a GeoJSON dict atomically (strict JSON: NaN/inf are refused)."""
    path = Path(path)
    try:
        text = json.dumps(collection, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise ValueError(f"GeoJSON for {path} holds a NaN or infinite number ({exc}); drop those values") from None
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text)
    return path


# ------------------------------------------------------------------------------------------ top-k
def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, highest first (ties: lower index first)."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    if k <= 0 or values.size == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.flatnonzero(np.isfinite(values))
    order = np.argsort(-values[candidates], kind="stable")
    return candidates[order[:k]].astype(np.int64)


def _read_rows(patches: Any, indices: np.ndarray) -> np.ndarray:
    """Read only the given rows of an [N, P, P, 3] array (numpy, zarr or h5py-like)."""
    if len(indices) == 0:
        return np.zeros((0,) + tuple(patches.shape[1:]), dtype=np.uint8)
    order = np.argsort(indices)
    sorted_idx = indices[order]
    if isinstance(patches, np.ndarray):
        rows = patches[sorted_idx]
    elif hasattr(patches, "get_orthogonal_selection"):  # zarr: each touched chunk is decoded once
        rows = np.asarray(patches.get_orthogonal_selection((sorted_idx,)))
    else:
        rows = np.stack([np.asarray(patches[int(i)]) for i in sorted_idx])
    out = np.empty_like(rows)
    out[order] = rows
    return out


def top_k_montage(
    patches: Any,
    scores: np.ndarray,
    k: int,
    out_png: Path,
    *,
    title: str = "",
) -> Path:
    """Save a grid of the ``k`` highest-scoring patches, each captioned with rank, index and score.

    Only those ``k`` rows are read from ``patches`` ([N, P, P, 3] numpy, zarr or h5py array).
    Non-finite scores are never chosen. With no scored patch the image says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(scores, dtype=np.float64).ravel()
    if patches.shape[0] != values.shape[0]:
        raise ValueError(f"{patches.shape[0]} patches but {values.shape[0]} scores; they must match one to one")
    chosen = top_k_indices(values, k)
    rows = _read_rows(patches, chosen)
    n = len(chosen)
    cols = max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.0 * cols, 2.0 * nrows + (0.4 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    if n == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no scored patches", ha="center", va="center")
        ax.set_axis_off()
    for rank, (index, patch) in enumerate(zip(chosen, rows, strict=True)):
        ax = fig.add_subplot(nrows, cols, rank + 1)
        ax.imshow(_as_rgb(patch), interpolation="nearest")
        ax.set_title(f"#{rank + 1}  idx {int(index)}\n{values[index]:.4g}", fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_output(Path(out_png)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return Path(out_png)


# ------------------------------------------------------------------------------------- evaluation
def localisation_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of per-patch scores against binary per-patch ground truth (1 = tumour).

    Patches with a non-finite score are ignored. Returns NaN (with a ``UserWarning``) when only one
    class is present or no patch is scored.
    """
    from sklearn.metrics import roc_auc_score

    values = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(labels).ravel()
    if values.shape != truth.shape:
        raise ValueError(f"{values.shape[0]} scores but {truth.shape[0]} labels; they must match one to one")
    if truth.dtype != bool:
        unique = np.unique(truth[~np.isnan(truth.astype(np.float64))]) if truth.size else truth
        if not np.isin(unique, (0, 1)).all():
            raise ValueError(f"labels must be binary (0/1 or bool), got values {unique[:5].tolist()}")
    keep = np.isfinite(values)
    values, truth = values[keep], truth[keep].astype(bool)
    if values.size == 0 or truth.all() or not truth.any():
        warnings.warn("localisation AUC is undefined: the scored patches hold only one class", UserWarning,
                      stacklevel=2)
        return float("nan")
    return float(roc_auc_score(truth, values))


# ------------------------------------------------------------------------------------- whole slide
@dataclass
class SlideHeatmap:
    """Files written for one slide."""

    slide_id: str
    png: Path
    geojson: Path
    montage: Path | None
    tiff: Path | None


def _tiff_background(thumbnail: np.ndarray, scale: int, overlay: bool) -> np.ndarray:
    if not overlay:
        return np.full((thumbnail.shape[0] * scale, thumbnail.shape[1] * scale, 3), 255, dtype=np.uint8)
    if scale == 1:
        return thumbnail
    from PIL import Image

    size = (thumbnail.shape[1] * scale, thumbnail.shape[0] * scale)
    return np.asarray(Image.fromarray(thumbnail).resize(size, Image.Resampling.BILINEAR))


def render_slide_heatmap(
    *,
    slide_id: str,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: float,
    thumbnail: np.ndarray,
    downsample: float,
    out_dir: Path,
    cfg: HeatmapConfig,
    tissue_mask: np.ndarray | None = None,
    patches: Any = None,
    title: str = "",
    score_label: str = "score",
    mpp_level0: float | None = None,
    properties: Mapping[str, Any] | None = None,
) -> SlideHeatmap:
    """Write every heatmap output of one slide into ``out_dir``.

    Files: ``<id>.png`` (overlay with colour bar and tissue outline), ``<id>.geojson`` (``score`` = the
    given score, ``measurements`` also hold ``score_<normalize>``), ``<id>_topk.png`` when ``patches``
    is given and ``cfg.top_k > 0``, ``<id>_heatmap.tif`` when ``cfg.pyramidal_tiff`` (its MPP is
    ``mpp_level0 * downsample / cfg.tiff_scale`` when ``mpp_level0`` is known). Each file is written
    atomically. Raises :class:`~wsi_mil.errors.WsiMilError` naming the slide on inconsistent inputs.
    """
    out_dir = Path(out_dir)
    thumbnail = _as_rgb(thumbnail)
    try:
        coords, raw = _check_coords(coords, scores)
    except ValueError as exc:
        raise WsiMilError(f"heatmap for slide {slide_id}: {exc}.") from None
    if patches is not None and patches.shape[0] != raw.shape[0]:
        raise WsiMilError(
            f"heatmap for slide {slide_id}: the patch store has {patches.shape[0]} patches but there are "
            f"{raw.shape[0]} scores; re-extract the features from this patch store."
        )
    norm = normalize_scores(raw, cfg.normalize, percentiles=(cfg.percentile_low, cfg.percentile_high))
    shape = thumbnail.shape[:2]
    grid, coverage = score_grid(coords, norm, patch_size_level0, downsample, shape)
    if raw.size and not coverage.any():
        log.warning("%s: no scored patch falls inside the thumbnail (check coords and downsample)", slide_id)

    finite = raw[np.isfinite(raw)]
    if cfg.normalize == "raw" and finite.size:
        value_range = (float(finite.min()), float(finite.max()))
        label = score_label
    else:
        value_range = (0.0, 1.0)
        label = f"{score_label} ({cfg.normalize}-normalised)"
    png = render_overlay(
        thumbnail, grid, tissue_mask=tissue_mask, cmap=cfg.colormap, alpha=cfg.alpha,
        title=title or slide_id, out_png=out_dir / f"{slide_id}.png", score_label=label, value_range=value_range,
    )

    meta = {"normalize": cfg.normalize, "score_label": score_label}
    meta.update(dict(properties or {}))
    collection = scores_geojson(
        coords, raw, patch_size_level0, properties=meta, slide_id=slide_id,
        measurements={f"score_{cfg.normalize}": norm}, object_type=cfg.geojson_object_type,
        classification=score_label,
    )
    geojson = write_geojson(out_dir / f"{slide_id}.geojson", collection)

    montage = None
    if patches is not None and cfg.top_k > 0:
        montage = top_k_montage(patches, raw, cfg.top_k, out_dir / f"{slide_id}_topk.png",
                                title=f"{slide_id}: top {cfg.top_k} by {score_label}")

    tiff = None
    if cfg.pyramidal_tiff:
        scale = cfg.tiff_scale
        big_shape = (shape[0] * scale, shape[1] * scale)
        big_grid, _ = score_grid(coords, norm, patch_size_level0, downsample / scale, big_shape)
        background = _tiff_background(thumbnail, scale, cfg.tiff_overlay)
        alpha = cfg.alpha if cfg.tiff_overlay else 1.0
        rgb = overlay_rgb(background, big_grid, cmap=cfg.colormap, alpha=alpha)
        mpp = mpp_level0 * downsample / scale if mpp_level0 else None
        tiff = write_pyramidal_tiff(out_dir / f"{slide_id}_heatmap.tif", rgb, mpp=mpp,
                                    compression=cfg.tiff_compression,
                                    description=f"wsi-mil heatmap {slide_id} ({score_label}, {cfg.normalize})")
    log.info("heatmap %s: %d patches -> %s", slide_id, raw.size, out_dir)
    return SlideHeatmap(slide_id=slide_id, png=png, geojson=geojson, montage=montage, tiff=tiff)
