"""`wsi-mil run SLIDES_DIR --labels CSV --out OUT`: the whole workflow on a slide directory.

labels and folds checked against the slide folder -> inventory + tissue + tiling -> embedding -> for
each model of ``run.models``: cross-validated training (MLflow) -> heatmaps of the test slides
(+ localisation AUC where ground truth exists) -> a summary table (printed, ``OUT/summary.md``, and an
MLflow run of its own).

Every stage skips finished work: stores and bags are reused when their settings match, and a model
whose training finished before under the same settings and data is not trained again (its MLflow
run is found by the ``wsi_mil.workflow_key`` tag). Slides that fail to tile or embed are reported and
excluded from training; the run goes on. Bad labels and infeasible folds stop it before any tiling.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from wsi_mil.workflows.heatmap import heatmaps_for_run
from wsi_mil.workflows.train import WORKFLOW_TAG, finished_run, workflow_key

from wsi_mil.compute import dask_client
from wsi_mil.config import Config
from wsi_mil.errors import ConfigError
from wsi_mil.extract import ExtractReport, extract_cohort
from wsi_mil.layout import Layout
from wsi_mil.mil.cv import train_cohort
from wsi_mil.mil.data import LabelTable, load_labels, match_slides, resolve_features_dir
from wsi_mil.mil.distributed import ClusterTrainer
from wsi_mil.mil.ensemble import register_run_model
from wsi_mil.mil.splits import make_splits
from wsi_mil.slides import find_slides, slide_id
from wsi_mil.stores import write_text_atomic
from wsi_mil.tiling import TilingReport, tile_cohort
from wsi_mil.tracking import Tracker, experiment_name, open_tracker

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1", "instance_auc")


@dataclass
class ModelOutcome:
    """One trained model of the workflow."""

    name: str
    run_id: str
    reused: bool
    summary: dict[str, tuple[float, float]]  # metric -> (mean, std) over folds and seeds
    localisation_auc: float = float("nan")
    heatmaps: int = 0


@dataclass
class CohortOutcome:
    """Everything `wsi-mil run` did."""

    tiling: TilingReport
    extraction: ExtractReport
    models: list[ModelOutcome] = field(default_factory=list)
    summary_md: Path | None = None
    summary_run_id: str | None = None

    def table(self) -> pd.DataFrame:
        """One row per model: test metrics (mean +- std) and localisation AUC."""
        rows = []
        for m in self.models:
            row: dict[str, object] = {"model": m.name, "run_id": m.run_id}
            for metric in SUMMARY_METRICS:
                mean, std = m.summary.get(metric, (math.nan, math.nan))
                row[metric] = f"{mean:.3f} +- {std:.3f}"
            row["localisation_auc"] = "n/a" if math.isnan(m.localisation_auc) else f"{m.localisation_auc:.3f}"
            rows.append(row)
        return pd.DataFrame(rows)


def model_config(cfg: Config, name: str, trained: dict[str, str]) -> Config:
    """The config of one listed model; MHIM reuses a baseline trained earlier in this run."""
    cfg = cfg.for_model(name)
    if name == "mhim" and cfg.model.mhim.baseline_run is None and cfg.model.mhim.student in trained:
        cfg = cfg.with_overrides({"model.mhim.baseline_run": trained[cfg.model.mhim.student]})
    return cfg


def _summary_of(tracker: Tracker, run_id: str) -> dict[str, tuple[float, float]]:
    run = tracker.get_run(run_id)
    return {m: (run.metric(f"test/{m}_mean"), run.metric(f"test/{m}_std")) for m in SUMMARY_METRICS}


def train_models(out: Path, cfg: Config, *, heatmaps: bool = True) -> list[ModelOutcome]:
    """Train (or reuse) each model of ``cfg.run.models`` and draw its test-slide heatmaps.

    With ``compute.scheduler`` every model's folds are trained as tasks on that Dask cluster at once
    (:mod:`wsi_mil.mil.distributed`), then heatmaps are drawn model by model.
    """
    if cfg.compute.scheduler:
        return _train_models_on_cluster(out, cfg, heatmaps=heatmaps)
    features_dir = resolve_features_dir(out, cfg)
    tracker = open_tracker(out, cfg)
    trained: dict[str, str] = {}
    outcomes = []
    for name in cfg.run.models:
        mcfg = model_config(cfg, name, trained)
        key = workflow_key(mcfg, features_dir)
        run_id = finished_run(tracker, mcfg, key)
        reused = run_id is not None
        if run_id is None:
            log.info("training %s", name)
            run_id = train_cohort(out, mcfg).parent_run_id
        trained[name] = run_id
        outcomes.append(_model_outcome(out, tracker, name, mcfg, key, run_id, reused, heatmaps))
    return outcomes


def _train_models_on_cluster(out: Path, cfg: Config, *, heatmaps: bool) -> list[ModelOutcome]:
    features_dir = resolve_features_dir(out, cfg)
    tracker = open_tracker(out, cfg)
    trained: dict[str, str] = {}
    planned = []
    with dask_client(cfg.compute) as client:
        trainer = ClusterTrainer(out, client)
        for name in cfg.run.models:
            mcfg = model_config(cfg, name, trained)
            key = workflow_key(mcfg, features_dir)
            run_id = finished_run(tracker, mcfg, key)
            reused = run_id is not None
            if run_id is None:
                run_id = trainer.submit(mcfg)
            trained[name] = run_id
            planned.append((name, mcfg, key, run_id, reused))
        trainer.wait()
    return [_model_outcome(out, tracker, *plan, heatmaps) for plan in planned]


def _model_outcome(out: Path, tracker: Tracker, name: str, mcfg: Config, key: str, run_id: str, reused: bool,
                   heatmaps: bool) -> ModelOutcome:
    """A trained model's outcome: its summary, its heatmaps drawn unless there, its workflow tag."""
    if reused:
        log.info("%s: reusing finished MLflow run %s (same settings and bags)", name, run_id)
        if mcfg.tracking.register_as:
            register_run_model(tracker, run_id, mcfg.tracking.register_as)
    outcome = ModelOutcome(name, run_id, reused, _summary_of(tracker, run_id))
    has_maps = bool(tracker.list_artifacts(run_id, "heatmaps"))
    if heatmaps and not has_maps:
        drawn = heatmaps_for_run(run_id, out, mcfg)
        outcome.heatmaps, outcome.localisation_auc = len(drawn.slides), drawn.localisation_auc
    else:
        outcome.localisation_auc = tracker.get_run(run_id).metric("heatmap/localisation_auc")
    if not reused:  # tagged last: a run interrupted before its heatmaps is redone
        tracker.set_tags(run_id, {WORKFLOW_TAG: key})
    return outcome


def _log_summary(out: Path, cfg: Config, outcome: CohortOutcome, markdown: str) -> str:
    tracker = open_tracker(out, cfg)
    experiment = tracker.experiment(experiment_name(cfg))
    run_id = tracker.start_run(experiment, "workflow summary", tags={"wsi_mil.role": "summary"})
    # one "workflow" chart section, after the train runs' test/ and val/ sections
    metrics = {}
    for m in outcome.models:
        for metric, (mean, _) in m.summary.items():
            if not math.isnan(mean):
                metrics[f"workflow/{m.name}_{metric}_mean"] = mean
        if not math.isnan(m.localisation_auc):
            metrics[f"workflow/{m.name}_localisation_auc"] = m.localisation_auc
    tracker.log_metrics(run_id, metrics)
    tracker.set_tags(run_id, {f"wsi_mil.run.{m.name}": m.run_id for m in outcome.models})
    tracker.set_description(run_id, markdown)
    tracker.log_text(run_id, markdown, "summary.md")
    tracker.end_run(run_id)
    return run_id


def summary_markdown(outcome: CohortOutcome) -> str:
    """The workflow's summary as Markdown."""
    t, e = outcome.tiling, outcome.extraction
    lines = [
        "# wsi-mil run summary",
        "",
        f"- slides: {sum(r.status == 'done' for r in t.results)} tiled, "
        f"{sum(r.status == 'reused' for r in t.results)} reused, {len(t.failed)} failed, {t.n_patches} patches",
        f"- features: {len(e.done)} embedded, {len(e.reused)} reused, {len(e.failed)} failed",
    ]
    for r in t.failed:
        lines.append(f"  - tiling failed: {r.slide_id}: {r.error}")
    for r in e.failed:
        lines.append(f"  - embedding failed: {r.slide_id}: {r.error}")
    lines += ["", "Test-fold metrics, mean +- std over folds and seeds. instance_auc: AUC of per-patch scores",
              "(attention or instance probability) against ground-truth tumour on each test fold;",
              "localisation_auc: the same pooled over every slide's heatmap. n/a without annotations.", ""]
    lines.append(markdown_table(outcome.table()))
    return "\n".join(lines) + "\n"


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def check_cohort(slides_dir: Path, cfg: Config) -> LabelTable:
    """Labels and folds checked against the slides of ``slides_dir`` before any tiling or embedding.

    The slide ids are those the tiler's inventory finds (:func:`wsi_mil.slides.find_slides`). Labelled
    slides missing from the folder and unlabelled slide files are listed in a warning and left out; the
    folds are then made on the labelled slides present, for every seed.

    Raises
    ------
    WsiMilError
        Bad labels (e.g. spellings that differ only by case), no labelled slide in the folder, or
        folds that the labels cannot fill (:func:`wsi_mil.mil.splits.check_feasible`).
    """
    labels = load_labels(cfg.training)
    ids = [slide_id(p) for p in find_slides(Path(slides_dir), cfg.slides)]
    if ids:  # an empty folder is reported by the tiler, naming the extensions it looked for
        labels = match_slides(labels, ids, Path(slides_dir))
    make_splits(labels, cfg.training)
    return labels


def run_cohort(slides_dir: Path, labels_csv: Path, out: Path, cfg: Config) -> CohortOutcome:
    """Run every stage on ``slides_dir`` (see the module docstring).

    Parameters
    ----------
    slides_dir : Path
        Directory of whole-slide images.
    labels_csv : Path
        ``slide_id,label[,patient_id][,split]``; slides that fail to tile or embed are left out.
    out : Path
        Output directory (tiles, features, MLflow store, heatmaps, ``summary.md``).
    cfg : Config
        Every setting; ``run.models`` lists the models trained in order.

    Returns
    -------
    CohortOutcome
        The tiling and embedding reports, one :class:`ModelOutcome` per model (test metrics mean and
        std over folds and seeds, localisation AUC), the summary file and its MLflow run.

    Raises
    ------
    ConfigError
        Before any work, when a model of ``run.models`` does not fit the settings.
    WsiMilError
        When no slide can be found, no slide is left to train on, or MLflow cannot be reached.
    """
    out = Path(out)
    cfg = cfg.with_overrides({"training.labels_csv": str(Path(labels_csv).resolve()), "training.on_missing": "exclude"})
    for name in cfg.run.models:  # a model the settings do not fit fails now, not after tiling and embedding
        try:
            cfg.for_model(name)
        except ConfigError as exc:
            raise ConfigError(f"run.models lists {name}: {exc}") from None
    check_cohort(slides_dir, cfg)
    with dask_client(cfg.compute) as client:
        tiling = tile_cohort(slides_dir, out, cfg, client=client)
    extraction = extract_cohort(out, cfg)
    outcome = CohortOutcome(tiling, extraction)
    outcome.models = train_models(out, cfg)
    markdown = summary_markdown(outcome)
    outcome.summary_md = Layout(out).summary_md
    write_text_atomic(outcome.summary_md, markdown)
    outcome.summary_run_id = _log_summary(out, cfg, outcome, markdown)
    return outcome


def cli_run(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil run SLIDES_DIR --labels CSV --out OUT`."""
    outcome = run_cohort(args.slides_dir, args.labels, args.out, cfg)
    print(summary_markdown(outcome))
    print(f"summary: {outcome.summary_md}; heatmaps: {Layout(args.out).heatmaps_root}")
    return 0
