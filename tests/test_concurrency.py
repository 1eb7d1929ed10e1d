"""Several wsi-mil commands at once on one output folder: the MLflow store, slide/bag ownership, shared CSVs."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.milcore import write_cohort

from wsi_mil.errors import WsiMilError
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
