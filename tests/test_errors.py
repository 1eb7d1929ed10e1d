"""Slide problems fail one slide; bugs and resource errors propagate, the slide named (wsi_mil.errors)."""

from __future__ import annotations

import errno
import shutil
import zlib

import distributed
import pytest
from helpers.patches import write_patch_stores
from helpers.tiler import build_tiler_slides

import wsi_mil.extract.device as extract_device
import wsi_mil.tiling as tiling
from wsi_mil.config import Config, FeaturesConfig, load_config
from wsi_mil.errors import ResourceError, SlideError, is_slide_problem, resource_error, resource_problem
from wsi_mil.extract import extract_cohort
from wsi_mil.layout import Layout, tiling_key

BASE = ["tiling.target_mpp=1.0", "tiling.patch_size=64", "tiling.chunk_patches=8"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides")


@pytest.fixture(scope="module")
def local_client():
    """A real Dask cluster inside this process (threads), so that a monkeypatched task runs on its workers."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        yield client


def _raise_in(module: str, exc: BaseException) -> BaseException:
    """``exc`` with a traceback whose innermost frame is in a file of ``module`` (as if that library raised it)."""
    code = compile("raise exc", f"/site-packages/{module}/fake.py", "exec")
    try:
        exec(code, {"exc": exc})
    except BaseException as raised:
        return raised
    raise AssertionError


def test_slide_problems_and_bugs_are_told_apart():
    assert is_slide_problem(SlideError("x")) and is_slide_problem(FileNotFoundError(2, "gone"))
    assert is_slide_problem(zlib.error("bad data")) and is_slide_problem(EOFError())
    assert is_slide_problem(_raise_in("tifffile", ValueError("not a TIFF")))
    assert is_slide_problem(_raise_in("PIL", KeyError("bad tag")))
    assert not is_slide_problem(_raise_in("PIL", TypeError("wrong argument")))  # our call was wrong
    assert not is_slide_problem(ZeroDivisionError()) and not is_slide_problem(KeyError("x"))
    assert not is_slide_problem(ValueError("bug in wsi_mil"))
    full = OSError(errno.ENOSPC, "No space left on device")
    assert not is_slide_problem(full) and resource_problem(full) == "no space left on the device"
    assert not is_slide_problem(MemoryError()) and resource_problem(MemoryError()) == "out of memory"
    files = OSError(errno.EMFILE, "Too many open files")
    assert not is_slide_problem(files) and resource_problem(files).startswith("too many open files")
    assert resource_problem(RuntimeError("(sqlite3.OperationalError) database or disk is full")) is not None
    wrapped = RuntimeError("h5py write failed")
    wrapped.__cause__ = full
    assert resource_problem(wrapped) is not None
    text = str(resource_error(full, "/out/x.h5", "finished bags are kept"))
    assert isinstance(resource_error(full, "/o", "k"), ResourceError)
    assert text.startswith("no space left on the device while writing /out/x.h5; finished bags are kept") \
        and "\n" not in text


def test_a_bug_in_a_tiling_worker_task_propagates_with_the_slide_named(slides, local_client, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("injected bug")

    monkeypatch.setattr(tiling, "detect_tissue", broken)
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.good_dir / "good.svs", src / "good.svs")
    out = tmp_path / "out"
    cfg = load_config(None, BASE)
    with pytest.raises(ZeroDivisionError, match="injected bug") as err:
        tiling.tile_cohort(src, out, cfg, client=local_client)
    assert any("slide" in n and "good.svs" in n for n in err.value.__notes__)
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    assert not list(tiles.glob("*.zarr*"))  # nothing half-written left behind, nothing marked as a failed slide


def test_a_corrupt_slide_is_still_a_per_slide_failure_on_the_same_cluster(slides, local_client, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copyfile(slides.good_dir / "good.svs", src / "good.svs")
    shutil.copyfile(slides.truncated, src / slides.truncated.name)
    report = tiling.tile_cohort(src, tmp_path / "out", load_config(None, BASE), client=local_client)
    status = {r.slide_id: r.status for r in report.results}
    assert status == {"good": "done", slides.truncated.stem: "failed"}


def _features_cfg() -> Config:
    cfg = Config()
    cfg.features = FeaturesConfig(encoder="tiny_cnn", weights="random", batch_size=8, device="cpu")
    return cfg


def test_a_bug_in_the_embedding_step_propagates_instead_of_failing_the_slide(tmp_path, monkeypatch):
    cfg = _features_cfg()
    write_patch_stores(tmp_path, cfg, n=2, patches=12, patch_size=32, chunk_patches=4, seed=0)

    def broken(self, patches):
        raise IndexError("injected bug")

    monkeypatch.setattr(extract_device.Embedder, "__call__", broken)
    with pytest.raises(IndexError, match="injected bug") as err:
        extract_cohort(tmp_path, cfg, progress=False)
    assert any("slide s0" in n for n in err.value.__notes__)
