"""A full disk (a small tmpfs) during tile, extract and train: one-line errors, exit code 3, a rerun with space completes.

Needs ``mount -t tmpfs`` (root or CAP_SYS_ADMIN); skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.milcore import write_cohort
from helpers.patches import EXTRACT_FLAGS, write_patch_stores
from helpers.tiler import build_tiler_slides

from wsi_mil.config import Config, load_config
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.tracking import Tracker

BIN = Path(sys.executable).parent
TILE_SETTINGS = ["tiling.target_mpp=1.0", "tiling.patch_size=64", "tiling.chunk_patches=8"]


class SmallDisk:
    """A tmpfs of a few hundred KiB mounted at ``path``; :meth:`grow` gives it room."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'}); "
                        "run as root or with CAP_SYS_ADMIN")

    def grow(self, size: str = "256m") -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "disk", "400k")
    yield disk
    disk.close()


def _wsi_mil(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "wsi-mil"), "-q", *args], capture_output=True, text=True, timeout=600)


def _one_line_resource_error(done: subprocess.CompletedProcess, command: str) -> str:
    err = done.stderr.strip()
    assert done.returncode == 3, (done.returncode, err[-3000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-3000:]
    assert err.startswith(f"wsi-mil {command}: error: no space left on the device"), err
    return err


def test_tile_on_a_full_disk_says_so_in_one_line_and_a_rerun_with_space_completes(small_disk, tmp_path_factory):
    good = build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides").good_dir
    out = small_disk.path / "out"
    cmd = ["tile", str(good), "--out", str(out), "--workers", "1"]
    for item in TILE_SETTINGS:
        cmd += ["--set", item]
    err = _one_line_resource_error(_wsi_mil(*cmd), "tile")
    assert str(out) in err and "may be corrupt" not in err  # the slide is not blamed
    small_disk.grow()
    again = _wsi_mil(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    tiles = Layout(out).tiles_dir(tiling_key(load_config(None, TILE_SETTINGS)))
    assert sorted(p.name for p in tiles.iterdir()) == ["generic.zarr", "good.zarr", "pen.zarr"]


def test_extract_on_a_full_disk_says_so_in_one_line_and_a_rerun_with_space_completes(tmp_path):
    cfg = Config()
    layout, key = Layout(tmp_path / "out"), tiling_key(cfg)
    # patch stores on the roomy disk, bags on the small one
    write_patch_stores(layout.root, cfg, n=4, patches=64, patch_size=32, chunk_patches=16, seed=2)
    disk = SmallDisk(layout.root / "features", "40k")
    try:
        err = _one_line_resource_error(_wsi_mil("extract", str(layout.root), *EXTRACT_FLAGS), "extract")
        assert ".h5" in err and "finished bags are kept" in err
        disk.grow()
        again = _wsi_mil("extract", str(layout.root), *EXTRACT_FLAGS)
        assert again.returncode == 0, again.stderr[-3000:]
        assert " 0 failed" in again.stdout and len(list(layout.features_dir(key, "tiny_cnn-random").glob("*.h5"))) == 4
    finally:
        disk.close()


def test_train_on_a_full_disk_says_so_in_one_line_and_a_rerun_with_space_completes(small_disk, tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=8, dim=8, n_max=24)
    out = small_disk.path / "out"
    cmd = ["train", str(out), "--labels", str(labels), "--model", "mean", "--folds", "2", "--epochs", "2",
           "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0", "--set", "model.hidden_dim=8",
           "--set", "training.threads=1"]
    _one_line_resource_error(_wsi_mil(*cmd), "train")
    small_disk.grow()
    again = _wsi_mil(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    assert tracker.find_runs(role="cv")[0].status == "FINISHED"
