"""Real public slide files (../shared/data/real-slides/) through `wsi-mil tile`, with the outcome a user expects.

Each file's expectation is the one ``../shared/data/README.md`` states: CMU-1-Small-Region tiles (and
its stored patches are OpenSlide's pixels at the stored coordinates), the TCGA frozen section without
MPP fails clearly and works with an override, the NDPI fluorescence scan opens with the right MPP and
says why nothing was tiled, the 72-dpi TIFF is not trusted, the two DICOM instances are one slide,
the 16 x 16 slide is too small, the undecodable, unopenable and text files fail alone. The slides
that tile are then embedded and drawn as heatmaps.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image

from wsi_mil.config import load_config
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.stores import open_patch_store, read_bag

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"
BIN = Path(sys.executable).parent
ALL_FILES = {"CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs", "slideio-test3-DAPI-2-(387).ndpi",
             "openslide-boxes.tiff", "boxes_0.dcm", "boxes_1.dcm", "openslide-small.svs", "openslide-unreadable.svs",
             "openslide-unopenable.tiff", "histolab-broken.svs"}
TCGA = "TCGA-CR-7395-01A-01-TS1"


def _real_dir() -> Path:
    if not REAL.is_dir():
        pytest.fail(f"the real slide files are missing: expected them at {REAL} (../shared/data/real-slides "
                    "beside the repository)")
    return REAL


def _tile(src: Path, out: Path, *settings: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "wsi-mil"), "-q", "tile", str(src), "--out", str(out), "--workers", "1"]
    for item in settings:
        cmd += ["--set", item]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(Layout(out).slides_csv, newline="") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`wsi-mil tile` over the whole folder with the default settings."""
    out = tmp_path_factory.mktemp("real") / "out"
    return out, _tile(_real_dir(), out)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> Path:
    """The slides without a usable MPP, with the fixes the errors name (override CSV, default MPP)."""
    root = tmp_path_factory.mktemp("fixed")
    src = root / "slides"
    src.mkdir()
    for name in (f"{TCGA}.svs", "openslide-boxes.tiff"):
        (src / name).symlink_to(_real_dir() / name)
    overrides = root / "mpp.csv"
    overrides.write_text(f"slide_id,mpp\n{TCGA}.svs,0.25\n")
    result = _tile(src, root / "out", f"slides.mpp_override_csv={overrides}", "slides.default_mpp=0.25")
    assert result.returncode == 1, result.stderr  # boxes still fails, for its true reason
    return root / "out"


def test_every_real_file_has_the_outcome_users_expect(tiled) -> None:
    out, result = tiled
    assert result.returncode == 1, result.stderr  # some slides failed, the others carried on
    rows = _rows(out)
    assert set(rows) == ALL_FILES  # every file of the folder, DICOM instances included, has a row
    status = {name: row["status"] for name, row in rows.items()}
    reason = {name: row["reason"] for name, row in rows.items()}

    cmu = rows["CMU-1-Small-Region.svs"]
    assert (cmu["status"], cmu["reader"], cmu["vendor"], cmu["mpp"], cmu["mpp_source"]) == (
        "done", "jpeg-tiles", "aperio", "0.499", "slide")
    assert int(cmu["n_patches"]) > 20

    tcga = rows[f"{TCGA}.svs"]
    assert tcga["status"] == "failed" and tcga["mpp_note"] == "aperio file states no MPP"
    assert "no usable microns-per-pixel" in tcga["reason"]
    assert "slides.mpp_override_csv" in tcga["reason"] and "slides.default_mpp" in tcga["reason"]

    ndpi = rows["slideio-test3-DAPI-2-(387).ndpi"]
    assert (ndpi["vendor"], ndpi["levels"], ndpi["mpp_source"]) == ("hamamatsu", "7", "slide")
    assert float(ndpi["mpp"]) == pytest.approx(0.22818, abs=1e-4)
    assert ndpi["status"] == "failed" and "looks like a fluorescence or dark-field image" in ndpi["reason"]

    boxes = rows["openslide-boxes.tiff"]
    assert boxes["status"] == "failed" and boxes["mpp"] == ""
    assert "352.778 um/px is 72 dpi, a file writer's default" in boxes["mpp_note"]

    assert rows["boxes_0.dcm"]["slide_id"] == rows["boxes_1.dcm"]["slide_id"] == "openslide-boxes-dicom"
    assert status["boxes_1.dcm"] == "skipped" and "instance of DICOM slide" in reason["boxes_1.dcm"]
    assert rows["boxes_0.dcm"]["vendor"] == "dicom" and status["boxes_0.dcm"] == "failed"
    for name in ("boxes_0.dcm", "openslide-small.svs"):
        assert "(16 x 16 px at 0.499 um/px (slide) = 8 x 8 um) is smaller than one 256 px patch" in reason[name]

    assert "pixels cannot be decoded (openslide: Bogus marker length" in reason["openslide-unreadable.svs"]
    assert "Unsupported TIFF compression: 52479" in reason["openslide-unopenable.tiff"]
    assert "histolab-broken.svs is not a slide" in reason["histolab-broken.svs"]
    assert status == {**{n: "failed" for n in ALL_FILES}, "CMU-1-Small-Region.svs": "done", "boxes_1.dcm": "skipped"}
    assert "10 entries" in result.stdout and "1 tiled, 0 already done, 1 skipped (1 DICOM instance), 8 failed" in \
        result.stdout


def test_cmu_patches_are_openslide_pixels_at_the_stored_coordinates(tiled) -> None:
    out, _ = tiled
    cfg = load_config()
    store = open_patch_store(Layout(out).patch_store(tiling_key(cfg), "CMU-1-Small-Region"))
    a = store.attrs
    assert (a["reader"], a["level"], a["read_size"], a["resample_filter"]) == ("jpeg-tiles", 0, 257, "lanczos")
    assert a["tile_decoder"] == "simplejpeg"
    slide = openslide.OpenSlide(str(REAL / "CMU-1-Small-Region.svs"))
    for i in range(0, len(store), max(1, len(store) // 8)):
        x, y = (int(v) for v in store.coords[i])
        region = slide.read_region((x, y), 0, (257, 257)).convert("RGB")  # 256 px at 0.5 um/px from 0.499 um/px
        expected = np.asarray(region.resize((256, 256), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(store.patches[i], expected)


def test_slides_without_usable_mpp_work_with_the_fixes_their_errors_name(fixed) -> None:
    rows = _rows(fixed)
    tcga = rows[f"{TCGA}.svs"]
    assert (tcga["status"], tcga["mpp"], tcga["mpp_source"]) == ("done", "0.25", "override")
    assert int(tcga["n_patches"]) > 10
    boxes = rows["openslide-boxes.tiff"]  # 300 x 250 px at the configured 0.25 um/px: never a runaway grid
    assert (boxes["mpp"], boxes["mpp_source"], boxes["status"]) == ("0.25", "default", "failed")
    assert "smaller than one 256 px patch" in boxes["reason"] and "72 dpi" in boxes["mpp_note"]


@pytest.mark.slow
def test_tiled_real_slides_embed_and_draw_heatmaps(tiled, fixed, tmp_path: Path) -> None:
    from wsi_mil.workflows.heatmap import draw_slide

    from wsi_mil.config import HeatmapConfig

    settings = ["--encoder", "tiny_cnn", "--weights", "random", "--device", "cpu", "--set", "features.num_workers=0"]
    for out, sid in ((tiled[0], "CMU-1-Small-Region"), (fixed, TCGA)):
        result = subprocess.run([str(BIN / "wsi-mil"), "-q", "extract", str(out), *settings], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        cfg = load_config(None, ["features.encoder=tiny_cnn", "features.weights=random"])
        bags = list((out / "features" / tiling_key(cfg)).glob(f"*/{sid}.h5"))
        assert len(bags) == 1, bags
        bag = read_bag(bags[0])
        assert bag.features.shape == (len(bag.coords), 64) and np.isfinite(bag.features).all()
        moved = tmp_path / f"moved-{sid}"  # the heatmap finds the slide by id where it moved to
        moved.mkdir()
        (moved / Path(bag.attrs["slide_path"]).name).symlink_to(bag.attrs["slide_path"])
        drawn = draw_slide(sid, bag, bag.features[:, 0].astype(np.float64), tmp_path / "maps", HeatmapConfig(top_k=0),
                           Layout(out), title=sid, model_name="abmil", run_id="real", slides_dir=moved)
        image = np.asarray(Image.open(drawn.png))
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and drawn.geojson.is_file()
