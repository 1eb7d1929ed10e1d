"""Our files in the field's tools: bags opened the way TRIDENT, TITAN and CLAM read them, the folder
layouts of `wsi-mil export clam|trident`, and `wsi-mil annotations` on real QuPath exports.

The peers' read patterns are written from their documentation (TRIDENT's output reference, TITAN's
README, CLAM's feature and stitching readers), not copied from their code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import torch
from PIL import Image
from wsi_mil.workflows.interop import export_layout, titan_grid_collisions, trident_config_dir

from wsi_mil import stores
from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.layout import Layout
from wsi_mil.slides import open_slide

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# CMU-1-Small-Region (MPP 0.499): 2.0 um/px x 64 px patches = a 256.51 level-0 px step, read at level 0
SETTINGS = ["tiling.target_mpp=2.0", "tiling.patch_size=64", "tiling.qc_images=false", "features.encoder=tiny_cnn",
            "features.weights=random", "features.device=cpu", "features.batch_size=16"]


def _sets(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


@pytest.fixture(scope="module")
def real_bag(tmp_path_factory) -> tuple[Path, Path]:
    """One real slide tiled and embedded by the CLI: (OUT, its bag)."""
    slide = SHARED / "real-slides" / "CMU-1-Small-Region.svs"
    assert slide.is_file(), f"the shared real slide is missing: {slide}"
    root = tmp_path_factory.mktemp("interop")
    (root / "slides").mkdir()
    (root / "slides" / slide.name).symlink_to(slide)
    out = root / "out"
    assert main(["-q", "tile", str(root / "slides"), "--out", str(out), *_sets(SETTINGS)]) == 0
    assert main(["-q", "extract", str(out), *_sets(SETTINGS)]) == 0
    bags = sorted(out.glob("features/*/*/*.h5"))
    assert len(bags) == 1
    return out, bags[0]


# ------------------------------------------------------------------------------------ peer readers
@pytest.mark.slow
def test_titan_reads_our_bag_and_places_every_patch_in_its_own_grid_cell(real_bag) -> None:
    _, bag = real_bag
    with h5py.File(bag, "r") as file:  # TITAN's README: features, coords, coords.attrs['patch_size_level0']
        features = torch.from_numpy(file["features"][:])
        coords = torch.from_numpy(file["coords"][:])
        patch_size_lv0 = file["coords"].attrs["patch_size_level0"]
    assert features.ndim == 2 and coords.shape == (features.shape[0], 2) and coords.dtype == torch.int64
    assert isinstance(patch_size_lv0, np.integer) and patch_size_lv0 == 256  # exact step 256.51, rounded down
    exact = stores.read_bag_attrs(bag)["patch_size_level0"]
    assert exact == pytest.approx(64 * 2.0 / 0.499)
    assert titan_grid_collisions(coords.numpy(), int(patch_size_lv0)) == 0
    assert titan_grid_collisions(coords.numpy(), round(exact)) > 0  # why it is rounded down, not to nearest


@pytest.mark.slow
def test_trident_reads_our_bag_attributes_consistently(real_bag) -> None:
    _, bag = real_bag
    with h5py.File(bag, "r") as f:  # TRIDENT: attributes live on the coords dataset
        attrs = dict(f["coords"].attrs)
        encoder, name = f["features"].attrs["encoder"], f["features"].attrs["name"]
    for key in ("patch_size_level0", "level0_magnification", "target_magnification", "name", "level0_width",
                "level0_height", "overlap"):
        assert key in attrs, key
    assert (attrs["level0_width"], attrs["level0_height"]) == open_slide(SHARED / "real-slides" /
                                                                         "CMU-1-Small-Region.svs").dimensions
    assert attrs["level0_magnification"] == pytest.approx(10 / 0.499)  # magnification = 10 / MPP
    assert attrs["target_magnification"] == pytest.approx(5.0)
    assert attrs["name"] == name == "CMU-1-Small-Region" and encoder == "tiny_cnn" and attrs["overlap"] == 0
    # TRIDENT's relation between its target-size patch_size and the level-0 size
    assert 64 * attrs["level0_magnification"] / attrs["target_magnification"] == pytest.approx(
        attrs["patch_size_level0"], abs=1)


@pytest.mark.slow
def test_clam_reads_the_same_patches_from_our_bag(real_bag) -> None:
    out, bag = real_bag
    with h5py.File(bag, "r") as f:  # CLAM's dataset, patch reader and StitchCoords
        features, coords = f["features"][:], f["coords"][:]
        dset = f["coords"]
        patch_size, patch_level, name = dset.attrs["patch_size"], dset.attrs["patch_level"], dset.attrs["name"]
    assert features.shape[0] == coords.shape[0] and name == "CMU-1-Small-Region"
    slide = openslide.OpenSlide(str(SHARED / "real-slides" / "CMU-1-Small-Region.svs"))
    assert patch_size * slide.level_downsamples[patch_level] == pytest.approx(64 * 2.0 / 0.499, abs=1)
    store = stores.open_patch_store(Path(stores.read_bag_attrs(bag)["patch_store"]))
    assert store.attrs["resample_filter"] == "lanczos"  # 257 px -> 64 px
    for i in (0, len(coords) // 2, len(coords) - 1):  # CLAM: read_region(coord, patch_level, (size, size))
        region = slide.read_region(tuple(int(v) for v in coords[i]), int(patch_level), (int(patch_size),) * 2)
        clam = np.asarray(region.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64)
        assert np.abs(clam - store.patches[i].astype(np.float64)).mean() < 1.0  # the very patch we embedded


def test_peer_attributes_follow_each_tools_meaning_of_patch_size() -> None:
    ours = {"slide_id": "s", "mpp_level0": 0.25, "target_mpp": 0.5, "patch_size_level0": 512.0, "read_size": 512,
            "target_patch_size": 256, "patch_level": 0, "width": 4000, "height": 3000, "overlap": 32}
    clam = stores.peer_coords_attrs(ours)
    trident = stores.peer_coords_attrs(ours, patch_size="trident")
    assert clam["patch_size"] == 512 and trident["patch_size"] == 256  # CLAM: at patch_level; TRIDENT: at target
    assert clam["level0_magnification"] == 40.0 and clam["target_magnification"] == 20.0
    assert {k: v for k, v in clam.items() if k != "patch_size"} == {k: v for k, v in trident.items() if k != "patch_size"}
    assert (clam["patch_size_level0"], clam["overlap"], clam["name"]) == (512, 32, "s")
    assert stores.peer_coords_attrs({**ours, "patch_size_level0": 511.9999999})["patch_size_level0"] == 512


# ------------------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_export_clam_links_h5_files_and_writes_pt_files(real_bag, tmp_path) -> None:
    out, bag = real_bag
    cfg = load_config(None, SETTINGS)
    report = export_layout("clam", out, cfg, tmp_path / "clam")
    link = tmp_path / "clam" / "h5_files" / f"{bag.stem}.h5"
    assert link.is_symlink() and link.resolve() == bag.resolve() and not os.path.isabs(os.readlink(link))
    pt = tmp_path / "clam" / "pt_files" / f"{bag.stem}.pt"
    assert pt.is_file() and not pt.is_symlink()  # no .pt beside the bag: written
    np.testing.assert_array_equal(torch.load(pt).numpy(), stores.read_bag(bag).features.astype(np.float32))
    assert (report.linked, report.written) == (1, 1)
    again = export_layout("clam", out, cfg, tmp_path / "clam")
    assert (again.linked, again.written, again.unchanged) == (0, 0, 2)


@pytest.mark.slow
def test_export_trident_writes_its_job_directory(real_bag, capsys) -> None:
    out, bag = real_bag
    assert main(["-q", "export", "trident", str(out), *_sets(SETTINGS), "--encoder-name", "tiny"]) == 0
    assert "TRIDENT layout" in capsys.readouterr().out
    job = Layout(out).export_dir("trident") / "5x_64px_0px_overlap"
    assert trident_config_dir(stores.read_bag_attrs(bag)) == job.name
    feature_file = job / "features_tiny" / f"{bag.stem}.h5"
    assert feature_file.is_symlink() and feature_file.resolve() == bag.resolve()
    with h5py.File(job / "patches" / f"{bag.stem}_patches.h5", "r") as f:  # TRIDENT's read_coords pattern
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
    np.testing.assert_array_equal(coords, stores.read_bag_coords(bag))
    assert attrs["patch_size"] == 64  # TRIDENT's meaning: the side at target_magnification
    src = round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"])
    assert src == stores.read_bag_attrs(bag)["read_size"]  # TRIDENT re-reads the same level-0 area


# ------------------------------------------------------------------------------------- annotations
@pytest.mark.parametrize("name, role, n_ignored", [("qupath-polygon.json", "tumour", 0),
                                                   ("qupath-rectangle.json", "tumour", 0),
                                                   ("qupath-point.json", None, 1), ("qupath-line.json", None, 1)])
def test_annotations_command_reports_real_qupath_exports(name, role, n_ignored, capsys) -> None:
    path = SHARED / "qupath-exports" / name
    assert path.is_file(), f"the shared QuPath export is missing: {path}"
    assert main(["annotations", str(path), "--mpp", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["role"] for r in report["classes"]] == ([role] if role else [])
    assert len(report["ignored"]) == n_ignored
    if role:
        assert report["classes"][0]["area_um2"] == pytest.approx(report["classes"][0]["area_px"] * 0.25)
    assert main(["annotations", str(path), "--set", "training.annotations.unclassified=exclusion"]) == 0
    text = capsys.readouterr().out
    assert ("exclusion" in text.split("\n", 2)[2]) == bool(role)
    assert ("ignored #0" in text) == bool(n_ignored)


def test_annotations_command_warns_when_areas_fall_outside_the_slide(capsys, caplog) -> None:
    path = SHARED / "qupath-exports" / "qupath-rectangle.json"
    slide = SHARED / "real-slides" / "CMU-1-Small-Region.svs"
    assert path.is_file() and slide.is_file(), f"shared data missing under {SHARED}"
    assert main(["annotations", str(path), "--slide", str(slide), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mpp"] == pytest.approx(0.499)
    assert "2220 x 2967" in report["warning"]
    assert report["classes"][0]["area_um2"] == pytest.approx(210 * 176 * 0.499**2)
