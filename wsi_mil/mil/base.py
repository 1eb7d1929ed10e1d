"""The contracts between MIL models, training methods and the trainer.

- A :class:`MILModel` maps one bag of instance features [N, D] to a :class:`MILOutput` (bag logits,
  bag embedding, per-instance scores). Every aggregator (mean/max pooling, ABMIL, TransMIL, DSMIL) is
  built as ``embed`` (Linear D->hidden + ReLU + Dropout) then ``aggregate`` on the embedded instances,
  so MHIM-MIL can copy ``embed`` and mask instances between the two.
- A :class:`MILMethod` is what the trainer drives for one fold: it trains an epoch, predicts a bag and
  saves/loads its state. Plain bag-level training, MHIM-MIL and INS are methods.
- A :class:`FoldContext` hands a method one fold's bags, and :class:`FoldExtras` what else the
  trainer offers it (settings, bag files, baseline training/loading, metric logging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from wsi_mil.config import Config


@dataclass
class MILOutput:
    """What a MIL model returns for one bag."""

    logits: Tensor  # [C]
    embedding: Tensor  # bag embedding [E] ([C, E] for DSMIL)
    instance_scores: Tensor  # [N]: attention or instance probability, for masking and heatmaps
    head_scores: Tensor | None = None  # [H, N] per-head attention (TransMIL) for MHIM vote fusion
    instance_logits: Tensor | None = None  # [N, C] where the model has an instance classifier (DSMIL)


class MILModel(nn.Module):
    """Base class: ``forward(x) = aggregate(embed(x))``; subclasses define ``embed`` and ``aggregate``."""

    embed: nn.Module

    def aggregate(self, h: Tensor) -> MILOutput:  # pragma: no cover - abstract
        """Pool the embedded instances of one bag into a bag output (each model's equations).

        Parameters
        ----------
        h : Tensor
            The bag's embedded instances, float [N, hidden] (``embed`` of features [N, D]).

        Returns
        -------
        MILOutput
            Bag logits [C], bag embedding, per-instance scores [N] (see :class:`MILOutput`).
        """
        raise NotImplementedError

    def forward(self, x: Tensor) -> MILOutput:
        """Score one bag.

        Parameters
        ----------
        x : Tensor
            One bag of instance features, float32 [N, D].

        Returns
        -------
        MILOutput
            Bag logits [C], bag embedding, per-instance scores [N] (see :class:`MILOutput`).
        """
        return self.aggregate(self.embed(x))

    def bag_loss(self, out: MILOutput, target: Tensor) -> Tensor:
        """Supervised loss for one bag (target: scalar class index tensor)."""
        return nn.functional.cross_entropy(out.logits.unsqueeze(0), target.view(1))

    def bag_probs(self, out: MILOutput) -> Tensor:
        """Class probabilities [C] of one bag: the softmax of the bag logits (DSMIL overrides it).

        Every score uses them: validation AUC, checkpoint and threshold choice, test metrics.
        """
        return torch.softmax(out.logits.float().reshape(-1), dim=0)


@dataclass
class Prediction:
    """A method's prediction for one bag."""

    probs: np.ndarray  # [C] class probabilities
    instance_scores: np.ndarray  # [N] scores for heatmaps / instance AUC (higher = more positive evidence)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BagItem:
    """One bag as the trainer hands it to a method."""

    slide_id: str
    features: Tensor  # [N, D] float32 on the method's device
    label: int
    coords: np.ndarray | None = None


@runtime_checkable
class MILMethod(Protocol):
    """What the trainer drives for one fold."""

    def setup(self, fold: FoldContext) -> None:
        """Called once before the first epoch (MHIM trains or loads its baseline here)."""

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """Train one epoch over ``fold.train``; return metrics to log (loss, mask ratios, ...)."""

    def predict(self, bag: BagItem) -> Prediction:
        """Predict one bag with the inference model (no gradients, eval mode)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to predict again (tensors and plain values only)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


MethodFactory = Callable[[Config, "FoldContext"], MILMethod]
"""Builds one fold's untrained method: ``factory(cfg, ctx) -> MILMethod``."""


def _no_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """The default :attr:`FoldExtras.log_metrics`: metrics go nowhere."""


@dataclass
class FoldExtras:
    """What the trainer offers a method besides the fold's bags (see :mod:`wsi_mil.mil.cv`).

    Attributes
    ----------
    config : Config or None
        The whole experiment configuration.
    bag_paths : dict of str to Path
        HDF5 bag file of each training and validation slide (the INS ``patches`` variant reads the
        patch store recorded in them).
    train_baseline : callable or None
        ``train_baseline(model_name) -> MILModel``: trains a plain bag-level model of that aggregator on
        the same fold with the same settings and early stopping and returns its best model (eval mode).
        Its curves are logged into the fold run as ``baseline_*`` metrics and its checkpoint as the
        artifact ``baseline/checkpoint.pt``.
    load_baseline : callable or None
        ``load_baseline(fold, seed) -> MILModel``, only with ``model.mhim.baseline_run``: the best model
        of that earlier run's matching fold; refused when that run's split of this fold differs.
    log_metrics : callable
        ``log_metrics(metrics, step=None)``: log extra metrics into the fold run.
    """

    config: Config | None = None
    bag_paths: dict[str, Path] = field(default_factory=dict)
    train_baseline: Callable[[str], MILModel] | None = None
    load_baseline: Callable[[int, int], MILModel] | None = None
    log_metrics: Callable[..., None] = _no_metrics


@dataclass
class FoldContext:
    """The data and settings of one cross-validation fold."""

    fold: int
    seed: int
    train: list[BagItem]
    val: list[BagItem]
    n_classes: int
    in_dim: int
    device: torch.device
    extras: FoldExtras = field(default_factory=FoldExtras)
