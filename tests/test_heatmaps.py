"""Tests of the heatmap rendering library (wsi_mil.heatmaps)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr
from PIL import Image

from wsi_mil.config import HeatmapConfig, load_config
from wsi_mil.errors import ConfigError, SlideError, WsiMilError
from wsi_mil.heatmaps import (
    normalize_scores,
    overlay_rgb,
    patch_pixel_bounds,
    render_overlay,
    render_slide_heatmap,
    score_grid,
    scores_geojson,
    top_k_indices,
    top_k_montage,
    write_geojson,
    write_pyramidal_tiff,
)
from wsi_mil.heatmaps.normalise import cohort_bounds, comparable_scores, resolve_method
from wsi_mil.mil.metrics import roc_auc
from wsi_mil.slides import slide_thumbnail
from wsi_mil.synth import write_slide

METHODS = ["raw", "rank", "percentile"]


def _no_partials(directory: Path) -> bool:
    return not [p for p in Path(directory).iterdir() if ".partial-" in p.name]


# ------------------------------------------------------------------------------------ normalisation
def test_rank_is_uniform_over_patches():
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=101) ** 4  # heavily skewed: min-max would look 'cold'
    out = normalize_scores(scores, "rank")
    np.testing.assert_allclose(np.sort(out), np.linspace(0, 1, 101))
    assert np.array_equal(np.argsort(out), np.argsort(scores))
    assert np.median(out) == pytest.approx(0.5)
    assert np.median(normalize_scores(scores, "raw")) < 0.05  # the 'cold' map rank normalisation avoids


def test_rank_averages_ties():
    np.testing.assert_allclose(normalize_scores(np.array([3.0, 1.0, 1.0, 2.0]), "rank"), [1.0, 1 / 6, 1 / 6, 2 / 3])


def test_raw_is_min_max():
    np.testing.assert_allclose(normalize_scores(np.array([2.0, 4.0, 3.0, 6.0]), "raw"), [0.0, 0.5, 0.25, 1.0])


def test_percentile_clips_outliers():
    scores = np.concatenate([np.arange(100.0), [1e6]])
    out = normalize_scores(scores, "percentile")
    assert out[-1] == 1.0 and out[0] == 0.0
    assert 0.4 < out[50] < 0.6  # the outlier does not squash everything else towards 0
    assert normalize_scores(scores, "raw")[50] < 1e-3
    wide = normalize_scores(scores, "percentile", percentiles=(0.0, 100.0))
    np.testing.assert_allclose(wide, normalize_scores(scores, "raw"))


@pytest.mark.parametrize("method", METHODS)
def test_constant_and_single_value_give_half(method):
    np.testing.assert_array_equal(normalize_scores(np.full(7, 3.3), method), np.full(7, 0.5))
    np.testing.assert_array_equal(normalize_scores(np.array([-2.0]), method), [0.5])


@pytest.mark.parametrize("method", METHODS)
def test_nan_and_inf_are_left_out(method):
    scores = np.array([0.0, np.nan, 1.0, np.inf, 0.5, -np.inf])
    out = normalize_scores(scores, method)
    assert np.isnan(out[[1, 3, 5]]).all()
    finite = out[[0, 2, 4]]
    assert np.isfinite(finite).all() and finite.min() == 0.0 and finite.max() == 1.0
    assert finite[2] == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_all_nan_do_not_crash(method):
    assert normalize_scores(np.array([]), method).shape == (0,)
    assert np.isnan(normalize_scores(np.array([np.nan, np.nan]), method)).all()
    out = normalize_scores(np.array([[1.0], [2.0], [3.0]]), method)  # [N, 1] from a model head
    assert out.shape == (3,) and out[0] == 0.0 and out[-1] == 1.0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown score normalisation"):
        normalize_scores(np.ones(3), "zscore")


def test_instance_probabilities_keep_their_absolute_scale():
    normal = np.array([0.02, 0.05, 0.1])
    assert resolve_method("auto", "ins") == "absolute"
    np.testing.assert_allclose(normalize_scores(normal, "absolute"), normal)  # a normal slide stays cool
    assert normalize_scores(normal, "rank").max() == 1.0  # what the per-slide scales would show instead
    np.testing.assert_allclose(normalize_scores(np.array([-0.5, 1.5]), "absolute"), [0.0, 1.0])


def test_attention_is_drawn_on_one_cohort_scale():
    assert resolve_method("auto", "abmil") == resolve_method("auto", "mhim(abmil)") == "cohort"
    assert resolve_method("rank", "ins") == "rank"
    uniform = np.full(50, 1 / 50)  # softmax attention, nothing stands out
    peaked = np.r_[np.full(9, 0.02), 0.82]  # a 10-patch slide with one hot patch
    shown = [comparable_scores(a)[0] for a in (uniform, peaked)]
    np.testing.assert_allclose(shown[0], 1.0)  # x patches: 1 = uniform, whatever the slide's size
    assert comparable_scores(np.array([0.3, 2.0]))[1] is False  # not summing to 1: left as they are
    bounds = cohort_bounds(shown, (0.0, 100.0))
    assert bounds == pytest.approx((0.2, 8.2))
    cool, hot = (normalize_scores(v, "cohort", bounds=bounds) for v in shown)
    assert cool.max() < 0.2 and hot.max() == 1.0  # per slide, both would reach 1
    np.testing.assert_allclose(normalize_scores(np.array([0.0, 5.0, 20.0]), "cohort", bounds=(0.0, 10.0)),
                               [0.0, 0.5, 1.0])


def test_huge_range_does_not_overflow():
    out = normalize_scores(np.array([-1e308, 0.0, 1e308]), "raw")
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0])


# --------------------------------------------------------------------------------------- score grid
def _reference_grid(coords, scores, size, d, shape):
    """Brute-force rasterisation following the documented rule, one patch at a time."""
    total = np.zeros(shape)
    count = np.zeros(shape, dtype=int)
    for (x, y), s in zip(coords, scores, strict=True):
        if not np.isfinite(s):
            continue
        r0, r1 = max(0, math.floor(y / d)), min(shape[0], math.ceil((y + size) / d))
        c0, c1 = max(0, math.floor(x / d)), min(shape[1], math.ceil((x + size) / d))
        if r1 > r0 and c1 > c0:
            total[r0:r1, c0:c1] += s
            count[r0:r1, c0:c1] += 1
    grid = np.full(shape, np.nan)
    grid[count > 0] = total[count > 0] / count[count > 0]
    return grid, count > 0


def test_planted_patch_lands_at_exact_pixels():
    grid, cov = score_grid(np.array([[8, 12]]), np.array([0.7]), 16, 4.0, (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[3:7, 2:6] = True  # rows y/d=3..(12+16)/4=7, cols x/d=2..(8+16)/4=6
    assert np.array_equal(cov, expected)
    assert grid.dtype == np.float32
    assert np.all(grid[expected] == np.float32(0.7)) and np.isnan(grid[~expected]).all()


def test_unaligned_patch_floors_start_and_ceils_end():
    grid, cov = score_grid(np.array([[10, 5]]), np.array([1.0]), 16, 4.0, (12, 12))
    rows, cols = np.nonzero(cov)
    assert (rows.min(), rows.max() + 1) == (1, 6)  # floor(5/4)=1, ceil(21/4)=6
    assert (cols.min(), cols.max() + 1) == (2, 7)  # floor(10/4)=2, ceil(26/4)=7


def test_overlaps_are_averaged_and_edges_clipped():
    coords = np.array([[0, 0], [8, 0], [36, 36], [-8, -8]])
    grid, cov = score_grid(coords, np.array([1.0, 0.0, 0.5, 0.25]), 16, 4.0, (10, 10))
    assert grid[0, 0] == pytest.approx((1.0 + 0.25) / 2)  # patch 0 and the clipped patch 3
    assert grid[0, 3] == pytest.approx(0.5)  # patches 0 and 1 overlap in cols 2..3
    assert grid[0, 5] == pytest.approx(0.0)
    assert cov[9, 9] and grid[9, 9] == pytest.approx(0.5)  # patch 2 clipped at the border
    assert not cov[5, 0]


def test_score_grid_matches_brute_force_with_fractional_downsample():
    rng = np.random.default_rng(3)
    coords = rng.integers(-300, 3000, size=(300, 2))
    scores = rng.random(300)
    scores[::17] = np.nan
    d = 2000 / 301
    grid, cov = score_grid(coords, scores, 224.0, d, (400, 420))
    ref, ref_cov = _reference_grid(coords, scores, 224.0, d, (400, 420))
    assert np.array_equal(cov, ref_cov)
    np.testing.assert_allclose(grid[cov], ref[cov], rtol=1e-5, atol=1e-6)
    assert np.isnan(grid[~cov]).all()


def test_exact_multiples_of_the_downsample_are_not_widened():
    d = 2048 / 3  # 2048 level-0 px over 3 thumbnail px: 682.67 px per thumbnail px
    row0, row1, col0, col1 = patch_pixel_bounds(np.array([[d * 1, d * 2]]), d, d, (10, 10))
    assert (col0[0], col1[0], row0[0], row1[0]) == (1, 2, 2, 3)


def test_score_grid_rejects_mismatch_and_empty_is_fine():
    with pytest.raises(ValueError, match="must match"):
        score_grid(np.zeros((3, 2)), np.zeros(2), 16, 4, (8, 8))
    grid, cov = score_grid(np.zeros((0, 2)), np.zeros(0), 16, 4, (8, 8))
    assert grid.shape == (8, 8) and not cov.any() and np.isnan(grid).all()


# ------------------------------------------------------------------------------------------ overlays
def _grid_with_hot_patch(shape=(60, 80)):
    """A 16x12 patch layout (level-0 patch 64 px, downsample 12.8) with one hot patch."""
    xs, ys = np.meshgrid(np.arange(0, 1024, 64), np.arange(0, 768, 64))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    scores = np.zeros(len(coords))
    hot = int(np.flatnonzero((coords[:, 0] == 640) & (coords[:, 1] == 320))[0])
    scores[hot] = 5.0
    d = 1024 / shape[1]
    return coords, scores, hot, d


def test_bare_overlay_puts_the_hot_patch_at_its_pixels(tmp_path):
    coords, scores, hot, d = _grid_with_hot_patch()
    thumb = np.full((60, 80, 3), 200, np.uint8)
    grid, _ = score_grid(coords, normalize_scores(scores, "raw"), 64, d, (60, 80))
    out = render_overlay(thumb, grid, tissue_mask=None, cmap="jet", alpha=1.0, title="", out_png=tmp_path / "b.png",
                         score_label="s", bare=True)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (60, 80, 3)
    red = (img[..., 0] - img[..., 2]) > 60  # jet: 1 -> dark red, 0 -> dark blue
    r0, r1, c0, c1 = (int(v[0]) for v in patch_pixel_bounds(coords[[hot]], 64, d, (60, 80)))
    expected = np.zeros((60, 80), bool)
    expected[r0:r1, c0:c1] = True
    assert (r0, r1, c0, c1) == (25, 30, 50, 55)  # y 320/12.8=25 .. 384/12.8=30; x 640/12.8=50 .. 55
    assert np.array_equal(red, expected)
    hottest = np.unravel_index(np.argmax(img[..., 0] - img[..., 2]), red.shape)
    assert expected[hottest]


def test_overlay_leaves_uncovered_pixels_untouched():
    thumb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    grid = np.full((20, 30), np.nan, np.float32)
    grid[5:10, 5:10] = 1.0
    out = overlay_rgb(thumb, grid, cmap="jet", alpha=0.5)
    covered = np.isfinite(grid)
    assert np.array_equal(out[~covered], thumb[~covered])
    assert not np.array_equal(out[covered], thumb[covered])
    with pytest.raises(ValueError, match="differs"):
        overlay_rgb(thumb, grid[:10], cmap="jet", alpha=0.5)


def test_figure_overlay_with_colour_bar_and_outline(tmp_path):
    coords, scores, _, d = _grid_with_hot_patch()
    thumb = np.full((60, 80, 3), 220, np.uint8)
    mask = np.zeros((30, 40), bool)  # tissue mask at another resolution than the thumbnail
    mask[5:25, 5:35] = True
    grid, _ = score_grid(coords, normalize_scores(scores, "rank"), 64, d, (60, 80))
    out = render_overlay(thumb, grid, tissue_mask=mask, cmap="jet", alpha=0.6, title="slide A",
                         out_png=tmp_path / "fig.png", score_label="attention", value_range=(-2.0, 7.0))
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[1] > img.shape[0] > 200  # shown enlarged, with the colour bar to the right
    assert _no_partials(tmp_path)


# ------------------------------------------------------------------------------------------ GeoJSON
def test_geojson_polygons_are_level0_patch_squares(tmp_path):
    coords = np.array([[0, 0], [512, 1024], [1536, 256]], dtype=np.int64)
    scores = np.array([0.1, 0.9, np.nan])
    fc = scores_geojson(coords, scores, 512.0, slide_id="s1", properties={"model": "abmil"},
                        measurements={"score_rank": np.array([0.0, 1.0, np.nan])})
    path = write_geojson(tmp_path / "s1.geojson", fc)
    data = json.loads(path.read_text())  # strict JSON round trip
    assert data["type"] == "FeatureCollection"
    assert data["properties"]["slide_id"] == "s1" and data["properties"]["model"] == "abmil"
    assert len(data["features"]) == 2  # the NaN-scored patch is left out
    for feature, i in zip(data["features"], [0, 1], strict=True):
        assert feature["type"] == "Feature"
        geom = feature["geometry"]
        assert geom["type"] == "Polygon" and len(geom["coordinates"]) == 1
        ring = geom["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        x, y = coords[i]
        assert {tuple(p) for p in ring} == {(x, y), (x + 512, y), (x + 512, y + 512), (x, y + 512)}
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] == ["score 0.00-0.10", "score 0.90-1.00"][i]  # min-max scaled bins
        assert len(props["classification"]["color"]) == 3
        assert props["score"] == scores[i] and props["measurements"]["score"] == scores[i]
        assert props["measurements"]["score_rank"] == float(i)
        assert props["patch_index"] == i
    ids = [f["id"] for f in data["features"]]
    assert len(set(ids)) == 2
    again = scores_geojson(coords, scores, 512.0, slide_id="s1", properties={"model": "abmil"})
    assert ids == [f["id"] for f in again["features"]]


def test_geojson_classes_are_coloured_score_bins_and_ids_belong_to_one_model():
    coords = np.array([[0, 0], [256, 0], [512, 0], [768, 0]], dtype=np.int64)
    raw = np.array([5.0, -2.0, 0.3, 7.0])
    rank = np.array([0.75, 0.0, 0.45, 1.0])
    fc = scores_geojson(coords, raw, 256.0, slide_id="s1", properties={"model": "abmil", "run_id": "r1"},
                        measurements={"score_rank": rank}, classification="attention", bin_by="score_rank",
                        colormap="viridis")
    names = [f["properties"]["classification"]["name"] for f in fc["features"]]
    assert names == ["attention 0.70-0.80", "attention 0.00-0.10", "attention 0.40-0.50", "attention 0.90-1.00"]
    bins = fc["properties"]["classes"]["bins"]
    assert len(bins) == 10 and fc["properties"]["classes"]["binned_by"] == "score_rank"
    colour_of = {b["name"]: b["color"] for b in bins}
    assert all(f["properties"]["classification"]["color"] == colour_of[n] for f, n in zip(fc["features"], names, strict=True))
    assert len({tuple(b["color"]) for b in bins}) == 10  # every bin its own colour
    assert fc["properties"]["model"] == "abmil" and fc["properties"]["run_id"] == "r1"
    ids = [f["id"] for f in fc["features"]]
    assert all(str(uuid.UUID(i)) == i for i in ids) and len(set(ids)) == 4
    other_model = scores_geojson(coords, raw, 256.0, slide_id="s1", properties={"model": "mhim", "run_id": "r2"})
    assert not set(ids) & {f["id"] for f in other_model["features"]}
    rerun = scores_geojson(coords, raw, 256.0, slide_id="s1", properties={"model": "abmil", "run_id": "r1"})
    assert [f["id"] for f in rerun["features"]] == ids


def test_geojson_keeps_fractional_patch_size():
    fc = scores_geojson(np.array([[10, 20]]), np.array([0.5]), 455.1, object_type="annotation")
    ring = fc["features"][0]["geometry"]["coordinates"][0]
    assert ring[2] == [pytest.approx(465.1), pytest.approx(475.1)]
    assert fc["features"][0]["properties"]["objectType"] == "annotation"


def test_write_geojson_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = write_geojson(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": []})
    before = path.read_text()
    with pytest.raises(ValueError, match="NaN"):
        write_geojson(path, {"type": "FeatureCollection", "features": [], "x": float("nan")})
    assert path.read_text() == before and _no_partials(tmp_path)


# -------------------------------------------------------------------------------------------- top-k
def test_top_k_indices_order_ties_and_nan():
    scores = np.array([0.2, np.nan, 0.9, 0.5, 0.9, 0.1])
    assert top_k_indices(scores, 3).tolist() == [2, 4, 3]
    assert top_k_indices(scores, 10).tolist() == [2, 4, 3, 0, 5]
    assert top_k_indices(scores, 0).size == 0 and top_k_indices(np.array([]), 4).size == 0


class _RowRecorder:
    """An [N, P, P, 3] array that remembers which rows were read (h5py-like access path)."""

    def __init__(self, data: np.ndarray) -> None:
        self.data, self.read = data, []
        self.shape = data.shape

    def __getitem__(self, index):
        self.read.append(index)
        return self.data[index]


def _coloured_patches(n: int, top: np.ndarray) -> np.ndarray:
    patches = np.zeros((n, 16, 16, 3), np.uint8)
    patches[:] = (255, 0, 255)  # magenta: must not appear in the montage
    patches[top] = (0, 255, 0)  # green: the top-k patches
    return patches


def test_montage_reads_and_shows_only_the_top_patches(tmp_path):
    n, k = 40, 5
    rng = np.random.default_rng(2)
    scores = rng.random(n)
    top = np.argsort(-scores)[:k]
    recorder = _RowRecorder(_coloured_patches(n, top))
    out = top_k_montage(recorder, scores, k, tmp_path / "m.png", title="t")
    assert sorted(recorder.read) == sorted(top.tolist())
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    green = (img[..., 1] > 200) & (img[..., 0] < 60) & (img[..., 2] < 60)
    magenta = (img[..., 0] > 200) & (img[..., 2] > 200) & (img[..., 1] < 60)
    assert green.sum() > 100 and magenta.sum() == 0


def test_montage_from_zarr_store(tmp_path):
    n = 30
    scores = np.linspace(0, 1, n)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w", zarr_format=3)
    arr = group.create_array("patches", shape=(n, 16, 16, 3), chunks=(8, 16, 16, 3), dtype="uint8")
    arr[:] = _coloured_patches(n, np.arange(n - 4, n))
    out = top_k_montage(arr, scores, 4, tmp_path / "z.png")
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert ((img[..., 1] > 200) & (img[..., 0] < 60)).sum() > 100
    assert ((img[..., 0] > 200) & (img[..., 2] > 200) & (img[..., 1] < 60)).sum() == 0
    empty = top_k_montage(arr, np.full(n, np.nan), 4, tmp_path / "none.png")
    assert empty.is_file()


# ------------------------------------------------------------------------------------ pyramidal TIFF
@pytest.mark.parametrize("compression", ["deflate", "jpeg"])
def test_pyramidal_tiff_opens_in_openslide(tmp_path, compression):
    rgb = np.zeros((600, 900, 3), np.uint8)
    rgb[:, :450] = (255, 0, 0)
    rgb[:, 450:] = (0, 0, 255)
    path = write_pyramidal_tiff(tmp_path / "h.tif", rgb, mpp=3.5, compression=compression)
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_count > 1
        assert slide.dimensions == (900, 600)
        assert slide.level_dimensions[1] == (450, 300)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(3.5)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(3.5)
        region = np.asarray(slide.read_region((0, 0), 0, (900, 600)))[..., :3].astype(int)
    tolerance = 0 if compression == "deflate" else 6
    assert np.abs(region - rgb).max() <= tolerance or np.abs(region - rgb).mean() < 1.0
    assert _no_partials(tmp_path)


def test_pyramidal_tiff_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((10, 10), np.float32), mpp=1.0)
    with pytest.raises(ValueError, match="mpp"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((10, 10, 3), np.uint8), mpp=0.0)
    assert not (tmp_path / "x.tif").exists()


# ---------------------------------------------------------------------------- slide thumbnail path
@pytest.fixture(scope="module")
def test_slide(tmp_path_factory) -> tuple[Path, tuple[int, int, int]]:
    """A 2000 x 1400 pyramidal TIFF slide (0.25 um/px) with a red 256-px square at level-0 (1024, 512)."""
    rng = np.random.default_rng(5)
    image = np.full((1400, 2000, 3), 235, np.uint8)
    image[200:1200, 300:1800] = rng.integers(150, 200, (1000, 1500, 3), dtype=np.uint8)  # 'tissue'
    image[512:768, 1024:1280] = (220, 20, 20)
    path = tmp_path_factory.mktemp("slide") / "slide.tif"
    write_pyramidal_tiff(path, image, mpp=0.25, compression="deflate")
    return path, (1024, 512, 256)


def test_slide_thumbnail_and_its_downsample(test_slide):
    path, _ = test_slide
    thumb, d = slide_thumbnail(path, max_size=300)
    assert thumb.dtype == np.uint8 and thumb.shape == (210, 300, 3)
    assert d == pytest.approx(2000 / 300)
    thumb2, d2 = slide_thumbnail(path, target_downsample=8)
    assert thumb2.shape == (175, 250, 3) and d2 == pytest.approx(8.0)


def test_slide_thumbnail_errors_name_the_file(tmp_path):
    with pytest.raises(SlideError, match="missing.svs"):
        slide_thumbnail(tmp_path / "missing.svs")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(SlideError, match="broken.svs"):
        slide_thumbnail(bad)


def test_hot_patch_lines_up_with_the_slide_in_a_real_thumbnail(tmp_path, test_slide):
    path, (hx, hy, size) = test_slide
    thumb, d = slide_thumbnail(path, max_size=300)  # fractional downsample 6.67
    xs, ys = np.meshgrid(np.arange(0, 2000 - size + 1, size), np.arange(0, 1400 - size + 1, size))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    scores = np.where((coords[:, 0] == hx) & (coords[:, 1] == hy), 1.0, 0.0)
    grid, _ = score_grid(coords, scores, size, d, thumb.shape[:2])
    # where the slide shows the red square in its own thumbnail
    slide_red = (thumb[..., 0].astype(int) - thumb[..., 2]) > 120
    out = render_overlay(thumb, grid, cmap="jet", alpha=1.0, out_png=tmp_path / "o.png", bare=True)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    heat_red = (img[..., 0] - img[..., 2]) > 60
    rows, cols = np.nonzero(heat_red)
    srows, scols = np.nonzero(slide_red)
    # the map's hot square and the slide's red square coincide to within one thumbnail pixel
    assert abs(rows.min() - srows.min()) <= 1 and abs(rows.max() - srows.max()) <= 1
    assert abs(cols.min() - scols.min()) <= 1 and abs(cols.max() - scols.max()) <= 1


# ----------------------------------------------------------------------------------- whole slide
def _slide_inputs(n_side=6, size=256, d=16.0):
    xs, ys = np.meshgrid(np.arange(n_side) * size, np.arange(n_side) * size)
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)
    extent = n_side * size
    thumb = np.full((int(extent / d), int(extent / d), 3), 230, np.uint8)
    return coords, thumb, d


def test_render_slide_heatmap_writes_every_output(tmp_path):
    coords, thumb, d = _slide_inputs()
    rng = np.random.default_rng(0)
    scores = rng.random(len(coords))
    patches = rng.integers(0, 255, (len(coords), 32, 32, 3), dtype=np.uint8)
    mask = np.ones(thumb.shape[:2], bool)
    mask[:10] = False
    cfg = HeatmapConfig(pyramidal_tiff=True, top_k=4, tiff_scale=2, tiff_compression="deflate", normalize="rank")
    res = render_slide_heatmap(slide_id="s01", coords=coords, scores=scores, patch_size_level0=256,
                               thumbnail=thumb, downsample=d, out_dir=tmp_path, cfg=cfg, tissue_mask=mask,
                               patches=patches, mpp_level0=0.5, properties={"run_id": "r1"})
    assert res.png == tmp_path / "s01.png" and res.png.is_file()
    assert res.montage == tmp_path / "s01_topk.png" and res.montage.is_file()
    data = json.loads(res.geojson.read_text())
    assert len(data["features"]) == len(coords) and data["properties"]["run_id"] == "r1"
    first = data["features"][0]["properties"]
    assert first["score"] == pytest.approx(scores[0])
    assert first["measurements"]["score_rank"] == pytest.approx(normalize_scores(scores, "rank")[0])
    b = min(int(normalize_scores(scores, "rank")[0] * 10), 9)  # the class is the rank-normalised score's bin
    assert first["classification"]["name"] == f"score {b / 10:.2f}-{(b + 1) / 10:.2f}"
    assert data["properties"]["classes"]["binned_by"] == "score_rank"
    with openslide.OpenSlide(str(res.tiff)) as slide:
        assert slide.dimensions == (thumb.shape[1] * 2, thumb.shape[0] * 2)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5 * d / 2)
    assert _no_partials(tmp_path)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["constant", "nan", "single", "empty"])
def test_render_slide_heatmap_never_crashes_on_odd_scores(tmp_path, method, case):
    coords, thumb, d = _slide_inputs(n_side=3)
    scores = {"constant": np.full(9, 0.3), "nan": np.where(np.arange(9) % 2, np.nan, 1.0),
              "single": np.array([4.0]), "empty": np.zeros(0)}[case]
    coords = coords[: len(scores)]
    res = render_slide_heatmap(slide_id="odd", coords=coords, scores=scores, patch_size_level0=256,
                               thumbnail=thumb, downsample=d, out_dir=tmp_path,
                               cfg=HeatmapConfig(normalize=method, top_k=2),
                               patches=np.zeros((len(scores), 8, 8, 3), np.uint8))
    assert res.png.is_file() and res.geojson.is_file() and res.montage.is_file() and res.tiff is None
    n_finite = int(np.isfinite(scores).sum())
    assert len(json.loads(res.geojson.read_text())["features"]) == n_finite


def test_render_slide_heatmap_names_the_slide_on_bad_input(tmp_path):
    coords, thumb, d = _slide_inputs(n_side=2)
    with pytest.raises(WsiMilError, match="slide s9"):
        render_slide_heatmap(slide_id="s9", coords=coords, scores=np.ones(3), patch_size_level0=256,
                             thumbnail=thumb, downsample=d, out_dir=tmp_path, cfg=HeatmapConfig())
    with pytest.raises(WsiMilError, match="slide s9"):
        render_slide_heatmap(slide_id="s9", coords=coords, scores=np.ones(4), patch_size_level0=256,
                             thumbnail=thumb, downsample=d, out_dir=tmp_path, cfg=HeatmapConfig(),
                             patches=np.zeros((5, 8, 8, 3), np.uint8))
    assert not list(tmp_path.iterdir())


def test_heatmap_config_validation():
    with pytest.raises(ConfigError, match="colormap"):
        load_config(overrides=["heatmap.colormap=not_a_map"])
    with pytest.raises(ConfigError, match="percentile_low"):
        load_config(overrides=["heatmap.percentile_low=90", "heatmap.percentile_high=10"])
    assert load_config().heatmap.normalize == "auto"


def test_oracle_heatmap_on_a_synthetic_slide_matches_its_tumour_truth(tmp_path):
    """Scores = true tumour fraction per patch: the map must sit on the generator's tumour mask."""
    path = tmp_path / "syn.svs"
    truth = write_slide(path, width=1024, height=1024, seed=3, tumour="large")
    thumb, d = slide_thumbnail(path, max_size=256)
    assert thumb.shape == (256, 256, 3) and d == pytest.approx(4.0)
    size, ds = 16, int(truth.downsample)  # patch side in level-0 px; truth masks at downsample ds
    xs, ys = np.meshgrid(np.arange(0, 1024, size), np.arange(0, 1024, size))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    k = size // ds

    def fraction(mask: np.ndarray) -> np.ndarray:
        blocks = mask[: 1024 // ds, : 1024 // ds].reshape(1024 // size, k, 1024 // size, k)
        return blocks.mean(axis=(1, 3)).ravel()

    keep = fraction(truth.tissue_mask) > 0.25
    coords, tumour = coords[keep], fraction(truth.tumour_mask)[keep]
    labels = tumour > 0.5
    assert labels.any() and not labels.all()
    assert roc_auc(labels, tumour) == 1.0
    grid, cov = score_grid(coords, normalize_scores(tumour, "raw"), size, d, thumb.shape[:2])
    hot = np.nan_to_num(grid) > 0.5
    truth_thumb = np.repeat(np.repeat(truth.tumour_mask, ds // 4, axis=0), ds // 4, axis=1)[:256, :256]

    def iou(shift: tuple[int, int]) -> float:
        moved = np.roll(truth_thumb, shift, axis=(0, 1))
        return float((hot & moved).sum() / (hot | moved).sum())

    assert iou((0, 0)) > 0.85
    # aligned exactly: moving the truth by a pixel or two in any direction only makes the overlap worse
    assert all(iou((dy, dx)) < iou((0, 0)) for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2) if dy or dx)
    res = render_slide_heatmap(slide_id="syn", coords=coords, scores=tumour, patch_size_level0=size,
                               thumbnail=thumb, downsample=d, out_dir=tmp_path / "hm", cfg=HeatmapConfig(),
                               tissue_mask=truth.tissue_mask, mpp_level0=truth.mpp)
    assert res.png.is_file() and res.geojson.is_file() and res.montage is None


def test_predict_heatmap_title_gives_prediction_probability_and_threshold():
    from wsi_mil.workflows.heatmap import predict_title

    below = predict_title("slide_000", np.array([0.38, 0.62]), ["normal", "tumor"], 0.629, "mhim(abmil)", 3)
    assert "predicted normal" in below and "p(tumor) = 0.620" in below and "threshold 0.629" in below
    assert "true" not in below  # new slides have no known label
    above = predict_title("slide_001", np.array([0.2, 0.8]), ["normal", "tumor"], 0.629, "mhim(abmil)", 3)
    assert "predicted tumor" in above and "p(tumor) = 0.800" in above
    assert "mhim(abmil)" in above and "3 fold models" in above
    multi = predict_title("s", np.array([0.1, 0.7, 0.2]), ["a", "b", "c"], None, "abmil", 1)
    assert "predicted b (p = 0.700)" in multi
