"""Instance ground truth: tumour annotations -> per-patch tumour fractions and patch labels.

Supported sources, looked up in an annotations directory by slide id (first match wins):

1. ``<id>_tumour.png`` (or ``<id>_tumor.png``): a tumour mask as written by ``wsi-mil synth``
   (non-zero = tumour); its scale comes from ``<id>.json`` (key ``downsample``: level-0 pixels per
   mask pixel). This is the generator's own truth, so it is preferred when present.
2. ``<id>_tumour.geojson``, ``<id>_tumor.geojson`` or ``<id>.geojson``: GeoJSON (QuPath export or our
   generator) in level-0 pixel coordinates, read with QuPath's object model (:func:`read_geojson`).
3. ``<id>.xml``: CAMELYON16-style ASAP XML (:func:`read_asap_xml`).

Classes follow ``training.annotations`` (:class:`~wsi_mil.config.AnnotationsConfig`): an object's class
is its QuPath classification or ASAP group, never its name; each class is tumour, exclusion (cut out
of tumour) or other (kept with its name, not truth); unclassified areas are tumour by default. Points,
lines, and object types not read (QuPath detections by default) are ignored, each with its reason
(:class:`AnnotationSet`; ``wsi-mil annotations FILE`` prints them).

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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_mil.config import AnnotationsConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import slide_file

logger = logging.getLogger(__name__)

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
Role = Literal["tumour", "exclusion", "other"]
UNCLASSIFIED = "(unclassified)"

# QuPath <= 0.2 names the object type in the feature's id; QuPath 0.3+ writes properties.objectType
_QUPATH_OBJECT_IDS = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                      "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core",
                      "PathRootObject": "root"}
_NOT_AREAS = {"Point": "a point, not an area", "MultiPoint": "points, not an area",
              "LineString": "a line, not an area", "MultiLineString": "lines, not an area"}


@dataclass
class AreaAnnotation:
    """One area object as read: its class (``None`` = unclassified), its role and its polygons.

    ``name`` is the object's own name (QuPath ``name``, ASAP ``Name``): shown in reports, never the class.
    """

    index: int
    class_name: str | None
    role: Role
    polygons: list[PolygonAnnotation]
    name: str | None = None
    object_type: str = "annotation"

    @property
    def area_px(self) -> float:
        """Area in level-0 px^2: outer rings minus holes (shoelace formula), summed over the polygons."""
        return sum(_ring_area(p.exterior) - sum(_ring_area(h) for h in p.holes) for p in self.polygons)


@dataclass
class IgnoredObject:
    """An object of an annotation file that is not used, and why."""

    index: int
    geometry: str
    reason: str
    name: str | None = None
    class_name: str | None = None


@dataclass
class AnnotationSet:
    """Everything read from one annotation file: the areas kept and every object ignored."""

    path: Path
    format: Literal["geojson", "asap"]
    areas: list[AreaAnnotation]
    ignored: list[IgnoredObject]

    def truth_polygons(self) -> list[PolygonAnnotation]:
        """Tumour and exclusion polygons (areas of role ``other`` are not truth)."""
        return [p for a in self.areas if a.role != "other" for p in a.polygons]

    def summary(self, mpp: float | None = None) -> dict[str, Any]:
        """A JSON-friendly report: objects, polygons and area per class and role, and the ignored objects.

        ``mpp`` (level-0 um/px of the slide) adds areas in um^2; without it they are ``None``.
        ``bounds_px`` is [x_min, y_min, x_max, y_max] of all areas in level-0 px (``None`` without areas).
        """
        classes: dict[tuple[str, str], dict[str, Any]] = {}
        for area in self.areas:
            name = area.class_name if area.class_name is not None else UNCLASSIFIED
            row = classes.setdefault((name, area.role), {"class": name, "role": area.role, "objects": 0,
                                                         "polygons": 0, "area_px": 0.0})
            row["objects"] += 1
            row["polygons"] += len(area.polygons)
            row["area_px"] += area.area_px
        rows = sorted(classes.values(), key=lambda r: (("tumour", "exclusion", "other").index(r["role"]), r["class"]))
        for row in rows:
            row["area_um2"] = row["area_px"] * mpp * mpp if mpp else None
        rings = [p.exterior for a in self.areas for p in a.polygons]
        bounds = None
        if rings:
            points = np.concatenate(rings)
            bounds = [float(v) for v in (*points.min(axis=0), *points.max(axis=0))]
        roles = {role: sum(a.role == role for a in self.areas) for role in ("tumour", "exclusion", "other")}
        roles["ignored"] = len(self.ignored)
        return {
            "file": str(self.path), "format": self.format, "mpp": mpp, "classes": rows, "objects": roles,
            "bounds_px": bounds,
            "ignored": [{"index": o.index, "name": o.name, "class": o.class_name, "geometry": o.geometry,
                         "reason": o.reason} for o in self.ignored],
        }


def _ring_area(ring: Ring) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def class_role(class_name: str | None, rules: AnnotationsConfig) -> Role | None:
    """The role of a class under ``rules``: tumour, exclusion or other; ``None``: an unclassified object to ignore.

    Names match case-insensitively; a QuPath derived class (``Tumor: Positive``) that is not listed itself
    matches by its base class (``Tumor``). Exclusion wins over tumour.
    """
    if class_name is None or not class_name.strip():
        return None if rules.unclassified == "ignore" else rules.unclassified
    key = class_name.strip().lower()
    for candidate in (key, key.split(":", 1)[0].strip()):
        if candidate in rules.exclusion_classes:
            return "exclusion"
        if candidate in rules.tumour_classes:
            return "tumour"
    return "other"


def _qupath_class(props: Mapping[str, Any]) -> str | None:
    """QuPath's classification name (``{"name": ...}``, ``{"names": [...]}`` or a plain string); never ``name``."""
    value = props.get("classification")
    if isinstance(value, Mapping):
        names = value.get("names")
        value = ": ".join(str(n) for n in names) if isinstance(names, list) and names else value.get("name")
    return str(value) if value is not None and str(value).strip() else None


def _qupath_object_type(feature: Mapping[str, Any], props: Mapping[str, Any]) -> str:
    """QuPath's object type (``annotation`` for plain GeoJSON that does not say)."""
    kind = props.get("objectType")
    if isinstance(kind, str) and kind:
        return kind.lower()
    return _QUPATH_OBJECT_IDS.get(str(feature.get("id", "")), "annotation")


def _features(data: Any, path: Path) -> list[Any]:
    if isinstance(data, Mapping) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, Mapping) and "coordinates" in data:
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise WsiMilError(f"annotation {path} is not a GeoJSON FeatureCollection, Feature or list of Features; "
                      "export the annotations from QuPath as GeoJSON.")


def read_geojson(path: Path, rules: AnnotationsConfig | None = None) -> AnnotationSet:
    """Read a GeoJSON annotation file (QuPath export or any GeoJSON in level-0 pixel coordinates).

    Follows QuPath's object model: ``objectType`` (or, in QuPath <= 0.2 exports, the feature id
    ``PathAnnotationObject``/``PathDetectionObject``...) must be one of ``rules.object_types``; the class
    is ``properties.classification.name``, never ``properties.name``; unclassified areas take the role
    ``rules.unclassified``. Polygon and MultiPolygon (with holes; QuPath writes rectangles and ellipses
    as polygons) are areas; points and lines are ignored and reported with the reason.

    Raises
    ------
    WsiMilError
        The file is not JSON, not GeoJSON, or holds a malformed geometry (the message names the object).
    """
    path = Path(path)
    rules = rules or AnnotationsConfig()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WsiMilError(f"annotation {path} is not readable GeoJSON ({exc}); re-export it from QuPath.") from None
    areas: list[AreaAnnotation] = []
    ignored: list[IgnoredObject] = []
    for index, feature in enumerate(_features(data, path)):
        if not isinstance(feature, Mapping):
            ignored.append(IgnoredObject(index, type(feature).__name__, "not a GeoJSON Feature"))
            continue
        props = feature.get("properties") or {}
        props = props if isinstance(props, Mapping) else {}
        name = str(props["name"]) if props.get("name") is not None else None
        class_name = _qupath_class(props)
        geometry = feature.get("geometry") or {}
        kind = str(geometry.get("type", "none")) if isinstance(geometry, Mapping) else "none"
        object_type = _qupath_object_type(feature, props)
        reasons: list[tuple[str, str]] = []  # (geometry type, why it is ignored)
        rings: list[list[Ring]] = []
        if object_type not in rules.object_types:
            reasons.append((kind, f"QuPath {object_type} object; training.annotations.object_types reads "
                                  f"{', '.join(rules.object_types)}"))
        else:
            rings, not_areas = _geometry_parts(geometry, path, index)
            reasons += [(part, _NOT_AREAS.get(part, f"{part} geometry, not an area")) for part in not_areas]
            if not rings and not not_areas:
                reasons.append((kind, "no polygon with at least 3 points"))
        role = class_role(class_name, rules)
        if rings and role is None:
            reasons.append((kind, "unclassified area; training.annotations.unclassified is 'ignore'"))
        ignored += [IgnoredObject(index, part, why, name, class_name) for part, why in reasons]
        if rings and role is not None:
            polygons = [PolygonAnnotation(r[0], r[1:], exclusion=role == "exclusion") for r in rings]
            areas.append(AreaAnnotation(index, class_name, role, polygons, name, object_type))
    return AnnotationSet(path, "geojson", areas, ignored)


def _ring(points: Any) -> Ring:
    """A GeoJSON linear ring as [K, 2] x, y (a third coordinate, z, is dropped)."""
    ring = np.asarray(points, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[1] < 2:
        raise ValueError(f"a ring of shape {ring.shape} is not a list of [x, y] points")
    return ring[:, :2]


def _geometry_parts(geometry: Any, path: Path, index: int) -> tuple[list[list[Ring]], list[str]]:
    """(polygons as ring lists with >= 3 points each, geometry types that are not areas) of a geometry."""
    if not isinstance(geometry, Mapping):
        return [], []
    kind = geometry.get("type")
    polygons: list[list[Ring]] = []
    others: list[str] = []
    try:
        if kind == "Polygon":
            polygons.append([_ring(r) for r in geometry["coordinates"]])
        elif kind == "MultiPolygon":
            polygons.extend([_ring(r) for r in poly] for poly in geometry["coordinates"])
        elif kind == "GeometryCollection":
            for sub in geometry.get("geometries") or []:
                sub_polygons, sub_others = _geometry_parts(sub, path, index)
                polygons.extend(sub_polygons)
                others.extend(sub_others)
        elif kind is not None:
            others.append(str(kind))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise WsiMilError(f"annotation {path}: object {index} has a malformed {kind} geometry ({exc}); "
                          "re-export it.") from None
    kept = []
    for rings in polygons:
        if rings and rings[0].shape[0] >= 3:
            kept.append([rings[0]] + [h for h in rings[1:] if h.shape[0] >= 3])
    return kept, others


def read_asap_xml(path: Path, rules: AnnotationsConfig | None = None) -> AnnotationSet:
    """Read a CAMELYON16-style ASAP XML file: ``PartOfGroup`` is the class (``None`` = unclassified).

    With the default rules groups ``_0``/``_1``/``Tumor`` are tumour and ``_2``/``Exclusion`` are cut out.
    Polygon, Spline and Rectangle annotations are areas (a spline by its control points); Dot and
    PointSet (points) and Measurement (a line) are ignored and reported.

    Raises
    ------
    WsiMilError
        The XML is unreadable or holds a non-numeric coordinate.
    """
    path = Path(path)
    rules = rules or AnnotationsConfig()
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise WsiMilError(f"annotation {path} is not readable ASAP XML ({exc}); check the file.") from None
    areas: list[AreaAnnotation] = []
    ignored: list[IgnoredObject] = []
    for index, ann in enumerate(root.iter("Annotation")):
        name = ann.get("Name")
        kind = ann.get("Type") or "Polygon"
        group = ann.get("PartOfGroup")
        class_name = None if group in (None, "None", "") else group
        if kind.lower() in {"dot", "pointset"}:
            ignored.append(IgnoredObject(index, kind, "points, not an area", name, class_name))
            continue
        if kind.lower() == "measurement":
            ignored.append(IgnoredObject(index, kind, "a line (ASAP measurement), not an area", name, class_name))
            continue
        points = []
        for coord in ann.iter("Coordinate"):
            try:
                order = int(coord.get("Order", len(points)))
                x = float(str(coord.get("X")).replace(",", "."))
                y = float(str(coord.get("Y")).replace(",", "."))
            except ValueError:
                raise WsiMilError(f"annotation {path}: annotation {name} has a non-numeric coordinate; "
                                  "fix the XML.") from None
            points.append((order, x, y))
        if len(points) < 3:
            ignored.append(IgnoredObject(index, kind, "fewer than 3 points, not an area", name, class_name))
            continue
        role = class_role(class_name, rules)
        if role is None:
            ignored.append(IgnoredObject(index, kind, "unclassified area; training.annotations.unclassified is "
                                         "'ignore'", name, class_name))
            continue
        points.sort(key=lambda p: p[0])
        ring = np.array([[x, y] for _, x, y in points], dtype=np.float64)
        areas.append(AreaAnnotation(index, class_name, role, [PolygonAnnotation(ring, [], role == "exclusion")], name))
    return AnnotationSet(path, "asap", areas, ignored)


def read_annotations(path: Path, rules: AnnotationsConfig | None = None) -> AnnotationSet:
    """Read an annotation file by its suffix: ``.xml`` is ASAP XML, anything else GeoJSON."""
    path = Path(path)
    if not path.is_file():
        raise WsiMilError(f"annotation file {path} does not exist; pass a QuPath GeoJSON export or an ASAP XML file.")
    return read_asap_xml(path, rules) if path.suffix.lower() == ".xml" else read_geojson(path, rules)


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
TRUTH_FOLDERS = ("truth", "annotations")  # beside the slide folder (`wsi-mil synth` writes OUT/slides and OUT/truth)


def find_truth(slides_dir: Path | None, slide_ids: Sequence[str], *,
               beside: Sequence[Path] = ()) -> tuple[Path, int] | None:
    """A folder of ground truth beside (or inside) ``slides_dir`` that annotates some of ``slide_ids``.

    Looks in ``slides_dir/../truth``, ``slides_dir/../annotations``, ``slides_dir/truth`` and
    ``slides_dir/annotations``, then in ``truth`` and ``annotations`` inside each folder of ``beside``
    (e.g. the labels file's folder), for the files :func:`find_annotation` reads.

    Returns
    -------
    tuple of (Path, int) or None
        The first folder with annotations and how many of the slides it annotates.
    """
    bases = [Path(slides_dir).parent, Path(slides_dir)] if slides_dir is not None else []
    for base in [*bases, *map(Path, beside)]:
        for name in TRUTH_FOLDERS:
            folder = base / name
            if folder.is_dir():
                found = sum(find_annotation(folder, sid) is not None for sid in slide_ids)
                if found:
                    return folder, found
    return None


def find_annotation(annotations_dir: Path, slide_id: str) -> tuple[str, Path] | None:
    """The annotation source for a slide: ('mask' | 'geojson' | 'asap', path), or None."""
    candidates = [(kind, slide_file(annotations_dir, slide_id, suffix)) for kind, suffix in (
        ("mask", "_tumour.png"), ("mask", "_tumor.png"), ("geojson", "_tumour.geojson"), ("geojson", "_tumor.geojson"),
        ("geojson", ".geojson"), ("asap", ".xml"),
    )]
    for kind, path in candidates:
        if path.is_file():
            return kind, path
    return None


def patch_tumour_fractions(
    annotations_dir: Path, slide_id: str, coords: np.ndarray, patch_size_level0: float,
    rules: AnnotationsConfig | None = None,
) -> np.ndarray | None:
    """Tumour fraction [N] of each patch of a slide, or None when the slide has no annotation file.

    ``rules`` (default: the defaults of ``training.annotations``) say how GeoJSON / XML classes are read.
    Ignored objects are logged in one line; a file whose areas hold neither tumour nor exclusion
    classes is a warning naming the classes found (its slide then has no tumour).
    """
    found = find_annotation(annotations_dir, slide_id)
    if found is None:
        return None
    kind, path = found
    coords = np.asarray(coords).reshape(-1, 2)
    if kind == "mask":
        raster = read_mask_png(path, slide_file(annotations_dir, slide_id, ".json"))
        return raster_fractions(raster, coords, patch_size_level0)
    read = read_geojson(path, rules) if kind == "geojson" else read_asap_xml(path, rules)
    if read.ignored:
        reasons = Counter(o.reason for o in read.ignored)
        logger.info("%s: %d object(s) ignored (%s); `wsi-mil annotations %s` lists them", path, len(read.ignored),
                    "; ".join(f"{n} x {why}" for why, n in reasons.items()), path)
    truth = read.truth_polygons()
    if read.areas and not truth:
        classes = sorted({a.class_name or UNCLASSIFIED for a in read.areas})
        logger.warning("%s: none of its %d area(s) is tumour or exclusion (classes: %s), so slide %s has no "
                       "tumour; add the tumour class to training.annotations.tumour_classes if that is wrong",
                       path, len(read.areas), ", ".join(classes), slide_id)
    return polygon_fractions(truth, coords, patch_size_level0)


def load_instance_labels(
    annotations_dir: Path, slide_id: str, coords: np.ndarray, patch_size_level0: float, threshold: float,
    *, normal_slide: bool = False, rules: AnnotationsConfig | None = None,
) -> np.ndarray | None:
    """Binary patch labels [N] (1 = tumour fraction >= threshold), or None without an annotation file.

    A slide with no annotation file gives ``None``, unless ``normal_slide`` says it is a normal slide:
    then all its patches are negative (CAMELYON16 normals have no XML). ``rules``: see
    :func:`patch_tumour_fractions`.
    """
    fractions = patch_tumour_fractions(annotations_dir, slide_id, coords, patch_size_level0, rules)
    if fractions is None:
        return np.zeros(len(np.asarray(coords).reshape(-1, 2)), dtype=np.int64) if normal_slide else None
    return (fractions >= float(threshold) - 1e-9).astype(np.int64)
