"""Per-epoch learning-rate schedules on top of :mod:`torch.optim.lr_scheduler`.

Training methods are driven epoch by epoch (``train_epoch(epoch, num_epochs)``); :class:`EpochLR` sets
the learning rate of each epoch with torch's own schedulers (constant, or ``CosineAnnealingLR`` down to
0 over ``num_epochs``) so that the numbers are those of the library the reference codes use.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LRScheduler

ScheduleKind = Literal["constant", "cosine", "none"]


class EpochLR:
    """The learning rate of every epoch for one optimiser.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimiser whose parameter groups get the learning rate (their ``lr`` at construction is the
        base learning rate).
    kind : {'constant', 'none', 'cosine'}
        ``constant``/``none``: the base learning rate throughout; ``cosine``: ``CosineAnnealingLR`` with
        ``T_max = num_epochs`` and ``eta_min = 0`` (``lr_e = lr_0 (1 + cos(pi e / num_epochs)) / 2``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, kind: ScheduleKind) -> None:
        self.optimizer = optimizer
        self.kind = kind
        self.base = [float(g["lr"]) for g in optimizer.param_groups]
        self._scheduler: LRScheduler | None = None
        self._total = -1

    def _restart(self, num_epochs: int) -> LRScheduler:
        for group, lr in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = lr
            group["initial_lr"] = lr
        if self.kind == "cosine":
            return CosineAnnealingLR(self.optimizer, T_max=max(1, num_epochs), eta_min=0.0)
        return ConstantLR(self.optimizer, factor=1.0, total_iters=0)

    def start_epoch(self, epoch: int, num_epochs: int) -> float:
        """Set and return the learning rate of ``epoch`` (0-based) of ``num_epochs``.

        The scheduler is stepped once per epoch; asking for an earlier epoch (or another length)
        restarts it, so the value depends on ``epoch`` only.
        """
        sched = self._scheduler
        if sched is None or self._total != num_epochs or sched.last_epoch > epoch:
            sched = self._scheduler = self._restart(num_epochs)
            self._total = num_epochs
        with warnings.catch_warnings():  # stepping ahead before any optimiser step is intended here
            warnings.simplefilter("ignore", UserWarning)
            while sched.last_epoch < epoch:
                sched.step()
        return float(self.optimizer.param_groups[0]["lr"])
