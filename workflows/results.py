"""Results at a glance: ``OUT/results/`` and `wsi-mil runs OUT`.

After `wsi-mil train` and `wsi-mil run`, each trained model's per-slide test predictions are copied
from its MLflow run into ``OUT/results/<model>/predictions.csv`` (one row per slide, fold and seed:
slide, patient, label, fold, seed, probability, predicted class, threshold, run id), and
``OUT/results/summary.md`` lists the latest run of each model. `wsi-mil runs OUT` lists every
trained model of the store (name, when, settings digest, mean +- std test AUC, run id). Everything
is read from the MLflow store, which stays the source of truth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import math
import os
import sys
from pathlib import Path

import pandas as pd
from wsi_mil.workflows.reuse import settings_digest

from wsi_mil.config import Config
from wsi_mil.layout import Layout
from wsi_mil.stores import write_text_atomic
from wsi_mil.tracking import RunRecord, Tracker, default_uri, open_tracker

MODEL_TAG = "wsi_mil.model"
RESULT_COLUMNS = ["slide_id", "patient_id", "label", "fold", "seed", "probability", "predicted", "threshold", "run_id"]
RUNS_COLUMNS = ["model", "name", "when (UTC)", "status", "settings", "test AUC", "run_id"]


def model_label(run: RunRecord) -> str:
    """The model a `wsi-mil train` parent run trained (``abmil``, ``mhim(abmil)``...)."""
    return run.tags.get(MODEL_TAG) or run.params.get("model.name", "model")


def results_frame(predictions: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """A run's test predictions as the per-slide results table.

    Parameters
    ----------
    predictions : pd.DataFrame
        The run's ``predictions.csv`` artifact: ``slide_id, patient_id, seed, fold, label_name``,
        ``prob_<class>`` per class, ``pred_name``, ``threshold``.
    run_id : str
        The MLflow parent run.

    Returns
    -------
    pd.DataFrame
        :data:`RESULT_COLUMNS` then every ``prob_<class>``: ``label`` and ``predicted`` are class
        names; ``probability`` is that of the second class for two classes (the class the threshold
        decides on), else that of the predicted class.
    """
    probs = [c for c in predictions.columns if c.startswith("prob_")]
    frame = pd.DataFrame({
        "slide_id": predictions["slide_id"], "patient_id": predictions["patient_id"],
        "label": predictions["label_name"], "fold": predictions["fold"], "seed": predictions["seed"],
    })
    if len(probs) == 2:
        frame["probability"] = predictions[probs[1]]
    else:
        frame["probability"] = [predictions.at[i, f"prob_{c}"] for i, c in zip(predictions.index,
                                                                                 predictions["pred_name"], strict=True)]
    frame["predicted"] = predictions["pred_name"]
    frame["threshold"] = predictions["threshold"]
    frame["run_id"] = run_id
    for c in probs:
        frame[c] = predictions[c]
    return frame.sort_values(["seed", "fold", "slide_id"]).reset_index(drop=True)


def write_model_results(out: Path, tracker: Tracker, run_id: str) -> Path:
    """Write ``OUT/results/<model>/predictions.csv`` from the predictions logged on ``run_id``; returns its path."""
    run = tracker.get_run(run_id)
    predictions = pd.read_csv(io.StringIO(tracker.read_text(run_id, "predictions.csv")))
    path = Layout(out).model_predictions_csv(model_label(run))
    write_text_atomic(path, results_frame(predictions, run_id).to_csv(index=False))
    return path


def _when(run: RunRecord) -> str:
    if run.start_time is None:
        return ""
    return dt.datetime.fromtimestamp(run.start_time / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def mean_std(mean: float, std: float) -> str:
    """A metric's mean +- std over folds and seeds as shown in tables ("n/a" when undefined)."""
    return "n/a" if math.isnan(mean) else f"{mean:.3f} +- {std:.3f}"


def _mean_std(run: RunRecord, metric: str) -> str:
    return mean_std(run.metric(f"test/{metric}_mean"), run.metric(f"test/{metric}_std"))


def runs_table(tracker: Tracker, experiment: str | None = None) -> pd.DataFrame:
    """Every `wsi-mil train` parent run of the store (or of one experiment), newest first.

    Returns
    -------
    pd.DataFrame
        :data:`RUNS_COLUMNS`: the model, the run's name, its start (UTC, to the minute), status, the
        digest of the model's settings (:func:`wsi_mil.workflows.reuse.settings_digest`: runs with the
        same digest trained with the same model and training settings), the test AUC mean +- std over
        folds and seeds, and the run id.
    """
    rows = []
    for run in tracker.find_runs(experiment):
        rows.append({"model": model_label(run), "name": run.name, "when (UTC)": _when(run), "status": run.status,
                     "settings": settings_digest(run.params), "test AUC": _mean_std(run, "auc"), "run_id": run.run_id})
    return pd.DataFrame(rows, columns=RUNS_COLUMNS)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _heatmaps_cell(layout: Layout, run_id: str, label: str) -> str:
    """The run's heatmap folder relative to ``OUT/results``, or the command that draws it when it holds none."""
    folder = layout.heatmaps_dir(run_id, label)
    if folder.is_dir() and any(folder.glob("*.png")):
        return os.path.relpath(folder, layout.results_dir) + "/"
    return f"none yet: `wsi-mil heatmap --run {run_id} --out {layout.root}`"


def results_summary(out: Path, tracker: Tracker) -> str:
    """Markdown: the run behind each ``OUT/results/<model>/predictions.csv``, with its test metrics and files."""
    layout = Layout(out)
    rows = []
    for path in sorted(layout.results_dir.glob("*/predictions.csv")):
        ids = pd.read_csv(path, usecols=["run_id"])["run_id"].unique()
        if len(ids) != 1:
            continue
        run = tracker.get_run(str(ids[0]))
        label = model_label(run)
        rows.append({"model": label, "when (UTC)": _when(run), "test AUC": _mean_std(run, "auc"),
                     "balanced accuracy": _mean_std(run, "balanced_accuracy"), "F1": _mean_std(run, "f1"),
                     "instance AUC": _mean_std(run, "instance_auc"),
                     "predictions": f"{path.parent.name}/{path.name}",
                     "heatmaps": _heatmaps_cell(layout, run.run_id, label),
                     "run_id": run.run_id})
    lines = ["# Results", "", "The latest run of each model: test-fold metrics, mean +- std over folds and seeds;",
             "per-slide predictions (every slide scored once per seed by the fold model that held it out);",
             "heatmaps. `wsi-mil runs OUT` lists every run.", ""]
    lines.append(markdown_table(pd.DataFrame(rows)) if rows else "(no trained model yet)")
    return "\n".join(lines) + "\n"


def update_results(out: Path, tracker: Tracker, run_id: str, *, head: str | None = None) -> Path:
    """Write the model's predictions of ``run_id`` and ``OUT/results/summary.md``; returns the summary's path.

    ``head`` (Markdown, e.g. what each stage of `wsi-mil run` did) goes above the table.
    """
    write_model_results(out, tracker, run_id)
    text = results_summary(out, tracker)
    if head:
        text = head.rstrip("\n") + "\n\n" + text
    path = Layout(out).summary_md
    write_text_atomic(path, text)
    return path


def cli_runs(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil runs OUT`: the trained models of OUT's MLflow store as a table."""
    layout = Layout(args.out)
    if default_uri(args.out, cfg) == layout.tracking_uri and not layout.mlflow_db.is_file():
        sys.stdout.write(f"no trained model: {args.out} holds no MLflow store (mlflow.db); train with `wsi-mil run` "
                         "or `wsi-mil train`, or give --tracking-uri\n")
        return 0
    tracker = open_tracker(args.out, cfg)
    table = runs_table(tracker, getattr(args, "experiment", None))
    if table.empty:
        sys.stdout.write(f"no trained model in {tracker.shown_uri}\n")
        return 0
    sys.stdout.write(table.to_string(index=False) + "\n")
    return 0
