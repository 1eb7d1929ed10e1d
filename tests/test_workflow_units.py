"""Workflow building blocks that need no cohort: demo settings, weight choice, reuse keys, summary table,
the label and fold check that `wsi-mil run` does on the real slide folder before any tiling."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from wsi_mil.workflows.cohort import check_cohort, markdown_table, model_config
from wsi_mil.workflows.demo import DEMO_SETTINGS, choose_weights, demo_config
from wsi_mil.workflows.train import workflow_key
from wsi_mil.workflows.ui import ui_command

from wsi_mil.cli import main
from wsi_mil.config import load_config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout

REAL_SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-slides"


def test_demo_settings_yield_to_the_users_keys(tmp_path):
    cfg = demo_config(load_config(None, ["training.epochs=3"]), tmp_path)
    assert cfg.training.epochs == 3  # the user's key wins
    assert cfg.training.folds == DEMO_SETTINGS["training.folds"]
    assert cfg.training.annotations_dir == tmp_path


def test_offline_demo_falls_back_to_random_weights_and_says_why():
    assert os.environ.get("WSI_MIL_OFFLINE") == "1"  # set by conftest: nothing may reach the network
    cfg = demo_config(load_config(), Layout("x").root)
    weights, why = choose_weights(cfg, None)
    assert weights == "random"
    assert why.startswith("pretrained weights of encoder") and cfg.features.encoder in why and "--weights PATH" in why
    assert choose_weights(cfg, "/some/file.pt") == ("/some/file.pt", "as requested")


def test_mhim_reuses_the_baseline_trained_in_the_same_run():
    cfg = load_config(None, ["model.mhim.student=abmil"])
    assert model_config(cfg, "mhim", {"abmil": "run123"}).model.mhim.baseline_run == "run123"
    assert model_config(cfg, "mhim", {"transmil": "run9"}).model.mhim.baseline_run is None
    assert model_config(cfg, "ins", {"abmil": "run123"}).model.name == "ins"


def test_workflow_key_tracks_settings_and_bags(tmp_path):
    cfg = load_config()
    (tmp_path / "a.h5").write_bytes(b"12345")
    key = workflow_key(cfg, tmp_path)
    assert key == workflow_key(cfg, tmp_path)
    assert key != workflow_key(cfg.with_overrides({"training.lr": 1e-3}), tmp_path)
    assert key == workflow_key(cfg.with_overrides({"heatmap.alpha": 0.9}), tmp_path)  # does not change results
    (tmp_path / "b.h5").write_bytes(b"1")
    assert key != workflow_key(cfg, tmp_path)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,0\nb,1\n")
    with_labels = cfg.with_overrides({"training.labels_csv": str(labels)})
    key = workflow_key(with_labels, tmp_path)
    labels.write_text("slide_id,label\na,1\nb,0\n")  # same file, other labels
    assert key != workflow_key(with_labels, tmp_path)


# ------------------------------------------------------------------- `wsi-mil run` checks before tiling
def _real_slide_ids() -> list[str]:
    assert REAL_SLIDES.is_dir(), f"the shared real slides are missing: {REAL_SLIDES}"
    from wsi_mil.slides import find_slides, slide_id

    ids = [slide_id(p) for p in find_slides(REAL_SLIDES, load_config().slides)]
    assert len(ids) >= 6, f"expected the real slide files in {REAL_SLIDES}"
    return ids


def _run(tmp_path: Path, rows: list[str], *extra: str) -> tuple[int, Path]:
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    return main(["-q", "run", str(REAL_SLIDES), "--labels", str(labels), "--out", str(out), *extra]), out


def test_run_refuses_label_case_variants_before_tiling(tmp_path, capsys):
    ids = _real_slide_ids()
    rows = [f"{sid},{['tumor', 'Tumor', 'normal'][i % 3]},P{i}" for i, sid in enumerate(ids)]
    code, out = _run(tmp_path, rows)
    err = capsys.readouterr().err
    assert code == 2 and "differ only by case or surrounding spaces" in err
    assert "'tumor' (3)" in err and "'Tumor' (3)" in err and "merge_label_variants" in err
    assert not (out / "tiles").exists() and not (out / "slides.csv").exists()  # nothing was tiled


def test_run_reports_infeasible_folds_before_tiling(tmp_path, capsys):
    ids = _real_slide_ids()
    # every slide labelled, but the normal slides belong to two patients: 5 folds cannot each test one
    rows = [f"{sid},{'normal' if i < 4 else 'tumor'},P{i % 2 if i < 4 else i}" for i, sid in enumerate(ids)]
    code, out = _run(tmp_path, rows, "--set", "training.folds=5")
    err = capsys.readouterr().err
    assert code == 2 and "'normal' has 4 slide(s) on 2 patient(s)" in err and "Lower training.folds to 2" in err
    assert not (out / "tiles").exists() and not (out / "slides.csv").exists()


def test_check_cohort_lists_slides_missing_either_way(tmp_path, caplog):
    ids = _real_slide_ids()
    labels = tmp_path / "labels.csv"
    rows = [f"{sid},{i % 2}" for i, sid in enumerate(ids[2:])] + ["not-in-folder-1,0", "not-in-folder-2,1"]
    labels.write_text("slide_id,label\n" + "\n".join(rows) + "\n")
    cfg = load_config(None, [f"training.labels_csv={labels}", "training.folds=2"])
    with caplog.at_level(logging.WARNING):
        kept = check_cohort(REAL_SLIDES, cfg)
    assert kept.slide_ids == ids[2:]
    assert "2 labelled slide(s) have no slide file (not-in-folder-1, not-in-folder-2)" in caplog.text
    assert f"2 slide file(s) have no label ({ids[0]}, {ids[1]})" in caplog.text
    labels.write_text("slide_id,label\nx.svs,0\ny.svs,1\n")
    with pytest.raises(WsiMilError, match="slide_id must be the slide file's name without extension"):
        check_cohort(REAL_SLIDES, cfg)


def test_markdown_table():
    text = markdown_table(pd.DataFrame([{"model": "abmil", "auc": "0.9 +- 0.1"}]))
    assert text.splitlines() == ["| model | auc |", "|---|---|", "| abmil | 0.9 +- 0.1 |"]


def test_ui_command_serves_the_embedded_store(tmp_path):
    command = ui_command(Layout(tmp_path), 5123)
    assert command[:4] == [sys.executable, "-m", "mlflow", "ui"] and f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in command
    assert command[command.index("--port") + 1] == "5123" and "127.0.0.1" in command


def test_ui_without_a_store_is_a_clear_error(tmp_path, capsys):
    assert main(["ui", str(tmp_path)]) == 2
    assert "run `wsi-mil train` or `wsi-mil run`" in capsys.readouterr().err
