"""Instance ground truth: tumour annotations -> per-patch tumour fractions and patch labels.

Supported sources, looked up in an annotations directory by slide id (first match wins):

1. ``<id>_tumour.png`` (or ``<id>_tumor.png``): a tumour mask as written by ``wsi-mil synth``
   (non-zero = tumour); its scale comes from ``<id>.json`` (key ``downsample``: level-0 pixels per
   mask pixel). This is the generator's own truth, so it is preferred when present.
2. ``<id>_tumour.geojson``, ``<id>_tumor.geojson`` or ``<id>.geojson``: GeoJSON (QuPath export or our
   generator) with Polygon / MultiPolygon geometries in level-0 pixel coordinates. Features without a
   class, or with a tumour-like class (``Tumor``, ``Tumour``, ``_0``, ``_1``, ``metastasis``...), are
   tumour; ``Exclusion`` / ``_2`` / ``Normal`` are cut out of the tumour; other classes are ignored.
3. ``<id>.xml``: CAMELYON16-style ASAP XML. Groups ``Tumor``, ``_0`` and ``_1`` are tumour, ``_2`` and
   ``Exclusion`` are cut out.

Every source becomes a binary raster (pixel ``[r, c]`` covers level-0
``[ox + c*ds, ox + (c+1)*ds) x [oy + r*ds, oy + (r+1)*ds)``; polygons are filled by pixel centre), and a
patch's tumour fraction is the exact area share of its square covered by tumour pixels (summed-area
table with bilinear corners, so partial pixels at the patch border count by area).

A slide without an annotation file gives ``None``: whether that means "all patches negative" (e.g. a
CAMELYON16 normal slide) is the caller's choice, made from the slide label.
"""

from __future__ import annotations

import json
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wsi_mil.errors import WsiMilError

logger = logging.getLogger(__name__)

TUMOUR_NAMES = {"tumor", "tumour", "tumor_region", "cancer", "carcinoma", "metastasis", "metastases",
                "positive", "_0", "_1", "tumor_0", "tumor_1"}
EXCLUSION_NAMES = {"_2", "exclusion", "exclude", "excluded", "normal", "negative", "non-tumor", "non-tumour",
                   "not tumor", "ignore"}
MAX_RASTER_SIDE = 4096  # largest raster side used to fill polygons (bounds memory on huge slides)
RASTER_PER_PATCH = 64  # raster pixels per patch side when filling polygons (bounded by MAX_RASTER_SIDE)

Ring = np.ndarray  # [K, 2] level-0 x, y


@dataclass
class PolygonAnnotation:
    """One polygon in level-0 pixel coordinates: an outer ring, optional holes, and its role."""

    exterior: Ring
    holes: list[Ring]
    exclusion: bool = False


@dataclass
class TumourRaster:
    """A binary tumour raster placed in level-0 space: mask[r, c] covers origin + (c, r) * downsample."""

    mask: np.ndarray
    downsample: float
    origin: tuple[float, float] = (0.0, 0.0)


# --------------------------------------------------------------------------------------------- fractions
def raster_fractions(raster: TumourRaster, coords: np.ndarray, patch_size_level0: float) -> np.ndarray:
    """Exact tumour area fraction of each patch square (coords: [N, 2] level-0 top-left x, y)."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    mask = np.asarray(raster.mask).astype(bool)
    h, w = mask.shape
    if coords.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    if h == 0 or w == 0 or not mask.any():
        return np.zeros(coords.shape[0], dtype=np.float64)
    dtype = np.int32 if h * w < 2**31 else np.int64
    sat = np.zeros((h + 1, w + 1), dtype=dtype)
    np.cumsum(np.cumsum(mask, axis=0, dtype=dtype), axis=1, dtype=dtype, out=sat[1:, 1:])
    ds = float(raster.downsample)
    x0 = (coords[:, 0] - raster.origin[0]) / ds
    y0 = (coords[:, 1] - raster.origin[1]) / ds
    side = float(patch_size_level0) / ds
    area = (_integral(sat, x0 + side, y0 + side) - _integral(sat, x0, y0 + side)
            - _integral(sat, x0 + side, y0) + _integral(sat, x0, y0))
    return np.clip(area / (side * side), 0.0, 1.0)


def _integral(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Area of tumour in [0, x] x [0, y] (raster units): bilinear in the summed-area table (exact)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    x = np.clip(x, 0.0, w)
    y = np.clip(y, 0.0, h)
    xi = np.minimum(np.floor(x).astype(np.int64), w - 1)
    yi = np.minimum(np.floor(y).astype(np.int64), h - 1)
    fx, fy = x - xi, y - yi
    s00 = sat[yi, xi].astype(np.float64)
    s01 = sat[yi, xi + 1].astype(np.float64)
    s10 = sat[yi + 1, xi].astype(np.float64)
    s11 = sat[yi + 1, xi + 1].astype(np.float64)
    return s00 * (1 - fx) * (1 - fy) + s01 * fx * (1 - fy) + s10 * (1 - fx) * fy + s11 * fx * fy


def rasterize_polygons(
    polygons: Sequence[PolygonAnnotation], coords: np.ndarray, patch_size_level0: float
) -> TumourRaster:
    """Fill tumour polygons (minus exclusions and holes) on a raster covering the given patches."""
    from skimage.draw import polygon as fill_polygon

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    ps = float(patch_size_level0)
    if coords.shape[0] == 0:
        return TumourRaster(np.zeros((0, 0), dtype=bool), 1.0)
    ox, oy = float(coords[:, 0].min()), float(coords[:, 1].min())
    extent = max(float(coords[:, 0].max()) + ps - ox, float(coords[:, 1].max()) + ps - oy)
    ds = max(ps / RASTER_PER_PATCH, extent / MAX_RASTER_SIDE)
    w = int(math.ceil((float(coords[:, 0].max()) + ps - ox) / ds))
    h = int(math.ceil((float(coords[:, 1].max()) + ps - oy) / ds))
    tumour = np.zeros((h, w), dtype=bool)
    excluded = np.zeros((h, w), dtype=bool)

    def ring_pixels(ring: Ring) -> tuple[np.ndarray, np.ndarray]:
        # pixel (r, c) is inside when its centre (c + 0.5, r + 0.5) is: shift vertices by half a pixel
        cols = (ring[:, 0] - ox) / ds - 0.5
        rows = (ring[:, 1] - oy) / ds - 0.5
        return fill_polygon(rows, cols, shape=(h, w))

    for poly in polygons:
        if poly.exterior.shape[0] < 3:
            continue
        rr, cc = ring_pixels(poly.exterior)
        if rr.size == 0:
            continue
        local = np.zeros((h, w), dtype=bool) if poly.holes else None
        if local is None:
            (excluded if poly.exclusion else tumour)[rr, cc] = True
            continue
        local[rr, cc] = True
        for hole in poly.holes:
            if hole.shape[0] >= 3:
                hr, hc = ring_pixels(hole)
                local[hr, hc] = False
        target = excluded if poly.exclusion else tumour
        target |= local
    tumour &= ~excluded
    return TumourRaster(tumour, ds, (ox, oy))


def polygon_fractions(
    polygons: Sequence[PolygonAnnotation], coords: np.ndarray, patch_size_level0: float
) -> np.ndarray:
    """Tumour fraction of each patch for polygon annotations (level-0 coordinates)."""
    raster = rasterize_polygons(polygons, coords, patch_size_level0)
    return raster_fractions(raster, coords, patch_size_level0)


# ------------------------------------------------------------------------------------------------ parsers
def _role(name: str | None) -> str:
    """'tumour', 'exclusion' or 'other' for a class/group name (None = unclassified = tumour)."""
    if name is None or str(name).strip() == "":
        return "tumour"
    key = str(name).strip().lower()
    if key in EXCLUSION_NAMES:
        return "exclusion"
    if key in TUMOUR_NAMES or key.startswith("tumo"):
        return "tumour"
    return "other"


def _geojson_class(props: Mapping[str, Any] | None) -> str | None:
    if not props:
        return None
    for key in ("classification", "class", "label", "name", "group"):
        value = props.get(key)
        if isinstance(value, Mapping):
            value = value.get("name")
        if value is not None and str(value).strip():
            return str(value)
    return None


def parse_geojson(path: Path) -> list[PolygonAnnotation]:
    """Polygons of a GeoJSON file (FeatureCollection, list of Features, Feature or bare geometry)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WsiMilError(f"annotation {path} is not readable GeoJSON ({exc}); re-export it from QuPath.") from None
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, list):
        features = data
    elif isinstance(data, Mapping) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, Mapping) and "coordinates" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]
    else:
        raise WsiMilError(f"annotation {path} is not a GeoJSON FeatureCollection; export the annotations as GeoJSON.")
    out: list[PolygonAnnotation] = []
    for feature in features:
        if not isinstance(feature, Mapping):
            continue
        geometry = feature.get("geometry") or {}
        role = _role(_geojson_class(feature.get("properties")))
        if role == "other":
            logger.debug("%s: ignoring a feature of class %s", path, _geojson_class(feature.get("properties")))
            continue
        for rings in _geometry_polygons(geometry, path):
            out.append(PolygonAnnotation(rings[0], rings[1:], exclusion=role == "exclusion"))
    return out


def _geometry_polygons(geometry: Mapping[str, Any], path: Path) -> Iterable[list[Ring]]:
    kind = geometry.get("type")
    try:
        if kind == "Polygon":
            yield [np.asarray(r, dtype=np.float64)[:, :2] for r in geometry["coordinates"]]
        elif kind == "MultiPolygon":
            for poly in geometry["coordinates"]:
                yield [np.asarray(r, dtype=np.float64)[:, :2] for r in poly]
        elif kind == "GeometryCollection":
            for sub in geometry.get("geometries", []):
                yield from _geometry_polygons(sub, path)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise WsiMilError(f"annotation {path} has a malformed {kind} geometry ({exc}); re-export it.") from None


def parse_asap_xml(path: Path) -> list[PolygonAnnotation]:
    """Polygons of a CAMELYON16-style ASAP XML file (``_0``/``_1``/Tumor positive, ``_2``/Exclusion cut out)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise WsiMilError(f"annotation {path} is not readable ASAP XML ({exc}); check the file.") from None
    out: list[PolygonAnnotation] = []
    for ann in root.iter("Annotation"):
        if (ann.get("Type") or "Polygon").lower() in {"dot", "pointset", "measurement"}:
            continue
        group = ann.get("PartOfGroup")
        role = _role(None if group in (None, "None", "") else group)  # ungrouped = tumour
        if role == "other":
            logger.debug("%s: ignoring annotation %s of group %s", path, ann.get("Name"), group)
            continue
        points = []
        for coord in ann.iter("Coordinate"):
            try:
                order = int(coord.get("Order", len(points)))
                x = float(str(coord.get("X")).replace(",", "."))
                y = float(str(coord.get("Y")).replace(",", "."))
            except ValueError:
                raise WsiMilError(f"annotation {path}: annotation {ann.get('Name')} has a non-numeric "
                                  "coordinate; fix the XML.") from None
            points.append((order, x, y))
        if len(points) < 3:
            continue
        points.sort(key=lambda p: p[0])
        ring = np.array([[x, y] for _, x, y in points], dtype=np.float64)
        out.append(PolygonAnnotation(ring, [], exclusion=role == "exclusion"))
    return out


def read_mask_png(png: Path, meta_json: Path | None) -> TumourRaster:
    """A synthetic tumour mask PNG and its level-0 downsample (from the slide's JSON metadata)."""
    from PIL import Image

    png = Path(png)
    downsample = None
    if meta_json is not None and Path(meta_json).is_file():
        try:
            meta = json.loads(Path(meta_json).read_text())
        except (OSError, ValueError) as exc:
            raise WsiMilError(f"truth metadata {meta_json} is not valid JSON ({exc}); regenerate it.") from None
        for key in ("downsample", "mask_downsample", "tumour_mask_downsample"):
            if isinstance(meta, Mapping) and meta.get(key) is not None:
                downsample = float(meta[key])
                break
    if downsample is None or downsample <= 0:
        raise WsiMilError(f"tumour mask {png} needs its scale: write {png.parent}/<slide_id>.json with "
                          '{"downsample": <level-0 pixels per mask pixel>}.')
    try:
        with Image.open(png) as img:
            arr = np.asarray(img)
    except OSError as exc:
        raise WsiMilError(f"tumour mask {png} is unreadable ({exc}); regenerate it.") from None
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return TumourRaster(arr > 0, downsample, (0.0, 0.0))


# --------------------------------------------------------------------------------------------- detection
def find_annotation(annotations_dir: Path, slide_id: str) -> tuple[str, Path] | None:
    """The annotation source for a slide: ('mask' | 'geojson' | 'asap', path), or None."""
    d = Path(annotations_dir)
    candidates = [
        ("mask", d / f"{slide_id}_tumour.png"), ("mask", d / f"{slide_id}_tumor.png"),
        ("geojson", d / f"{slide_id}_tumour.geojson"), ("geojson", d / f"{slide_id}_tumor.geojson"),
        ("geojson", d / f"{slide_id}.geojson"),
        ("asap", d / f"{slide_id}.xml"),
    ]
    for kind, path in candidates:
        if path.is_file():
            return kind, path
    return None


def patch_tumour_fractions(
    annotations_dir: Path, slide_id: str, coords: np.ndarray, patch_size_level0: float
) -> np.ndarray | None:
    """Tumour fraction [N] of each patch of a slide, or None when the slide has no annotation file."""
    found = find_annotation(annotations_dir, slide_id)
    if found is None:
        return None
    kind, path = found
    coords = np.asarray(coords).reshape(-1, 2)
    if kind == "mask":
        raster = read_mask_png(path, Path(annotations_dir) / f"{slide_id}.json")
        return raster_fractions(raster, coords, patch_size_level0)
    polygons = parse_geojson(path) if kind == "geojson" else parse_asap_xml(path)
    return polygon_fractions(polygons, coords, patch_size_level0)


def load_instance_labels(
    annotations_dir: Path, slide_id: str, coords: np.ndarray, patch_size_level0: float, threshold: float,
    *, normal_slide: bool = False,
) -> np.ndarray | None:
    """Binary patch labels [N] (1 = tumour fraction >= threshold), or None without an annotation file.

    A slide with no annotation file gives ``None``, unless ``normal_slide`` says it is a normal slide:
    then all its patches are negative (CAMELYON16 normals have no XML).
    """
    fractions = patch_tumour_fractions(annotations_dir, slide_id, coords, patch_size_level0)
    if fractions is None:
        return np.zeros(len(np.asarray(coords).reshape(-1, 2)), dtype=np.int64) if normal_slide else None
    return (fractions >= float(threshold) - 1e-9).astype(np.int64)
