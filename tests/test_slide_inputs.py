"""Every kind of input a slide folder holds, generated as real files, through `tile_cohort` and slides.csv.

Writer-default and millimetre MPPs, grids that would run away, classic DICOM, unknown extensions,
MIRAX data folders, flat TIFF, PNG, OME-TIFF with PhysicalSize, GDC-style sub-folders, and marker ink
of four colours: each asserts its row in ``slides.csv`` (status, reason, reader, MPP and its note).
"""

from __future__ import annotations

import csv
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest_inputs import (
    ink_box,
    render,
    write_dicom,
    write_flat_tiff,
    write_ome_tiff,
    write_png,
    write_svs_or_tiff,
)

from wsi_mil.compute import dask_client
from wsi_mil.config import ComputeConfig, SlidesConfig, load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.slides import inspect_slide, scan_folder
from wsi_mil.slides.dicom import WSI_SOP_CLASS
from wsi_mil.stores import open_patch_store
from wsi_mil.tiling import tile_cohort

W, H = 1024, 768  # level-0 px of the generated slides; at 0.5 um/px the tissue disc is ~29 000 um^2
BASE = ["tiling.patch_size=64", "tiling.target_mpp=0.5", "tiling.chunk_patches=16"]
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def client():
    with dask_client(ComputeConfig(threads_per_worker=2)) as c:
        yield c


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return render(W, H)


def _tile(src: Path, out: Path, client, *settings: str):
    cfg = load_config(None, BASE + list(settings))
    return cfg, tile_cohort(src, out, cfg, client=client)


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(Layout(out).slides_csv, newline="") as fh:
        return {Path(r["path"]).name: r for r in csv.DictReader(fh)}


# ------------------------------------------------------------------------------------------------ MPP
@pytest.mark.timeout(180)
def test_writer_default_and_millimetre_mpps_are_not_trusted(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_svs_or_tiff(src / "dpi72.tiff", image, 25400 / 72, "tiff")  # like openslide's boxes.tiff
    write_svs_or_tiff(src / "cm1.tiff", image, 10000.0, "tiff")  # 1 px/cm: was a 763 GiB allocation
    write_svs_or_tiff(src / "mm.svs", image, 0.00025, "svs")  # Aperio MPP written in millimetres
    write_png(src / "roi.png", image, dpi=96)
    tracemalloc.start()
    try:
        _, report = _tile(src, tmp_path / "out", client, "tiling.qc_images=false")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"refusing four slides allocated {peak / 2**20:.0f} MiB"
    rows = _rows(tmp_path / "out")
    notes = {"dpi72.tiff": "is 72 dpi, a file writer's default", "cm1.tiff": "is 1 pixel per centimetre",
             "mm.svs": "looks like millimetres (0.25 um/px)", "roi.png": "is 96 dpi"}
    for name, note in notes.items():
        row = rows[name]
        assert row["status"] == "failed" and row["n_patches"] == "0", row
        assert "no usable microns-per-pixel" in row["reason"] and "slides.default_mpp" in row["reason"]
        assert note in row["mpp_note"] and note in row["reason"]
        assert (row["width"], row["height"], row["mpp"]) == (str(W), str(H), "")
    assert rows["roi.png"]["reader"] == "pillow" and rows["mm.svs"]["vendor"] == "aperio"
    assert report.summary().startswith("4 entries") and "4 failed" in report.summary()

    overrides = tmp_path / "mpp.csv"
    overrides.write_text("slide_id,mpp\nmm.svs,0.5\n")  # written with its extension: still slide "mm"
    _tile(src, tmp_path / "out2", client, "slides.default_mpp=0.5", f"slides.mpp_override_csv={overrides}",
          "tiling.qc_images=false")
    rows = _rows(tmp_path / "out2")
    assert {r["status"] for r in rows.values()} == {"done"}
    assert (rows["mm.svs"]["mpp"], rows["mm.svs"]["mpp_source"]) == ("0.5", "override")
    assert (rows["cm1.tiff"]["mpp"], rows["cm1.tiff"]["mpp_source"]) == ("0.5", "default")
    assert "1 pixel per centimetre" in rows["cm1.tiff"]["mpp_note"]  # the reason stays on record


def test_implausible_override_is_a_config_error(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "a.tif", image, 0.5)
    bad = tmp_path / "mpp.csv"
    bad.write_text("slide_id,mpp\na,352.8\n")
    with pytest.raises(WsiMilError, match=r"mpp.csv line 2: mpp 352.8 um/px lies outside slides.mpp_range"):
        _tile(src, tmp_path / "out", client, f"slides.mpp_override_csv={bad}")
    with pytest.raises(WsiMilError, match="slides.default_mpp 300.0 lies outside slides.mpp_range"):
        load_config(None, ["slides.default_mpp=300"])


@pytest.mark.timeout(180)
def test_absurd_grids_are_refused_before_reading_pixels(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "ok.tif", image, 0.5)
    write_png(src / "tiny.png", image[:40, :40], dpi=None)  # 40 px at 0.5 um/px: 20 um
    write_flat_tiff(src / "long.tif", np.full((200, 7000, 3), 240, np.uint8), 20.0)  # 140 mm at 20 um/px
    out = tmp_path / "out"
    _, report = _tile(src, out, client, "slides.default_mpp=0.5", "tiling.max_grid_patches=100")
    rows = _rows(out)
    assert "smaller than one 64 px patch at 0.5 um/px (32 um)" in rows["tiny.png"]["reason"]
    assert "40 x 40 px at 0.5 um/px (default)" in rows["tiny.png"]["reason"]
    assert "would measure 140 x 4 mm, larger than any glass slide" in rows["long.tif"]["reason"]
    assert "grid of 16 x 12 = 192 patches" in rows["ok.tif"]["reason"]
    assert "tiling.max_grid_patches=100" in rows["ok.tif"]["reason"]
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert not Layout(out).qc_dir.exists() or not any(Layout(out).qc_dir.iterdir())  # no thumbnail was read


# ------------------------------------------------------------------------------------- every file
def test_every_file_gets_a_row(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "good.tif", image, 0.5)
    (src / "notes.txt").write_text("scanner log")
    (src / "scan.qptiff").write_bytes(b"II*\x00")
    (src / "olympus.vsi").write_bytes(b"\x00")
    (src / ".DS_Store").write_bytes(b"\x00")
    (src / "ct").mkdir()
    write_dicom(src / "ct" / "image1.dcm", CT_IMAGE)
    write_dicom(src / "ct" / "image2.dcm", CT_IMAGE)
    (src / "ct" / "junk.dcm").write_bytes(b"not dicom at all")
    (src / "m.mrxs").write_bytes(b"[GENERAL]\n")
    (src / "m").mkdir()
    (src / "m" / "Slidedat.ini").write_text("[GENERAL]\n")
    (src / "m" / "Data0000.dat").write_bytes(b"\x00" * 10)
    (src / "more").mkdir()
    write_flat_tiff(src / "more" / "later.tif", image, 0.5)
    out = tmp_path / "out"
    _, report = _tile(src, out, client)
    rows = _rows(out)
    expected = {
        "good.tif": ("done", ""),
        "notes.txt": ("skipped", "extension .txt is not in slides.extensions"),
        "scan.qptiff": ("skipped", "Akoya QPTIFF"),
        "olympus.vsi": ("skipped", "export it to OME-TIFF"),
        ".DS_Store": ("skipped", "hidden file"),
        "image1.dcm": ("skipped", "classic DICOM (CT image), not a whole-slide image"),
        "image2.dcm": ("skipped", "classic DICOM (CT image)"),
        "junk.dcm": ("failed", "is not a DICOM file (no 'DICM' marker"),
        "m.mrxs": ("failed", "m.mrxs cannot be opened (openslide: Key file does not have key"),
        "Slidedat.ini": ("skipped", "data file of MIRAX slide 'm'"),
        "Data0000.dat": ("skipped", "data file of MIRAX slide 'm'"),
        "more": ("skipped", "it holds 1 slide file(s): set slides.recursive=true"),
    }
    assert set(rows) == set(expected)
    for name, (status, reason) in expected.items():
        assert rows[name]["status"] == status and reason in rows[name]["reason"], (name, rows[name])
    summary = report.summary()
    assert summary.startswith("12 entries") and "1 tiled" in summary and "2 failed" in summary
    assert "9 skipped (2 MIRAX data, 2 classic DICOM, 1 hidden, 1 sub-folder, 3 unknown extension)" in summary


def test_dicom_wsi_instances_of_a_folder_are_one_slide(tmp_path: Path) -> None:
    folder = tmp_path / "in" / "case-7"
    folder.mkdir(parents=True)
    for i in range(3):
        write_dicom(folder / f"level{i}.dcm", WSI_SOP_CLASS)
    write_dicom(folder / "ct.dcm", CT_IMAGE)
    entries = {e.path.name: e for e in scan_folder(tmp_path / "in", SlidesConfig()).entries}
    assert [(e.path.name, e.slide_id) for e in entries.values() if e.status == "slide"] == [("level0.dcm", "case-7")]
    assert entries["level1.dcm"].kind == entries["level2.dcm"].kind == "DICOM instance"
    assert "read together with level0.dcm" in entries["level2.dcm"].reason
    assert entries["ct.dcm"].kind == "classic DICOM"


# ---------------------------------------------------------------------------------- second reader
def test_flat_tiff_png_and_ome_tiff_tile_through_the_second_reader(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "flat.tif", image, 0.5)
    write_png(src / "roi.png", image)
    write_ome_tiff(src / "S1.ome.tif", image, 500.0)  # PhysicalSizeX 500 nm = 0.5 um/px, three levels
    ome = inspect_slide(src / "S1.ome.tif", SlidesConfig())
    assert (ome.slide_id, ome.reader, ome.vendor, ome.levels, ome.mpp) == ("S1", "tifffile", "ome-tiff", 3, 0.5)
    overrides = tmp_path / "mpp.csv"
    overrides.write_text("slide_id,mpp\nroi,0.5\nS1,0.4\n")  # keyed by id: "S1" is S1.ome.tif
    out = tmp_path / "out"
    cfg, report = _tile(src, out, client, f"slides.mpp_override_csv={overrides}")
    rows = _rows(out)
    assert {n: (r["status"], r["reader"], r["slide_id"]) for n, r in rows.items()} == {
        "flat.tif": ("done", "tifffile", "flat"), "roi.png": ("done", "pillow", "roi"),
        "S1.ome.tif": ("done", "tifffile", "S1")}
    assert (rows["flat.tif"]["mpp"], rows["flat.tif"]["mpp_source"]) == ("0.5", "slide")
    assert (rows["S1.ome.tif"]["mpp_source"], rows["S1.ome.tif"]["read_size"]) == ("override", "80")
    assert "72 dpi" in rows["roi.png"]["mpp_note"]
    for sid in ("flat", "roi"):  # level 0 at the target MPP: patches are the image's pixels
        store = open_patch_store(Layout(out).patch_store(tiling_key(cfg), sid))
        assert store.attrs["reader"] in ("tifffile", "pillow") and len(store) > 5
        for (x, y), patch in zip(store.coords, store.patches[:], strict=True):
            np.testing.assert_array_equal(patch, image[y : y + 64, x : x + 64])


# --------------------------------------------------------------------------------------- layouts
def test_gdc_style_folders_get_the_recursive_hint(tmp_path: Path, client, image) -> None:
    src = tmp_path / "gdc"
    for uuid, name in (("0a1b", "TCGA-A.tif"), ("9f8e", "TCGA-B.tif")):
        (src / uuid / "logs").mkdir(parents=True)
        write_flat_tiff(src / uuid / name, image, 0.5)
        (src / uuid / "logs" / "download.log").write_text("ok")
    (src / "MANIFEST.txt").write_text("id\tfilename\n")
    with pytest.raises(WsiMilError, match=r"sub-folders hold 2 slide file\(s\); set slides.recursive=true"):
        _tile(src, tmp_path / "out", client)
    assert _rows(tmp_path / "out")["0a1b"]["status"] == "skipped"  # slides.csv was written all the same
    _, report = _tile(src, tmp_path / "out", client, "slides.recursive=true")
    rows = _rows(tmp_path / "out")
    assert [rows[n]["status"] for n in ("TCGA-A.tif", "TCGA-B.tif", "download.log", "MANIFEST.txt")] == [
        "done", "done", "skipped", "skipped"]


# ------------------------------------------------------------------------------------------- ink
def test_marker_ink_of_every_colour_is_not_tiled(tmp_path: Path, client) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "clean.tif", render(W, H, None, seed=3), 0.5)
    for ink in ("red", "blue", "green", "black"):
        write_flat_tiff(src / f"{ink}.tif", render(W, H, ink, seed=3), 0.5)
    out = tmp_path / "out"
    cfg, _ = _tile(src, out, client)
    rows = _rows(out)
    x0, y0, x1, y1 = ink_box(W, H)
    clean = int(rows["clean.tif"]["n_patches"])
    assert clean > 10
    for ink in ("red", "blue", "green", "black"):
        store = open_patch_store(Layout(out).patch_store(tiling_key(cfg), ink))
        on_ink = [(x, y) for x, y in store.coords if x + 64 > x0 and x < x1 and y + 64 > y0 and y < y1]
        assert not on_ink, f"{ink} ink tiled as tissue at {on_ink[:3]}"
        assert abs(len(store) - clean) <= 2, (ink, len(store), clean)
    unfiltered, _ = _tile(src, tmp_path / "raw", client, "tissue.remove_pen=false")
    raw = open_patch_store(Layout(tmp_path / "raw").patch_store(tiling_key(unfiltered), "red"))
    assert len(raw) > clean + 5  # without ink removal the red stroke is tiled: the test can fail


def test_rerun_reuses_stores_of_moved_slides_and_keeps_skipped_rows(tmp_path: Path, client, image) -> None:
    src = tmp_path / "in"
    src.mkdir()
    write_flat_tiff(src / "a.tif", image, 0.5)
    (src / "readme.md").write_text("x")
    _tile(src, tmp_path / "out", client)
    shutil.move(src, tmp_path / "moved")  # same files elsewhere: same fingerprints, stores reused
    _, report = _tile(tmp_path / "moved", tmp_path / "out", client)
    assert [(r.slide_id, r.status) for r in report.results] == [("a", "reused"), ("readme", "skipped")]
