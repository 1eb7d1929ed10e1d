"""The JPEG tile fast path (jpeg-tiles reader) gives OpenSlide's pixels, decodes shared tiles once, falls back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers.tiler import build_tiler_slides
from PIL import Image
from skimage.data import immunohistochemistry

from wsi_mil.config import SlidesConfig
from wsi_mil.slides import ReadPlan, inspect_slide, open_slide, read_patch
from wsi_mil.slides.readers import jpeg_tiles
from wsi_mil.slides.readers.jpeg_tiles import JpegTiffReader, decode_jpeg
from wsi_mil.slides.readers.openslide_reader import OpenSlideReader

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"
APERIO = "Aperio Image Library v12.0.0\r\n"
W, H = 1500, 1100  # level 0 of the written test slides (0.25 um/px), deliberately not a multiple of the tiles


def _texture() -> np.ndarray:
    """Real IHC texture tiled to W x H (level 0)."""
    ihc = immunohistochemistry()
    reps = (-(-H // ihc.shape[0]), -(-W // ihc.shape[1]), 1)
    return np.ascontiguousarray(np.tile(ihc, reps)[:H, :W])


def write_jpeg_tiff(path: Path, photometric: str, tile: int, svs: bool) -> Path:
    """An Aperio SVS (level 0, thumbnail, 4x level) or generic pyramidal TIFF of JPEG tiles in RGB or YCbCr."""
    image = _texture()
    jpeg = {"compression": "jpeg", "metadata": None, "software": False, "photometric": "rgb"}
    if photometric == "rgb":  # RGB-coded JPEG (PhotometricInterpretation RGB), as Aperio scanners write
        jpeg |= {"compressionargs": {"level": 90, "outcolorspace": "rgb"}, "subsampling": (1, 1)}
    else:  # YCbCr 4:2:0 (PhotometricInterpretation YCbCr)
        jpeg |= {"compressionargs": {"level": 90}, "subsampling": (2, 2)}
    level1 = np.asarray(Image.fromarray(image).reduce(4))
    props = "|AppMag = 40|MPP = 0.25"
    with tifffile.TiffWriter(path) as tif:
        if svs:
            tif.write(image, tile=(tile, tile), description=f"{APERIO}{W}x{H} ({tile}x{tile}) JPEG{props}", **jpeg)
            tif.write(level1[::4, ::4], rowsperstrip=16, description=f"{APERIO}{W}x{H} -> thumb{props}", **jpeg)
            tif.write(level1, tile=(tile, tile), description=f"{APERIO}{W}x{H} -> {level1.shape[1]}{props}", **jpeg)
        else:
            res = (1e4 / 0.25, 1e4 / 0.25)
            tif.write(image, tile=(tile, tile), resolution=res, resolutionunit="CENTIMETER", **jpeg)
            tif.write(level1, tile=(tile, tile), resolution=(res[0] / 4, res[1] / 4), resolutionunit="CENTIMETER",
                      subfiletype=1, **jpeg)
    return path


def _diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), int(d.max())


def _grid(start: int, step: int, size0: int) -> list[tuple[int, int]]:
    return [(x, y) for y in range(start, H - size0 + 1, step) for x in range(start, W - size0 + 1, step)]


def _compare(fast: JpegTiffReader, ref: OpenSlideReader, coords, plan: ReadPlan) -> tuple[float, int]:
    means, peak = [], 0
    for x, y in coords:
        mean, top = _diff(read_patch(fast, x, y, plan), read_patch(ref, x, y, plan))
        means.append(mean)
        peak = max(peak, top)
    return float(np.mean(means)), peak


NATIVE = ReadPlan(level=0, downsample=1.0, level_mpp=0.25, read_size=128, patch_size=128, patch_size_level0=128)
HALVED = ReadPlan(level=0, downsample=1.0, level_mpp=0.25, read_size=256, patch_size=128, patch_size_level0=256)


@pytest.mark.parametrize("svs", [True, False], ids=["svs", "generic-tiff"])
@pytest.mark.parametrize("tile", [240, 256])
@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_fast_path_patches_equal_openslide_on_aligned_unaligned_and_overlapping_grids(
    tmp_path: Path, photometric: str, tile: int, svs: bool
) -> None:
    path = write_jpeg_tiff(tmp_path / ("s.svs" if svs else "s.tiff"), photometric, tile, svs)
    fast, ref = open_slide(path), OpenSlideReader(path)
    assert isinstance(fast, JpegTiffReader) and fast.vendor == ("aperio" if svs else "generic-tiff")
    assert fast.decoder == "simplejpeg"
    assert fast.jpeg_levels[0].mode == ("RGB" if photometric == "rgb" else "YCbCr")
    assert fast.level_dimensions == ref.level_dimensions and fast.declared_mpp == ref.declared_mpp
    grids = {"aligned": _grid(0, tile, 128), "unaligned, overlap": _grid(37, 101, 128)}
    for name, coords in grids.items():
        mean, peak = _compare(fast, ref, coords, NATIVE)
        assert mean <= 1.0 and peak <= 16, f"native {name}: mean {mean:.3f}, max {peak}"
    for name, coords in {"aligned": _grid(0, 2 * tile, 256), "unaligned, overlap": _grid(37, 203, 256)}.items():
        mean, _ = _compare(fast, ref, coords, HALVED)
        assert mean <= 1.5, f"2x reduction {name}: mean {mean:.3f}"
    # the 4x level (the whole-slide region, right/bottom edges white outside the image)
    lw, lh = fast.level_dimensions[1]
    mean, peak = _diff(fast.read_region((0, 0), 1, (lw + 5, lh + 3)), ref.read_region((0, 0), 1, (lw + 5, lh + 3)))
    assert mean <= 1.0 and peak <= 16


@pytest.mark.parametrize("photometric", ["rgb", "ycbcr"])
def test_simplejpeg_and_pillow_decode_the_same_pixels_at_every_dct_scale(tmp_path: Path, photometric: str) -> None:
    fast = JpegTiffReader(write_jpeg_tiff(tmp_path / "s.svs", photometric, 256, svs=True), cache_bytes=2**24)
    lvl = fast.jpeg_levels[0]
    for index in range(0, lvl.offsets.size, 2):
        data = fast._tile_stream(lvl, index % lvl.across, index // lvl.across)
        for scale in (1, 2, 4, 8):
            a, b = decode_jpeg(data, lvl.mode, scale, "simplejpeg"), decode_jpeg(data, lvl.mode, scale, "pillow")
            assert a.shape == b.shape == (256 // scale, 256 // scale, 3)
            mean, peak = _diff(a, b)
            assert mean <= 0.5 and peak <= 8, f"tile {index} scale {scale}: mean {mean:.3f}, max {peak}"


def test_a_colour_space_simplejpeg_gets_wrong_makes_the_slide_decode_with_pillow(monkeypatch) -> None:
    path = REAL / "CMU-1-Small-Region.svs"  # RGB-coded JPEG tiles without JFIF/Adobe markers
    assert path.is_file(), f"shared data missing: {path}"
    monkeypatch.setattr(jpeg_tiles, "adobe_marked", lambda data, mode: data)  # libjpeg left to guess: YCbCr
    fast, ref = JpegTiffReader(path, cache_bytes=2**24), OpenSlideReader(path)
    assert fast.decoder == "pillow"
    mean, peak = _compare(fast, ref, [(x, y) for x in (0, 480, 960) for y in (0, 960)], NATIVE)
    assert mean <= 1.0 and peak <= 16


def test_aligned_halving_decodes_at_half_scale_and_shared_tiles_are_decoded_once(tmp_path: Path) -> None:
    path = write_jpeg_tiff(tmp_path / "s.svs", "ycbcr", 256, svs=True)
    fast = JpegTiffReader(path, cache_bytes=2**24)  # a private cache: nothing from other readers
    read_patch(fast, 512, 256, HALVED)  # a 256 px read on the tile grid: one tile at 1/2 scale
    assert [key[1:] for key in fast.cache._items] == [(0, 2, 2, 1)]  # (page, scale, column, row)
    fast.cache.clear()
    fast.cache.hits = fast.cache.misses = 0
    coords = _grid(37, 101, 128)  # unaligned and overlapping: neighbours share tiles
    for x, y in coords:
        read_patch(fast, x, y, NATIVE)
    touched = {(x // 256 + i, y // 256 + j) for x, y in coords for i in (0, 1) for j in (0, 1)
               if (x + 127) // 256 >= x // 256 + i and (y + 127) // 256 >= y // 256 + j}
    assert fast.cache.misses == len(touched) and fast.cache.hits > len(coords)


def test_synthetic_svs_and_generic_tiff_match_openslide_at_native_and_halved_resolution(tmp_path_factory) -> None:
    slides = build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")
    for name in ("good.svs", "generic.tiff"):
        path = slides.good_dir / name
        fast, ref = open_slide(path), OpenSlideReader(path)
        assert fast.name == "jpeg-tiles"
        aligned = [(x, y) for x in (512, 1024, 1536) for y in (768, 1280)]
        unaligned = [(x + 77, y + 131) for x, y in aligned]
        mean, peak = _compare(fast, ref, aligned + unaligned, NATIVE)
        assert mean <= 1.0 and peak <= 16, f"{name} native: mean {mean:.3f}, max {peak}"
        mean, _ = _compare(fast, ref, aligned + unaligned, HALVED)
        assert mean <= 1.5, f"{name} halved: mean {mean:.3f}"


def test_real_aperio_rgb_jpeg_with_tables_matches_openslide() -> None:
    path = REAL / "CMU-1-Small-Region.svs"
    assert path.is_file(), f"shared data missing: {path}"
    fast, ref = open_slide(path), OpenSlideReader(path)
    assert fast.name == "jpeg-tiles" and fast.jpeg_levels[0].tables and fast.jpeg_levels[0].mode == "RGB"
    assert fast.decoder == "simplejpeg"  # the Adobe marker makes libjpeg take the RGB coding the TIFF states
    aligned = [(x, y) for x in (0, 480, 960, 1440) for y in (0, 960, 1920)]
    unaligned = [(x + 101, y + 53) for x, y in aligned] + [(2000, 2800)]  # the last one crosses the edge
    mean, peak = _compare(fast, ref, aligned + unaligned, NATIVE)
    assert mean <= 1.0 and peak <= 16, f"native: mean {mean:.3f}, max {peak}"
    halved = ReadPlan(level=0, downsample=1.0, level_mpp=0.5, read_size=480, patch_size=240, patch_size_level0=480)
    mean, _ = _compare(fast, ref, aligned + unaligned, halved)
    assert mean <= 1.5, f"halved: mean {mean:.3f}"


def test_jpeg2000_svs_falls_back_to_openslide_and_says_why() -> None:
    path = REAL / "TCGA-CR-7395-01A-01-TS1.svs"
    assert path.is_file(), f"shared data missing: {path}"
    info = inspect_slide(path, SlidesConfig(default_mpp=0.25))
    assert info.reader == "openslide" and "JP2000" in info.reader_note and "jpeg-tiles" in info.reader_note


def test_config_key_forces_openslide_for_jpeg_slides(tmp_path: Path) -> None:
    path = write_jpeg_tiff(tmp_path / "s.svs", "rgb", 240, svs=True)
    assert open_slide(path).name == "jpeg-tiles"
    assert open_slide(path, SlidesConfig(fast_jpeg=False)).name == "openslide"
    assert inspect_slide(path, SlidesConfig(fast_jpeg=False)).reader == "openslide"


def test_shrink_on_load_thumbnail_gives_the_same_tissue_as_openslide(tmp_path_factory) -> None:
    from wsi_mil.config import TissueConfig
    from wsi_mil.tissue import TissueParams, detect_tissue

    slides = build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")
    path = slides.good_dir / "good.svs"
    fast, ref = JpegTiffReader(path), OpenSlideReader(path)
    size = (300, 300)  # from the 1 um/px level (768 px): decoded at 1/2 scale, then box-averaged
    a, b = fast.thumbnail(size), ref.thumbnail(size)
    assert a.shape == b.shape == (300, 300, 3) and _diff(a, b)[0] <= 4.0
    params = TissueParams.from_config(TissueConfig())
    um = 0.25 * 3072 / 300
    mask_a, mask_b = detect_tissue(a, um, params).mask, detect_tissue(b, um, params).mask
    assert mask_b.any() and (mask_a & mask_b).sum() / (mask_a | mask_b).sum() >= 0.95


def test_levels_not_stored_as_jpeg_are_read_by_openslide(tmp_path: Path) -> None:
    image = _texture()
    level1 = np.asarray(Image.fromarray(image).reduce(4))
    res = (1e4 / 0.25, 1e4 / 0.25)
    path = tmp_path / "mixed.tiff"
    with tifffile.TiffWriter(path) as tif:  # level 0 JPEG, level 1 deflate
        tif.write(image, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None,
                  resolution=res, resolutionunit="CENTIMETER")
        tif.write(level1, tile=(256, 256), compression="zlib", photometric="rgb", metadata=None,
                  resolution=(res[0] / 4, res[1] / 4), resolutionunit="CENTIMETER", subfiletype=1)
    fast, ref = open_slide(path), OpenSlideReader(path)
    assert fast.name == "jpeg-tiles" and fast.jpeg_levels[0] is not None and fast.jpeg_levels[1] is None
    np.testing.assert_array_equal(fast.read_region((40, 80), 1, (200, 150)), ref.read_region((40, 80), 1, (200, 150)))
    mean, peak = _diff(fast.read_region((40, 80), 0, (300, 200)), ref.read_region((40, 80), 0, (300, 200)))
    assert mean <= 1.0 and peak <= 16
