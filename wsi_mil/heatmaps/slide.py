"""Every heatmap file of one slide, and the slide thumbnail they are drawn on."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.config import HeatmapConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.heatmaps.geojson import scores_geojson, write_geojson
from wsi_mil.heatmaps.montage import top_k_montage
from wsi_mil.heatmaps.normalise import comparable_scores, normalize_scores, resolve_method
from wsi_mil.heatmaps.rasterise import check_coords, score_grid
from wsi_mil.heatmaps.render import as_rgb, overlay_rgb, render_overlay
from wsi_mil.heatmaps.tiff import write_pyramidal_tiff
from wsi_mil.layout import slide_file

log = logging.getLogger(__name__)



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
    model_name: str = "",
    bounds: tuple[float, float] | None = None,
) -> SlideHeatmap:
    """Write every heatmap output of one slide into ``out_dir`` (each file atomically).

    Parameters
    ----------
    slide_id : str
        Names the files and the GeoJSON features.
    coords : np.ndarray
        int or float [N, 2], level-0 x, y of each patch's top-left corner.
    scores : np.ndarray
        float [N], one score per patch (attention, instance probability); non-finite ones are left out.
    patch_size_level0 : float
        Patch side in level-0 pixels.
    thumbnail : np.ndarray
        uint8 [H, W, 3] slide thumbnail.
    downsample : float
        Level-0 pixels per thumbnail pixel.
    out_dir : Path
        Where the files go.
    cfg : HeatmapConfig
        Normalisation, colour map, opacity, top-k, GeoJSON object type, TIFF settings.
    tissue_mask : np.ndarray, optional
        bool mask (any size) outlined on the PNG.
    patches : array-like, optional
        uint8 [N, P, P, 3] patches (numpy, zarr or h5py) for the top-k montage.
    title, score_label : str
        PNG title; what the scores are (colour bar, GeoJSON class).
    mpp_level0 : float, optional
        Level-0 um/px; the TIFF's MPP is ``mpp_level0 * downsample / cfg.tiff_scale``.
    properties : mapping, optional
        Extra collection properties of the GeoJSON (model, run id...).
    model_name : str
        The model's label; decides what ``cfg.normalize == "auto"`` means
        (:func:`wsi_mil.heatmaps.normalise.resolve_method`).
    bounds : tuple of float, optional
        The cohort's clip range for the ``cohort`` scale (:func:`wsi_mil.heatmaps.normalise.cohort_bounds`
        of every slide's :func:`~wsi_mil.heatmaps.normalise.comparable_scores`); without it the slide's own.

    Returns
    -------
    SlideHeatmap
        ``<id>.png`` (overlay with colour bar and tissue outline), ``<id>.geojson`` (``score`` = the given
        score, ``measurements`` also ``score_<scale>``, the scale being ``cfg.normalize`` resolved), ``<id>_topk.png`` when ``patches`` is given
        and ``cfg.top_k > 0``, ``<id>_heatmap.tif`` when ``cfg.pyramidal_tiff``.

    Raises
    ------
    WsiMilError
        Naming the slide, when coordinates, scores and patches do not match.
    """
    out_dir = Path(out_dir)
    thumbnail = as_rgb(thumbnail)
    try:
        coords, raw = check_coords(coords, scores)
    except ValueError as exc:
        raise WsiMilError(f"heatmap for slide {slide_id}: {exc}.") from None
    if patches is not None and patches.shape[0] != raw.shape[0]:
        raise WsiMilError(
            f"heatmap for slide {slide_id}: the patch store has {patches.shape[0]} patches but there are "
            f"{raw.shape[0]} scores; re-extract the features from this patch store."
        )
    method = resolve_method(cfg.normalize, model_name)
    percentiles = (cfg.percentile_low, cfg.percentile_high)
    shown, scaled = comparable_scores(raw) if method == "cohort" else (raw, False)
    norm = normalize_scores(shown, method, percentiles=percentiles, bounds=bounds)
    shape = thumbnail.shape[:2]
    grid, coverage = score_grid(coords, norm, patch_size_level0, downsample, shape)
    if raw.size and not coverage.any():
        log.warning("%s: no scored patch falls inside the thumbnail (check coords and downsample)", slide_id)

    finite = shown[np.isfinite(shown)]
    value_range = (0.0, 1.0)
    if method == "absolute":
        label = f"{score_label} (absolute scale, 0-1)"
    elif method == "cohort":
        value_range = bounds if bounds is not None else (
            tuple(float(v) for v in np.percentile(finite, percentiles)) if finite.size else (0.0, 1.0))
        what = f"{score_label} x patches (1 = uniform)" if scaled else score_label
        label = f"{what}, {'one scale for the cohort' if bounds is not None else 'scale of this slide only'}"
    elif method == "raw" and finite.size:
        value_range = (float(finite.min()), float(finite.max()))
        label = f"{score_label} (min-max of this slide only)"
    else:
        label = f"{score_label} ({method}-normalised, this slide only)"
    png = render_overlay(
        thumbnail, grid, tissue_mask=tissue_mask, cmap=cfg.colormap, alpha=cfg.alpha,
        title=title or slide_id, out_png=slide_file(out_dir, slide_id, ".png"), score_label=label, value_range=value_range,
    )

    meta = {"normalize": method, "score_label": score_label}
    meta.update(dict(properties or {}))
    collection = scores_geojson(
        coords, raw, patch_size_level0, properties=meta, slide_id=slide_id,
        measurements={f"score_{method}": norm}, object_type=cfg.geojson_object_type,
        classification=score_label, bin_by=f"score_{method}", colormap=cfg.colormap,
    )
    geojson = write_geojson(slide_file(out_dir, slide_id, ".geojson"), collection)

    montage = None
    if patches is not None and cfg.top_k > 0:
        montage = top_k_montage(patches, raw, cfg.top_k, slide_file(out_dir, slide_id, "_topk.png"),
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
        tiff = write_pyramidal_tiff(slide_file(out_dir, slide_id, "_heatmap.tif"), rgb, mpp=mpp,
                                    compression=cfg.tiff_compression,
                                    description=f"wsi-mil heatmap {slide_id} ({score_label}, {method})")
    log.info("heatmap %s: %d patches -> %s", slide_id, raw.size, out_dir)
    return SlideHeatmap(slide_id=slide_id, png=png, geojson=geojson, montage=montage, tiff=tiff)
