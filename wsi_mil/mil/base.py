"""The contracts between MIL models, training methods and the trainer.

- A :class:`MILModel` maps one bag of instance features [N, D] to a :class:`MILOutput` (bag logits,
  bag embedding, per-instance scores). Every aggregator (mean/max pooling, ABMIL, TransMIL, DSMIL) is
  built as ``embed`` (Linear D->hidden + ReLU + Dropout) then ``aggregate`` on the embedded instances,
  so MHIM-MIL can copy ``embed`` and mask instances between the two.
- A :class:`MILMethod` is what the trainer drives for one fold: it trains an epoch, predicts a bag and
  saves/loads its state. Plain bag-level training, MHIM-MIL and INS are methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn


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
        """Pool embedded instances h [N, hidden] into a bag output."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> MILOutput:
        """x: one bag of instance features [N, D]."""
        return self.aggregate(self.embed(x))

    def bag_loss(self, out: MILOutput, target: Tensor) -> Tensor:
        """Supervised loss for one bag (target: scalar class index tensor)."""
        return nn.functional.cross_entropy(out.logits.unsqueeze(0), target.view(1))


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
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. a callback to train a baseline
