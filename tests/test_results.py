"""Results at a glance: OUT/results/ files and `wsi-mil runs`, checked against the MLflow store;
per-model reuse keys (one model's setting retrains only that model)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd
import pytest
from helpers.milcore import write_cohort
from wsi_mil.workflows.cohort import train_models
from wsi_mil.workflows.results import RESULT_COLUMNS, runs_table
from wsi_mil.workflows.reuse import settings_digest
from wsi_mil.workflows.train import workflow_key

from wsi_mil import cli
from wsi_mil.config import Config, load_config
from wsi_mil.layout import Layout
from wsi_mil.tracking import open_tracker


def _train_args(out: Path, bags: Path, labels: Path, model: str, *extra: str) -> list[str]:
    return ["-q", "train", str(out), "--labels", str(labels), "--model", model, "--folds", "2", "--epochs", "2",
            "--set", f"training.features_dir={bags}", "--set", "training.bootstrap=0", "--set", "training.threads=1",
            "--set", "model.hidden_dim=16", "--set", "model.attention_dim=8", "--set", "tracking.experiment=glance",
            *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two models trained with `wsi-mil train` (mean pooling twice: the second run replaces the first's results)."""
    root = tmp_path_factory.mktemp("glance")
    bags, labels = write_cohort(root / "data", n_slides=12, shift=5.0)
    out = root / "out"
    for model, extra in (("mean", ()), ("abmil", ()), ("mean", ("--set", "training.lr=0.002"))):
        assert cli.main(_train_args(out, bags, labels, model, *extra)) == 0
    return out


def test_results_files_hold_each_models_latest_predictions_from_mlflow(trained):
    tracker = open_tracker(trained, load_config())
    runs = tracker.find_runs("glance")  # newest first
    latest = {}
    for run in runs:
        latest.setdefault(run.tags["wsi_mil.model"], run)
    assert sorted(latest) == ["abmil", "mean"] and len(runs) == 3
    layout = Layout(trained)
    for model, run in latest.items():
        table = pd.read_csv(layout.model_predictions_csv(model))
        assert list(table.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
        logged = pd.read_csv(io.StringIO(tracker.read_text(run.run_id, "predictions.csv")))
        assert set(table["run_id"]) == {run.run_id}
        assert len(table) == len(logged) == 12  # every slide once (one seed)
        merged = table.merge(logged, on=["slide_id", "seed", "fold"], suffixes=("", "_logged"))
        assert (merged["probability"] == merged["prob_1_logged"]).all()
        assert (merged["predicted"].astype(str) == merged["pred_name"].astype(str)).all()
        assert (merged["label"].astype(str) == merged["label_name"].astype(str)).all()
        assert (merged["threshold"] == merged["threshold_logged"]).all()
        assert (merged["patient_id"] == merged["patient_id_logged"]).all()
    summary = layout.summary_md.read_text()
    for model, run in latest.items():
        auc = f"{run.metrics['test/auc_mean']:.3f} +- {run.metrics['test/auc_std']:.3f}"
        row = next(line for line in summary.splitlines() if line.startswith(f"| {model} |"))
        assert run.run_id in row and auc in row and f"{model}/predictions.csv" in row
        assert f"none yet: `wsi-mil heatmap --run {run.run_id} --out {trained}`" in row  # `train` draws none
    older = runs[-1].run_id  # the first mean-pooling run: replaced in results/, still listed by `runs`
    assert older not in summary


def test_runs_command_lists_every_trained_model_as_the_store_holds_it(trained, capsys):
    assert cli.main(["runs", str(trained)]) == 0
    printed = capsys.readouterr().out.splitlines()
    header, rows = printed[0], printed[1:]
    for column in ("model", "name", "when (UTC)", "settings", "test AUC", "run_id"):
        assert column in header
    tracker = open_tracker(trained, load_config())
    runs = tracker.find_runs("glance")
    assert len(rows) == len(runs) == 3
    for line, run in zip(rows, runs, strict=True):  # newest first
        auc = f"{run.metrics['test/auc_mean']:.3f} +- {run.metrics['test/auc_std']:.3f}"
        assert line.split()[0] == run.tags["wsi_mil.model"]
        assert line.rstrip().endswith(run.run_id) and auc in line and settings_digest(run.params) in line
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line)
    table = runs_table(tracker)
    mean_runs = table[table["model"] == "mean"]
    assert mean_runs["settings"].nunique() == 2  # training.lr differs
    assert cli.main(["runs", str(trained.parent / "empty")]) == 0
    assert "no trained model" in capsys.readouterr().out
    assert not (trained.parent / "empty").exists()  # listing creates no store


def test_one_models_setting_changes_only_its_own_reuse_key(tmp_path):
    cfg = load_config(None, ["run.models=[abmil,mhim,ins]"])
    (tmp_path / "a.h5").write_bytes(b"1")
    keys = {m: workflow_key(cfg.for_model(m), tmp_path) for m in ("abmil", "mhim", "ins")}
    changed = cfg.with_overrides({"model.ins.lr": 5e-4})
    assert workflow_key(changed.for_model("ins"), tmp_path) != keys["ins"]
    assert workflow_key(changed.for_model("abmil"), tmp_path) == keys["abmil"]
    assert workflow_key(changed.for_model("mhim"), tmp_path) == keys["mhim"]
    mhim = cfg.with_overrides({"model.mhim.cl_alpha": 0.3})
    assert workflow_key(mhim.for_model("mhim"), tmp_path) != keys["mhim"]
    assert workflow_key(mhim.for_model("ins"), tmp_path) == keys["ins"]
    shared = cfg.with_overrides({"training.lr": 1e-3})  # shared training settings retrain every model
    assert all(workflow_key(shared.for_model(m), tmp_path) != keys[m] for m in keys)


def test_run_retrains_only_the_model_whose_setting_changed(tmp_path):
    bags, labels = write_cohort(tmp_path / "data", n_slides=12, shift=5.0)
    out = tmp_path / "out"
    cfg = Config().with_overrides({
        "training.features_dir": str(bags), "training.labels_csv": str(labels), "training.folds": 2,
        "training.epochs": 2, "training.min_epochs": 1, "training.bootstrap": 0, "training.threads": 1,
        "model.hidden_dim": 16, "model.attention_dim": 8, "model.ins.queue_size": 64, "run.models": ["abmil", "ins"],
        "tracking.experiment": "reuse"})
    first = {m.name: m for m in train_models(out, cfg, heatmaps=False)}
    assert not any(m.reused for m in first.values())
    second = {m.name: m for m in train_models(out, cfg.with_overrides({"model.ins.lr": 5e-4}), heatmaps=False)}
    assert second["abmil"].reused and second["abmil"].run_id == first["abmil"].run_id
    assert not second["ins"].reused and second["ins"].run_id != first["ins"].run_id
    assert pd.read_csv(Layout(out).model_predictions_csv("ins"))["run_id"].unique().tolist() == [second["ins"].run_id]


def test_heatmap_folders_are_per_model_and_per_run_so_a_new_run_never_overwrites_old_maps(tmp_path):
    layout = Layout(tmp_path)
    a, b = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
    assert layout.heatmaps_dir(a, "mhim(abmil)") == tmp_path / "heatmaps" / "mhim-abmil" / "01234567"
    assert layout.heatmaps_dir(a, "abmil") != layout.heatmaps_dir(b, "abmil")
    assert layout.model_predictions_csv("mhim(transmil)") == tmp_path / "results" / "mhim-transmil" / "predictions.csv"


def test_run_summary_names_models_as_the_runs_command_does(tmp_path):
    from wsi_mil.workflows.cohort import CohortOutcome, ModelOutcome, summary_markdown

    from wsi_mil.extract import ExtractReport
    from wsi_mil.tiling import TilingReport

    layout = Layout(tmp_path)
    mhim = ModelOutcome("mhim", "run-1", False, {}, label="mhim(abmil)",
                        predictions_csv=layout.model_predictions_csv("mhim(abmil)"),
                        heatmaps_dir=layout.heatmaps_dir("run-1", "mhim(abmil)"))
    outcome = CohortOutcome(TilingReport("t", tmp_path / "tiles"), ExtractReport("t", "e", tmp_path / "f", "cpu"),
                            models=[mhim])
    text = summary_markdown(outcome)
    assert "| mhim(abmil) | run-1 |" in text and "| mhim |" not in text
    assert "- mhim(abmil): `" in text and "mhim-abmil" in str(mhim.predictions_csv)  # folders: the file-safe form
