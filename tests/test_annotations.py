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
    parse_asap_xml,
    parse_geojson,
    patch_tumour_fractions,
    polygon_fractions,
)
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
    polys = parse_asap_xml(tmp_path / "tumor_001.xml")
    assert len(polys) == 3 and sum(p.exclusion for p in polys) == 1
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
        parse_geojson(tmp_path / "odd.geojson")


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
    from_geojson = polygon_fractions(parse_geojson(tmp_path / "syn1_tumour.geojson"), coords, PS)
    assert from_mask is not None and from_mask.max() == pytest.approx(1.0)
    assert np.abs(from_mask - from_geojson).max() < 0.06
    assert np.array_equal(from_mask >= 0.5, from_geojson >= 0.5)
