"""Training one method on one fold with early stopping on validation AUC.

After every epoch the validation bags are scored; the state with the best validation AUC (ties: lower
validation loss) is kept. Training stops after ``training.patience`` epochs without a validation-AUC
gain of more than ``training.min_delta`` (never before ``training.min_epochs``). With a validation split
of one class, early stopping follows the validation loss; without validation bags every epoch runs.
A method with a ``first_checkpoint_epoch`` attribute (INS: ``proto_start``) has no checkpoint chosen
from the epochs before it, and patience counts from there (the last such epoch is
kept only when training ends before it).

Per-epoch metrics are named ``train/<name>`` (what the method's ``train_epoch`` reports: ``loss``,
``lr``, ...) and ``val/auc``, ``val/loss`` (:func:`epoch_metric_name`); the history keeps the same names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from wsi_mil.config import TrainingConfig
from wsi_mil.mil import metrics as M
from wsi_mil.mil.base import FoldContext, MILMethod
from wsi_mil.mil.checkpoints import copy_state
from wsi_mil.mil.data import BagList
from wsi_mil.mil.evaluation import score_bags

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Outcome of :func:`fit` (the method holds the best checkpoint afterwards)."""

    best_epoch: int
    epochs_run: int
    best_val_auc: float
    best_val_loss: float
    stopped_early: bool
    history: dict[str, list[float]] = field(default_factory=dict)
    first_checkpoint_epoch: int = 0  # epochs before it were never candidates (INS: proto_start)


def epoch_metric_name(key: str) -> str:
    """The logged name of a per-epoch metric a method reports.

    ``loss`` -> ``train/loss``, ``train_ce`` -> ``train/ce``, ``val_auc_max_pool`` -> ``val/auc_max_pool``;
    a name holding ``/`` is kept.
    """
    if "/" in key:
        return key
    for split in ("train", "val"):
        if key.startswith(f"{split}_"):
            return f"{split}/{key[len(split) + 1:]}"
    return f"train/{key}"


def fit(method: MILMethod, ctx: FoldContext, tcfg: TrainingConfig, *,
        log_epoch: Callable[[dict[str, float], int], None] | None = None, desc: str = "",
        progress: bool = True) -> FitResult:
    """Train with early stopping on validation AUC; load the best checkpoint into ``method``."""
    epochs = tcfg.epochs
    val = ctx.val
    val_labels = set(val.labels if isinstance(val, BagList) else [b.label for b in val])
    monitor_auc = len(val_labels) >= 2
    if len(val) == 0:
        log.warning("%s: no validation bags; training all %d epochs without early stopping", desc, epochs)
    elif not monitor_auc:
        log.warning("%s: validation bags hold a single class; early stopping on validation loss", desc)
    history: dict[str, list[float]] = {}
    best: tuple[float, float] = (-math.inf, math.inf)  # (val AUC or -loss, val loss)
    best_epoch, best_state, since, epoch = -1, None, 0, -1
    first = max(0, int(getattr(method, "first_checkpoint_epoch", 0) or 0))
    bar = tqdm(range(epochs), desc=desc or "train", unit="ep", leave=False,
               disable=None if progress else True)
    stopped = False
    for epoch in bar:
        reported = method.train_epoch(epoch, epochs) or {}
        row = {epoch_metric_name(k): float(v) for k, v in reported.items()}
        if len(val):
            y, probs = score_bags(method, val)
            val_loss = M.nll(y, probs)
            val_auc = M.compute_metrics(y, probs)["auc"] if monitor_auc else float("nan")
            row.update({"val/auc": val_auc, "val/loss": val_loss})
            score = val_auc if monitor_auc else -val_loss
        else:
            val_loss, score = float("nan"), float(epoch)
        for k, v in row.items():
            history.setdefault(k, []).append(v)
        if log_epoch is not None:
            log_epoch(row, epoch)
        if epoch < first:  # before pseudo-labelling: a fallback only, never the best
            if epoch == epochs - 1:
                best_epoch, best_state = epoch, copy_state(method.state_dict())
            continue
        gained = score > best[0] + (tcfg.min_delta if monitor_auc else 0.0)
        tie_better = score == best[0] and (val_loss < best[1])
        if gained or tie_better or best_state is None:
            best = (score, val_loss if not math.isnan(val_loss) else math.inf)
            best_epoch, best_state = epoch, copy_state(method.state_dict())
        since = 0 if gained else since + 1
        bar.set_postfix(loss=f"{row.get('train/loss', float('nan')):.3f}", val_auc=f"{row.get('val/auc', float('nan')):.3f}",
                        refresh=False)
        if len(val) and epoch + 1 >= tcfg.min_epochs and since >= tcfg.patience:
            stopped = epoch + 1 < epochs
            break
    bar.close()
    if best_state is not None:
        method.load_state_dict(best_state)
    best_auc = history.get("val/auc", [float("nan")] * (best_epoch + 1))[best_epoch] if best_epoch >= 0 else float("nan")
    return FitResult(best_epoch, epoch + 1, float(best_auc), float(best[1]), stopped, history, first)
