"""`wsi-mil train` and `wsi-mil evaluate`.

With ``compute.scheduler`` (``--scheduler``) each (seed, fold) trains as a task on that Dask cluster
(:mod:`wsi_mil.mil.distributed`). `train` (like `run`) does not train a model again whose MLflow run finished with the same model and
training settings, labels and bags: it finds that run by its ``wsi_mil.workflow_key`` tag and prints
its results; ``--force`` trains anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from wsi_mil.workflows.results import update_results
from wsi_mil.workflows.reuse import model_settings

from wsi_mil.annotations import find_truth
from wsi_mil.config import Config
from wsi_mil.encoders import encoder_key
from wsi_mil.layout import Layout, tiling_key
from wsi_mil.mil.cv import train_cohort
from wsi_mil.mil.data import load_labels, resolve_features_dir
from wsi_mil.mil.distributed import train_on_cluster
from wsi_mil.mil.ensemble import model_uri, register_run_model
from wsi_mil.mil.evaluation import evaluate_run
from wsi_mil.mil.metrics import format_summary
from wsi_mil.tracking import Tracker, experiment_name, open_tracker

log = logging.getLogger(__name__)

WORKFLOW_TAG = "wsi_mil.workflow_key"
PER_FOLD_COLUMNS = ["seed", "fold", "best_epoch", "epochs_run", "val_auc", "test_auc", "test_accuracy",
                    "test_balanced_accuracy", "test_f1"]


def workflow_key(cfg: Config, features_dir: Path) -> str:
    """Reuse key of one model: its own settings (:func:`model_settings`), the labels file's content, its bags.

    Two models of one `wsi-mil run` have independent keys: a setting of one model retrains only that
    model (MHIM's key holds its baseline's run id, so a retrained baseline retrains MHIM too).
    """
    bags = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in Path(features_dir).glob("*.h5"))
    labels = cfg.training.labels_csv
    data = {
        "config": model_settings(cfg.flat()),
        "labels": hashlib.sha256(Path(labels).read_bytes()).hexdigest() if labels and Path(labels).is_file() else None,
        "tiling": tiling_key(cfg),
        "encoder": encoder_key(cfg.features),
        "bags": bags,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_run(tracker: Tracker, cfg: Config, key: str) -> str | None:
    """The id of a finished parent run tagged with ``key``, or None."""
    runs = tracker.find_runs(experiment_name(cfg), f"tags.`{WORKFLOW_TAG}` = '{key}' and attributes.status = 'FINISHED'")
    return runs[0].run_id if runs else None


def _table(per_fold: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in per_fold]
    return per_fold[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def _tiled_slides_dir(out: Path) -> Path | None:
    """The folder of the first slide in ``OUT/slides.csv`` (None without a readable inventory)."""
    try:
        paths = pd.read_csv(Layout(out).slides_csv, usecols=["path"])["path"].dropna()
    except (OSError, ValueError):
        return None
    return Path(str(paths.iloc[0])).parent if len(paths) else None


def with_found_truth(out: Path, cfg: Config) -> Config:
    """``cfg`` with ``training.annotations_dir`` set to a ground-truth folder found as `wsi-mil run` finds it.

    Only when ``training.annotations_dir`` is not set: :func:`wsi_mil.annotations.find_truth` beside
    the tiled slides' folder (from ``OUT/slides.csv``) and beside the labels file (``truth/`` or
    ``annotations/``). What it found, or that it found nothing, is logged.

    Raises
    ------
    WsiMilError
        The labels file is missing or unreadable (as training would raise).
    """
    if cfg.training.annotations_dir is not None or cfg.training.labels_csv is None:
        return cfg
    ids = list(load_labels(cfg.training).slide_ids)
    labels_dir = Path(cfg.training.labels_csv).resolve().parent
    found = with_truth_beside(cfg, _tiled_slides_dir(Path(out)), ids, beside=[labels_dir])
    if found is None:
        log.info("no truth/ or annotations/ folder beside the slides or %s: instance metrics are n/a "
                 "(set training.annotations_dir to use ground truth)", labels_dir)
        return cfg
    return found


def with_truth_beside(cfg: Config, slides_dir: Path | None, ids: list[str], *,
                      beside: Sequence[Path] = ()) -> Config | None:
    """``cfg`` pointing ``training.annotations_dir`` at ground truth found beside the slides, or None.

    :func:`wsi_mil.annotations.find_truth` looks beside (or inside) ``slides_dir`` and in ``beside``;
    what it found is logged. Used by `wsi-mil run` and `wsi-mil train` alike.
    """
    truth = find_truth(slides_dir, ids, beside=beside)
    if truth is None:
        return None
    log.info("ground truth for %d of %d slides found in %s: instance metrics use it (training.annotations_dir)",
             truth[1], len(ids), truth[0])
    return cfg.with_overrides({"training.annotations_dir": str(truth[0].resolve())})


def cli_train(args: argparse.Namespace, cfg: Config) -> int:
    """Cross-validate ``cfg.model.name`` on the bags in OUT; print the test metrics and the MLflow run id.

    Without ``training.annotations_dir`` the ground truth is looked up as `wsi-mil run` does
    (:func:`with_found_truth`).
    """
    out = sys.stdout
    cfg = with_found_truth(args.out, cfg)
    key = workflow_key(cfg, resolve_features_dir(args.out, cfg))
    tracker = open_tracker(args.out, cfg)
    run_id = None if args.force else finished_run(tracker, cfg, key)
    if run_id is not None:
        with tempfile.TemporaryDirectory(prefix="wsi-mil-reuse-") as tmp:
            per_fold = pd.read_csv(tracker.download(run_id, "per_fold.csv", Path(tmp)))
            summary = pd.read_csv(tracker.download(run_id, "summary.csv", Path(tmp))).set_index("metric")
        out.write(f"reusing finished MLflow run {run_id} (same settings, labels and bags; --force trains again)\n")
        if cfg.tracking.register_as:
            version = register_run_model(tracker, run_id, cfg.tracking.register_as)
            out.write(f"registered model: models:/{cfg.tracking.register_as}/{version}\n")
    else:
        if cfg.compute.scheduler:
            result = train_on_cluster(args.out, cfg, force=args.force)
        else:
            result = train_cohort(args.out, cfg)
        tracker.set_tags(result.parent_run_id, {WORKFLOW_TAG: key})
        run_id, per_fold, summary = result.parent_run_id, result.per_fold, result.summary
        if result.model_version is not None:
            out.write(f"registered model: models:/{cfg.tracking.register_as}/{result.model_version}\n")
    out.write(_table(per_fold, PER_FOLD_COLUMNS) + "\n")
    out.write(f"test metrics over {len(per_fold)} fold(s) (mean +- std):\n{format_summary(summary)}\n")
    out.write(f"MLflow parent run: {run_id}\n")
    summary_md = update_results(args.out, tracker, run_id)
    out.write(f"per-slide predictions and summary: {summary_md.parent}\n")
    if tracker.run_model_id(run_id) is not None:
        out.write(f"model: {model_uri(run_id)}\n")
    return 0


def cli_evaluate(args: argparse.Namespace, cfg: Config) -> int:
    """Re-score a run's fold checkpoints on their recorded test folds; print the table."""
    result = evaluate_run(args.run, args.out, cfg)
    out = sys.stdout
    out.write(_table(result.per_fold, ["seed", "fold", "threshold", "test_auc", "logged_test_auc", "test_accuracy",
                                       "test_balanced_accuracy", "test_f1"]) + "\n")
    out.write(f"test metrics (mean +- std):\n{format_summary(result.summary)}\n")
    out.write("matches the metrics logged at training time\n" if result.matches_training
              else "WARNING: differs from the metrics logged at training time\n")
    return 0 if result.matches_training else 1
