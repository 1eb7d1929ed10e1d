"""Cross-validated training on a Dask cluster: one task per (model, seed, fold).

With ``compute.scheduler`` (``--scheduler tcp://HOST:PORT``), `wsi-mil train` and `wsi-mil run` start
each model's parent run here, on the client, and submit every (seed, fold) training as a task that
runs :meth:`wsi_mil.mil.cv._FoldRunner.run` on a worker: the worker reads the labels and bags from the
shared output directory, trains, and logs its nested fold run to the same MLflow tracking URI (so
``tracking.uri`` should be an MLflow server the workers reach; the embedded SQLite store works only
where every worker shares OUT's file system). Each fold run is tagged ``wsi_mil.host`` and
``wsi_mil.worker`` with the machine and the Dask worker that trained it.

- When the cluster's workers advertise a ``GPU`` resource (``dask worker ... --resources "GPU=1"``,
  one worker per GPU), every task asks for ``resources={"GPU": 1}``: one training per GPU at a time,
  and workers without one train nothing. Otherwise tasks are plain and any worker trains.
- An MHIM model whose baseline (``model.mhim.baseline_run``) is a parent run submitted in the same
  call waits, fold by fold, for that fold's baseline task only (a task dependency, no barrier).
- A parent run is summarised (tables, pooled plots, MLflow Model, registration) as soon as its own
  folds have finished.
- A fold that fails (its task raised, no worker can run it) is reported with its error; the other
  folds go on and stay logged, and the parent run ends FAILED. Like every training parent it carries
  the resume key of its settings, data and splits (:mod:`wsi_mil.mil.resume`): the same command again
  resumes it, keeps the folds that finished and trains only the others. A task is idempotent: run
  again (Dask retries a task whose worker died), it returns its fold's finished run from MLflow.

Each fold sets ``seed_everything`` from its own (seed, fold), so a fold's result does not depend on
where or in which order it ran: the metrics equal those of the local run for the same seeds (up to
floating-point differences between machines and thread counts).
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import distributed
import pandas as pd
import torch

from wsi_mil.compute import dask_client
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.checkpoints import CHECKPOINT, load_checkpoint
from wsi_mil.mil.cv import (
    FoldResult,
    ParentRun,
    TrainResult,
    fold_result_from_run,
    fold_runner,
    load_cohort,
    register_parent,
    start_parent,
    summarise_parent,
)
from wsi_mil.mil.resume import RESUME_TAG, resume_key
from wsi_mil.tracking import FOLD_TAG, ROLE_TAG, SEED_TAG, RunRecord, Tracker, experiment_name, open_tracker

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
HOST_TAG, WORKER_TAG = "wsi_mil.host", "wsi_mil.worker"
POLL_S = 0.5  # how often the client looks at its fold tasks and at the workers that can run them


# ------------------------------------------------------------------------------------------ worker side
@dataclass
class FoldOutcome:
    """What a fold task returns: the fold's result, its checkpoint (for the run's MLflow Model) and worker."""

    result: FoldResult
    checkpoint: dict[str, Any] | None
    worker: str


def train_fold_task(out: str, cfg: Config, parent_id: str, experiment_id: str, tags: dict[str, str],
                    seed: int, fold: int, baseline: FoldOutcome | None = None) -> FoldOutcome:
    """Dask task: train and log one (seed, fold) of the parent run ``parent_id`` on this worker.

    Parameters
    ----------
    out : str
        The output directory, on a file system this worker shares with the client.
    cfg : Config
        The model's settings (labels file and features directory as absolute paths).
    parent_id, experiment_id : str
        The MLflow parent run and its experiment, started by the client.
    tags : dict
        The parent's shared tags (model, encoder, tiling, ``wsi_mil.data_fingerprint``...).
    seed, fold : int
        Which training.
    baseline : FoldOutcome or None
        The result of this fold's baseline task; only passed so that Dask runs this task after it
        (the MHIM method loads that baseline from MLflow through ``model.mhim.baseline_run``).

    Returns
    -------
    FoldOutcome

    Raises
    ------
    WsiMilError
        When this worker does not see the same bags as the client (OUT not shared), or the fold fails.
    """
    try:
        worker = distributed.get_worker().address
    except ValueError:  # called outside a worker (tests, debugging)
        worker = "local"
    threads = torch.get_num_threads()
    if cfg.training.threads is not None:
        torch.set_num_threads(cfg.training.threads)
    try:
        data = load_cohort(Path(out), cfg)
        if data.fingerprint != tags.get("wsi_mil.data_fingerprint"):
            raise WsiMilError(f"worker {worker} sees other bags under {data.features_dir} than the client did; "
                              "the output directory must be one shared file system for the client and every worker.")
        tracker = open_tracker(Path(out), cfg)
        earlier = fold_of(tracker, parent_id, seed, fold, load_checkpoint=cfg.tracking.log_model)
        if earlier is not None:  # Dask ran this task again (its result was lost with a worker)
            return earlier
        parent = ParentRun(cfg, data, tracker, experiment_id, parent_id, tags, "", [])
        runner = fold_runner(parent, tags={HOST_TAG: socket.gethostname(), WORKER_TAG: worker})
        result = runner.run(seed, fold)
    finally:
        torch.set_num_threads(threads)
    return FoldOutcome(result, runner.checkpoints[0] if runner.checkpoints else None, worker)


# ------------------------------------------------------------------------------------------ client side
def fold_of(tracker: Tracker, parent_id: str, seed: int, fold: int, *, load_checkpoint: bool) -> FoldOutcome | None:
    """The finished fold run (seed, fold) of ``parent_id`` read back from MLflow, or None.

    Unfinished runs of that fold (a worker died while training it) are deleted: the fold trains anew.
    """
    found = None
    for run in tracker.child_runs(parent_id):
        if run.tags.get(ROLE_TAG) != "fold" or (run.tags.get(SEED_TAG), run.tags.get(FOLD_TAG)) != (str(seed), str(fold)):
            continue
        outcome = None if found is not None else _finished_fold(tracker, run, load_checkpoint)
        if outcome is not None:
            found = outcome
        elif run.status != "FINISHED":
            tracker.delete_run(run.run_id)
    return found


def _finished_fold(tracker: Tracker, run: RunRecord, need_checkpoint: bool) -> FoldOutcome | None:
    """A fold run that finished in an earlier attempt, read back from MLflow (None when it cannot be reused)."""
    m = run.metrics
    if run.status != "FINISHED" or "fit/best_epoch" not in m:
        return None
    names = tracker.list_artifacts(run.run_id)
    if "predictions.csv" not in names or (need_checkpoint and CHECKPOINT not in names):
        return None
    checkpoint = load_checkpoint(tracker, run.run_id) if need_checkpoint else None
    return FoldOutcome(fold_result_from_run(tracker, run), checkpoint, run.tags.get(WORKER_TAG, ""))


@dataclass
class _Job:
    """One model's parent run and its fold tasks."""

    parent: ParentRun
    futures: dict[tuple[int, int], distributed.Future] = field(default_factory=dict)
    done: dict[tuple[int, int], FoldOutcome] = field(default_factory=dict)
    errors: dict[tuple[int, int], str] = field(default_factory=dict)
    baseline: _Job | None = None
    result: TrainResult | None = None

    @property
    def label(self) -> str:
        return self.parent.tags.get("wsi_mil.model", self.parent.cfg.model.name)


class ClusterTrainer:
    """Submits the fold trainings of one or more models to a Dask cluster and finishes their parent runs.

    ``submit(cfg)`` for each model (in order: a baseline before the MHIM that uses it), then ``wait()``.
    """

    def __init__(self, out: Path, client: distributed.Client) -> None:
        self.out = Path(out).resolve()
        self.client = client
        self.jobs: list[_Job] = []
        self.gpu = self._gpu_workers() > 0
        self.resources = {GPU_RESOURCE: 1} if self.gpu else None

    def _gpu_workers(self) -> int:
        workers = self.client.scheduler_info(n_workers=-1).get("workers", {}).values()
        return sum(1 for w in workers if (w.get("resources") or {}).get(GPU_RESOURCE))

    def _workers(self) -> int:
        return self._gpu_workers() if self.gpu else len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def submit(self, cfg: Config, *, resume: bool = True) -> str:
        """Start (or resume) ``cfg``'s parent run and submit its unfinished folds; returns the parent run id.

        ``resume=False`` starts a new parent run although one of the same settings and data exists.
        """
        cfg = _shared_paths(cfg)
        tracker = open_tracker(self.out, cfg)
        if tracker.uri.startswith("sqlite:"):
            log.warning("training on a Dask cluster with the SQLite store in %s: every worker writes it over the "
                        "shared file system; an MLflow server (--tracking-uri http://HOST:PORT) is safer", self.out)
        data = load_cohort(self.out, cfg)
        key = resume_key(cfg, data.fingerprint, data.splits)
        earlier = tracker.find_runs(experiment_name(cfg), f"tags.`{RESUME_TAG}` = '{key}'") if resume else []
        earlier = [r for r in earlier if r.status != "RUNNING"]  # a running one is live, or stale (taken over below)
        if earlier and earlier[0].status == "FINISHED":
            log.info("%s: reusing finished MLflow run %s (same settings, labels and bags)", cfg.model.name,
                     earlier[0].run_id)
            job = _Job(ParentRun(cfg, data, tracker, earlier[0].experiment_id, earlier[0].run_id, {}, "", []))
            job.result = _finished_result(tracker, earlier[0].run_id)
            self.jobs.append(job)
            return job.parent.run_id
        parent = start_parent(self.out, cfg, resume=earlier[0].run_id if earlier else None, take_over=resume)
        job = _Job(parent)
        need_checkpoint = cfg.tracking.log_model
        if parent.resumed:
            for run in tracker.child_runs(parent.run_id):
                if run.tags.get(ROLE_TAG) != "fold":
                    continue
                outcome = _finished_fold(tracker, run, need_checkpoint)
                pair = (int(run.tags[SEED_TAG]), int(run.tags[FOLD_TAG]))
                if outcome is not None and pair in parent.pairs and pair not in job.done:
                    job.done[pair] = outcome
                else:  # killed, failed or a duplicate: trained again
                    tracker.delete_run(run.run_id)
            log.info("%s: resuming MLflow run %s, %d of %d folds already trained", cfg.model.name, parent.run_id,
                     len(job.done), len(parent.pairs))
        baseline_id = cfg.model.mhim.baseline_run if cfg.model.name == "mhim" else None
        job.baseline = next((j for j in self.jobs if baseline_id and j.parent.run_id == baseline_id), None)
        for pair in parent.pairs:
            if pair in job.done:
                continue
            dep = job.baseline.futures.get(pair) if job.baseline is not None else None
            job.futures[pair] = self.client.submit(
                train_fold_task, str(self.out), cfg, parent.run_id, parent.experiment_id, parent.tags, *pair, dep,
                resources=self.resources, pure=False, key=f"train-s{pair[0]}f{pair[1]}-{cfg.model.name}-{uuid.uuid4().hex[:8]}")
        log.info("%s: %d fold trainings submitted to the Dask cluster%s -> MLflow run %s", job.label, len(job.futures),
                 " (one GPU each)" if self.gpu else "", parent.run_id)
        self.jobs.append(job)
        return parent.run_id

    def wait(self) -> dict[str, TrainResult]:
        """Wait for every submitted fold; finish each parent run once its folds are in.

        Returns
        -------
        dict
            Parent run id -> :class:`~wsi_mil.mil.cv.TrainResult`, for every submitted model.

        Raises
        ------
        WsiMilError
            Listing each failed fold with its error, after every other fold finished and every
            parent whose folds all finished was summarised.
        """
        pending = {f: (job, pair) for job in self.jobs for pair, f in job.futures.items()}
        for job in self.jobs:
            if not job.futures and job.result is None:
                self._finish(job)
        idle_since: float | None = None
        while pending:
            done = [f for f in pending if f.done()]  # the client's event loop updates each status
            if not done:
                time.sleep(POLL_S)
            for future in done:
                job, pair = pending.pop(future)
                self._collect(job, pair, future)
                if len(job.done) + len(job.errors) == len(job.parent.pairs):
                    self._finish(job)
            if self._workers() == 0:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > self._grace():
                    kind = "with a GPU resource " if self.gpu else ""
                    for future, (job, pair) in list(pending.items()):
                        future.cancel()
                        pending.pop(future)
                        logged = fold_of(job.parent.tracker, job.parent.run_id, *pair,
                                         load_checkpoint=job.parent.cfg.tracking.log_model)
                        if logged is not None:  # it finished, but its worker died before handing the result over
                            job.done[pair] = logged
                        else:
                            job.errors[pair] = f"no Dask worker {kind}is left to train it"
                            log.error("%s seed %d fold %d failed: %s", job.label, *pair, job.errors[pair])
                        if len(job.done) + len(job.errors) == len(job.parent.pairs):
                            self._finish(job)
            else:
                idle_since = None
        failed = [f"{job.label} seed {s} fold {f}: {err}" for job in self.jobs for (s, f), err in sorted(job.errors.items())]
        if failed:
            kept = sum(len(job.done) for job in self.jobs)
            raise WsiMilError(f"{len(failed)} fold training(s) failed on the Dask cluster; {kept} finished fold(s) are "
                              "kept and the same command again trains only the failed ones:\n  " + "\n  ".join(failed))
        return {job.parent.run_id: job.result for job in self.jobs if job.result is not None}

    def _grace(self) -> float:
        return float(self.jobs[0].parent.cfg.compute.connect_timeout) if self.jobs else 30.0

    def _collect(self, job: _Job, pair: tuple[int, int], future: distributed.Future) -> None:
        if future.status == "finished":
            try:  # the result lives on the worker, which may have died since
                outcome = future.result(timeout=self._grace())
            except Exception:  # Dask reruns the task (it returns the logged fold); MLflow has it now
                outcome = fold_of(job.parent.tracker, job.parent.run_id, *pair,
                                  load_checkpoint=job.parent.cfg.tracking.log_model)
            if outcome is None:
                job.errors[pair] = "its result was lost with its worker"
                return
            job.done[pair] = outcome
            r = outcome.result
            log.info("%s seed %d fold %d on %s: best epoch %d/%d, test AUC %.4f", job.label, *pair, outcome.worker,
                     r.best_epoch, r.epochs_run, r.test_metrics.get("auc", float("nan")))
            return
        if job.baseline is not None and pair in job.baseline.errors:
            error = f"its baseline fold ({job.baseline.label}) failed"
        else:
            exc = future.exception() if future.status == "error" else None
            error = f"{exc.__class__.__name__}: {exc}" if exc is not None else f"task {future.status}"
        job.errors[pair] = error
        log.error("%s seed %d fold %d failed: %s", job.label, *pair, error)

    def _finish(self, job: _Job) -> None:
        parent = job.parent
        if job.errors:
            parent.tracker.set_tags(parent.run_id, {"wsi_mil.failed_folds": ", ".join(
                f"seed{s}-fold{f}" for s, f in sorted(job.errors))})
            parent.tracker.end_run(parent.run_id, "FAILED")
            return
        pairs = sorted(job.done)
        outcomes = [job.done[p] for p in pairs]
        checkpoints = [o.checkpoint for o in outcomes if o.checkpoint is not None]
        log_model = parent.cfg.tracking.log_model
        try:
            result = summarise_parent(parent, [o.result for o in outcomes], checkpoints if log_model else [])
        except BaseException:
            parent.tracker.end_run(parent.run_id, "FAILED")
            raise
        parent.tracker.end_run(parent.run_id, "FINISHED")
        job.result = register_parent(parent, result)


def _shared_paths(cfg: Config) -> Config:
    """``cfg`` with the labels file and features directory as absolute paths (workers resolve no cwd)."""
    overrides = {}
    if cfg.training.labels_csv:
        overrides["training.labels_csv"] = str(Path(cfg.training.labels_csv).resolve())
    if cfg.training.features_dir:
        overrides["training.features_dir"] = str(Path(cfg.training.features_dir).resolve())
    return cfg.with_overrides(overrides) if overrides else cfg


def _finished_result(tracker: Tracker, run_id: str) -> TrainResult:
    """A finished parent run's results read back from its artifacts (no fold objects)."""
    with tempfile.TemporaryDirectory(prefix="wsi-mil-reuse-") as tmp:
        per_fold = pd.read_csv(tracker.download(run_id, "per_fold.csv", Path(tmp)))
        summary = pd.read_csv(tracker.download(run_id, "summary.csv", Path(tmp))).set_index("metric")
        predictions = pd.read_csv(tracker.download(run_id, "predictions.csv", Path(tmp)), dtype={"slide_id": str})
    run = tracker.get_run(run_id)
    classes = [c for c in run.tags.get("wsi_mil.classes", "").split(",") if c]
    return TrainResult(run_id, run.experiment_id, [], summary, per_fold, predictions, classes,
                       tracker.run_model_id(run_id))


def train_on_cluster(out: Path, cfg: Config, *, force: bool = False) -> TrainResult:
    """`wsi-mil train` on the Dask cluster of ``cfg.compute.scheduler``: one task per (seed, fold).

    An earlier parent run of the same settings and data is resumed (or, finished, returned) unless ``force``.

    Raises
    ------
    WsiMilError
        When the scheduler cannot be reached, or some folds failed (each named with its error).
    """
    with dask_client(cfg.compute) as client:
        trainer = ClusterTrainer(out, client)
        run_id = trainer.submit(cfg, resume=not force)
        return trainer.wait()[run_id]

