"""Instance ground truth: GeoJSON / ASAP XML / mask PNG -> patch tumour fractions and labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.annotations import (
    PolygonAnnotation,
    find_annotation,
    load_instance_labels,
    patch_tumour_fractions,
    polygon_fractions,
    read_annotations,
    read_asap_xml,
    read_geojson,
)
from wsi_mil.config import AnnotationsConfig
from wsi_mil.errors import WsiMilError

PS = 100.0  # patch side in level-0 pixels


def grid(n: int = 10) -> np.ndarray:
    """A 10 x 10 patch grid with level-0 top-left coordinates 0, 100, ..., 900."""
    ys, xs = np.mgrid[0:n, 0:n] * int(PS)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_geojson(path: Path, polygons: list[tuple[list[list[float]], str | None]]) -> None:
    features = []
    for ring, cls in polygons:
        props = {} if cls is None else {"classification": {"name": cls, "color": [255, 0, 0]}}
        features.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": props})
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def index_of(coords: np.ndarray, x: int, y: int) -> int:
    return int(np.flatnonzero((coords[:, 0] == x) & (coords[:, 1] == y))[0])


def test_geojson_square_marks_exactly_the_covered_patches(tmp_path: Path) -> None:
    coords = grid()
    write_geojson(tmp_path / "s1_tumour.geojson", [(rect(200, 200, 500, 400), None)])
    labels = load_instance_labels(tmp_path, "s1", coords, PS, 0.5)
    assert labels is not None
    expected = {(x, y) for x in (200, 300, 400) for y in (200, 300)}
    got = {(int(coords[i, 0]), int(coords[i, 1])) for i in np.flatnonzero(labels)}
    assert got == expected


def test_partial_overlap_fractions(tmp_path: Path) -> None:
    coords = grid()
    # covers the right half of patch (100, 0), the left half of (200, 0), a quarter of (500, 500)
    write_geojson(tmp_path / "s2.geojson", [(rect(150, 0, 250, 100), "Tumor"), (rect(550, 550, 600, 600), "Tumor")])
    frac = patch_tumour_fractions(tmp_path, "s2", coords, PS)
    assert frac is not None
    assert frac[index_of(coords, 100, 0)] == pytest.approx(0.5, abs=0.02)
    assert frac[index_of(coords, 200, 0)] == pytest.approx(0.5, abs=0.02)
    assert frac[index_of(coords, 500, 500)] == pytest.approx(0.25, abs=0.02)
    assert frac[index_of(coords, 0, 0)] == 0.0
    assert frac.sum() == pytest.approx(1.25, abs=0.05)
    labels = load_instance_labels(tmp_path, "s2", coords, PS, 0.5)
    assert labels is not None and labels.sum() == 2  # the two half patches pass 0.5, the quarter does not
    assert load_instance_labels(tmp_path, "s2", coords, PS, 0.2).sum() == 3


def test_geojson_classes_holes_and_exclusions(tmp_path: Path) -> None:
    coords = grid()
    path = tmp_path / "s3.geojson"
    features = [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [rect(0, 0, 400, 400), rect(100, 100, 200, 200)]}},
        {"type": "Feature", "properties": {"classification": {"name": "Stroma"}},
         "geometry": {"type": "Polygon", "coordinates": [rect(600, 600, 900, 900)]}},
        {"type": "Feature", "properties": {"classification": {"name": "Exclusion"}},
         "geometry": {"type": "Polygon", "coordinates": [rect(300, 300, 400, 400)]}},
    ]
    path.write_text(json.dumps(features))  # QuPath may export a bare list of features
    frac = patch_tumour_fractions(tmp_path, "s3", coords, PS)
    assert frac is not None
    assert frac[index_of(coords, 0, 0)] == pytest.approx(1.0)
    assert frac[index_of(coords, 100, 100)] == 0.0  # hole
    assert frac[index_of(coords, 300, 300)] == 0.0  # exclusion
    assert frac[index_of(coords, 700, 700)] == 0.0  # other class ignored
    assert frac.sum() == pytest.approx(14.0, abs=0.05)


ASAP = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="600" Y="400" />
        <Coordinate Order="0" X="200" Y="100" />
        <Coordinate Order="1" X="600" Y="100" />
        <Coordinate Order="3" X="200" Y="400" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Spline" PartOfGroup="Tumor" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="850" Y="850" />
        <Coordinate Order="1" X="900" Y="850" />
        <Coordinate Order="2" X="900" Y="900" />
        <Coordinate Order="3" X="850" Y="900" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Polygon" PartOfGroup="_2" Color="#64FE2E">
      <Coordinates>
        <Coordinate Order="0" X="300" Y="200" />
        <Coordinate Order="1" X="400" Y="200" />
        <Coordinate Order="2" X="400" Y="300" />
        <Coordinate Order="3" X="300" Y="300" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 3" Type="Dot" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates><Coordinate Order="0" X="50" Y="50" /></Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups>
    <Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
    <Group Name="_2" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
  </AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_xml_into_patch_labels(tmp_path: Path) -> None:
    coords = grid()
    (tmp_path / "tumor_001.xml").write_text(ASAP)
    read = read_asap_xml(tmp_path / "tumor_001.xml")
    polys = read.truth_polygons()
    assert len(polys) == 3 and sum(p.exclusion for p in polys) == 1
    assert [(o.name, o.reason) for o in read.ignored] == [("Annotation 3", "points, not an area")]
    assert find_annotation(tmp_path, "tumor_001") == ("asap", tmp_path / "tumor_001.xml")
    labels = load_instance_labels(tmp_path, "tumor_001", coords, PS, 0.5)
    assert labels is not None
    expected = {(x, y) for x in (200, 300, 400, 500) for y in (100, 200, 300)} - {(300, 200)}
    got = {(int(coords[i, 0]), int(coords[i, 1])) for i in np.flatnonzero(labels)}
    assert got == expected
    frac = patch_tumour_fractions(tmp_path, "tumor_001", coords, PS)
    assert frac is not None
    assert frac[index_of(coords, 800, 800)] == pytest.approx(0.25, abs=0.02)  # the small Tumor square


def test_mask_png_route_equals_polygon_route(tmp_path: Path) -> None:
    coords = grid()
    ring = np.array([[130, 170], [780, 240], [640, 860], [210, 610]], dtype=float)
    ds = 4.0
    # the generator's mask: the same shape filled at downsample 4 (pixel centres inside the polygon)
    from skimage.draw import polygon as fill

    mask = np.zeros((260, 260), dtype=np.uint8)
    rr, cc = fill(ring[:, 1] / ds - 0.5, ring[:, 0] / ds - 0.5, shape=mask.shape)
    mask[rr, cc] = 255
    Image.fromarray(mask).save(tmp_path / "syn_tumour.png")
    (tmp_path / "syn.json").write_text(json.dumps({"downsample": ds, "label": "tumour"}))
    assert find_annotation(tmp_path, "syn")[0] == "mask"
    from_mask = patch_tumour_fractions(tmp_path, "syn", coords, PS)
    from_poly = polygon_fractions([PolygonAnnotation(ring, [])], coords, PS)
    assert from_mask is not None
    assert np.abs(from_mask - from_poly).max() < 0.05
    assert from_poly.max() == pytest.approx(1.0) and 0 < (from_poly > 0).sum() < len(coords)
    # a partially covered border patch has a fraction strictly between 0 and 1 in both routes
    border = np.flatnonzero((from_poly > 0.2) & (from_poly < 0.8))
    assert border.size > 0 and np.all((from_mask[border] > 0.1) & (from_mask[border] < 0.9))


def test_missing_and_bad_annotations(tmp_path: Path) -> None:
    coords = grid()
    assert load_instance_labels(tmp_path, "normal_001", coords, PS, 0.5) is None
    normal = load_instance_labels(tmp_path, "normal_001", coords, PS, 0.5, normal_slide=True)
    assert normal.shape == (len(coords),) and not normal.any()  # an unannotated normal slide is all negative
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(WsiMilError, match="bad.geojson"):
        load_instance_labels(tmp_path, "bad", coords, PS, 0.5)
    (tmp_path / "bad2.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(WsiMilError, match="bad2.xml"):
        load_instance_labels(tmp_path, "bad2", coords, PS, 0.5)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "nometa_tumour.png")
    with pytest.raises(WsiMilError, match="downsample"):
        load_instance_labels(tmp_path, "nometa", coords, PS, 0.5)
    (tmp_path / "odd.geojson").write_text(json.dumps({"type": "Topology"}))
    with pytest.raises(WsiMilError, match="odd.geojson"):
        read_geojson(tmp_path / "odd.geojson")


def test_synthetic_generator_truth_mask_and_geojson_agree(tmp_path: Path) -> None:
    """The files `wsi-mil synth` writes (mask PNG + JSON, GeoJSON outline) give the same patch labels."""
    from wsi_mil.synth.cohort import SlideTruth, save_truth

    ds = 8.0
    yy, xx = np.mgrid[0:125, 0:125]
    tumour = (xx - 50) ** 2 + (yy - 60) ** 2 < 30**2  # a disc of radius 240 level-0 px
    truth = SlideTruth(slide_id="syn1", label=1, width=1000, height=1000, mpp=0.25, downsample=ds,
                       tissue_mask=np.ones_like(tumour), tumour_mask=tumour, tumour_fraction=float(tumour.mean()))
    save_truth(tmp_path, truth)
    coords = grid()
    from_mask = patch_tumour_fractions(tmp_path, "syn1", coords, PS)
    from_geojson = polygon_fractions(read_geojson(tmp_path / "syn1_tumour.geojson").truth_polygons(), coords, PS)
    assert from_mask is not None and from_mask.max() == pytest.approx(1.0)
    assert np.abs(from_mask - from_geojson).max() < 0.06
    assert np.array_equal(from_mask >= 0.5, from_geojson >= 0.5)


# ------------------------------------------------------------------------------ QuPath's object model
QUPATH_EXPORTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qupath-exports"


def qupath_export(name: str) -> Path:
    path = QUPATH_EXPORTS / name
    assert path.is_file(), f"the shared QuPath export is missing: {path}"
    return path


@pytest.mark.parametrize("name, area_px", [("qupath-polygon.json", None), ("qupath-rectangle.json", 210 * 176)])
def test_real_unclassified_qupath_areas_take_the_configured_role(name: str, area_px: float | None) -> None:
    path = qupath_export(name)
    read = read_geojson(path)  # default: unclassified areas are tumour
    assert [(a.class_name, a.role, a.object_type) for a in read.areas] == [(None, "tumour", "annotation")]
    assert read.areas[0].name == name.split("-")[1].split(".")[0]  # 'polygon' / 'rectangle': a name, not a class
    assert read.ignored == [] and len(read.truth_polygons()) == 1
    if area_px is not None:
        assert read.areas[0].area_px == pytest.approx(area_px)
    as_exclusion = read_geojson(path, AnnotationsConfig(unclassified="exclusion"))
    assert as_exclusion.areas[0].role == "exclusion" and as_exclusion.truth_polygons()[0].exclusion
    dropped = read_geojson(path, AnnotationsConfig(unclassified="ignore"))
    assert dropped.areas == [] and "unclassified" in dropped.ignored[0].reason


def test_real_qupath_rectangle_marks_the_patches_it_covers(tmp_path: Path) -> None:
    (tmp_path / "slide_a.geojson").symlink_to(qupath_export("qupath-rectangle.json"))
    xs, ys = np.meshgrid(np.arange(26200, 26600, 100), np.arange(15200, 15600, 100))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    frac = patch_tumour_fractions(tmp_path, "slide_a", coords, PS)  # rectangle x 26268-26478, y 15298-15474
    assert frac is not None
    assert frac[index_of(coords, 26300, 15300)] == pytest.approx(1.0)
    assert frac[index_of(coords, 26200, 15200)] == pytest.approx(0.32 * 0.02, abs=0.01)
    assert frac.sum() * PS * PS == pytest.approx(210 * 176, rel=0.02)


def test_real_classified_qupath_cells_keep_their_classes() -> None:
    path = qupath_export("qupath-polygon-cell-classified.json")
    read = read_geojson(path)
    assert sorted((a.class_name, a.role) for a in read.areas) == [("Cell", "other")] * 2 + [("Nucleus", "other")] * 2
    assert {a.name for a in read.areas} == {"Erythrocytes 1", "Erythrocytes 2", "Neutrophils 1", "Neutrophils 2"}
    assert read.truth_polygons() == []  # classes that are neither tumour nor exclusion are not truth
    mapped = read_geojson(path, AnnotationsConfig(tumour_classes=["NUCLEUS"], exclusion_classes=["cell"]))
    assert sorted((a.class_name, a.role) for a in mapped.areas) == [("Cell", "exclusion")] * 2 + [("Nucleus", "tumour")] * 2
    summary = read.summary(mpp=0.5)
    assert [(r["class"], r["role"], r["objects"]) for r in summary["classes"]] == [("Cell", "other", 2), ("Nucleus", "other", 2)]
    assert summary["classes"][0]["area_um2"] == pytest.approx(summary["classes"][0]["area_px"] * 0.25)


@pytest.mark.parametrize("name, geometry, reason", [("qupath-point.json", "Point", "a point, not an area"),
                                                    ("qupath-line.json", "LineString", "a line, not an area")])
def test_real_qupath_points_and_lines_are_reported_as_ignored(name: str, geometry: str, reason: str) -> None:
    read = read_annotations(qupath_export(name))
    assert read.areas == []
    assert [(o.index, o.geometry, o.reason, o.name) for o in read.ignored] == [(0, geometry, reason, name[7:-5])]
    assert read.summary()["objects"] == {"tumour": 0, "exclusion": 0, "other": 0, "ignored": 1}


def test_qupath_object_types_derived_classes_multipolygons_and_collections(tmp_path: Path) -> None:
    square = rect(0, 0, 400, 400)
    features = [
        {"type": "Feature", "id": "8f0c1a7e-0000-4000-8000-000000000001",  # QuPath 0.4+: a UUID id
         "geometry": {"type": "MultiPolygon", "coordinates": [[square, rect(100, 100, 200, 200)], [rect(600, 0, 700, 100)]]},
         "properties": {"objectType": "annotation", "name": "Exclusion", "classification": {"name": "Tumor: Positive"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [rect(0, 600, 100, 700)]},
         "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": [
            {"type": "Polygon", "coordinates": [[[x, y, 0.0] for x, y in rect(300, 300, 400, 400)]]},  # x, y, z
            {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}]},
         "properties": {"objectType": "annotation", "classification": {"name": "ignore*", "color": [1, 2, 3]}}},
    ]
    path = tmp_path / "s9.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    read = read_geojson(path)
    assert [(a.index, a.class_name, a.role, len(a.polygons)) for a in read.areas] == [
        (0, "Tumor: Positive", "tumour", 2), (2, "ignore*", "exclusion", 1)]
    assert read.areas[0].area_px == pytest.approx(400 * 400 - 100 * 100 + 100 * 100)
    assert [(o.index, o.geometry) for o in read.ignored] == [(1, "Polygon"), (2, "LineString")]
    assert "detection" in read.ignored[0].reason and "object_types" in read.ignored[0].reason
    frac = patch_tumour_fractions(tmp_path, "s9", grid(), PS)
    assert frac is not None
    assert frac[index_of(grid(), 100, 100)] == 0.0 and frac[index_of(grid(), 300, 300)] == 0.0  # hole, exclusion
    assert frac[index_of(grid(), 600, 0)] == pytest.approx(1.0) and frac[index_of(grid(), 0, 600)] == 0.0
    with_detections = read_geojson(path, AnnotationsConfig(object_types=["annotation", "detection"]))
    assert [a.index for a in with_detections.areas] == [0, 1, 2]


def test_file_with_only_unmapped_classes_warns_naming_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_geojson(tmp_path / "s10.geojson", [(rect(0, 0, 300, 300), "Stroma")])
    with caplog.at_level("WARNING", logger="wsi_mil.annotations"):
        frac = patch_tumour_fractions(tmp_path, "s10", grid(), PS)
    assert frac is not None and frac.sum() == 0.0
    assert "Stroma" in caplog.text and "tumour_classes" in caplog.text
