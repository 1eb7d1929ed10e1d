"""`wsi-mil run SLIDES_DIR --labels CSV --out OUT`: the whole workflow on a slide directory.

checks before any tiling (:func:`preflight`: models fit the settings, labels and folds fit the
slide folder, encoder weights load, ground truth beside the slides found) -> inventory + tissue +
tiling -> embedding -> for each model of ``run.models``: cross-validated training (MLflow) ->
heatmaps of the test slides (+ localisation AUC where ground truth exists) -> per-slide predictions
in ``OUT/results/<model>/predictions.csv`` -> a summary (printed, ``OUT/results/summary.md``, and an
MLflow run of its own).

Every stage skips finished work: stores and bags are reused when their settings match, and a model
whose training finished before under the same settings and data is not trained again (its MLflow
run is found by the ``wsi_mil.workflow_key`` tag). Slides that fail to tile or embed are reported and
excluded from training; the run goes on. Each model has its own reuse key
(:func:`wsi_mil.workflows.train.workflow_key`): changing ``model.ins.lr`` retrains INS only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from wsi_mil.workflows.heatmap import heatmaps_for_run
from wsi_mil.workflows.results import markdown_table, mean_std, model_label, write_model_results
from wsi_mil.workflows.train import WORKFLOW_TAG, finished_run, with_truth_beside, workflow_key

from wsi_mil.annotations import find_annotation
from wsi_mil.compute import dask_client
from wsi_mil.config import Config
from wsi_mil.encoders import build_encoder
from wsi_mil.errors import ConfigError, WsiMilError
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
    predictions_csv: Path | None = None  # OUT/results/<model>/predictions.csv
    heatmaps_dir: Path | None = None  # OUT/heatmaps/<model>/<run>/
    label: str = ""  # the model as `wsi-mil runs` names it, e.g. mhim(abmil); name: as listed in run.models

    @property
    def shown(self) -> str:
        """The model's name in the summary: its label, or its ``run.models`` name without one."""
        return self.label or self.name


class StageClock:
    """Wall and CPU seconds per stage (CPU: this process's threads and its finished child processes)."""

    def __init__(self) -> None:
        self.stages: dict[str, tuple[float, float]] = {}

    @staticmethod
    def cpu() -> float:
        """CPU seconds so far: user + system, this process and its waited-for children."""
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (repeated names add up)."""
        wall, cpu = time.perf_counter(), self.cpu()
        try:
            yield
        finally:
            w, c = self.stages.get(name, (0.0, 0.0))
            self.stages[name] = (w + time.perf_counter() - wall, c + self.cpu() - cpu)

    def table(self) -> str:
        """One line per stage: wall and CPU seconds."""
        return "\n".join(f"  {name:<22} {wall:7.1f} s wall {cpu:7.1f} s CPU" for name, (wall, cpu) in self.stages.items())


@dataclass
class CohortOutcome:
    """Everything `wsi-mil run` did."""

    tiling: TilingReport
    extraction: ExtractReport
    models: list[ModelOutcome] = field(default_factory=list)
    summary_md: Path | None = None
    summary_run_id: str | None = None
    clock: StageClock | None = None

    def table(self) -> pd.DataFrame:
        """One row per model: test metrics (mean +- std) and localisation AUC."""
        rows = []
        for m in self.models:
            row: dict[str, object] = {"model": m.shown, "run_id": m.run_id}
            for metric in SUMMARY_METRICS:
                row[metric] = mean_std(*m.summary.get(metric, (math.nan, math.nan)))
            row["localisation_auc"] = "n/a" if math.isnan(m.localisation_auc) else f"{m.localisation_auc:.3f}"
            rows.append(row)
        return pd.DataFrame(rows)


def model_config(cfg: Config, name: str, trained: dict[str, str]) -> Config:
    """The config of one listed model; MHIM reuses a baseline trained earlier in this run."""
    cfg = cfg.for_model(name)
    if name == "mhim" and cfg.model.mhim.baseline_run is None and cfg.model.mhim.student in trained:
        cfg = cfg.with_overrides({"model.mhim.baseline_run": trained[cfg.model.mhim.student]})
    return cfg


def _listed_model(tracker: Tracker, cfg: Config, name: str, trained: dict[str, str],
                  features_dir: Path) -> tuple[Config, str, str | None]:
    """Model ``name`` of ``run.models``: its config, its reuse key and its finished run (None: train it)."""
    mcfg = model_config(cfg, name, trained)
    key = workflow_key(mcfg, features_dir)
    return mcfg, key, finished_run(tracker, mcfg, key)


def _summary_of(tracker: Tracker, run_id: str) -> dict[str, tuple[float, float]]:
    run = tracker.get_run(run_id)
    return {m: (run.metric(f"test/{m}_mean"), run.metric(f"test/{m}_std")) for m in SUMMARY_METRICS}


def train_models(out: Path, cfg: Config, *, heatmaps: bool = True, clock: StageClock | None = None) -> list[ModelOutcome]:
    """Train (or reuse) each model of ``cfg.run.models`` and draw its test-slide heatmaps (timed on ``clock``).

    With ``compute.scheduler`` every model's folds are trained as tasks on that Dask cluster at once
    (:mod:`wsi_mil.mil.distributed`), then heatmaps are drawn model by model.
    """
    clock = clock or StageClock()
    if cfg.compute.scheduler:
        return _train_models_on_cluster(out, cfg, heatmaps=heatmaps, clock=clock)
    features_dir = resolve_features_dir(out, cfg)
    tracker = open_tracker(out, cfg)
    trained: dict[str, str] = {}
    outcomes = []
    for name in cfg.run.models:
        mcfg, key, run_id = _listed_model(tracker, cfg, name, trained, features_dir)
        reused = run_id is not None
        if run_id is None:
            log.info("training %s", name)
            with clock(f"train {name}"):
                run_id = train_cohort(out, mcfg).parent_run_id
        trained[name] = run_id
        outcomes.append(_model_outcome(out, tracker, name, mcfg, key, run_id, reused, heatmaps, clock))
    return outcomes


def _train_models_on_cluster(out: Path, cfg: Config, *, heatmaps: bool, clock: StageClock) -> list[ModelOutcome]:
    features_dir = resolve_features_dir(out, cfg)
    tracker = open_tracker(out, cfg)
    trained: dict[str, str] = {}
    planned = []
    with clock("train on the Dask cluster"), dask_client(cfg.compute) as client:
        trainer = ClusterTrainer(out, client)
        for name in cfg.run.models:
            mcfg, key, run_id = _listed_model(tracker, cfg, name, trained, features_dir)
            reused = run_id is not None
            if run_id is None:
                run_id = trainer.submit(mcfg)
            trained[name] = run_id
            planned.append((name, mcfg, key, run_id, reused))
        trainer.wait()
    return [_model_outcome(out, tracker, *plan, heatmaps, clock) for plan in planned]


def _model_outcome(out: Path, tracker: Tracker, name: str, mcfg: Config, key: str, run_id: str, reused: bool,
                   heatmaps: bool, clock: StageClock) -> ModelOutcome:
    """A trained model's outcome: its summary, its heatmaps drawn unless there, its workflow tag, its results."""
    if reused:
        log.info("%s: reusing finished MLflow run %s (same settings and bags)", name, run_id)
        if mcfg.tracking.register_as:
            register_run_model(tracker, run_id, mcfg.tracking.register_as)
    outcome = ModelOutcome(name, run_id, reused, _summary_of(tracker, run_id))
    has_maps = bool(tracker.list_artifacts(run_id, "heatmaps"))
    if heatmaps and not has_maps:
        with clock(f"heatmaps {name}"):
            drawn = heatmaps_for_run(run_id, out, mcfg)
        outcome.heatmaps, outcome.localisation_auc = len(drawn.slides), drawn.localisation_auc
    else:
        outcome.localisation_auc = tracker.get_run(run_id).metric("heatmap/localisation_auc")
    if not reused:  # tagged last: a run interrupted before its heatmaps is redone
        tracker.set_tags(run_id, {WORKFLOW_TAG: key})
    outcome.predictions_csv = write_model_results(out, tracker, run_id)
    outcome.label = model_label(tracker.get_run(run_id))  # as `wsi-mil runs` and results/summary.md name it
    outcome.heatmaps_dir = Layout(out).heatmaps_dir(run_id, outcome.label)
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
    files = [m for m in outcome.models if m.predictions_csv is not None]
    if files:
        lines += ["", "Per-slide test predictions (slide, patient, label, fold, seed, probability, predicted class, "
                  "threshold, run id) and heatmaps:", ""]
        for m in files:
            lines.append(f"- {m.shown}: `{m.predictions_csv}`, `{m.heatmaps_dir}/`")
    return "\n".join(lines) + "\n"


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


def check_encoder(cfg: Config) -> None:
    """The encoder and its weights load (pretrained: from the cache or a download; a file: it fits).

    Raises
    ------
    WsiMilError
        One sentence with the ``--weights`` choices, e.g. offline without cached pretrained weights.
    """
    if cfg.features.weights == "random":
        return
    try:
        build_encoder(cfg.features)
    except WsiMilError as exc:
        raise WsiMilError(f"nothing was tiled: {exc}") from None


def preflight(slides_dir: Path, cfg: Config) -> Config:
    """Every check `wsi-mil run` makes before any tiling; returns the config to run with.

    In order: each model of ``run.models`` fits the settings; labels and folds fit the slide folder
    (:func:`check_cohort`); the encoder's weights load (:func:`check_encoder`); ground truth: when
    ``training.annotations_dir`` is not set, a truth folder beside the slides (:func:`with_truth_beside`)
    is used and said so; when it is set but annotates none of the slides, a warning says so.

    Raises
    ------
    ConfigError
        A model of ``run.models`` does not fit the settings.
    WsiMilError
        Bad labels, infeasible folds, encoder weights that cannot be loaded.
    """
    for name in cfg.run.models:  # a model the settings do not fit fails now, not after tiling and embedding
        try:
            cfg.for_model(name)
        except ConfigError as exc:
            raise ConfigError(f"run.models lists {name}: {exc}") from None
    labels = check_cohort(slides_dir, cfg)
    check_encoder(cfg)
    ids = list(labels.df["slide_id"])
    if cfg.training.annotations_dir is None:
        cfg = with_truth_beside(cfg, Path(slides_dir), ids) or cfg
    elif not any(find_annotation(Path(cfg.training.annotations_dir), sid) for sid in ids):
        log.warning("training.annotations_dir %s annotates none of the %d slides (looked for <slide id>.geojson, "
                    "_tumour.png, .xml...): instance metrics will be n/a", cfg.training.annotations_dir, len(ids))
    return cfg


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
        Before any work (:func:`preflight`): bad labels, infeasible folds, encoder weights that cannot
        be loaded. Later: when no slide can be found, no slide is left to train on, or MLflow cannot be reached.
    """
    out = Path(out)
    cfg = cfg.with_overrides({"training.labels_csv": str(Path(labels_csv).resolve()), "training.on_missing": "exclude"})
    clock = StageClock()
    with clock("checks"):
        cfg = preflight(slides_dir, cfg)
    with clock("tiling"), dask_client(cfg.compute) as client:
        tiling = tile_cohort(slides_dir, out, cfg, client=client)
    with clock("embedding"):
        extraction = extract_cohort(out, cfg)
    outcome = CohortOutcome(tiling, extraction, clock=clock)
    outcome.models = train_models(out, cfg, clock=clock)
    markdown = summary_markdown(outcome)
    outcome.summary_md = Layout(out).summary_md
    write_text_atomic(outcome.summary_md, markdown)
    outcome.summary_run_id = _log_summary(out, cfg, outcome, markdown)
    return outcome


def cli_run(args: argparse.Namespace, cfg: Config) -> int:
    """`wsi-mil run SLIDES_DIR --labels CSV --out OUT`."""
    outcome = run_cohort(args.slides_dir, args.labels, args.out, cfg)
    print(summary_markdown(outcome))
    if outcome.clock is not None:
        print("Where the time went:\n" + outcome.clock.table())
    print(f"summary: {outcome.summary_md}; heatmaps: {Layout(args.out).heatmaps_root}")
    failed = len(outcome.tiling.failed) + len(outcome.extraction.failed)
    if failed:  # like `tile` and `extract`: scripts see that the cohort is not complete
        print(f"{failed} slide(s) failed and were left out; their errors are in {Layout(args.out).slides_csv} and "
              "the summary above.", file=sys.stderr)
        return 1
    return 0
