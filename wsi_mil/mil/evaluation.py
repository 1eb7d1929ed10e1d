"""Scoring trained methods on held-out bags, and re-scoring a finished run (`wsi-mil evaluate`).

The bag-level metrics are those of :mod:`wsi_mil.mil.metrics`; the instance-level (localisation) AUC
compares per-patch scores with annotated tumour (:mod:`wsi_mil.annotations`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from wsi_mil.annotations import load_instance_labels
from wsi_mil.config import Config, TrainingConfig
from wsi_mil.devices import resolve_device
from wsi_mil.errors import WsiMilError
from wsi_mil.mil import metrics as M
from wsi_mil.mil.base import MethodFactory, MILMethod
from wsi_mil.mil.checkpoints import load_fold_method, load_run_splits
from wsi_mil.mil.data import BagList, BagStore, list_bags, resolve_features_dir
from wsi_mil.mil.splits import fold_ids
from wsi_mil.stores import read_bag_attrs
from wsi_mil.tracking import open_tracker

log = logging.getLogger(__name__)


def boot_seed(seed: int, fold: int) -> int:
    """Bootstrap seed of one fold (same at training and at `evaluate` so CIs reproduce)."""
    return seed * 1000 + fold


def score_bags(method: MILMethod, bags: BagList,
               instance_scores: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels [n] and class probabilities [n, C] of ``bags`` under ``method`` (one ``predict`` per bag).

    ``instance_scores``, when given, receives each bag's per-instance scores [N] by slide id.
    """
    probs = []
    for bag in bags:
        pred = method.predict(bag)
        probs.append(np.asarray(pred.probs, dtype=np.float64))
        if instance_scores is not None:
            instance_scores[bag.slide_id] = np.asarray(pred.instance_scores, dtype=np.float64)
    y = np.asarray(bags.labels if isinstance(bags, BagList) else [b.label for b in bags], dtype=int)
    return y, (np.stack(probs) if probs else np.zeros((0, 2)))



def instance_auc_of(method: MILMethod, bags: BagList, tcfg: TrainingConfig,
                    instance_scores: dict[str, np.ndarray] | None = None) -> float:
    """Localisation AUC of the method's per-instance scores on ``bags`` against annotated tumour.

    Patches are positive when their tumour fraction reaches ``training.instance_threshold``; normal
    slides without an annotation file count as all-negative. NaN without ``training.annotations_dir``.
    ``instance_scores`` (filled by :func:`score_bags`) spares predicting the bags a second time.
    """
    if tcfg.annotations_dir is None or not len(bags):
        return float("nan")
    scores, labels = {}, {}
    for bag, y in zip(bags, bags.labels, strict=True):
        size0 = float(read_bag_attrs(bags.store.paths[bag.slide_id]).get("patch_size_level0", 0) or 0)
        if bag.coords is None or size0 <= 0:
            continue
        found = load_instance_labels(Path(tcfg.annotations_dir), bag.slide_id, bag.coords, size0,
                                     tcfg.instance_threshold, normal_slide=y == 0, rules=tcfg.annotations)
        if found is not None:
            scores[bag.slide_id] = instance_scores[bag.slide_id] if instance_scores is not None else \
                np.asarray(method.predict(bag).instance_scores, dtype=np.float64)
            labels[bag.slide_id] = found
    return M.instance_auc(scores, labels)



def prediction_frame(slide_ids: list[str], patients: dict[str, str], y: np.ndarray, probs: np.ndarray,
                     classes: list[str], threshold: float | None, seed: int, fold: int, split: str) -> pd.DataFrame:
    """Per-slide predictions: ids, fold, seed, true label, one ``prob_<class>`` column per class, prediction."""
    pred = M.predict_labels(probs, threshold) if len(y) else np.zeros(0, dtype=int)
    frame = pd.DataFrame({
        "slide_id": slide_ids, "patient_id": [patients[s] for s in slide_ids], "seed": seed, "fold": fold,
        "split": split, "label": y.astype(int), "label_name": [classes[i] for i in y],
    })
    for c, name in enumerate(classes):
        frame[f"prob_{name}"] = probs[:, c] if len(y) else []
    frame["pred"] = pred
    frame["pred_name"] = [classes[i] for i in pred]
    frame["threshold"] = np.nan if threshold is None else threshold
    return frame



@dataclass
class EvalResult:
    """What :func:`evaluate_run` returns."""

    run_id: str
    per_fold: pd.DataFrame  # seed, fold, run_id, test_<metric> (recomputed) and logged_test_<metric>
    summary: pd.DataFrame
    predictions: pd.DataFrame
    matches_training: bool


def evaluate_run(run_id: str, out: Path, cfg: Config, *, method_factory: MethodFactory | None = None,
                 log_to_run: bool = True) -> EvalResult:
    """Re-score each fold's saved checkpoint on its recorded test slides.

    Uses the run's own config, splits and decision thresholds.

    Parameters
    ----------
    run_id : str
        A `wsi-mil train` parent run (or one of its fold runs).
    out : Path
        Output directory of that run.
    cfg : Config
        Supplies only the tracking URI (and ``training.features_dir`` / ``training.device`` when set).
    method_factory : callable, optional
        Builds the untrained methods (default :func:`wsi_mil.mil.methods.build_method`).
    log_to_run : bool
        Log ``evaluate/test_<metric>_mean`` and ``evaluation/per_fold.csv`` / ``summary.csv`` to the run.

    Returns
    -------
    EvalResult
        Recomputed and logged test metrics per fold, their summary, the predictions, and
        ``matches_training``: whether they equal the metrics logged at training time.

    Raises
    ------
    WsiMilError
        When the run, its checkpoints or the bags of its test slides cannot be found.
    """
    out = Path(out)
    tracker = open_tracker(out, cfg, create=False)
    run_id = tracker.parent_of(run_id)
    run = tracker.get_run(run_id)
    run_cfg = tracker.load_config(run_id)
    if cfg.training.features_dir is not None:
        run_cfg = run_cfg.with_overrides({"training.features_dir": str(cfg.training.features_dir)})
    features_dir = Path(run.tags["wsi_mil.features_dir"]) if run_cfg.training.features_dir is None and \
        "wsi_mil.features_dir" in run.tags else resolve_features_dir(out, run_cfg)
    if not features_dir.is_dir():
        features_dir = resolve_features_dir(out, run_cfg)
    splits = load_run_splits(tracker, run_id)
    device = resolve_device(cfg.training.device if cfg.training.device != "auto" else run_cfg.training.device)
    folds = tracker.fold_runs(run_id)
    tests = {(f.seed, f.fold): fold_ids(splits, f.seed, f.fold, "test") for f in folds}
    test_ids = sorted({s for ids in tests.values() for s in ids})
    available = list_bags(features_dir)
    missing = [s for s in test_ids if s not in available]
    if missing:
        raise WsiMilError(f"{features_dir}: bags of {len(missing)} test slide(s) are missing "
                          f"({', '.join(missing[:10])}); re-extract them or set training.features_dir.")
    store = BagStore({s: available[s] for s in test_ids}, cache=False)
    patients = dict(zip(splits["slide_id"], splits["patient_id"], strict=False))
    y_of = dict(zip(splits["slide_id"], splits["y"].astype(int), strict=False))
    rows, frames, matches = [], [], True
    for f in folds:
        loaded = load_fold_method(tracker, f.run_id, device=str(device), factory=method_factory, config=run_cfg)
        ids = tests[(f.seed, f.fold)]
        bags = store.items(ids, [y_of[s] for s in ids], device)
        y, probs = score_bags(loaded.method, bags)
        metrics = M.evaluate(y, probs, loaded.threshold, n_boot=run_cfg.training.bootstrap, seed=boot_seed(f.seed, f.fold),
                             groups=[patients[s] for s in ids])
        logged = tracker.get_run(f.run_id)
        row = {"seed": f.seed, "fold": f.fold, "run_id": f.run_id, "threshold": loaded.threshold}
        for k, v in metrics.items():
            row[f"test_{k}"] = v
            old = logged.metric(f"test/{k}")
            row[f"logged_test_{k}"] = old
            if k in M.METRICS and not (math.isnan(old) and math.isnan(v)) and \
                    not math.isclose(v, old, rel_tol=1e-6, abs_tol=1e-9):
                matches = False
        rows.append(row)
        frames.append(prediction_frame(ids, patients, y, probs, loaded.classes, loaded.threshold,
                                       f.seed, f.fold, "test"))
    per_fold = pd.DataFrame(rows)
    summary = M.summarize([{k: r[f"test_{k}"] for k in M.METRICS} for r in rows])
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if log_to_run:
        tracker.log_metrics(run_id, {f"evaluate/test_{name}_mean": row["mean"] for name, row in summary.iterrows()})
        tracker.log_dataframe(run_id, per_fold, "evaluation/per_fold.csv")
        tracker.log_dataframe(run_id, summary.reset_index(), "evaluation/summary.csv")
    if not matches:
        log.warning("run %s: re-scored test metrics differ from the ones logged at training time", run_id)
    return EvalResult(run_id, per_fold, summary, predictions, matches)
