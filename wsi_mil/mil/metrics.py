"""Metrics of wsi-mil: bag-level metrics with bootstrap confidence intervals, and the one ROC AUC.

:func:`roc_auc` is the ROC AUC every stage uses (bag level, instance level, heatmaps, plots);
:func:`instance_auc` pools per-slide instance scores into it.

Binary tasks score class 1 (AUC on ``probs[:, 1]``; predictions ``probs[:, 1] >= threshold`` with the
threshold chosen on the validation split). Multi-class tasks use the one-vs-rest macro AUC, argmax
predictions and macro F1 over all classes. Every metric is computed vectorised over bootstrap
resamples (the point estimate is the same code with the identity resample), so 1000 resamples are cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

log = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def _auc_rows(y_pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC per row: y_pos [B, n] bool, scores [B, n]; NaN where a row has one class only."""
    ranks = rankdata(scores, axis=1)
    n_pos = y_pos.sum(axis=1)
    n_neg = y_pos.shape[1] - n_pos
    u = (ranks * y_pos).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _metric_rows(y: np.ndarray, probs: np.ndarray, threshold: float | None) -> dict[str, np.ndarray]:
    """Metrics per row of resampled labels y [B, n] and probabilities [B, n, C]."""
    n_classes = probs.shape[-1]
    if n_classes == 2:
        auc = _auc_rows(y == 1, probs[..., 1])
        pred = (probs[..., 1] >= (0.5 if threshold is None else threshold)).astype(int)
    else:
        per_class = np.stack([_auc_rows(y == c, probs[..., c]) for c in range(n_classes)], axis=-1)
        auc = per_class.mean(axis=-1)  # NaN when a class is absent (as sklearn refuses that case)
        pred = probs.argmax(axis=-1)
    accuracy = (pred == y).mean(axis=1)
    recalls, f1s = [], []
    for c in range(n_classes):
        true_c, pred_c = y == c, pred == c
        tp = (true_c & pred_c).sum(axis=1)
        n_true, n_pred = true_c.sum(axis=1), pred_c.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(n_true > 0, tp / np.maximum(n_true, 1), np.nan))
            denom = n_true + n_pred
            f1s.append(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))
    with np.errstate(invalid="ignore"):
        balanced = np.nanmean(np.stack(recalls, axis=-1), axis=-1)
    f1 = f1s[1] if n_classes == 2 else np.stack(f1s, axis=-1).mean(axis=-1)
    return {"auc": auc, "accuracy": accuracy, "balanced_accuracy": balanced, "f1": f1}


def _as_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:  # positive-class scores of a binary task
        probs = np.stack([1.0 - probs, probs], axis=-1)
    return probs


def predict_labels(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class predictions: ``p1 >= threshold`` (binary) or argmax (multi-class)."""
    probs = _as_probs(probs)
    if probs.shape[-1] == 2:
        return (probs[:, 1] >= (0.5 if threshold is None else threshold)).astype(int)
    return probs.argmax(axis=-1)


def compute_metrics(y: Sequence[int], probs: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and F1 of one set of predictions (NaN AUC with one class)."""
    y = np.asarray(y, dtype=int)[None]
    rows = _metric_rows(y, _as_probs(probs)[None], threshold)
    return {k: float(v[0]) for k, v in rows.items()}


def bootstrap_ci(
    y: Sequence[int], probs: np.ndarray, threshold: float | None = None, *, n_boot: int = 1000, seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(low, high)`` per metric (resamples with one class skipped for AUC)."""
    y = np.asarray(y, dtype=int)
    probs = _as_probs(probs)
    if n_boot <= 0 or len(y) == 0:
        return {k: (float("nan"), float("nan")) for k in METRICS}
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, float]] = {}
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    step = max(1, int(2e6 // max(1, len(y) * probs.shape[-1])))
    for start in range(0, n_boot, step):
        idx = rng.integers(0, len(y), size=(min(step, n_boot - start), len(y)))
        for k, v in _metric_rows(y[idx], probs[idx], threshold).items():
            chunks[k].append(v)
    for k in METRICS:
        values = np.concatenate(chunks[k])
        values = values[~np.isnan(values)]
        if len(values) == 0:
            out[k] = (float("nan"), float("nan"))
        else:
            lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[k] = (float(lo), float(hi))
    return out


def evaluate(
    y: Sequence[int], probs: np.ndarray, threshold: float | None = None, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Point metrics plus ``<metric>_ci_low`` / ``<metric>_ci_high`` (95% bootstrap)."""
    out = compute_metrics(y, probs, threshold)
    for k, (lo, hi) in bootstrap_ci(y, probs, threshold, n_boot=n_boot, seed=seed).items():
        out[f"{k}_ci_low"] = lo
        out[f"{k}_ci_high"] = hi
    return out


def choose_threshold(y: Sequence[int], scores: Sequence[float], method: str = "youden") -> float:
    """Decision threshold on positive-class scores of the VALIDATION split.

    ``youden`` maximises TPR - FPR, ``f1`` maximises F1. The returned value lies halfway between the
    chosen validation score and the next lower one, so it reproduces the validation decisions while
    leaving a margin. With a single class in ``y`` it falls back to 0.5.
    """
    y = np.asarray(y, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int((y == 1).sum()), int((y != 1).sum())
    if n_pos == 0 or n_neg == 0:
        log.warning("validation split has a single class; using the decision threshold 0.5")
        return 0.5
    cuts = np.unique(scores)[::-1]  # descending candidate thresholds (predict positive when score >= cut)
    pred = scores[None, :] >= cuts[:, None]
    tp = (pred & (y == 1)).sum(axis=1)
    fp = (pred & (y != 1)).sum(axis=1)
    if method == "youden":
        gain = tp / n_pos - fp / n_neg
    elif method == "f1":
        gain = 2 * tp / (2 * tp + fp + (n_pos - tp))
    else:
        raise ValueError(f"unknown threshold method {method!r}")
    best = int(np.argmax(gain))
    if best + 1 < len(cuts):
        return float((cuts[best] + cuts[best + 1]) / 2)
    return float(cuts[best])


def nll(y: Sequence[int], probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes (validation loss)."""
    probs = _as_probs(probs)
    y = np.asarray(y, dtype=int)
    if len(y) == 0:
        return float("nan")
    p = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.log(p).mean())


def summarize(rows: Sequence[dict[str, float]], metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """Mean, std (ddof=1) and count over folds/seeds of each metric; index = metric name."""
    frame = pd.DataFrame(list(rows))
    out = []
    for name in metrics:
        values = frame[name].astype(float).dropna() if name in frame else pd.Series(dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append({"metric": name, "mean": float(values.mean()) if len(values) else float("nan"),
                    "std": std, "n": int(len(values))})
    return pd.DataFrame(out).set_index("metric")


def format_summary(summary: pd.DataFrame) -> str:
    """``metric: mean +- std (n)`` lines for the terminal."""
    return "\n".join(f"{name:>18}: {row['mean']:.4f} +- {row['std']:.4f} (n={int(row['n'])})"
                     for name, row in summary.iterrows())


# ------------------------------------------------------------------------------------------- ROC AUC
def roc_auc(labels: Any, scores: Any) -> float:
    """ROC AUC of scores against binary ground truth.

    The Mann-Whitney U statistic with average ranks for ties, i.e. the area under the ROC curve as
    :func:`sklearn.metrics.roc_auc_score` computes it, by the same code as the bootstrap above.

    Parameters
    ----------
    labels : array-like
        [N] ground truth, 0/1 or bool (1 = positive: tumour slide, tumour patch).
    scores : array-like
        [N] float scores, higher = more positive. Non-finite scores are left out.

    Returns
    -------
    float
        The AUC in [0, 1]; NaN when the scored items hold a single class (or none).

    Raises
    ------
    ValueError
        When ``labels`` and ``scores`` differ in length or the labels are not binary.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    truth = np.asarray(labels).ravel()
    if values.shape != truth.shape:
        raise ValueError(f"{values.shape[0]} scores but {truth.shape[0]} labels; they must match one to one")
    if truth.dtype != bool:
        unique = np.unique(truth)
        if not np.isin(unique, (0, 1)).all():
            raise ValueError(f"labels must be binary (0/1 or bool), got values {unique[:5].tolist()}")
    keep = np.isfinite(values)
    return float(_auc_rows(truth[keep].astype(bool)[None], values[keep][None])[0])


def instance_auc(
    scores_per_slide: Mapping[str, Any] | Sequence[Any], labels_per_slide: Mapping[str, Any] | Sequence[Any]
) -> float:
    """:func:`roc_auc` of instance scores against patch labels pooled over slides.

    Parameters
    ----------
    scores_per_slide, labels_per_slide : dict or sequence
        Dicts keyed by slide id (slides missing from either, or with labels ``None``, are skipped) or
        equally long sequences; one [N] array of scores and of 0/1 patch labels per slide.

    Returns
    -------
    float
        The pooled AUC; NaN when no slide is left or the pooled patches hold a single class.

    Raises
    ------
    ValueError
        When the two sequences differ in length, or a slide has as many scores as labels.
    """
    if isinstance(scores_per_slide, Mapping) and isinstance(labels_per_slide, Mapping):
        keys = [k for k in scores_per_slide if k in labels_per_slide and labels_per_slide[k] is not None]
        pairs = [(scores_per_slide[k], labels_per_slide[k], k) for k in keys]
    else:
        if len(scores_per_slide) != len(labels_per_slide):
            raise ValueError("instance_auc: scores and labels must have one entry per slide")
        pairs = [(s, lab, i) for i, (s, lab) in enumerate(zip(scores_per_slide, labels_per_slide, strict=True))
                 if lab is not None]
    all_scores, all_labels = [], []
    for scores, labels, key in pairs:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        y = np.asarray(labels).reshape(-1)
        if s.shape != y.shape:
            raise ValueError(f"instance_auc: slide {key} has {s.size} scores but {y.size} labels")
        all_scores.append(s)
        all_labels.append(y)
    if not all_scores:
        return float("nan")
    return roc_auc(np.concatenate(all_labels).astype(np.int64), np.concatenate(all_scores))
