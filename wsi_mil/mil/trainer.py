"""Cross-validated training and evaluation of MIL methods, tracked in MLflow.

Per (seed, fold): the method trains on the fold's training bags; after every epoch it scores the
validation bags, and the checkpoint with the best validation AUC (ties: lower validation loss) is
kept. Training stops after ``training.patience`` epochs without a validation-AUC gain (never before
``training.min_epochs``). The binary decision threshold is chosen on the validation predictions of
that checkpoint. Only then are the test bags scored, once.

``FoldContext.extras`` handed to methods:
- ``config``: the whole :class:`~wsi_mil.config.Config`;
- ``bag_paths``: ``{slide_id: Path}`` of the fold's training and validation bags;
- ``train_baseline(model_name) -> MILModel``: trains a plain :class:`BagMethod` of that aggregator
  on the same fold with the same settings and early stopping, returns its best model (in eval mode).
  Its curves are logged into the fold run as ``baseline_*`` metrics and its checkpoint as the
  artifact ``baseline/checkpoint.pt``;
- ``load_baseline(fold, seed) -> MILModel`` (only with ``model.mhim.baseline_run``): the best model of
  that earlier run's matching fold (its ``checkpoint.pt`` when it was a plain run, otherwise its
  ``baseline/checkpoint.pt``); refused if that run's split of this fold differs;
- ``log_metrics(metrics, step)``: log extra metrics into the fold run.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from wsi_mil.config import Config, TrainingConfig, dump_config
from wsi_mil.devices import resolve_device
from wsi_mil.errors import WsiMilError
from wsi_mil.mil import metrics as M
from wsi_mil.mil.base import FoldContext, MILMethod, MILModel
from wsi_mil.mil.data import (
    BagList,
    BagStore,
    LabelTable,
    data_fingerprint,
    load_labels,
    match_bags,
    resolve_features_dir,
)
from wsi_mil.mil.methods import (
    BagMethod,
    build_method,
    build_model,
    method_label,
    seed_everything,
)
from wsi_mil.mil.splits import fold_ids, make_splits, split_counts

log = logging.getLogger(__name__)

MethodFactory = Callable[[Config, FoldContext], MILMethod]
CHECKPOINT_FORMAT = "wsi-mil-checkpoint"


# ----------------------------------------------------------------------------------------- scoring
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
    from wsi_mil.annotations import instance_auc, load_instance_labels
    from wsi_mil.stores import read_bag_attrs

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
    return instance_auc(scores, labels)


def copy_state(state: Any) -> Any:
    """A detached CPU deep copy of a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        items = [(k, copy_state(v)) for k, v in state.items()]
        try:
            return type(state)(items)
        except TypeError:
            return dict(items)
    if isinstance(state, (list, tuple)):
        return type(state)(copy_state(v) for v in state)
    return copy.deepcopy(state)


@dataclass
class FitResult:
    """Outcome of :func:`fit` (the method holds the best checkpoint afterwards)."""

    best_epoch: int
    epochs_run: int
    best_val_auc: float
    best_val_loss: float
    stopped_early: bool
    history: dict[str, list[float]] = field(default_factory=dict)


def fit(method: MILMethod, ctx: FoldContext, tcfg: TrainingConfig, *,
        log_epoch: Callable[[dict[str, float], int], None] | None = None, desc: str = "",
        progress: bool = True) -> FitResult:
    """Train with early stopping on validation AUC; load the best checkpoint into ``method``."""
    epochs = tcfg.epochs
    val = ctx.val
    val_labels = set(val.labels if isinstance(val, BagList) else [b.label for b in val])
    monitor_auc = len(val_labels) >= 2
    if len(val) == 0:
        log.warning("%s: no validation bags; training all %d epochs without early stopping", desc, epochs)
    elif not monitor_auc:
        log.warning("%s: validation bags hold a single class; early stopping on validation loss", desc)
    history: dict[str, list[float]] = {}
    best: tuple[float, float] = (-math.inf, math.inf)  # (val AUC or -loss, val loss)
    best_epoch, best_state, since, epoch = -1, None, 0, -1
    bar = tqdm(range(epochs), desc=desc or "train", unit="ep", leave=False,
               disable=None if progress else True)
    stopped = False
    for epoch in bar:
        reported = method.train_epoch(epoch, epochs) or {}
        row = {(k if k.startswith(("train_", "val_")) else f"train_{k}"): float(v) for k, v in reported.items()}
        if len(val):
            y, probs = score_bags(method, val)
            val_loss = M.nll(y, probs)
            val_auc = M.compute_metrics(y, probs)["auc"] if monitor_auc else float("nan")
            row.update(val_auc=val_auc, val_loss=val_loss)
            score = val_auc if monitor_auc else -val_loss
        else:
            val_loss, score = float("nan"), float(epoch)
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if log_epoch is not None:
            log_epoch(row, epoch)
        gained = score > best[0] + (tcfg.min_delta if monitor_auc else 0.0)
        tie_better = score == best[0] and (val_loss < best[1])
        if gained or tie_better or best_state is None:
            best = (score, val_loss if not math.isnan(val_loss) else math.inf)
            best_epoch, best_state = epoch, copy_state(method.state_dict())
        since = 0 if gained else since + 1
        bar.set_postfix(loss=f"{row.get('train_loss', float('nan')):.3f}", val_auc=f"{row.get('val_auc', float('nan')):.3f}",
                        refresh=False)
        if len(val) and epoch + 1 >= tcfg.min_epochs and since >= tcfg.patience:
            stopped = epoch + 1 < epochs
            break
    bar.close()
    if best_state is not None:
        method.load_state_dict(best_state)
    best_auc = history.get("val_auc", [float("nan")] * (best_epoch + 1))[best_epoch] if best_epoch >= 0 else float("nan")
    return FitResult(best_epoch, epoch + 1, float(best_auc), float(best[1]), stopped, history)


# ------------------------------------------------------------------------------------- checkpoints
def make_checkpoint(method: MILMethod, cfg: Config, ctx: FoldContext, classes: list[str], *,
                    threshold: float | None, best_epoch: int, model_name: str | None = None,
                    method_name: str | None = None) -> dict[str, Any]:
    """The dict saved as ``checkpoint.pt`` (tensors and plain values only: loadable with weights_only)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "method": method_name or cfg.model.name,
        "model_name": model_name or method_label(cfg),
        "in_dim": int(ctx.in_dim),
        "n_classes": int(ctx.n_classes),
        "classes": list(classes),
        "fold": int(ctx.fold),
        "seed": int(ctx.seed),
        "threshold": None if threshold is None else float(threshold),
        "best_epoch": int(best_epoch),
        "state": copy_state(method.state_dict()),
    }


def model_from_checkpoint(ckpt: dict[str, Any], cfg: Config) -> MILModel:
    """Rebuild the aggregator of a plain-bag checkpoint."""
    if ckpt.get("method") in ("mhim", "ins"):
        raise WsiMilError(f"checkpoint of method {ckpt.get('method')!r} holds no plain baseline model.")
    model = build_model(ckpt["model_name"], int(ckpt["in_dim"]), int(ckpt["n_classes"]), cfg.model)
    model.load_state_dict(ckpt["state"]["model"])
    return model.eval()


# -------------------------------------------------------------------------------------------- results
@dataclass
class FoldResult:
    """One (seed, fold): its run, the chosen epoch and threshold, validation and test metrics."""

    seed: int
    fold: int
    run_id: str | None
    best_epoch: int
    epochs_run: int
    threshold: float | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    predictions: pd.DataFrame
    history: dict[str, list[float]]


@dataclass
class TrainResult:
    """What :func:`train_cohort` returns."""

    parent_run_id: str
    experiment_id: str
    folds: list[FoldResult]
    summary: pd.DataFrame  # index metric; columns mean, std, n (test metrics over folds and seeds)
    per_fold: pd.DataFrame
    predictions: pd.DataFrame
    classes: list[str]


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


def per_fold_frame(results: list[FoldResult]) -> pd.DataFrame:
    """One row per (seed, fold) with best epoch, threshold, validation AUC and every test metric."""
    rows = []
    for r in results:
        row = {"seed": r.seed, "fold": r.fold, "run_id": r.run_id, "best_epoch": r.best_epoch,
               "epochs_run": r.epochs_run, "threshold": r.threshold, "val_auc": r.val_metrics.get("auc")}
        row.update({f"test_{k}": v for k, v in r.test_metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def boot_seed(seed: int, fold: int) -> int:
    """Bootstrap seed of one fold (same at training and at `evaluate` so CIs reproduce)."""
    return seed * 1000 + fold


# --------------------------------------------------------------------------------------- cohort data
@dataclass
class CohortData:
    """Labels, bags and splits of a training command."""

    labels: LabelTable
    store: BagStore
    paths: dict[str, Path]
    features_dir: Path
    splits: pd.DataFrame
    fingerprint: str

    @property
    def patients(self) -> dict[str, str]:
        return dict(zip(self.labels.df["slide_id"], self.labels.df["patient_id"], strict=True))


def load_cohort(out: Path, cfg: Config) -> CohortData:
    """Read and check labels and bags, and make the splits."""
    labels = load_labels(cfg.training)
    features_dir = resolve_features_dir(out, cfg)
    labels, paths = match_bags(labels, features_dir, cfg.training.on_missing)
    store = BagStore(paths, cache=cfg.training.cache_bags, max_bytes=cfg.training.cache_max_gb * 1e9)
    splits = make_splits(labels, cfg.training)
    return CohortData(labels, store, paths, features_dir, splits, data_fingerprint(paths))


def _encoder_tag(store: BagStore, cfg: Config) -> str:
    encoders = {i.encoder for i in store.info.values() if i.encoder}
    return ",".join(sorted(encoders)) if encoders else cfg.features.encoder


# ----------------------------------------------------------------------------------------- training
class _FoldRunner:
    """Trains one (seed, fold) and logs it (kept small: the state shared by the helper callbacks)."""

    def __init__(self, cfg: Config, data: CohortData, tracker: Any, experiment_id: str, parent_id: str,
                 factory: MethodFactory, device: torch.device, tags: dict[str, str]) -> None:
        self.cfg, self.data, self.tracker = cfg, data, tracker
        self.experiment_id, self.parent_id, self.factory = experiment_id, parent_id, factory
        self.device, self.tags = device, tags
        self._baseline_folds: list[Any] | None = None

    def run(self, seed: int, fold: int) -> FoldResult:
        cfg, data, tracker = self.cfg, self.data, self.tracker
        classes = data.labels.classes
        split = data.splits[(data.splits["seed"] == seed) & (data.splits["fold"] == fold)]
        ids = {role: fold_ids(data.splits, seed, fold, role) for role in ("train", "val", "test")}
        y_of = dict(zip(data.labels.df["slide_id"], data.labels.df["y"], strict=True))
        bags = {role: data.store.items(ids[role], [y_of[s] for s in ids[role]], self.device) for role in ids}
        name = f"seed{seed}-fold{fold}"
        run_id = tracker.start_run(self.experiment_id, name, parent_id=self.parent_id,
                                   tags={**self.tags, "wsi_mil.role": "fold", "wsi_mil.fold": fold,
                                         "wsi_mil.seed": seed})
        from wsi_mil.tracking import run_guard

        with run_guard(tracker, run_id):
            tracker.log_params(run_id, {**cfg.flat(), "fold": fold, "seed": seed, "n_train": len(ids["train"]),
                                        "n_val": len(ids["val"]), "n_test": len(ids["test"])})
            tracker.log_text(run_id, dump_config(cfg), "config.yaml")
            tracker.log_dataframe(run_id, split, "split.csv")
            seed_everything(boot_seed(seed, fold))
            ctx = FoldContext(fold, seed, bags["train"], bags["val"], data.labels.n_classes, data.store.dim,
                              self.device, extras={})
            ctx.extras.update(self._extras(ctx, run_id))
            method = self.factory(cfg, ctx)
            method.setup(ctx)
            result = fit(method, ctx, cfg.training, desc=name, progress=cfg.training.progress,
                         log_epoch=lambda row, step: tracker.log_metrics(run_id, row, step))
            y_val, p_val = score_bags(method, bags["val"])
            threshold = None
            if data.labels.n_classes == 2:
                threshold = M.choose_threshold(y_val, p_val[:, 1], cfg.training.threshold) if len(y_val) else 0.5
            val_metrics = M.compute_metrics(y_val, p_val, threshold) if len(y_val) else {}
            # the test fold is scored exactly once, with the checkpoint and threshold chosen above
            test_scores: dict[str, np.ndarray] = {}
            y_test, p_test = score_bags(method, bags["test"], test_scores)
            patients = data.patients
            test_metrics = M.evaluate(y_test, p_test, threshold, n_boot=cfg.training.bootstrap,
                                      seed=boot_seed(seed, fold), groups=[patients[s] for s in ids["test"]])
            localisation = instance_auc_of(method, bags["test"], cfg.training, test_scores)
            if not np.isnan(localisation):
                test_metrics["instance_auc"] = localisation
            preds = prediction_frame(ids["test"], patients, y_test, p_test, classes, threshold, seed, fold, "test")
            val_preds = prediction_frame(ids["val"], patients, y_val, p_val, classes, threshold, seed, fold, "val")
            final = {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                     "stopped_early": float(result.stopped_early)}
            if threshold is not None:
                final["threshold"] = threshold
            final.update({f"val_best_{k}": v for k, v in val_metrics.items()})
            final.update({f"test_{k}": v for k, v in test_metrics.items()})
            tracker.log_metrics(run_id, final, step=result.epochs_run)
            if cfg.tracking.log_checkpoints:
                tracker.log_checkpoint(run_id, make_checkpoint(method, cfg, ctx, classes, threshold=threshold,
                                                               best_epoch=result.best_epoch))
            tracker.log_dataframe(run_id, preds, "predictions.csv")
            tracker.log_dataframe(run_id, val_preds, "val_predictions.csv")
            self._log_plots(run_id, y_test, p_test, preds["pred"].to_numpy(), result, name)
        return FoldResult(seed, fold, run_id, result.best_epoch, result.epochs_run, threshold, val_metrics,
                          test_metrics, preds, result.history)

    def _log_plots(self, run_id: str, y: np.ndarray, probs: np.ndarray, pred: np.ndarray, result: FitResult,
                   name: str) -> None:
        from wsi_mil import plots

        classes = self.data.labels.classes
        with tempfile.TemporaryDirectory(prefix="wsi-mil-plots-") as tmp:
            tmp_path = Path(tmp)
            files = [plots.curves_png(result.history, tmp_path / "training_curves.png", result.best_epoch, name)]
            if len(y):
                files.append(plots.roc_png(y, probs, classes, tmp_path / "roc.png", f"ROC {name} (test)"))
                files.append(plots.confusion_png(y, pred, classes, tmp_path / "confusion_matrix.png",
                                                 f"Confusion {name} (test)"))
            for f in files:
                self.tracker.log_artifact(run_id, f)

    # ------------------------------------------------------------------------------ method extras
    def _extras(self, ctx: FoldContext, run_id: str) -> dict[str, Any]:
        cfg, data = self.cfg, self.data
        paths = {s: data.paths[s] for s in list(ctx.train.slide_ids) + list(ctx.val.slide_ids)}
        extras: dict[str, Any] = {
            "config": cfg,
            "bag_paths": paths,
            "train_baseline": lambda model_name: self._train_baseline(ctx, run_id, model_name),
            "log_metrics": lambda metrics, step=None: self.tracker.log_metrics(run_id, metrics, step),
        }
        if cfg.model.mhim.baseline_run:
            extras["load_baseline"] = self._load_baseline
        return extras

    def _train_baseline(self, ctx: FoldContext, run_id: str, model_name: str) -> MILModel:
        cfg = self.cfg
        seed_everything(boot_seed(ctx.seed, ctx.fold) + 7)
        bctx = FoldContext(ctx.fold, ctx.seed, ctx.train, ctx.val, ctx.n_classes, ctx.in_dim, ctx.device,
                           extras={"config": cfg, "bag_paths": ctx.extras.get("bag_paths", {})})
        method = BagMethod(build_model(model_name, ctx.in_dim, ctx.n_classes, cfg.model), cfg, bctx, model_name)
        method.setup(bctx)
        result = fit(method, bctx, cfg.training, desc=f"baseline {model_name} s{ctx.seed}f{ctx.fold}",
                     progress=cfg.training.progress,
                     log_epoch=lambda row, step: self.tracker.log_metrics(
                         run_id, {f"baseline_{k}": v for k, v in row.items()}, step))
        self.tracker.log_metrics(run_id, {"baseline_best_epoch": result.best_epoch,
                                          "baseline_best_val_auc": result.best_val_auc})
        self.tracker.log_checkpoint(
            run_id, make_checkpoint(method, cfg, bctx, self.data.labels.classes, threshold=None,
                                    best_epoch=result.best_epoch, model_name=model_name, method_name="bag"),
            "baseline/checkpoint.pt")
        return method.model.eval()

    def _load_baseline(self, fold: int, seed: int) -> MILModel:
        run_id = str(self.cfg.model.mhim.baseline_run)
        if self._baseline_folds is None:
            self._baseline_folds = self.tracker.fold_runs(run_id)
            theirs = self.tracker.load_splits(run_id)
            ours = self.data.splits
            key = ["seed", "fold", "slide_id", "role"]
            a = theirs[key].astype(str).sort_values(key).reset_index(drop=True)
            b = ours[key].astype(str).sort_values(key).reset_index(drop=True)
            self._same_splits = {(int(s), int(f)) for (s, f), _ in ours.groupby(["seed", "fold"])
                                 if _same(a, b, s, f)}
        if (seed, fold) not in self._same_splits:
            raise WsiMilError(
                f"model.mhim.baseline_run {run_id}: its split for seed {seed} fold {fold} differs from this run's "
                "(its teacher may have seen this test fold); train with the same labels, folds and seeds."
            )
        match = [f for f in self._baseline_folds if f.fold == fold and f.seed == seed]
        if not match:
            raise WsiMilError(f"model.mhim.baseline_run {run_id} has no run for seed {seed} fold {fold}.")
        rid = match[0].run_id
        names = self.tracker.list_artifacts(rid)
        path = "baseline/checkpoint.pt" if "baseline/checkpoint.pt" in names else "checkpoint.pt"
        ckpt = self.tracker.load_checkpoint(rid, path)
        if path == "checkpoint.pt" and ckpt.get("method") in ("mhim", "ins"):
            raise WsiMilError(f"model.mhim.baseline_run {run_id} is a {ckpt.get('method')} run without a baseline.")
        if int(ckpt["in_dim"]) != self.data.store.dim:
            raise WsiMilError(f"model.mhim.baseline_run {run_id} was trained on {ckpt['in_dim']}-d features, "
                              f"these bags are {self.data.store.dim}-d.")
        return model_from_checkpoint(ckpt, self.cfg).to(self.device)


def _same(a: pd.DataFrame, b: pd.DataFrame, seed: Any, fold: Any) -> bool:
    sa = a[(a["seed"] == str(seed)) & (a["fold"] == str(fold))].reset_index(drop=True)
    sb = b[(b["seed"] == str(seed)) & (b["fold"] == str(fold))].reset_index(drop=True)
    return len(sa) > 0 and sa.equals(sb)


def train_cohort(out: Path, cfg: Config, *, method_factory: MethodFactory = build_method) -> TrainResult:
    """Cross-validate ``cfg.model`` on the bags of ``out`` and log everything to MLflow.

    ``method_factory(cfg, ctx)`` builds each fold's method (default :func:`build_method`).
    """
    out = Path(out)
    threads = torch.get_num_threads()
    if cfg.training.threads is not None:
        torch.set_num_threads(cfg.training.threads)
    try:
        return _train_cohort(out, cfg, method_factory)
    finally:
        torch.set_num_threads(threads)


def _train_cohort(out: Path, cfg: Config, method_factory: MethodFactory) -> TrainResult:
    from wsi_mil.tracking import code_version, experiment_name, open_tracker, run_guard

    data = load_cohort(out, cfg)
    device = resolve_device(cfg.training.device)
    tracker = open_tracker(out, cfg)
    experiment_id = tracker.experiment(experiment_name(cfg))
    from wsi_mil.layout import tiling_key

    label = method_label(cfg)
    tags = {"wsi_mil.model": label, "wsi_mil.encoder": _encoder_tag(data.store, cfg),
            "wsi_mil.tiling": tiling_key(cfg), "wsi_mil.data_fingerprint": data.fingerprint,
            "wsi_mil.code_version": code_version(), "wsi_mil.features_dir": str(data.features_dir.resolve()),
            "wsi_mil.classes": ",".join(data.labels.classes)}
    parent = tracker.start_run(experiment_id, cfg.tracking.run_name or f"{label} cv",
                               tags={**tags, "wsi_mil.role": "cv"})
    log.info("training %s on %d slides (%d classes, %d-d features) -> MLflow run %s (%s)", label,
             len(data.labels.df), data.labels.n_classes, data.store.dim, parent, tracker.uri)
    with run_guard(tracker, parent):
        tracker.log_params(parent, {**cfg.flat(), "n_slides": len(data.labels.df),
                                    "n_patients": data.labels.df["patient_id"].nunique(), "in_dim": data.store.dim})
        tracker.log_text(parent, dump_config(cfg), "config.yaml")
        tracker.log_dataframe(parent, data.splits, "splits.csv")
        tracker.log_dataframe(parent, split_counts(data.splits, data.labels.classes), "split_counts.csv")
        tracker.log_dataframe(parent, data.labels.df, "labels.csv")
        runner = _FoldRunner(cfg, data, tracker, experiment_id, parent, method_factory, device, tags)
        pairs = sorted({(int(s), int(f)) for s, f in zip(data.splits["seed"], data.splits["fold"], strict=True)})
        results = []
        for seed, fold in pairs:
            r = runner.run(seed, fold)
            log.info("seed %d fold %d: best epoch %d/%d, test AUC %.4f", seed, fold, r.best_epoch, r.epochs_run,
                     r.test_metrics.get("auc", float("nan")))
            results.append(r)
        rows = [r.test_metrics for r in results]
        extra = ["instance_auc"] if any("instance_auc" in r for r in rows) else []
        summary = M.summarize(rows, [*M.METRICS, *extra])
        per_fold = per_fold_frame(results)
        predictions = pd.concat([r.predictions for r in results], ignore_index=True)
        _log_summary(tracker, parent, summary, per_fold, predictions, data.labels.classes)
    return TrainResult(parent, experiment_id, results, summary, per_fold, predictions, data.labels.classes)


def _log_summary(tracker: Any, parent: str, summary: pd.DataFrame, per_fold: pd.DataFrame,
                 predictions: pd.DataFrame, classes: list[str]) -> None:
    metrics = {}
    for name, row in summary.iterrows():
        metrics[f"test_{name}_mean"] = row["mean"]
        metrics[f"test_{name}_std"] = row["std"]
    if "val_auc" in per_fold:
        metrics["val_auc_mean"] = float(per_fold["val_auc"].astype(float).mean())
    tracker.log_metrics(parent, metrics)
    tracker.log_dataframe(parent, summary.reset_index(), "summary.csv")
    tracker.log_dataframe(parent, per_fold, "per_fold.csv")
    tracker.log_dataframe(parent, predictions, "predictions.csv")
    from wsi_mil import plots

    if len(predictions):
        y = predictions["label"].to_numpy()
        probs = predictions[[f"prob_{c}" for c in classes]].to_numpy()
        with tempfile.TemporaryDirectory(prefix="wsi-mil-plots-") as tmp:
            roc = plots.roc_png(y, probs, classes, Path(tmp) / "roc_pooled.png", "ROC, all test folds pooled")
            cm = plots.confusion_png(y, predictions["pred"].to_numpy(), classes, Path(tmp) / "confusion_pooled.png",
                                     "Confusion, all test folds")
            tracker.log_artifact(parent, roc)
            tracker.log_artifact(parent, cm)


# --------------------------------------------------------------------------------------- evaluation
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

    Uses the run's own config, splits and decision thresholds; ``cfg`` only supplies the tracking URI
    (and ``training.features_dir`` / ``training.device`` when set). The metrics are compared with the
    ones logged at training time (``matches_training``) and, with ``log_to_run``, logged to the parent
    run as ``eval_test_<metric>_mean`` plus ``evaluation/per_fold.csv``.
    """
    from wsi_mil.tracking import load_fold_method, open_tracker

    out = Path(out)
    tracker = open_tracker(out, cfg)
    run = tracker.get_run(run_id)
    if run.tags.get("wsi_mil.role") == "fold" and run.parent_id:
        run_id, run = run.parent_id, tracker.get_run(run.parent_id)
    run_cfg = tracker.load_config(run_id)
    if cfg.training.features_dir is not None:
        run_cfg = run_cfg.with_overrides({"training.features_dir": str(cfg.training.features_dir)})
    features_dir = Path(run.tags["wsi_mil.features_dir"]) if run_cfg.training.features_dir is None and \
        "wsi_mil.features_dir" in run.tags else resolve_features_dir(out, run_cfg)
    if not features_dir.is_dir():
        features_dir = resolve_features_dir(out, run_cfg)
    splits = tracker.load_splits(run_id)
    device = resolve_device(cfg.training.device if cfg.training.device != "auto" else run_cfg.training.device)
    folds = tracker.fold_runs(run_id)
    test_ids = sorted({s for f in folds for s in f.test_slide_ids})
    from wsi_mil.mil.data import list_bags

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
        bags = store.items(f.test_slide_ids, [y_of[s] for s in f.test_slide_ids], device)
        y, probs = score_bags(loaded.method, bags)
        metrics = M.evaluate(y, probs, loaded.threshold, n_boot=run_cfg.training.bootstrap, seed=boot_seed(f.seed, f.fold),
                             groups=[patients[s] for s in f.test_slide_ids])
        logged = tracker.get_run(f.run_id).metrics
        row = {"seed": f.seed, "fold": f.fold, "run_id": f.run_id, "threshold": loaded.threshold}
        for k, v in metrics.items():
            row[f"test_{k}"] = v
            old = logged.get(f"test_{k}")
            row[f"logged_test_{k}"] = old
            if k in M.METRICS and old is not None and not math.isclose(v, old, rel_tol=1e-6, abs_tol=1e-9):
                matches = False
        rows.append(row)
        frames.append(prediction_frame(f.test_slide_ids, patients, y, probs, loaded.classes, loaded.threshold,
                                       f.seed, f.fold, "test"))
    per_fold = pd.DataFrame(rows)
    summary = M.summarize([{k: r[f"test_{k}"] for k in M.METRICS} for r in rows])
    predictions = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if log_to_run:
        tracker.log_metrics(run_id, {f"eval_test_{name}_mean": row["mean"] for name, row in summary.iterrows()})
        tracker.log_dataframe(run_id, per_fold, "evaluation/per_fold.csv")
        tracker.log_dataframe(run_id, summary.reset_index(), "evaluation/summary.csv")
    if not matches:
        log.warning("run %s: re-scored test metrics differ from the ones logged at training time", run_id)
    return EvalResult(run_id, per_fold, summary, predictions, matches)
