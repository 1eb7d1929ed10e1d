"""Per-patch scores mapped to [0, 1] for colouring: min-max, rank or percentile clip."""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.stats import rankdata

log = logging.getLogger(__name__)

NORMALIZE_METHODS = ("raw", "rank", "percentile")


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
    scores: np.ndarray, method: str, *, percentiles: tuple[float, float] = (1.0, 99.0)
) -> np.ndarray:
    """Map per-patch scores to [0, 1] for colouring.

    Parameters
    ----------
    scores:
        Per-patch scores (any shape; flattened to [N]).
    method:
        ``"raw"``: min-max to [0, 1]; ``"rank"``: rank / (N - 1), ties averaged (uniform over patches,
        so a map is never 'cold' everywhere); ``"percentile"``: clip to the ``percentiles`` (1st..99th
        by default) then min-max.
    percentiles:
        Lower and upper clip percentiles for ``"percentile"``.

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
    lo_pct, hi_pct = percentiles
    if not 0 <= lo_pct < hi_pct <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {percentiles}")
    if bad.all():
        return values
    lo, hi = np.nanpercentile(values, [lo_pct, hi_pct])
    return _minmax(np.clip(values, lo, hi))
