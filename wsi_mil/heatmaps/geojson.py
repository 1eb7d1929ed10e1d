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
