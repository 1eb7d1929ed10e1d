"""Checkpoints of trained folds: what is saved, and how a trained run's fold models are read back.

A checkpoint is a plain dict of tensors and plain values (``torch.load(weights_only=True)`` reads it,
so a foreign pickle is refused), saved as the MLflow artifact ``checkpoint.pt`` of each fold run
(``baseline/checkpoint.pt`` for the baseline MHIM trained on that fold). Keys: ``format``
(``wsi-mil-checkpoint``), ``format_version``, ``method`` (``bag``/``mhim``/``ins`` or the model
name), ``model_name``, ``in_dim``, ``n_classes``, ``classes``, ``fold``, ``seed``, ``threshold``
(binary decision threshold chosen on validation, or None), ``best_epoch`` and ``state`` (the
method's :meth:`~wsi_mil.mil.base.MILMethod.state_dict`).

:func:`load_fold_method` rebuilds the method of a fold run in eval use: the untrained method is built
from the run's config with empty train/val bags (every method's constructor trains nothing), then the
state is loaded.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from wsi_mil.config import Config
from wsi_mil.devices import resolve_device
from wsi_mil.errors import WsiMilError
from wsi_mil.mil.base import FoldContext, FoldExtras, MethodFactory, MILMethod, MILModel
from wsi_mil.mil.methods import build_method, method_label
from wsi_mil.mil.models import build_model
from wsi_mil.mil.splits import load_splits
from wsi_mil.tracking import Tracker

CHECKPOINT = "checkpoint.pt"
BASELINE_CHECKPOINT = "baseline/checkpoint.pt"
CHECKPOINT_FORMAT = "wsi-mil-checkpoint"


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


def log_checkpoint(tracker: Tracker, run_id: str, checkpoint: dict[str, Any], artifact_file: str = CHECKPOINT) -> None:
    """``torch.save`` a checkpoint dict and attach it to ``run_id`` as ``artifact_file``."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="wsi-mil-ckpt-") as tmp:
        local = Path(tmp) / name
        torch.save(checkpoint, local)
        tracker.log_artifact(run_id, local, folder or None)


def load_checkpoint(tracker: Tracker, run_id: str, artifact_file: str = CHECKPOINT) -> dict[str, Any]:
    """A checkpoint artifact of ``run_id``, read with ``torch.load(weights_only=True)``.

    Raises
    ------
    WsiMilError
        When the artifact is missing, is not plain weights (a foreign pickle), or is not a wsi-mil
        checkpoint.
    """
    with tempfile.TemporaryDirectory(prefix="wsi-mil-ckpt-") as tmp:
        local = tracker.download(run_id, artifact_file, Path(tmp))
        return read_checkpoint(local, f"MLflow run {run_id}: {artifact_file}")


def read_checkpoint(path: Path, what: str | None = None) -> dict[str, Any]:
    """A checkpoint file read with ``torch.load(weights_only=True)``; ``what`` names it in errors.

    Raises
    ------
    WsiMilError
        When the file is not plain weights (a foreign pickle) or is not a wsi-mil checkpoint.
    """
    what = what or str(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WsiMilError(
            f"{what} cannot be loaded as plain weights ({exc.__class__.__name__}); "
            "only checkpoints written by wsi-mil (tensors and plain values) are accepted."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise WsiMilError(f"{what} is not a wsi-mil checkpoint.")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], cfg: Config) -> MILModel:
    """Rebuild the aggregator of a plain-bag checkpoint."""
    if ckpt.get("method") in ("mhim", "ins"):
        raise WsiMilError(f"checkpoint of method {ckpt.get('method')!r} holds no plain baseline model.")
    model = build_model(ckpt["model_name"], int(ckpt["in_dim"]), int(ckpt["n_classes"]), cfg.model)
    model.load_state_dict(ckpt["state"]["model"])
    return model.eval()


@dataclass
class LoadedFold:
    """A method rebuilt from a fold run's checkpoint."""

    method: MILMethod
    checkpoint: dict[str, Any]
    config: Config
    fold: int
    seed: int

    @property
    def classes(self) -> list[str]:
        """Class names in class-index order."""
        return list(self.checkpoint.get("classes", []))

    @property
    def threshold(self) -> float | None:
        """The binary decision threshold chosen on the fold's validation split (None: multi-class)."""
        return self.checkpoint.get("threshold")


def load_fold_method(tracker: Tracker, run_id: str, *, device: str = "cpu", factory: MethodFactory | None = None,
                     config: Config | None = None) -> LoadedFold:
    """Rebuild a fold's trained method (in eval use) from its ``checkpoint.pt``.

    Parameters
    ----------
    tracker : Tracker
        The store holding the run.
    run_id : str
        Id of a fold run of a `wsi-mil train` command.
    device : str
        Where the method runs (``auto``, ``cpu``, ``cuda``, ``mps``).
    factory : callable, optional
        ``factory(cfg, ctx)`` builds the untrained method (default :func:`wsi_mil.mil.methods.build_method`).
    config : Config, optional
        The run's config when the caller has it already (default: the run's ``config.yaml``).

    Returns
    -------
    LoadedFold
        The method with its trained state (``predict`` gives class probabilities and instance scores),
        the checkpoint, the config, the fold's classes and decision threshold.

    Raises
    ------
    WsiMilError
        When the run, its checkpoint or its config cannot be read.
    """
    ckpt = load_checkpoint(tracker, run_id)
    return method_from_checkpoint(ckpt, config or tracker.load_config(run_id), device=device, factory=factory)


def method_from_checkpoint(ckpt: dict[str, Any], cfg: Config, *, device: str = "cpu",
                           factory: MethodFactory | None = None) -> LoadedFold:
    """Rebuild the trained method (in eval use) of a checkpoint dict with the run's config ``cfg``."""
    ctx = FoldContext(int(ckpt["fold"]), int(ckpt["seed"]), [], [], int(ckpt["n_classes"]), int(ckpt["in_dim"]),
                      resolve_device(device), extras=FoldExtras(config=cfg))
    method = (factory or build_method)(cfg, ctx)
    method.load_state_dict(ckpt["state"])
    return LoadedFold(method, ckpt, cfg, int(ckpt["fold"]), int(ckpt["seed"]))


def load_run_splits(tracker: Tracker, run_id: str) -> pd.DataFrame:
    """The split table (``splits.csv``) of a `wsi-mil train` parent run."""
    with tempfile.TemporaryDirectory(prefix="wsi-mil-splits-") as tmp:
        return load_splits(tracker.download(run_id, "splits.csv", Path(tmp)))
