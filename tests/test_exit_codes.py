"""Exit codes and leftovers that scripts rely on (README, "Exit codes")."""

from __future__ import annotations

import csv
import errno
import os
import socket

import pytest

import wsi_mil.cli as cli
from wsi_mil.config import Config
from wsi_mil.layout import Layout
from wsi_mil.slides import scan_folder
from wsi_mil.synth import generate_cohort
from wsi_mil.tiling import tile_cohort
from wsi_mil.tracking import open_tracker


def test_ui_on_a_busy_port_says_so_and_exits_2(tmp_path, capsys):
    open_tracker(tmp_path, Config())  # a store to serve
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["ui", str(tmp_path), "--port", str(port)]) == cli.EXIT_INPUT
    captured = capsys.readouterr()
    assert f"127.0.0.1:{port}: the port is in use" in captured.err and "--port" in captured.err
    assert "MLflow UI on" not in captured.out  # no URL printed for a server that never starts


@pytest.mark.parametrize("command", [["evaluate", "--run", "0" * 32], ["heatmap", "--run", "0" * 32],
                                     ["predict", "slides", "--run", "0" * 32]])
def test_reading_commands_without_out_make_no_store_in_the_current_folder(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "slides").mkdir()
    assert cli.main(command) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and "--out OUT" in err
    assert not list(tmp_path.glob("mlflow.db*")) and not (tmp_path / "mlartifacts").exists()


def test_a_dangling_slide_link_is_a_failed_row_with_the_reason(tmp_path):
    src = tmp_path / "slides"
    src.mkdir()
    (src / "gone.svs").symlink_to(tmp_path / "moved-away.svs")
    (src / "notes.txt").symlink_to(tmp_path / "nowhere.txt")
    entries = {e.path.name: e for e in scan_folder(src, Config().slides).entries}
    assert entries["gone.svs"].status == "failed" and entries["notes.txt"].status == "skipped"
    assert "symbolic link to" in entries["gone.svs"].reason and "moved-away.svs" in entries["gone.svs"].reason
    out = tmp_path / "out"
    report = tile_cohort(src, out, Config())
    assert [r.status for r in report.results if r.slide_id == "gone"] == ["failed"]
    with open(Layout(out).slides_csv, newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert rows["gone"]["status"] == "failed" and "does not exist; fix or remove the link" in rows["gone"]["reason"]


def test_a_bug_exits_70_with_a_traceback_and_a_full_disk_exits_3_in_one_line(monkeypatch, capsys):
    def bug(args, cfg):
        raise ZeroDivisionError("injected bug")

    monkeypatch.setitem(cli.COMMANDS, "config", (*cli.COMMANDS["config"][:2], bug))
    assert cli.main(["config", "show"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "injected bug" in err and "this is a bug in wsi-mil" in err

    def full(args, cfg):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/mlflow.db")

    monkeypatch.setitem(cli.COMMANDS, "config", (*cli.COMMANDS["config"][:2], full))
    assert cli.main(["config", "show"]) == cli.EXIT_RESOURCE
    err = capsys.readouterr().err.strip()
    assert err.startswith("wsi-mil config: error: no space left on the device") and "\n" not in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_run_exits_1_when_a_slide_failed(tmp_path, capsys):
    cohort = generate_cohort(tmp_path / "cohort", n_slides=6, seed=3, size=2048, tumour="large")
    (cohort.slides_dir / "broken.svs").write_bytes(b"not a slide")
    out = tmp_path / "out"
    settings = {"features.encoder": "tiny_cnn", "features.weights": "random", "features.num_workers": 0,
                "training.folds": 2, "training.epochs": 2, "training.min_epochs": 1, "training.bootstrap": 0,
                "run.models": "[mean]", "tiling.target_mpp": 1.0, "tiling.patch_size": 64, "heatmap.top_k": 2}
    args = ["-q", "run", str(cohort.slides_dir), "--labels", str(cohort.labels_csv), "--out", str(out)]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert cli.main(args) == cli.EXIT_SLIDES_FAILED
    assert "1 slide(s) failed" in capsys.readouterr().err
    assert Layout(out).summary_md.is_file()  # the rest of the cohort went through
