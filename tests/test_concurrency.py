"""Several wsi-mil commands at once on one output folder: the MLflow store, slide/bag ownership, shared CSVs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.milcore import write_cohort
from helpers.patches import EXTRACT_FLAGS, write_patch_stores
from helpers.tiler import build_tiler_slides

from wsi_mil.config import Config, FeaturesConfig, load_config
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.locks import CLAIMS_DIR, Claims, claim_path, owner_alive
from wsi_mil.stores import merge_csv_rows, open_patch_store, read_bag
from wsi_mil.tracking import Tracker

BIN = Path(sys.executable).parent


def _train_cmd(out: Path, bags: Path, labels: Path) -> list[str]:
    return [str(BIN / "wsi-mil"), "-q", "train", str(out), "--labels", str(labels), "--model", "mean", "--folds", "2",
            "--epochs", "2", "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0",
            "--set", "model.hidden_dim=8", "--set", "training.threads=1"]


# ------------------------------------------------------------------------------------------ MLflow store
def test_three_trains_started_together_on_a_fresh_out_all_finish_and_the_store_opens(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=8, dim=8, n_max=24)
    out = tmp_path / "out"
    procs = [subprocess.Popen([*_train_cmd(out, bags, labels), "--force"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    done = [(*p.communicate(timeout=600), p.returncode) for p in procs]
    for _, stderr, code in done:
        assert code == 0, stderr[-3000:]
        assert "Traceback" not in stderr
    run_ids = {re.search(r"MLflow parent run: ([0-9a-f]{32})", stdout).group(1) for stdout, _, _ in done}
    assert len(run_ids) == 3
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    assert all(tracker.get_run(r).status == "FINISHED" for r in run_ids)


def test_a_half_created_store_without_runs_is_set_aside_and_made_again(tmp_path):
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:  # what an interrupted schema set-up leaves: some tables, no version row
        con.execute("CREATE TABLE runs (run_uuid VARCHAR(32) PRIMARY KEY)")
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32))")
    tracker = Tracker(f"sqlite:///{db}")
    run = tracker.start_run(tracker.experiment("after"), "r")
    assert tracker.get_run(run).status == "RUNNING"
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1


def test_a_damaged_store_with_content_says_how_to_fix_it_in_one_sentence(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(WsiMilError) as err:
        Tracker(f"sqlite:///{db}")
    text = str(err.value)
    assert str(db) in text and "move it aside" in text and "\n" not in text
    assert db.read_bytes().startswith(b"this is not")  # left for the user to inspect


# ------------------------------------------------------------------------------------------ tile / extract
TILE_SETTINGS = ["tiling.target_mpp=1.0", "tiling.patch_size=64", "tiling.chunk_patches=8"]


@pytest.fixture(scope="module")
def six_slides(tmp_path_factory) -> Path:
    """Six real slide files (copies of the synthetic SVS/TIFF slides under other names)."""
    good = build_tiler_slides(tmp_path_factory.getbasetemp() / "tiler_slides").good_dir
    folder = tmp_path_factory.mktemp("six")
    for i in range(2):
        for src in sorted(good.iterdir()):
            shutil.copyfile(src, folder / f"{src.stem}{i}{src.suffix}")
    return folder


def _tile_cmd(src: Path, out: Path) -> list[str]:
    cmd = [str(BIN / "wsi-mil"), "-q", "tile", str(src), "--out", str(out), "--workers", "1"]
    for item in TILE_SETTINGS:
        cmd += ["--set", item]
    return cmd


def _stores(out: Path, cfg: Config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    return {p.stem: (open_patch_store(p).coords, np.asarray(open_patch_store(p).patches[:]))
            for p in sorted(tiles.glob("*.zarr"))}


def _assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def single_tile_run(six_slides, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run(_tile_cmd(six_slides, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _slides_csv(out: Path) -> dict[str, str]:
    with open(Layout(out).slides_csv, newline="") as fh:
        return {r["slide_id"]: r["status"] for r in csv.DictReader(fh)}


def _no_leftovers(folder: Path) -> None:
    """No partial output, no claim left in an output folder."""
    names = [p.name for p in folder.iterdir()]
    assert not [n for n in names if ".partial-" in n or ".old-" in n or n == CLAIMS_DIR], names


def _run_two(cmd: list[str], counted: str) -> int:
    """Run ``cmd`` twice at once; both must exit 0; the sum of the counts their output reports (``counted``)."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    total = 0
    for proc in procs:
        text, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        total += int(re.search(counted, text).group(1))
    return total


def test_two_tiles_on_one_out_both_exit_0_and_every_store_equals_a_single_run(six_slides, single_tile_run,
                                                                              tmp_path):
    out = tmp_path / "out"
    assert _run_two(_tile_cmd(six_slides, out), r"(\d+) tiled") == 6  # the work was divided: no slide tiled twice
    cfg = load_config(None, TILE_SETTINGS)
    _assert_same(_stores(out, cfg), _stores(single_tile_run, cfg))
    assert set(_slides_csv(out).values()) <= {"done", "reused"} and len(_slides_csv(out)) == 6
    _no_leftovers(Layout(out).tiles_dir(tiling_key(cfg)))


def test_a_killed_tile_leaves_its_slides_to_the_other_which_finishes_them(six_slides, single_tile_run, tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, TILE_SETTINGS)
    tiles = Layout(out).tiles_dir(tiling_key(cfg))
    first = subprocess.Popen(_tile_cmd(six_slides, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if tiles.is_dir() and any(".partial-" in p.name for p in tiles.iterdir()):
            break
        time.sleep(0.01)
    assert first.poll() is None, f"the first tile ended before it could be killed: {first.stderr.read().decode()}"
    second = subprocess.Popen(_tile_cmd(six_slides, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    _assert_same(_stores(out, cfg), _stores(single_tile_run, cfg))
    _no_leftovers(tiles)


def _extracted_once_and_a_shared_out(tmp_path: Path) -> tuple[Config, Path, Path, list[str]]:
    """Patch stores in ``single`` (embedded once, alone) and in ``out`` (for concurrent extracts); the command."""
    cfg = Config()
    cfg.features = FeaturesConfig(encoder="tiny_cnn", weights="random", device="cpu", batch_size=16)
    single, out = tmp_path / "single", tmp_path / "out"
    for folder in (single, out):
        write_patch_stores(folder, cfg, n=6, patches=160, patch_size=96, chunk_patches=16, seed=1)
    cmd = [str(BIN / "wsi-mil"), "-q", "extract"]
    done = subprocess.run([*cmd, str(single), *EXTRACT_FLAGS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, single, out, cmd


def test_two_extracts_on_one_out_both_exit_0_and_every_bag_equals_a_single_run(tmp_path):
    cfg, single, out, cmd = _extracted_once_and_a_shared_out(tmp_path)
    assert _run_two([*cmd, str(out), *EXTRACT_FLAGS], r"(\d+) done") == 6  # the work was divided: no bag embedded twice
    features = Layout(out).features_dir(tiling_key(cfg), encoder_key(cfg.features))
    reference = Layout(single).features_dir(tiling_key(cfg), encoder_key(cfg.features))
    assert sorted(p.name for p in features.glob("*.h5")) == [f"s{i}.h5" for i in range(6)]
    for bag in features.glob("*.h5"):
        np.testing.assert_array_equal(read_bag(bag).features, read_bag(reference / bag.name).features)
    with open(Layout(out).extract_status(tiling_key(cfg), encoder_key(cfg.features)), newline="") as fh:
        status = {r["slide_id"]: r["status"] for r in csv.DictReader(fh)}
    assert len(status) == 6 and set(status.values()) <= {"done", "reused"}
    _no_leftovers(features)


def test_a_killed_extract_leaves_its_bags_to_the_other_which_finishes_them(tmp_path):
    cfg, single, out, cmd = _extracted_once_and_a_shared_out(tmp_path)
    features = Layout(out).features_dir(tiling_key(cfg), encoder_key(cfg.features))
    first = subprocess.Popen([*cmd, str(out), *EXTRACT_FLAGS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if (features / CLAIMS_DIR).is_dir() and any((features / CLAIMS_DIR).iterdir()):
            break
        time.sleep(0.01)
    assert first.poll() is None, f"the first extract ended before it could be killed: {first.stderr.read().decode()}"
    second = subprocess.Popen([*cmd, str(out), *EXTRACT_FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    time.sleep(0.5)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    reference = Layout(single).features_dir(tiling_key(cfg), encoder_key(cfg.features))
    assert sorted(p.name for p in features.glob("*.h5")) == [f"s{i}.h5" for i in range(6)]
    for bag in features.glob("*.h5"):
        np.testing.assert_array_equal(read_bag(bag).features, read_bag(reference / bag.name).features)
    _no_leftovers(features)


def test_a_claim_of_a_dead_process_is_taken_over_and_a_live_one_is_not(tmp_path):
    output = tmp_path / "s.zarr"
    locks = tmp_path / ".locks"
    with Claims(locks) as mine:
        assert mine.claim(output) is None and owner_alive(claim_path(output))
        with Claims(locks) as other:  # the same process, other token: a live owner
            assert other.claim(output) is not None and not other.holds(output)
    assert not claim_path(output).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim_path(output).parent.mkdir(exist_ok=True)
    claim_path(output).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 1.0,
                                              "token": "x"}))
    assert not owner_alive(claim_path(output))
    with Claims(locks) as taker:
        assert taker.claim(output) is None and taker.holds(output)
    other_host = {"host": "elsewhere.example", "pid": 1, "started": 1.0, "token": "y"}
    claim_path(output).parent.mkdir(exist_ok=True)
    claim_path(output).write_text(json.dumps(other_host))
    assert owner_alive(claim_path(output), timeout_s=60)
    old = time.time() - 120
    os.utime(claim_path(output), (old, old))
    assert not owner_alive(claim_path(output), timeout_s=60)  # its heartbeat stopped: gone
    with Claims(locks, timeout_s=60) as sweeper:  # a claim left by an owner killed after finishing its output
        assert sweeper.sweep(tmp_path) == 1
    assert not claim_path(output).parent.exists()


def test_slides_csv_is_merged_not_overwritten(tmp_path):
    path = tmp_path / "slides.csv"
    kept, gone = tmp_path / "a.svs", tmp_path / "gone.svs"
    kept.write_bytes(b"x")
    cols = ["slide_id", "path", "status"]
    merge_csv_rows(path, cols, [{"slide_id": "a", "path": kept, "status": "done"},
                                {"slide_id": "g", "path": gone, "status": "failed"}], lock_dir=tmp_path / ".locks")
    keep = lambda row: Path(row["path"]).exists()  # noqa: E731
    merge_csv_rows(path, cols, [{"slide_id": "b", "path": kept, "status": "pending"}], keep=keep,
                   lock_dir=tmp_path / ".locks")
    merge_csv_rows(path, cols, [{"slide_id": "a", "path": kept, "status": "pending"}], keep=keep,
                   lock_dir=tmp_path / ".locks")
    with open(path, newline="") as fh:
        rows = {r["slide_id"]: r["status"] for r in csv.DictReader(fh)}
    assert rows == {"a": "done", "b": "pending"}  # a pending row never hides a finished one


def test_slides_csv_rows_are_one_per_slide_id_and_file(tmp_path):
    """Two ids of one file (links to it) and one id of two files (DICOM instances) each keep their row."""
    path = tmp_path / "slides.csv"
    cols = ["slide_id", "path", "status"]
    rows = [{"slide_id": "link1", "path": "/d/real.svs", "status": "done"},
            {"slide_id": "link2", "path": "/d/real.svs", "status": "failed"},
            {"slide_id": "boxes", "path": "/d/boxes_0.dcm", "status": "done"},
            {"slide_id": "boxes", "path": "/d/boxes_1.dcm", "status": "skipped"}]
    merge_csv_rows(path, cols, rows, key=("slide_id", "path"), lock_dir=tmp_path / ".locks")
    merge_csv_rows(path, cols, rows[:1], key=("slide_id", "path"), lock_dir=tmp_path / ".locks")
    with open(path, newline="") as fh:
        found = sorted((r["slide_id"], r["path"], r["status"]) for r in csv.DictReader(fh))
    assert found == sorted((r["slide_id"], r["path"], r["status"]) for r in rows)


# ------------------------------------------------------------------------------------------ killed train
def _finished_folds_in(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                               "t.key = 'wsi_mil.role' AND t.value = 'fold' AND r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_killed_train_is_marked_killed_and_resumes_at_its_first_unfinished_fold(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, dim=8, n_max=24)
    out = tmp_path / "out"
    cmd = [*_train_cmd(out, bags, labels), "--folds", "3", "--epochs", "40", "--set", "training.min_epochs=40"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None and _finished_folds_in(out / "mlflow.db") < 1:
        time.sleep(0.05)
    assert first.poll() is None, f"the training ended before it could be killed: {first.stderr.read().decode()}"
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    tracker = Tracker(f"sqlite:///{out / 'mlflow.db'}")
    (parent,) = tracker.find_runs(role="cv")
    assert parent.status == "RUNNING"  # what a kill leaves behind
    before = {r.run_id: r.status for r in tracker.child_runs(parent.run_id)}
    kept = [rid for rid, status in before.items() if status == "FINISHED"]
    assert len(kept) >= 1
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"MLflow parent run: {parent.run_id}" in again.stdout  # the same training, resumed
    assert tracker.get_run(parent.run_id).status == "FINISHED"
    after = {r.run_id: r.status for r in tracker.child_runs(parent.run_id)}
    for rid, status in before.items():  # finished folds kept as they were, killed ones marked so
        assert after[rid] == ("FINISHED" if status == "FINISHED" else "KILLED")
    assert sorted(after.values()).count("FINISHED") == 3
    assert "RUNNING" not in {r.status for r in tracker.find_runs(role=None)}
    assert {f.run_id for f in tracker.fold_runs(parent.run_id)} >= set(kept)
