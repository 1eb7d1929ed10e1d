"""Slides: finding, opening, MPP resolution, level choice and region reads on real synthetic files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest
from helpers.tiler import build_tiler_slides
from PIL import Image

from wsi_mil.config import SlidesConfig
from wsi_mil.errors import ConfigError, SlideError, WsiMilError
from wsi_mil.slides import (
    DeclaredMpp,
    MppResolution,
    choose_level,
    file_fingerprint,
    find_slides,
    implausible,
    inspect_slide,
    locate_slide,
    mpp_overrides,
    open_slide,
    read_patch,
    read_thumbnail,
    resolve_mpp,
    scan_folder,
    slide_id,
)
from wsi_mil.slides.mpp import trusted_mpp


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    return build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")


def test_find_slides_sorted_filtered_and_unique(tmp_path: Path) -> None:
    for name in ["b.svs", "a.TIFF", "notes.txt", ".hidden.svs", "c.ndpi"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.svs").write_bytes(b"x")
    names = [p.name for p in find_slides(tmp_path, SlidesConfig())]
    assert names == ["a.TIFF", "b.svs", "c.ndpi"]
    assert [p.name for p in find_slides(tmp_path, SlidesConfig(recursive=True))][-1] == "d.svs"
    (tmp_path / "b.tiff").write_bytes(b"x")
    entries = {e.path.name: e for e in scan_folder(tmp_path, SlidesConfig()).entries}
    assert entries["b.svs"].status == entries["b.tiff"].status == "failed"
    assert "share the id 'b'" in entries["b.svs"].reason and "b.tiff" in entries["b.svs"].reason
    with pytest.raises(WsiMilError, match="does not exist"):
        find_slides(tmp_path / "missing", SlidesConfig())


def test_open_slide_is_cached_and_errors_are_clear(slides) -> None:
    path = slides.good_dir / "good.svs"
    assert open_slide(path) is open_slide(str(path))
    with pytest.raises(SlideError, match="notes.svs is not a slide: no reader recognises its format"):
        open_slide(slides.not_a_slide)
    with pytest.raises(SlideError, match="missing.svs"):
        open_slide(slides.root / "missing.svs")


def test_inventory_of_svs_and_tiff(slides) -> None:
    svs = inspect_slide(slides.good_dir / "good.svs", SlidesConfig())
    assert (svs.reader, svs.vendor, svs.width, svs.height, svs.levels) == ("jpeg-tiles", "aperio", 3072, 3072, 2)
    assert svs.mpp == pytest.approx(0.25) and svs.mpp_source == "slide"
    tif = inspect_slide(slides.good_dir / "generic.tiff", SlidesConfig())
    assert tif.vendor == "generic-tiff" and tif.mpp == pytest.approx(0.25, rel=1e-4)
    assert svs.fingerprint["size"] == (slides.good_dir / "good.svs").stat().st_size
    assert svs.fingerprint != tif.fingerprint


def test_mpp_missing_default_and_override(slides, tmp_path: Path) -> None:
    slide = open_slide(slides.no_mpp)
    with pytest.raises(SlideError, match="nompp has no usable microns-per-pixel.*mpp_override_csv.*default_mpp"):
        resolve_mpp(slide, "nompp", SlidesConfig())
    resolved = resolve_mpp(slide, "nompp", SlidesConfig(default_mpp=0.5))
    assert (resolved.mpp, resolved.source) == (0.5, "default") and "no physical unit" in resolved.note
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnompp,0.2425\ngood,0.3\n")
    cfg = SlidesConfig(mpp_override_csv=csv, default_mpp=0.5)
    assert resolve_mpp(slide, "nompp", cfg) == MppResolution(0.2425, "override", resolved.note)
    assert resolve_mpp(open_slide(slides.good_dir / "good.svs"), "good", cfg) == MppResolution(0.3, "override")
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,microns\nx,1\n")
    with pytest.raises(ConfigError, match="slide_id,mpp"):
        resolve_mpp(slide, "nompp", SlidesConfig(mpp_override_csv=bad))


@pytest.mark.parametrize(
    ("downsamples", "mpp0", "target", "expected"),
    [
        ([1, 4, 16], 0.25, 0.5, (0, 512)),  # no 2x level: read 512 at level 0, resize
        ([1, 4, 16], 0.25, 1.0, (1, 256)),  # exact level
        ([1, 4, 16], 0.25, 0.25, (0, 256)),  # native
        ([1, 2.0004, 8.001], 0.25, 0.5, (1, 256)),  # odd pyramid sizes: still that level, no resampling
        ([1, 4, 16], 0.2526, 0.5, (0, 507)),  # exact physical size: 256 * 0.5 / 0.2526
        ([1, 4], 0.5, 0.25, (0, 128)),  # slide coarser than target: upsampled from level 0
        ([1, 4, 16], 0.25, 2.0, (1, 512)),  # never coarser than the target
    ],
)
def test_choose_level(downsamples, mpp0, target, expected) -> None:
    plan = choose_level([float(d) for d in downsamples], mpp0, target, 256)
    assert (plan.level, plan.read_size) == expected
    assert plan.level_mpp <= target * (1 + 0.5 / 256) or plan.level == 0
    assert plan.patch_size_level0 == pytest.approx(256 * target / mpp0)


@pytest.mark.parametrize("name", ["good.svs", "generic.tiff"])
def test_read_patch_native_equals_read_region(slides, name: str) -> None:
    slide = open_slide(slides.good_dir / name)
    plan = choose_level(list(slide.level_downsamples), 0.25, 1.0, 256)  # level 1, no resampling
    assert plan.level == 1 and not plan.resample
    for x, y in [(1024, 1024), (0, 0), (2048, 512)]:
        expected = np.asarray(openslide.OpenSlide(str(slides.good_dir / name)).read_region((x, y), 1, (256, 256)))
        np.testing.assert_array_equal(read_patch(slide, x, y, plan), expected[..., :3])


def test_read_patch_resampled_matches_physical_size(slides) -> None:
    slide = open_slide(slides.good_dir / "good.svs", SlidesConfig(fast_jpeg=False))  # OpenSlide, full decode
    plan = choose_level(list(slide.level_downsamples), 0.25, 0.5, 256)
    assert plan.resample and plan.read_size == 512 and plan.resample_filter == "box"
    x, y = 1024, 1024
    patch = read_patch(slide, x, y, plan).astype(np.float64)
    native = slide.read_region((x, y), 0, (512, 512)).astype(np.float64)
    box = native.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))  # independent 2x reduction
    assert patch.shape == (256, 256, 3)
    assert np.abs(patch - box).max() <= 1.0  # exact area mean (up to rounding)
    # the JPEG fast path decodes at 1/2 scale in the DCT domain: close to the area mean, not exact
    fast = read_patch(open_slide(slides.good_dir / "good.svs"), x, y, plan).astype(np.float64)
    assert fast.shape == (256, 256, 3) and np.abs(fast - box).mean() <= 1.5


def test_read_patch_non_integer_factor_uses_lanczos(slides) -> None:
    from skimage.transform import resize

    slide = open_slide(slides.good_dir / "good.svs")
    plan = choose_level(list(slide.level_downsamples), 0.2526, 0.5, 256)  # read 507 px -> 256
    assert (plan.read_size, plan.resample_filter) == (507, "lanczos")
    patch = read_patch(slide, 1024, 1024, plan).astype(np.float64)
    native = slide.read_region((1024, 1024), 0, (507, 507))
    reference = resize(native, (256, 256), anti_aliasing=True, preserve_range=True)
    assert np.abs(patch - reference).mean() < 6.0


def test_read_outside_the_slide_is_white(slides) -> None:
    slide = open_slide(slides.good_dir / "good.svs")
    plan = choose_level(list(slide.level_downsamples), 0.25, 0.25, 256)
    patch = read_patch(slide, 3072 - 128, 0, plan)
    assert (patch[:, 200:] == 255).all()


def test_thumbnail_geometry(slides) -> None:
    slide = open_slide(slides.good_dir / "good.svs")
    thumb = read_thumbnail(slide, 0.25, 2.0)
    assert thumb.shape == (384, 384, 3) and thumb.dtype == np.uint8
    reference = np.asarray(openslide.OpenSlide(str(slides.good_dir / "good.svs")).get_thumbnail((384, 384))
                           .convert("RGB"), dtype=np.float64)
    small = np.asarray(Image.fromarray(thumb).resize(reference.shape[1::-1]), dtype=np.float64)
    assert np.abs(small - reference).mean() < 8.0


# ------------------------------------------------------------------------------------ MPP plausibility
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.25, None),
        (25400 / 72, "72 dpi, a file writer's default"),
        (25400 / 96.012, "96 dpi"),  # PNG stores pixels per metre: 3780 px/m
        (25400 / 300, "300 dpi"),
        (10000.0, "1 pixel per centimetre"),
        (0.00025, "looks like millimetres (0.25 um/px)"),
        (0.01, "finer than any microscope scan"),
        (50.0, "coarser than a microscope scan"),
        (float("nan"), "not a positive number"),
    ],
)
def test_implausible_mpp_names_the_reason(value: float, expected: str | None) -> None:
    reason = implausible(value, SlidesConfig())
    assert reason is None if expected is None else expected in reason


def test_trusted_mpp_uses_both_axes_and_reports_the_source() -> None:
    cfg = SlidesConfig()
    assert trusted_mpp(DeclaredMpp(0.25, 0.2502, "tags"), cfg) == (pytest.approx(0.2501), "")
    value, note = trusted_mpp(DeclaredMpp(0.25, 352.8, "TIFF resolution tags"), cfg)
    assert value is None and note.startswith("TIFF resolution tags: 352.8 um/px")
    assert trusted_mpp(DeclaredMpp.none("PNG file states no resolution"), cfg) == (None, "PNG file states no resolution")
    assert implausible(30.0, SlidesConfig(mpp_range=(0.05, 40.0))) is None  # the range is a setting


def test_override_csv_matches_slide_ids_and_rejects_bad_rows(tmp_path: Path) -> None:
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id, mpp\nS1.ome.tif,0.5\nS2.svs,0.25\ncase.12,0.3\n S3 ,0.2\n")
    assert mpp_overrides(SlidesConfig(mpp_override_csv=csv)) == {"S1": 0.5, "S2": 0.25, "case.12": 0.3, "S3": 0.2}
    for body, message in [("slide_id,mpp\nS1,352.8\n", "line 2: mpp 352.8 um/px lies outside"),
                          ("slide_id,mpp\nS1,0.25\nS1.svs,0.5\n", "line 3: slide 'S1' is listed twice"),
                          ("slide_id,mpp\nS1,abc\n", "line 2: mpp 'abc' is not a number")]:
        csv.write_text(body)
        with pytest.raises(ConfigError, match=message):
            mpp_overrides(SlidesConfig(mpp_override_csv=csv))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("S1.ome.tif", "S1"), ("S1.OME.TIFF", "S1"), ("a.b.svs", "a.b"), ("slide.tiff", "slide"), ("x.ome", "x")],
)
def test_slide_ids_drop_double_extensions(name: str, expected: str) -> None:
    assert slide_id(Path("/data") / name) == expected


# ------------------------------------------------------------------------------------------- readers
def test_tiff_reader_handles_grey_planar_and_refuses_16_bit(tmp_path: Path) -> None:
    import tifffile

    rgb = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "grey.tif", rgb[..., 0])
    tifffile.imwrite(tmp_path / "deep.tif", rgb.astype(np.uint16) * 200, photometric="rgb")
    planar = open_slide(tmp_path / "planar.tif")
    assert planar.name == "tifffile" and planar.dimensions == (400, 300)
    np.testing.assert_array_equal(planar.read_region((10, 20), 0, (50, 40)), rgb[20:60, 10:60])
    grey = open_slide(tmp_path / "grey.tif").read_region((390, 0), 0, (20, 5))
    np.testing.assert_array_equal(grey[:, :10], np.repeat(rgb[:5, 390:, :1], 3, axis=2))
    assert (grey[:, 10:] == 255).all()  # outside the image: white
    with pytest.raises(SlideError, match="deep.tif cannot be opened.*uint16 pixels.*convert it to 8-bit RGB"):
        open_slide(tmp_path / "deep.tif")


def test_readers_can_be_forced_and_agree(slides) -> None:
    path = slides.good_dir / "generic.tiff"
    auto = open_slide(path)
    forced = open_slide(path, SlidesConfig(reader="tifffile"))
    assert (auto.name, forced.name) == ("jpeg-tiles", "tifffile")
    assert forced.level_dimensions == auto.level_dimensions and forced.declared_mpp.x == pytest.approx(0.25, rel=1e-4)
    np.testing.assert_array_equal(forced.read_region((1000, 900), 1, (64, 48)), auto.read_region((1000, 900), 1, (64, 48)))


# ------------------------------------------------------------------------------------ locating slides
def test_locate_slide_finds_moved_slides_by_id_and_checks_the_fingerprint(slides, tmp_path: Path) -> None:
    original = slides.good_dir / "good.svs"
    fingerprint = file_fingerprint(original)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copyfile(original, moved / "good.svs")
    cfg = SlidesConfig()
    assert locate_slide("good", tmp_path / "gone" / "good.svs", moved, cfg, fingerprint) == (moved / "good.svs").resolve()
    assert locate_slide("good", original, None, cfg) == original
    with pytest.raises(SlideError, match=r"slide 'good' is not at .*gone.*pass --slides-dir"):
        locate_slide("good", tmp_path / "gone" / "good.svs", None, cfg)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(slides.good_dir / "pen.svs", other / "good.svs")
    with pytest.raises(SlideError, match="is not the file its patches came from"):
        locate_slide("good", tmp_path / "gone" / "good.svs", other, cfg, fingerprint)
