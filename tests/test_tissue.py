"""Tissue segmentation against the synthetic generator's ground truth, pen marks, faint stain, QC images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.tiler import build_tiler_slides, mask_iou
from PIL import Image

from wsi_mil.config import TISSUE_PRESETS, TissueConfig
from wsi_mil.layout import Layout
from wsi_mil.slides import open_slide, read_thumbnail
from wsi_mil.tissue import (
    TissueParams,
    binary_closing,
    detect_tissue,
    pen_mask,
    save_qc_images,
    segment_tissue,
    thumbnail_mpp,
)


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    return build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")


def _segment(path: Path, cfg: TissueConfig, lighten: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    slide = open_slide(path)
    params = TissueParams.from_config(cfg)
    w, h = slide.dimensions
    thumb = read_thumbnail(slide, 0.25, thumbnail_mpp(w, h, 0.25, params))
    if lighten != 1.0:  # faint stain: pull every pixel towards white
        thumb = (255 - (255 - thumb.astype(np.float64)) * lighten).round().astype(np.uint8)
    return thumb, segment_tissue(thumb, 0.25 * w / thumb.shape[1], params)


@pytest.mark.parametrize("name", ["good.svs", "pen.svs", "generic.tiff"])
def test_mask_matches_ground_truth(slides, name: str) -> None:
    _, mask = _segment(slides.good_dir / name, TissueConfig())
    iou = mask_iou(mask, slides.truth[Path(name).stem].tissue_mask)
    assert iou >= 0.9, f"{name}: IoU {iou:.3f}"


def test_pen_mark_is_not_tissue(slides) -> None:
    thumb, mask = _segment(slides.good_dir / "pen.svs", TissueConfig())
    truth = slides.truth["pen"].tissue_mask
    pens = pen_mask(thumb)
    truth_small = np.asarray(Image.fromarray(truth).resize(thumb.shape[1::-1], Image.Resampling.NEAREST))
    ink_on_glass = pens & ~truth_small
    assert ink_on_glass.sum() > 50  # the generator did draw a pen line beside the tissue
    assert (mask & ink_on_glass).sum() < 0.05 * ink_on_glass.sum()
    # the same slide without pen removal keeps the ink as "tissue"
    _, raw = _segment(slides.good_dir / "pen.svs", TissueConfig(remove_pen=False))
    assert (raw & ink_on_glass).sum() > 0.5 * ink_on_glass.sum()


def test_faint_stain(slides) -> None:
    truth = slides.truth["good"].tissue_mask
    _, default_mask = _segment(slides.good_dir / "good.svs", TissueConfig(), lighten=0.35)
    assert mask_iou(default_mask, truth) >= 0.9
    _, faint = _segment(slides.good_dir / "good.svs", TissueConfig(preset="faint"), lighten=0.2)
    assert mask_iou(faint, truth) >= 0.85


def test_blank_slide_has_no_tissue(slides) -> None:
    _, mask = _segment(slides.blank, TissueConfig())
    assert not mask.any()


def test_presets_select_parameters() -> None:
    default = TissueParams.from_config(TissueConfig())
    faint = TissueParams.from_config(TissueConfig(preset="faint"))
    strict = TissueParams.from_config(TissueConfig(preset="strict"))
    assert faint.min_saturation == TISSUE_PRESETS["faint"]["min_saturation"] < default.min_saturation
    assert strict.min_tissue_area_um2 > default.min_tissue_area_um2
    explicit = TissueParams.from_config(TissueConfig(preset="faint", min_saturation=30, closing_um=0))
    assert (explicit.min_saturation, explicit.closing_um, explicit.otsu_scale) == (30, 0, faint.otsu_scale)


def test_small_pieces_and_holes_follow_physical_area() -> None:
    rgb = np.full((200, 200, 3), 245, np.uint8)
    rgb[20:120, 20:120] = (200, 120, 190)  # 100x100 px tissue
    rgb[60:66, 60:66] = 245  # 36 px hole
    rgb[150:154, 150:154] = (200, 120, 190)  # 16 px speck
    params = TissueParams.from_config(TissueConfig(median_blur=1, closing_um=0))
    # at 10 um/px: hole 3600 um^2 < 5000 -> filled; speck 1600 um^2 < 10000 -> removed
    mask = segment_tissue(rgb, 10.0, params)
    assert mask[60:66, 60:66].all() and not mask[150:154, 150:154].any()
    # at 20 um/px the same hole is 14400 um^2 -> kept; the speck is 6400 um^2 -> still removed
    mask = segment_tissue(rgb, 20.0, params)
    assert not mask[62, 62] and mask[30, 30]


def test_closing_bridges_gaps_up_to_its_radius() -> None:
    mask = np.zeros((50, 80), bool)
    mask[10:40, 5:30] = True
    mask[10:40, 34:60] = True  # 4 px gap
    assert binary_closing(mask, 3)[25, 31:34].all()
    assert not binary_closing(mask, 1)[25, 31:34].any()
    edge = np.zeros((20, 20), bool)
    edge[:, :8] = True
    np.testing.assert_array_equal(binary_closing(edge, 4), edge)  # no erosion at the border


def test_closing_equals_the_euclidean_distance_definition() -> None:
    """The chord-decomposed closing gives exactly the closing by the disk dx^2 + dy^2 <= r^2 (EDT form)."""
    from scipy import ndimage

    def by_distance(mask: np.ndarray, radius: float) -> np.ndarray:
        pad = int(np.ceil(radius)) + 1
        dilated = ndimage.distance_transform_edt(~np.pad(mask, pad)) <= radius
        return (ndimage.distance_transform_edt(dilated) > radius)[pad:-pad, pad:-pad] | mask

    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(5, 70, size=2))
        mask = ndimage.binary_dilation(rng.random((h, w)) < 0.04, iterations=int(rng.integers(0, 3)))
        radius = float(rng.uniform(1.0, 9.0))
        np.testing.assert_array_equal(binary_closing(mask, radius), by_distance(mask, radius))


def test_qc_images(tmp_path: Path) -> None:
    thumb = np.full((40, 60, 3), 240, np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:30, 5:40] = True
    paths = save_qc_images(Layout(tmp_path).qc_images("s1"), thumb, mask, np.array([[5.0, 5.0, 15.0, 15.0]]))
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["s1_grid.jpg", "s1_mask.png", "s1_thumb.jpg"]
    grid = np.asarray(Image.open(paths["grid"])).astype(int)
    assert grid.shape == (40, 60, 3) and np.abs(grid[5, 10] - (0, 160, 0)).max() <= 40  # box outline (JPEG)
    assert grid[35, 50].min() > 245 and np.abs(np.asarray(Image.open(paths["thumb"])).astype(int) - 240).max() <= 3
    assert (np.asarray(Image.open(paths["mask"])) > 0).sum() == mask.sum()


# ------------------------------------------------------------------------------ why nothing was found
def _params(**overrides) -> TissueParams:
    return TissueParams.from_config(TissueConfig(median_blur=1, closing_um=0, **overrides))


def test_empty_masks_say_why() -> None:
    glass = np.full((100, 100, 3), 243, np.uint8)
    specks = glass.copy()
    specks[10:14, 10:14] = specks[60:65, 70:75] = (200, 120, 190)  # 16 and 25 px of stain
    dark = np.zeros((100, 100, 3), np.uint8)
    dark[40:60, 40:60, 2] = 200  # DAPI-like nuclei on a black background
    ink = glass.copy()
    ink[20:80, 45:55] = (200, 30, 45)  # a red stroke on clean glass
    params = _params()
    assert "only tissue pieces below tissue.min_tissue_area_um2=10000 um^2 were found (2 piece(s), the largest " \
           "2500 um^2)" in detect_tissue(specks, 10.0, params).empty_reason(params)
    assert "looks like a fluorescence or dark-field image" in detect_tissue(dark, 10.0, params).empty_reason(params)
    assert "only marker ink (6.0% of the thumbnail)" in detect_tissue(ink, 10.0, params).empty_reason(params)
    assert "no stained tissue found" in detect_tissue(glass, 10.0, params).empty_reason(params)
    assert detect_tissue(specks, 10.0, _params(min_tissue_area_um2=1000)).empty_reason(params) == ""


@pytest.mark.parametrize("ink", ["red", "blue", "green", "black"])
def test_pen_mask_finds_each_ink_colour_and_not_stain(ink: str) -> None:
    from conftest_inputs import INKS

    rgb = np.full((120, 120, 3), 243, np.uint8)
    rgb[10:110, 10:50] = (196, 118, 178)  # eosin-pink tissue
    rgb[30:50, 15:45] = (110, 60, 150)  # hematoxylin
    rgb[10:110, 70:80] = INKS[ink]
    mask = pen_mask(rgb, um_per_px=8.0)
    assert mask[10:110, 70:80].all() and not mask[:, :60].any()
    speck = np.full((60, 60, 3), 243, np.uint8)
    speck[30:32, 30:32] = INKS[ink]  # 4 px = 256 um^2: blood or debris, not a stroke
    assert pen_mask(speck, um_per_px=8.0).sum() == 0 and pen_mask(speck).sum() == 4


def test_real_he_slides_have_no_ink() -> None:
    real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"
    if not real.is_dir():
        pytest.fail(f"the real slide files are missing: expected them at {real}")
    params = TissueParams.from_config(TissueConfig())
    for name, mpp in (("CMU-1-Small-Region.svs", 0.499), ("TCGA-CR-7395-01A-01-TS1.svs", 0.25)):
        reader = open_slide(real / name)
        w, h = reader.dimensions
        thumb = read_thumbnail(reader, mpp, 8.0)
        um = mpp * w / thumb.shape[1]
        assert pen_mask(thumb, um).sum() == 0, name  # red eosin, blood and dark nuclei are not ink
        assert 0.3 < detect_tissue(thumb, um, params).mask.mean() < 0.8, name
