"""MLflow tracking: the one module of wsi-mil that imports ``mlflow``.

Layout of a ``wsi-mil train`` command in MLflow:

- experiment: ``tracking.experiment`` or the labels file's stem (one per cohort/task);
- parent run (tag ``wsi_mil.role=cv``): params = the whole flattened config; tags = model, encoder,
  tiling key, data fingerprint, code version; artifacts ``config.yaml``, ``splits.csv``, ``labels.csv``,
  ``predictions.csv`` (all folds), ``summary.csv``, ``per_fold.csv``, pooled ROC/confusion plots;
  metrics ``test_<metric>_mean`` / ``_std``;
- one nested run per (seed, fold) (tags ``wsi_mil.role=fold``, ``wsi_mil.fold``, ``wsi_mil.seed``,
  ``mlflow.parentRunId``): per-epoch metrics (``train_loss``, ``val_auc``, ``val_loss``, ``train_lr``
  and whatever the method reports), final ``test_*`` metrics with ``_ci_low``/``_ci_high``,
  artifacts ``checkpoint.pt``, ``config.yaml``, ``split.csv``, ``predictions.csv``,
  ``val_predictions.csv``, ``roc.png``, ``confusion_matrix.png``, ``training_curves.png``.

Embedded default: a SQLite store ``OUT/mlflow.db`` with artifacts under ``OUT/mlartifacts/``; any
other URI (``http://host:5000``) is used as given. Telemetry is switched off before import.
Credentials stay in the process: params, tags, text artifacts and the error messages of this module
go through :func:`wsi_mil.redaction.redact` (``http://user:***@host``).

This module stores and reads runs, params, metrics, tags and artifact files; it knows nothing of
models. Checkpoints are written and rebuilt by :mod:`wsi_mil.mil.checkpoints`. A run id that the
store does not hold and a store that cannot be reached give different errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from wsi_mil import __version__
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout
from wsi_mil.redaction import redact

log = logging.getLogger(__name__)

PARAM_MAX = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow accepts at most 100 params per batch
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's codes for an unknown run id
ROLE_TAG, FOLD_TAG, SEED_TAG, PARENT_TAG = "wsi_mil.role", "wsi_mil.fold", "wsi_mil.seed", "mlflow.parentRunId"


def quiet_mlflow() -> None:
    """No telemetry or network calls, no chatty INFO logs from MLflow, alembic or git, no printed run URLs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <tracking URI>" for every run it ends, password included
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for name in ("mlflow", "alembic", "sqlalchemy", "git", "urllib3"):
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING or logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


def _client(uri: str):
    quiet_mlflow()
    from mlflow import MlflowClient

    quiet_mlflow()  # mlflow sets its own logger levels on import
    return MlflowClient(tracking_uri=uri)


def default_uri(out: Path, cfg: Config) -> str:
    """``tracking.uri`` or the SQLite store inside ``out``."""
    return cfg.tracking.uri or Layout(out).tracking_uri


def experiment_name(cfg: Config) -> str:
    """``tracking.experiment`` or one derived from the labels file (``<dir>_labels`` for a plain ``labels.csv``)."""
    if cfg.tracking.experiment:
        return cfg.tracking.experiment
    path = cfg.training.labels_csv
    if path is None:
        return "wsi-mil"
    path = Path(path)
    if path.stem.lower() in {"labels", "label", "slides"} and path.parent.name:
        return f"{path.parent.name}_{path.stem}"
    return path.stem


def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


@dataclass
class RunRecord:
    """A run read back from MLflow."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def parent_id(self) -> str | None:
        """The run this one is nested under, if any."""
        return self.tags.get(PARENT_TAG)


@dataclass
class FoldRun:
    """One fold's nested run (its test slides are in the parent run's ``splits.csv``)."""

    run_id: str
    fold: int
    seed: int


def _short(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    text = text.splitlines()[0][:300] if text else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class Tracker:
    """A thin, explicit wrapper over ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, uri: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.artifact_root = Path(artifact_root) if artifact_root is not None else None
        self.client = _client(uri)

    @property
    def shown_uri(self) -> str:
        """The tracking URI as logs and messages show it (password masked)."""
        return redact(self.uri)

    def _unreachable(self, exc: BaseException, what: str) -> WsiMilError:
        return WsiMilError(f"MLflow at {self.shown_uri} failed while {what} ({_short(exc)}); check that the tracking "
                           "server is running and reachable (--tracking-uri) or that the store is readable.")

    @contextlib.contextmanager
    def _reading_run(self, run_id: str, what: str, missing: str = "") -> Iterator[None]:
        """Turn MLflow errors into one sentence: an unknown run id (or ``missing``), or a store that failed."""
        try:
            yield
        except WsiMilError:
            raise
        except Exception as exc:
            if getattr(exc, "error_code", None) in NOT_FOUND_CODES:
                raise WsiMilError(missing or f"MLflow run {run_id} not found in {self.shown_uri}; check the run id and "
                                  "--out / --tracking-uri.") from None
            raise self._unreachable(exc, what) from None

    # ---------------------------------------------------------------------------------- writing
    def experiment(self, name: str) -> str:
        """Id of the experiment ``name``, created (with a local artifact location if any) when missing."""
        try:
            found = self.client.get_experiment_by_name(name)
        except Exception as exc:
            raise self._unreachable(exc, f"looking up experiment {name!r}") from None
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return found.experiment_id
        location = None
        if self.artifact_root is not None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "experiment"
            location = (self.artifact_root / slug).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created concurrently by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, experiment_id: str, name: str, *, parent_id: str | None = None,
                  tags: dict[str, Any] | None = None) -> str:
        """Create a run (nested under ``parent_id`` when given); returns its id."""
        all_tags = {k: redact(v) for k, v in (tags or {}).items()}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(experiment_id, tags=all_tags, run_name=redact(name)).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED / FAILED / KILLED."""
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params in batches (values as redacted strings, cut to MLflow's 6000-character limit)."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[start:start + BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics in one batch (NaN/inf values are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set several tags (values redacted)."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(str(k), redact(v)[:PARAM_MAX]) for k, v in tags.items()],
                              synchronous=True)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory into the run's artifacts (under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store a text artifact (redacted: ``config.yaml`` holds the tracking URI)."""
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_dataframe(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        """Store a DataFrame as a CSV artifact."""
        self.client.log_text(run_id, frame.to_csv(index=False), artifact_file)

    # ---------------------------------------------------------------------------------- reading
    def get_run(self, run_id: str) -> RunRecord:
        """A run's params, metrics and tags.

        Raises
        ------
        WsiMilError
            When the store holds no such run, or when the store cannot be reached or read (two
            different messages).
        """
        with self._reading_run(run_id, f"reading run {run_id}"):
            run = self.client.get_run(run_id)
        return _record(run)

    def find_runs(self, experiment: str | None = None, filter_string: str = "", *,
                  role: str | None = "cv") -> list[RunRecord]:
        """Runs of one experiment (or all), newest first; ``role='cv'`` keeps parent runs only."""
        try:
            if experiment is not None:
                exp = self.client.get_experiment_by_name(experiment)
                ids = [exp.experiment_id] if exp is not None else []
            else:
                ids = [e.experiment_id for e in self.client.search_experiments()]
            if not ids:
                return []
            filters = [f for f in (filter_string, f"tags.`{ROLE_TAG}` = '{role}'" if role else "") if f]
            runs = self.client.search_runs(ids, " and ".join(filters), order_by=["attributes.start_time DESC"])
        except Exception as exc:
            raise self._unreachable(exc, "searching runs") from None
        return [_record(r) for r in runs]

    def child_runs(self, parent_id: str) -> list[RunRecord]:
        """Runs nested under ``parent_id``."""
        parent = self.get_run(parent_id)
        runs = self.client.search_runs([parent.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=5000)
        return [_record(r) for r in runs]

    def fold_runs(self, run_id: str) -> list[FoldRun]:
        """Fold runs of a parent run (or the run itself when it is a fold run), by seed and fold."""
        run = self.get_run(run_id)
        if run.tags.get(ROLE_TAG) == "fold":
            records = [run]
        else:
            records = [r for r in self.child_runs(run_id) if r.tags.get(ROLE_TAG) == "fold"]
        if not records:
            raise WsiMilError(f"MLflow run {run_id} has no fold runs; pass the id of a `wsi-mil train` run.")
        out = [FoldRun(r.run_id, int(r.tags[FOLD_TAG]), int(r.tags[SEED_TAG])) for r in records]
        return sorted(out, key=lambda f: (f.seed, f.fold))

    def parent_of(self, run_id: str) -> str:
        """The cross-validation parent of a fold run; any other run is its own parent."""
        run = self.get_run(run_id)
        return run.parent_id if run.tags.get(ROLE_TAG) == "fold" and run.parent_id else run_id

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths of a run (recursively)."""
        out: list[str] = []
        with self._reading_run(run_id, f"listing the artifacts of run {run_id}"):
            infos = self.client.list_artifacts(run_id, path)
        for info in infos:
            if info.is_dir:
                out.extend(self.list_artifacts(run_id, info.path))
            else:
                out.append(info.path)
        return out

    def download(self, run_id: str, artifact_path: str, dst: Path) -> Path:
        """Download one artifact (file or directory) into the directory ``dst``; returns its local path.

        Raises
        ------
        WsiMilError
            When the run has no such artifact, or when the store cannot be reached or read.
        """
        missing = f"MLflow run {run_id} in {self.shown_uri} has no artifact '{artifact_path}' (or no such run)."
        with self._reading_run(run_id, f"downloading {artifact_path} of run {run_id}", missing):
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def read_text(self, run_id: str, artifact_file: str) -> str:
        """The text of one artifact file (e.g. ``config.yaml``, ``splits.csv``)."""
        with tempfile.TemporaryDirectory(prefix="wsi-mil-artifact-") as tmp:
            return self.download(run_id, artifact_file, Path(tmp)).read_text()

    def load_config(self, run_id: str) -> Config:
        """The resolved config a run was trained with (its ``config.yaml`` artifact)."""
        text = self.read_text(run_id, "config.yaml")
        try:
            return Config.model_validate(yaml.safe_load(text) or {})
        except Exception as exc:
            raise WsiMilError(f"MLflow run {run_id}: its config.yaml no longer validates ({exc}).") from None

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of one metric."""
        return [(m.step, m.value) for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return redact(text)[:PARAM_MAX]


def _record(run: Any) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, run.info.experiment_id,
                     dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))


def open_tracker(out: Path, cfg: Config) -> Tracker:
    """The tracker for ``cfg.tracking.uri`` or the embedded SQLite store of ``out``."""
    uri = default_uri(out, cfg)
    layout = Layout(out)
    if uri == layout.tracking_uri:
        layout.root.mkdir(parents=True, exist_ok=True)
    return Tracker(uri, layout.mlflow_artifacts if _is_local(uri) else None)


@contextlib.contextmanager
def run_guard(tracker: Tracker, run_id: str):
    """End ``run_id`` as FINISHED on success, FAILED (or KILLED on Ctrl-C) on error."""
    try:
        yield run_id
    except KeyboardInterrupt:
        tracker.end_run(run_id, "KILLED")
        raise
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    else:
        tracker.end_run(run_id, "FINISHED")
