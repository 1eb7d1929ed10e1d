"""`wsi-mil train` and `wsi-mil evaluate`."""

from __future__ import annotations

import argparse
import logging
import sys

import pandas as pd

from wsi_mil.config import Config
from wsi_mil.mil.cv import train_cohort
from wsi_mil.mil.evaluation import evaluate_run
from wsi_mil.mil.metrics import format_summary

log = logging.getLogger(__name__)


def _table(per_fold: pd.DataFrame, columns: list[str]) -> str:
    cols = [c for c in columns if c in per_fold]
    return per_fold[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}")


def cli_train(args: argparse.Namespace, cfg: Config) -> int:
    """Cross-validate ``cfg.model.name`` on the bags in OUT; print the test metrics and the MLflow run id."""
    result = train_cohort(args.out, cfg)
    out = sys.stdout
    out.write(_table(result.per_fold, ["seed", "fold", "best_epoch", "epochs_run", "val_auc", "test_auc",
                                       "test_accuracy", "test_balanced_accuracy", "test_f1"]) + "\n")
    out.write(f"test metrics over {len(result.folds)} fold(s) (mean +- std):\n{format_summary(result.summary)}\n")
    out.write(f"MLflow parent run: {result.parent_run_id}\n")
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
