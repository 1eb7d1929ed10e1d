"""Evaluation plots as PNG files (matplotlib, Agg backend): ROC curves, confusion matrix, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsi_mil.mil.metrics import roc_auc  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_png(y: Sequence[int], probs: np.ndarray, classes: Sequence[str], path: Path, title: str = "ROC") -> Path:
    """ROC curve (binary: positive class; multi-class: one-vs-rest per class) with AUCs in the legend."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y, dtype=int)
    probs = np.asarray(probs, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    targets = [1] if len(classes) == 2 else list(range(len(classes)))
    for c in targets:
        truth = (y == c).astype(int)
        if truth.min() == truth.max():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        ax.plot(fpr, tpr, lw=1.8, label=f"{classes[c]} (AUC {roc_auc(truth, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_png(y: Sequence[int], pred: Sequence[int], classes: Sequence[str], path: Path,
                  title: str = "Confusion matrix") -> Path:
    """Confusion matrix with counts (rows = truth, columns = prediction)."""
    n = len(classes)
    cm = np.zeros((n, n), dtype=int)
    for t, p in zip(np.asarray(y, dtype=int), np.asarray(pred, dtype=int), strict=True):
        cm[t, p] += 1
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax.imshow(cm, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return _save(fig, path)


def curves_png(history: Mapping[str, Sequence[float]], path: Path, best_epoch: int | None = None,
               title: str = "Training") -> Path:
    """Training loss, validation loss and validation AUC per epoch (best epoch marked)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train/loss", "val/loss"):
        if history.get(key):
            left.plot(range(len(history[key])), history[key], label=key)
    left.set(xlabel="epoch", ylabel="loss", title=title)
    if history.get("val/auc"):
        right.plot(range(len(history["val/auc"])), history["val/auc"], c="tab:green", label="val/auc")
    right.set(xlabel="epoch", ylabel="validation AUC", ylim=(0, 1.02))
    for ax in (left, right):
        if best_epoch is not None:
            ax.axvline(best_epoch, ls=":", c="grey", label="best")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)
