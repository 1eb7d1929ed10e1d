"""Patch polygons with their scores as QuPath-importable GeoJSON (level-0 pixel coordinates)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.heatmaps.rasterise import check_coords
from wsi_mil.stores import atomic_output

log = logging.getLogger(__name__)


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
    bins: int = 10,
    bin_by: str | None = None,
    colormap: str = "jet",
) -> dict[str, Any]:
    """Patch polygons with their scores as a QuPath-importable GeoJSON FeatureCollection.

    Each feature is a Polygon with one closed ring of five points in level-0 pixels, ``(x, y)``,
    ``(x+s, y)``, ``(x+s, y+s)``, ``(x, y+s)``, ``(x, y)``. Its properties hold QuPath's keys
    (``objectType``, ``classification`` {name, color}, ``measurements`` as a name -> value dict, which
    QuPath 0.4+ reads; 0.2/0.3 read a list) plus plain ``score`` and ``patch_index``.

    Each patch's class is its score bin, e.g. ``attention 0.90-1.00``, coloured by ``colormap`` at the bin
    centre, so QuPath draws the map by class colour without a measurement map. Feature ids are
    UUID-shaped: a prefix derived from the run id, model (``properties``) and slide id, then the patch
    index in hex (last 12 digits): two models' maps of one slide never share an id, and reruns give
    identical files. The collection's ``properties`` hold the slide, the run and model given, and the
    bins (``classes``: name, colour, lower and upper bound).

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
    classification:
        Prefix of the class names (the score's name, e.g. ``attention``).
    bins, bin_by, colormap:
        Number of equal score bins on [0, 1]; the measurement binned (values in [0, 1], e.g. the
        normalised ``score_rank``; ``None``: the scores min-max scaled); matplotlib colour map.
    """
    coords, scores = check_coords(coords, scores)
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
    meta = {"slide_id": slide_id, "coordinates": "level-0 pixels, origin top-left",
            "patch_size_level0": size}
    meta.update(dict(properties or {}))
    owner = f"wsi-mil/{meta.get('run_id', '')}/{meta.get('model', '')}/{slide_id}"
    id_prefix = str(uuid.uuid5(uuid.NAMESPACE_URL, owner))[:24]  # 8-4-4-4- of a UUID
    if bin_by is not None:
        level = np.clip(extra[bin_by], 0.0, 1.0)
    else:
        lo, hi = (float(scores[finite].min()), float(scores[finite].max())) if finite.any() else (0.0, 0.0)
        level = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    import matplotlib

    cmap = matplotlib.colormaps[colormap]
    classes = [{"name": f"{classification} {b / bins:.2f}-{(b + 1) / bins:.2f}", "lower": b / bins,
                "upper": (b + 1) / bins, "color": [int(round(255 * c)) for c in cmap((b + 0.5) / bins)[:3]]}
               for b in range(bins)]
    # QuPath class of each bin; index -1: a patch whose binned value is missing
    qupath_classes = [{"name": c["name"], "color": c["color"]} for c in classes]
    qupath_classes.append({"name": f"{classification} n/a", "color": [128, 128, 128]})
    bin_of = np.where(np.isfinite(level), np.clip(np.floor(np.nan_to_num(level) * bins), 0, bins - 1), -1)
    bin_of = bin_of.astype(np.int64).tolist()
    keep = np.flatnonzero(finite)
    x0, y0 = _numbers(coords[keep, 0]), _numbers(coords[keep, 1])
    x1, y1 = _numbers(coords[keep, 0] + size), _numbers(coords[keep, 1] + size)
    score_list = scores[keep].tolist()
    extra_lists = {name: arr[keep].tolist() for name, arr in extra.items()}
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
                    "classification": dict(qupath_classes[bin_of[i]]),
                    "isLocked": False,
                    "score": score_list[j],
                    "patch_index": i,
                    "measurements": values,
                },
            })
    meta["classes"] = {"binned_by": bin_by or "score (min-max scaled)", "colormap": colormap, "bins": classes}
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
