"""The fold models of one cross-validated training as one predictor, and the MLflow Model that carries it.

Every `wsi-mil train` parent run logs its fold models as one MLflow Model (pyfunc flavour, named
``model``: ``runs:/<run>/model``), registered as a new version of ``tracking.register_as`` when that is
set. ``mlflow.pyfunc.load_model(uri).predict(features)`` works wherever ``wsi_mil`` is installed:

- input: one bag's features, float32 [N, D] (D, the encoder's feature size, is in the signature);
- output, by ``params={"output": ...}``: ``probabilities`` (default) float64 [C], the class
  probabilities averaged over the fold models; ``instance_scores`` float64 [N], the per-instance
  scores (attention, or INS's instance probability) averaged over the fold models; ``label``, the
  class name the decision rule gives, as an array of one string;
- ``params={"seed": s, "fold": k}`` (default -1: all) selects fold models; one seed and fold is
  exactly that fold's model.

Decision rule. Binary: each fold's threshold on the positive-class probability was chosen on that
fold's validation split (``training.threshold``: Youden's J or F1); the ensemble calls a bag positive
when the mean positive-class probability of the selected folds reaches the median of their
thresholds (one fold alone decides as it did in training). More classes: the largest mean probability.

The model's files: ``config.yaml`` (the run's resolved config: tiling, encoder and model settings)
and one checkpoint per fold, ``s<seed>_f<fold>.pt`` (:mod:`wsi_mil.mil.checkpoints`). Its ``MLmodel``
metadata repeats what a reader needs without loading it (:meth:`FoldEnsemble.metadata`).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from wsi_mil import __version__
from wsi_mil.config import Config, dump_config
from wsi_mil.encoders import encoder_key
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import tiling_key
from wsi_mil.mil.base import BagItem
from wsi_mil.mil.checkpoints import LoadedFold, load_fold_method, method_from_checkpoint, read_checkpoint
from wsi_mil.mil.methods import method_label
from wsi_mil.redaction import redact
from wsi_mil.tracking import DESCRIPTION_TAG, FOLD_TAG, MODEL_NAME, SEED_TAG, Tracker

CONFIG_ARTIFACT = "config"
PARAMS = {"output": "probabilities", "seed": -1, "fold": -1}  # the pyfunc's inference params and defaults
OUTPUTS = ("probabilities", "instance_scores", "label")
DECISION_RULE = ("binary: positive when the mean positive-class probability of the fold models reaches the median "
                 "of their thresholds, each chosen on its fold's validation split; more classes: the largest mean "
                 "probability")


@dataclass
class BagPrediction:
    """The ensemble's answer for one bag."""

    probs: np.ndarray  # float64 [C], mean over the selected fold models
    instance_scores: np.ndarray  # float64 [N], mean over the selected fold models
    label: str  # by the decision rule
    threshold: float | None  # the binary decision threshold used (None: more classes)


class FoldEnsemble:
    """The fold models of a `wsi-mil train` run (every seed and fold), predicting together.

    Parameters
    ----------
    folds : list of LoadedFold
        The trained fold methods (eval use) with their checkpoints.
    config : Config
        The run's config (tiling, encoder and model settings).
    """

    def __init__(self, folds: list[LoadedFold], config: Config) -> None:
        if not folds:
            raise WsiMilError("a fold ensemble needs at least one trained fold model.")
        self.folds = sorted(folds, key=lambda f: (f.seed, f.fold))
        self.config = config
        self.classes = self.folds[0].classes
        self.in_dim = int(self.folds[0].checkpoint["in_dim"])
        self._bags = itertools.count()

    # ---------------------------------------------------------------------------------- building
    @classmethod
    def from_checkpoints(cls, checkpoints: list[dict[str, Any]], config: Config, device: str = "cpu") -> FoldEnsemble:
        """Rebuild every fold's method from its checkpoint dict (:func:`~wsi_mil.mil.checkpoints.make_checkpoint`)."""
        return cls([method_from_checkpoint(c, config, device=device) for c in checkpoints], config)

    @classmethod
    def from_run(cls, tracker: Tracker, run_id: str, device: str = "cpu") -> FoldEnsemble:
        """The fold models of a train parent run (or of the parent of a fold run), from their ``checkpoint.pt``.

        Raises
        ------
        WsiMilError
            When the run, its config or a fold's checkpoint cannot be read.
        """
        parent = tracker.parent_of(run_id)
        cfg = tracker.load_config(parent)
        return cls([load_fold_method(tracker, f.run_id, device=device, config=cfg) for f in tracker.fold_runs(parent)],
                   cfg)

    @classmethod
    def from_model_artifacts(cls, artifacts: dict[str, str]) -> FoldEnsemble:
        """The ensemble of a logged MLflow Model from its artifact files (MLflow calls this when loading)."""
        config = Config.model_validate(yaml.safe_load(Path(artifacts[CONFIG_ARTIFACT]).read_text()) or {})
        checkpoints = [read_checkpoint(Path(path), f"model file {Path(path).name}")
                       for name, path in sorted(artifacts.items()) if name != CONFIG_ARTIFACT]
        return cls.from_checkpoints(checkpoints, config)

    # ---------------------------------------------------------------------------------- predicting
    def select(self, seed: int | None = None, fold: int | None = None) -> list[LoadedFold]:
        """The fold models of ``seed`` and ``fold`` (None: every one).

        Raises
        ------
        WsiMilError
            When no fold model matches.
        """
        chosen = [f for f in self.folds if (seed is None or f.seed == seed) and (fold is None or f.fold == fold)]
        if not chosen:
            have = ", ".join(f"seed {f.seed} fold {f.fold}" for f in self.folds)
            raise WsiMilError(f"no fold model with seed={seed} fold={fold}; the model holds {have}.")
        return chosen

    def threshold(self, folds: list[LoadedFold] | None = None) -> float | None:
        """The binary decision threshold of ``folds`` (default all): the median of their thresholds."""
        values = [f.threshold for f in (folds or self.folds) if f.threshold is not None]
        return float(np.median(values)) if len(self.classes) == 2 and values else None

    def predict(self, features: np.ndarray | torch.Tensor, *, slide_id: str | None = None, seed: int | None = None,
                fold: int | None = None) -> BagPrediction:
        """Class probabilities, instance scores and the decided class of one bag.

        Parameters
        ----------
        features : numpy.ndarray or torch.Tensor
            One bag's features, [N, D] (cast to float32).
        slide_id : str, optional
            The bag's slide (methods may cache per slide; default: a fresh id per call).
        seed, fold : int, optional
            Use only the fold models of this seed and/or fold (default: every one).

        Returns
        -------
        BagPrediction
            Mean probabilities float64 [C], mean instance scores float64 [N], the label and threshold.

        Raises
        ------
        WsiMilError
            When the features are not [N, D] with N >= 1, or no fold model matches.
        """
        folds = self.select(seed, fold)
        x = torch.as_tensor(features).to(torch.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim or x.shape[0] == 0:
            raise WsiMilError(f"a bag's features must be [N, {self.in_dim}] with N >= 1 (one row per patch); "
                              f"got shape {tuple(x.shape)}.")
        item = BagItem(slide_id or f"bag-{next(self._bags)}", x, -1)
        preds = [f.method.predict(item) for f in folds]
        probs = np.mean([np.asarray(p.probs, dtype=np.float64).reshape(-1) for p in preds], axis=0)
        scores = np.mean([np.asarray(p.instance_scores, dtype=np.float64).reshape(-1) for p in preds], axis=0)
        threshold = self.threshold(folds)
        index = int(probs[1] >= threshold) if threshold is not None else int(np.argmax(probs))
        return BagPrediction(probs, scores, self.classes[index], threshold)

    def predict_pyfunc(self, features: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """The MLflow pyfunc answer for one bag (see the module docstring for ``params``)."""
        output = str(params.get("output", PARAMS["output"]))
        if output not in OUTPUTS:
            raise WsiMilError(f"params output={output!r}: use one of {', '.join(OUTPUTS)}.")
        seed, fold = int(params.get("seed", -1)), int(params.get("fold", -1))
        pred = self.predict(features, seed=seed if seed >= 0 else None, fold=fold if fold >= 0 else None)
        if output == "probabilities":
            return pred.probs
        if output == "instance_scores":
            return pred.instance_scores
        return np.array([pred.label])

    # ---------------------------------------------------------------------------------- describing
    def metadata(self) -> dict[str, Any]:
        """Plain values describing the model: classes, folds and thresholds, the decision rule, tiling and encoder."""
        cfg = self.config
        return {
            "format": "wsi-mil-fold-ensemble", "format_version": 1, "wsi_mil_version": __version__,
            "model": method_label(cfg), "classes": list(self.classes), "in_dim": self.in_dim,
            "folds": [{"seed": f.seed, "fold": f.fold, "threshold": f.threshold,
                       "best_epoch": int(f.checkpoint.get("best_epoch", -1))} for f in self.folds],
            "threshold": self.threshold(), "threshold_rule": cfg.training.threshold, "decision": DECISION_RULE,
            "tiling_key": tiling_key(cfg), "encoder_key": encoder_key(cfg.features),
            "tiling": cfg.tiling.model_dump(mode="json"), "features": cfg.features.model_dump(mode="json"),
        }

    def write_artifacts(self, directory: Path) -> dict[str, Path]:
        """Write the model's files (``config.yaml``, one ``s<seed>_f<fold>.pt`` per fold) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {CONFIG_ARTIFACT: directory / "config.yaml"}
        files[CONFIG_ARTIFACT].write_text(redact(dump_config(self.config)))  # the tracking URI may hold a password
        for f in self.folds:
            name = f"s{f.seed}_f{f.fold}"
            torch.save(f.checkpoint, directory / f"{name}.pt")
            files[name] = directory / f"{name}.pt"
        return files


# -------------------------------------------------------------------------------------- MLflow Model
def log_ensemble(tracker: Tracker, run_id: str, ensemble: FoldEnsemble, *,
                 metrics: dict[str, float] | None = None) -> str:
    """Log ``ensemble`` as the MLflow Model ``model`` of the parent run ``run_id``; returns its model id."""
    example = np.zeros((2, ensemble.in_dim), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="wsi-mil-ensemble-") as tmp:
        return tracker.log_pyfunc_model(
            run_id, loader=FoldEnsemble.from_model_artifacts, artifacts=ensemble.write_artifacts(Path(tmp)),
            input_example=example, output_example=np.zeros(len(ensemble.classes)), params=dict(PARAMS),
            metadata=ensemble.metadata(), tags={"wsi_mil.model": method_label(ensemble.config)}, metrics=metrics,
        )


def register_run_model(tracker: Tracker, run_id: str, name: str) -> int:
    """Register the model of train parent run ``run_id`` as a new version of ``name``; returns the version.

    A run is registered under one name once: when a version of ``name`` already comes from this run,
    that version is returned. Version tags: ``model``, ``encoder``, ``tiling_key``, ``classes``,
    ``folds``, ``seeds``, ``test_auc_mean`` and ``run_id``; its description is the run's.

    Raises
    ------
    WsiMilError
        When the run logged no model, or the registry cannot be reached.
    """
    for version in tracker.model_versions(name):
        if version.run_id == run_id:
            return version.version
    model_id = tracker.run_model_id(run_id)
    if model_id is None:
        raise WsiMilError(f"MLflow run {run_id} logged no model (tracking.log_model was false, or the run is older "
                          "than wsi-mil's MLflow Models); train again to register it.")
    run = tracker.get_run(run_id)
    folds = [r.tags for r in tracker.child_runs(run_id) if FOLD_TAG in r.tags]
    tags = {
        "model": run.tags.get("wsi_mil.model", ""), "encoder": run.tags.get("wsi_mil.encoder", ""),
        "tiling_key": run.tags.get("wsi_mil.tiling", ""), "classes": run.tags.get("wsi_mil.classes", ""),
        "folds": len({t[FOLD_TAG] for t in folds}), "seeds": ",".join(sorted({t[SEED_TAG] for t in folds}, key=int)),
        "test_auc_mean": f"{run.metric('test/auc_mean'):.4f}", "run_id": run_id,
    }
    return tracker.register_model(name, model_id, run_id=run_id, tags=tags, description=run.tags.get(DESCRIPTION_TAG))


def model_uri(run_id: str) -> str:
    """The URI of the model a train parent run logged."""
    return f"runs:/{run_id}/{MODEL_NAME}"


def is_model_uri(source: str) -> bool:
    """Whether ``source`` is an MLflow model URI (``models:/...``, ``runs:/...``) rather than a run id."""
    return ":/" in source


def load_ensemble(tracker: Tracker, source: str, device: str = "cpu") -> tuple[FoldEnsemble, str | None]:
    """The fold ensemble of a train run id or of an MLflow model URI, and the run that trained it.

    Parameters
    ----------
    tracker : Tracker
        The store holding the run or the model.
    source : str
        A `wsi-mil train` parent (or fold) run id, or ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
        ``runs:/RUN_ID/model``, ``models:/MODEL_ID``.
    device : str
        Where the fold models of a run without a logged model are rebuilt (a logged model, which a run
        id also stands for when it has one, loads on the CPU).

    Returns
    -------
    tuple of (FoldEnsemble, str or None)
        The ensemble and the id of its train parent run (None when the model names no run).

    Raises
    ------
    WsiMilError
        When the run or model cannot be found or read, or the model was not logged by `wsi-mil train`.
    """
    if not is_model_uri(source):
        parent = tracker.parent_of(source)
        if tracker.run_model_id(parent) is None:  # trained before runs logged models, or without one
            return FoldEnsemble.from_run(tracker, parent, device=device), parent
        source = model_uri(parent)
    loaded = tracker.load_model(source)
    if not isinstance(loaded.predictor, FoldEnsemble):
        raise WsiMilError(f"MLflow model {source} is not the fold ensemble of a `wsi-mil train` run.")
    return loaded.predictor, loaded.run_id
