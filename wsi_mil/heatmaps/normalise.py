"""Per-patch scores mapped to [0, 1] for colouring.

Two scales compare slides with each other: ``absolute`` (instance probabilities shown as they are,
0 to 1: a normal slide stays cool) and ``cohort`` (one clip range for every slide drawn together,
:func:`cohort_bounds`). ``raw`` (min-max), ``rank`` and ``percentile`` rescale each slide on its
own: every slide then has a hottest patch, which the legend says.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.stats import rankdata

log = logging.getLogger(__name__)

NORMALIZE_METHODS = ("raw", "rank", "percentile", "absolute", "cohort")
PER_SLIDE_METHODS = ("raw", "rank", "percentile")
PROBABILITY_MODELS = ("ins",)  # models whose instance scores are probabilities


def resolve_method(method: str, model_name: str) -> str:
    """The normalisation ``auto`` stands for: ``absolute`` for instance-probability models, else ``cohort``.

    ``model_name`` is the model's label (``ins``, ``abmil``, ``mhim(abmil)``...); any other method is returned as is.
    """
    if method != "auto":
        return method
    return "absolute" if str(model_name).lower().split("(")[0] in PROBABILITY_MODELS else "cohort"


def comparable_scores(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """Scores made comparable across slides of different sizes.

    Attention that sums to 1 over a slide's N patches (ABMIL's softmax) is multiplied by N, so that 1
    means 'uniform attention' on every slide; any other scores are returned unchanged.

    Returns
    -------
    tuple of (np.ndarray, bool)
        float64 [N] scores, and whether they were rescaled.
    """
    values = np.asarray(scores, dtype=np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size > 1 and (finite >= 0).all() and abs(float(finite.sum()) - 1.0) < 1e-3:
        return values * finite.size, True
    return values, False


def cohort_bounds(scores: list[np.ndarray], percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[float, float]:
    """One clip range for every slide drawn together: the percentiles of all their finite scores pooled.

    Returns (0, 1) when there is no finite score; a constant cohort gives (v, v).
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores]) if scores else np.zeros(0)
    pooled = pooled[np.isfinite(pooled)]
    if pooled.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(pooled, list(percentiles))
    return float(lo), float(hi)


def _minmax(values: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] ignoring NaN; a constant (or single) input maps to 0.5."""
    out = np.full(values.shape, np.nan, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return out
    lo = float(values[finite].min())
    hi = float(values[finite].max())
    if not hi > lo:  # constant or single value: never divide by zero
        out[finite] = 0.5
        return out
    kept = values[finite]
    if math.isfinite(hi - lo):
        out[finite] = np.clip((kept - lo) / (hi - lo), 0.0, 1.0)
    else:  # range beyond the float maximum: halve everything first
        out[finite] = np.clip((kept / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0), 0.0, 1.0)
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks / (n - 1) over the finite values, ties averaged; one value (or all tied) -> 0.5."""
    out = np.full(values.shape, np.nan, dtype=np.float64)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return out
    if n == 1:
        out[finite] = 0.5
        return out
    out[finite] = (rankdata(values[finite], method="average") - 1.0) / (n - 1)
    return out


def normalize_scores(
    scores: np.ndarray, method: str, *, percentiles: tuple[float, float] = (1.0, 99.0),
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map per-patch scores to [0, 1] for colouring.

    Parameters
    ----------
    scores:
        Per-patch scores (any shape; flattened to [N]).
    method:
        ``"raw"``: min-max to [0, 1]; ``"rank"``: rank / (N - 1), ties averaged (uniform over patches,
        so a map is never 'cold' everywhere); ``"percentile"``: clip to the ``percentiles`` (1st..99th
        by default) then min-max; ``"absolute"``: the scores themselves clipped to [0, 1] (probabilities);
        ``"cohort"``: clipped to ``bounds`` then mapped linearly (the same scale for every slide).
    percentiles:
        Lower and upper clip percentiles for ``"percentile"``.
    bounds:
        The cohort's clip range (:func:`cohort_bounds`) for ``"cohort"``; without it this slide's own
        percentiles are used.

    Returns
    -------
    np.ndarray
        float64 [N] in [0, 1]. Non-finite inputs (NaN, inf) stay NaN (and are left out of the
        statistics); a constant or single-value input gives 0.5; an empty input gives an empty array.
        Never divides by zero.
    """
    if method not in NORMALIZE_METHODS:
        raise ValueError(f"unknown score normalisation {method!r}; use one of {', '.join(NORMALIZE_METHODS)}")
    values = np.asarray(scores, dtype=np.float64).ravel()
    if values.size == 0:
        return values.copy()
    bad = ~np.isfinite(values)
    if bad.any():
        log.warning("%d of %d scores are not finite (NaN/inf); they are left out of the heatmap", int(bad.sum()),
                    values.size)
        values = np.where(bad, np.nan, values)
    if method == "raw":
        return _minmax(values)
    if method == "rank":
        return _ranks(values)
    if method == "absolute":
        return np.clip(values, 0.0, 1.0)
    if method == "cohort":
        lo, hi = bounds if bounds is not None else cohort_bounds([values], percentiles)
        if not hi > lo:
            return np.where(np.isfinite(values), 0.5, np.nan)
        return np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if bad.all():
        return values
    lo, hi = np.nanpercentile(values, [lo_pct, hi_pct])
    return _minmax(np.clip(values, lo, hi))
