"""Cross-validated training of MIL methods, tracked in MLflow (`wsi-mil train`).

Per (seed, fold): the method trains on the fold's training bags with early stopping on the
validation bags (:func:`wsi_mil.mil.fit.fit`); the binary decision threshold is chosen on the
validation predictions of the kept checkpoint. Only then are the test bags scored, once. Everything
goes to MLflow (see :mod:`wsi_mil.tracking` for the layout of a run): params, per-epoch curves, test
metrics with bootstrap CIs, predictions, plots, the checkpoint (:mod:`wsi_mil.mil.checkpoints`), run
descriptions (:mod:`wsi_mil.mil.notes`), the labels as a dataset input, and at the end the fold models
as one MLflow Model (:mod:`wsi_mil.mil.ensemble`), registered when ``tracking.register_as`` is set.

Methods get the fold's bags in a :class:`~wsi_mil.mil.base.FoldContext` and what else the trainer
offers (settings, bag files, baseline training/loading, metric logging) in its
:class:`~wsi_mil.mil.base.FoldExtras`.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from wsi_mil.config import Config, dump_config
from wsi_mil.devices import resolve_device
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import tiling_key
from wsi_mil.mil import metrics as M
from wsi_mil.mil import plots
from wsi_mil.mil.base import FoldContext, FoldExtras, MethodFactory, MILModel
from wsi_mil.mil.checkpoints import (
    BASELINE_CHECKPOINT,
    CHECKPOINT,
    load_checkpoint,
    load_run_splits,
    log_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from wsi_mil.mil.data import (
    BagStore,
    LabelTable,
    data_fingerprint,
    load_labels,
    match_bags,
    resolve_features_dir,
)
from wsi_mil.mil.ensemble import FoldEnsemble, log_ensemble, model_uri, register_run_model
from wsi_mil.mil.evaluation import boot_seed, instance_auc_of, prediction_frame, score_bags
from wsi_mil.mil.fit import FitResult, fit
from wsi_mil.mil.methods import BagMethod, build_method, method_label, seed_everything
from wsi_mil.mil.models import build_model
from wsi_mil.mil.notes import cohort_note, fold_note, single_class_note, summary_note
from wsi_mil.mil.resume import RESUME_TAG, finished_folds, owner_tags, resume_key, take_over_stale
from wsi_mil.mil.splits import fold_ids, make_splits, split_counts
from wsi_mil.tracking import (
    FOLD_TAG,
    SEED_TAG,
    FoldRun,
    RunRecord,
    Tracker,
    code_version,
    experiment_name,
    open_tracker,
    run_guard,
)

log = logging.getLogger(__name__)


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
    single_class: str | None = None  # why the fold has no validation AUC, if it has none


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
    model_id: str | None = None  # the logged MLflow Model (runs:/<parent>/model), if any
    model_version: int | None = None  # its version of tracking.register_as, if registered


def per_fold_frame(results: list[FoldResult]) -> pd.DataFrame:
    """One row per (seed, fold) with best epoch, threshold, validation AUC and every test metric."""
    rows = []
    for r in results:
        row = {"seed": r.seed, "fold": r.fold, "run_id": r.run_id, "best_epoch": r.best_epoch,
               "epochs_run": r.epochs_run, "threshold": r.threshold, "val_auc": r.val_metrics.get("auc")}
        row.update({f"test_{k}": v for k, v in r.test_metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)



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
        """Patient id of every slide."""
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

    def __init__(self, cfg: Config, data: CohortData, tracker: Tracker, experiment_id: str, parent_id: str,
                 factory: MethodFactory, device: torch.device, tags: dict[str, str]) -> None:
        self.cfg, self.data, self.tracker = cfg, data, tracker
        self.experiment_id, self.parent_id, self.factory = experiment_id, parent_id, factory
        self.device, self.tags = device, tags
        self._baseline_folds: list[FoldRun] | None = None
        self.checkpoints: list[dict[str, Any]] = []  # each fold's kept model, for the run's MLflow Model
        # a logged model rebuilds its methods from the registry: a caller's own factory cannot be logged
        self.log_model = cfg.tracking.log_model and factory is build_method
        if cfg.tracking.log_model and not self.log_model:
            log.warning("training with a custom method factory: no MLflow Model is logged (loading one rebuilds "
                        "methods from the model registry)")

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
        with run_guard(tracker, run_id):
            tracker.log_params(run_id, {**cfg.flat(), "fold": fold, "seed": seed, "n_train": len(ids["train"]),
                                        "n_val": len(ids["val"]), "n_test": len(ids["test"])})
            tracker.log_text(run_id, dump_config(cfg), "config.yaml")
            tracker.log_dataframe(run_id, split, "split.csv")
            seed_everything(boot_seed(seed, fold))
            ctx = FoldContext(fold, seed, bags["train"], bags["val"], data.labels.n_classes, data.store.dim,
                              self.device)
            ctx.extras = self._extras(ctx, run_id)
            method = self.factory(cfg, ctx)
            method.setup(ctx)
            result = fit(method, ctx, cfg.training, desc=name, progress=cfg.training.progress,
                         log_epoch=lambda row, step: tracker.log_metrics(run_id, row, step))
            y_val, p_val = score_bags(method, bags["val"])
            single_class = single_class_note(y_val, classes)
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
            final = {"fit/best_epoch": result.best_epoch, "fit/epochs_run": result.epochs_run,
                     "fit/stopped_early": float(result.stopped_early)}
            if threshold is not None:
                final["fit/threshold"] = threshold
            if cfg.model.name == "ins":  # INS: how long after pseudo-labelling began the checkpoint was taken
                final["fit/best_epoch_from_proto_start"] = result.best_epoch - cfg.model.ins.proto_start
            final.update({f"fit/val_{k}": v for k, v in val_metrics.items()})
            final.update({f"test/{k}": v for k, v in test_metrics.items()})
            tracker.log_metrics(run_id, final, step=0)  # single values: bars in the UI, not one-dot curves
            if cfg.tracking.log_checkpoints or self.log_model:
                checkpoint = make_checkpoint(method, cfg, ctx, classes, threshold=threshold, best_epoch=result.best_epoch)
                if cfg.tracking.log_checkpoints:
                    log_checkpoint(tracker, run_id, checkpoint)
                if self.log_model:
                    self.checkpoints.append(checkpoint)
            counts = split_counts(split, classes).iloc[0].to_dict()
            tracker.set_description(run_id, fold_note(
                name, counts, classes, best_epoch=result.best_epoch, epochs_run=result.epochs_run,
                stopped_early=result.stopped_early, threshold=threshold, threshold_rule=cfg.training.threshold,
                val_auc=val_metrics.get("auc"), test=test_metrics, single_class=single_class))
            if single_class:
                tracker.set_tags(run_id, {"wsi_mil.val_auc": f"undefined: {single_class}"})
            tracker.log_dataframe(run_id, preds, "predictions.csv")
            tracker.log_dataframe(run_id, val_preds, "val_predictions.csv")
            self._log_plots(run_id, y_test, p_test, preds["pred"].to_numpy(), result, name)
        return FoldResult(seed, fold, run_id, result.best_epoch, result.epochs_run, threshold, val_metrics,
                          test_metrics, preds, result.history, single_class)

    def _log_plots(self, run_id: str, y: np.ndarray, probs: np.ndarray, pred: np.ndarray, result: FitResult,
                   name: str) -> None:
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
    def _extras(self, ctx: FoldContext, run_id: str) -> FoldExtras:
        cfg, data = self.cfg, self.data
        paths = {s: data.paths[s] for s in list(ctx.train.slide_ids) + list(ctx.val.slide_ids)}
        return FoldExtras(
            config=cfg,
            bag_paths=paths,
            train_baseline=functools.partial(self._train_baseline, ctx, run_id),
            load_baseline=self._load_baseline if cfg.model.mhim.baseline_run else None,
            log_metrics=functools.partial(self.tracker.log_metrics, run_id),
        )

    def _train_baseline(self, ctx: FoldContext, run_id: str, model_name: str) -> MILModel:
        cfg = self.cfg
        seed_everything(boot_seed(ctx.seed, ctx.fold) + 7)
        bctx = FoldContext(ctx.fold, ctx.seed, ctx.train, ctx.val, ctx.n_classes, ctx.in_dim, ctx.device,
                           extras=FoldExtras(config=cfg, bag_paths=ctx.extras.bag_paths))
        method = BagMethod(build_model(model_name, ctx.in_dim, ctx.n_classes, cfg.model), cfg, bctx, model_name)
        method.setup(bctx)
        mcfg = cfg.model.mhim
        btcfg = cfg.training.model_copy(update={
            "min_epochs": cfg.training.min_epochs if mcfg.baseline_min_epochs is None else mcfg.baseline_min_epochs,
            "patience": cfg.training.patience if mcfg.baseline_patience is None else mcfg.baseline_patience})
        result = fit(method, bctx, btcfg, desc=f"baseline {model_name} s{ctx.seed}f{ctx.fold}",
                     progress=cfg.training.progress,
                     log_epoch=lambda row, step: self.tracker.log_metrics(
                         run_id, {f"baseline/{k}": v for k, v in row.items()}, step))
        self.tracker.log_metrics(run_id, {"baseline/fit/best_epoch": result.best_epoch,
                                          "baseline/fit/val_auc": result.best_val_auc})
        log_checkpoint(
            self.tracker, run_id, make_checkpoint(method, cfg, bctx, self.data.labels.classes, threshold=None,
                                    best_epoch=result.best_epoch, model_name=model_name, method_name="bag"),
            BASELINE_CHECKPOINT)
        return method.model.eval()

    def _load_baseline(self, fold: int, seed: int) -> MILModel:
        run_id = str(self.cfg.model.mhim.baseline_run)
        if self._baseline_folds is None:
            self._baseline_folds = self.tracker.fold_runs(run_id)
            theirs = load_run_splits(self.tracker, run_id)
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
        path = BASELINE_CHECKPOINT if BASELINE_CHECKPOINT in names else CHECKPOINT
        ckpt = load_checkpoint(self.tracker, rid, path)
        if path == CHECKPOINT and ckpt.get("method") in ("mhim", "ins"):
            raise WsiMilError(f"model.mhim.baseline_run {run_id} is a {ckpt.get('method')} run without a baseline.")
        if int(ckpt["in_dim"]) != self.data.store.dim:
            raise WsiMilError(f"model.mhim.baseline_run {run_id} was trained on {ckpt['in_dim']}-d features, "
                              f"these bags are {self.data.store.dim}-d.")
        return model_from_checkpoint(ckpt, self.cfg).to(self.device)


def fold_result_from_run(tracker: Tracker, run: RunRecord) -> FoldResult:
    """The :class:`FoldResult` of a finished fold run, read back from MLflow (its metrics, tags and predictions)."""
    with tempfile.TemporaryDirectory(prefix="wsi-mil-reuse-") as tmp:
        text = ["slide_id", "patient_id", "split", "label_name", "pred_name"]
        preds = pd.read_csv(tracker.download(run.run_id, "predictions.csv", Path(tmp)), dtype=dict.fromkeys(text, str))
    m = run.metrics
    note = run.tags.get("wsi_mil.val_auc", "")
    return FoldResult(int(run.tags[SEED_TAG]), int(run.tags[FOLD_TAG]), run.run_id, int(m.get("fit/best_epoch", -1)),
                      int(m.get("fit/epochs_run", 0)), m.get("fit/threshold"),
                      {k.removeprefix("fit/val_"): v for k, v in m.items() if k.startswith("fit/val_")},
                      {k.removeprefix("test/"): v for k, v in m.items() if k.startswith("test/")}, preds, {},
                      note.removeprefix("undefined: ") if note.startswith("undefined: ") else None)


def _reused_fold(runner: _FoldRunner, run: RunRecord) -> FoldResult:
    """A finished fold of a resumed training, read back from its run (its checkpoint joins the model)."""
    result = fold_result_from_run(runner.tracker, run)
    if runner.log_model:
        runner.checkpoints.append(load_checkpoint(runner.tracker, run.run_id))
    log.info("seed %d fold %d: finished before the training was killed; reusing run %s", result.seed, result.fold,
             run.run_id)
    return result


def _same(a: pd.DataFrame, b: pd.DataFrame, seed: Any, fold: Any) -> bool:
    sa = a[(a["seed"] == str(seed)) & (a["fold"] == str(fold))].reset_index(drop=True)
    sb = b[(b["seed"] == str(seed)) & (b["fold"] == str(fold))].reset_index(drop=True)
    return len(sa) > 0 and sa.equals(sb)


def train_cohort(out: Path, cfg: Config, *, method_factory: MethodFactory = build_method) -> TrainResult:
    """Cross-validate ``cfg.model`` on the bags of ``out`` and log everything to MLflow.

    Parameters
    ----------
    out : Path
        Output directory holding ``features/`` (or set ``training.features_dir``) and, by default,
        the MLflow store.
    cfg : Config
        Settings: ``training`` (labels, folds, seeds, epochs, early stopping), ``model``, ``tracking``.
    method_factory : callable
        ``method_factory(cfg, ctx)`` builds each fold's method (default :func:`build_method`).

    Returns
    -------
    TrainResult
        The parent run id, one :class:`FoldResult` per (seed, fold), the summary (mean, std, n of each
        test metric over folds and seeds), per-fold table and test predictions.

    Raises
    ------
    WsiMilError
        When labels or bags are missing or do not match, a split leaks, or MLflow cannot be reached.
    """
    out = Path(out)
    threads = torch.get_num_threads()
    if cfg.training.threads is not None:
        torch.set_num_threads(cfg.training.threads)
    try:
        return _train_cohort(out, cfg, method_factory)
    finally:
        torch.set_num_threads(threads)


@dataclass
class ParentRun:
    """A started cross-validation parent run: what its fold trainings and its summary need."""

    cfg: Config
    data: CohortData
    tracker: Tracker
    experiment_id: str
    run_id: str
    tags: dict[str, str]  # shared by the parent and its fold runs
    head: str  # the start of its description
    pairs: list[tuple[int, int]]  # (seed, fold) of every fold training
    resumed: bool = False  # an earlier parent run of the same settings, data and splits, going on


def start_parent(out: Path, cfg: Config, *, resume: str | None = None, take_over: bool = True) -> ParentRun:
    """Read the cohort, open the parent run and log its params, dataset, config and splits.

    A new parent run is tagged with its resume key and owner (:mod:`wsi_mil.mil.resume`); it is ended
    FAILED when this logging fails. ``take_over``: a stale parent of a killed training with the same
    key is resumed instead. ``resume``: the id of an ended (FAILED, KILLED) parent with the same key to
    go on with, marked RUNNING again. A resumed parent is not logged twice.
    """
    data = load_cohort(out, cfg)
    tracker = open_tracker(out, cfg)
    experiment_id = tracker.experiment(experiment_name(cfg))
    label = method_label(cfg)
    shared = {"wsi_mil.model": label, "wsi_mil.encoder": _encoder_tag(data.store, cfg),
              "wsi_mil.tiling": tiling_key(cfg), "wsi_mil.data_fingerprint": data.fingerprint,
              "wsi_mil.code_version": code_version(), "wsi_mil.features_dir": str(data.features_dir.resolve()),
              "wsi_mil.classes": ",".join(data.labels.classes)}
    key = resume_key(cfg, data.fingerprint, data.splits)
    resumed = take_over_stale(tracker, experiment_id, key) if take_over else None  # a killed training goes on
    if resume is not None and resumed is None:
        tracker.reopen_run(resume)
        tracker.set_tags(resume, owner_tags())
        resumed = resume
    parent = resumed or tracker.start_run(experiment_id, cfg.tracking.run_name or f"{label} cv",
                                          tags={**shared, "wsi_mil.role": "cv", RESUME_TAG: key, **owner_tags()})
    log.info("training %s on %d slides (%d classes, %d-d features) -> MLflow run %s (%s)", label,
             len(data.labels.df), data.labels.n_classes, data.store.dim, parent, tracker.shown_uri)
    pairs = sorted({(int(s), int(f)) for s, f in zip(data.splits["seed"], data.splits["fold"], strict=True)})
    source = str(Path(cfg.training.labels_csv).resolve()) if cfg.training.labels_csv else str(data.labels.source)
    head = cohort_note(model=label, labels=data.labels, source=source, encoder=shared["wsi_mil.encoder"],
                       tiling=shared["wsi_mil.tiling"], n_folds=len({f for _, f in pairs}),
                       seeds=sorted({s for s, _ in pairs}), in_dim=data.store.dim)
    if resumed is not None:  # a resumed parent holds these already
        return ParentRun(cfg, data, tracker, experiment_id, parent, shared, head, pairs, resumed=True)
    try:
        tracker.set_description(parent, head)
        tracker.log_params(parent, {**cfg.flat(), "n_slides": len(data.labels.df),
                                    "n_patients": data.labels.df["patient_id"].nunique(), "in_dim": data.store.dim})
        tracker.log_dataset(parent, data.labels.df, name=f"{Path(source).parent.name}/{Path(source).name}",
                            source=source, targets="label")
        tracker.log_text(parent, dump_config(cfg), "config.yaml")
        tracker.log_dataframe(parent, data.splits, "splits.csv")
        tracker.log_dataframe(parent, split_counts(data.splits, data.labels.classes), "split_counts.csv")
        tracker.log_dataframe(parent, data.labels.df, "labels.csv")
    except BaseException:
        tracker.end_run(parent, "FAILED")
        raise
    return ParentRun(cfg, data, tracker, experiment_id, parent, shared, head, pairs)


def fold_runner(parent: ParentRun, *, method_factory: MethodFactory = build_method,
                device: torch.device | None = None, tags: dict[str, str] | None = None) -> _FoldRunner:
    """The trainer of ``parent``'s folds: ``fold_runner(parent).run(seed, fold)`` trains and logs one fold.

    ``tags`` are added to every fold run (e.g. the host that trained it); ``device`` defaults to
    ``training.device`` resolved on this machine.
    """
    device = resolve_device(parent.cfg.training.device) if device is None else device
    return _FoldRunner(parent.cfg, parent.data, parent.tracker, parent.experiment_id, parent.run_id, method_factory,
                       device, {**parent.tags, **(tags or {})})


def summarise_parent(parent: ParentRun, results: list[FoldResult], checkpoints: list[dict[str, Any]]) -> TrainResult:
    """Log the parent run's summary, tables, pooled plots, description and MLflow Model (from ``checkpoints``).

    The run is not ended here; ``results`` are in (seed, fold) order.
    """
    cfg, tracker, data = parent.cfg, parent.tracker, parent.data
    rows = [r.test_metrics for r in results]
    extra = ["instance_auc"] if any("instance_auc" in r for r in rows) else []
    summary = M.summarize(rows, [*M.METRICS, *extra])
    per_fold = per_fold_frame(results)
    predictions = pd.concat([r.predictions for r in results], ignore_index=True)
    metrics = _log_summary(tracker, parent.run_id, summary, per_fold, predictions, data.labels.classes)
    ensemble = FoldEnsemble.from_checkpoints(checkpoints, cfg) if checkpoints else None
    model_id = log_ensemble(tracker, parent.run_id, ensemble, metrics=metrics) if ensemble is not None else None
    thresholds = [r.threshold for r in results if r.threshold is not None]
    tracker.set_description(parent.run_id, summary_note(
        parent.head, summary, threshold=float(np.median(thresholds)) if thresholds else None,
        threshold_rule=cfg.training.threshold,
        single_class=[f"seed{r.seed}-fold{r.fold}: {r.single_class}" for r in results if r.single_class],
        model_uri=model_uri(parent.run_id) if model_id else None))
    return TrainResult(parent.run_id, parent.experiment_id, results, summary, per_fold, predictions,
                       data.labels.classes, model_id)


def register_parent(parent: ParentRun, result: TrainResult) -> TrainResult:
    """Register the finished run's MLflow Model as a new version of ``tracking.register_as``, if set."""
    if result.model_id is not None and parent.cfg.tracking.register_as:
        result.model_version = register_run_model(parent.tracker, parent.run_id, parent.cfg.tracking.register_as)
        log.info("registered as models:/%s/%d", parent.cfg.tracking.register_as, result.model_version)
    return result


def _train_cohort(out: Path, cfg: Config, method_factory: MethodFactory) -> TrainResult:
    parent = start_parent(out, cfg)
    with run_guard(parent.tracker, parent.run_id):
        runner = fold_runner(parent, method_factory=method_factory)
        done = finished_folds(parent.tracker, parent.run_id) if parent.resumed else {}
        results = []
        for seed, fold in parent.pairs:
            r = _reused_fold(runner, done[(seed, fold)]) if (seed, fold) in done else runner.run(seed, fold)
            log.info("seed %d fold %d: best epoch %d/%d, test AUC %.4f", seed, fold, r.best_epoch, r.epochs_run,
                     r.test_metrics.get("auc", float("nan")))
            results.append(r)
        result = summarise_parent(parent, results, runner.checkpoints)
    return register_parent(parent, result)


def _log_summary(tracker: Tracker, parent: str, summary: pd.DataFrame, per_fold: pd.DataFrame,
                 predictions: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    """Log the parent run's metrics (returned), tables and pooled plots."""
    metrics = {}
    for name, row in summary.iterrows():
        metrics[f"test/{name}_mean"] = row["mean"]
        metrics[f"test/{name}_std"] = row["std"]
    if "val_auc" in per_fold:
        metrics["fit/val_auc_mean"] = float(per_fold["val_auc"].astype(float).mean())
    tracker.log_metrics(parent, metrics)
    tracker.log_dataframe(parent, summary.reset_index(), "summary.csv")
    tracker.log_dataframe(parent, per_fold, "per_fold.csv")
    tracker.log_dataframe(parent, predictions, "predictions.csv")
    tracker.log_table(parent, predictions, "predictions.json")
    if len(predictions):
        y = predictions["label"].to_numpy()
        probs = predictions[[f"prob_{c}" for c in classes]].to_numpy()
        with tempfile.TemporaryDirectory(prefix="wsi-mil-plots-") as tmp:
            roc = plots.roc_png(y, probs, classes, Path(tmp) / "roc_pooled.png", "ROC, all test folds pooled")
            cm = plots.confusion_png(y, predictions["pred"].to_numpy(), classes, Path(tmp) / "confusion_pooled.png",
                                     "Confusion, all test folds")
            tracker.log_artifact(parent, roc)
            tracker.log_artifact(parent, cm)
    return metrics
