"""Tiling: stores equal the slide, resumability after a kill, per-slide failures, a real Dask cluster."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import servers
from helpers.tiler import build_tiler_slides

from wsi_mil.compute import dask_client
from wsi_mil.config import ComputeConfig, Config, SlidesConfig, load_config
from wsi_mil.errors import SlideError, WsiMilError
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.slides import open_slide
from wsi_mil.stores import is_complete_store, open_patch_store
from wsi_mil.tiling import CSV_COLUMNS, patch_grid, tile_cohort

BIN = Path(sys.executable).parent
# small, fast settings shared by every run of this file (level 1 of the synthetic slides is 1 um/px)
BASE = ["tiling.target_mpp=1.0", "tiling.patch_size=64", "tiling.chunk_patches=8"]


@pytest.fixture(scope="session")
def slides(tmp_path_factory):
    return build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")


@pytest.fixture(scope="module")
def client():
    with dask_client(ComputeConfig(threads_per_worker=2)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(slides, client, tmp_path_factory):
    """One uninterrupted run over the good slides (SVS, SVS with pen, generic TIFF)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = load_config(None, BASE)
    report = tile_cohort(slides.good_dir, out, cfg, client=client)
    return out, cfg, report


def _cfg(*extra: str) -> Config:
    return load_config(None, BASE + list(extra))


def _stores(out: Path, cfg: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    result = {}
    for path in sorted(tiles.glob("*.zarr")):
        store = open_patch_store(path)
        result[path.stem] = (store.coords, np.asarray(store.patches[:]))
    return result


def _assert_same_stores(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        np.testing.assert_array_equal(a[sid][0], b[sid][0])
        np.testing.assert_array_equal(a[sid][1], b[sid][1])


def _csv_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(Layout(out).slides_csv, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_COLUMNS
        return {row["slide_id"]: row for row in reader}


# ------------------------------------------------------------------------------------------ content
def test_reference_run_writes_complete_stores(reference) -> None:
    out, cfg, report = reference
    assert [r.status for r in report.results] == ["done"] * 3 and not report.failed
    rows = _csv_rows(out)
    assert set(rows) == {"generic", "good", "pen"}
    assert rows["generic"]["vendor"] == "generic-tiff" and rows["good"]["vendor"] == "aperio"
    assert all(int(r["n_patches"]) > 20 and r["status"] == "done" for r in rows.values())
    for sid in rows:
        for kind in ("thumb", "mask", "grid"):
            assert Layout(out).qc_image(sid, kind).is_file()
    store = open_patch_store(Path(rows["good"]["store"]))
    a = store.attrs
    for key in ["slide_id", "slide_path", "slide_fingerprint", "vendor", "mpp_level0", "target_mpp", "patch_size",
                "patch_size_level0", "level", "downsample", "read_size", "overlap", "tissue", "tiling_key",
                "wsi_mil_version", "patch_level", "complete"]:
        assert key in a, key
    assert (a["level"], a["patch_level"], a["downsample"], a["read_size"]) == (1, 1, 4.0, 64)
    assert a["patch_size_level0"] == pytest.approx(256.0) and a["tiling_key"] == tiling_key(cfg)
    assert a["tissue"]["preset"] == "default" and a["slide_fingerprint"]["width"] == 3072
    coords = store.coords
    assert coords.dtype == np.int64 and coords.shape == (len(store), 2)
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    np.testing.assert_array_equal(order, np.arange(len(coords)))  # row-major


@pytest.mark.parametrize("sid", ["good", "generic"])
def test_stored_patches_equal_read_region(reference, slides, sid: str) -> None:
    out, cfg, _ = reference
    store = open_patch_store(Layout(out).patch_store(tiling_key(cfg), sid))
    ext = ".tiff" if sid == "generic" else ".svs"
    slide = open_slide(slides.good_dir / f"{sid}{ext}")
    for i in range(0, len(store), max(1, len(store) // 7)):
        x, y = (int(v) for v in store.coords[i])
        expected = np.asarray(slide.read_region((x, y), 1, (64, 64)))[..., :3]
        np.testing.assert_array_equal(store.patches[i], expected)


def test_client_written_stores_equal_worker_written_ones(reference, slides, client, tmp_path: Path) -> None:
    out, cfg, _ = reference
    client_cfg = _cfg("tiling.write_from=client")
    tile_cohort(slides.good_dir, tmp_path / "out", client_cfg, client=client)
    _assert_same_stores(_stores(out, cfg), _stores(tmp_path / "out", client_cfg))
    for sid in _stores(out, cfg):  # QC images written by the client there, by the workers in the reference
        for kind in ("thumb", "mask", "grid"):
            assert Layout(tmp_path / "out").qc_image(sid, kind).is_file()
            assert Layout(out).qc_image(sid, kind).is_file()


def test_resampled_patches_within_tolerance(slides, client, tmp_path: Path) -> None:
    cfg = _cfg("tiling.target_mpp=0.5", "tiling.max_patches_per_slide=12")
    shutil.copytree(slides.good_dir, tmp_path / "in", ignore=shutil.ignore_patterns("generic*", "pen*"))
    tile_cohort(tmp_path / "in", tmp_path / "out", cfg, client=client)
    store = open_patch_store(Layout(tmp_path / "out").patch_store(tiling_key(cfg), "good"))
    assert len(store) == 12 and store.attrs["read_size"] == 128 and store.attrs["resampled"]
    assert store.attrs["reader"] == "jpeg-tiles"  # JPEG tiles decoded at 1/2 scale (shrink-on-load)
    slide = open_slide(tmp_path / "in" / "good.svs", SlidesConfig(fast_jpeg=False))  # OpenSlide, full size
    for i in range(len(store)):
        x, y = (int(v) for v in store.coords[i])
        native = np.asarray(slide.read_region((x, y), 0, (128, 128)))[..., :3].astype(np.float64)
        box = native.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        diff = np.abs(store.patches[i].astype(np.float64) - box)
        assert diff.mean() <= 1.5 and diff.max() <= 16


def test_patch_grid_threshold_overlap_and_cap() -> None:
    mask = np.zeros((100, 100), bool)
    mask[:, :50] = True  # left half is tissue; thumbnail px = 10 level-0 px
    cfg = Config().tiling.model_copy(update={"patch_size": 100, "target_mpp": 0.5})  # 200 level-0 px
    coords, frac = patch_grid(mask, 1000, 1000, 0.25, cfg)
    assert set(coords[:, 0].tolist()) == {0, 200, 400} and len(coords) == 15  # x=400 straddles: 50%
    assert np.all(frac >= 0.25)
    overlap = cfg.model_copy(update={"overlap": 50})
    coords_ov, _ = patch_grid(mask, 1000, 1000, 0.25, overlap)
    assert sorted(set(coords_ov[:, 0].tolist())) == [0, 100, 200, 300, 400]
    capped = cfg.model_copy(update={"max_patches_per_slide": 4})
    assert len(patch_grid(mask, 1000, 1000, 0.25, capped)[0]) == 4


# ------------------------------------------------------------------------------- resume and settings
def test_rerun_skips_and_new_setting_gets_new_key(reference, client, slides) -> None:
    out, cfg, _ = reference
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    before = {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.zarr/zarr.json")}
    report = tile_cohort(slides.good_dir, out, cfg, client=client)
    assert [r.status for r in report.results] == ["reused"] * 3
    assert {p.name: p.stat().st_mtime_ns for p in tiles.glob("*.zarr/zarr.json")} == before
    changed = _cfg("tiling.tissue_threshold=0.6", "tiling.export_clam_h5=true")
    assert tiling_key(changed) != tiling_key(cfg)
    report = tile_cohort(slides.good_dir, out, changed, client=client)
    assert [r.status for r in report.results] == ["done"] * 3
    new = Layout(out).tiles_dir(tiling_key(changed))
    assert len(list(new.glob("*.zarr"))) == 3 and len(list(tiles.glob("*.zarr"))) == 3
    old_n = {sid: len(v[0]) for sid, v in _stores(out, cfg).items()}
    new_n = {sid: len(v[0]) for sid, v in _stores(out, changed).items()}
    assert all(new_n[s] < old_n[s] for s in old_n)
    with h5py.File(new / "clam_coords" / "good.h5", "r") as f:
        assert f["coords"].shape == (new_n["good"], 2)
        assert (f["coords"].attrs["patch_size"], f["coords"].attrs["patch_level"]) == (64, 1)


def test_export_clam_h5_turned_on_after_tiling_fills_in_missing_files(reference, client, slides, tmp_path) -> None:
    out, cfg, _ = reference
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    tiles = Layout(copy).tiles_dir(tiling_key(cfg))
    assert not (tiles / "clam_coords").exists()
    report = tile_cohort(slides.good_dir, copy, _cfg("tiling.export_clam_h5=true"), client=client)
    assert [r.status for r in report.results] == ["reused"] * 3  # same tiling key: nothing re-tiled
    for sid, (coords, _) in _stores(copy, cfg).items():
        store = open_patch_store(tiles / f"{sid}.zarr")
        with h5py.File(tiles / "clam_coords" / f"{sid}.h5", "r") as f:
            np.testing.assert_array_equal(f["coords"][:], coords)
            attrs = f["coords"].attrs
            assert (attrs["patch_size"], attrs["patch_level"]) == (store.attrs["read_size"], store.attrs["level"])
            assert attrs["name"] == sid


def test_changed_slide_is_retiled(slides, client, tmp_path: Path) -> None:
    cfg = _cfg("tiling.max_patches_per_slide=8")
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.good_dir / "good.svs", src / "s.svs")
    tile_cohort(src, tmp_path / "out", cfg, client=client)
    shutil.copyfile(slides.good_dir / "pen.svs", src / "s.svs")  # same name, other content
    report = tile_cohort(src, tmp_path / "out", cfg, client=client)
    assert report.results[0].status == "done"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(reference, slides, tmp_path: Path) -> None:
    ref_out, cfg, _ = reference
    out = tmp_path / "out"
    cmd = [str(BIN / "wsi-mil"), "-q", "tile", str(slides.good_dir), "--out", str(out)]
    for item in BASE:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if tiles.is_dir() and any(".partial-" in p.name for p in tiles.iterdir()):
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    complete = [p for p in tiles.iterdir() if is_complete_store(p)]
    assert len(complete) < 3 and any(".partial-" in p.name for p in tiles.iterdir())
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(".partial-" in p.name for p in tiles.iterdir())
    _assert_same_stores(_stores(out, cfg), _stores(ref_out, cfg))


# ------------------------------------------------------------------------------------------ failures
def test_bad_slides_fail_alone(slides, client, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.good_dir / "good.svs", src / "good.svs")
    for path in (slides.truncated, slides.not_a_slide, slides.blank):
        shutil.copyfile(path, src / path.name)
    out = tmp_path / "out"
    cfg = _cfg()
    report = tile_cohort(src, out, cfg, client=client)
    status = {r.slide_id: r.status for r in report.results}
    assert status == {"blank": "failed", "good": "done", "notes": "failed", "truncated": "failed"}
    rows = _csv_rows(out)
    assert "no stained tissue found" in rows["blank"]["reason"]
    assert "notes.svs is not a slide" in rows["notes"]["reason"]
    assert "truncated.svs" in rows["truncated"]["reason"]
    assert int(rows["good"]["n_patches"]) > 0 and rows["good"]["reason"] == ""
    assert "3 failed" in report.summary() and "FAILED truncated" in report.summary()
    assert [p.name for p in Layout(out).tiles_dir(tiling_key(cfg)).iterdir()] == ["good.zarr"]
    with pytest.raises(SlideError, match="stopped by --strict"):
        tile_cohort(src, tmp_path / "strict", cfg, strict=True, client=client)


def test_slide_without_mpp(slides, client, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.no_mpp, src / "nompp.tiff")
    shutil.copyfile(slides.good_dir / "generic.tiff", src / "withmpp.tiff")
    cfg = _cfg("tiling.max_patches_per_slide=8")
    report = tile_cohort(src, tmp_path / "a", cfg, client=client)
    by_id = {r.slide_id: r for r in report.results}
    assert by_id["withmpp"].status == "done" and by_id["nompp"].status == "failed"
    assert "has no usable microns-per-pixel" in by_id["nompp"].error and "slides.default_mpp" in by_id["nompp"].error
    report = tile_cohort(src, tmp_path / "b", _cfg("tiling.max_patches_per_slide=8", "slides.default_mpp=0.25"),
                         client=client)
    assert all(r.status == "done" for r in report.results)
    assert _csv_rows(tmp_path / "b")["nompp"]["mpp_source"] == "default"
    override = tmp_path / "mpp.csv"
    override.write_text("slide_id,mpp\nnompp,0.25\n")
    report = tile_cohort(src, tmp_path / "c", _cfg("tiling.max_patches_per_slide=8",
                                                   f"slides.mpp_override_csv={override}"), client=client)
    assert all(r.status == "done" for r in report.results)
    assert _csv_rows(tmp_path / "c")["nompp"]["mpp_source"] == "override"


def test_duplicate_ids_and_empty_directory(tmp_path: Path, client) -> None:
    (tmp_path / "x.svs").write_bytes(b"1")
    (tmp_path / "x.tiff").write_bytes(b"2")
    report = tile_cohort(tmp_path, tmp_path / "out", _cfg(), client=client)
    assert [r.status for r in report.results] == ["failed", "failed"]
    assert all("share the id 'x'" in r.reason for r in report.results)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WsiMilError, match="no slides found"):
        tile_cohort(empty, tmp_path / "out", _cfg(), client=client)


def test_cli_exit_codes(slides, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.not_a_slide, src / "notes.svs")
    cmd = [str(BIN / "wsi-mil"), "-q", "tile", str(src), "--out", str(tmp_path / "out")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "notes" in result.stdout
    result = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "notes.svs" in result.stderr


# ------------------------------------------------------------------------------- distributed cluster
@pytest.mark.slow
def test_distributed_cluster_gives_the_same_stores(reference, slides, tmp_path: Path) -> None:
    ref_out, cfg, _ = reference
    with servers.dask_cluster(2) as address:
        out = tmp_path / "out"
        dist_cfg = _cfg(f"compute.scheduler={address}", "compute.connect_timeout=60")
        with dask_client(dist_cfg.compute) as client:
            assert len(client.nthreads()) == 2
            report = tile_cohort(slides.good_dir, out, dist_cfg, client=client)
    assert [r.status for r in report.results] == ["done"] * 3
    _assert_same_stores(_stores(out, cfg), _stores(ref_out, cfg))


def test_unreachable_scheduler_is_a_clear_error(tmp_path: Path) -> None:
    cfg = ComputeConfig(scheduler=f"tcp://127.0.0.1:{servers.free_port()}", connect_timeout=2)
    with pytest.raises(WsiMilError, match="cannot reach the Dask scheduler"), dask_client(cfg):
        pass
