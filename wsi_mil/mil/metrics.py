"""Metrics of wsi-mil: bag-level metrics with bootstrap confidence intervals, and the one ROC AUC.

:func:`roc_auc` is the ROC AUC every stage uses (bag level, instance level, heatmaps, plots);
:func:`instance_auc` pools per-slide instance scores into it.

Binary tasks score class 1 (AUC on ``probs[:, 1]``; predictions ``probs[:, 1] >= threshold`` with the
threshold chosen on the validation split). Multi-class tasks use the one-vs-rest macro AUC, argmax
predictions and the macro F1 over the classes present in the truth or the predictions (as
scikit-learn's ``f1_score(average="macro")``).

Every metric is a function of per-slide weights: the point estimate weighs each slide once, a
bootstrap resample weighs it by how often its resampling unit was drawn. The unit is the patient
when ``groups`` (the patient of each slide) is given - a patient's slides are correlated, so they are
drawn together - and the slide otherwise (Efron & Tibshirani 1993, ch. 6; the cluster bootstrap of
Field & Welsh 2007). All resamples are computed at once as matrix products, so 1000 are cheap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "balanced_accuracy", "f1")


def _weighted_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC per row of ``weights`` [B, n] for fixed labels ``positive`` [n] (bool) and ``scores`` [n].

    The Mann-Whitney statistic with sample weights: each (positive, negative) pair counts
    ``w_pos * w_neg`` when the positive scores higher and half that on a tie. NaN where a row has
    no positive or no negative weight.
    """
    order = np.argsort(scores, kind="stable")
    s, pos, w = scores[order], positive[order], weights[:, order]
    starts_group = np.r_[True, s[1:] != s[:-1]]
    group = np.cumsum(starts_group) - 1
    start = np.flatnonzero(starts_group)
    end = np.r_[start[1:], len(s)]
    neg_w = w * ~pos
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(neg_w, axis=1)], axis=1)
    below = cum[:, start[group]]  # negative weight scoring strictly lower than each slide
    tied = cum[:, end[group]] - below  # negative weight scoring the same
    pos_w = w * pos
    n_pos, n_neg = pos_w.sum(axis=1), neg_w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_w * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _metric_rows(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric per row of slide weights [B, n]; labels y [n], probabilities [n, C], predictions [n]."""
    n_classes = probs.shape[1]
    if n_classes == 2:
        auc = _weighted_auc(y == 1, probs[:, 1], weights)
    else:  # one-vs-rest macro AUC; NaN when a class is absent (scikit-learn refuses that case)
        auc = np.mean([_weighted_auc(y == c, probs[:, c], weights) for c in range(n_classes)], axis=0)
    truth = np.eye(n_classes)[y]  # [n, C] one-hot
    said = np.eye(n_classes)[pred]
    n_true, n_pred, tp = weights @ truth, weights @ said, weights @ (truth * said)  # [B, C]
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = tp.sum(axis=1) / weights.sum(axis=1)
        recall = np.where(n_true > 0, tp / n_true, np.nan)
        f1 = np.where(n_true + n_pred > 0, 2 * tp / (n_true + n_pred), np.nan)
        balanced = np.nanmean(recall, axis=1)  # classes present in the truth
        # binary: F1 of class 1 (0 without any positive); multi-class: macro over the classes present
        # in the truth or the predictions, as scikit-learn's f1_score(average="macro")
        f1 = np.nan_to_num(f1[:, 1]) if n_classes == 2 else np.nanmean(f1, axis=1)
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
    """AUC, accuracy, balanced accuracy and F1 of one set of predictions (NaN AUC with one class).

    Parameters
    ----------
    y : sequence of int, length n
        True class indices.
    probs : ndarray, float, [n, C] (or [n] positive-class scores of a binary task)
        Class probabilities.
    threshold : float, optional
        Binary decision threshold on ``probs[:, 1]`` (default 0.5); ignored for multi-class.
    """
    y = np.asarray(y, dtype=int)
    probs = _as_probs(probs)
    rows = _metric_rows(y, probs, predict_labels(probs, threshold), np.ones((1, len(y))))
    return {k: float(v[0]) for k, v in rows.items()}


def resampling_units(groups: Sequence[str] | None, n: int) -> tuple[np.ndarray, str]:
    """The bootstrap unit of each of ``n`` slides as integer codes [n], and its name.

    ``groups`` (the patient of each slide) makes the patient the unit when some patient has several
    slides; otherwise every slide is its own unit (the same thing when each patient has one slide).
    """
    if groups is not None:
        codes, uniques = pd.factorize(pd.Series(list(groups), dtype=str))
        if len(codes) != n:
            raise ValueError(f"groups has {len(codes)} entries for {n} predictions")
        if len(uniques) < n:
            return codes.astype(np.int64), "patient"
    return np.arange(n), "slide"


def bootstrap_ci(
    y: Sequence[int], probs: np.ndarray, threshold: float | None = None, *, n_boot: int = 1000, seed: int = 0,
    alpha: float = 0.05, groups: Sequence[str] | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap ``(low, high)`` per metric.

    Each resample draws as many units as there are, with replacement: patients (all their slides
    together) when ``groups`` gives the patient of each slide and some patient has several slides,
    slides otherwise. Resamples where a metric is undefined (AUC with one class) are skipped for it.
    """
    y = np.asarray(y, dtype=int)
    probs = _as_probs(probs)
    if n_boot <= 0 or len(y) == 0:
        return {k: (float("nan"), float("nan")) for k in METRICS}
    units, _ = resampling_units(groups, len(y))
    n_units = int(units.max()) + 1
    pred = predict_labels(probs, threshold)
    rng = np.random.default_rng(seed)
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in METRICS}
    step = max(1, int(2e6 // max(1, len(y) * probs.shape[-1])))
    for start in range(0, n_boot, step):
        counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=min(step, n_boot - start))
        for k, v in _metric_rows(y, probs, pred, counts[:, units].astype(np.float64)).items():
            chunks[k].append(v)
    out: dict[str, tuple[float, float]] = {}
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
    y: Sequence[int], probs: np.ndarray, threshold: float | None = None, *, n_boot: int = 1000, seed: int = 0,
    groups: Sequence[str] | None = None,
) -> dict[str, float]:
    """Point metrics plus ``<metric>_ci_low`` / ``<metric>_ci_high`` (95% bootstrap, see :func:`bootstrap_ci`)."""
    out = compute_metrics(y, probs, threshold)
    for k, (lo, hi) in bootstrap_ci(y, probs, threshold, n_boot=n_boot, seed=seed, groups=groups).items():
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
    return float(_weighted_auc(truth[keep].astype(bool), values[keep], np.ones((1, int(keep.sum()))))[0])


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
