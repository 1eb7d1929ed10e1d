"""Synthetic cohort generator: real OpenSlide on the generated files, truth aligned with pixels."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hed

from wsi_mil.cli import main as cli_main
from wsi_mil.errors import WsiMilError
from wsi_mil.synth import generate_cohort, load_truth, write_slide
from wsi_mil.synth.fields import make_fields
from wsi_mil.synth.pyramid import level_shapes
from wsi_mil.synth.render import Renderer


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("synth") / "cohort", n_slides=4, seed=3, size=2048)


@pytest.fixture(scope="module")
def large_tumour(tmp_path_factory):
    path = tmp_path_factory.mktemp("large") / "big.svs"
    truth = write_slide(path, width=2048, height=1536, seed=21, tumour="large")
    return path, truth


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _mask_at(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A truth mask resized (nearest) to an image's (h, w)."""
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(shape[::-1], Image.NEAREST)) > 127


# ----------------------------------------------------------------------------------- OpenSlide reads
def test_svs_opens_as_aperio_with_levels_and_mpp(cohort):
    path = cohort.slides_dir / "slide_000.svs"
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        expected = level_shapes(2048, 2048)
        assert len(expected) == 2
        assert s.level_count == len(expected)
        assert s.level_dimensions == tuple((w, h) for _, w, h in expected)
        assert s.level_downsamples == pytest.approx([d for d, _, _ in expected])
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.25)
        assert s.properties["openslide.objective-power"] == "40"
        assert "thumbnail" in s.associated_images
        tile = np.asarray(s.read_region((0, 0), 1, (256, 256)).convert("RGB"))
        assert tile.shape == (256, 256, 3)


def test_generic_tiff_opens_with_levels_and_mpp(tmp_path):
    path = tmp_path / "g.tiff"
    truth = write_slide(path, width=2304, height=2048, seed=5, mpp=0.5, fmt="tiff")
    assert truth.label == 0 and truth.tumour_fraction == 0.0
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count == 2
        assert s.level_dimensions == ((2304, 2048), (576, 512))
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-4)


def test_pixels_read_back_match_the_renderer(tmp_path):
    path = tmp_path / "r.svs"
    write_slide(path, width=1536, height=1024, seed=9, tumour="small")
    renderer = Renderer(make_fields(1536, 1024, 9, 0.25, "small"))
    with openslide.OpenSlide(str(path)) as s:
        read = np.asarray(s.read_region((300, 200), 0, (700, 500)).convert("RGB")).astype(float)
    assert np.abs(read - renderer.region(300, 200, 700, 500)).mean() < 4.0  # JPEG loss only


# ------------------------------------------------------------------------------- truth matches pixels
def test_tumour_mask_has_more_haematoxylin_but_no_colour_flag(large_tumour):
    path, truth = large_tumour
    assert truth.label == 1 and 0.15 < truth.tumour_fraction < 0.45
    with openslide.OpenSlide(str(path)) as s:
        rgb = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    hem = rgb2hed(rgb / 255)[..., 0]
    tumour = ndimage.binary_erosion(_mask_at(truth.tumour_mask, hem.shape), iterations=3)
    tissue = ndimage.binary_erosion(_mask_at(truth.tissue_mask, hem.shape), iterations=3)
    normal = tissue & ~ndimage.binary_dilation(_mask_at(truth.tumour_mask, hem.shape), iterations=3)
    assert tumour.sum() > 500 and normal.sum() > 500
    assert hem[tumour].mean() > hem[normal].mean() + 0.01
    # not a colour flag: tumour's mean colour is close to that of normal lymphoid (cellular) tissue
    cellular = np.asarray(Image.fromarray(make_fields(2048, 1536, 21, 0.25, "large").cellular)
                          .resize(hem.shape[::-1], Image.NEAREST))
    lymphoid = normal & (cellular > 0.8)
    assert lymphoid.sum() > 500
    assert hem[tumour].mean() > hem[lymphoid].mean()
    assert np.abs(rgb[tumour].mean(0) - rgb[lymphoid].mean(0)).max() < 30


def test_tissue_mask_separates_tissue_from_glass(cohort):
    truth = load_truth(cohort.truth_dir, "slide_001")
    with openslide.OpenSlide(str(cohort.slides_dir / "slide_001.svs")) as s:
        grey = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("L")).astype(float)
    tissue = _mask_at(truth.tissue_mask, grey.shape)
    pieces = ndimage.binary_dilation(tissue, iterations=4)
    glass = ~pieces
    tissue = ndimage.binary_erosion(tissue, iterations=3)
    assert grey[glass].mean() > 225
    assert grey[glass].mean() > grey[tissue].mean() + 40


def test_tumour_lies_inside_tissue_and_sizes_follow_the_kind():
    fractions = {}
    for kind in ("micro", "small", "large"):
        f = make_fields(8192, 8192, 4, 0.25, kind)
        assert not (f.tumour_mask & ~f.tissue_mask).any()
        fractions[kind] = f.tumour_mask.sum() / f.tissue_mask.sum()
    assert 0 < fractions["micro"] < 0.01
    assert 0.015 < fractions["small"] < 0.055
    assert 0.18 < fractions["large"] < 0.42
    assert not make_fields(4096, 4096, 4, 0.25, None).tumour_mask.any()


def test_regions_render_identically_however_cut():
    f = make_fields(2048, 2048, 13, 0.25, "large", ("blur", "fold", "pen"))
    r = Renderer(f)
    ys, xs = np.nonzero(f.tumour_mask)
    x0, y0 = int(xs.mean() * f.ds) - 150, int(ys.mean() * f.ds) - 150
    whole = r.region(x0, y0, 300, 300)
    top = np.concatenate([r.region(x0, y0, 137, 101), r.region(x0 + 137, y0, 163, 101)], axis=1)
    bottom = np.concatenate([r.region(x0, y0 + 101, 137, 199), r.region(x0 + 137, y0 + 101, 163, 199)], axis=1)
    assert np.array_equal(whole, np.concatenate([top, bottom]))
    assert Renderer(f).region(x0, y0, 300, 300).tobytes() == whole.tobytes()


def test_artefacts_change_pixels_but_not_truth(tmp_path):
    clean = write_slide(tmp_path / "clean.svs", width=2048, height=2048, seed=17, tumour="small")
    dirty = write_slide(tmp_path / "dirty.svs", width=2048, height=2048, seed=17, tumour="small",
                        artefacts=("pen", "blur", "fold"))
    assert np.array_equal(clean.tissue_mask, dirty.tissue_mask)
    assert np.array_equal(clean.tumour_mask, dirty.tumour_mask)
    f = make_fields(2048, 2048, 17, 0.25, "small", ("pen", "blur", "fold"))
    assert f.pen.max() > 0.5 and f.blur.max() > 0.5 and f.fold.max() > 0.3
    with openslide.OpenSlide(str(tmp_path / "dirty.svs")) as s:
        rgb = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB")).astype(float)
    pen = _mask_at(f.pen > 0.6, rgb.shape[:2])
    others = _mask_at((f.pen < 0.01) & (f.tissue < 0.01), rgb.shape[:2])  # plain glass
    assert pen.sum() > 50
    chroma = rgb.max(-1) - rgb.min(-1)
    assert chroma[pen].mean() > chroma[others].mean() + 30  # a coloured marker, also over glass


# -------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    paths = [tmp_path / d / "s.svs" for d in ("a", "b", "c")]
    a = write_slide(paths[0], width=1024, height=1024, seed=7, tumour="micro", artefacts=("pen",))
    b = write_slide(paths[1], width=1024, height=1024, seed=7, tumour="micro", artefacts=("pen",))
    write_slide(paths[2], width=1024, height=1024, seed=8, tumour="micro", artefacts=("pen",))
    assert _sha(paths[0]) == _sha(paths[1])
    assert _sha(paths[0]) != _sha(paths[2])
    assert np.array_equal(a.tumour_mask, b.tumour_mask)


# ---------------------------------------------------------------------------------- cohort and files
def test_labels_csv_has_both_classes_and_shared_patients(cohort):
    with open(cohort.labels_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["slide_id", "label", "patient_id"]
    assert [r["slide_id"] for r in rows] == cohort.slide_ids == [f"slide_{i:03d}" for i in range(4)]
    assert Counter(r["label"] for r in rows) == {"tumor": 2, "normal": 2}
    assert max(Counter(r["patient_id"] for r in rows).values()) == 2
    for r in rows:
        assert (cohort.slides_dir / f"{r['slide_id']}.svs").is_file()
        truth = load_truth(cohort.truth_dir, r["slide_id"])
        assert truth.label == (r["label"] == "tumor")
        assert (truth.tumour_fraction > 0) == truth.label


def test_truth_files_are_complete_and_consistent(cohort):
    sid = next(s for s in cohort.slide_ids if load_truth(cohort.truth_dir, s).label == 1)
    meta = json.loads((cohort.truth_dir / f"{sid}.json").read_text())
    for key in ("label", "width", "height", "mpp", "downsample", "tumour_fraction", "seed", "artefacts"):
        assert key in meta
    truth = load_truth(cohort.truth_dir, sid)
    assert truth.tissue_mask.shape == (2048 // truth.downsample, 2048 // truth.downsample)
    png = np.asarray(Image.open(cohort.truth_dir / f"{sid}_tumour.png"))
    assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
    assert truth.tumour_fraction == pytest.approx(truth.tumour_mask.sum() / truth.tissue_mask.sum())


@pytest.mark.parametrize("kind", ["tumour", "tissue"])
def test_geojson_is_in_level0_pixels_and_matches_the_mask(cohort, kind):
    sid = next(s for s in cohort.slide_ids if load_truth(cohort.truth_dir, s).label == 1)
    truth = load_truth(cohort.truth_dir, sid)
    gj = json.loads((cohort.truth_dir / f"{sid}_{kind}.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and gj["features"]
    pts = np.concatenate([np.asarray(ring) for f in gj["features"] for ring in f["geometry"]["coordinates"]])
    assert all(f["geometry"]["type"] == "Polygon" for f in gj["features"])
    assert pts[:, 0].min() >= 0 and pts[:, 0].max() <= truth.width
    assert pts[:, 1].min() >= 0 and pts[:, 1].max() <= truth.height
    mask = truth.tumour_mask if kind == "tumour" else truth.tissue_mask
    ys, xs = np.nonzero(mask)
    ds = truth.downsample
    expected = np.array([xs.min() * ds, ys.min() * ds, (xs.max() + 1) * ds, (ys.max() + 1) * ds])
    got = np.array([pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()])
    assert np.abs(got - expected).max() <= ds


def test_rerun_skips_finished_slides_and_cleans_partials(tmp_path):
    out = tmp_path / "c"
    cohort = generate_cohort(out, n_slides=2, seed=1, size=1024, fmt="tiff")
    first = cohort.slides_dir / "slide_000.tiff"
    stamp = first.stat().st_mtime_ns
    (cohort.slides_dir / "slide_001.tiff").unlink()  # as if interrupted before this slide
    leftover = cohort.slides_dir / "slide_001.tiff.partial-1-deadbeef"
    leftover.write_bytes(b"half a slide")
    again = generate_cohort(out, n_slides=2, seed=1, size=1024, fmt="tiff")
    assert again.slide_ids == cohort.slide_ids
    assert first.stat().st_mtime_ns == stamp
    assert (cohort.slides_dir / "slide_001.tiff").is_file() and not leftover.exists()


def test_cli_synth_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["synth", str(out), "--slides", "2", "--size", "1024", "--seed", "4", "--format", "tiff",
                     "--tumour", "mixed", "--positive-fraction", "0.5", "--mpp", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 2 synthetic slides" in printed and "labels.csv" in printed
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["slide_000.tiff", "slide_001.tiff"]
    with openslide.OpenSlide(str(out / "slides" / "slide_000.tiff")) as s:
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_slides": 0}, "at least 1"),
    ({"size": 100}, "at least 1024"),
    ({"fmt": "ndpi"}, "'svs' or 'tiff'"),
    ({"tumour": "huge"}, "micro, small, large or mixed"),
    ({"positive_fraction": 1.5}, "must lie in"),
    ({"mpp": 0.0}, "microns-per-pixel"),
])
def test_bad_cohort_settings_raise_clear_errors(tmp_path, kwargs, message):
    args = {"n_slides": 2, "seed": 0, "size": 1024} | kwargs
    with pytest.raises(WsiMilError, match=message):
        generate_cohort(tmp_path / "bad", **args)
    assert not (tmp_path / "bad" / "slides").exists() or not any((tmp_path / "bad" / "slides").iterdir())


def test_bad_slide_settings_raise_clear_errors(tmp_path):
    with pytest.raises(WsiMilError, match="unknown artefact"):
        write_slide(tmp_path / "x.svs", width=1024, height=1024, seed=0, artefacts=("coffee",))
    with pytest.raises(WsiMilError, match="unknown tumour size"):
        write_slide(tmp_path / "x.svs", width=1024, height=1024, seed=0, tumour="giant")
    with pytest.raises(WsiMilError, match="missing or unreadable"):
        load_truth(tmp_path, "nope")


def test_cli_bad_input_exits_2_with_one_sentence(tmp_path, capsys):
    assert cli_main(["synth", str(tmp_path / "o"), "--slides", "0"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli_main(["synth", str(tmp_path / "o"), "--size", "64"]) == 2
    assert "at least 1024" in capsys.readouterr().err
