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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from wsi_mil import __version__
from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout

log = logging.getLogger(__name__)

PARAM_MAX = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow accepts at most 100 params per batch
CHECKPOINT = "checkpoint.pt"
ROLE_TAG, FOLD_TAG, SEED_TAG, PARENT_TAG = "wsi_mil.role", "wsi_mil.fold", "wsi_mil.seed", "mlflow.parentRunId"


def quiet_mlflow() -> None:
    """No telemetry or network calls and no chatty INFO logs from MLflow, alembic or git."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
        return self.tags.get(PARENT_TAG)


@dataclass
class FoldRun:
    """One fold's nested run and its test slides."""

    run_id: str
    fold: int
    seed: int
    test_slide_ids: list[str] = field(default_factory=list)


class Tracker:
    """A thin, explicit wrapper over ``MlflowClient`` (no global MLflow state)."""

    def __init__(self, uri: str, artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.artifact_root = Path(artifact_root) if artifact_root is not None else None
        self.client = _client(uri)

    # ---------------------------------------------------------------------------------- writing
    def experiment(self, name: str) -> str:
        """Id of the experiment ``name``, created (with a local artifact location if any) when missing."""
        found = self.client.get_experiment_by_name(name)
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
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        return self.client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED / FAILED / KILLED."""
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log params in batches (values as strings, cut to MLflow's 6000-character limit)."""
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, params=items[start:start + BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite numeric metrics in one batch (NaN/inf values are skipped)."""
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()
                 if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000], synchronous=True)

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        """Set several tags."""
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(str(k), str(v)[:PARAM_MAX]) for k, v in tags.items()],
                              synchronous=True)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a directory into the run's artifacts (under ``artifact_path``)."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store a text artifact."""
        self.client.log_text(run_id, text, artifact_file)

    def log_dataframe(self, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
        """Store a DataFrame as a CSV artifact."""
        self.client.log_text(run_id, frame.to_csv(index=False), artifact_file)

    def log_checkpoint(self, run_id: str, checkpoint: dict[str, Any], artifact_file: str = CHECKPOINT) -> None:
        """``torch.save`` a checkpoint dict (tensors and plain values only) as an artifact."""
        import torch

        parent, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="wsi-mil-ckpt-") as tmp:
            local = Path(tmp) / name
            torch.save(checkpoint, local)
            self.client.log_artifact(run_id, str(local), parent or None)

    # ---------------------------------------------------------------------------------- reading
    def get_run(self, run_id: str) -> RunRecord:
        """A run's params, metrics and tags; a clear error when it does not exist."""
        try:
            run = self.client.get_run(run_id)
        except Exception as exc:
            raise WsiMilError(f"MLflow run {run_id} not found in {self.uri} ({exc.__class__.__name__}); "
                              "check the run id and --out / --tracking-uri.") from None
        return _record(run)

    def find_runs(self, experiment: str | None = None, filter_string: str = "", *,
                  role: str | None = "cv") -> list[RunRecord]:
        """Runs of one experiment (or all), newest first; ``role='cv'`` keeps parent runs only."""
        if experiment is not None:
            exp = self.client.get_experiment_by_name(experiment)
            ids = [exp.experiment_id] if exp is not None else []
        else:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        if not ids:
            return []
        filters = [f for f in (filter_string, f"tags.`{ROLE_TAG}` = '{role}'" if role else "") if f]
        runs = self.client.search_runs(ids, " and ".join(filters), order_by=["attributes.start_time DESC"])
        return [_record(r) for r in runs]

    def child_runs(self, parent_id: str) -> list[RunRecord]:
        """Runs nested under ``parent_id``."""
        parent = self.get_run(parent_id)
        runs = self.client.search_runs([parent.experiment_id], f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                       max_results=5000)
        return [_record(r) for r in runs]

    def fold_runs(self, run_id: str) -> list[FoldRun]:
        """Fold runs of a parent run (or the run itself when it is a fold run), with their test slides."""
        run = self.get_run(run_id)
        if run.tags.get(ROLE_TAG) == "fold":
            records = [run]
            parent = run.parent_id
        else:
            records = [r for r in self.child_runs(run_id) if r.tags.get(ROLE_TAG) == "fold"]
            parent = run_id
        if not records:
            raise WsiMilError(f"MLflow run {run_id} has no fold runs; pass the id of a `wsi-mil train` run.")
        splits = self.load_splits(parent) if parent else None
        out = []
        for r in records:
            fold, seed = int(r.tags[FOLD_TAG]), int(r.tags[SEED_TAG])
            test: list[str] = []
            if splits is not None:
                sel = (splits["seed"] == seed) & (splits["fold"] == fold) & (splits["role"] == "test")
                test = splits.loc[sel, "slide_id"].tolist()
            out.append(FoldRun(r.run_id, fold, seed, test))
        return sorted(out, key=lambda f: (f.seed, f.fold))

    def list_artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        """Artifact paths of a run (recursively)."""
        out: list[str] = []
        for info in self.client.list_artifacts(run_id, path):
            if info.is_dir:
                out.extend(self.list_artifacts(run_id, info.path))
            else:
                out.append(info.path)
        return out

    def download(self, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
        """Download one artifact (file or directory) and return its local path."""
        dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="wsi-mil-artifact-"))
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))
        except Exception as exc:
            raise WsiMilError(f"MLflow run {run_id} has no artifact '{artifact_path}' ({exc.__class__.__name__}).") from None

    def load_checkpoint(self, run_id: str, artifact_path: str = CHECKPOINT) -> dict[str, Any]:
        """A checkpoint artifact, loaded with ``torch.load(weights_only=True)``."""
        import torch

        with tempfile.TemporaryDirectory(prefix="wsi-mil-ckpt-") as tmp:
            local = self.download(run_id, artifact_path, Path(tmp))
            try:
                return torch.load(local, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise WsiMilError(
                    f"MLflow run {run_id}: {artifact_path} cannot be loaded as plain weights ({exc.__class__.__name__}); "
                    "only checkpoints written by wsi-mil (tensors and plain values) are accepted."
                ) from None

    def load_config(self, run_id: str) -> Config:
        """The resolved config a run was trained with (its ``config.yaml`` artifact)."""
        with tempfile.TemporaryDirectory(prefix="wsi-mil-cfg-") as tmp:
            text = self.download(run_id, "config.yaml", Path(tmp)).read_text()
        try:
            return Config.model_validate(yaml.safe_load(text) or {})
        except Exception as exc:
            raise WsiMilError(f"MLflow run {run_id}: its config.yaml no longer validates ({exc}).") from None

    def load_splits(self, run_id: str) -> pd.DataFrame:
        """The split table of a parent run."""
        from wsi_mil.mil.splits import load_splits

        with tempfile.TemporaryDirectory(prefix="wsi-mil-splits-") as tmp:
            return load_splits(self.download(run_id, "splits.csv", Path(tmp)))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` pairs of one metric."""
        return [(m.step, m.value) for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:PARAM_MAX]


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


def log_artifact(out: Path, cfg: Config, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Attach a file/directory (e.g. heatmaps) to an existing run."""
    open_tracker(out, cfg).log_artifact(run_id, path, artifact_path)


@dataclass
class LoadedFold:
    """A method rebuilt from a fold run's checkpoint."""

    method: Any
    checkpoint: dict[str, Any]
    config: Config
    fold: int
    seed: int

    @property
    def classes(self) -> list[str]:
        return list(self.checkpoint.get("classes", []))

    @property
    def threshold(self) -> float | None:
        return self.checkpoint.get("threshold")


def load_fold_method(tracker: Tracker, run_id: str, *, device: str = "cpu", factory: Any = None,
                     config: Config | None = None) -> LoadedFold:
    """Rebuild a fold's trained method (in eval use) from its ``checkpoint.pt``.

    ``factory(cfg, ctx)`` builds the untrained method (default :func:`wsi_mil.mil.methods.build_method`).
    """
    from wsi_mil.devices import resolve_device
    from wsi_mil.mil.base import FoldContext
    from wsi_mil.mil.methods import build_method

    ckpt = tracker.load_checkpoint(run_id)
    if ckpt.get("format") != "wsi-mil-checkpoint":
        raise WsiMilError(f"MLflow run {run_id}: {CHECKPOINT} is not a wsi-mil checkpoint.")
    cfg = config or tracker.load_config(run_id)
    dev = resolve_device(device)
    ctx = FoldContext(int(ckpt["fold"]), int(ckpt["seed"]), [], [], int(ckpt["n_classes"]), int(ckpt["in_dim"]), dev,
                      extras={"config": cfg})
    method = (factory or build_method)(cfg, ctx)
    method.load_state_dict(ckpt["state"])
    return LoadedFold(method, ckpt, cfg, int(ckpt["fold"]), int(ckpt["seed"]))


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
