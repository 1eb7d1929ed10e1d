"""Workflow building blocks that need no cohort: demo settings, weight choice, reuse keys, summary table."""

from __future__ import annotations

import os

import pandas as pd
from wsi_mil.workflows.cohort import markdown_table, model_config, workflow_key
from wsi_mil.workflows.demo import DEMO_SETTINGS, choose_weights, demo_config
from wsi_mil.workflows.ui import ui_command

from wsi_mil.config import load_config
from wsi_mil.layout import Layout


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
    assert "pretrained weights unavailable" in why and cfg.features.encoder in why
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


def test_markdown_table():
    text = markdown_table(pd.DataFrame([{"model": "abmil", "auc": "0.9 +- 0.1"}]))
    assert text.splitlines() == ["| model | auc |", "|---|---|", "| abmil | 0.9 +- 0.1 |"]


def test_ui_command_serves_the_embedded_store(tmp_path):
    command = ui_command(Layout(tmp_path), 5123)
    assert command[1] == "ui" and f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in command
    assert command[command.index("--port") + 1] == "5123" and "127.0.0.1" in command


def test_ui_without_a_store_is_a_clear_error(tmp_path, capsys):
    from wsi_mil.cli import main

    assert main(["ui", str(tmp_path)]) == 2
    assert "run `wsi-mil train` or `wsi-mil run`" in capsys.readouterr().err
