"""Training methods (what the trainer drives per fold) and their registry.

- :class:`BagMethod` trains a plain bag-level :class:`~wsi_mil.mil.base.MILModel` (mean/max pooling,
  ABMIL, TransMIL, DSMIL): one bag per step, Adam/AdamW, cosine learning rate per epoch
  (``torch.optim.lr_scheduler.CosineAnnealingLR``).
- :func:`build_method` picks the method for ``cfg.model.name`` from :mod:`wsi_mil.registry`: a training
  method's own builder (``mhim`` -> MHIM-MIL, ``ins`` -> INS, bound here), or :class:`BagMethod` around
  :func:`wsi_mil.mil.models.build_model` for an aggregator.

Contract for every method class ``M(cfg, ctx)``: the constructor builds the networks but trains
nothing (so :func:`wsi_mil.mil.checkpoints.load_fold_method` can rebuild it from a checkpoint with empty
``ctx.train``/``ctx.val``); :meth:`setup` does per-fold preparation (MHIM trains/loads its baseline).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_mil.config import Config, TrainingConfig
from wsi_mil.mil.base import BagItem, FoldContext, MILMethod, MILModel, Prediction
from wsi_mil.mil.ins import INSMethod
from wsi_mil.mil.mhim import MHIMMethod
from wsi_mil.mil.models import build_model
from wsi_mil.mil.schedules import EpochLR
from wsi_mil.registry import builder, model_spec


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_optimizer(params: Any, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """Adam or AdamW with the configured learning rate and weight decay."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A reproducible shuffled bag order for one epoch."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


class BagMethod:
    """Plain bag-level training of one MIL model (one bag per optimiser step)."""

    kind = "bag"

    def __init__(self, model: MILModel, cfg: Config, ctx: FoldContext, model_name: str | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.model_name = model_name or cfg.model.name
        self.model = model.to(ctx.device)
        self.optimizer = make_optimizer(self.model.parameters(), cfg.training)
        self.lr_schedule = EpochLR(self.optimizer, cfg.training.scheduler)

    def setup(self, fold: FoldContext) -> None:
        """Nothing to prepare for plain training."""
        self.ctx = fold

    def train_epoch(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """One pass over the training bags in a shuffled order; returns the mean loss and the lr."""
        lr = self.lr_schedule.start_epoch(epoch, num_epochs)
        self.model.train()
        total, count = 0.0, 0
        for i in epoch_order(len(self.ctx.train), self.ctx.seed, epoch):
            bag = self.ctx.train[i]
            out = self.model(bag.features)
            target = torch.tensor(bag.label, device=bag.features.device)
            loss = self.model.bag_loss(out, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
            count += 1
        return {"loss": total / max(count, 1), "lr": lr}

    @torch.no_grad()
    def predict(self, bag: BagItem) -> Prediction:
        """Class probabilities and instance scores of one bag (eval mode)."""
        return predict_with(self.model, bag)

    def state_dict(self) -> dict[str, Any]:
        """Model weights and the model name."""
        return {"model": self.model.state_dict(), "model_name": self.model_name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.model.load_state_dict(state["model"])


@torch.no_grad()
def predict_with(model: nn.Module, bag: BagItem) -> Prediction:
    """Run ``model`` on one bag in eval mode; softmax probabilities and instance scores as NumPy."""
    was_training = model.training
    model.eval()
    out = model(bag.features)
    if was_training:
        model.train()
    probs = model.bag_probs(out).cpu().numpy() if isinstance(model, MILModel) else \
        torch.softmax(out.logits.float().reshape(-1), dim=0).cpu().numpy()
    scores = out.instance_scores.detach().float().reshape(-1).cpu().numpy()
    return Prediction(probs=probs, instance_scores=scores)


def method_label(cfg: Config) -> str:
    """Human-readable model name, e.g. ``abmil`` or ``mhim(transmil)``."""
    name = cfg.model.name
    if name == "mhim":
        return f"mhim({cfg.model.mhim.student})"
    return name


builder("mhim")(MHIMMethod)
builder("ins")(INSMethod)


def build_method(cfg: Config, ctx: FoldContext) -> MILMethod:
    """The training method for ``cfg.model.name`` on one fold (no training happens here).

    Parameters
    ----------
    cfg : Config
        The experiment settings; ``cfg.model.name`` is a registered model.
    ctx : FoldContext
        The fold (its bags may be empty when a trained method is rebuilt from a checkpoint).

    Returns
    -------
    MILMethod
        The registered method's own builder's result, or a :class:`BagMethod` around the aggregator.

    Raises
    ------
    ConfigError
        When ``cfg.model.name`` is not registered or has no builder.
    """
    name = cfg.model.name
    spec = model_spec(name)
    if spec.kind == "method" and spec.build is not None:
        return spec.build(cfg, ctx)
    return BagMethod(build_model(name, ctx.in_dim, ctx.n_classes, cfg.model), cfg, ctx, name)
