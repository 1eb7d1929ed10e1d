"""MLflow tracking: the one module of wsi-mil that imports ``mlflow``.

Layout of a ``wsi-mil train`` command in MLflow. Metric names carry ``/`` prefixes: the MLflow UI
draws one chart section per prefix (the part before the last ``/``) and names each chart by the rest.

- experiment: ``tracking.experiment`` or the labels file's stem (one per cohort/task);
- parent run (tag ``wsi_mil.role=cv``): params = the whole flattened config; tags = model, encoder,
  tiling key, data fingerprint, code version; a description (MLflow's note: cohort, model, folds x
  seeds, the test metrics table); the labels as a dataset input; artifacts ``config.yaml``,
  ``splits.csv``, ``labels.csv``, ``predictions.csv`` (all folds, also as the MLflow table
  ``predictions.json``), ``summary.csv``, ``per_fold.csv``, pooled ROC/confusion plots; metrics
  ``test/<metric>_mean`` / ``_std``, ``fit/val_auc_mean``, later ``evaluate/test_<metric>_mean`` and
  ``heatmap/localisation_auc``; the MLflow Model ``model`` (pyfunc, ``runs:/<run>/model``), optionally
  registered;
- one nested run per (seed, fold) (tags ``wsi_mil.role=fold``, ``wsi_mil.fold``, ``wsi_mil.seed``,
  ``mlflow.parentRunId``): per-epoch curves ``train/loss``, ``train/lr`` (and ``train/<what the method
  reports>``), ``val/auc``, ``val/loss``; MHIM's baseline under ``baseline/``; single values (step 0)
  ``fit/best_epoch``, ``fit/epochs_run``, ``fit/stopped_early``, ``fit/threshold``, ``fit/val_<metric>``
  and ``test/<metric>`` with ``_ci_low``/``_ci_high``; a description (split counts, best epoch); artifacts
  ``checkpoint.pt``, ``config.yaml``, ``split.csv``, ``predictions.csv``, ``val_predictions.csv``,
  ``roc.png``, ``confusion_matrix.png``, ``training_curves.png``.

Embedded default: a SQLite store ``OUT/mlflow.db`` with artifacts under ``OUT/mlartifacts/``; any
other URI (``http://host:5000``) is used as given. Telemetry is switched off before import.
Credentials stay in the process: params, tags, text artifacts and the error messages of this module
go through :func:`wsi_mil.redaction.redact` (``http://user:***@host``).

This module stores and reads runs, params, metrics, tags, artifact files, datasets and MLflow Models;
it knows nothing of MIL. A logged model is a pyfunc whose code is the installed ``wsi_mil`` package:
:func:`pyfunc_model` wraps a *predictor* that a caller-named loader builds from the model's artifact
files (:mod:`wsi_mil.mil.ensemble` supplies it). Checkpoints are written and rebuilt by
:mod:`wsi_mil.mil.checkpoints`. A run id that the store does not hold and a store that cannot be
reached give different errors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import yaml
from filelock import FileLock
from filelock import Timeout as LockTimeout

from wsi_mil import __version__
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError, resource_error, resource_problem
from wsi_mil.layout import Layout
from wsi_mil.redaction import redact

log = logging.getLogger(__name__)

PARAM_MAX = 6000  # MLflow's limit on a param value
TAG_MAX = 8000  # MLflow's limit on a run tag's value
BATCH = 100  # MLflow accepts at most 100 params per batch
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's codes for an unknown run id
ROLE_TAG, FOLD_TAG, SEED_TAG, PARENT_TAG = "wsi_mil.role", "wsi_mil.fold", "wsi_mil.seed", "mlflow.parentRunId"
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the MLflow UI shows and edits
MODEL_NAME = "model"  # the MLflow Model of a train parent run: runs:/<run>/model


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


LOCK_WAIT_S = 600.0  # longest wait for another process creating or migrating the same SQLite store
LOCKED_DELAYS = tuple(min(0.05 * 2 ** i, 5.0) for i in range(14))  # back-off on "database is locked" (~40 s in all)


def _client(uri: str):
    quiet_mlflow()
    from mlflow import MlflowClient

    quiet_mlflow()  # mlflow sets its own logger levels on import
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for any other URI)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def _is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is SQLite's "database is locked" (another writer holds the file)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).lower()
        if "database is locked" in text or "database table is locked" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_locked(call: Callable[[], Any], what: str, delays: tuple[float, ...] = LOCKED_DELAYS) -> Any:
    """Run ``call``; on SQLite's "database is locked" retry with growing pauses (``delays``, seconds).

    Raises
    ------
    WsiMilError
        When the database stayed locked through every retry (the message says so and what to do).
    """
    for pause in (*delays, None):
        try:
            return call()
        except Exception as exc:
            if not _is_locked(exc):
                raise
            if pause is None:
                raise WsiMilError(f"the MLflow store stayed locked by another process for {sum(delays):.0f} s while "
                                  f"{what}; wait for the other wsi-mil command to finish, or let several commands "
                                  "share a tracking server (--tracking-uri http://...).") from None
            time.sleep(pause * (0.5 + np.random.random()))  # jitter: processes that collided do not collide again
    raise AssertionError("unreachable")


class _RetryingClient:
    """An ``MlflowClient`` whose public calls retry while SQLite says "database is locked"."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_locked(lambda: attr(*args, **kwargs), f"calling {name}")

        return call


def _store_has_runs(db: Path) -> bool:
    """Whether the SQLite file holds any run (a store without runs can be set aside and made again)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
            return bool(con.execute("SELECT count(*) FROM runs").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        return "no such table" not in str(exc)  # unreadable: assume it holds something worth keeping


def _forget_engines(uri: str) -> None:
    """Drop MLflow's cached SQLAlchemy engines of ``uri`` (their pooled connections hold the old file open)."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

    for cls in (TrackingStore, RegistryStore):
        engine = getattr(cls, "_engine_map", {}).pop(uri, None)
        if engine is not None:
            engine.dispose()


def _open_sqlite_client(uri: str, db: Path) -> Any:
    """Create (or open) the SQLite store ``db`` with its schema under an inter-process file lock.

    MLflow creates and migrates the schema when a client first opens a store; two processes doing it at
    once race (half-migrated tables). The lock ``<db>.lock`` lets one process set the store up while the
    others wait. A store left broken by an interrupted set-up and holding no run is set aside
    (``<db>.broken-<time>``) and made again; a broken store that holds runs gets one sentence with the fix.
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(f"{db}.lock", timeout=LOCK_WAIT_S)
    try:
        with lock:
            for attempt in (1, 2):
                try:
                    def init() -> Any:
                        client = _client(uri)
                        client.search_registered_models(max_results=1)  # the registry's half of the store
                        return client
                    return retry_locked(init, f"opening {db}")
                except WsiMilError:
                    raise
                except Exception as exc:
                    if resource_problem(exc) is not None:
                        raise resource_error(exc, db, "no run was started; a store left half-created holds no run "
                                             "and is set aside and made again") from None
                    if attempt == 1 and db.exists() and not _store_has_runs(db):
                        aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
                        _forget_engines(uri)
                        os.replace(db, aside)
                        log.warning("the MLflow store %s was left half-created (%s); it held no run, so it was moved "
                                    "to %s and made again", db, _short(exc), aside.name)
                        continue
                    raise WsiMilError(
                        f"the MLflow store {db} is damaged or half-migrated ({_short(exc)}); move it aside "
                        f"(mv {db} {db}.broken) to start a new store, or upgrade it with `mlflow db upgrade "
                        f"{redact(uri)}` after a backup.") from None
    except LockTimeout:
        raise WsiMilError(f"another process has held {db}.lock for over {LOCK_WAIT_S:.0f} s while setting up the "
                          "MLflow store; if no wsi-mil command is running, delete that lock file.") from None
    raise AssertionError("unreachable")


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
    start_time: int | None = None  # ms since the epoch

    @property
    def parent_id(self) -> str | None:
        """The run this one is nested under, if any."""
        return self.tags.get(PARENT_TAG)

    def metric(self, key: str, default: float = math.nan) -> float:
        """The latest value of metric ``key`` (e.g. ``test/auc_mean``), or ``default``.

        Runs logged before metric names carried ``/`` prefixes (``test_auc_mean``) are read too.
        """
        if key in self.metrics:
            return self.metrics[key]
        return self.metrics.get(key.replace("/", "_"), default)


@dataclass
class FoldRun:
    """One fold's nested run (its test slides are in the parent run's ``splits.csv``)."""

    run_id: str
    fold: int
    seed: int


@dataclass
class LoadedModel:
    """An MLflow Model logged by wsi-mil, loaded: the predictor its loader built, and where it came from."""

    uri: str
    predictor: Any
    run_id: str | None  # the run that logged it


@dataclass
class ModelVersion:
    """One version of a registered model."""

    name: str
    version: int
    run_id: str | None
    tags: dict[str, str]


class Predictor(Protocol):
    """What a pyfunc model's loader returns (see :func:`pyfunc_model`)."""

    def predict_pyfunc(self, features: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """The model's answer for one input (params as the signature declares them)."""


def _short(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    text = text.splitlines()[0][:300] if text else ""
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class Tracker:
    """A thin, explicit wrapper over ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, uri: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.artifact_root = Path(artifact_root) if artifact_root is not None else None
        db = sqlite_path(uri)
        client = _open_sqlite_client(uri, db) if db is not None else _client(uri)
        self.client = _RetryingClient(client) if db is not None else client

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

    @contextlib.contextmanager
    def _as_global_uri(self) -> Iterator[None]:
        """Make this store MLflow's global tracking (and default registry) URI for a while.

        Some MLflow code paths (the SQL registry finding a logged model, resolving ``models:/`` and
        ``runs:/`` URIs) read the global URI whatever the client says; the previous one is restored.
        """
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(self.uri):
            yield

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

    def reopen_run(self, run_id: str) -> None:
        """Mark an ended run RUNNING again (a resumed training adds to it)."""
        self.client.update_run(run_id, status="RUNNING")

    def delete_run(self, run_id: str) -> None:
        """Delete a run (MLflow's soft delete: searches and :meth:`fold_runs` no longer see it)."""
        self.client.delete_run(run_id)

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

    def log_table(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        """Store a DataFrame as an MLflow table (``artifact_file`` ends with ``.json``; the UI shows it as a table)."""
        clean = frame.astype(object).where(frame.notna(), None)  # JSON has no NaN
        self.client.log_table(run_id, clean, artifact_file)

    def set_description(self, run_id: str, markdown: str) -> None:
        """Set the run's description (MLflow's note, Markdown), cut to MLflow's tag length."""
        if len(markdown) > TAG_MAX:
            markdown = markdown[: TAG_MAX - 40].rsplit("\n", 1)[0] + "\n\n(cut to MLflow's 8000 characters)"
        self.client.set_tag(run_id, DESCRIPTION_TAG, markdown)

    def log_dataset(self, run_id: str, frame: pd.DataFrame, *, name: str, source: str, targets: str | None = None,
                    context: str = "training") -> None:
        """Record ``frame`` (e.g. the labels table) as the run's dataset input (the UI's *Dataset* column).

        MLflow stores the table's schema, profile and digest, not the rows; ``source`` says where it
        came from (a file path or URI).
        """
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        quiet_mlflow()
        with warnings.catch_warnings():  # hints on source kinds and integer columns, for model signatures
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, name=name, targets=targets)
            entity = dataset._to_mlflow_entity()  # what mlflow.log_input logs, without the global active run
        self.client.log_inputs(run_id, [DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])])

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
            # a fold run killed or failed before it finished was trained again when the training resumed
            records = [r for r in self.child_runs(run_id) if r.tags.get(ROLE_TAG) == "fold"
                       and r.status not in ("KILLED", "FAILED")]
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

    # ---------------------------------------------------------------------------------- models
    def log_pyfunc_model(self, run_id: str, *, loader: Callable[[dict[str, str]], Predictor],
                         artifacts: dict[str, Path], input_example: np.ndarray, output_example: np.ndarray,
                         params: dict[str, Any], metadata: dict[str, Any], tags: dict[str, Any] | None = None,
                         metrics: dict[str, float] | None = None, name: str = MODEL_NAME) -> str:
        """Log an MLflow Model (pyfunc flavour) as an output of ``run_id``; returns its model id.

        The model is *models-from-code*: its code file imports :func:`pyfunc_model` and ``loader`` from
        the installed ``wsi_mil`` package (nothing is pickled), and ``loader(artifacts)`` builds the
        predictor from the model's copies of the ``artifacts`` files when MLflow loads it. It loads as
        ``runs:/<run_id>/<name>`` or ``models:/<model id>``.

        Parameters
        ----------
        run_id : str
            The run that produced the model.
        loader : callable
            A module-level function or class method of ``wsi_mil`` taking ``{artifact name: local path}``
            and returning a :class:`Predictor`.
        artifacts : dict of str to Path
            Files copied into the model (name -> file).
        input_example, output_example : numpy.ndarray
            Shapes and dtypes of one input and one output; the signature is inferred from them (the
            first input axis becomes variable).
        params : dict
            The inference parameters and their defaults (part of the signature).
        metadata : dict
            Plain values stored in the model's ``MLmodel`` file.
        tags : dict, optional
            Tags of the logged model.
        metrics : dict, optional
            Metrics logged on the run linked to the model (the UI's model page lists them).
        name : str
            The model's name within the run.

        Returns
        -------
        str
            The logged model's id.

        Raises
        ------
        WsiMilError
            When the store cannot be written.
        """
        with warnings.catch_warnings():  # MLflow's import-time hints on schemas of its own chat types
            warnings.simplefilter("ignore", UserWarning)
            import mlflow.pyfunc
            from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
            from mlflow.models import Model, infer_signature

        experiment_id = self.get_run(run_id).experiment_id
        signature = infer_signature(input_example, output_example, params=params)
        try:
            model = self.client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type="wsi-mil",
                                                    tags={k: str(v) for k, v in (tags or {}).items()})
        except Exception as exc:
            raise self._unreachable(exc, f"creating the model of run {run_id}") from None
        try:
            with tempfile.TemporaryDirectory(prefix="wsi-mil-model-") as tmp:
                code = Path(tmp) / "wsi_mil_model.py"
                code.write_text(_model_code(loader))
                local = Path(tmp) / "model"
                mlmodel = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                model_id=model.model_id)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "no input example": the signature says it all
                    mlflow.pyfunc.save_model(str(local), python_model=str(code), mlflow_model=mlmodel,
                                             artifacts={k: str(v) for k, v in artifacts.items()}, signature=signature,
                                             pip_requirements=[f"wsi-mil=={__version__}"], metadata=metadata)
                self.client.log_model_artifacts(model.model_id, str(local))
            self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
            now = int(time.time() * 1000)
            linked = [Metric(k, float(v), now, 0, model_id=model.model_id) for k, v in (metrics or {}).items()
                      if v is not None and math.isfinite(float(v))]
            if linked:
                self.client.log_batch(run_id, metrics=linked, synchronous=True)
        except BaseException:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model.model_id

    def run_model_id(self, run_id: str, name: str = MODEL_NAME) -> str | None:
        """The id of the model ``name`` that ``run_id`` logged, or None."""
        with self._reading_run(run_id, f"reading run {run_id}"):
            outputs = self.client.get_run(run_id).outputs
            for output in (outputs.model_outputs if outputs is not None else []):
                model = self.client.get_logged_model(output.model_id)
                if model.name == name and str(model.status) == "READY":
                    return model.model_id
        return None

    def register_model(self, name: str, model_id: str, *, run_id: str, tags: dict[str, Any] | None = None,
                       description: str | None = None) -> int:
        """Register a logged model as a new version of ``name`` (created when missing); returns the version.

        Raises
        ------
        WsiMilError
            When the registry cannot be written.
        """
        from mlflow.exceptions import MlflowException

        try:
            with self._as_global_uri():
                try:
                    self.client.create_registered_model(name)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                version = self.client.create_model_version(
                    name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id, description=description,
                    tags={k: str(v) for k, v in (tags or {}).items()})
        except Exception as exc:
            raise self._unreachable(exc, f"registering model {name!r}") from None
        return int(version.version)

    def model_versions(self, name: str) -> list[ModelVersion]:
        """Every version of the registered model ``name``, oldest first (none when it is not registered)."""
        quoted = name.replace("'", "\\'")
        try:
            found = self.client.search_model_versions(f"name = '{quoted}'")
        except Exception as exc:
            raise self._unreachable(exc, f"searching versions of model {name!r}") from None
        out = [ModelVersion(v.name, int(v.version), v.run_id or None, dict(v.tags)) for v in found]
        return sorted(out, key=lambda v: v.version)

    def load_model(self, uri: str) -> LoadedModel:
        """Load an MLflow Model that wsi-mil logged, from this store.

        Parameters
        ----------
        uri : str
            ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/RUN_ID/model`` or ``models:/MODEL_ID``.

        Returns
        -------
        LoadedModel
            The predictor built by the model's loader and the run that logged the model.

        Raises
        ------
        WsiMilError
            When the store holds no such model, the model is not one wsi-mil logged or does not load,
            or the store cannot be reached.
        """
        import mlflow.artifacts
        import mlflow.pyfunc

        missing = (f"MLflow model {uri} not found in {self.uri}; give models:/NAME/VERSION, models:/NAME@ALIAS or "
                   "runs:/RUN_ID/model of a `wsi-mil train` run (and --out / --tracking-uri of its store).")
        with tempfile.TemporaryDirectory(prefix="wsi-mil-model-") as tmp:
            with self._reading_run(uri, f"downloading model {uri}", missing), self._as_global_uri():
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=self.uri,
                                                            registry_uri=self.uri)
            try:
                model = mlflow.pyfunc.load_model(local)
            except Exception as exc:
                raise WsiMilError(f"MLflow model {uri} does not load ({_short(exc)}); install the wsi-mil version in "
                                  "its requirements.txt.") from None
            try:
                predictor = getattr(model.unwrap_python_model(), "predictor", None)
            except Exception:  # another flavour
                predictor = None
        if predictor is None:
            raise WsiMilError(f"MLflow model {uri} was not logged by wsi-mil (no wsi-mil predictor in it).")
        return LoadedModel(uri, predictor, model.metadata.run_id)


def _model_code(loader: Callable[..., Any]) -> str:
    """The code file of a models-from-code pyfunc whose predictor ``loader`` builds (imports only)."""
    module, qualname = loader.__module__, loader.__qualname__
    if not module.startswith("wsi_mil.") or "<" in qualname:
        raise ValueError(f"a model loader must be a module-level name of wsi_mil, not {module}.{qualname}")
    return (
        '"""Entry point of a wsi-mil MLflow Model (models-from-code): its code is the installed wsi_mil package."""\n\n'
        "import mlflow\n\n"
        "from wsi_mil.tracking import pyfunc_model\n"
        f"from {module} import {qualname.split('.')[0]}\n\n"
        f"mlflow.models.set_model(pyfunc_model({qualname}))\n"
    )


@functools.cache
def _pyfunc_class() -> type:
    """The pyfunc model class (made on first use so that importing this module does not import mlflow)."""
    quiet_mlflow()
    from mlflow.pyfunc import PythonModel

    class WsiMilModel(PythonModel):
        """An MLflow pyfunc model answering with the predictor its loader builds from the model's artifacts."""

        def __init__(self, loader: Callable[[dict[str, str]], Predictor]) -> None:
            self.loader = loader
            self.predictor: Predictor | None = None

        def load_context(self, context: Any) -> None:
            """Build the predictor from the model's artifact files."""
            self.predictor = self.loader(dict(context.artifacts))

        def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
            """The predictor's answer for ``model_input`` (see the model's signature)."""
            if self.predictor is None:
                raise RuntimeError("load the model with mlflow.pyfunc.load_model")
            return self.predictor.predict_pyfunc(np.asarray(model_input), dict(params or {}))

    return WsiMilModel


def pyfunc_model(loader: Callable[[dict[str, str]], Predictor]) -> Any:
    """An MLflow ``PythonModel`` answering with the predictor that ``loader`` builds.

    Its ``load_context`` calls ``loader(artifacts)``; its ``predict`` hands the input and params to the
    result's ``predict_pyfunc`` (see :meth:`Tracker.log_pyfunc_model`).
    """
    return _pyfunc_class()(loader)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return redact(text)[:PARAM_MAX]


def _record(run: Any) -> RunRecord:
    return RunRecord(run.info.run_id, run.info.run_name or "", run.info.status, run.info.experiment_id,
                     dict(run.data.params), dict(run.data.metrics), dict(run.data.tags), run.info.start_time)


def open_tracker(out: Path, cfg: Config, *, create: bool = True) -> Tracker:
    """The tracker for ``cfg.tracking.uri`` or the embedded SQLite store of ``out``.

    Raises
    ------
    WsiMilError
        With ``create=False`` (commands that read a trained run: evaluate, heatmap, predict), when
        ``out`` holds no store and no tracking URI is set: no empty store is made there.
    """
    uri = default_uri(out, cfg)
    layout = Layout(out)
    if uri == layout.tracking_uri and not create and not layout.mlflow_db.is_file():
        raise WsiMilError(f"no MLflow store at {layout.mlflow_db}; pass --out OUT (the output directory of the "
                          "`wsi-mil train` run) or --tracking-uri of the server that holds the run.")
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
